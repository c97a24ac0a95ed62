//! The XDP accelerator on crafted frames, in the router namespace of
//! `fixture`: TC opens each flow, XDP carries its established packets, and
//! everything XDP must leave to TC comes back `XDP_PASS`, byte for byte.

use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions, Xdp};
use forwarder_common::{CT_DIR_FORWARD, CT_STATE_ESTABLISHED, PROTO_TCP, PROTO_UDP, RULE_F_XDP};

use super::fixture::{
    BACKEND, BACKEND_PORT, CLIENT, LISTEN_PORT, LISTENER, SNAT, SNAT_PORTS, TCP_RULE, UDP_RULE,
    client, listener, rule, standard, tables, with_router,
};
use super::packet::{Csum, Spec, TCP_ACK, TCP_FIN, TCP_SYN, ip_csum_ok, l4_csum_ok, view};
use super::*;
use crate::kernel::interfaces::ifindex;
use crate::kernel::testns::ip;
use forwarder_common::reasons::{NO_RULE, XdpPass};

pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The MAC addresses `fixture::router` gives the client and the backend.
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2];

impl Loaded {
    /// Runs the XDP program once on `packet` as if it came in by `ingress`.
    fn run_xdp_from(&self, packet: &[u8], ingress: u32) -> Run {
        let xdp: &Xdp = self
            .ebpf
            .program(XDP_PROGRAM)
            .expect("xdp program")
            .try_into()
            .expect("an xdp program");
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let md: Vec<u8> = [0, packet.len() as u32, 0, ingress, 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; packet.len() + 256];
        let result = xdp
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&md),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN of the XDP program");
        out.truncate(result.data_size_out as usize);
        Run {
            verdict: result.return_value,
            packet: out,
        }
    }

    /// Lets XDP send out of both router interfaces (as the daemon does for
    /// interfaces that take XDP frames; the test run sends nothing out).
    fn allow_egress(&mut self) {
        let map = self.ebpf.map_mut("XDP_EGRESS").expect("XDP_EGRESS");
        let mut egress = aya::maps::DevMapHash::try_from(map).expect("a devmap");
        for name in ["up0", "dn0"] {
            let ifindex = ifindex(name).expect("router interface");
            egress
                .insert(ifindex, ifindex, None, 0)
                .expect("write XDP_EGRESS");
        }
    }
}

/// The MAC address of `interface` in this thread's namespace (`/sys`
/// shows the namespace it was mounted in).
fn mac_of(interface: &str) -> [u8; 6] {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "dev", interface])
        .output()
        .expect("run ip");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC address in {text:?}"));
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// A UDP flow from `cport` that TC opened and saw `backend` answer, which
/// establishes it; returns its SNAT port.
fn answered_udp(k: &Loaded, cport: u16, backend: Ipv4Addr) -> u16 {
    let first = Spec::udp(client(cport), listener()).build();
    let out = k.run_tc(&first);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let snat_port = view(&out.packet).sport;
    let reply = Spec::udp((backend, BACKEND_PORT), (SNAT, snat_port)).build();
    assert_eq!(k.run_tc(&reply).verdict, TC_ACT_REDIRECT, "answer");
    snat_port
}

/// XDP left the frame to TC exactly as it came, and counted it once, as
/// `why`, in `rule_id`'s row (`NO_RULE` before it knew the rule), and
/// nothing else there.
fn assert_passed(
    k: &Loaded,
    sent: &[u8],
    ingress: u32,
    (rule_id, why): (u32, XdpPass),
    what: &str,
) {
    let mut expected = k.reasons(rule_id);
    expected.0[why.slot(0) as usize] += 1;
    let out = k.run_xdp_from(sent, ingress);
    assert_eq!(out.verdict, XDP_PASS, "{what}: passed to TC");
    assert_eq!(out.packet, sent, "{what}: unchanged");
    assert_eq!(k.reasons(rule_id), expected, "{what}: counted as {why:?}");
}

