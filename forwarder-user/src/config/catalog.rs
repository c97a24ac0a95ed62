//! Every route field and `proxy.` label forwarder knows, its own and
//! Godoxy's, each classified once: honoured, refused, or ignored with a
//! warning. The route-file parser ([`super::fields`]) and the label parser
//! ([`super::labels`]) both read this table, and the README's compatibility
//! section is printed from it (a test keeps the two equal).
//!
//! Godoxy's fields are those of its route struct (`internal/route/route.go`,
//! with `types.HTTPConfig` and the idlewatcher config) and its Docker label
//! docs, at [`GODOXY_CHECKED`].

use super::errors::{ConfigError, Pos, quoted};
use super::values;
use super::yaml::{Node, Value};

/// The Godoxy release and commit the table was checked against.
#[cfg(test)]
const GODOXY_CHECKED: &str = "v0.31.0 (commit 6f52e6a, 2026-08-21)";

/// Where a name may stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// A route field: in a route file, or `proxy.<alias>.<field>`.
    Route,
    /// A container label only: `proxy.<name>`.
    Container,
    /// Both: Godoxy's idle-sleep settings are container labels, and route
    /// fields in older files and in `proxy.*.<field>`.
    Both,
}

/// What a value that asks for nothing looks like; such a value is what
/// forwarder does anyway, so it is accepted without a word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Off {
    /// Every use is refused.
    Never,
    /// `false`.
    False,
    /// Nothing, an empty text, an empty mapping or list.
    Empty,
    /// The field's own parser says (`healthcheck.disabled: true`, an
    /// empty `acl`).
    // No field is checked but not enforced now; kept for the next one.
    #[allow(dead_code)]
    Parsed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Carried out by forwarder.
    Honoured,
    /// Parsed and checked by forwarder, but nothing enforces it yet.
    // No field is checked but not enforced now; kept for the next one.
    #[allow(dead_code)]
    NotEnforced {
        /// What the route does without it, and what to do meanwhile.
        meanwhile: &'static str,
    },
    /// Changes where or how a stream goes in a way forwarder cannot.
    Refused {
        /// What forwarder does instead, and what the user can do.
        instead: &'static str,
    },
    /// Means nothing for a tcp/udp route.
    Ignored { why: &'static str },
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Field {
    pub name: &'static str,
    /// Defined by Godoxy (otherwise forwarder's own).
    pub godoxy: bool,
    pub scope: Scope,
    pub class: Class,
    pub off: Off,
    /// Godoxy's label shortcuts: `proxy.<shortcut>: v1, v2` sets the field
    /// of each alias of `proxy.aliases`, by index.
    pub shortcuts: &'static [&'static str],
}

const fn field(name: &'static str, godoxy: bool, class: Class) -> Field {
    Field {
        name,
        godoxy,
        scope: Scope::Route,
        class,
        off: Off::Never,
        shortcuts: &[],
    }
}

const fn honoured(name: &'static str, godoxy: bool, shortcuts: &'static [&'static str]) -> Field {
    Field {
        shortcuts,
        ..field(name, godoxy, Class::Honoured)
    }
}

const fn ignored(
    name: &'static str,
    why: &'static str,
    shortcuts: &'static [&'static str],
) -> Field {
    Field {
        shortcuts,
        ..field(name, true, Class::Ignored { why })
    }
}

const fn refused(name: &'static str, off: Off, instead: &'static str) -> Field {
    Field {
        off,
        ..field(name, true, Class::Refused { instead })
    }
}

macro_rules! idle_sleep {
    () => {
        "forwarder never starts, stops or pauses containers: it forwards to the target as it is, and a sleeping target stays asleep; remove it and keep the target running, or keep this route on Godoxy"
    };
}
const IDLE_SLEEP: &str = idle_sleep!();
const IDLE_SETTING: &str = concat!(
    "Godoxy's idle sleep, as a route field or a container label (`proxy.idle_timeout`); ",
    idle_sleep!()
);

const fn idle(name: &'static str) -> Field {
    Field {
        scope: Scope::Both,
        ..refused(name, Off::Empty, IDLE_SETTING)
    }
}

