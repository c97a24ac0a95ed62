//! Sharing the hook: what the TC program leaves alone gets TCX "next"
//! (`TC_ACT_UNSPEC`), so later TCX programs and classic tc filters still
//! see it; only packets it redirects or drops get a final verdict. And
//! broadcast or multicast destinations never open a flow.

use std::net::Ipv4Addr;

use forwarder_common::{ADDR_ANY, PROTO_TCP, PROTO_UDP, RULE_F_RELAY};

use super::fixture::{
    BACKEND, BACKEND_PORT, LISTEN_PORT, LISTENER, SNAT, SNAT_PORTS, TCP_RULE, UDP_RULE, client,
    listener, rule, standard, tables, with_router,
};
use super::packet::{Spec, TCP_ACK, TCP_SYN, view};
use super::*;
use forwarder_common::reasons::Dropped;

/// The TC program passed `p` on, unmodified, to whatever runs next.
fn assert_next(k: &Loaded, p: &[u8], what: &str) {
    let out = k.run_tc(p);
    assert_eq!(out.verdict, TC_ACT_UNSPEC, "{what}: next");
    assert_eq!(out.packet, p, "{what}: unmodified");
}

#[test]
fn only_packets_we_redirect_or_drop_get_a_final_verdict() {
    if !require_root("only_packets_we_redirect_or_drop_get_a_final_verdict") {
        return;
    }
    with_router(1024, standard(0), |k| {
        // Not ours at all.
        let other_port = Spec::udp(client(51000), (LISTENER, LISTEN_PORT + 1)).build();
        assert_next(k, &other_port, "no rule");
        // A new flow the relay gets (TTL 1 cannot be forwarded), and its
        // next packet, which the relay owns now.
        let mut last_hop = Spec::udp(client(51001), listener());
        last_hop.ttl = 1;
        let last_hop = last_hop.build();
        assert_next(k, &last_hop, "fallback to the relay");
        assert_eq!(k.relay_flows().len(), 1, "left to the relay");
        let relayed = Spec::udp(client(51001), listener()).build();
        assert_next(k, &relayed, "a relay flow");

        // Ours: the new flow and the backend's answer are redirected...
        let syn = Spec::tcp(client(51002), listener(), TCP_SYN).build();
        let out = k.run_tc(&syn);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "a new flow");
        let snat = (SNAT, view(&out.packet).sport);
        let syn_ack = Spec::tcp((BACKEND, BACKEND_PORT), snat, TCP_SYN | TCP_ACK).build();
        assert_eq!(k.run_tc(&syn_ack).verdict, TC_ACT_REDIRECT, "the answer");
        // ...and one of its packets that cannot go on is dropped (too big
        // without DF: the kernel path does not fragment, and a TTL 1 packet
        // would be answered with time exceeded, also redirected).
        let mut too_big = Spec::tcp(client(51002), listener(), TCP_ACK);
        too_big.frag = 0;
        too_big.payload = vec![0; 1600];
        assert_eq!(k.run_tc(&too_big.build()).verdict, TC_ACT_SHOT);
        k.assert_reasons(TCP_RULE, &[(Dropped::TooBig.slot(0), 1)]);
    });
    // A rule the kernel path must leave to the relay.
    let relay_only = tables(
        rule(PROTO_UDP, UDP_RULE, RULE_F_RELAY, &[(BACKEND, 1)]),
        SNAT_PORTS,
    );
    with_router(1024, relay_only, |k| {
        let p = Spec::udp(client(51003), listener()).build();
        assert_next(k, &p, "path: relay");
        assert!(k.conntrack().is_empty());
    });
}

#[test]
fn broadcast_and_multicast_on_a_wildcard_rule_go_to_the_stack() {
    if !require_root("broadcast_and_multicast_on_a_wildcard_rule_go_to_the_stack") {
        return;
    }
    let mut rows = rule(PROTO_UDP, UDP_RULE, 0, &[(BACKEND, 1)]);
    rows.extend(rule(PROTO_TCP, TCP_RULE, 0, &[(BACKEND, 1)]));
    for (key, _, _) in &mut rows {
        key.addr = ADDR_ANY;
    }
    with_router(1024, tables(rows, SNAT_PORTS), |k| {
        let to = |dst: Ipv4Addr, dst_mac: [u8; 6]| {
            let mut p = Spec::udp(client(51010), (dst, LISTEN_PORT)).build();
            p[..6].copy_from_slice(&dst_mac);
            p
        };
        let unicast_mac = [2, 0, 0, 0, 0, 1];
        let broadcast_mac = [0xff; 6];
        let cases = [
            // Told by the link (the FIB calls it local, as it does the
            // host's own address).
            (
                "subnet broadcast",
                to(Ipv4Addr::new(198, 18, 1, 255), broadcast_mac),
            ),
            ("limited broadcast", to(Ipv4Addr::BROADCAST, broadcast_mac)),
            (
                "multicast",
                to(Ipv4Addr::new(239, 1, 2, 3), [1, 0, 0x5e, 1, 2, 3]),
            ),
            // Told by the address, whatever the link says.
            (
                "limited broadcast, unicast frame",
                to(Ipv4Addr::BROADCAST, unicast_mac),
            ),
            (
                "multicast, unicast frame",
                to(Ipv4Addr::new(224, 0, 0, 251), unicast_mac),
            ),
        ];
        for (what, p) in &cases {
            assert_next(k, p, what);
        }
        assert!(k.conntrack().is_empty(), "no flow opened");
        assert!(k.relay_flows().is_empty(), "nothing entered for the relay");
        let c = k.rule_counters(UDP_RULE);
        assert_eq!((c.flows, c.packets_fwd), (0, 0));
        k.assert_reasons(UDP_RULE, &[]);

        // The same datagram to the host's own address is a flow.
        let ours = to(LISTENER, unicast_mac);
        assert_eq!(k.run_tc(&ours).verdict, TC_ACT_REDIRECT);
    });
}