/// XDP rewrote `sent` to `src` -> `dst`, for the next hop `dmac` out of
/// `egress`, with checksums that verify when recomputed.
fn assert_carried(
    out: &Run,
    sent: &[u8],
    (src, dst): ((Ipv4Addr, u16), (Ipv4Addr, u16)),
    (egress, dmac): (&str, [u8; 6]),
) {
    assert_eq!(out.verdict, XDP_REDIRECT, "redirected");
    let v = view(&out.packet);
    assert_eq!(((v.src, v.sport), (v.dst, v.dport)), (src, dst), "{v:?}");
    assert_eq!(v.ttl, view(sent).ttl - 1);
    assert_eq!(out.packet[..6], dmac, "next hop's MAC");
    assert_eq!(out.packet[6..12], mac_of(egress), "egress MAC");
    assert!(ip_csum_ok(&out.packet), "IPv4 checksum");
    let proto = sent[super::packet::ETH_LEN + 9];
    let payload_at = if proto == PROTO_TCP { 54 } else { 42 };
    assert_eq!(out.packet[payload_at..], sent[payload_at..], "payload");
    assert_eq!(out.packet.len(), sent.len());
}

#[test]
fn xdp_carries_established_tcp_both_ways_and_leaves_the_rest_to_tc() {
    if !require_root("xdp_carries_established_tcp_both_ways_and_leaves_the_rest_to_tc") {
        return;
    }
    with_router(1024, standard(RULE_F_XDP), |k| {
        k.allow_egress();
        let lo = ifindex("lo").unwrap();
        let syn = Spec::tcp(client(50000), listener(), TCP_SYN).build();
        assert_passed(k, &syn, lo, (NO_RULE, XdpPass::NoFlow), "SYN of a new flow");
        let snat_port = view(&k.run_tc(&syn).packet).sport;
        let snat = (SNAT, snat_port);

        // Before the backend answered, data is TC's.
        let early = Spec::tcp(client(50000), listener(), TCP_ACK).build();
        assert_passed(
            k,
            &early,
            lo,
            (TCP_RULE, XdpPass::NotEstablished),
            "before the answer",
        );
        let syn_ack = Spec::tcp((BACKEND, BACKEND_PORT), snat, TCP_SYN | TCP_ACK).build();
        assert_passed(k, &syn_ack, lo, (TCP_RULE, XdpPass::TcpControl), "SYN-ACK");
        assert_eq!(k.run_tc(&syn_ack).verdict, TC_ACT_REDIRECT);

        let data = Spec::tcp(client(50000), listener(), TCP_ACK).build();
        let out = k.run_xdp_from(&data, lo);
        assert_carried(
            &out,
            &data,
            (snat, (BACKEND, BACKEND_PORT)),
            ("dn0", BACKEND_MAC),
        );
        assert!(l4_csum_ok(&out.packet), "TCP checksum");
        let forward_state = k
            .conntrack()
            .into_iter()
            .find(|(_, v)| v.direction == CT_DIR_FORWARD)
            .map(|(_, v)| v.state);
        assert_eq!(forward_state, Some(CT_STATE_ESTABLISHED));

        let reply = Spec::tcp((BACKEND, BACKEND_PORT), snat, TCP_ACK).build();
        let back = k.run_xdp_from(&reply, lo);
        assert_carried(
            &back,
            &reply,
            ((LISTENER, LISTEN_PORT), (CLIENT, 50000)),
            ("up0", CLIENT_MAC),
        );
        assert!(l4_csum_ok(&back.packet), "TCP checksum");

        let partial = Spec::tcp(client(50000), listener(), TCP_ACK)
            .csum(Csum::Partial)
            .build();
        assert_passed(
            k,
            &partial,
            lo,
            (NO_RULE, XdpPass::ChecksumPartial),
            "partial checksum",
        );

        // Teardown is TC's, and so is a packet about to expire.
        let fin = Spec::tcp(client(50000), listener(), TCP_ACK | TCP_FIN).build();
        assert_passed(k, &fin, lo, (TCP_RULE, XdpPass::TcpControl), "FIN");
        let mut last_hop = Spec::tcp(client(50000), listener(), TCP_ACK);
        last_hop.ttl = 1;
        let last_hop = last_hop.build();
        assert_passed(k, &last_hop, lo, (TCP_RULE, XdpPass::TtlExpiring), "TTL 1");

        let c = k.rule_counters(TCP_RULE);
        assert_eq!(c.xdp_packets, 2, "{c:?}");
        // TC: SYN and SYN-ACK; XDP: one each way.
        assert_eq!((c.packets_fwd, c.packets_rev), (2, 2), "{c:?}");
        assert_eq!(c.bytes_fwd, (syn.len() + data.len()) as u64);
    });
}

