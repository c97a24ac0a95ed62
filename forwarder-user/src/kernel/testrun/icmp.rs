//! ICMP for kernel flows on crafted packets, in the router namespace of
//! `flows`: errors about a flow translated to its other side, errors the
//! TC program sends for packets it cannot forward, and the MSS clamp.
//! Every expected packet is built here from scratch, checksums computed
//! over whole headers, never incrementally.

use std::net::Ipv4Addr;

use forwarder_common::{PROTO_TCP, RULE_F_PRESERVE_CLIENT_IP};

use super::fixture::{
    BACKEND, BACKEND_PORT, CLIENT, LISTEN_PORT, LISTENER, SNAT, TCP_RULE, UDP_RULE, client,
    listener, standard, with_router,
};
use super::packet::{
    ETH_LEN, IP_LEN, Spec, TCP_ACK, TCP_SYN, fold, ip_csum_ok, l4_csum_ok, sum, view,
};
use super::*;
use crate::kernel::testns::ip;
use forwarder_common::reasons::Dropped;

pub(super) const ICMP_UNREACH: u8 = 3;
pub(super) const CODE_PORT: u8 = 3;
const CODE_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// A router between the forwarder and the backend.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 3);

/// An Ethernet frame with an ICMP error from `from` to `to` (TTL `ttl`)
/// about `about`, an IPv4 packet (header first), of which it holds all.
pub(super) fn error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    ttl: u8,
    kind: (u8, u8, u16),
    about: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    let total = IP_LEN + 8 + about.len();
    p.extend_from_slice(&[0x45, 0xc0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0, 0, ttl, 1, 0, 0]);
    p.extend_from_slice(&from.octets());
    p.extend_from_slice(&to.octets());
    let (icmp_type, code, mtu) = kind;
    p.extend_from_slice(&[icmp_type, code, 0, 0, 0, 0]);
    p.extend_from_slice(&mtu.to_be_bytes());
    p.extend_from_slice(about);
    fix_checksum(&mut p, ETH_LEN, ETH_LEN + IP_LEN, 10);
    let end = p.len();
    fix_checksum(&mut p, ETH_LEN + IP_LEN, end, 2);
    p
}

/// The error the forwarder sends, as Linux sends its own (TTL 64, ID 0),
/// about the frame `packet`: its first 28 bytes.
fn sent_error(from: Ipv4Addr, to: Ipv4Addr, kind: (u8, u8, u16), packet: &[u8]) -> Vec<u8> {
    let mut p = error(from, to, 64, kind, &packet[ETH_LEN..ETH_LEN + IP_LEN + 8]);
    p[ETH_LEN + 4..ETH_LEN + 6].fill(0);
    fix_checksum(&mut p, ETH_LEN, ETH_LEN + IP_LEN, 10);
    p
}

/// Writes the checksum of `p[from..to]` into its field at `from + at`.
fn fix_checksum(p: &mut [u8], from: usize, to: usize, at: usize) {
    p[from + at..from + at + 2].fill(0);
    let c = !fold(sum(&p[from..to]));
    p[from + at..from + at + 2].copy_from_slice(&c.to_be_bytes());
}

/// `packet` (a frame) as the IPv4 packet it carries, its TTL lowered by
/// `hops` and its header checksum fixed: what a router sends on.
pub(super) fn after_hops(packet: &[u8], hops: u8) -> Vec<u8> {
    let mut ipv4 = packet[ETH_LEN..].to_vec();
    ipv4[8] -= hops;
    fix_checksum(&mut ipv4, 0, IP_LEN, 10);
    ipv4
}

/// Every checksum of a frame with an ICMP error verifies: outer header,
/// ICMP message, embedded header, and the embedded L4 checksum when the
/// error holds the whole segment.
pub(super) fn assert_checksums(p: &[u8]) {
    assert!(ip_csum_ok(p), "outer IPv4 checksum");
    let icmp = ETH_LEN + IP_LEN;
    assert_eq!(fold(sum(&p[icmp..])), 0xffff, "ICMP checksum");
    let inner = icmp + 8;
    assert_eq!(
        fold(sum(&p[inner..inner + IP_LEN])),
        0xffff,
        "embedded IPv4 checksum"
    );
    let inner_total = usize::from(u16::from_be_bytes([p[inner + 2], p[inner + 3]]));
    if inner + inner_total == p.len() {
        let mut as_frame = p[..ETH_LEN].to_vec();
        as_frame.extend_from_slice(&p[inner..]);
        assert!(l4_csum_ok(&as_frame), "embedded L4 checksum");
    }
}

