//! Integration tests: the kernel path on real interfaces in namespaces,
//! as a library and through the daemon (`forwarder run` in the forwarder
//! namespace of the client | forwarder | backend topology).

pub mod harness;
pub mod traffic;
mod wire;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use forwarder::kernel::{KernelPath, StartOptions, TcAttach};
use forwarder::rules::{Compiled, KernelSettings, KernelTable, RelaySettings};
use forwarder_common::{PROTO_TCP, RULE_F_XDP, RuleKey, RuleValue};

use crate::common::{self, Topology};
use harness::{in_netns, program_loaded, runtime, seen};

/// No listener, and one rule that asks for XDP (on a port no test uses),
/// so that both programs are attached.
fn compiled_for(interfaces: Option<Vec<String>>) -> Compiled {
    let xdp_rule = (
        RuleKey {
            port: 1u16.to_be(),
            proto: PROTO_TCP,
            ..RuleKey::default()
        },
        RuleValue {
            flags: RULE_F_XDP,
            ..RuleValue::default()
        },
    );
    Compiled {
        interfaces,
        listeners: Vec::new(),
        kernel: KernelTable {
            rules: vec![xdp_rule],
            backends: Vec::new(),
            acl: Vec::new(),
        },
        relay: RelaySettings::default(),
        kernel_settings: KernelSettings {
            conntrack_size: 1024,
            ..KernelSettings::default()
        },
        ..Compiled::default()
    }
}

/// Sends `n` datagrams from the client to the forwarder (nobody listens;
/// the packets only have to cross the forwarder's interface).
fn send_from_client(topo: &Topology, n: usize) {
    let to = SocketAddr::from((topo.forwarder_addr(), 9));
    in_netns(&topo.client, || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        for _ in 0..n {
            socket.send_to(b"count me", to).unwrap();
        }
    });
}

