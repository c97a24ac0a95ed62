//! Fixtures written here in each form Godoxy's own example files use
//! (`providers.example.yml`, the `docker_labels` fixture, the compose
//! examples, the label docs) load as Godoxy would run them as streams.

use forwarder_common::RULE_F_RELAY;

use super::{data_dir, errors, load, row};
use crate::rules::ProxyProtocol;

fn rows_and_warnings(text: &str) -> (Vec<String>, Vec<String>) {
    let (c, w) = load(text).unwrap_or_else(|e| panic!("{e}"));
    (
        c.listeners.iter().map(row).collect(),
        w.iter().map(ToString::to_string).collect(),
    )
}

/// Asserts one warning per wanted `(start, part)`, and no others.
fn assert_warnings(got: &[String], want: &[(&str, &str)]) {
    for (start, part) in want {
        assert!(
            got.iter().any(|w| w.starts_with(start) && w.contains(part)),
            "no warning `{start}…{part}` in {got:#?}"
        );
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");
}

#[test]
fn a_route_file_in_the_forms_of_providers_example() {
    let (rows, warnings) = rows_and_warnings("include: godoxy-provider.yml\n");
    assert_eq!(
        rows,
        [
            "0 resolver udp [::]:2223 -> 10.0.0.2:53 auto",
            "1 shell tcp [::]:2222 -> 10.0.0.3:22 auto",
        ]
    );
    let file = data_dir().join("godoxy-provider.yml").display().to_string();
    let intranet = format!("{file}:6:11: alias `intranet`, field `scheme`");
    let wiki = format!("{file}:20:1: alias `wiki`, field `scheme`");
    assert_warnings(
        &warnings,
        &[
            (&intranet, "scheme `https` is Godoxy's web proxy"),
            (&wiki, "no `scheme` and no listen port"),
        ],
    );
}

#[test]
fn the_proxy_protocol_route_of_providers_example_sends_v2() {
    let (c, w) = load(
        "routes:
  ssh-with-proxy-protocol:
    scheme: tcp
    host: 10.0.0.3
    port: 2222:22
    relay_proxy_protocol_header: true
",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(c.listeners[0].proxy.send, ProxyProtocol::V2);
    assert_eq!(c.kernel.rules[0].1.flags & RULE_F_RELAY, RULE_F_RELAY);
}

#[test]
fn labels_in_every_documented_form() {
    let text = std::fs::read_to_string(data_dir().join("godoxy-labels.yml")).unwrap();
    let (rows, warnings) = rows_and_warnings(&text);
    assert_eq!(
        rows,
        [
            "0 game tcp [::]:25565 -> 10.0.0.10:25565 auto",
            "1 game udp [::]:25565 -> 10.0.0.10:25565 auto",
            "2 game-query udp [::]:27015 -> 10.0.0.10:27015 auto",
            "3 relay udp [::]:3478 -> 10.0.0.11:3478 auto",
            "4 dns-a udp [::]:5353 -> 10.0.0.12:53 auto",
            "5 dns-b tcp [::]:5354 -> 10.0.0.12:53 auto",
            "6 ssh tcp [::]:2222 -> 10.0.0.13:22 auto",
            "7 ssh-alt tcp [::]:2223 -> 10.0.0.13:22 auto",
            "8 app_backend tcp [::]:8080 -> 10.0.0.14:8080 auto",
        ]
    );
    let ignored = "a Godoxy field that does not apply to tcp/udp routes";
    assert_warnings(
        &warnings,
        &[
            (
                "test.yaml:11:7: alias `game`, field `load_balance`",
                ignored,
            ),
            ("test.yaml:14:7: alias `game`, field `homepage`", ignored),
            (
                "test.yaml:21:22: alias `game-query`, field `middlewares`",
                ignored,
            ),
            (
                "test.yaml:26:22: alias `game-query`, field `access_log`",
                ignored,
            ),
            ("test.yaml:36:14: alias `relay`, field `homepage`", ignored),
            ("test.yaml:38:14: alias `relay`, field `rules`", ignored),
            ("test.yaml:47:13: alias `dns-a`, field `homepage`", ignored),
            ("test.yaml:47:13: alias `dns-b`, field `homepage`", ignored),
            (
                "test.yaml:50:5: `proxy.network`",
                "a Godoxy container setting that does not apply",
            ),
            ("test.yaml:56:14: alias `ssh`, field `homepage`", ignored),
            (
                "test.yaml:59:14: alias `ssh-alt`, field `homepage`",
                ignored,
            ),
            (
                "test.yaml:68:20: alias `web-api`, field `scheme`",
                "scheme `http`",
            ),
            (
                "test.yaml:68:26: alias `web-grpc`, field `scheme`",
                "scheme `h2c`",
            ),
            (
                "test.yaml:70:20: alias `notebook`, field `scheme`",
                "no `scheme` and no listen port",
            ),
            (
                "test.yaml:70:30: alias `notebook-api`, field `scheme`",
                "no `scheme` and no listen port",
            ),
            (
                "test.yaml:72:5: alias `automation`, field `scheme`",
                "no `scheme` and no listen port",
            ),
            (
                "test.yaml:76:5: `proxy.exclude`",
                "the container is excluded",
            ),
        ],
    );
}

#[test]
fn the_idle_sleep_forms_of_the_label_docs_are_refused() {
    let got = errors(
        "labels:
  - proxy.aliases: app
    proxy.#1.scheme: tcp
    proxy.#1.port: 2222:22
    proxy.idle_timeout: 1h30s
  - proxy.app-backend.scheme: tcp
    proxy.app-backend.port: 2223:22
    proxy.*.idle_timeout: 1h
",
    );
    let places: Vec<&str> = got
        .iter()
        .map(|l| l.split(": found").next().unwrap())
        .collect();
    assert_eq!(
        places,
        [
            "test.yaml:5:5: `proxy.idle_timeout`",
            "test.yaml:8:13: alias `app-backend`, field `idle_timeout`"
        ],
        "{got:#?}"
    );
    assert!(
        got.iter()
            .all(|l| l.contains("never starts, stops or pauses containers"))
    );
}