#[test]
fn xdp_carries_udp_once_the_backend_answered_and_keeps_a_zero_checksum() {
    if !require_root("xdp_carries_udp_once_the_backend_answered_and_keeps_a_zero_checksum") {
        return;
    }
    with_router(1024, standard(RULE_F_XDP), |k| {
        k.allow_egress();
        let lo = ifindex("lo").unwrap();
        let first = Spec::udp(client(50001), listener()).build();
        assert_passed(k, &first, lo, (NO_RULE, XdpPass::NoFlow), "a new flow");
        let snat_port = view(&k.run_tc(&first).packet).sport;
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&snat_port));
        let snat = (SNAT, snat_port);

        // Until the backend answers, the flow is TC's (which times out
        // unanswered flows sooner); its answer goes by TC too.
        let second = Spec::udp(client(50001), listener()).build();
        assert_passed(
            k,
            &second,
            lo,
            (UDP_RULE, XdpPass::NotEstablished),
            "before the answer",
        );
        let answer = Spec::udp((BACKEND, BACKEND_PORT), snat).build();
        assert_passed(
            k,
            &answer,
            lo,
            (UDP_RULE, XdpPass::NotEstablished),
            "the answer",
        );
        assert_eq!(k.run_tc(&answer).verdict, TC_ACT_REDIRECT);

        let out = k.run_xdp_from(&second, lo);
        assert_carried(
            &out,
            &second,
            (snat, (BACKEND, BACKEND_PORT)),
            ("dn0", BACKEND_MAC),
        );
        assert!(l4_csum_ok(&out.packet), "UDP checksum");

        let reply = Spec::udp((BACKEND, BACKEND_PORT), snat).build();
        let back = k.run_xdp_from(&reply, lo);
        assert_carried(
            &back,
            &reply,
            ((LISTENER, LISTEN_PORT), (CLIENT, 50001)),
            ("up0", CLIENT_MAC),
        );
        assert!(l4_csum_ok(&back.packet), "UDP checksum");

        let zero = Spec::udp(client(50001), listener())
            .csum(Csum::Zero)
            .build();
        let out = k.run_xdp_from(&zero, lo);
        assert_carried(
            &out,
            &zero,
            (snat, (BACKEND, BACKEND_PORT)),
            ("dn0", BACKEND_MAC),
        );
        assert_eq!(view(&out.packet).l4_csum, 0, "no checksum stays none");

        // A sender's offloaded checksum (only the pseudo-header sum) is
        // TC's to keep; so are fragments and IP options.
        let partial = Spec::udp(client(50001), listener())
            .csum(Csum::Partial)
            .build();
        assert_passed(
            k,
            &partial,
            lo,
            (NO_RULE, XdpPass::ChecksumPartial),
            "partial checksum",
        );
        let mut fragment = Spec::udp(client(50001), listener());
        fragment.frag = 0x2000;
        let fragment = fragment.build();
        assert_passed(
            k,
            &fragment,
            lo,
            (NO_RULE, XdpPass::Unparsed),
            "first fragment",
        );
        let mut later = Spec::udp(client(50001), listener());
        later.frag = 0x0010;
        let later = later.build();
        assert_passed(
            k,
            &later,
            lo,
            (NO_RULE, XdpPass::Unparsed),
            "later fragment",
        );
        let mut options = Spec::udp(client(50001), listener());
        options.ip_options = vec![1, 1, 1, 0];
        let options = options.build();
        assert_passed(k, &options, lo, (NO_RULE, XdpPass::Unparsed), "IP options");
        // Nothing of ours: another port, another protocol.
        let other = Spec::udp(client(50001), (LISTENER, 7879)).build();
        assert_passed(k, &other, lo, (NO_RULE, XdpPass::NoFlow), "no rule");
        let mut icmp = Spec::udp(client(50001), listener()).build();
        icmp[super::packet::ETH_LEN + 9] = 1;
        assert_passed(k, &icmp, lo, (NO_RULE, XdpPass::Unparsed), "not TCP or UDP");

        let c = k.rule_counters(UDP_RULE);
        assert_eq!((c.flows, c.xdp_packets), (1, 3), "{c:?}");
        assert_eq!((c.packets_fwd, c.packets_rev), (3, 2), "{c:?}");
    });
}

