//! Every field of the catalog, in the route-file form and the label form
//! (and through its label shortcuts): honoured, refused or ignored, with
//! its message and place.

use std::net::IpAddr;
use std::time::Duration;

use super::load;
use crate::config::catalog::{Class, FIELDS, Field, Scope};
use crate::rules::{Listener, PathMode, Protocol, ProxyProtocol};

/// How a field is handled, pinned here apart from the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Honoured,
    NotEnforced,
    Refused,
    Ignored,
}

fn kind(class: Class) -> Want {
    match class {
        Class::Honoured => Want::Honoured,
        Class::NotEnforced { .. } => Want::NotEnforced,
        Class::Refused { .. } => Want::Refused,
        Class::Ignored { .. } => Want::Ignored,
    }
}

/// How a field must be handled, a value that asks for something, one that
/// asks for nothing (where the field has one), and for honoured fields
/// what the rule then shows.
struct Sample {
    want: Want,
    on: &'static str,
    off: Option<&'static str>,
    shows: fn(&Listener) -> bool,
}

fn anything(_: &Listener) -> bool {
    true
}

const IGNORED: &[&str] = &[
    "alias",
    "root",
    "spa",
    "index",
    "no_tls_verify",
    "response_header_timeout",
    "max_conns_per_host",
    "disable_compression",
    "ssl_server_name",
    "ssl_trusted_certificate",
    "ssl_certificate",
    "ssl_certificate_key",
    "ssl_protocols",
    "path_patterns",
    "inbound_mtls_profile",
    "rules",
    "rule_file",
    "middlewares",
    "homepage",
    "access_log",
    "load_balance",
    "proxmox",
    "network",
];

fn sample(name: &str) -> Option<Sample> {
    use Want::{Honoured, Ignored, Refused};
    let s = |want, on, off, shows| {
        Some(Sample {
            want,
            on,
            off,
            shows,
        })
    };
    match name {
        "scheme" => s(Honoured, "udp", None, |l| l.protocol == Protocol::Udp),
        "host" => s(Honoured, "10.0.0.9", None, |l| {
            l.backends[0].addr.ip() == "10.0.0.9".parse::<IpAddr>().unwrap()
        }),
        "port" => s(Honoured, "7100:7101", None, |l| {
            l.bind.port() == 7100 && l.backends[0].addr.port() == 7101
        }),
        "bind" => s(Honoured, "127.0.0.2", None, |l| {
            l.bind.ip().to_string() == "127.0.0.2"
        }),
        "backends" => s(Honoured, "10.0.0.2:80, 10.0.0.3:81", None, |l| {
            l.backends.len() == 2
        }),
        "path" => s(Honoured, "relay", None, |l| l.path == PathMode::Relay),
        "timeouts" => s(Honoured, "'{connect: 2s}'", None, |l| {
            l.timeouts.connect == Duration::from_secs(2)
        }),
        "preserve_client_ip" => s(Honoured, "true", None, |l| l.preserve_client_ip),
        "aliases" | "exclude" => s(Honoured, "", None, anything), // tests/forms.rs
        "healthcheck" => s(Honoured, "'{interval: 7s}'", None, |l| {
            l.health
                .as_ref()
                .is_some_and(|h| h.interval == Duration::from_secs(7))
        }),
        "acl" => s(Honoured, "'{allow: 10.0.0.0/8}'", None, |l| {
            l.acl.as_ref().is_some_and(|a| {
                a.allows("10.1.2.3".parse().unwrap()) && !a.allows("192.0.2.1".parse().unwrap())
            })
        }),
        "proxy_protocol" => s(Honoured, "v1", Some("off"), |l| {
            l.proxy.send == ProxyProtocol::V1
        }),
        "accept_proxy_protocol" => s(Honoured, "10.0.0.0/8", Some("[]"), |l| {
            l.proxy.accept_from.len() == 1
        }),
        "max_connections" => s(Honoured, "77", None, |l| l.max_connections == Some(77)),
        // Godoxy's header is `proxy_protocol: v2`.
        "relay_proxy_protocol_header" => s(Honoured, "true", Some("false"), |l| {
            l.proxy.send == ProxyProtocol::V2
        }),
        "tls_termination" => s(Refused, "true", Some("false"), anything),
        "agent" => s(Refused, "agent.example", Some("''"), anything),
        "idlewatcher" => s(Refused, "'{idle_timeout: 1h}'", Some("''"), anything),
        "idle_timeout" | "wake_timeout" | "stop_timeout" => s(Refused, "1h", Some("''"), anything),
        "stop_method" => s(Refused, "stop", Some("''"), anything),
        "stop_signal" => s(Refused, "SIGTERM", Some("''"), anything),
        "start_endpoint" => s(Refused, "/wake", Some("''"), anything),
        "depends_on" => s(Refused, "db", Some("''"), anything),
        "no_loading_page" => s(Refused, "true", Some("''"), anything),
        n if IGNORED.contains(&n) => s(Ignored, "x", None, anything),
        _ => None,
    }
}