fn attach_count_detach(tc_attach: TcAttach, clsact_before: bool) {
    let topo = Topology::new();
    let fwd_if = topo.client_link.a_if.clone();
    if clsact_before {
        topo.forwarder
            .exec("tc", &["qdisc", "add", "dev", &fwd_if, "clsact"]);
    }
    let compiled = compiled_for(Some(vec![
        topo.client_link.a_if.clone(),
        topo.backend_link.a_if.clone(),
    ]));
    let options = StartOptions {
        tc_attach,
        ..StartOptions::default()
    };
    let rt = in_netns(&topo.forwarder, runtime);
    let path = in_netns(&topo.forwarder, || {
        rt.block_on(KernelPath::start_with(&compiled, &options))
    })
    .expect("start the kernel path");

    let during = seen(&topo.forwarder, &fwd_if);
    let xdp_prog = during.xdp_prog.expect("an XDP program on the interface");
    let tc_prog = match tc_attach {
        TcAttach::Auto => {
            assert_eq!(during.tcx_progs.len(), 1, "{during:?}");
            during.tcx_progs[0]
        }
        TcAttach::Netlink => {
            assert!(during.clsact, "{during:?}");
            assert!(during.tc_filters.contains("forwarder_tc"), "{during:?}");
            during
                .tc_filters
                .split_whitespace()
                .skip_while(|w| *w != "id")
                .nth(1)
                .and_then(|id| id.parse().ok())
                .expect("the filter's program id")
        }
    };
    assert!(program_loaded(xdp_prog) && program_loaded(tc_prog));

    let n = 200;
    send_from_client(&topo, n);
    let counters = in_netns(&topo.forwarder, || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let c = path.counters().unwrap();
            let i = c
                .interfaces
                .iter()
                .find(|i| i.name == fwd_if)
                .unwrap()
                .clone();
            if (i.tc_packets >= n as u64 && i.xdp_packets >= n as u64)
                || std::time::Instant::now() > deadline
            {
                return i;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert!(counters.tc_packets >= n as u64, "{counters:?}");
    assert!(counters.xdp_packets >= n as u64, "{counters:?}");
    // Each datagram is at least Ethernet + IPv4 + UDP + 8 bytes.
    assert!(counters.tc_bytes >= (n * 50) as u64, "{counters:?}");
    assert!(counters.xdp_bytes >= (n * 50) as u64, "{counters:?}");

    in_netns(&topo.forwarder, || path.stop()).expect("stop");
    drop(rt);

    for interface in [&topo.client_link.a_if, &topo.backend_link.a_if] {
        let after = seen(&topo.forwarder, interface);
        assert_eq!(after.xdp_prog, None, "{interface}: {after:?}");
        assert!(after.tcx_progs.is_empty(), "{interface}: {after:?}");
        assert!(
            !after.tc_filters.contains("forwarder"),
            "{interface}: {after:?}"
        );
        let ours_before = clsact_before && interface == &fwd_if;
        assert_eq!(after.clsact, ours_before, "{interface}: {after:?}");
    }
    assert!(!program_loaded(xdp_prog), "XDP program {xdp_prog} unloaded");
    assert!(!program_loaded(tc_prog), "TC program {tc_prog} unloaded");
}

#[test]
fn tcx_and_xdp_count_traffic_and_leave_nothing_behind() {
    if !common::require_root("tcx_and_xdp_count_traffic_and_leave_nothing_behind") {
        return;
    }
    attach_count_detach(TcAttach::Auto, false);
}

#[test]
fn netlink_tc_removes_the_clsact_it_added() {
    if !common::require_root("netlink_tc_removes_the_clsact_it_added") {
        return;
    }
    attach_count_detach(TcAttach::Netlink, false);
}

#[test]
fn netlink_tc_leaves_a_clsact_that_was_there() {
    if !common::require_root("netlink_tc_leaves_a_clsact_that_was_there") {
        return;
    }
    attach_count_detach(TcAttach::Netlink, true);
}

#[test]
fn a_missing_interface_is_a_clear_error_and_nothing_stays() {
    if !common::require_root("a_missing_interface_is_a_clear_error_and_nothing_stays") {
        return;
    }
    let topo = Topology::new();
    let fwd_if = topo.client_link.a_if.clone();
    let compiled = compiled_for(Some(vec![fwd_if.clone(), "eth9".into()]));
    let options = StartOptions {
        config_file: Some("/etc/forwarder/rules.yaml".into()),
        ..StartOptions::default()
    };
    let rt = in_netns(&topo.forwarder, runtime);
    let err = in_netns(&topo.forwarder, || {
        rt.block_on(KernelPath::start_with(&compiled, &options))
    })
    .err()
    .expect("refused")
    .to_string();
    assert_eq!(
        err,
        "interface `eth9` does not exist (from `interfaces:` in /etc/forwarder/rules.yaml)"
    );
    let after = seen(&topo.forwarder, &fwd_if);
    assert!(
        after.xdp_prog.is_none() && after.tcx_progs.is_empty(),
        "{after:?}"
    );
}

#[test]
fn a_failed_attach_takes_off_what_it_attached() {
    if !common::require_root("a_failed_attach_takes_off_what_it_attached") {
        return;
    }
    let topo = Topology::new();
    let (a, b) = (
        topo.client_link.a_if.clone(),
        topo.backend_link.a_if.clone(),
    );
    let rt = in_netns(&topo.forwarder, runtime);
    let reserved_at_first = harness::reserved_ports(&topo.forwarder);
    // A first instance holds the second interface...
    let first = in_netns(&topo.forwarder, || {
        rt.block_on(KernelPath::start(&compiled_for(Some(vec![b.clone()]))))
    })
    .expect("first instance");
    let held = seen(&topo.forwarder, &b);
    let reserved_by_first = harness::reserved_ports(&topo.forwarder);
    // ...so a second one gets the first interface, fails on the second,
    // and must leave the first as it found it.
    let err = in_netns(&topo.forwarder, || {
        rt.block_on(KernelPath::start(&compiled_for(Some(vec![
            a.clone(),
            b.clone(),
        ]))))
    })
    .err()
    .expect("the second interface is taken")
    .to_string();
    assert!(err.contains(&b), "{err}");
    let on_a = seen(&topo.forwarder, &a);
    assert!(
        on_a.xdp_prog.is_none() && on_a.tcx_progs.is_empty(),
        "{on_a:?}"
    );
    let on_b = seen(&topo.forwarder, &b);
    assert_eq!(
        on_b.xdp_prog, held.xdp_prog,
        "the first instance kept its XDP"
    );
    assert_eq!(
        on_b.tcx_progs, held.tcx_progs,
        "the first instance kept its TC"
    );
    assert_eq!(
        harness::reserved_ports(&topo.forwarder),
        reserved_by_first,
        "the failed start gave back the ports it reserved"
    );
    in_netns(&topo.forwarder, || first.stop()).expect("stop");
    assert_eq!(harness::reserved_ports(&topo.forwarder), reserved_at_first);
}

// ---------------------------------------------------------------------------
// Through the daemon: `forwarder run` in the forwarder namespace.

use harness::{
    Daemon, counter, eventually, forwarding_on, interface, kernel_rule, relay_rule, reserved_ports,
};
use traffic::{
    BackendServers, tcp_echo_conn, tcp_echo_round, tcp_hash_transfer, udp_echo, udp_socket,
    udp_socket_from,
};

const LISTEN_PORT: u16 = 7878;

/// TCP and UDP on 7878 to the backend's 3478 (a TURN server's layout).
fn turn_rules(topo: &Topology, extra: &str) -> String {
    turn_rules_on(topo, extra, "auto")
}

/// [`turn_rules`] with both rules on `path`.
fn turn_rules_on(topo: &Topology, extra: &str, path: &str) -> String {
    format!(
        "interfaces: [{a}, {b}]\n\
         relay: {{drain_timeout: 1s}}\n\
         {extra}\
         routes:\n\
         \x20 turn-tcp: {{scheme: tcp, host: {backend}, port: {LISTEN_PORT}:3478, path: {path}}}\n\
         \x20 turn-udp: {{scheme: udp, host: {backend}, port: {LISTEN_PORT}:3478, path: {path}}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        backend = topo.backend_addr(),
    )
}

fn listener_addr(topo: &Topology) -> SocketAddr {
    SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT))
}

