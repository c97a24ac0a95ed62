//! What the kernel path leaves to the relay: fragments, IP options, a full
//! conntrack table or SNAT port range.

use std::net::Ipv4Addr;

use forwarder_common::{PROTO_TCP, PROTO_UDP, RELAY_OWNER_KERNEL};

use super::fixture::*;
use super::packet::{Spec, TCP_ACK, TCP_SYN, ip_csum_ok, l4_csum_ok, view};
use super::*;
use forwarder_common::reasons::Fallback;

#[test]
fn fragments_and_ip_options_go_to_the_relay_for_the_whole_flow() {
    if !require_root("fragments_and_ip_options_go_to_the_relay_for_the_whole_flow") {
        return;
    }
    with_router(1024, standard(0), |k| {
        let mut first_fragment = Spec::udp(client(50020), listener());
        first_fragment.frag = 0x2000; // MF
        let first_fragment = first_fragment.build();
        let mut later_fragment = Spec::udp(client(50020), listener());
        later_fragment.frag = 0x0010; // offset 128 bytes
        let later_fragment = later_fragment.build();
        let mut options = Spec::tcp(client(50021), listener(), TCP_SYN);
        options.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
        let options = options.build();
        for (what, p) in [
            ("first fragment", &first_fragment),
            ("later fragment", &later_fragment),
            ("IP options", &options),
        ] {
            let out = k.run_tc(p);
            assert_eq!(out.verdict, TC_ACT_UNSPEC, "{what}");
            assert_eq!(&out.packet, p, "{what}: unchanged");
        }
        // Whole datagrams of the fragmented flow stay with the relay.
        let whole = Spec::udp(client(50020), listener()).build();
        let out = k.run_tc(&whole);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &whole));
        assert!(k.conntrack().is_empty());
        let relay = k.relay_flows();
        assert_eq!(relay.len(), 2, "{relay:?}");
        assert!(relay.iter().all(|(_, f)| f.owner == RELAY_OWNER_KERNEL));
        k.assert_reasons(UDP_RULE, &[(Fallback::Fragment.slot(0), 1)]);
        k.assert_reasons(TCP_RULE, &[(Fallback::IpOptions.slot(0), 1)]);
    });
}

/// A datagram fragment as the sender's stack makes it: `frag` is the flags
/// and offset word, and the IP identification is the builder's (0x1234).
fn udp_fragment(from: (Ipv4Addr, u16), to: (Ipv4Addr, u16), frag: u16) -> Vec<u8> {
    let mut spec = Spec::udp(from, to);
    spec.frag = frag;
    spec.build()
}

#[test]
fn a_kernel_flows_fragments_and_ip_options_stay_on_the_kernel_path() {
    if !require_root("a_kernel_flows_fragments_and_ip_options_stay_on_the_kernel_path") {
        return;
    }
    with_router(1024, standard(0), |k| {
        let dgram = Spec::udp(client(50030), listener()).build();
        let snat_port = assert_forwarded(&k.run_tc(&dgram), PROTO_UDP, &dgram);

        // The first fragment is rewritten whole (its UDP checksum covers
        // the datagram: the update is the same), the later one in its IPv4
        // header only; what follows that header is payload, untouched.
        let first = udp_fragment(client(50030), listener(), 0x2000);
        assert_forwarded(&k.run_tc(&first), PROTO_UDP, &first);
        let later = udp_fragment(client(50030), listener(), 0x0010);
        let out = k.run_tc(&later);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "later fragment");
        let v = view(&out.packet);
        assert_eq!((v.src, v.dst, v.ttl), (SNAT, BACKEND, 63));
        assert!(ip_csum_ok(&out.packet));
        assert_eq!(out.packet[34..], later[34..], "no L4 header to rewrite");

        // Replies come back fragmented too.
        let reply = udp_fragment((BACKEND, BACKEND_PORT), (SNAT, snat_port), 0x2000);
        let back = k.run_tc(&reply);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        let v = view(&back.packet);
        assert_eq!(
            (v.src, v.sport, v.dst, v.dport),
            (LISTENER, LISTEN_PORT, CLIENT, 50030)
        );
        assert!(ip_csum_ok(&back.packet) && l4_csum_ok(&back.packet));
        let later_reply = udp_fragment((BACKEND, BACKEND_PORT), (SNAT, snat_port), 0x0010);
        let back = k.run_tc(&later_reply);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        assert_eq!(view(&back.packet).dst, CLIENT);
        assert!(ip_csum_ok(&back.packet));

        // A later fragment whose first one was no kernel flow's is the
        // stack's, as it came.
        let mut stray = Spec::udp(client(50031), listener());
        stray.frag = 0x0010;
        let mut stray = stray.build();
        stray[18..20].copy_from_slice(&0x4321u16.to_be_bytes());
        let out = k.run_tc(&stray);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &stray));

        // IP options on a kernel TCP flow: the L4 header sits further in.
        let syn = Spec::tcp(client(50032), listener(), TCP_SYN).build();
        let tcp_port = assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn);
        let mut with_options = Spec::tcp(client(50032), listener(), TCP_ACK);
        with_options.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
        let with_options = with_options.build();
        let out = k.run_tc(&with_options);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "IP options");
        let v = view(&out.packet);
        assert_eq!(
            (v.src, v.sport, v.dst, v.dport),
            (SNAT, tcp_port, BACKEND, BACKEND_PORT)
        );
        assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
        assert_eq!(out.packet[34..38], with_options[34..38], "options kept");
        assert_eq!(out.packet[58..], with_options[58..], "payload untouched");

        assert!(k.relay_flows().is_empty(), "nothing went to the relay");
        let udp = k.rule_counters(UDP_RULE);
        assert_eq!(
            (udp.flows, udp.packets_fwd, udp.packets_rev),
            (1, 3, 2),
            "{udp:?}"
        );
        k.assert_reasons(UDP_RULE, &[]);
    });
}

