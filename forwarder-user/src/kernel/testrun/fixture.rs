//! The router namespace and rule tables the TC and XDP test runs share:
//! client 198.18.1.2 -> listener 198.18.1.1:7878 | 198.18.2.1 -> backend
//! 198.18.2.2:3478.

use std::net::Ipv4Addr;

use forwarder_common::{
    BACKEND_F_HEALTHY, Backend, MAX_BACKENDS_PER_RULE, MAX_SNAT_PROBES, PROTO_TCP, PROTO_UDP,
    RuleKey, RuleValue, Settings,
};

use super::packet::{Spec, TCP_ACK, TCP_SYN, ip_csum_ok, l4_csum_ok, view};
use super::*;
use crate::kernel::snat::addr_of;
use crate::kernel::tables::Tables;
use crate::kernel::testns::{in_fresh_netns, ip};

pub(super) const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub(super) const LISTENER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub(super) const SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
pub(super) const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
pub(super) const BACKEND2: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 3);
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
            unanswered_reuse_after_ns: 1_000_000_000,
            unanswered_reuse_before_ns: 29_000_000_000,
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
pub(super) fn assert_forwarded(out: &Run, proto: u8, sent: &[u8]) -> u16 {
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

/// Sets every conntrack entry's last packet `ago` before now.
pub(super) fn age_conntrack(k: &mut Loaded, ago: std::time::Duration) {
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
pub(super) fn one_port_flow(k: &mut Loaded, cport: u16) {
    let syn = Spec::tcp(client(cport), listener(), TCP_SYN).build();
    assert_eq!(assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn), 40000);
    from_backend(k, TCP_SYN | TCP_ACK);
}

pub(super) fn from_client(k: &mut Loaded, cport: u16, flags: u8) {
    let p = Spec::tcp(client(cport), listener(), flags).build();
    assert_eq!(k.run_tc(&p).verdict, TC_ACT_REDIRECT);
}

pub(super) fn from_backend(k: &mut Loaded, flags: u8) {
    let p = Spec::tcp((BACKEND, BACKEND_PORT), (SNAT, 40000), flags).build();
    assert_eq!(k.run_tc(&p).verdict, TC_ACT_REDIRECT);
}

pub(super) fn one_snat_port() -> Tables {
    let mut t = standard(0);
    t.settings.snat_port_min = 40000;
    t.settings.snat_port_max = 40000;
    t.settings.snat_probe_limit = 1;
    t
}

/// (direction, state, closed_first) of every conntrack entry, sorted.
pub(super) fn entry_states(k: &Loaded) -> Vec<(u8, u8, u8)> {
    let mut v: Vec<_> = k
        .conntrack()
        .iter()
        .map(|(_, v)| (v.direction, v.state, v.closed_first))
        .collect();
    v.sort();
    v
}

/// A SYN from `cport` finds the one SNAT port taken: the relay gets it.
pub(super) fn assert_port_held(k: &mut Loaded, cport: u16) {
    let syn = Spec::tcp(client(cport), listener(), TCP_SYN).build();
    let out = k.run_tc(&syn);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &syn));
}