/// After a stop: nothing of ours on either interface, the programs gone,
/// the reserved ports as they were.
fn assert_nothing_left(topo: &Topology, programs: &[u32], reserved_before: &str) {
    for i in [&topo.client_link.a_if, &topo.backend_link.a_if] {
        let after = seen(&topo.forwarder, i);
        assert!(after.nothing(), "{i}: {after:?}");
    }
    for &id in programs {
        assert!(!program_loaded(id), "program {id} still loaded");
    }
    assert_eq!(reserved_ports(&topo.forwarder), reserved_before);
}

/// The ids of our programs on the client-side interface: TC, and XDP
/// exactly when `with_xdp`.
fn our_programs(topo: &Topology, with_xdp: bool) -> Vec<u32> {
    let s = seen(&topo.forwarder, &topo.client_link.a_if);
    assert_eq!(s.tcx_progs.len(), 1, "TC attached: {s:?}");
    assert_eq!(s.xdp_prog.is_some(), with_xdp, "XDP attached: {s:?}");
    let mut ids = s.tcx_progs.clone();
    ids.extend(s.xdp_prog);
    ids
}

#[test]
fn turn_like_tcp_and_udp_at_once_with_a_256_mib_transfer_on_the_kernel_path() {
    if !common::require_root(
        "turn_like_tcp_and_udp_at_once_with_a_256_mib_transfer_on_the_kernel_path",
    ) {
        return;
    }
    let topo = Topology::new();
    let status = turn_like_run(&topo, "turn-tc", "auto");
    // `auto` leaves XDP out: TC carried every packet.
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        assert_eq!(counter(k, "xdp_packets"), 0, "{k}");
    }
    // TC saw the traffic on both interfaces (as GSO skbs, so fewer
    // packets than segments): the 256 MiB from the client, at least the
    // 200 UDP replies from the backend. No rule asked for XDP, so none was
    // attached and it counted nothing.
    let from_client = interface(&status, &topo.client_link.a_if);
    assert!(
        counter(from_client, "tc_bytes") >= 256 << 20,
        "{from_client}"
    );
    let from_backend = interface(&status, &topo.backend_link.a_if);
    assert!(counter(from_backend, "tc_packets") >= 200, "{from_backend}");
    for c in [from_client, from_backend] {
        assert_eq!(counter(c, "xdp_packets"), 0, "{c}");
        assert_eq!(counter(c, "xdp_bytes"), 0, "{c}");
    }
}

#[test]
fn turn_like_tcp_and_udp_at_once_with_a_256_mib_transfer_on_the_xdp_path() {
    if !common::require_root(
        "turn_like_tcp_and_udp_at_once_with_a_256_mib_transfer_on_the_xdp_path",
    ) {
        return;
    }
    let topo = Topology::new();
    topo.accept_xdp_redirects();
    let status = turn_like_run(&topo, "turn-xdp", "xdp");
    // XDP carried most packets of the established flows, both ways; TC
    // opened and closed them.
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        let all = counter(k, "packets_fwd") + counter(k, "packets_rev");
        let xdp = counter(k, "xdp_packets");
        assert!(
            xdp > 0 && xdp * 10 >= all * 9,
            "XDP carried {xdp} of {all}: {k}"
        );
    }
    // Both programs counted on both interfaces: XDP every frame, TC what
    // XDP passed up (each flow's handshake and close, at the least).
    for i in [&topo.client_link.a_if, &topo.backend_link.a_if] {
        let c = interface(&status, i);
        assert!(counter(c, "xdp_packets") >= 200, "{i}: {c}");
        assert!(counter(c, "xdp_bytes") > 0, "{i}: {c}");
        assert!(counter(c, "tc_packets") >= 21, "{i}: {c}");
        assert!(
            counter(c, "tc_packets") < counter(c, "xdp_packets"),
            "{i}: {c}"
        );
    }
}

