//! The TC program's kernel path on crafted packets, in a namespace with a
//! client-side and a backend-side veth (so the FIB answers):
//! client 198.18.1.2 -> listener 198.18.1.1:7878 | 198.18.2.1 -> backend
//! 198.18.2.2:3478.

use std::net::Ipv4Addr;

use forwarder_common::{
    ADDR_ANY, BACKEND_F_HEALTHY, Backend, CT_DIR_FORWARD, CT_DIR_REVERSE, CT_STATE_CLOSING,
    CT_STATE_ESTABLISHED, CT_STATE_NEW, CT_STATE_RESET, MAX_BACKENDS_PER_RULE, MAX_SNAT_PROBES,
    PROTO_TCP, PROTO_UDP, RELAY_OWNER_KERNEL, RULE_F_PRESERVE_CLIENT_IP, RULE_F_RELAY, RuleKey,
    RuleValue, Settings,
};

use super::packet::{Csum, Spec, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ip_csum_ok, l4_csum_ok, view};
use super::*;
use crate::kernel::snat::addr_of;
use crate::kernel::tables::Tables;
use crate::kernel::testns::{in_fresh_netns, ip};

pub(super) const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub(super) const LISTENER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub(super) const SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
pub(super) const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const BACKEND2: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 3);
pub(super) const LISTEN_PORT: u16 = 7878;
pub(super) const BACKEND_PORT: u16 = 3478;
pub(super) const TCP_RULE: u32 = 0;
pub(super) const UDP_RULE: u32 = 1;
pub(super) const SNAT_PORTS: (u16, u16) = (40000, 40099);