#[test]
fn xdp_sends_back_out_of_the_ingress_interface_with_xdp_tx() {
    if !require_root("xdp_sends_back_out_of_the_ingress_interface_with_xdp_tx") {
        return;
    }
    // A backend on the client's side of the router.
    let near = Ipv4Addr::new(198, 18, 1, 3);
    let rules = tables(rule(PROTO_UDP, 0, RULE_F_XDP, &[(near, 1)]), SNAT_PORTS);
    with_router(1024, rules, |k| {
        ip(&[
            "neigh",
            "add",
            "198.18.1.3",
            "lladdr",
            "02:00:00:00:01:03",
            "dev",
            "up0",
            "nud",
            "permanent",
        ]);
        k.allow_egress();
        let up0 = ifindex("up0").unwrap();
        answered_udp(k, 50002, near);
        let second = Spec::udp(client(50002), listener()).build();
        let out = k.run_xdp_from(&second, up0);
        assert_eq!(out.verdict, XDP_TX, "sent back out of up0");
        let v = view(&out.packet);
        assert_eq!((v.dst, v.dport), (near, BACKEND_PORT));
        assert_eq!(out.packet[..6], [2, 0, 0, 0, 1, 3]);
        assert_eq!(out.packet[6..12], mac_of("up0"));
        assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
        assert_eq!(k.rule_counters(0).xdp_packets, 1);
    });
}

#[test]
fn xdp_leaves_flows_to_tc_without_the_flag_a_neighbour_or_an_egress() {
    if !require_root("xdp_leaves_flows_to_tc_without_the_flag_a_neighbour_or_an_egress") {
        return;
    }
    // Rule 0: no RULE_F_XDP; rule 1: a backend without a neighbour entry.
    let unresolved = Ipv4Addr::new(198, 18, 2, 4);
    let mut rows = rule(PROTO_TCP, TCP_RULE, 0, &[(BACKEND, 1)]);
    rows.extend(rule(PROTO_UDP, UDP_RULE, RULE_F_XDP, &[(unresolved, 1)]));
    with_router(1024, tables(rows, SNAT_PORTS), |k| {
        let lo = ifindex("lo").unwrap();
        let syn = Spec::tcp(client(50003), listener(), TCP_SYN).build();
        let snat_port = view(&k.run_tc(&syn).packet).sport;
        let syn_ack = Spec::tcp(
            (BACKEND, BACKEND_PORT),
            (SNAT, snat_port),
            TCP_SYN | TCP_ACK,
        );
        assert_eq!(k.run_tc(&syn_ack.build()).verdict, TC_ACT_REDIRECT);
        let data = Spec::tcp(client(50003), listener(), TCP_ACK).build();
        k.allow_egress();
        assert_passed(
            k,
            &data,
            lo,
            (TCP_RULE, XdpPass::RuleNotXdp),
            "rule without XDP",
        );

        answered_udp(k, 50004, unresolved);
        let first = Spec::udp(client(50004), listener()).build();
        assert_passed(
            k,
            &first,
            lo,
            (UDP_RULE, XdpPass::NoRoute),
            "neighbour unresolved",
        );
        assert_eq!(k.rule_counters(UDP_RULE).xdp_packets, 0);
    });
    // An established flow whose egress XDP may not redirect to.
    with_router(1024, standard(RULE_F_XDP), |k| {
        let lo = ifindex("lo").unwrap();
        answered_udp(k, 50005, BACKEND);
        let first = Spec::udp(client(50005), listener()).build();
        assert_passed(
            k,
            &first,
            lo,
            (UDP_RULE, XdpPass::EgressNotXdp),
            "egress not allowed",
        );
        assert_eq!(k.rule_counters(UDP_RULE).xdp_packets, 0);
    });
}