#[test]
fn under_path_xdp_veths_whose_peers_take_no_xdp_frames_are_left_to_tc() {
    if !common::require_root("under_path_xdp_veths_whose_peers_take_no_xdp_frames_are_left_to_tc") {
        return;
    }
    let topo = Topology::new();
    // Complete checksums, so XDP would take the flows; but GRO off on the
    // peers, which would drop the frames XDP sends them.
    let peers = [
        (&topo.client, &topo.client_link.b_if),
        (&topo.backend, &topo.backend_link.b_if),
    ];
    for (ns, i) in peers {
        ns.exec("ethtool", &["-K", i, "gro", "off", "tx", "off"]);
    }
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(
        &topo.forwarder,
        "xdp-nogro",
        &turn_rules_on(&topo, "", "xdp"),
    );
    let to = listener_addr(&topo);
    let traffic = |rounds: u32| {
        in_netns(&topo.client, || {
            let udp = udp_socket(to);
            let mut tcp = tcp_echo_conn(to);
            for n in 0..rounds {
                udp_echo(&udp, format!("datagram {n}").as_bytes());
                tcp_echo_round(&mut tcp, format!("segment {n}").as_bytes());
            }
        })
    };
    traffic(100);
    let log = daemon.log_text();
    for i in [&topo.client_link.a_if, &topo.backend_link.a_if] {
        assert!(
            log.contains(&format!("{i} takes no XDP frames now")),
            "{i} left to TC:\n{log}"
        );
    }
    let xdp_packets = |status: &serde_json::Value| -> u64 {
        [("turn-tcp", "tcp"), ("turn-udp", "udp")]
            .iter()
            .map(|(alias, proto)| counter(kernel_rule(status, alias, proto), "xdp_packets"))
            .sum()
    };
    let status = daemon.status();
    assert_eq!(xdp_packets(&status), 0, "XDP sent nothing: {status}");

    // The peers take XDP frames from now on: the daemon sees it, and XDP
    // carries the flows' packets.
    for (ns, i) in peers {
        ns.exec("ethtool", &["-K", i, "gro", "on"]);
    }
    eventually("both interfaces taken back", || {
        daemon.log_text().matches("takes XDP frames again").count() == 2
    });
    traffic(100);
    let status = daemon.status();
    assert!(xdp_packets(&status) >= 200, "XDP carried them: {status}");
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        assert_eq!(counter(relay_rule(&status, alias, proto), "flows"), 0);
        assert_eq!(counter(k, "dropped"), 0, "{k}");
    }
    daemon.stop();
}

#[test]
fn senders_with_checksum_offload_stay_on_tc_under_path_xdp() {
    if !common::require_root("senders_with_checksum_offload_stay_on_tc_under_path_xdp") {
        return;
    }
    let topo = Topology::new();
    // Redirects would arrive, but the senders leave checksums partial.
    topo.client
        .exec("ethtool", &["-K", &topo.client_link.b_if, "gro", "on"]);
    topo.backend
        .exec("ethtool", &["-K", &topo.backend_link.b_if, "gro", "on"]);
    let status = turn_like_run(&topo, "turn-xdp-offload", "xdp");
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        assert_eq!(counter(k, "xdp_packets"), 0, "{k}");
    }
}

/// The TURN-like run on `path`: a 256 MiB TCP transfer with UDP and short
/// TCP flows on the same port at once, through the daemon. Checks what
/// holds on any kernel path (the data, the flows, nothing for the relay,
/// nothing left after the stop) and returns the last status.
/// `name` keeps the daemon's files apart from those of tests running at
/// the same time.
fn turn_like_run(topo: &Topology, name: &str, path: &str) -> serde_json::Value {
    forwarding_on(topo);
    let _servers = BackendServers::start(&topo.backend);
    let reserved_before = reserved_ports(&topo.forwarder);
    let daemon = Daemon::start(&topo.forwarder, name, &turn_rules_on(topo, "", path));
    assert_eq!(reserved_ports(&topo.forwarder), "40000-59999");
    let programs = our_programs(topo, path == "xdp");
    let to = listener_addr(topo);
    let size: u64 = 256 << 20;

    let (sent, received) = in_netns(&topo.client, || {
        std::thread::scope(|s| {
            let bulk = s.spawn(|| tcp_hash_transfer(to, size));
            // Meanwhile, on the same port: UDP and short TCP flows.
            let udp = udp_socket(to);
            for n in 0..200u32 {
                udp_echo(&udp, format!("turn datagram {n}").as_bytes());
            }
            for n in 0..20u32 {
                let mut c = tcp_echo_conn(to);
                tcp_echo_round(&mut c, format!("turn stream {n}").as_bytes());
            }
            bulk.join().unwrap()
        })
    });
    assert_eq!(sent, received, "SHA-256 of the 256 MiB at the backend");

    let status = daemon.status();
    let tcp = kernel_rule(&status, "turn-tcp", "tcp");
    let udp = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(tcp, "flows"), 21, "{tcp}");
    assert!(counter(tcp, "bytes_fwd") >= size, "{tcp}");
    assert!(counter(tcp, "packets_rev") > 0, "{tcp}");
    assert_eq!(counter(udp, "flows"), 1, "{udp}");
    assert!(counter(udp, "packets_fwd") >= 200, "{udp}");
    assert!(counter(udp, "packets_rev") >= 200, "{udp}");
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        assert_eq!(
            counter(k, "fallback_full") + counter(k, "fallback_other"),
            0,
            "{k}"
        );
        let r = relay_rule(&status, alias, proto);
        assert_eq!(counter(r, "flows"), 0, "the relay carried nothing: {r}");
        assert_eq!(counter(r, "bytes_to_backend"), 0, "{r}");
    }

    daemon.stop();
    assert_nothing_left(topo, &programs, &reserved_before);
    status
}