const HTTP_UPSTREAM: &str = "an HTTP(S) upstream setting; a stream's bytes pass unchanged";
const FILE_SERVER: &str = "a file server setting of web routes";

/// The table, in the order the README shows it.
pub(crate) const FIELDS: &[Field] = &[
    honoured("scheme", true, &["schemes", "protos", "protocols"]),
    honoured("host", true, &["hosts"]),
    honoured("port", true, &["ports"]),
    honoured("bind", true, &["binds"]),
    honoured("backends", false, &[]),
    honoured("path", false, &[]),
    honoured("timeouts", false, &[]),
    honoured("preserve_client_ip", false, &[]),
    honoured("acl", false, &[]),
    Field {
        scope: Scope::Container,
        ..honoured("aliases", true, &[])
    },
    Field {
        scope: Scope::Container,
        ..honoured("exclude", true, &[])
    },
    honoured("healthcheck", true, &[]),
    honoured("proxy_protocol", false, &[]),
    honoured("accept_proxy_protocol", false, &[]),
    honoured("max_connections", false, &[]),
    // `true` is `proxy_protocol: v2` on tcp, as Godoxy sends it.
    honoured(
        "relay_proxy_protocol_header",
        true,
        &["proxy_protocol_headers"],
    ),
    Field {
        shortcuts: &["tls_terminations"],
        ..refused(
            "tls_termination",
            Off::False,
            "forwarder does not terminate TLS: it passes the client's bytes on unchanged, so the backend would get TLS; remove it and let the backend speak TLS, or keep this route on Godoxy",
        )
    },
    Field {
        shortcuts: &["agents"],
        ..refused(
            "agent",
            Off::Empty,
            "forwarder connects to the target from this host and has no Godoxy agent to tunnel through; remove it and give a `host` this host can reach, or keep this route on Godoxy",
        )
    },
    refused("idlewatcher", Off::Empty, IDLE_SLEEP),
    idle("idle_timeout"),
    idle("wake_timeout"),
    idle("stop_method"),
    idle("stop_timeout"),
    idle("stop_signal"),
    idle("start_endpoint"),
    idle("depends_on"),
    idle("no_loading_page"),
    ignored(
        "alias",
        "the route's name is its key in a route file, or an item of `proxy.aliases`",
        &[],
    ),
    ignored("root", FILE_SERVER, &["roots"]),
    ignored("spa", FILE_SERVER, &["spas"]),
    ignored("index", FILE_SERVER, &["indexes"]),
    ignored("no_tls_verify", HTTP_UPSTREAM, &["no_tls_verifies"]),
    ignored(
        "response_header_timeout",
        HTTP_UPSTREAM,
        &["response_header_timeouts"],
    ),
    ignored(
        "max_conns_per_host",
        HTTP_UPSTREAM,
        &["max_conns_per_hosts"],
    ),
    ignored(
        "disable_compression",
        HTTP_UPSTREAM,
        &["disable_compressions"],
    ),
    ignored("ssl_server_name", HTTP_UPSTREAM, &["ssl_server_names"]),
    ignored(
        "ssl_trusted_certificate",
        HTTP_UPSTREAM,
        &["ssl_trusted_certificates"],
    ),
    ignored("ssl_certificate", HTTP_UPSTREAM, &["ssl_certificates"]),
    ignored(
        "ssl_certificate_key",
        HTTP_UPSTREAM,
        &["ssl_certificate_keys"],
    ),
    ignored("ssl_protocols", HTTP_UPSTREAM, &[]),
    ignored(
        "path_patterns",
        "HTTP path matching, dropped in Godoxy 0.29.1; kept so that older files load",
        &[],
    ),
    ignored(
        "inbound_mtls_profile",
        "client certificates of HTTPS routes; Godoxy uses it for web routes only",
        &["inbound_mtls_profiles"],
    ),
    ignored(
        "rules",
        "HTTP request rules; Godoxy applies them to web routes only",
        &[],
    ),
    ignored(
        "rule_file",
        "HTTP request rules; Godoxy applies them to web routes only",
        &["rule_files"],
    ),
    ignored(
        "middlewares",
        "HTTP middlewares; Godoxy applies them to web routes only",
        &[],
    ),
    ignored("homepage", "Godoxy's dashboard entry", &[]),
    ignored(
        "access_log",
        "an HTTP request log; Godoxy writes none for streams",
        &[],
    ),
    ignored(
        "load_balance",
        "Godoxy balances web routes only; for streams, list the targets in `backends`",
        &[],
    ),
    ignored(
        "proxmox",
        "ties the route to a Proxmox VM for Godoxy's dashboard (idle-sleep is `idlewatcher`, refused)",
        &[],
    ),
    Field {
        scope: Scope::Container,
        ..ignored(
            "network",
            "picks the Docker network the container's address is taken from: honoured for containers found by `docker:`; in the file's `labels:` there is no container, and the route's `host` is the address",
            &[],
        )
    },
];

