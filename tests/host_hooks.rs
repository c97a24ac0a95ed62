//! Sharing the ingress hook with the host's other tools: while the kernel
//! path runs, an operator's classic tc filter and another TCX program on
//! the same interface still see every packet it does not forward, and
//! forwarded traffic still works. Both ways of attaching: TCX (the daemon,
//! `forwarder run`), and a cls_bpf filter (direct-action) ahead of the
//! operator's (the kernel path as a library: the daemon attaches so only
//! on kernels without TCX).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use forwarder::kernel::{KernelPath, StartOptions, TcAttach};

use crate::common::eventually;
use crate::common::harness::{
    Daemon, counter, forwarding_on, in_netns, kernel_rule, runtime, seen,
};
use crate::common::traffic::{BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket};
use crate::common::{Netns, TcxCounter, Topology, require_root};

const LISTEN_PORT: u16 = 7878;
/// Datagrams to a port without a rule: the kernel path does not take them.
const NOT_FORWARDED: u64 = 50;
/// The operator's filter's preference: after ours (aya gives a cls_bpf
/// filter 49152; lower runs first).
const OPERATOR_PREF: u32 = 60000;

/// The operator's classic filter on `interface` ingress: every IPv4
/// packet is mirrored to a spare veth, and the action counts them.
fn operators_filter(ns: &Netns, interface: &str) {
    ns.ip(&[
        "link", "add", "mirror0", "type", "veth", "peer", "name", "mirror1",
    ]);
    ns.ip(&["link", "set", "mirror0", "up"]);
    ns.ip(&["link", "set", "mirror1", "up"]);
    ns.exec("tc", &["qdisc", "add", "dev", interface, "clsact"]);
    let pref = OPERATOR_PREF.to_string();
    ns.exec(
        "tc",
        &[
            "filter", "add", "dev", interface, "ingress", "protocol", "ip", "pref", &pref, "u32",
            "match", "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", "mirror0",
        ],
    );
}