#[test]
fn ten_thousand_udp_flows_on_the_kernel_path() {
    if !common::require_root("ten_thousand_udp_flows_on_the_kernel_path") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "10k", &turn_rules(&topo, ""));
    let to = listener_addr(&topo);
    let flows = 10_000u32;
    let threads = 4;
    in_netns(&topo.client, || {
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || {
                    for n in (t..flows).step_by(threads as usize) {
                        // A port per flow: an ephemeral one could come back
                        // and be the same flow again.
                        let socket = udp_socket_from(20_000 + n as u16, to);
                        udp_echo(&socket, format!("flow {n}").as_bytes());
                    }
                });
            }
        })
    });
    let status = daemon.status();
    let k = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(k, "flows"), u64::from(flows), "{k}");
    assert_eq!(
        counter(k, "fallback_full") + counter(k, "fallback_other"),
        0,
        "{k}"
    );
    assert!(counter(k, "packets_rev") >= u64::from(flows), "{k}");
    let r = relay_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(r, "flows"), 0, "{r}");
    daemon.stop();
}

#[test]
fn fragmented_datagrams_go_to_the_relay_for_the_whole_flow() {
    if !common::require_root("fragmented_datagrams_go_to_the_relay_for_the_whole_flow") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "frag", &turn_rules(&topo, ""));
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        let socket = udp_socket(to);
        // 4,000 bytes over MTU 1500: three fragments each way.
        for n in 0..5u8 {
            udp_echo(&socket, &vec![n; 4000]);
        }
        // Then small datagrams of the same flow stay with the relay.
        for n in 0..5u32 {
            udp_echo(&socket, format!("small {n}").as_bytes());
        }
    });
    let status = daemon.status();
    let k = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(k, "flows"), 0, "the kernel took nothing: {k}");
    assert!(counter(k, "fallback_other") >= 1, "{k}");
    let r = relay_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(r, "flows"), 1, "{r}");
    assert!(counter(r, "bytes_to_backend") >= 5 * 4000 + 5 * 7, "{r}");
    assert!(counter(r, "bytes_to_client") >= 5 * 4000, "{r}");
    // Whole datagrams: the stack reassembled the fragments for the relay.
    assert!(counter(r, "datagrams_to_backend") >= 10, "{r}");
    assert!(counter(r, "datagrams_to_client") >= 10, "{r}");
    daemon.stop();
}

#[test]
fn a_kernel_flow_that_sends_fragmented_datagrams_later_stays_in_the_kernel() {
    if !common::require_root(
        "a_kernel_flow_that_sends_fragmented_datagrams_later_stays_in_the_kernel",
    ) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "later-frag", &turn_rules(&topo, ""));
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        let socket = udp_socket(to);
        for n in 0..5u32 {
            udp_echo(&socket, format!("small {n}").as_bytes());
        }
        // 4,000 bytes over MTU 1500: three fragments each way, which the
        // echo checks whole.
        for n in 0..5u8 {
            udp_echo(&socket, &vec![n; 4000]);
        }
        udp_echo(&socket, b"small again");
    });
    let status = daemon.status();
    let k = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(k, "flows"), 1, "{k}");
    assert!(counter(k, "packets_fwd") >= 6 + 5 * 3, "{k}");
    assert!(counter(k, "packets_rev") >= 6 + 5 * 3, "{k}");
    assert!(counter(k, "bytes_fwd") >= 5 * 4000, "{k}");
    assert_eq!(counter(k, "fallback_other"), 0, "{k}");
    let r = relay_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(r, "flows"), 0, "the relay took no part of it: {r}");
    daemon.stop();
}

#[test]
fn with_a_tiny_conntrack_table_overflow_flows_still_work_through_the_relay() {
    if !common::require_root(
        "with_a_tiny_conntrack_table_overflow_flows_still_work_through_the_relay",
    ) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // Room for two flows.
    let rules = turn_rules(&topo, "kernel: {conntrack_size: 4}\n");
    let daemon = Daemon::start(&topo.forwarder, "tiny", &rules);
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        // All open at once, each used twice, so none can end early.
        let mut conns: Vec<_> = (0..10).map(|_| tcp_echo_conn(to)).collect();
        for round in 0..2 {
            for (n, c) in conns.iter_mut().enumerate() {
                tcp_echo_round(c, format!("conn {n} round {round}").as_bytes());
            }
        }
        let sockets: Vec<_> = (0..5).map(|_| udp_socket(to)).collect();
        for (n, s) in sockets.iter().enumerate() {
            udp_echo(s, format!("udp {n}").as_bytes());
            udp_echo(s, format!("udp {n} again").as_bytes());
        }
    });
    let status = daemon.status();
    let tcp = kernel_rule(&status, "turn-tcp", "tcp");
    assert_eq!(counter(tcp, "flows"), 2, "{tcp}");
    assert_eq!(counter(tcp, "fallback_full"), 8, "{tcp}");
    assert_eq!(counter(relay_rule(&status, "turn-tcp", "tcp"), "flows"), 8);
    let udp = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(udp, "flows"), 0, "{udp}");
    assert_eq!(counter(udp, "fallback_full"), 5, "{udp}");
    assert_eq!(counter(relay_rule(&status, "turn-udp", "udp"), "flows"), 5);
    daemon.stop();
}