/// A UDP flow from the client, forwarded; the frame as it left.
fn udp_flow(k: &Loaded, port: u16) -> (Vec<u8>, Run) {
    let sent = Spec::udp(client(port), listener()).build();
    let out = k.run_tc(&sent);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "the flow is a kernel flow");
    (sent, out)
}

#[test]
fn a_port_unreachable_from_the_backend_reaches_the_client_as_from_the_listener() {
    if !require_root("a_port_unreachable_from_the_backend_reaches_the_client_as_from_the_listener")
    {
        return;
    }
    with_router(1024, standard(0), |k| {
        let (sent, out) = udp_flow(k, 50100);
        // The backend's answer to the datagram as it arrived (TTL 63).
        let unreachable = error(
            BACKEND,
            SNAT,
            64,
            (ICMP_UNREACH, CODE_PORT, 0),
            &out.packet[ETH_LEN..],
        );
        let back = k.run_tc(&unreachable);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        // Exactly what the client would get from the listener itself,
        // about its own datagram one hop on.
        let expected = error(
            LISTENER,
            CLIENT,
            63,
            (ICMP_UNREACH, CODE_PORT, 0),
            &after_hops(&sent, 1),
        );
        assert_eq!(back.packet[ETH_LEN..], expected[ETH_LEN..]);
        assert_checksums(&back.packet);
        assert_eq!(k.rule_counters(UDP_RULE).icmp_translated, 1);
        k.assert_reasons(UDP_RULE, &[]);

        // skb->csum (CHECKSUM_COMPLETE) still matches the bytes.
        let (_, out) = udp_flow(k, 50101);
        let unreachable = error(
            BACKEND,
            SNAT,
            64,
            (ICMP_UNREACH, CODE_PORT, 0),
            &out.packet[ETH_LEN..],
        );
        let back = k
            .run_tc_flags(&unreachable, F_CHECKSUM_COMPLETE)
            .expect("a CHECKSUM_COMPLETE run");
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        assert_checksums(&back.packet);
    });
}

#[test]
fn a_routers_errors_and_the_clients_errors_go_to_the_other_side() {
    if !require_root("a_routers_errors_and_the_clients_errors_go_to_the_other_side") {
        return;
    }
    with_router(1024, standard(0), |k| {
        // A router past the forwarder: frag-needed, its MTU kept.
        let (sent, out) = udp_flow(k, 50110);
        let kind = (ICMP_UNREACH, CODE_FRAG_NEEDED, 1400);
        // Routers embed a packet as it reached them.
        let too_big = error(ROUTER, SNAT, 64, kind, &out.packet[ETH_LEN..]);
        let back = k.run_tc(&too_big);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        let expected = error(LISTENER, CLIENT, 63, kind, &after_hops(&sent, 1));
        assert_eq!(back.packet[ETH_LEN..], expected[ETH_LEN..]);

        // The client's port unreachable about a reply goes to the backend,
        // about the reply as the backend sent it.
        let snat_port = view(&out.packet).sport;
        let reply = Spec::udp((BACKEND, BACKEND_PORT), (SNAT, snat_port)).build();
        let delivered = k.run_tc(&reply);
        assert_eq!(delivered.verdict, TC_ACT_REDIRECT);
        let kind = (ICMP_UNREACH, CODE_PORT, 0);
        let unreachable = error(CLIENT, LISTENER, 64, kind, &delivered.packet[ETH_LEN..]);
        let back = k.run_tc(&unreachable);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        let expected = error(SNAT, BACKEND, 63, kind, &after_hops(&reply, 1));
        assert_eq!(back.packet[ETH_LEN..], expected[ETH_LEN..]);
        assert_checksums(&back.packet);

        // TCP, and an error that holds only the 8 bytes RFC 792 asks for:
        // the embedded TCP checksum is not there to update.
        let syn = Spec::tcp(client(50111), listener(), TCP_SYN).build();
        let out = k.run_tc(&syn);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let kind = (ICMP_TIME_EXCEEDED, 0, 0);
        let forwarded = &out.packet[ETH_LEN..];
        let exceeded = error(ROUTER, SNAT, 64, kind, &forwarded[..IP_LEN + 8]);
        let back = k.run_tc(&exceeded);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        let expected = error(
            LISTENER,
            CLIENT,
            63,
            kind,
            &after_hops(&syn, 1)[..IP_LEN + 8],
        );
        assert_eq!(back.packet[ETH_LEN..], expected[ETH_LEN..]);
        assert_checksums(&back.packet);
        assert_eq!(k.rule_counters(UDP_RULE).icmp_translated, 2);
        assert_eq!(k.rule_counters(TCP_RULE).icmp_translated, 1);
    });
}