/// Makes the current (fresh) namespace a router between the two /24s.
pub(super) fn router() {
    for (dev, addr, peer, mac) in [
        ("up0", "198.18.1.1/24", "198.18.1.2", "02:00:00:00:01:02"),
        ("dn0", "198.18.2.1/24", "198.18.2.2", "02:00:00:00:02:02"),
    ] {
        let peer_dev = format!("{dev}p");
        ip(&[
            "link", "add", dev, "type", "veth", "peer", "name", &peer_dev,
        ]);
        ip(&["addr", "add", addr, "dev", dev]);
        ip(&["link", "set", &peer_dev, "up"]);
        ip(&["link", "set", dev, "up"]);
        ip(&[
            "neigh",
            "add",
            peer,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    ip(&[
        "neigh",
        "add",
        "198.18.2.3",
        "lladdr",
        "02:00:00:00:02:03",
        "dev",
        "dn0",
        "nud",
        "permanent",
    ]);
    // bpf_fib_lookup only answers for interfaces that forward.
    std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").unwrap();
}

/// A rule, its value and its backends at their BACKENDS index.
pub(super) type RuleRows = Vec<(RuleKey, RuleValue, Vec<(u32, Backend)>)>;

pub(super) fn rule(proto: u8, rule_id: u32, flags: u32, backends: &[(Ipv4Addr, u16)]) -> RuleRows {
    let key = RuleKey {
        addr: addr_of(LISTENER.into()),
        port: LISTEN_PORT.to_be(),
        proto,
        _pad: 0,
    };
    let value = RuleValue {
        rule_id,
        flags,
        backend_count: backends.len() as u32,
        total_weight: backends.iter().map(|b| u32::from(b.1)).sum(),
    };
    let backends = backends
        .iter()
        .enumerate()
        .map(|(n, &(addr, weight))| {
            (
                rule_id * MAX_BACKENDS_PER_RULE + n as u32,
                Backend {
                    addr: addr_of(addr.into()),
                    snat_addr: addr_of(SNAT.into()),
                    port: BACKEND_PORT.to_be(),
                    weight,
                    flags: BACKEND_F_HEALTHY,
                },
            )
        })
        .collect();
    vec![(key, value, backends)]
}

pub(super) fn tables(rules: RuleRows, ports: (u16, u16)) -> Tables {
    let mut t = Tables {
        settings: Settings {
            snat_port_min: ports.0,
            snat_port_max: ports.1,
            snat_probe_limit: u32::from(ports.1 - ports.0 + 1).min(MAX_SNAT_PROBES),
            closed_reuse_after_ns: 1_000_000_000,
            closed_reuse_before_ns: 9_000_000_000,
        },
        ..Tables::default()
    };
    for (k, v, b) in rules {
        t.rules.push((k, v));
        t.backends.extend(b);
    }
    t
}

/// TCP rule 0 and UDP rule 1 on 198.18.1.1:7878 to 198.18.2.2:3478.
pub(super) fn standard(flags: u32) -> Tables {
    let mut r = rule(PROTO_TCP, TCP_RULE, flags, &[(BACKEND, 1)]);
    r.extend(rule(PROTO_UDP, UDP_RULE, flags, &[(BACKEND, 1)]));
    tables(r, SNAT_PORTS)
}

pub(super) fn with_router<T: Send>(
    conntrack: u32,
    tables: Tables,
    f: impl FnOnce(&mut Loaded) -> T + Send,
) -> T {
    in_fresh_netns(move || {
        router();
        let mut loaded = Loaded::new(conntrack);
        loaded.write_tables(&tables);
        f(&mut loaded)
    })
}

pub(super) fn client(port: u16) -> (Ipv4Addr, u16) {
    (CLIENT, port)
}

pub(super) fn listener() -> (Ipv4Addr, u16) {
    (LISTENER, LISTEN_PORT)
}

/// The IPv4 header, the L4 checksum and the TTL after a forward.
fn assert_forwarded(out: &Run, proto: u8, sent: &[u8]) -> u16 {
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "redirected");
    let v = view(&out.packet);
    assert_eq!((v.src, v.dst, v.dport), (SNAT, BACKEND, BACKEND_PORT));
    assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&v.sport), "{v:?}");
    assert_eq!(v.ttl, view(sent).ttl - 1);
    assert!(ip_csum_ok(&out.packet), "IPv4 checksum");
    assert!(l4_csum_ok(&out.packet), "L4 checksum ({proto})");
    let payload_at = if proto == PROTO_TCP { 54 } else { 42 };
    assert_eq!(
        out.packet[payload_at..],
        sent[payload_at..],
        "payload untouched"
    );
    v.sport
}

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
fn a_reset_closes_the_flow_either_way() {
    if !require_root("a_reset_closes_the_flow_either_way") {
        return;
    }
    with_router(1024, standard(0), |k| {
        // From the client: the reset is forwarded and its side closes first.
        let syn = Spec::tcp(client(50005), listener(), TCP_SYN).build();
        let snat_port = assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn);
        let syn_ack = Spec::tcp(
            (BACKEND, BACKEND_PORT),
            (SNAT, snat_port),
            TCP_SYN | TCP_ACK,
        );
        assert_eq!(k.run_tc(&syn_ack.build()).verdict, TC_ACT_REDIRECT);
        let rst = Spec::tcp(client(50005), listener(), TCP_RST).build();
        assert_forwarded(&k.run_tc(&rst), PROTO_TCP, &rst);
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_RESET, 1),
                (CT_DIR_REVERSE, CT_STATE_ESTABLISHED, 0)
            ]
        );
    });
    with_router(1024, standard(0), |k| {
        // From the backend: restored to the client like any reply.
        let syn = Spec::tcp(client(50006), listener(), TCP_SYN).build();
        let snat_port = assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn);
        let rst = Spec::tcp(
            (BACKEND, BACKEND_PORT),
            (SNAT, snat_port),
            TCP_RST | TCP_ACK,
        );
        let back = k.run_tc(&rst.build());
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        assert_eq!(view(&back.packet).dst, CLIENT);
        let states = entry_states(k);
        assert_eq!(states[1], (CT_DIR_REVERSE, CT_STATE_RESET, 1), "{states:?}");
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
        assert_eq!(k.rule_counters(UDP_RULE).fallback_other, 1);
        assert_eq!(k.rule_counters(TCP_RULE).fallback_other, 1);
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
        assert_eq!(udp.fallback_other, 0);
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
        let c = k.rule_counters(UDP_RULE);
        assert_eq!((c.flows, c.fallback_full), (1, 1), "{c:?}");
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
        let c = k.rule_counters(UDP_RULE);
        assert_eq!((c.flows, c.fallback_full), (1, 1), "{c:?}");
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
        assert_eq!(k.rule_counters(UDP_RULE).fallback_full, 1);
        // The failed probes left no entry behind.
        assert_eq!(k.conntrack().len(), 4);
    });
}