/// The entry for `name` where it stands (`container`: a `proxy.<name>`
/// label rather than a route field).
pub(crate) fn lookup(name: &str, container: bool) -> Option<&'static Field> {
    FIELDS.iter().find(|f| {
        f.name == name
            && match f.scope {
                Scope::Route => !container,
                Scope::Container => container,
                Scope::Both => true,
            }
    })
}

/// The field a label shortcut (`proxy.ports`) sets.
pub(crate) fn shortcut(label: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.shortcuts.contains(&label))
}

/// The route fields forwarder honours, for "allowed" in messages.
pub(crate) fn honoured_route_fields() -> Vec<&'static str> {
    FIELDS
        .iter()
        .filter(|f| f.scope != Scope::Container && f.class == Class::Honoured)
        .map(|f| f.name)
        .collect()
}

/// Every name a route field may have, for "did you mean".
pub(crate) fn route_names() -> Vec<&'static str> {
    FIELDS
        .iter()
        .filter(|f| f.scope != Scope::Container)
        .map(|f| f.name)
        .collect()
}

/// Every name a container label (`proxy.<name>`) may have, shortcuts too.
pub(crate) fn container_names() -> Vec<&'static str> {
    FIELDS
        .iter()
        .filter(|f| f.scope != Scope::Route)
        .map(|f| f.name)
        .chain(FIELDS.iter().flat_map(|f| f.shortcuts.iter().copied()))
        .collect()
}

/// Whether `value` asks for nothing, as `off` describes it (`Parsed` is
/// left to the field's parser and answers false here).
pub(crate) fn is_off(off: Off, value: &Node) -> bool {
    match off {
        Off::Never | Off::Parsed => false,
        Off::False => values::boolean(value) == Ok(false),
        Off::Empty => match &value.value {
            Value::Null => true,
            Value::Str(s) => s.trim().is_empty(),
            Value::Seq(items) => items.is_empty(),
            Value::Map(entries) => entries.is_empty(),
        },
    }
}

/// The error for a refused or not yet enforced use of `f`; `None` for
/// the other classes. `at` is where the field is named.
pub(crate) fn refusal(f: &Field, at: &Pos, value: &Node) -> Option<ConfigError> {
    let off = match f.off {
        Off::False => format!("`{}: false` or ", f.name),
        Off::Empty => format!("an empty `{}` or ", f.name),
        // The not-enforced fields say their own off value.
        Off::Never | Off::Parsed => String::new(),
    };
    match f.class {
        Class::NotEnforced { meanwhile } => Some(ConfigError::new(
            at,
            format!(
                "`{}`, which forwarder checks but does not enforce yet",
                f.name
            ),
            format!("no `{}` until forwarder enforces it: {meanwhile}", f.name),
        )),
        Class::Refused { instead } => Some(ConfigError::new(
            at,
            format!(
                "{} ({}`{}`)",
                shown(value),
                if f.godoxy { "Godoxy's " } else { "" },
                f.name
            ),
            format!("{off}no `{}`: {instead}", f.name),
        )),
        Class::Honoured | Class::Ignored { .. } => None,
    }
}

/// A value as the refusal shows it.
fn shown(value: &Node) -> String {
    match &value.value {
        Value::Str(s) => quoted(s.trim()),
        _ => value.describe(),
    }
}