#[test]
fn without_snat_the_backends_error_still_reaches_the_client_as_from_the_listener() {
    if !require_root(
        "without_snat_the_backends_error_still_reaches_the_client_as_from_the_listener",
    ) {
        return;
    }
    with_router(1024, standard(RULE_F_PRESERVE_CLIENT_IP), |k| {
        let (sent, out) = udp_flow(k, 50115);
        assert_eq!(view(&out.packet).src, CLIENT, "DNAT only");
        let kind = (ICMP_UNREACH, CODE_PORT, 0);
        let unreachable = error(BACKEND, CLIENT, 64, kind, &out.packet[ETH_LEN..]);
        let back = k.run_tc(&unreachable);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        let expected = error(LISTENER, CLIENT, 63, kind, &after_hops(&sent, 1));
        assert_eq!(back.packet[ETH_LEN..], expected[ETH_LEN..]);
        assert_eq!(k.rule_counters(UDP_RULE).icmp_translated, 1);
    });
}

#[test]
fn icmp_that_is_no_error_about_a_kernel_flow_passes_unchanged() {
    if !require_root("icmp_that_is_no_error_about_a_kernel_flow_passes_unchanged") {
        return;
    }
    with_router(1024, standard(0), |k| {
        let (_, out) = udp_flow(k, 50120);
        let about = out.packet[ETH_LEN..].to_vec();
        let kind = (ICMP_UNREACH, CODE_PORT, 0);
        let valid = error(BACKEND, SNAT, 64, kind, &about);
        let mut frames = Vec::new();
        // No such flow: another port, another protocol, another sender.
        let mut other_port = about.clone();
        other_port[IP_LEN..IP_LEN + 2].copy_from_slice(&41234u16.to_be_bytes());
        frames.push(error(BACKEND, SNAT, 64, kind, &other_port));
        let mut as_tcp = about.clone();
        as_tcp[9] = PROTO_TCP;
        fix_checksum(&mut as_tcp, 0, IP_LEN, 10);
        frames.push(error(BACKEND, SNAT, 64, kind, &as_tcp));
        frames.push(error(BACKEND, LISTENER, 64, kind, &about));
        // Not errors about a packet: echo request, redirect.
        frames.push(error(BACKEND, SNAT, 64, (8, 0, 0), &about));
        frames.push(error(BACKEND, SNAT, 64, (5, 1, 0), &about));
        // Truncated anywhere, and headers that lie.
        for n in ETH_LEN + IP_LEN..valid.len() {
            frames.push(valid[..n].to_vec());
        }
        let inner = ETH_LEN + IP_LEN + 8;
        for (at, byte) in [
            (ETH_LEN, 0x46),     // outer options
            (ETH_LEN + 2, 0xff), // outer length past the frame
            (ETH_LEN + 6, 0x20), // outer fragment
            (inner, 0x46),       // embedded options
            (inner, 0x65),       // embedded IPv6
            (inner + 7, 0x01),   // embedded later fragment
            (inner + 9, 1),      // embedded ICMP
        ] {
            let mut bad = valid.clone();
            bad[at] = byte;
            frames.push(bad);
        }
        for frame in frames {
            let run = k.run_tc(&frame);
            assert_eq!(run.verdict, TC_ACT_UNSPEC, "frame of {} bytes", frame.len());
            assert_eq!(run.packet, frame, "unchanged");
        }
        assert_eq!(k.rule_counters(UDP_RULE).icmp_translated, 0);
        k.assert_reasons(UDP_RULE, &[]);
        // The valid one still is.
        assert_eq!(k.run_tc(&valid).verdict, TC_ACT_REDIRECT);
        // XDP leaves ICMP to TC.
        let xdp = k.run_xdp(&valid);
        assert_eq!((xdp.verdict, &xdp.packet), (XDP_PASS, &valid));
    });
}

