//! Port ranges in a rule file and in labels: the forms, the kernel entries
//! they compile to, the table row, and every error with its place.

use forwarder_common::MAX_RULES;
use forwarder_common::ranges::{RANGE_TARGET_SAME, RANGE_TARGET_SHIFTED, RangeKey};

use super::{errors, load};
use crate::config::table;
use crate::rules::{ListenPorts, TargetPorts};

#[test]
fn the_three_forms_compile_to_one_rule_each_with_trie_blocks() {
    let (c, w) = load(
        "kernel: {snat_ports: 10000-19999}
routes:
  media: {scheme: 'tcp,udp', host: 10.0.0.5, port: 49152-65535:49152-65535}
  shifted: {scheme: udp, host: 10.0.0.5, port: 20000-20999:30000-30999}
  many: {scheme: tcp, host: 10.0.0.5, bind: 10.1.1.1, port: 5000-5099:7000}
  one: {scheme: tcp, host: 10.0.0.5, port: 3478:3478}
",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(w.is_empty(), "{w:?}");
    let ports: Vec<(u16, ListenPorts)> = c
        .listeners
        .iter()
        .map(|l| (l.bind.port(), l.ports))
        .collect();
    let range = |count, target| ListenPorts { count, target };
    assert_eq!(
        ports,
        [
            (49152, range(16384, TargetPorts::Shifted)),
            (49152, range(16384, TargetPorts::Shifted)),
            (20000, range(1000, TargetPorts::Shifted)),
            (5000, range(100, TargetPorts::Same)),
            (3478, ListenPorts::SINGLE),
        ]
    );
    // Only the single port is a RULES entry.
    assert_eq!(c.kernel.rules.len(), 1);
    assert_eq!(u16::from_be(c.kernel.rules[0].0.port), 3478);
    // 49152-65535 is one block per protocol.
    let of = |id: u32| -> Vec<_> {
        c.kernel
            .ranges
            .iter()
            .filter(|e| e.value.rule.rule_id == id)
            .collect()
    };
    assert_eq!(of(0).len(), 1);
    assert_eq!(of(0)[0].prefix_len, RangeKey::prefix_len(14));
    assert_eq!(of(0)[0].key, RangeKey::new([0; 4], 6, 49152));
    assert_eq!(of(1)[0].key, RangeKey::new([0; 4], 17, 49152));
    assert_eq!(of(0)[0].value.first_port, 49152);
    assert_eq!(of(0)[0].value.target, RANGE_TARGET_SHIFTED);
    // The blocks cover exactly the range.
    let covered: u32 = of(2)
        .iter()
        .map(|e| 1u32 << (RangeKey::LOOKUP_PREFIX_LEN - e.prefix_len))
        .sum();
    assert_eq!(covered, 1000);
    assert!(of(3).iter().all(|e| e.value.target == RANGE_TARGET_SAME
        && e.value.first_port == 5000
        && e.key.addr == crate::config::compile::addr_of("10.1.1.1".parse().unwrap())));
    let t = table(&c);
    let row = |n: usize| {
        t.lines()
            .nth(n)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        row(1),
        "0 media tcp [::]:49152-65535 → 10.0.0.5:49152-65535 auto -"
    );
    assert_eq!(
        row(3),
        "2 shifted udp [::]:20000-20999 → 10.0.0.5:30000-30999 auto -"
    );
    assert_eq!(
        row(4),
        "3 many tcp 10.1.1.1:5000-5099 → 10.0.0.5:7000 auto -"
    );
    assert_eq!(row(5), "4 one tcp [::]:3478 → 10.0.0.5:3478 auto -");
}

#[test]
fn labels_take_the_same_forms() {
    let (c, _) = load(
        "kernel: {snat_ports: 10000-19999}
labels:
  proxy.aliases: turn-media
  proxy.turn-media.scheme: udp
  proxy.turn-media.host: 10.0.0.5
  proxy.turn-media.port: 49152-65535:49152-65535
",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].bind.port(), 49152);
    assert_eq!(
        c.listeners[0].ports,
        ListenPorts {
            count: 16384,
            target: TargetPorts::Shifted
        }
    );
    let got = errors(
        "labels:
  proxy.aliases: bad
  proxy.bad.host: 10.0.0.5
  proxy.bad.port: 5000-5099:6000-6009
",
    );
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].starts_with("test.yaml:4:19: alias `bad`, field `port`: found `5000-5099:6000-6009` (listen range of 100 ports, target range of 10)"),
        "{got:#?}"
    );
}

#[test]
fn overlaps_name_both_rules_with_their_places() {
    let got = errors(
        "kernel: {snat_ports: 10000-19999}
routes:
  media: {scheme: 'tcp,udp', host: 10.0.0.5, port: 30000-30999:30000-30999}
  single: {scheme: udp, host: 10.0.0.6, port: 30500:53}
  other: {scheme: tcp, host: 10.0.0.6, bind: 10.1.1.1, port: 30900-31000:1}
  apart: {scheme: tcp, host: 10.0.0.6, bind: 10.1.1.1, port: 31001-31100:1}
  v6: {scheme: tcp, host: 10.0.0.6, bind: '2001:db8::1', port: 31050:1}
  wild4: {scheme: tcp, host: 10.0.0.6, bind: 0.0.0.0, port: 31100:1}
",
    );
    assert_eq!(
        got,
        [
            "test.yaml:4:47: alias `single`, field `port`: found udp [::]:30500, which alias `media` also claims (udp [::]:30000-30999); allowed one rule per (bind, port, protocol), ranges included; a wildcard bind covers every address of its family; alias `media` is at test.yaml:3:52",
            "test.yaml:5:62: alias `other`, field `port`: found tcp 10.1.1.1:30900-31000, which alias `media` also claims (tcp [::]:30000-30999); allowed one rule per (bind, port, protocol), ranges included; a wildcard bind covers every address of its family; alias `media` is at test.yaml:3:52",
            "test.yaml:8:61: alias `wild4`, field `port`: found tcp 0.0.0.0:31100, which alias `apart` also claims (tcp 10.1.1.1:31001-31100); allowed one rule per (bind, port, protocol), ranges included; a wildcard bind covers every address of its family; alias `apart` is at test.yaml:6:62",
        ],
        "{got:#?}"
    );
}