/// Sets every conntrack entry's last packet `ago` before now.
fn age_conntrack(k: &mut Loaded, ago: std::time::Duration) {
    let then = crate::kernel::sweeper::monotonic_ns() - ago.as_nanos() as u64;
    let entries = k.conntrack();
    let mut map: aya::maps::HashMap<_, CtKey, CtValue> =
        aya::maps::HashMap::try_from(k.ebpf.map_mut("CONNTRACK").unwrap()).unwrap();
    for (key, mut value) in entries {
        value.last_seen_ns = then;
        map.insert(key, value, 0).unwrap();
    }
}

/// A TCP flow from `cport` through the one SNAT port 40000, handshake done.
fn one_port_flow(k: &mut Loaded, cport: u16) {
    let syn = Spec::tcp(client(cport), listener(), TCP_SYN).build();
    assert_eq!(assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn), 40000);
    from_backend(k, TCP_SYN | TCP_ACK);
}

fn from_client(k: &mut Loaded, cport: u16, flags: u8) {
    let p = Spec::tcp(client(cport), listener(), flags).build();
    assert_eq!(k.run_tc(&p).verdict, TC_ACT_REDIRECT);
}

fn from_backend(k: &mut Loaded, flags: u8) {
    let p = Spec::tcp((BACKEND, BACKEND_PORT), (SNAT, 40000), flags).build();
    assert_eq!(k.run_tc(&p).verdict, TC_ACT_REDIRECT);
}

fn one_snat_port() -> Tables {
    let mut t = standard(0);
    t.settings.snat_port_min = 40000;
    t.settings.snat_port_max = 40000;
    t.settings.snat_probe_limit = 1;
    t
}

/// (direction, state, closed_first) of every conntrack entry, sorted.
fn entry_states(k: &Loaded) -> Vec<(u8, u8, u8)> {
    let mut v: Vec<_> = k
        .conntrack()
        .iter()
        .map(|(_, v)| (v.direction, v.state, v.closed_first))
        .collect();
    v.sort();
    v
}

/// A SYN from `cport` finds the one SNAT port taken: the relay gets it.
fn assert_port_held(k: &mut Loaded, cport: u16) {
    let syn = Spec::tcp(client(cport), listener(), TCP_SYN).build();
    let out = k.run_tc(&syn);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &syn));
}

#[test]
fn a_closed_flows_port_goes_to_a_new_flow_after_a_quiet_second() {
    if !require_root("a_closed_flows_port_goes_to_a_new_flow_after_a_quiet_second") {
        return;
    }
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50060);
        from_client(k, 50060, TCP_ACK | TCP_FIN);
        from_backend(k, TCP_ACK | TCP_FIN);
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_CLOSING, 1),
                (CT_DIR_REVERSE, CT_STATE_CLOSING, 0)
            ]
        );
        // Closed both ways but not yet quiet for a second: the port is held.
        assert_port_held(k, 50061);
        assert_eq!(k.rule_counters(TCP_RULE).fallback_full, 1);

        age_conntrack(k, std::time::Duration::from_secs(2));
        let syn = Spec::tcp(client(50062), listener(), TCP_SYN).build();
        assert_eq!(assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn), 40000);
        // The old pair is gone whole; the new flow's pair took its place.
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_NEW, 0),
                (CT_DIR_REVERSE, CT_STATE_NEW, 0)
            ]
        );
        let forward: Vec<u16> = k
            .conntrack()
            .iter()
            .filter(|(_, v)| v.direction == CT_DIR_FORWARD)
            .map(|(key, _)| u16::from_be(key.sport))
            .collect();
        assert_eq!(forward, vec![50062]);
        // The backend's answer reaches the new client.
        let syn_ack = Spec::tcp((BACKEND, BACKEND_PORT), (SNAT, 40000), TCP_SYN | TCP_ACK).build();
        let back = k.run_tc(&syn_ack);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        assert_eq!(view(&back.packet).dport, 50062);
        // A late segment of the old client no longer maps to the port.
        let late = Spec::tcp(client(50060), listener(), TCP_ACK).build();
        let out = k.run_tc(&late);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &late));
        assert_eq!(k.rule_counters(TCP_RULE).flows, 2);
    });
}

