//! Targets given as hostnames: every address, IPv4 first, and `dns:`.

use std::time::Duration;

use super::{TestEnv, errors, errors_env, load, load_env, rows};

fn env_with(name: &str, addrs: &[&str]) -> TestEnv {
    let mut env = TestEnv::default();
    env.hosts.insert(
        name.to_owned(),
        addrs.iter().map(|a| a.parse().unwrap()).collect(),
    );
    env
}

#[test]
fn a_name_becomes_every_ipv4_address_it_has_sorted() {
    let env = env_with(
        "many.test",
        &[
            "10.0.0.3",
            "2001:db8::1",
            "10.0.0.1",
            "10.0.0.3",
            "::ffff:10.0.0.2",
        ],
    );
    let text = "routes:\n  m: {scheme: udp, host: many.test, port: 7000:53}\n";
    let (c, _) = load_env(text, &env).unwrap();
    let targets: Vec<String> = c.listeners[0]
        .backends
        .iter()
        .map(|b| format!("{}*{}", b.addr, b.weight))
        .collect();
    assert_eq!(targets, ["10.0.0.1:53*1", "10.0.0.2:53*1", "10.0.0.3:53*1"]);
    assert_eq!(c.hostnames, ["many.test"]);
}

#[test]
fn a_name_with_only_ipv6_addresses_uses_them() {
    let env = env_with("six.test", &["2001:db8::2", "2001:db8::1"]);
    let text = "routes:\n  s: {scheme: tcp, host: six.test, port: 7000:80}\n";
    let (c, _) = load_env(text, &env).unwrap();
    let targets: Vec<String> = c.listeners[0]
        .backends
        .iter()
        .map(|b| b.addr.to_string())
        .collect();
    assert_eq!(targets, ["[2001:db8::1]:80", "[2001:db8::2]:80"]);
}

#[test]
fn weighted_names_give_each_address_the_weight() {
    let env = env_with("pair.test", &["10.0.0.1", "10.0.0.2"]);
    let text = "routes:\n  w:\n    scheme: tcp\n    port: 7000\n    backends: [\"pair.test:80 weight=3\", \"10.0.0.9:80\"]\n";
    let (c, _) = load_env(text, &env).unwrap();
    let weights: Vec<(String, u16)> = c.listeners[0]
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("10.0.0.1:80".to_owned(), 3),
            ("10.0.0.2:80".to_owned(), 3),
            ("10.0.0.9:80".to_owned(), 1)
        ]
    );
}

#[test]
fn more_addresses_than_backends_a_rule_holds_is_an_error_at_the_name() {
    let addrs: Vec<String> = (1..=17).map(|i| format!("10.0.1.{i}")).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let env = env_with("wide.test", &refs);
    let text = "routes:\n  w: {scheme: tcp, host: wide.test, port: 7000:80}\n";
    let e = errors_env(text, &env);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("test.yaml:2:"), "{}", e[0]);
    assert!(e[0].contains("resolve to 17 addresses"), "{}", e[0]);
    assert!(e[0].contains("at most 16 backends"), "{}", e[0]);
}

#[test]
fn dns_refresh_is_read_and_bounded() {
    let base = "routes:\n  a: {scheme: tcp, host: backend.test, port: 7000:80}\n";
    let (c, _) = load(base).unwrap();
    assert_eq!(c.dns.refresh, Duration::from_secs(30));
    let (c, _) = load(&format!("dns: {{refresh: 5s}}\n{base}")).unwrap();
    assert_eq!(c.dns.refresh, Duration::from_secs(5));
    for bad in ["500ms", "2h", "0s", "soon"] {
        let e = errors(&format!("dns: {{refresh: {bad}}}\n{base}"));
        assert_eq!(e.len(), 1, "{bad}: {e:?}");
        assert!(e[0].contains("dns.refresh"), "{}", e[0]);
    }
    let e = errors(&format!("dns: {{ttl: 5s}}\n{base}"));
    assert!(e[0].contains("dns.ttl"), "{e:?}");
    // An IP target names nothing to follow.
    assert!(rows("routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 7000:80}\n").len() == 1);
    let (c, _) = load("routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 7000:80}\n").unwrap();
    assert!(c.hostnames.is_empty());
}
