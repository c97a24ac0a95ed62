//! The kernel path as a library: attaching TC and XDP, counting, and
//! taking everything off again.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use forwarder::kernel::{KernelPath, StartOptions, TcAttach};
use forwarder::rules::{Compiled, KernelSettings, KernelTable, RelaySettings};
use forwarder_common::{PROTO_TCP, RULE_F_XDP, RuleKey, RuleValue};

use crate::common::harness::{self, in_netns, program_loaded, runtime, seen};
use crate::common::{self, Topology};

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
            ranges: Vec::new(),
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
    // The egress program (the host's own NAT beside ours) goes on the
    // same way.
    match tc_attach {
        TcAttach::Auto => assert_eq!(during.tcx_egress_progs.len(), 1, "{during:?}"),
        TcAttach::Netlink => assert!(
            during.tc_egress_filters.contains("forwarder_tc_egress"),
            "{during:?}"
        ),
    }

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
        assert!(after.tcx_egress_progs.is_empty(), "{interface}: {after:?}");
        assert!(
            !after.tc_egress_filters.contains("forwarder"),
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
