//! The relay's bounds in a rule file: `max_connections` on routes (which
//! makes the tcp rule relay-only), `relay.first_byte_timeout` and
//! `relay.pipe_size`, and what each cannot be.

use forwarder_common::RULE_F_RELAY;

use super::{errors, load};
use crate::config::table;
use crate::rules::{DEFAULT_MAX_CONNECTIONS, RelaySettings};

#[test]
fn max_connections_makes_the_tcp_rule_relay_only_and_check_says_so() {
    let (c, w) = load(
        "relay: {first_byte_timeout: 5s, pipe_size: 128k}
routes:
  capped: {scheme: 'tcp,udp', host: 10.0.0.1, port: 7000:7001, max_connections: 3}
  plain: {scheme: tcp, host: 10.0.0.1, port: 7002:1}
",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(w.is_empty(), "{w:?}");
    let relay_only: Vec<bool> = c
        .kernel
        .rules
        .iter()
        .map(|(_, v)| v.flags & RULE_F_RELAY != 0)
        .collect();
    assert_eq!(relay_only, [true, false, false]);
    let limits: Vec<(Option<u32>, u32)> = c
        .listeners
        .iter()
        .map(|l| (l.max_connections, l.connection_limit()))
        .collect();
    assert_eq!(
        limits,
        [
            (Some(3), 3),
            (None, DEFAULT_MAX_CONNECTIONS),
            (None, DEFAULT_MAX_CONNECTIONS)
        ]
    );
    assert_eq!(c.relay.first_byte_timeout.as_secs(), 5);
    assert_eq!(c.relay.pipe_size, 128 << 10);
    let t = table(&c);
    let row = |n: usize| {
        t.lines()
            .nth(n)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        row(1).ends_with("relay (max_connections), at most 3 connections -"),
        "{t}"
    );
    assert!(row(2).ends_with("auto -"), "{t}");
    assert!(row(3).ends_with("auto -"), "{t}");
    assert!(
        t.contains(
            "relay: max_udp_sessions 65536, drain_timeout 10s, first_byte_timeout 5s, \
             pipe_size 128k, max_connections 4096 per tcp rule unless set"
        ),
        "{t}"
    );
}

#[test]
fn the_defaults_bound_memory_and_time() {
    let (c, _) = load("routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1:1}\n").unwrap();
    assert_eq!(c.relay, RelaySettings::default());
    assert_eq!(c.relay.pipe_size, 256 << 10);
    assert_eq!(c.relay.first_byte_timeout.as_secs(), 30);
}

#[test]
fn what_max_connections_cannot_be_or_go_with() {
    let got = errors(
        "routes:
  a: {scheme: udp, host: 10.0.0.1, port: 1:1, max_connections: 5}
  b: {scheme: tcp, host: 10.0.0.1, port: 2:2, max_connections: 5, path: tc}
  c: {scheme: tcp, host: 10.0.0.1, port: 3:3, max_connections: 5, preserve_client_ip: true}
  d: {scheme: tcp, host: 10.0.0.1, port: 4:4, max_connections: 0}
  e: {scheme: tcp, host: 10.0.0.1, port: 5:5, max_connections: lots}
",
    );
    let want = [
        "test.yaml:2:64: alias `a`, field `max_connections`: found `max_connections` on a udp route; allowed tcp routes only",
        "test.yaml:3:73: alias `b`, field `path`: found `path: tc` with `max_connections`; allowed `auto` or `relay`: only the relay counts a rule's connections, so `max_connections` makes the tcp rule relay-only; `max_connections` is at test.yaml:3:64",
        "test.yaml:4:87: alias `c`, field `preserve_client_ip`: found `true` with `max_connections`; allowed `false`",
        "test.yaml:5:64: alias `d`, field `max_connections`: found `0`; allowed a whole number from 1 to 1000000",
        "test.yaml:6:64: alias `e`, field `max_connections`: found `lots`; allowed a whole number from 1 to 1000000",
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
fn relay_bounds_out_of_range_are_errors_that_say_what_is_allowed() {
    let got = errors(
        "relay:
  pipe_size: 100k
  first_byte_timeout: 0s
routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 1:1}
",
    );
    assert_eq!(
        got,
        [
            "test.yaml:2:14: `relay.pipe_size`: found `100k`; allowed a power of two from 64k to 1m, in bytes or with `k` or `m` (e.g. `256k`)",
            "test.yaml:3:23: `relay.first_byte_timeout`: found `0s`; allowed a duration above zero",
        ],
        "{got:#?}"
    );
    for bad in ["32k", "2m", "65535", "k", "1.5m"] {
        let got = errors(&format!(
            "relay: {{pipe_size: {bad}}}\nroutes:\n  a: {{scheme: tcp, host: 10.0.0.1, port: 1:1}}\n"
        ));
        assert_eq!(got.len(), 1, "{bad}: {got:#?}");
        assert!(got[0].contains("`relay.pipe_size`: found"), "{got:#?}");
    }
    for good in ["65536", "64k", "512K", "1m", "1M"] {
        let text = format!(
            "relay: {{pipe_size: {good}}}\nroutes:\n  a: {{scheme: tcp, host: 10.0.0.1, port: 1:1}}\n"
        );
        assert!(load(&text).is_ok(), "{good}");
    }
    let got = errors(
        "relay: {first_byte_timeout: 3h}\nroutes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1:1}\n",
    );
    assert_eq!(
        got,
        [
            "test.yaml:1:29: `relay.first_byte_timeout`: found `3h`; allowed from 1s to 2h (e.g. `30s`)"
        ],
        "{got:#?}"
    );
}