#[test]
fn malformed_ranges_are_errors_with_their_place() {
    let got = errors(
        "routes:
  a: {scheme: tcp, host: 10.0.0.5, port: 20000-20999:30000-30099}
  b: {scheme: tcp, host: 10.0.0.5, port: 80:7000-7099}
  c: {scheme: tcp, host: 10.0.0.5, port: 0-99:1000-1099}
  d: {scheme: tcp, host: 10.0.0.5, port: 6000-5000:7000}
  e: {scheme: tcp, host: 10.0.0.5, port: 65000-65536:1}
",
    );
    let want = [
        "test.yaml:2:42: alias `a`, field `port`: found `20000-20999:30000-30099` (listen range of 1000 ports, target range of 100)",
        "test.yaml:3:42: alias `b`, field `port`: found `80:7000-7099` (a target range needs a listen range of the same length)",
        "test.yaml:4:42: alias `c`, field `port`: found `0-99:1000-1099` (a range that includes port 0)",
        "test.yaml:5:42: alias `d`, field `port`: found `6000-5000:7000` (range 6000-5000 ends before it starts)",
        "test.yaml:6:42: alias `e`, field `port`: found `65000-65536:1` (a range past port 65535)",
    ];
    for w in want {
        assert!(
            got.iter().any(|g| g.starts_with(w)),
            "no error starting `{w}` in {got:#?}"
        );
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");
}

#[test]
fn a_range_overlapping_the_snat_ports_is_an_error() {
    let got = errors(
        "kernel: {snat_ports: 40000-44999}
routes:
  a: {scheme: udp, host: 10.0.0.5, port: 39000-40000:39000-40000}
  b: {scheme: udp, host: 10.0.0.5, port: 44999-45010:7000}
  c: {scheme: udp, host: 10.0.0.5, port: 45011-45020:7000}
",
    );
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(got[0].starts_with("test.yaml:3:42: alias `a`, field `port`: found listen range 39000-40000 overlaps the SNAT range; allowed a listen port outside `kernel.snat_ports`"), "{got:#?}");
    assert!(got[1].starts_with("test.yaml:4:42: alias `b`, field `port`: found listen range 44999-45010 overlaps the SNAT range"), "{got:#?}");
    assert!(
        got[0].ends_with("`kernel.snat_ports` at test.yaml:1:22 is 40000-44999"),
        "{got:#?}"
    );
}

#[test]
fn a_range_may_be_relay_only_like_any_rule() {
    // The relay serves a range with one steered socket per protocol.
    let (c, _) = load(
        "routes:
  a: {scheme: tcp, host: 10.0.0.5, port: 5000-5099:7000, path: relay}
  b: {scheme: tcp, host: 10.0.0.5, port: 5100-5199:7000, max_connections: 5}
  c: {scheme: tcp, host: 10.0.0.5, port: 5200-5299:7000, proxy_protocol: v2}
  d: {scheme: tcp, host: 127.0.0.1, port: 5300-5399:7000}
",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let relay_flag = |id: u32| {
        c.kernel
            .ranges
            .iter()
            .filter(|e| e.value.rule.rule_id == id)
            .all(|e| e.value.rule.flags & forwarder_common::RULE_F_RELAY != 0)
    };
    let ids: Vec<(String, u32)> = c
        .listeners
        .iter()
        .map(|l| (l.alias.clone(), l.rule_id))
        .collect();
    assert_eq!(ids.len(), 4);
    for (alias, id) in &ids {
        assert!(relay_flag(*id), "{alias}");
        assert!(c.kernel.ranges.iter().any(|e| e.value.rule.rule_id == *id));
    }
}

#[test]
fn a_range_counts_as_one_rule_against_the_limit() {
    // MAX_RULES rules fill the table: tcp and udp ranges of 2 ports.
    let aliases = MAX_RULES / 2;
    let rules = |extra: bool| {
        let mut text = String::from("kernel: {snat_ports: 65000-65535}\nroutes:\n");
        for i in 0..aliases {
            let first = 1 + i * 2;
            text.push_str(&format!(
                "  r{i}: {{scheme: 'tcp,udp', host: 10.0.0.5, port: {first}-{}:7000}}\n",
                first + 1
            ));
        }
        if extra {
            text.push_str("  one-more: {scheme: tcp, host: 10.0.0.5, port: 64000-64001:7000}\n");
        }
        text
    };
    let (c, _) = load(&rules(false)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listeners.len(), MAX_RULES as usize);
    let got = errors(&rules(true));
    assert_eq!(got.len(), 1, "{got:#?}");
    let want = format!(
        "test.yaml:{}:3: alias `one-more`: found rule number {}",
        aliases + 3,
        MAX_RULES + 1
    );
    assert!(got[0].starts_with(&want), "{got:#?}");
}
