//! Targets given as hostnames: every address, IPv4 first, and `dns:`.

use std::time::Duration;

use super::{TEST_TTL, TestEnv, errors, errors_env, load, load_env, rows};

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
    let answer = &c.hostnames["many.test"];
    assert_eq!(answer.addrs.len(), 3, "{answer:?}");
    assert_eq!(answer.ttl, Some(TEST_TTL));
    assert_eq!(c.hostnames.len(), 1);
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
    // Sixteen fit.
    let env = env_with("wide.test", &refs[..16]);
    let (c, _) = load_env(text, &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listeners[0].backends.len(), 16);
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
    assert!(e[0].contains("`min_ttl`, `max_ttl`"), "{e:?}");
    // An IP target names nothing to follow.
    assert!(rows("routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 7000:80}\n").len() == 1);
    let (c, _) = load("routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 7000:80}\n").unwrap();
    assert!(c.hostnames.is_empty());
}

#[test]
fn dns_ttl_bounds_are_read_bounded_and_in_order() {
    let base = "routes:\n  a: {scheme: tcp, host: backend.test, port: 7000:80}\n";
    let (c, _) = load(base).unwrap();
    assert_eq!(c.dns.min_ttl, Duration::from_secs(5));
    assert_eq!(c.dns.max_ttl, Duration::from_secs(300));
    let (c, _) = load(&format!("dns: {{min_ttl: 2s, max_ttl: 10m}}\n{base}")).unwrap();
    assert_eq!(c.dns.min_ttl, Duration::from_secs(2));
    assert_eq!(c.dns.max_ttl, Duration::from_secs(600));
    let (c, _) = load(&format!("dns: {{min_ttl: 7s, max_ttl: 7s}}\n{base}")).unwrap();
    assert_eq!(
        (c.dns.min_ttl, c.dns.max_ttl),
        (Duration::from_secs(7), Duration::from_secs(7))
    );
    for field in ["min_ttl", "max_ttl"] {
        for bad in ["500ms", "2h", "0s", "soon"] {
            let e = errors(&format!("dns: {{{field}: {bad}}}\n{base}"));
            assert_eq!(e.len(), 1, "{field} {bad}: {e:?}");
            assert!(e[0].starts_with("test.yaml:1:"), "{}", e[0]);
            assert!(e[0].contains(&format!("dns.{field}")), "{}", e[0]);
            if bad.ends_with('s') && bad != "0s" {
                assert!(e[0].contains("from 1s to 1h"), "{}", e[0]);
            }
        }
    }
    // Out of order: said once, where min_ttl is written.
    let e = errors(&format!("dns:\n  max_ttl: 10s\n  min_ttl: 1m\n{base}"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("test.yaml:3:"), "{}", e[0]);
    assert!(e[0].contains("dns.min_ttl"), "{}", e[0]);
    assert!(e[0].contains("min_ttl 1m above max_ttl 10s"), "{}", e[0]);
    // Only max_ttl, below the default min_ttl: said at max_ttl.
    let e = errors(&format!("dns:\n  refresh: 1m\n  max_ttl: 2s\n{base}"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("test.yaml:3:"), "{}", e[0]);
    assert!(e[0].contains("dns.max_ttl"), "{}", e[0]);
    assert!(e[0].contains("min_ttl 5s above max_ttl 2s"), "{}", e[0]);
    // A bound already refused is not compared as well.
    let e = errors(&format!("dns: {{min_ttl: 2h, max_ttl: 10s}}\n{base}"));
    assert_eq!(e.len(), 1, "{e:?}");
    let e = errors(&format!("dns: {{min_ttl: 10m, max_ttl: 2h}}\n{base}"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("dns.max_ttl"), "{}", e[0]);
    // A refused refresh leaves the bounds compared.
    let e = errors(&format!("dns: {{refresh: 2h, min_ttl: 10m}}\n{base}"));
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].contains("dns.refresh"), "{}", e[0]);
    assert!(e[1].contains("min_ttl 10m above max_ttl 5m"), "{}", e[1]);
}

#[test]
fn check_shows_each_name_its_answer_and_when_it_is_asked_again() {
    let env = env_with("pair.test", &["10.0.0.2", "10.0.0.1"]);
    let text = "dns: {min_ttl: 2s, max_ttl: 30s}
routes:
  p: {scheme: tcp, host: pair.test, port: 7000:80}
  q: {scheme: udp, host: 10.0.0.9, port: 7001:53}
";
    let (c, _) = load_env(text, &env).unwrap();
    let t = crate::config::table(&c);
    assert!(
        t.ends_with(
            "dns: refresh 30s, min_ttl 2s, max_ttl 30s\n  \
             pair.test: 10.0.0.1, 10.0.0.2 (TTL 1m; asked again after 30s)\n"
        ),
        "{t}"
    );
    let (c, _) = load_env(
        "routes:\n  q: {scheme: udp, host: 10.0.0.9, port: 7001:53}\n",
        &env,
    )
    .unwrap();
    assert!(!crate::config::table(&c).contains("dns:"));
}

#[test]
fn a_refresh_compiles_with_the_answers_it_is_given_not_new_lookups() {
    let answers = std::collections::BTreeMap::from([(
        "moved.test".to_owned(),
        crate::rules::Answer {
            addrs: vec!["10.0.0.8".parse().unwrap(), "10.0.0.7".parse().unwrap()],
            ttl: Some(Duration::from_secs(42)),
        },
    )]);
    let text = "routes:\n  m: {scheme: tcp, host: moved.test, port: 7000:80}\n";
    let path = std::path::Path::new("refresh.yaml");
    let c = crate::config::load_text_with_answers(text, path, &[], &answers)
        .unwrap()
        .compiled;
    let targets: Vec<String> = (c.listeners[0].backends.iter())
        .map(|b| b.addr.to_string())
        .collect();
    assert_eq!(targets, ["10.0.0.7:80", "10.0.0.8:80"]);
    let answer = &c.hostnames["moved.test"];
    assert_eq!(answer.ttl, Some(Duration::from_secs(42)));
    assert_eq!(answer.addrs.len(), 2);
}