/// `tc -s filter show dev INTERFACE ingress`.
fn filters(ns: &Netns, interface: &str) -> String {
    let out = ns.exec("tc", &["-s", "filter", "show", "dev", interface, "ingress"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packets the operator's mirred action has seen ("Sent B bytes N pkt").
fn mirrored(ns: &Netns, interface: &str) -> u64 {
    let text = filters(ns, interface);
    let (_, action) = text
        .split_once("mirred")
        .unwrap_or_else(|| panic!("no mirred action in:\n{text}"));
    let words: Vec<&str> = action.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "pkt")
        .unwrap_or_else(|| panic!("no statistics in:\n{text}"));
    words[at - 1].parse().unwrap()
}

/// The preference of the filter whose line names `what`.
fn pref_of(text: &str, what: &str) -> u32 {
    let line = text
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no filter {what} in:\n{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "pref").unwrap();
    words[at + 1].parse().unwrap()
}

fn ifindex(ns: &Netns, interface: &str) -> u32 {
    let name = std::ffi::CString::new(interface).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = in_netns(ns, || unsafe { libc::if_nametoindex(name.as_ptr()) });
    assert_ne!(index, 0, "no interface {interface}");
    index
}

fn rules(topo: &Topology) -> String {
    format!(
        "interfaces: [{a}, {b}]\n\
         relay: {{drain_timeout: 1s}}\n\
         routes:\n\
         \x20 turn-tcp: {{scheme: tcp, host: {backend}, port: {LISTEN_PORT}:3478, path: kernel}}\n\
         \x20 turn-udp: {{scheme: udp, host: {backend}, port: {LISTEN_PORT}:3478, path: kernel}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        backend = topo.backend_addr(),
    )
}

/// The kernel path under test.
enum Running {
    Daemon(Daemon),
    Library(tokio::runtime::Runtime, Box<KernelPath>),
}

impl Running {
    /// The daemon where it attaches with TCX, the library for cls_bpf.
    fn start(topo: &Topology, tc_attach: TcAttach) -> Running {
        if tc_attach == TcAttach::Auto {
            return Running::Daemon(Daemon::start(&topo.forwarder, "hooks", &rules(topo)));
        }
        let compiled = forwarder::config::load_str(&rules(topo), "hooks.yaml")
            .unwrap_or_else(|e| panic!("{e}"));
        let options = StartOptions {
            tc_attach,
            ..StartOptions::default()
        };
        let rt = in_netns(&topo.forwarder, runtime);
        let path = in_netns(&topo.forwarder, || {
            rt.block_on(KernelPath::start_with(&compiled, &options))
        })
        .expect("start the kernel path");
        Running::Library(rt, Box::new(path))
    }

    /// (flows, packets_fwd, packets_rev) of the kernel path's rule for `protocol`.
    fn rule(&self, topo: &Topology, protocol: &str) -> (u64, u64, u64) {
        let alias = format!("turn-{protocol}");
        match self {
            Running::Daemon(daemon) => {
                let status = daemon.status();
                let r = kernel_rule(&status, &alias, protocol);
                let c = |name| counter(r, name);
                (c("flows"), c("packets_fwd"), c("packets_rev"))
            }
            Running::Library(_, path) => {
                let counters = in_netns(&topo.forwarder, || path.counters()).unwrap();
                let r = counters
                    .rules
                    .iter()
                    .find(|r| r.alias == alias && r.protocol == protocol)
                    .unwrap_or_else(|| panic!("no rule {alias} in {:?}", counters.rules));
                (r.flows, r.packets_fwd, r.packets_rev)
            }
        }
    }

    fn stop(self, topo: &Topology) {
        match self {
            Running::Daemon(daemon) => {
                daemon.stop();
            }
            Running::Library(rt, path) => {
                in_netns(&topo.forwarder, || path.stop()).expect("stop");
                drop(rt);
            }
        }
    }
}

/// Runs the kernel path attached by `tc_attach` beside the operator's
/// filter (and, on TCX, a second TCX program after ours): forwarded
/// traffic works, and what we do not take reaches both.
fn shares_the_hook(tc_attach: TcAttach) {
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let fwd_if = topo.client_link.a_if.clone();
    operators_filter(&topo.forwarder, &fwd_if);
    let running = Running::start(&topo, tc_attach);
    let tcx = (tc_attach == TcAttach::Auto).then(|| {
        let index = ifindex(&topo.forwarder, &fwd_if);
        in_netns(&topo.forwarder, || TcxCounter::attach(index)).expect("a second TCX program")
    });
    match tc_attach {
        TcAttach::Auto => {
            let during = seen(&topo.forwarder, &fwd_if);
            assert_eq!(
                during.tcx_progs.len(),
                2,
                "ours, then the other: {during:?}"
            );
        }
        TcAttach::Netlink => {
            let text = filters(&topo.forwarder, &fwd_if);
            let ours = pref_of(&text, "forwarder_tc");
            assert!(ours < OPERATOR_PREF, "ours runs first:\n{text}");
        }
    }
    let mirrored_before = mirrored(&topo.forwarder, &fwd_if);
    let tcx_before = tcx.as_ref().map_or(0, TcxCounter::count);

    let listener = SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT));
    let no_rule = SocketAddr::from((topo.forwarder_addr(), 9));
    in_netns(&topo.client, || {
        let udp = udp_socket(listener);
        for n in 0..10u8 {
            udp_echo(&udp, &[b'u', n]);
        }
        tcp_echo_round(&mut tcp_echo_conn(listener), b"through the kernel path");
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        for _ in 0..NOT_FORWARDED {
            socket.send_to(b"not ours", no_rule).unwrap();
        }
    });
    eventually("the operator's filter and the other program count", || {
        mirrored(&topo.forwarder, &fwd_if) - mirrored_before >= NOT_FORWARDED
            && tcx
                .as_ref()
                .is_none_or(|c| c.count() - tcx_before >= NOT_FORWARDED)
    });
    // Forwarded packets are redirected: a final verdict, so the operator's
    // filter sees none of them (nothing else IPv4 crosses this link).
    let seen_by_filter = mirrored(&topo.forwarder, &fwd_if) - mirrored_before;
    assert_eq!(seen_by_filter, NOT_FORWARDED);

    let (udp, tcp) = (running.rule(&topo, "udp"), running.rule(&topo, "tcp"));
    assert!(udp.0 == 1 && udp.1 >= 10 && udp.2 >= 10, "udp {udp:?}");
    assert_eq!(tcp.0, 1, "tcp {tcp:?}");

    drop(tcx);
    running.stop(&topo);
    // The operator's filter is as it was.
    let text = filters(&topo.forwarder, &fwd_if);
    assert!(!text.contains("forwarder"), "{text}");
    assert_eq!(pref_of(&text, "u32"), OPERATOR_PREF);
}

#[test]
fn a_tc_filter_and_another_tcx_program_see_what_we_do_not_forward() {
    if !require_root("a_tc_filter_and_another_tcx_program_see_what_we_do_not_forward") {
        return;
    }
    shares_the_hook(TcAttach::Auto);
}

#[test]
fn as_a_cls_bpf_filter_we_pass_what_we_do_not_forward_to_the_next_filter() {
    if !require_root("as_a_cls_bpf_filter_we_pass_what_we_do_not_forward_to_the_next_filter") {
        return;
    }
    shares_the_hook(TcAttach::Netlink);
}