#[test]
fn closed_flows_hand_their_snat_ports_on_so_waves_of_connections_stay_in_the_kernel() {
    if !common::require_root(
        "closed_flows_hand_their_snat_ports_on_so_waves_of_connections_stay_in_the_kernel",
    ) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // Ten ports, thirty connections: every wave after the first needs the
    // ports of the one before, long before tcp_close (10 s) frees them.
    let rules = turn_rules(&topo, "kernel: {snat_ports: 40000-40009}\n");
    let daemon = Daemon::start(&topo.forwarder, "reuse", &rules);
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        for wave in 0..3 {
            if wave > 0 {
                // Past the second of quiet a closed flow must keep.
                std::thread::sleep(Duration::from_millis(1500));
            }
            for n in 0..10 {
                let mut c = tcp_echo_conn(to);
                tcp_echo_round(&mut c, format!("wave {wave} conn {n}").as_bytes());
                // Closed by us first; the echo server closes on our FIN.
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                std::io::Read::read_to_end(&mut c, &mut rest).unwrap();
                assert!(rest.is_empty(), "{rest:?}");
            }
        }
    });
    let status = daemon.status();
    let tcp = kernel_rule(&status, "turn-tcp", "tcp");
    assert_eq!(counter(tcp, "flows"), 30, "{tcp}");
    assert_eq!(counter(tcp, "fallback_full"), 0, "{tcp}");
    assert_eq!(counter(relay_rule(&status, "turn-tcp", "tcp"), "flows"), 0);
    daemon.stop();
}

#[test]
fn a_relay_rule_is_carried_by_the_relay_only() {
    if !common::require_root("a_relay_rule_is_carried_by_the_relay_only") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let yaml = format!(
        "interfaces: [{a}, {b}]\n\
         relay: {{drain_timeout: 1s}}\n\
         routes:\n\
         \x20 kernel: {{scheme: udp, host: {backend}, port: 7878:3478}}\n\
         \x20 relayed: {{scheme: 'tcp,udp', host: {backend}, port: 7879:3478, path: relay}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        backend = topo.backend_addr(),
    );
    let daemon = Daemon::start(&topo.forwarder, "relayrule", &yaml);
    let relayed = SocketAddr::from((topo.forwarder_addr(), 7879));
    in_netns(&topo.client, || {
        let mut c = tcp_echo_conn(relayed);
        tcp_echo_round(&mut c, b"through the relay");
        udp_echo(&udp_socket(relayed), b"through the relay too");
        udp_echo(&udp_socket(listener_addr(&topo)), b"through the kernel");
    });
    let status = daemon.status();
    for proto in ["tcp", "udp"] {
        let k = kernel_rule(&status, "relayed", proto);
        for c in ["flows", "packets_fwd", "fallback_full", "fallback_other"] {
            assert_eq!(counter(k, c), 0, "{c}: {k}");
        }
        assert_eq!(counter(relay_rule(&status, "relayed", proto), "flows"), 1);
    }
    assert_eq!(counter(kernel_rule(&status, "kernel", "udp"), "flows"), 1);
    assert_eq!(counter(relay_rule(&status, "kernel", "udp"), "flows"), 0);
    daemon.stop();
}

#[test]
fn stop_leaves_nothing_behind_and_a_new_start_works() {
    if !common::require_root("stop_leaves_nothing_behind_and_a_new_start_works") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    // Someone else's reservation must survive us.
    topo.forwarder
        .sysctl("net.ipv4.ip_local_reserved_ports", "1000-1010,2222");
    let before = reserved_ports(&topo.forwarder);
    assert_eq!(before, "1000-1010,2222");
    let _servers = BackendServers::start(&topo.backend);
    let to = listener_addr(&topo);
    for round in 0..2 {
        let daemon = Daemon::start(
            &topo.forwarder,
            &format!("restart{round}"),
            &turn_rules(&topo, ""),
        );
        assert_eq!(
            reserved_ports(&topo.forwarder),
            "1000-1010,2222,40000-59999"
        );
        let programs = our_programs(&topo, false);
        in_netns(&topo.client, || {
            let mut c = tcp_echo_conn(to);
            tcp_echo_round(&mut c, b"before stop");
            udp_echo(&udp_socket(to), b"before stop");
        });
        let status = daemon.status();
        assert_eq!(counter(kernel_rule(&status, "turn-tcp", "tcp"), "flows"), 1);
        assert_eq!(counter(kernel_rule(&status, "turn-udp", "udp"), "flows"), 1);
        daemon.stop();
        assert_nothing_left(&topo, &programs, &before);
    }
}

