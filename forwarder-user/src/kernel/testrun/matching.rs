//! Which packets open a flow: rules, wildcards, weights, relay rules,
//! and what passes untouched.

use std::net::Ipv4Addr;

use forwarder_common::{ADDR_ANY, CT_DIR_FORWARD, PROTO_TCP, PROTO_UDP, RULE_F_RELAY, RULE_F_XDP};

use super::fixture::*;
use super::packet::{Spec, TCP_ACK, TCP_SYN, ip_csum_ok, l4_csum_ok, view};
use super::*;
use forwarder_common::reasons::Fallback;

#[test]
fn traffic_without_a_rule_or_flow_passes_byte_for_byte() {
    if !require_root("traffic_without_a_rule_or_flow_passes_byte_for_byte") {
        return;
    }
    with_router(1024, standard(0), |k| {
        let other_port = Spec::udp(client(50003), (LISTENER, 7879)).build();
        let other_addr = Spec::tcp(client(50004), (SNAT, LISTEN_PORT), TCP_SYN).build();
        let other_proto = {
            let mut p = Spec::udp(client(50005), listener()).build();
            p[23] = 1; // ICMP
            p
        };
        // TCP that is not a SYN and has no flow: the relay's (or nobody's).
        let ack = Spec::tcp(client(50006), listener(), TCP_ACK).build();
        let syn_ack = Spec::tcp(client(50007), listener(), TCP_SYN | TCP_ACK).build();
        // A reply to a SNAT port nobody has.
        let stray = Spec::udp((BACKEND, BACKEND_PORT), (SNAT, 40050)).build();
        for (what, p) in [
            ("other port", other_port),
            ("other address", other_addr),
            ("other protocol", other_proto),
            ("ACK without flow", ack),
            ("SYN-ACK without flow", syn_ack),
            ("stray reply", stray),
        ] {
            let out = k.run_tc(&p);
            assert_eq!(out.verdict, TC_ACT_UNSPEC, "{what}");
            assert_eq!(out.packet, p, "{what}: unchanged");
        }
        assert!(k.conntrack().is_empty());
        assert!(k.relay_flows().is_empty());
    });
}

#[test]
fn relay_rules_and_unroutable_backends_are_not_taken() {
    if !require_root("relay_rules_and_unroutable_backends_are_not_taken") {
        return;
    }
    with_router(1024, standard(RULE_F_RELAY), |k| {
        for p in [
            Spec::udp(client(50050), listener()).build(),
            Spec::tcp(client(50051), listener(), TCP_SYN).build(),
        ] {
            let out = k.run_tc(&p);
            assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &p));
        }
        assert!(k.conntrack().is_empty() && k.relay_flows().is_empty());
    });
    let unroutable = Ipv4Addr::new(203, 0, 113, 9);
    let t = tables(rule(PROTO_UDP, UDP_RULE, 0, &[(unroutable, 1)]), SNAT_PORTS);
    with_router(1024, t, |k| {
        let p = Spec::udp(client(50052), listener()).build();
        let out = k.run_tc(&p);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &p));
        assert!(k.conntrack().is_empty(), "no entry for an unroutable flow");
        k.assert_reasons(UDP_RULE, &[(Fallback::NoRoute.slot(0), 1)]);
        assert_eq!(k.relay_flows().len(), 1);
    });
}

#[test]
fn weighted_backends_share_new_flows_by_weight() {
    if !require_root("weighted_backends_share_new_flows_by_weight") {
        return;
    }
    let t = tables(
        rule(PROTO_UDP, UDP_RULE, 0, &[(BACKEND, 1), (BACKEND2, 3)]),
        (40000, 49999),
    );
    with_router(4096, t, |k| {
        let flows = 400;
        let mut to_first = 0;
        for n in 0..flows {
            let p = Spec::udp(client(20000 + n), listener()).build();
            let out = k.run_tc(&p);
            assert_eq!(out.verdict, TC_ACT_REDIRECT);
            let v = view(&out.packet);
            assert!(v.dst == BACKEND || v.dst == BACKEND2);
            assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
            if v.dst == BACKEND {
                to_first += 1;
            }
        }
        // Expected 100 of 400 (sd ~8.7); the bounds are 5.7 sd away.
        assert!((50..=150).contains(&to_first), "{to_first} of {flows}");
    });
}

#[test]
fn the_wildcard_rule_matches_when_no_exact_one_does() {
    if !require_root("the_wildcard_rule_matches_when_no_exact_one_does") {
        return;
    }
    let mut r = rule(PROTO_UDP, UDP_RULE, 0, &[(BACKEND, 1)]);
    r[0].0.addr = ADDR_ANY;
    with_router(1024, tables(r, SNAT_PORTS), |k| {
        // Any local address of the forwarder, same port.
        let p = Spec::udp(client(50080), (SNAT, LISTEN_PORT)).build();
        let out = k.run_tc(&p);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let snat_port = view(&out.packet).sport;
        let reply = Spec::udp((BACKEND, BACKEND_PORT), (SNAT, snat_port)).build();
        let back = k.run_tc(&reply);
        assert_eq!(
            view(&back.packet).src,
            SNAT,
            "answers from the address asked"
        );
        assert!(
            k.conntrack()
                .iter()
                .any(|(_, v)| v.direction == CT_DIR_FORWARD)
        );
    });
}