/// A one-route file with field `name` on its sixth line, after the base
/// fields it does not replace: in the route-file form (`routes:`, `t:`,
/// fields under it) or the label form (`labels:`, `proxy.aliases: t`,
/// `proxy.t.<field>` labels).
fn one_route(head: [&str; 2], field_prefix: &str, name: &str, value: &str) -> String {
    let mut lines: Vec<String> = head.map(str::to_owned).into();
    for (base, v) in base_fields(name) {
        lines.push(format!("{field_prefix}{base}: {v}"));
    }
    while lines.len() < 5 {
        lines.push("  # -".to_owned());
    }
    lines.push(format!("{field_prefix}{name}: {value}"));
    lines.join("\n") + "\n"
}

fn route_file(name: &str, value: &str) -> String {
    one_route(["routes:", "  t:"], "    ", name, value)
}

fn label_file(name: &str, value: &str) -> String {
    one_route(["labels:", "  proxy.aliases: t"], "  proxy.t.", name, value)
}

/// The same through the field's shortcut label.
fn shortcut_file(name: &str, shortcut: &str, value: &str) -> String {
    let mut lines = vec!["labels:".to_owned(), "  proxy.aliases: t".to_owned()];
    for (base, v) in base_fields(name) {
        lines.push(format!("  proxy.t.{base}: {v}"));
    }
    lines.push(format!("  proxy.{shortcut}: {value}"));
    lines.join("\n") + "\n"
}

/// A valid tcp route, less the field under test (and less `host` for
/// `backends`).
fn base_fields(name: &str) -> Vec<(&'static str, &'static str)> {
    [
        ("scheme", "tcp"),
        ("host", "10.0.0.1"),
        ("port", "7000:7001"),
    ]
    .into_iter()
    .filter(|(b, _)| *b != name && !(name == "backends" && *b == "host"))
    .collect()
}

/// What loading `text` did, for messages.
enum Outcome {
    Loaded(Vec<Listener>, Vec<String>),
    Refused(Vec<String>),
}

fn outcome(text: &str) -> Outcome {
    match load(text) {
        Ok((c, w)) => Outcome::Loaded(c.listeners, w.iter().map(ToString::to_string).collect()),
        Err(e) => Outcome::Refused(e.iter().map(ToString::to_string).collect()),
    }
}

/// Checks one use of `f`; `place` is where the field is named.
fn check_use(f: &Field, sample: &Sample, text: &str, place: &str, failures: &mut Vec<String>) {
    let name = f.name;
    let fail = |failures: &mut Vec<String>, why: String| {
        failures.push(format!("`{name}`: {why}\n--- file:\n{text}"));
    };
    if kind(f.class) != sample.want {
        fail(
            failures,
            format!(
                "the catalog says {:?}, this test {:?}",
                f.class, sample.want
            ),
        );
        return;
    }
    match (f.class, outcome(text)) {
        (Class::Honoured, Outcome::Loaded(ls, w)) => {
            if !w.is_empty() || !ls.first().is_some_and(|l| (sample.shows)(l)) {
                fail(
                    failures,
                    format!("honoured, but warned {w:?} or not in the rule"),
                );
            }
        }
        (Class::NotEnforced { meanwhile }, Outcome::Refused(es)) => {
            let want = format!(
                "{place} alias `t`, field `{name}`: found `{name}`, which forwarder checks but does not enforce yet; allowed no `{name}` until forwarder enforces it: {meanwhile}"
            );
            if es != [want.clone()] {
                fail(failures, format!("want one error\n{want}\ngot {es:#?}"));
            }
        }
        (Class::Refused { instead }, Outcome::Refused(es)) => {
            let want_start = format!("{place} alias `t`, field `{name}`: found ");
            let want_end = format!("(Godoxy's `{name}`); allowed ");
            let ok = es.len() == 1
                && es[0].starts_with(&want_start)
                && es[0].contains(&want_end)
                && es[0].ends_with(instead);
            if !ok {
                fail(
                    failures,
                    format!("want one error `{want_start}… {want_end}…{instead}`, got {es:#?}"),
                );
            }
        }
        (Class::Ignored { why }, Outcome::Loaded(ls, w)) => {
            let want = format!(
                "{place} alias `t`, field `{name}`: a Godoxy field that does not apply to tcp/udp routes ({why}); ignored"
            );
            if w != [want.clone()] || ls.is_empty() {
                fail(failures, format!("want one warning\n{want}\ngot {w:#?}"));
            }
        }
        (class, Outcome::Loaded(_, w)) => fail(
            failures,
            format!("{class:?}, but it loaded (warnings {w:?})"),
        ),
        (class, Outcome::Refused(es)) => fail(failures, format!("{class:?}, but refused: {es:#?}")),
    }
}

