//! Integration tests: the kernel path on real interfaces in namespaces.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use forwarder::kernel::{KernelPath, StartOptions, TcAttach};
use forwarder::rules::{Compiled, KernelSettings, KernelTable, RelaySettings};

use crate::common::{self, Netns, Topology};

/// Runs `f` on a thread that lives in `ns`; threads it starts (a tokio
/// runtime's workers) live there too.
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/var/run/netns/{}", ns.name))
                .unwrap_or_else(|e| panic!("open namespace {}: {e}", ns.name));
            // SAFETY: setns on this thread only, with a namespace descriptor.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn compiled_for(interfaces: Option<Vec<String>>) -> Compiled {
    Compiled {
        interfaces,
        listeners: Vec::new(),
        kernel: KernelTable::default(),
        relay: RelaySettings::default(),
        kernel_settings: KernelSettings {
            conntrack_size: 1024,
            ..KernelSettings::default()
        },
    }
}

/// What is attached to one interface, as the kernel reports it.
#[derive(Debug, Default)]
struct Seen {
    xdp_prog: Option<u32>,
    tcx_progs: Vec<u32>,
    tc_filters: String,
    clsact: bool,
}

fn seen(ns: &Netns, interface: &str) -> Seen {
    let link = ns.exec("ip", &["-d", "-j", "link", "show", "dev", interface]);
    let link: serde_json::Value = serde_json::from_slice(&link.stdout).unwrap();
    let xdp_prog = link[0]["xdp"]["prog"]["id"].as_u64().map(|id| id as u32);
    let tcx_progs = in_netns(ns, || {
        SchedClassifier::query_tcx(interface, TcAttachType::Ingress)
            .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
            .unwrap_or_default()
    });
    let tc_filters = String::from_utf8_lossy(
        &ns.exec("tc", &["filter", "show", "dev", interface, "ingress"])
            .stdout,
    )
    .into_owned();
    let qdiscs = ns.exec("tc", &["qdisc", "show", "dev", interface]);
    let clsact = String::from_utf8_lossy(&qdiscs.stdout).contains("clsact");
    Seen {
        xdp_prog,
        tcx_progs,
        tc_filters,
        clsact,
    }
}

fn program_loaded(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
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
    let rt = runtime();
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
    let rt = runtime();
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
    let rt = runtime();
    // A first instance holds the second interface...
    let first = in_netns(&topo.forwarder, || {
        rt.block_on(KernelPath::start(&compiled_for(Some(vec![b.clone()]))))
    })
    .expect("first instance");
    let held = seen(&topo.forwarder, &b);
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
    in_netns(&topo.forwarder, || first.stop()).expect("stop");
}
