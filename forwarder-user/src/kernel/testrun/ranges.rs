//! Port-range rules in the `RANGES` trie: the first and last port of a
//! range match and translate to their own backend port, one past either
//! end matches nothing, and an exact-address range comes before the
//! wildcard's.

use forwarder_common::{
    ADDR_ANY, BACKEND_F_HEALTHY, Backend, CT_DIR_FORWARD, MAX_BACKENDS_PER_RULE, PROTO_UDP,
    RuleValue,
};

use super::fixture::*;
use super::packet::{Spec, TCP_SYN, ip_csum_ok, l4_csum_ok, view};
use super::*;
use crate::config::range_entries;
use crate::kernel::snat::addr_of;
use crate::kernel::tables::Tables;
use crate::rules::{ListenPorts, Protocol, TargetPorts};

const EXACT: u32 = 2;
const WILDCARD: u32 = 3;

/// The standard single-port rules, plus on UDP 20000-20999: a shifted
/// range on the listener's address to the backend's 30000-30999, and a
/// many-to-one range on every address to the second backend's 7000.
fn with_ranges() -> Tables {
    let mut t = standard(0);
    let backend = |addr: std::net::Ipv4Addr, port: u16| Backend {
        addr: addr_of(addr.into()),
        snat_addr: addr_of(SNAT.into()),
        port: port.to_be(),
        weight: 1,
        flags: BACKEND_F_HEALTHY,
    };
    let value = |rule_id| RuleValue {
        rule_id,
        flags: 0,
        backend_count: 1,
        total_weight: 1,
    };
    let ports = |target| ListenPorts {
        count: 1000,
        target,
    };
    t.ranges.extend(range_entries(
        addr_of(LISTENER.into()),
        Protocol::Udp,
        20000,
        ports(TargetPorts::Shifted),
        value(EXACT),
    ));
    t.backends
        .push((EXACT * MAX_BACKENDS_PER_RULE, backend(BACKEND, 30000)));
    t.ranges.extend(range_entries(
        ADDR_ANY,
        Protocol::Udp,
        20000,
        ports(TargetPorts::Same),
        value(WILDCARD),
    ));
    t.backends
        .push((WILDCARD * MAX_BACKENDS_PER_RULE, backend(BACKEND2, 7000)));
    t
}

#[test]
fn a_range_matches_from_its_first_to_its_last_port_and_no_further() {
    if !require_root("a_range_matches_from_its_first_to_its_last_port_and_no_further") {
        return;
    }
    with_router(1024, with_ranges(), |k| {
        // First and last port: the backend's own port at the same offset.
        for (n, (port, backend_port)) in [(20000, 30000), (20999, 30999), (20500, 30500)]
            .into_iter()
            .enumerate()
        {
            let p = Spec::udp(client(51000 + n as u16), (LISTENER, port)).build();
            let out = k.run_tc(&p);
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "port {port}");
            let v = view(&out.packet);
            assert_eq!((v.dst, v.dport), (BACKEND, backend_port), "port {port}");
            assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
            // The reply goes back from the port the client sent to.
            let reply = Spec::udp((BACKEND, backend_port), (SNAT, v.sport)).build();
            let back = view(&k.run_tc(&reply).packet);
            assert_eq!(
                (back.src, back.sport, back.dst, back.dport),
                (LISTENER, port, CLIENT, 51000 + n as u16)
            );
        }
        // One past either end, and the range's ports on TCP: nothing.
        for p in [
            Spec::udp(client(51100), (LISTENER, 19999)).build(),
            Spec::udp(client(51101), (LISTENER, 21000)).build(),
            Spec::tcp(client(51102), (LISTENER, 20000), TCP_SYN).build(),
        ] {
            let out = k.run_tc(&p);
            assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &p));
        }
        // The single-port rules still match.
        let p = Spec::udp(client(51103), listener()).build();
        assert_eq!(k.run_tc(&p).verdict, TC_ACT_REDIRECT);
        assert_eq!(k.rule_counters(EXACT).flows, 3);
        assert_eq!(k.rule_counters(EXACT).packets_fwd, 3);
        assert_eq!(k.rule_counters(EXACT).packets_rev, 3);
        assert_eq!(k.rule_counters(WILDCARD).flows, 0);
        assert_eq!(k.rule_counters(UDP_RULE).flows, 1);
        let forward: Vec<_> = k
            .conntrack()
            .into_iter()
            .filter(|(key, v)| v.direction == CT_DIR_FORWARD && key.proto == PROTO_UDP)
            .collect();
        assert_eq!(forward.len(), 4);
        assert!(k.relay_flows().is_empty());
    });
}

#[test]
fn the_wildcard_range_takes_other_addresses_many_to_one() {
    if !require_root("the_wildcard_range_takes_other_addresses_many_to_one") {
        return;
    }
    with_router(1024, with_ranges(), |k| {
        // SNAT is another address of this host: only the wildcard covers it.
        for (n, port) in [20000u16, 20999].into_iter().enumerate() {
            let p = Spec::udp(client(52000 + n as u16), (SNAT, port)).build();
            let out = k.run_tc(&p);
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "port {port}");
            let v = view(&out.packet);
            assert_eq!((v.dst, v.dport), (BACKEND2, 7000), "port {port}");
            let reply = Spec::udp((BACKEND2, 7000), (SNAT, v.sport)).build();
            let back = view(&k.run_tc(&reply).packet);
            assert_eq!((back.src, back.sport), (SNAT, port));
        }
        let p = Spec::udp(client(52100), (SNAT, 21000)).build();
        assert_eq!(k.run_tc(&p).verdict, TC_ACT_UNSPEC);
        assert_eq!(k.rule_counters(WILDCARD).flows, 2);
        assert_eq!(k.rule_counters(EXACT).flows, 0);
    });
}
