//! `kernel.snat_addresses`: new flows toward a pooled backend spread over
//! (address, port) pairs, so two flows may share a port on two addresses;
//! each reply is matched by address and port and reaches its own client.
//! Without the pool flag, or with `preserve_client_ip`, no pair is taken.

use std::net::Ipv4Addr;

use forwarder_common::reasons::Fallback;
use forwarder_common::snat::{BACKEND_F_SNAT_POOL, SnatPool};
use forwarder_common::{CT_DIR_REVERSE, RULE_F_PRESERVE_CLIENT_IP};

use super::fixture::*;
use super::packet::{Spec, ip_csum_ok, l4_csum_ok, view};
use super::*;
use crate::kernel::tables::Tables;

/// A second address of the router's backend side.
const SNAT2: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 9);

/// One SNAT port, the pool {SNAT, SNAT2}; the backends pooled or not.
fn pooled(flags: u32, pool_flag: bool) -> Tables {
    let mut t = one_snat_port();
    for (_, value) in &mut t.rules {
        value.flags |= flags;
    }
    for (_, b) in &mut t.backends {
        if pool_flag {
            b.flags |= BACKEND_F_SNAT_POOL;
        }
    }
    t.pool = SnatPool::of(&[
        u32::from_ne_bytes(SNAT.octets()),
        u32::from_ne_bytes(SNAT2.octets()),
    ]);
    t.settings.snat_probe_limit = 2;
    t
}

/// A datagram from client port `cport`: the (source address, port) it
/// left with, checksums right.
fn forwarded(k: &Loaded, cport: u16) -> (Ipv4Addr, u16) {
    let p = Spec::udp(client(cport), listener()).build();
    let out = k.run_tc(&p);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "client port {cport}");
    let v = view(&out.packet);
    assert_eq!((v.dst, v.dport), (BACKEND, BACKEND_PORT));
    assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
    (v.src, v.sport)
}

/// The backend's answer to `to`: the client port it reaches.
fn answer(k: &Loaded, to: (Ipv4Addr, u16)) -> u16 {
    let p = Spec::udp((BACKEND, BACKEND_PORT), to).build();
    let out = k.run_tc(&p);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "answer to {to:?}");
    let v = view(&out.packet);
    assert_eq!((v.src, v.sport, v.dst), (LISTENER, LISTEN_PORT, CLIENT));
    assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
    v.dport
}

#[test]
fn two_flows_share_one_port_on_two_snat_addresses_and_replies_go_back_apart() {
    if !require_root("two_flows_share_one_port_on_two_snat_addresses_and_replies_go_back_apart") {
        return;
    }
    with_router(1024, pooled(0, true), |k| {
        crate::kernel::testns::ip(&["addr", "add", "198.18.2.9/24", "dev", "dn0"]);
        let a = forwarded(k, 50001);
        let b = forwarded(k, 50002);
        assert_eq!((a.1, b.1), (40000, 40000), "the one port, twice");
        let mut addrs = [a.0, b.0];
        addrs.sort();
        assert_eq!(addrs, [SNAT, SNAT2], "one flow on each address");
        // Each reply is matched by address and port, and reaches its client.
        assert_eq!(answer(k, a), 50001);
        assert_eq!(answer(k, b), 50002);
        assert_eq!(answer(k, a), 50001);
        // The reverse entries are keyed by the address each flow took.
        let mut reverse: Vec<(Ipv4Addr, u16)> = k
            .conntrack()
            .iter()
            .filter(|(_, v)| v.direction == CT_DIR_REVERSE)
            .map(|(key, _)| {
                (
                    crate::kernel::snat::ip_of(&key.dst)
                        .to_string()
                        .parse()
                        .unwrap(),
                    u16::from_be(key.dport),
                )
            })
            .collect();
        reverse.sort();
        assert_eq!(reverse, [(SNAT, 40000), (SNAT2, 40000)]);
        // Every pair taken: the next new flow is the relay's.
        let p = Spec::udp(client(50003), listener()).build();
        let out = k.run_tc(&p);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &p));
        assert_eq!(
            k.reasons(UDP_RULE).fallback(Fallback::SnatPortsExhausted),
            1
        );
        assert_eq!(k.rule_counters(UDP_RULE).flows, 2);
    });
}

#[test]
fn a_backend_without_the_pool_flag_keeps_its_route_address() {
    if !require_root("a_backend_without_the_pool_flag_keeps_its_route_address") {
        return;
    }
    with_router(1024, pooled(0, false), |k| {
        assert_eq!(forwarded(k, 50001), (SNAT, 40000));
        let p = Spec::udp(client(50002), listener()).build();
        assert_eq!(k.run_tc(&p).verdict, TC_ACT_UNSPEC, "one pair only");
    });
}

#[test]
fn preserve_client_ip_takes_no_snat_port() {
    if !require_root("preserve_client_ip_takes_no_snat_port") {
        return;
    }
    with_router(1024, pooled(RULE_F_PRESERVE_CLIENT_IP, true), |k| {
        // More flows than the pool has pairs: none needs one.
        for cport in [50001, 50002, 50003] {
            let p = Spec::udp(client(cport), listener()).build();
            let out = k.run_tc(&p);
            assert_eq!(out.verdict, TC_ACT_REDIRECT);
            let v = view(&out.packet);
            assert_eq!((v.src, v.sport), (CLIENT, cport), "the client's own");
        }
        let reverse: Vec<u16> = k
            .conntrack()
            .iter()
            .filter(|(_, v)| v.direction == CT_DIR_REVERSE)
            .map(|(key, _)| u16::from_be(key.dport))
            .filter(|p| (SNAT_PORTS.0..=SNAT_PORTS.1).contains(p))
            .collect();
        assert!(reverse.is_empty(), "SNAT ports taken: {reverse:?}");
        assert_eq!(k.rule_counters(UDP_RULE).flows, 3);
    });
}