#[test]
fn a_wildcard_rule_leaves_traffic_through_this_host_alone() {
    if !require_root("a_wildcard_rule_leaves_traffic_through_this_host_alone") {
        return;
    }
    let mut r = rule(PROTO_TCP, TCP_RULE, 0, &[(BACKEND, 1)]);
    r.extend(rule(PROTO_UDP, UDP_RULE, 0, &[(BACKEND, 1)]));
    for (key, _, _) in &mut r {
        key.addr = ADDR_ANY;
    }
    with_router(1024, tables(r, SNAT_PORTS), |k| {
        // The rules' port, but addressed to a host behind this one (and
        // fragments of such a datagram).
        let passing = [
            Spec::tcp(client(50090), (BACKEND2, LISTEN_PORT), TCP_SYN).build(),
            Spec::udp(client(50091), (BACKEND2, LISTEN_PORT)).build(),
            {
                let mut first_fragment = Spec::udp(client(50092), (BACKEND2, LISTEN_PORT));
                first_fragment.frag = 0x2000; // MF
                first_fragment.build()
            },
        ];
        for p in &passing {
            let out = k.run_tc(p);
            assert_eq!(out.verdict, TC_ACT_UNSPEC, "passed on to the stack");
            assert_eq!(&out.packet, p, "unmodified");
        }
        assert!(k.conntrack().is_empty(), "no flow of ours");
        assert!(k.relay_flows().is_empty(), "nothing for the relay");
        for id in [TCP_RULE, UDP_RULE] {
            assert_eq!(k.rule_counters(id).flows, 0, "rule {id}");
            k.assert_reasons(id, &[]);
        }
        // The same to this host's own address is forwarded.
        let ours = Spec::udp(client(50093), (LISTENER, LISTEN_PORT)).build();
        assert_eq!(k.run_tc(&ours).verdict, TC_ACT_REDIRECT);
    });
}

#[test]
fn an_exact_rule_beats_a_wildcard_on_the_same_port() {
    if !require_root("an_exact_rule_beats_a_wildcard_on_the_same_port") {
        return;
    }
    let exact = rule(PROTO_UDP, 0, 0, &[(BACKEND, 1)]);
    let mut wildcard = rule(PROTO_UDP, 1, 0, &[(BACKEND2, 1)]);
    wildcard[0].0.addr = ADDR_ANY;
    // The wildcard first in the table, so order cannot be what decides.
    wildcard.extend(exact);
    with_router(1024, tables(wildcard, SNAT_PORTS), |k| {
        let exact = Spec::udp(client(50085), listener()).build();
        let out = k.run_tc(&exact);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(view(&out.packet).dst, BACKEND, "the exact rule's backend");
        let other = Spec::udp(client(50086), (SNAT, LISTEN_PORT)).build();
        let out = k.run_tc(&other);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(view(&out.packet).dst, BACKEND2, "the wildcard's backend");
        assert_eq!(k.rule_counters(0).flows, 1);
        assert_eq!(k.rule_counters(1).flows, 1);
    });
}

/// An Ethernet frame with IPv6 from 2001:db8::2 to 2001:db8::1 and UDP
/// (17) or a TCP SYN (6) to `port`.
fn ipv6_frame(next_header: u8, port: u16) -> Vec<u8> {
    let l4: Vec<u8> = if next_header == 6 {
        let mut t = Vec::new();
        t.extend_from_slice(&50090u16.to_be_bytes());
        t.extend_from_slice(&port.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 5 << 4, 0x02, 0xfa, 0xf0]);
        t.extend_from_slice(&[0x12, 0x34, 0, 0]); // checksum (not checked), urg
        t
    } else {
        let mut u = Vec::new();
        u.extend_from_slice(&50090u16.to_be_bytes());
        u.extend_from_slice(&port.to_be_bytes());
        u.extend_from_slice(&12u16.to_be_bytes());
        u.extend_from_slice(&[0x12, 0x34]);
        u.extend_from_slice(b"v6!?");
        u
    };
    let mut p = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next_header, 64]);
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    let mut dst = src;
    src[15] = 2;
    dst[15] = 1;
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&l4);
    p
}

#[test]
fn ipv6_frames_pass_both_programs_untouched() {
    if !require_root("ipv6_frames_pass_both_programs_untouched") {
        return;
    }
    // Wildcard rules for both protocols on the port, XDP on: every check a
    // frame could meet.
    let mut r = rule(PROTO_TCP, TCP_RULE, RULE_F_XDP, &[(BACKEND, 1)]);
    r.extend(rule(PROTO_UDP, UDP_RULE, RULE_F_XDP, &[(BACKEND, 1)]));
    for row in &mut r {
        row.0.addr = ADDR_ANY;
    }
    with_router(1024, tables(r, SNAT_PORTS), |k| {
        for next_header in [17, 6] {
            let frame = ipv6_frame(next_header, LISTEN_PORT);
            let tc = k.run_tc(&frame);
            assert_eq!(
                (tc.verdict, &tc.packet),
                (TC_ACT_UNSPEC, &frame),
                "TC, next header {next_header}"
            );
            let xdp = k.run_xdp(&frame);
            assert_eq!(
                (xdp.verdict, &xdp.packet),
                (XDP_PASS, &frame),
                "XDP, next header {next_header}"
            );
        }
        assert!(k.conntrack().is_empty(), "{:?}", k.conntrack());
        assert!(k.relay_flows().is_empty(), "{:?}", k.relay_flows());
        for rule_id in [TCP_RULE, UDP_RULE] {
            assert_eq!(k.rule_counters(rule_id).flows, 0);
            k.assert_reasons(rule_id, &[]);
        }
    });
}