#[test]
fn a_kernel_flows_packet_with_ttl_one_is_answered_with_time_exceeded() {
    if !require_root("a_kernel_flows_packet_with_ttl_one_is_answered_with_time_exceeded") {
        return;
    }
    with_router(1024, standard(0), |k| {
        udp_flow(k, 50130);
        let mut spec = Spec::udp(client(50130), listener());
        spec.ttl = 1;
        let expiring = spec.build();
        let answer = k.run_tc(&expiring);
        assert_eq!(answer.verdict, TC_ACT_REDIRECT);
        // From the listener, about the first 28 bytes of the datagram.
        let kind = (ICMP_TIME_EXCEEDED, 0, 0);
        let expected = sent_error(LISTENER, CLIENT, kind, &expiring);
        assert_eq!(answer.packet[ETH_LEN..], expected[ETH_LEN..]);
        assert_eq!(k.rule_counters(UDP_RULE).icmp_sent, 1);
        k.assert_reasons(UDP_RULE, &[]);
        // A reply from the backend expiring here goes back to the backend,
        // from the address it talks to. Its frame is as long as the error
        // (70 bytes), so the skb keeps CHECKSUM_COMPLETE (resizing drops
        // it to NONE) and skb->csum must follow the bytes written.
        let (_, out) = udp_flow(k, 50131);
        let mut reply = Spec::udp((BACKEND, BACKEND_PORT), (SNAT, view(&out.packet).sport));
        reply.ttl = 1;
        reply.payload = vec![1; 28];
        let reply = reply.build();
        assert_eq!(reply.len(), ETH_LEN + IP_LEN + 8 + IP_LEN + 8);
        let answer = k
            .run_tc_flags(&reply, F_CHECKSUM_COMPLETE)
            .expect("a CHECKSUM_COMPLETE run");
        assert_eq!(answer.verdict, TC_ACT_REDIRECT);
        let v = view(&answer.packet);
        assert_eq!((v.src, v.dst), (SNAT, BACKEND));
        assert_eq!(answer.packet[ETH_LEN + IP_LEN], ICMP_TIME_EXCEEDED);
        assert_checksums(&answer.packet);
        assert_eq!(k.rule_counters(UDP_RULE).icmp_sent, 2);
    });
}

#[test]
fn a_df_packet_too_big_for_the_next_hop_is_answered_with_frag_needed() {
    if !require_root("a_df_packet_too_big_for_the_next_hop_is_answered_with_frag_needed") {
        return;
    }
    with_router(1024, standard(0), |k| {
        ip(&["link", "set", "dn0", "mtu", "1400"]);
        udp_flow(k, 50140);
        let mut spec = Spec::udp(client(50140), listener());
        spec.payload = vec![7; 1450];
        let big = spec.build();
        let answer = k.run_tc(&big);
        assert_eq!(answer.verdict, TC_ACT_REDIRECT);
        let kind = (ICMP_UNREACH, CODE_FRAG_NEEDED, 1400);
        let expected = sent_error(LISTENER, CLIENT, kind, &big);
        assert_eq!(answer.packet[ETH_LEN..], expected[ETH_LEN..]);
        assert_eq!(k.rule_counters(UDP_RULE).icmp_sent, 1);

        // One that fits exactly goes on; without DF a too-big one is
        // dropped and counted (the kernel path does not fragment).
        spec.payload = vec![7; 1400 - IP_LEN - 8];
        assert_eq!(k.run_tc(&spec.build()).verdict, TC_ACT_REDIRECT);
        spec.payload = vec![7; 1450];
        spec.frag = 0;
        assert_eq!(k.run_tc(&spec.build()).verdict, TC_ACT_SHOT);
        assert_eq!(k.rule_counters(UDP_RULE).icmp_sent, 1);
        k.assert_reasons(UDP_RULE, &[(Dropped::TooBig.slot(0), 1)]);
    });
}