#[test]
fn a_client_reusing_its_port_after_a_close_starts_both_entries_over() {
    if !require_root("a_client_reusing_its_port_after_a_close_starts_both_entries_over") {
        return;
    }
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50100);
        from_backend(k, TCP_ACK | TCP_FIN);
        from_client(k, 50100, TCP_ACK | TCP_FIN);
        // The same client port again, at once: the same pair, started over.
        let syn = Spec::tcp(client(50100), listener(), TCP_SYN).build();
        assert_eq!(assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn), 40000);
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_NEW, 0),
                (CT_DIR_REVERSE, CT_STATE_NEW, 0)
            ]
        );
        // The backend's answer establishes it again, so the sweeper gives
        // it the established timeout, not the closing one.
        from_backend(k, TCP_SYN | TCP_ACK);
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_NEW, 0),
                (CT_DIR_REVERSE, CT_STATE_ESTABLISHED, 0)
            ]
        );
        assert_eq!(k.rule_counters(TCP_RULE).flows, 1);
    });
}

#[test]
fn a_port_stays_with_a_half_closed_backend_closed_or_sweepable_flow() {
    if !require_root("a_port_stays_with_a_half_closed_backend_closed_or_sweepable_flow") {
        return;
    }
    // Only the client sent FIN: the backend may still be sending.
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50070);
        from_client(k, 50070, TCP_ACK | TCP_FIN);
        age_conntrack(k, std::time::Duration::from_secs(2));
        assert_port_held(k, 50071);
    });
    // The backend closed first: it holds TIME_WAIT for the port, and a new
    // flow's SYN on it could be answered with a bare ACK.
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50080);
        from_backend(k, TCP_ACK | TCP_FIN);
        from_client(k, 50080, TCP_ACK | TCP_FIN);
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_CLOSING, 0),
                (CT_DIR_REVERSE, CT_STATE_CLOSING, 1)
            ]
        );
        age_conntrack(k, std::time::Duration::from_secs(2));
        assert_port_held(k, 50081);
    });
    // Closed both ways, client first, but idle so long that it is the
    // sweeper's.
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50090);
        from_client(k, 50090, TCP_ACK | TCP_FIN);
        from_backend(k, TCP_ACK | TCP_FIN);
        age_conntrack(k, std::time::Duration::from_secs(9));
        assert_port_held(k, 50091);
        assert_eq!(k.conntrack().len(), 2, "the old pair stays for the sweeper");
        assert_eq!(k.rule_counters(TCP_RULE).fallback_full, 1);
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
        assert_eq!(k.rule_counters(UDP_RULE).fallback_other, 1);
        assert_eq!(k.relay_flows().len(), 1);
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
            let c = k.rule_counters(id);
            assert_eq!((c.flows, c.fallback_other), (0, 0), "rule {id}");
        }
        // The same to this host's own address is forwarded.
        let ours = Spec::udp(client(50093), (LISTENER, LISTEN_PORT)).build();
        assert_eq!(k.run_tc(&ours).verdict, TC_ACT_REDIRECT);
    });
}
