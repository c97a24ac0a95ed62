//! The rewrite of forwarded packets: addresses, ports, TTL and checksums
//! both ways, on crafted packets in the router namespace of `fixture`.

use forwarder_common::{
    CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, PROTO_TCP, PROTO_UDP,
    RULE_F_PRESERVE_CLIENT_IP,
};

use super::fixture::*;
use super::packet::{Csum, Spec, TCP_ACK, TCP_FIN, TCP_SYN, ip_csum_ok, l4_csum_ok, view};
use super::*;

#[test]
fn tcp_forward_and_reverse_rewrite_with_valid_checksums() {
    if !require_root("tcp_forward_and_reverse_rewrite_with_valid_checksums") {
        return;
    }
    with_router(1024, standard(0), |k| {
        let syn = Spec::tcp(client(50000), listener(), TCP_SYN).build();
        let out = k.run_tc(&syn);
        let snat_port = assert_forwarded(&out, PROTO_TCP, &syn);
        let ct = k.conntrack();
        assert_eq!(ct.len(), 2, "{ct:?}");
        assert!(
            ct.iter()
                .all(|(_, v)| v.rule_id == TCP_RULE && v.state == CT_STATE_NEW)
        );

        // The backend answers; the client sees the listener.
        let syn_ack = Spec::tcp(
            (BACKEND, BACKEND_PORT),
            (SNAT, snat_port),
            TCP_SYN | TCP_ACK,
        )
        .build();
        let back = k.run_tc(&syn_ack);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        let v = view(&back.packet);
        assert_eq!(
            (v.src, v.sport, v.dst, v.dport),
            (LISTENER, LISTEN_PORT, CLIENT, 50000)
        );
        assert!(ip_csum_ok(&back.packet) && l4_csum_ok(&back.packet));
        let states: Vec<u8> = k.conntrack().iter().map(|(_, v)| v.state).collect();
        assert!(states.contains(&CT_STATE_ESTABLISHED), "{states:?}");

        // Data both ways keeps the same mapping.
        let data = Spec::tcp(client(50000), listener(), TCP_ACK).build();
        assert_eq!(
            assert_forwarded(&k.run_tc(&data), PROTO_TCP, &data),
            snat_port
        );

        // A FIN moves the flow to closing.
        let fin = Spec::tcp(client(50000), listener(), TCP_ACK | TCP_FIN).build();
        assert_forwarded(&k.run_tc(&fin), PROTO_TCP, &fin);
        assert!(
            k.conntrack()
                .iter()
                .any(|(_, v)| v.state == CT_STATE_CLOSING)
        );

        let c = k.rule_counters(TCP_RULE);
        assert_eq!((c.flows, c.packets_fwd, c.packets_rev), (1, 3, 1), "{c:?}");
        assert_eq!(c.bytes_fwd, 3 * syn.len() as u64);
    });
}

#[test]
fn udp_forward_and_reverse_including_zero_checksums() {
    if !require_root("udp_forward_and_reverse_including_zero_checksums") {
        return;
    }
    with_router(1024, standard(0), |k| {
        let dgram = Spec::udp(client(50001), listener()).build();
        let out = k.run_tc(&dgram);
        let snat_port = assert_forwarded(&out, PROTO_UDP, &dgram);
        let reply = Spec::udp((BACKEND, BACKEND_PORT), (SNAT, snat_port)).build();
        let back = k.run_tc(&reply);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        let v = view(&back.packet);
        assert_eq!(
            (v.src, v.sport, v.dst, v.dport),
            (LISTENER, LISTEN_PORT, CLIENT, 50001)
        );
        assert!(ip_csum_ok(&back.packet) && l4_csum_ok(&back.packet));

        // "No checksum" stays no checksum, both ways.
        let zero = Spec::udp(client(50001), listener())
            .csum(Csum::Zero)
            .build();
        let out = k.run_tc(&zero);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert!(ip_csum_ok(&out.packet));
        assert_eq!(view(&out.packet).l4_csum, 0, "zero UDP checksum kept");
        assert_eq!(view(&out.packet).sport, snat_port);
        let zero_back = Spec::udp((BACKEND, BACKEND_PORT), (SNAT, snat_port))
            .csum(Csum::Zero)
            .build();
        let back = k.run_tc(&zero_back);
        assert_eq!(view(&back.packet).l4_csum, 0);
        assert!(ip_csum_ok(&back.packet));

        let c = k.rule_counters(UDP_RULE);
        assert_eq!((c.flows, c.packets_fwd, c.packets_rev), (1, 2, 2), "{c:?}");
    });
}