/// The warning for an ignored use of `f`.
pub(crate) fn ignored_warning(f: &Field) -> Option<String> {
    match f.class {
        Class::Ignored { why } if f.scope == Scope::Container => Some(format!(
            "a Godoxy container setting that does not apply to forwarder ({why}); ignored"
        )),
        Class::Ignored { why } => Some(format!(
            "a Godoxy field that does not apply to tcp/udp routes ({why}); ignored"
        )),
        _ => None,
    }
}

/// The README's compatibility table: one row per class and reason, so
/// fields that share both share a row.
#[cfg(test)]
fn markdown_table() -> String {
    // (names, shortcuts, from, class, why)
    type Row = (Vec<String>, Vec<String>, &'static str, String, String);
    let mut rows: Vec<Row> = Vec::new();
    for f in FIELDS {
        let name = match f.scope {
            Scope::Route => format!("`{}`", f.name),
            Scope::Container => format!("`proxy.{}`", f.name),
            Scope::Both => format!("`{}`", f.name),
        };
        let from = if f.godoxy { "Godoxy" } else { "forwarder" };
        let off = match f.off {
            Off::False => " (`false` is accepted)",
            Off::Empty => " (an empty value is accepted)",
            Off::Never | Off::Parsed => "",
        };
        let (class, why) = match f.class {
            Class::Honoured => ("honoured", String::new()),
            Class::NotEnforced { meanwhile } => (
                "refused: checked, not enforced yet",
                format!("{meanwhile}{off}"),
            ),
            Class::Refused { instead } => ("refused", format!("{instead}{off}")),
            Class::Ignored { why } => ("ignored, with a warning", why.to_owned()),
        };
        let shortcuts = f.shortcuts.iter().map(|s| format!("`proxy.{s}`"));
        match rows.last_mut() {
            Some((names, shorts, last_from, last_class, last_why))
                if *last_from == from && *last_class == class && *last_why == why =>
            {
                names.push(name);
                shorts.extend(shortcuts);
            }
            _ => rows.push((vec![name], shortcuts.collect(), from, class.to_owned(), why)),
        }
    }
    let mut out = String::from(
        "| field | from | label shortcut | forwarder | why, or what to do |\n|---|---|---|---|---|\n",
    );
    for (names, shorts, from, class, why) in rows {
        out.push_str(&format!(
            "| {} | {from} | {} | {class} | {why} |\n",
            names.join(", "),
            shorts.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_and_shortcut_is_classified_once() {
        let mut seen = std::collections::HashSet::new();
        for f in FIELDS {
            assert!(seen.insert(f.name), "`{}` twice", f.name);
            for s in f.shortcuts {
                assert!(seen.insert(s), "`{s}` twice");
            }
        }
    }

    #[test]
    fn lookup_respects_where_a_name_stands() {
        assert_eq!(lookup("port", false).map(|f| f.name), Some("port"));
        assert!(lookup("port", true).is_none());
        assert!(lookup("network", false).is_none());
        assert_eq!(lookup("network", true).map(|f| f.name), Some("network"));
        assert!(lookup("idle_timeout", true).is_some() && lookup("idle_timeout", false).is_some());
        assert_eq!(shortcut("protocols").map(|f| f.name), Some("scheme"));
        assert_eq!(
            shortcut("proxy_protocol_headers").map(|f| f.name),
            Some("relay_proxy_protocol_header")
        );
    }

    #[test]
    fn off_values() {
        let pos = Pos::new(&std::sync::Arc::from("t"), 1, 1);
        let s = |t: &str| Node::str(pos.clone(), t);
        assert!(is_off(Off::False, &s("false")));
        assert!(!is_off(Off::False, &s("true")));
        assert!(!is_off(Off::False, &s("no")));
        assert!(is_off(Off::Empty, &s(" ")));
        assert!(is_off(Off::Empty, &Node::map(pos.clone(), vec![])));
        assert!(!is_off(Off::Empty, &s("1h")));
        assert!(!is_off(Off::Never, &s("")));
    }

    #[test]
    fn the_readme_shows_this_table() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        assert!(
            readme.contains(&markdown_table()),
            "README.md's compatibility table differs from the catalog; put this in:\n{}",
            markdown_table()
        );
        assert!(
            readme.contains(GODOXY_CHECKED),
            "README.md lacks {GODOXY_CHECKED}"
        );
    }
}
