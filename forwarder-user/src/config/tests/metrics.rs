//! `metrics:`: off unless written, a listen address, a warning when it is
//! not loopback, one error per mistake.

use super::{errors, load, warnings};

const ROUTE: &str = "routes:\n  turn: {scheme: udp, host: 10.0.0.5, port: 7878:3478}\n";

#[test]
fn metrics_are_off_unless_configured() {
    let (c, _) = load(ROUTE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.metrics, None);
}

#[test]
fn a_listen_address_turns_the_endpoint_on() {
    for (listen, want) in [
        ("127.0.0.1:9531", "127.0.0.1:9531"),
        ("'[::1]:9531'", "[::1]:9531"),
    ] {
        let text = format!("metrics: {{listen: {listen}}}\n{ROUTE}");
        let (c, w) = load(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.metrics.map(|m| m.listen.to_string()), Some(want.into()));
        assert!(w.is_empty(), "{w:?}");
    }
}

#[test]
fn a_listen_address_beyond_loopback_is_allowed_with_a_warning() {
    let text = format!("metrics: {{listen: 0.0.0.0:9531}}\n{ROUTE}");
    let (c, _) = load(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.metrics.map(|m| m.listen.to_string()),
        Some("0.0.0.0:9531".into())
    );
    let w = warnings(&text);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("test.yaml:1:19: `metrics.listen`: ")
            && w[0].contains("0.0.0.0:9531 is not a loopback address"),
        "{w:?}"
    );
}

#[test]
fn each_mistake_in_metrics_is_one_error_with_its_place() {
    for (section, want) in [
        (
            "metrics: {}",
            "test.yaml:1:10: `metrics`: found no `listen`",
        ),
        (
            "metrics: {listen: 9531}",
            "test.yaml:1:19: `metrics.listen`: found `9531`",
        ),
        (
            "metrics: {listen: 127.0.0.1:0}",
            "test.yaml:1:19: `metrics.listen`: found `127.0.0.1:0`",
        ),
        (
            "metrics: {listen: localhost:9531}",
            "test.yaml:1:19: `metrics.listen`: found `localhost:9531`",
        ),
        ("metrics: 9531", "test.yaml:1:10: `metrics`"),
    ] {
        let e = errors(&format!("{section}\n{ROUTE}"));
        assert_eq!(e.len(), 1, "{section}: {e:#?}");
        assert!(e[0].starts_with(want), "{section}: {e:#?}");
        assert!(
            e[0].contains("127.0.0.1:9531"),
            "says what is allowed: {e:#?}"
        );
    }
    let e = errors(&format!(
        "metrics: {{listen: 127.0.0.1:9531, port: 1}}\n{ROUTE}"
    ));
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with("test.yaml:1:35: `metrics.port`: found unknown field `port`"),
        "{e:#?}"
    );
}