/// A UDP payload whose checksum after the rewrite is exactly 0xffff (the
/// one's complement zero): it must be sent as 0xffff, never as 0.
#[test]
fn a_udp_checksum_that_becomes_zero_is_sent_as_all_ones() {
    if !require_root("a_udp_checksum_that_becomes_zero_is_sent_as_all_ones") {
        return;
    }
    with_router(1024, standard(0), |k| {
        // Learn the SNAT port with a first datagram, then pick a payload
        // word that makes the rewritten datagram's checksum come out zero.
        let first = Spec::udp(client(50002), listener()).build();
        let snat_port = view(&k.run_tc(&first).packet).sport;
        let mut spec = Spec::udp(client(50002), listener());
        spec.payload = vec![0, 0];
        let mut probe = spec.build();
        // The rewritten packet as it will be, with checksum field 0.
        let mut after = probe.clone();
        after[26..30].copy_from_slice(&SNAT.octets());
        after[30..34].copy_from_slice(&BACKEND.octets());
        after[34..36].copy_from_slice(&snat_port.to_be_bytes());
        after[36..38].copy_from_slice(&BACKEND_PORT.to_be_bytes());
        after[40..42].copy_from_slice(&[0, 0]);
        // The payload word that makes the folded sum 0xffff, i.e. a
        // computed checksum of zero.
        let word = !super::packet::folded_sum(&after);
        spec.payload = word.to_be_bytes().to_vec();
        probe = spec.build();
        let out = k.run_tc(&probe);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(view(&out.packet).l4_csum, 0xffff, "{:?}", view(&out.packet));
        assert!(l4_csum_ok(&out.packet));
    });
}

#[test]
fn checksum_complete_skbs_keep_a_valid_csum() {
    if !require_root("checksum_complete_skbs_keep_a_valid_csum") {
        return;
    }
    with_router(1024, standard(0), |k| {
        // The kernel recomputes skb->csum after the run and fails the run
        // (EINVAL) if the program's rewrite left it stale.
        for (n, spec) in [
            Spec::tcp(client(50010), listener(), TCP_SYN),
            Spec::udp(client(50011), listener()),
            Spec::udp(client(50012), listener()).csum(Csum::Zero),
        ]
        .into_iter()
        .enumerate()
        {
            let packet = spec.build();
            let out = k
                .run_tc_flags(&packet, F_CHECKSUM_COMPLETE)
                .unwrap_or_else(|errno| panic!("packet {n}: errno {errno}"));
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "packet {n}");
            assert!(ip_csum_ok(&out.packet), "packet {n}");
            let reply_port = view(&out.packet).sport;
            let proto = spec.proto;
            let reply = if proto == PROTO_TCP {
                Spec::tcp(
                    (BACKEND, BACKEND_PORT),
                    (SNAT, reply_port),
                    TCP_SYN | TCP_ACK,
                )
            } else {
                Spec::udp((BACKEND, BACKEND_PORT), (SNAT, reply_port))
            };
            let back = k
                .run_tc_flags(&reply.build(), F_CHECKSUM_COMPLETE)
                .unwrap_or_else(|errno| panic!("reply {n}: errno {errno}"));
            assert_eq!(back.verdict, TC_ACT_REDIRECT, "reply {n}");
        }
    });
}

#[test]
fn preserve_client_ip_does_dnat_only() {
    if !require_root("preserve_client_ip_does_dnat_only") {
        return;
    }
    with_router(1024, standard(RULE_F_PRESERVE_CLIENT_IP), |k| {
        let p = Spec::tcp(client(50060), listener(), TCP_SYN).build();
        let out = k.run_tc(&p);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let v = view(&out.packet);
        assert_eq!(
            (v.src, v.sport, v.dst, v.dport),
            (CLIENT, 50060, BACKEND, BACKEND_PORT)
        );
        assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
        // The backend answers the client directly, through us.
        let reply = Spec::tcp((BACKEND, BACKEND_PORT), client(50060), TCP_SYN | TCP_ACK).build();
        let back = k.run_tc(&reply);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        let v = view(&back.packet);
        assert_eq!(
            (v.src, v.sport, v.dst, v.dport),
            (LISTENER, LISTEN_PORT, CLIENT, 50060)
        );
        assert!(ip_csum_ok(&back.packet) && l4_csum_ok(&back.packet));
    });
}

#[test]
fn ttl_one_is_the_relays_for_a_new_flow_and_answered_for_a_known_one() {
    if !require_root("ttl_one_is_the_relays_for_a_new_flow_and_answered_for_a_known_one") {
        return;
    }
    with_router(1024, standard(0), |k| {
        let mut spec = Spec::udp(client(50070), listener());
        spec.ttl = 1;
        let p = spec.build();
        let out = k.run_tc(&p);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &p));

        let ok = Spec::udp(client(50071), listener()).build();
        assert_eq!(k.run_tc(&ok).verdict, TC_ACT_REDIRECT);
        let mut spec = Spec::udp(client(50071), listener());
        spec.ttl = 1;
        // With time exceeded (testrun/icmp.rs checks it byte for byte).
        assert_eq!(k.run_tc(&spec.build()).verdict, TC_ACT_REDIRECT);
        assert_eq!(k.rule_counters(UDP_RULE).icmp_sent, 1);
    });
}
