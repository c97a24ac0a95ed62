//! PROXY protocol fields through a whole load: what each rule sends and
//! accepts, that such rules are relay-only, and what they cannot go with.

use forwarder_common::RULE_F_RELAY;

use super::{errors, load};
use crate::config::table;
use crate::rules::{Compiled, ProxyProtocol};

fn loaded(text: &str) -> Compiled {
    let (c, w) = load(text).unwrap_or_else(|e| panic!("{e}"));
    assert!(w.is_empty(), "{w:?}");
    c
}

fn relay_only(c: &Compiled, rule: usize) -> bool {
    c.kernel.rules[rule].1.flags & RULE_F_RELAY != 0
}

#[test]
fn proxy_protocol_rules_are_relay_only_and_say_so() {
    let c = loaded(
        "routes:
  game: {scheme: 'tcp,udp', host: 10.0.0.1, port: 7000:7001, proxy_protocol: v2}
  ssh: {scheme: tcp, host: 10.0.0.1, port: 7002:22, proxy_protocol: v1, accept_proxy_protocol: [10.1.0.0/16, '2001:db8::/32']}
  plain: {scheme: tcp, host: 10.0.0.1, port: 7003:1}
",
    );
    let sends: Vec<ProxyProtocol> = c.listeners.iter().map(|l| l.proxy.send).collect();
    use ProxyProtocol::{Off, V1, V2};
    assert_eq!(sends, [V2, V2, V1, Off]);
    assert_eq!(c.listeners[2].proxy.accept_from.len(), 2);
    assert!(relay_only(&c, 0) && relay_only(&c, 1) && relay_only(&c, 2));
    assert!(!relay_only(&c, 3));
    let t = table(&c);
    // Columns are padded: compare words (the last column is the ACL).
    let rows: Vec<String> = t
        .lines()
        .skip(1)
        .take(3)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(
        rows[0].ends_with("relay (proxy_protocol), PROXY v2 to backend -"),
        "{t}"
    );
    assert!(
        rows[2].ends_with(
            "relay (proxy_protocol), PROXY v1 to backend, PROXY read from 10.1.0.0/16 2001:db8::/32 -"
        ),
        "{t}"
    );
    let plain: Vec<String> = t
        .lines()
        .nth(4)
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(plain[plain.len() - 2..], ["auto", "-"], "{t}");
}

#[test]
fn godoxys_header_is_v2_on_the_tcp_rule_only() {
    let c = loaded(
        "routes:
  both: {scheme: 'tcp,udp', host: 10.0.0.1, port: 7000:7001, relay_proxy_protocol_header: true}
",
    );
    assert_eq!(c.listeners[0].proxy.send, ProxyProtocol::V2);
    assert_eq!(c.listeners[1].proxy.send, ProxyProtocol::Off);
    assert!(relay_only(&c, 0) && !relay_only(&c, 1));
    let c = loaded(
        "labels:
  proxy.aliases: ssh
  proxy.ssh.port: 2222:22
  proxy.ssh.host: 10.0.0.3
  proxy.proxy_protocol_headers: 'true'
",
    );
    assert_eq!(c.listeners[0].proxy.send, ProxyProtocol::V2);
}

#[test]
fn what_proxy_protocol_cannot_go_with() {
    let got = errors(
        "routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 1:1, proxy_protocol: v2, path: kernel}
  b: {scheme: tcp, host: 10.0.0.1, port: 2:2, accept_proxy_protocol: 10.0.0.0/8, path: xdp}
  c: {scheme: tcp, host: 10.0.0.1, port: 3:3, relay_proxy_protocol_header: true, preserve_client_ip: true}
  d: {scheme: 'tcp,udp', host: 10.0.0.1, port: 4:4, accept_proxy_protocol: [10.0.0.0/8]}
  e: {scheme: udp, host: 10.0.0.1, port: 5:5, relay_proxy_protocol_header: true}
  f: {scheme: tcp, host: 10.0.0.1, port: 6:6, proxy_protocol: v1, relay_proxy_protocol_header: true}
  g: {scheme: tcp, host: 10.0.0.1, port: 7:7, accept_proxy_protocol: [10.0.0.1/8, nonsense]}
  h: {scheme: tcp, host: 10.0.0.1, port: 8:8, proxy_protocol: v3}
",
    );
    let want = [
        "test.yaml:2:73: alias `a`, field `path`: found `path: kernel` with `proxy_protocol: v2`; allowed `auto` or `relay`: only the relay sends and reads PROXY protocol headers; `proxy_protocol: v2` is at test.yaml:2:63",
        "test.yaml:3:88: alias `b`, field `path`: found `path: xdp` with `accept_proxy_protocol`; allowed `auto` or `relay`: only the relay sends and reads PROXY protocol headers; `accept_proxy_protocol` is at test.yaml:3:70",
        "test.yaml:4:102: alias `c`, field `preserve_client_ip`: found `true` with `relay_proxy_protocol_header: true`; allowed `false`: PROXY protocol rules go through the relay, which cannot keep the client's address (the header carries it); `relay_proxy_protocol_header: true` is at test.yaml:4:76",
        "test.yaml:5:76: alias `d`, field `accept_proxy_protocol`: found `accept_proxy_protocol` on a udp route; allowed tcp routes only",
        "test.yaml:6:76: alias `e`, field `relay_proxy_protocol_header`: found `true` on a udp route; allowed `false`: Godoxy sends this header on tcp only; for a header on every datagram, `proxy_protocol: v2`",
        "test.yaml:7:96: alias `f`, field `relay_proxy_protocol_header`: found `true` together with `proxy_protocol`; allowed one of them: Godoxy's `relay_proxy_protocol_header: true` is `proxy_protocol: v2` on tcp; `proxy_protocol` is at test.yaml:7:63",
        "test.yaml:8:71: alias `g`, field `accept_proxy_protocol`: found `10.0.0.1/8` (address bits set beyond the prefix)",
        "test.yaml:8:83: alias `g`, field `accept_proxy_protocol`: found `nonsense`",
        "test.yaml:9:63: alias `h`, field `proxy_protocol`: found `v3`; allowed `off`, `v1` or `v2`",
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
fn trusted_networks_contain_their_addresses() {
    let c = loaded(
        "routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 1:1, accept_proxy_protocol: [10.1.0.0/16, '2001:db8::/32', 192.0.2.7]}
",
    );
    let nets = &c.listeners[0].proxy.accept_from;
    let inside = |ip: &str| nets.iter().any(|n| n.contains(ip.parse().unwrap()));
    assert!(inside("10.1.255.3") && inside("::ffff:10.1.0.1") && inside("2001:db8::9"));
    assert!(inside("192.0.2.7") && !inside("192.0.2.8"));
    assert!(!inside("10.2.0.1") && !inside("2001:db9::1") && !inside("::ffff:0a01:0001:0"));
}
