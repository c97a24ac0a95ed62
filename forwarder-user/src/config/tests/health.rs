//! `healthcheck` through a whole load: what each protocol's rule checks,
//! Godoxy's spellings, and what `check` prints.

use std::time::Duration;

use super::load;
use crate::rules::{HealthSpec, Probe};

fn health(text: &str) -> Vec<Option<HealthSpec>> {
    let (c, _) = load(text).unwrap_or_else(|e| panic!("{e}"));
    c.listeners.into_iter().map(|l| l.health).collect()
}

#[test]
fn each_protocol_checks_its_own_way() {
    let got = health(
        "routes:
  dns:
    scheme: tcp,udp
    port: 53:53
    backends: [10.0.0.5:53, 10.0.0.6:53 weight=2]
    healthcheck: {interval: 2s, timeout: 1s, fall: 4, rise: 3, payload: 'hex:00 01', expect: \"ok\"}
",
    );
    let spec = |probe| HealthSpec {
        interval: Duration::from_secs(2),
        timeout: Duration::from_secs(1),
        fall: 4,
        rise: 3,
        probe,
    };
    assert_eq!(
        got,
        [
            Some(spec(Probe::TcpConnect)),
            Some(spec(Probe::Udp {
                payload: vec![0, 1],
                expect: b"ok".to_vec(),
            })),
        ]
    );
}

#[test]
fn godoxy_spellings_and_defaults() {
    let got = health(
        "routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 1:1, healthcheck: {retries: -1}}
  b: {scheme: tcp, host: 10.0.0.1, port: 2:2, healthcheck: {retries: 0, interval: 1s}}
  c: {scheme: tcp, host: 10.0.0.1, port: 3:3, healthcheck: {disable: true}}
  d: {scheme: udp, host: 10.0.0.1, port: 4:4, healthcheck: {disabled: true}}
  e: {scheme: tcp, host: 10.0.0.1, port: 5:5}
  f: {scheme: tcp, host: 10.0.0.1, port: 6:6, healthcheck: {retries: 4}}
  g: {scheme: tcp, host: 10.0.0.1, port: 7:7, healthcheck: {}}
",
    );
    let a = got[0].as_ref().unwrap();
    assert_eq!((a.fall, a.rise), (1, 2));
    assert_eq!(
        (a.interval, a.timeout),
        (Duration::from_secs(5), Duration::from_secs(5))
    );
    let b = got[1].as_ref().unwrap();
    // The timeout follows a shorter interval down.
    assert_eq!((b.fall, b.timeout), (1, Duration::from_secs(1)));
    assert_eq!(got[2..5], [None, None, None]);
    assert_eq!(got[5].as_ref().unwrap().fall, 4);
    assert_eq!(
        got[6],
        Some(HealthSpec {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            fall: 3,
            rise: 2,
            probe: Probe::TcpConnect,
        })
    );
}

#[test]
fn check_prints_each_rules_health_check() {
    let (c, _) = load(
        "routes:
  dns:
    scheme: tcp,udp
    port: 53:53
    backends: [10.0.0.5:53, 10.0.0.6:53]
    healthcheck: {interval: 2s, payload: ping, expect: pong}
  plain: {scheme: tcp, host: 10.0.0.1, port: 2:2}
",
    )
    .unwrap();
    let t = crate::config::table(&c);
    assert!(
        t.contains(
            "health checks:\n  0 dns (tcp): tcp connect every 2s, timeout 2s, out after 3 failures, back after 2 passes\n  1 dns (udp): udp 4 bytes, reply starting with \"pong\" every 2s, timeout 2s, out after 3 failures, back after 2 passes\n\n"
        ),
        "{t}"
    );
    assert!(!t.contains("plain ("), "{t}");
}

#[test]
fn a_wildcard_labels_nested_fields_fill_in_what_the_alias_leaves_out() {
    let got = health(
        "labels:
  proxy.aliases: a, b
  proxy.*.healthcheck.interval: 2s
  proxy.*.healthcheck.rise: 5
  proxy.a.healthcheck.rise: 3
  proxy.a.port: 1:1
  proxy.b.port: 2:2
  proxy.*.host: 10.0.0.1
",
    );
    let (a, b) = (got[0].as_ref().unwrap(), got[1].as_ref().unwrap());
    assert_eq!((a.interval, a.rise), (Duration::from_secs(2), 3));
    assert_eq!((b.interval, b.rise), (Duration::from_secs(2), 5));
}