#[test]
fn a_host_flow_on_a_pool_addresss_tuple_is_moved_there_and_back() {
    if !require_root("a_host_flow_on_a_pool_addresss_tuple_is_moved_there_and_back") {
        return;
    }
    // The pool is SNAT2 alone (not the route's address), ports 40000-40001.
    let mut t = pooled(0, true);
    t.pool = SnatPool::of(&[u32::from_ne_bytes(SNAT2.octets())]);
    t.settings.snat_port_max = 40001;
    with_router(1024, t, |k| {
        crate::kernel::testns::ip(&["addr", "add", "198.18.2.9/24", "dev", "dn0"]);
        let (addr, ours) = forwarded(k, 50001);
        assert_eq!(addr, SNAT2, "the pool's address, not the route's");
        let free = if ours == 40000 { 40001 } else { 40000 };
        // The host sends from the kernel flow's tuple: moved to the free
        // port of the same address.
        let host = Spec::udp((SNAT2, ours), (BACKEND, BACKEND_PORT)).build();
        let (out, _) = k.run_tc_egress(&host, 0);
        assert_eq!(out.verdict, TC_ACT_UNSPEC);
        let v = view(&out.packet);
        assert_eq!((v.src, v.sport, v.dst), (SNAT2, free, BACKEND));
        assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
        // Its answer gets the host's port back and goes up the stack; the
        // kernel flow's own answer still reaches its client.
        let up = k.run_tc(&Spec::udp((BACKEND, BACKEND_PORT), (SNAT2, free)).build());
        assert_eq!(up.verdict, TC_ACT_UNSPEC);
        assert_eq!(view(&up.packet).dport, ours);
        assert_eq!(answer(k, (SNAT2, ours)), 50001);
        // The same port on the route's address is no kernel flow's: the
        // host's packet from there passes untouched.
        let other = Spec::udp((SNAT, ours), (BACKEND, BACKEND_PORT)).build();
        let (out, _) = k.run_tc_egress(&other, 0);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &other));
    });
}

#[test]
fn a_range_rules_flows_take_pool_pairs_toward_their_concrete_port() {
    if !require_root("a_range_rules_flows_take_pool_pairs_toward_their_concrete_port") {
        return;
    }
    use crate::config::range_entries;
    use crate::kernel::snat::addr_of;
    use crate::rules::{ListenPorts, Protocol, TargetPorts};
    use forwarder_common::{BACKEND_F_HEALTHY, Backend, MAX_BACKENDS_PER_RULE, RuleValue};
    // UDP 20000-20999 shifted to the backend's 30000-30999, pooled.
    const RANGE_RULE: u32 = 2;
    let mut t = pooled(0, true);
    t.ranges.extend(range_entries(
        addr_of(LISTENER.into()),
        Protocol::Udp,
        20000,
        ListenPorts {
            count: 1000,
            target: TargetPorts::Shifted,
        },
        RuleValue {
            rule_id: RANGE_RULE,
            flags: 0,
            backend_count: 1,
            total_weight: 1,
        },
    ));
    t.backends.push((
        RANGE_RULE * MAX_BACKENDS_PER_RULE,
        Backend {
            addr: addr_of(BACKEND.into()),
            snat_addr: addr_of(SNAT.into()),
            port: 30000u16.to_be(),
            weight: 1,
            flags: BACKEND_F_HEALTHY | BACKEND_F_SNAT_POOL,
        },
    ));
    with_router(1024, t, |k| {
        crate::kernel::testns::ip(&["addr", "add", "198.18.2.9/24", "dev", "dn0"]);
        // Two clients to one port of the range: one SNAT port, so one
        // flow on each address, both toward the range's concrete port.
        let mut took = Vec::new();
        for cport in [50001, 50002] {
            let p = Spec::udp(client(cport), (LISTENER, 20500)).build();
            let out = k.run_tc(&p);
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "client port {cport}");
            let v = view(&out.packet);
            assert_eq!((v.dst, v.dport, v.sport), (BACKEND, 30500, 40000));
            assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
            took.push((v.src, cport));
        }
        let mut addrs: Vec<Ipv4Addr> = took.iter().map(|t| t.0).collect();
        addrs.sort();
        assert_eq!(addrs, [SNAT, SNAT2], "one flow on each address");
        // Each answer from the concrete port reaches its own client, from
        // the port it sent to.
        for (addr, cport) in took {
            let reply = Spec::udp((BACKEND, 30500), (addr, 40000)).build();
            let out = k.run_tc(&reply);
            assert_eq!(out.verdict, TC_ACT_REDIRECT);
            let v = view(&out.packet);
            assert_eq!(
                (v.src, v.sport, v.dst, v.dport),
                (LISTENER, 20500, CLIENT, cport)
            );
        }
        assert_eq!(k.rule_counters(RANGE_RULE).flows, 2);
    });
}