// ---------------------------------------------------------------------------
// Checksums as packets really travel.

/// Every veth end without checksum offload, TSO, GSO or GRO: each packet
/// carries a full checksum that the receiving stack verifies in software,
/// so a wrong one is dropped and counted in InCsumErrors.
#[test]
fn checksums_hold_when_every_receiver_verifies_them() {
    if !common::require_root("checksums_hold_when_every_receiver_verifies_them") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    in_netns(&topo.client, || wire::offloads_off(&topo.client_link.b_if));
    in_netns(&topo.backend, || {
        wire::offloads_off(&topo.backend_link.b_if)
    });
    in_netns(&topo.forwarder, || {
        wire::offloads_off(&topo.client_link.a_if);
        wire::offloads_off(&topo.backend_link.a_if);
    });
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "swcsum", &turn_rules(&topo, ""));
    let to = listener_addr(&topo);
    let size: u64 = 32 << 20;
    let (sent, received) = in_netns(&topo.client, || {
        let udp = udp_socket(to);
        // Odd and even lengths, so the padding byte of the sum is covered.
        for len in 1..=64usize {
            udp_echo(&udp, &vec![len as u8; len * 17]);
        }
        // A sender that leaves the UDP checksum zero (SO_NO_CHECK).
        let bare = udp_socket(to);
        let one: i32 = 1;
        // SAFETY: setting an int option on a live socket.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&bare),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&one as *const i32).cast(),
                4,
            )
        };
        assert_eq!(rc, 0);
        for n in 0..20u32 {
            udp_echo(&bare, format!("no checksum {n}").as_bytes());
        }
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"odd length!");
        tcp_hash_transfer(to, size)
    });
    assert_eq!(sent, received);
    assert_eq!(wire::csum_errors(&topo.backend), (0, 0), "at the backend");
    assert_eq!(wire::csum_errors(&topo.client), (0, 0), "at the client");
    let status = daemon.status();
    assert_eq!(counter(kernel_rule(&status, "turn-tcp", "tcp"), "flows"), 2);
    assert_eq!(counter(kernel_rule(&status, "turn-udp", "udp"), "flows"), 2);
    assert_eq!(counter(relay_rule(&status, "turn-tcp", "tcp"), "flows"), 0);
    daemon.stop();
}

/// With the default offloads, local senders leave the L4 checksum to be
/// filled in later (CHECKSUM_PARTIAL: the field holds the pseudo-header
/// sum). The rewrite must keep that sum right; captured at the receivers,
/// every frame's checksum field is checked as what it claims to be.
#[test]
fn checksum_partial_packets_carry_the_right_pseudo_header_sum() {
    if !common::require_root("checksum_partial_packets_carry_the_right_pseudo_header_sum") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "partial", &turn_rules(&topo, ""));
    let at_backend = in_netns(&topo.backend, || {
        wire::Capture::open(&topo.backend_link.b_if)
    });
    let at_client = in_netns(&topo.client, || wire::Capture::open(&topo.client_link.b_if));
    let to = listener_addr(&topo);
    let (sent, received) = in_netns(&topo.client, || {
        let udp = udp_socket(to);
        for len in [1usize, 2, 3, 100, 1001, 1400] {
            udp_echo(&udp, &vec![7u8; len]);
        }
        let mut c = tcp_echo_conn(to);
        for n in 0..20u32 {
            tcp_echo_round(&mut c, &vec![n as u8; 3000 + n as usize]);
        }
        tcp_hash_transfer(to, 4 << 20)
    });
    assert_eq!(sent, received);
    let mut partial = 0;
    let mut full = 0;
    for (side, capture) in [("backend", &at_backend), ("client", &at_client)] {
        for frame in capture.drain() {
            match wire::check(&frame) {
                None => {}
                Some(Ok(())) if frame.partial => partial += 1,
                Some(Ok(())) => full += 1,
                Some(Err(why)) => panic!("a frame at the {side}: {why}"),
            }
        }
    }
    assert!(partial > 0, "no CHECKSUM_PARTIAL frame seen ({full} full)");
    assert!(partial + full > 100, "{partial} + {full} frames checked");
    let status = daemon.status();
    assert_eq!(counter(kernel_rule(&status, "turn-tcp", "tcp"), "flows"), 2);
    daemon.stop();
}

// ---------------------------------------------------------------------------
// The kernel path starting under a relay that already carries flows.