#[test]
fn every_route_field_in_both_forms() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for f in FIELDS.iter().filter(|f| f.scope != Scope::Container) {
        let Some(sample) = sample(f.name) else {
            failures.push(format!("`{}`: no sample here; add one", f.name));
            continue;
        };
        let route = route_file(f.name, sample.on);
        check_use(f, &sample, &route, "test.yaml:6:5:", &mut failures);
        let label = label_file(f.name, sample.on);
        check_use(f, &sample, &label, "test.yaml:6:11:", &mut failures);
        // A value that asks for nothing loads, with no word.
        if let Some(off) = sample.off {
            for text in [route_file(f.name, off), label_file(f.name, off)] {
                match outcome(&text) {
                    Outcome::Loaded(ls, w) if w.is_empty() && ls.len() == 1 => {}
                    _ => failures.push(format!(
                        "`{}: {off}` does not load quietly:\n{text}",
                        f.name
                    )),
                }
            }
        }
        checked += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(checked >= 40, "only {checked} fields");
}

#[test]
fn every_shortcut_sets_its_field() {
    let mut failures = Vec::new();
    for f in FIELDS {
        for shortcut in f.shortcuts {
            let sample = sample(f.name).expect("a sample for every field");
            let text = shortcut_file(f.name, shortcut, sample.on.trim_matches('\''));
            // The field is named where the shortcut's item stands.
            let col = 3 + format!("proxy.{shortcut}: ").len();
            let line = 2 + base_fields(f.name).len() + 1;
            check_use(
                f,
                &sample,
                &text,
                &format!("test.yaml:{line}:{col}:"),
                &mut failures,
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn container_labels() {
    // Idle sleep is refused as a container label too.
    for f in FIELDS.iter().filter(|f| f.scope == Scope::Both) {
        assert_eq!(sample(f.name).unwrap().want, Want::Refused, "{f:?}");
        let Outcome::Refused(es) = outcome(&format!(
            "labels:\n  proxy.aliases: t\n  proxy.t.port: 7000:7001\n  proxy.{}: 1\n",
            f.name
        )) else {
            panic!("`proxy.{}` loaded", f.name);
        };
        let Class::Refused { instead } = f.class else {
            panic!("{f:?}")
        };
        assert_eq!(
            es,
            [format!(
                "test.yaml:4:3: `proxy.{0}`: found `1` (Godoxy's `{0}`); allowed an empty `{0}` or no `{0}`: {instead}",
                f.name
            )]
        );
        // Left empty, Godoxy does not sleep either.
        let Outcome::Loaded(ls, w) = outcome(&format!(
            "labels:\n  proxy.aliases: t\n  proxy.t.port: 7000:7001\n  proxy.{}: ''\n",
            f.name
        )) else {
            panic!("an empty `proxy.{}` was refused", f.name);
        };
        assert_eq!((ls.len(), w.len()), (1, 0), "{w:?}");
    }
    // An excluded container's idle sleep does nothing, here as in Godoxy.
    let Outcome::Loaded(ls, w) =
        outcome("labels:\n  proxy.aliases: t\n  proxy.exclude: true\n  proxy.idle_timeout: 1h\n")
    else {
        panic!("an excluded container's idle sleep was refused");
    };
    assert!(ls.is_empty());
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("the container is excluded"), "{}", w[0]);

    let network = FIELDS.iter().find(|f| f.name == "network").unwrap();
    assert_eq!(kind(network.class), sample("network").unwrap().want);
    let Outcome::Loaded(ls, w) =
        outcome("labels:\n  proxy.aliases: t\n  proxy.t.port: 7000:7001\n  proxy.network: front\n")
    else {
        panic!("`proxy.network` was refused");
    };
    assert_eq!(ls.len(), 1);
    assert_eq!(
        w,
        [
            "test.yaml:4:3: `proxy.network`: a Godoxy container setting that does not apply to forwarder (picks the Docker network the container's address is taken from: honoured for containers found by `docker:`; in the file's `labels:` there is no container, and the route's `host` is the address); ignored"
        ]
    );
}

#[test]
fn a_refused_value_is_shown_trimmed() {
    let e = super::errors(
        "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1:1, idlewatcher: ' on '}\n",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("field `idlewatcher`: found `on` (Godoxy's `idlewatcher`)"),
        "{}",
        e[0]
    );
}