#[test]
fn a_full_conntrack_table_leaves_new_flows_to_the_relay() {
    if !require_root("a_full_conntrack_table_leaves_new_flows_to_the_relay") {
        return;
    }
    // Room for one flow (two entries).
    with_router(2, standard(0), |k| {
        let first = Spec::udp(client(50030), listener()).build();
        assert_eq!(k.run_tc(&first).verdict, TC_ACT_REDIRECT);
        let second = Spec::udp(client(50031), listener()).build();
        let out = k.run_tc(&second);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &second));
        // Later datagrams of that flow stay with the relay even once the
        // table has room again.
        let keys: Vec<_> = k.conntrack().into_iter().map(|(key, _)| key).collect();
        let mut map: aya::maps::HashMap<_, CtKey, CtValue> =
            aya::maps::HashMap::try_from(k.ebpf.map_mut("CONNTRACK").unwrap()).unwrap();
        for key in keys {
            map.remove(&key).unwrap();
        }
        let out = k.run_tc(&second);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &second));
        assert_eq!(k.rule_counters(UDP_RULE).flows, 1);
        k.assert_reasons(UDP_RULE, &[(Fallback::ConntrackFull.slot(0), 1)]);
        assert!(k.conntrack().is_empty(), "no half pair left behind");
    });
}

#[test]
fn a_pair_that_does_not_fit_leaves_no_half_behind() {
    if !require_root("a_pair_that_does_not_fit_leaves_no_half_behind") {
        return;
    }
    // Room for one flow and a half: the second flow's reverse entry fits,
    // its forward one does not, and the reverse one must go again.
    with_router(3, standard(0), |k| {
        let first = Spec::udp(client(50033), listener()).build();
        assert_eq!(k.run_tc(&first).verdict, TC_ACT_REDIRECT);
        let before = k.conntrack();
        let second = Spec::udp(client(50034), listener()).build();
        let out = k.run_tc(&second);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &second));
        let mut after = k.conntrack();
        let mut before = before;
        after.sort_by_key(|(key, _)| key.dport);
        before.sort_by_key(|(key, _)| key.dport);
        assert_eq!(after, before, "only the first flow's pair");
        let relay = k.relay_flows();
        assert_eq!(relay.len(), 1, "{relay:?}");
        assert_eq!(relay[0].0.sport, 50034u16.to_be());
        assert_eq!(k.rule_counters(UDP_RULE).flows, 1);
        k.assert_reasons(UDP_RULE, &[(Fallback::ConntrackFull.slot(0), 1)]);
    });
}

#[test]
fn a_full_snat_port_range_leaves_new_flows_to_the_relay() {
    if !require_root("a_full_snat_port_range_leaves_new_flows_to_the_relay") {
        return;
    }
    let mut t = standard(0);
    t.settings.snat_port_min = 40000;
    t.settings.snat_port_max = 40001;
    t.settings.snat_probe_limit = 2;
    with_router(1024, t, |k| {
        let mut ports = Vec::new();
        for cport in [50040, 50041] {
            let p = Spec::udp(client(cport), listener()).build();
            let out = k.run_tc(&p);
            assert_eq!(out.verdict, TC_ACT_REDIRECT);
            ports.push(view(&out.packet).sport);
        }
        ports.sort();
        assert_eq!(ports, vec![40000, 40001], "both ports in use, no collision");
        let third = Spec::udp(client(50042), listener()).build();
        let out = k.run_tc(&third);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &third));
        k.assert_reasons(UDP_RULE, &[(Fallback::SnatPortsExhausted.slot(0), 1)]);
        // The failed probes left no entry behind.
        assert_eq!(k.conntrack().len(), 4);
    });
}