#[test]
fn flows_the_relay_carries_when_the_kernel_path_starts_stay_with_the_relay() {
    if !common::require_root(
        "flows_the_relay_carries_when_the_kernel_path_starts_stay_with_the_relay",
    ) {
        return;
    }
    use forwarder::kernel::RelayFlows;
    use forwarder::relay::Relay;
    use std::sync::Arc;

    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let compiled = forwarder::config::load_str(&turn_rules(&topo, ""), "midflow.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    // Its workers, where the relay's tasks connect, live in that namespace.
    let rt = in_netns(&topo.forwarder, runtime);
    let flows = Arc::new(RelayFlows::new());
    let relay = in_netns(&topo.forwarder, || {
        rt.block_on(Relay::start(
            &compiled.listeners,
            compiled.relay,
            flows.clone(),
        ))
    })
    .expect("relay");
    let to = listener_addr(&topo);

    // Flows open before the kernel path exists: the relay's.
    let (mut old_tcp, old_udp) = in_netns(&topo.client, || {
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"before");
        let u = udp_socket(to);
        udp_echo(&u, b"before");
        (c, u)
    });
    eventually("the relay reports both flows", || flows.len() == 2);

    let options = StartOptions {
        relay_flows: Some(flows.clone()),
        ..StartOptions::default()
    };
    let kernel = in_netns(&topo.forwarder, || {
        rt.block_on(KernelPath::start_with(&compiled, &options))
    })
    .expect("kernel path");
    let relay_before: Vec<_> = relay.counters();

    in_netns(&topo.client, || {
        for n in 0..10u32 {
            tcp_echo_round(&mut old_tcp, format!("after {n}").as_bytes());
            udp_echo(&old_udp, format!("after {n}").as_bytes());
        }
        // New flows: the kernel path's.
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"new");
        udp_echo(&udp_socket(to), b"new");
    });
    let k = kernel.counters().unwrap();
    for r in &k.rules {
        assert_eq!(r.flows, 1, "only the new flow is the kernel's: {r:?}");
    }
    let relay_after = relay.counters();
    for (before, after) in relay_before.iter().zip(&relay_after) {
        assert_eq!(after.flows, 1, "{after:?}");
        assert!(
            after.bytes_to_backend > before.bytes_to_backend,
            "the old flow went on through the relay: {before:?} -> {after:?}"
        );
    }
    drop((old_tcp, old_udp));
    in_netns(&topo.forwarder, || kernel.stop()).expect("stop");
    rt.block_on(relay.shutdown(Duration::ZERO));
}

#[test]
fn the_programs_log_through_the_daemon() {
    if !common::require_root("the_programs_log_through_the_daemon") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start_logging(
        &topo.forwarder,
        "log",
        &turn_rules(&topo, ""),
        "info,forwarder::ebpf=debug",
    );
    let to = listener_addr(&topo);
    let client_port = in_netns(&topo.client, || {
        let u = udp_socket(to);
        udp_echo(&u, b"log me");
        u.local_addr().unwrap().port()
    });
    eventually("the new flow is logged", || {
        daemon.log_text().contains(&format!(
            "rule 1: new flow {}:{client_port} -> {}:3478",
            topo.client_link.b_addr,
            topo.backend_addr()
        ))
    });
    let log = daemon.stop();
    assert!(log.contains("forwarder::ebpf"), "{log}");
}

#[test]
fn idle_flows_expire_and_give_their_snat_port_back() {
    if !common::require_root("idle_flows_expire_and_give_their_snat_port_back") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // One SNAT port: one kernel flow to the backend at a time.
    let rules = turn_rules(
        &topo,
        "kernel: {snat_ports: 40000-40000}\n\
         timeouts: {udp_idle: 1s, tcp_close: 1s, connect: 1s}\n",
    );
    let daemon = Daemon::start(&topo.forwarder, "expiry", &rules);
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        udp_echo(&udp_socket_from(5000, to), b"takes the port");
        // The range is used up: this one is the relay's.
        udp_echo(&udp_socket_from(5001, to), b"overflow");
    });
    let k = |status: &serde_json::Value| kernel_rule(status, "turn-udp", "udp").clone();
    let status = daemon.status();
    assert_eq!(counter(&k(&status), "flows"), 1);
    assert_eq!(counter(&k(&status), "fallback_full"), 1);
    eventually("the idle flow expires", || {
        let s = daemon.status();
        s["kernel"]["expired_flows"].as_u64() == Some(1)
            && s["kernel"]["conntrack_entries"].as_u64() == Some(0)
    });
    in_netns(&topo.client, || {
        udp_echo(&udp_socket_from(5002, to), b"the port is free again");
    });
    let status = daemon.status();
    assert_eq!(counter(&k(&status), "flows"), 2, "{}", k(&status));
    assert_eq!(counter(&k(&status), "fallback_full"), 1);

    // A TCP flow that closed goes after tcp_close, and frees the port too.
    in_netns(&topo.client, || {
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"short-lived");
    });
    eventually("the closed TCP flow and the UDP flow expire", || {
        let s = daemon.status();
        s["kernel"]["expired_flows"].as_u64() == Some(3)
            && s["kernel"]["conntrack_entries"].as_u64() == Some(0)
    });
    daemon.stop();
}