/// MSS 1460, SACK permitted, timestamps, NOP, window scale 7: a Linux SYN's.
const SYN_OPTIONS: [u8; 20] = [
    2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
];

fn mss_of(p: &[u8]) -> u16 {
    let at = ETH_LEN + IP_LEN + 20 + 2;
    u16::from_be_bytes([p[at], p[at + 1]])
}

#[test]
fn syn_and_syn_ack_mss_is_clamped_to_the_egress_path_mtu() {
    if !require_root("syn_and_syn_ack_mss_is_clamped_to_the_egress_path_mtu") {
        return;
    }
    with_router(1024, standard(0), |k| {
        ip(&["link", "set", "dn0", "mtu", "1400"]);
        let mut syn = Spec::tcp(client(50150), listener(), TCP_SYN);
        syn.tcp_options = SYN_OPTIONS.to_vec();
        syn.payload.clear();
        let out = k.run_tc(&syn.build());
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(mss_of(&out.packet), 1360, "toward the 1,400-byte link");
        assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
        // Everything but the MSS as it was.
        let at = ETH_LEN + IP_LEN + 20;
        assert_eq!(out.packet[at + 4..], SYN_OPTIONS[4..]);

        // The SYN-ACK leaves by the 1,500-byte link: MSS 1460 stays, and
        // a larger one is clamped to 1460.
        let snat_port = view(&out.packet).sport;
        for (mss, expected) in [(1460u16, 1460u16), (8960, 1460), (1200, 1200)] {
            let mut syn_ack = Spec::tcp(
                (BACKEND, BACKEND_PORT),
                (SNAT, snat_port),
                TCP_SYN | TCP_ACK,
            );
            let mut options = SYN_OPTIONS.to_vec();
            options[2..4].copy_from_slice(&mss.to_be_bytes());
            syn_ack.tcp_options = options;
            syn_ack.payload.clear();
            let back = k
                .run_tc_flags(&syn_ack.build(), F_CHECKSUM_COMPLETE)
                .expect("a CHECKSUM_COMPLETE run");
            assert_eq!(back.verdict, TC_ACT_REDIRECT);
            let v = view(&back.packet);
            assert_eq!((v.src, v.sport, v.dport), (LISTENER, LISTEN_PORT, 50150));
            assert_eq!(mss_of(&back.packet), expected, "MSS {mss}");
            assert!(l4_csum_ok(&back.packet), "MSS {mss}");
        }
        // Segments without SYN are never touched, nor are UDP datagrams
        // that happen to look like options.
        let mut ack = Spec::tcp(client(50150), listener(), TCP_ACK);
        ack.tcp_options = SYN_OPTIONS.to_vec();
        let out = k.run_tc(&ack.build());
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(mss_of(&out.packet), 1460);
        let mut udp = Spec::udp(client(50151), listener());
        udp.payload = [&[0u8; 12][..], &SYN_OPTIONS].concat();
        let out = k.run_tc(&udp.build());
        assert_eq!(out.packet[ETH_LEN + IP_LEN + 8..], udp.payload[..]);

        // A route's locked MTU counts, as forwarding honours it.
        ip(&[
            "route",
            "add",
            "198.18.2.2/32",
            "dev",
            "dn0",
            "mtu",
            "lock",
            "1300",
        ]);
        let mut syn = Spec::tcp(client(50152), listener(), TCP_SYN);
        syn.tcp_options = SYN_OPTIONS.to_vec();
        syn.payload.clear();
        let out = k.run_tc(&syn.build());
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(mss_of(&out.packet), 1260, "toward the 1,300-byte route");
        assert!(l4_csum_ok(&out.packet));
    });
}
