//! A route's fields, whatever form they were written in, checked one by one.
//!
//! What each field is, honoured, refused or ignored, is the
//! [`catalog`](super::catalog)'s to say. Fields forwarder uses: `scheme`,
//! `port`, `host`, `bind`, `backends`, `path`, `timeouts`,
//! `preserve_client_ip`, `healthcheck`, `acl`, `proxy_protocol`,
//! `accept_proxy_protocol` (and Godoxy's `relay_proxy_protocol_header`),
//! `max_connections`.
//! Godoxy's fields that change a stream in ways forwarder cannot are refused;
//! those that mean nothing for a stream are ignored with a warning; anything
//! else is an error with a "did you mean".

use std::net::IpAddr;
use std::time::Duration;

use forwarder_common::MAX_BACKENDS_PER_RULE;

use super::acl::{Acl, parse as parse_acl};
use super::catalog::{self, Class};
use super::env::Env;
use super::errors::{ConfigError, Diag, Pos, closest, quoted};
use super::services;
use super::source::RawRoute;
use super::values::{self, Cidr, HostSpec};
use super::yaml::{Node, Value};
use crate::rules::{ListenPorts, PathMode, Protocol, Timeouts};

const HTTP_SCHEMES: &[&str] = &["http", "https", "h2c", "fileserver"];
const SCHEME_ALLOWED: &str = "`tcp`, `udp`, or both: `tcp,udp`";
const TIMEOUT_FIELDS: &[&str] = &[
    "udp_idle",
    "udp_unreplied",
    "tcp_established",
    "tcp_half_closed",
    "tcp_close",
    "connect",
];
const HEALTHCHECK_FIELDS: &[&str] = &[
    "disable", "disabled", "interval", "timeout", "retries", "fall", "rise", "payload", "expect",
];
const HEALTHCHECK_IGNORED: &[&str] = &["path", "use_get"];
/// Open relay connections one rule may hold; more would exhaust descriptors
/// (six per connection) long before.
const MAX_CONNECTIONS_MAX: u64 = 1_000_000;
const BACKEND_ALLOWED: &str =
    "`host:port`, `host:port weight=N`, or a mapping {host, port, weight} (weight 1–65535)";

/// How often and how a rule's backends are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub disabled: bool,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed checks in a row before a backend is taken out.
    pub fall: u32,
    /// Passed checks in a row before a backend that was out takes flows again.
    pub rise: u32,
    /// UDP: the datagram a check sends; a check passes on a reply.
    pub payload: Option<Vec<u8>>,
    /// UDP: the reply must start with these bytes.
    pub expect: Option<Vec<u8>>,
}

pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_RISE: u32 = 2;

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            disabled: false,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            fall: DEFAULT_FALL,
            rise: DEFAULT_RISE,
            payload: None,
            expect: None,
        }
    }
}

pub use crate::rules::ProxyProtocol;

/// One target of a route, host not yet resolved.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TargetSpec {
    pub host: HostSpec,
    pub port: u16,
    pub weight: u16,
    pub pos: Pos,
    /// `host` or `backends`.
    pub field: &'static str,
}

/// A route whose every field is valid on its own.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RouteSpec {
    pub alias: String,
    pub alias_pos: Pos,
    pub protocols: Vec<Protocol>,
    pub bind: Option<IpAddr>,
    pub bind_pos: Pos,
    /// 0: picked at start. The first port of a range.
    pub listen: u16,
    pub ports: ListenPorts,
    pub port_pos: Pos,
    pub targets: Vec<TargetSpec>,
    pub targets_pos: Pos,
    pub timeouts: Timeouts,
    pub path: PathMode,
    pub path_pos: Pos,
    pub preserve_client_ip: bool,
    pub preserve_pos: Pos,
    pub healthcheck: Option<HealthCheck>,
    pub acl: Acl,
    pub proxy_protocol: ProxyProtocol,
    /// False when the header comes from Godoxy's
    /// `relay_proxy_protocol_header`, which Godoxy sends on TCP only.
    pub proxy_protocol_on_udp: bool,
    pub accept_proxy_protocol: Vec<Cidr>,
    /// The relay's open TCP connections for this route; `None`: the default.
    pub max_connections: Option<u32>,
}

/// Errors for one alias.
struct Ctx<'a> {
    alias: &'a str,
    diag: &'a mut Diag,
    ok: bool,
}

impl Ctx<'_> {
    /// An error about `field`, or about the route as a whole if it is "".
    fn error(&mut self, field: &str, e: ConfigError) {
        self.ok = false;
        let e = e.alias(Some(self.alias));
        let e = if field.is_empty() { e } else { e.field(field) };
        self.diag.error(e);
    }

    fn errors(&mut self, field: &str, es: Vec<ConfigError>) {
        for e in es {
            self.error(field, e);
        }
    }

    fn warn(&mut self, pos: &Pos, field: &str, message: String) {
        self.diag.warn(pos, Some(self.alias), Some(field), message);
    }

    /// Runs a parser and records its error.
    fn take<T>(&mut self, field: &str, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| self.error(field, e)).ok()
    }

    fn unknown(&mut self, prefix: &str, key: &Node, known: &[&str], extra: &[&str]) {
        let name = key.key_text();
        let field = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}.{name}")
        };
        let hint = closest(name, known)
            .or_else(|| closest(name, extra))
            .map(|c| format!("did you mean `{c}`?"));
        let list: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
        self.error(
            &field,
            ConfigError::new(
                &key.pos,
                format!("unknown field {}", quoted(name)),
                list.join(", "),
            )
            .maybe_hint(hint),
        );
    }
}

/// The fields of one route, or `None` when any is wrong (errors recorded)
/// or when the route is not a stream (warning recorded).
///
/// The targets of a route that fails are added to `unchecked`, so that
/// hostnames that do not resolve are reported with the other mistakes.
pub(crate) fn route(
    raw: &RawRoute,
    defaults: &Timeouts,
    env: &dyn Env,
    diag: &mut Diag,
    unchecked: &mut Vec<(String, TargetSpec)>,
) -> Option<RouteSpec> {
    let mut cx = Ctx {
        alias: &raw.alias,
        diag,
        ok: true,
    };
    let map = match values::mapping(&raw.fields, "a mapping of route fields") {
        Ok(map) => map.into_owned(),
        Err(es) => {
            cx.errors("", es);
            return None;
        }
    };
    let entries = map.entries().unwrap_or_default();
    if let Some(why) = web_route(entries, &raw.pos) {
        cx.warn(&why.0, "scheme", why.1);
        return None;
    }
    // Our fields by name; each refused or ignored one is reported here.
    let mut ours: Vec<(&str, &Node, &Node)> = Vec::new();
    for (k, v) in entries {
        let name = k.key_text();
        match catalog::lookup(name, false) {
            Some(f) => match f.class {
                Class::Honoured | Class::NotEnforced { .. } => ours.push((f.name, k, v)),
                Class::Refused { .. } => {
                    if !catalog::is_off(f.off, v)
                        && let Some(e) = catalog::refusal(f, &k.pos, v)
                    {
                        cx.error(name, e);
                    }
                }
                Class::Ignored { .. } => {
                    if let Some(message) = catalog::ignored_warning(f) {
                        cx.warn(&k.pos, name, message);
                    }
                }
            },
            None => cx.unknown(
                "",
                k,
                &catalog::honoured_route_fields(),
                &catalog::route_names(),
            ),
        }
    }
    let get = |name: &str| ours.iter().find(|(n, _, _)| *n == name).map(|(_, _, v)| *v);
    let (scheme, host, port, bind, backends) = (
        get("scheme"),
        get("host"),
        get("port"),
        get("bind"),
        get("backends"),
    );
    let (path, timeouts, preserve) = (get("path"), get("timeouts"), get("preserve_client_ip"));
    let (healthcheck, acl, proxy_protocol) =
        (get("healthcheck"), get("acl"), get("proxy_protocol"));
    let (godoxy_proxy_header, accept_proxy) = (
        get("relay_proxy_protocol_header"),
        get("accept_proxy_protocol"),
    );
    let max_connections = get("max_connections");

    let protocols = match scheme {
        Some(node) => match parse_scheme(node) {
            Ok(Scheme::Stream(p)) => Some(p),
            Ok(Scheme::Http(_)) => None, // `web_route` took these
            Err(e) => {
                cx.error("scheme", e);
                None
            }
        },
        // Godoxy: no scheme and a listen port means tcp (`web_route` took
        // the routes without a listen port).
        None => Some(vec![Protocol::Tcp]),
    };

    let services_text = env.services();
    // A route whose scheme is wrong still has its port checked, as tcp.
    let service_protocols = protocols.clone().unwrap_or_else(|| vec![Protocol::Tcp]);
    let service = |name: &str| services::resolve(&services_text, name, &service_protocols);
    let port_spec = match port {
        Some(p) => cx.take("port", values::port(p, backends.is_some(), &service)),
        None => None,
    };

    if port.is_none() {
        cx.error(
            "port",
            ConfigError::new(&raw.pos, "no `port`", values::PORT_ALLOWED),
        );
    }

    let bind_ip = bind.and_then(|b| cx.take("bind", values::ip(b)));
    let mut targets = Vec::new();
    let mut targets_pos = raw.pos.clone();
    match (host, backends) {
        (Some(h), Some(b)) => cx.error(
            "backends",
            ConfigError::new(
                &b.pos,
                "both `host` and `backends`",
                "one of them: `backends` replaces `host`",
            )
            .hint(format!("`host` is at {}", h.pos)),
        ),
        (_, Some(b)) => {
            targets_pos = b.pos.clone();
            let default_port = port_spec.and_then(|p| p.target);
            if let Some(t) = parse_backends(&mut cx, b, default_port) {
                targets = t;
            }
        }
        (h, None) => {
            let spec = match h {
                Some(node) => {
                    targets_pos = node.pos.clone();
                    cx.take("host", values::host(node))
                }
                None => Some(HostSpec::Ip(IpAddr::from([127, 0, 0, 1]))),
            };
            if let Some(host) = spec {
                targets.push(TargetSpec {
                    host,
                    // 0 only when `port` is wrong, and then the route is dropped.
                    port: port_spec.and_then(|p| p.target).unwrap_or(0),
                    weight: 1,
                    pos: h.map_or_else(|| raw.pos.clone(), |n| n.pos.clone()),
                    field: "host",
                });
            }
        }
    }

    let path_mode = path.and_then(|p| {
        let t = p.as_str().map(|s| s.trim().to_ascii_lowercase());
        let r = match t.as_deref() {
            Some("auto") => Ok(PathMode::Auto),
            Some("kernel") => Ok(PathMode::Kernel),
            Some("relay") => Ok(PathMode::Relay),
            Some("tc") => Ok(PathMode::Tc),
            Some("xdp") => Ok(PathMode::Xdp),
            _ => Err(ConfigError::new(
                &p.pos,
                p.describe(),
                "`auto`, `kernel`, `relay`, `tc` or `xdp`",
            )),
        };
        cx.take("path", r)
    });
    let preserve_value = preserve.and_then(|p| cx.take("preserve_client_ip", values::boolean(p)));
    let timeouts_value = match timeouts {
        Some(t) => parse_timeouts(t, *defaults, &mut |f, e| cx.error(f, e)),
        None => Some(*defaults),
    };
    let healthcheck_value =
        healthcheck.and_then(|h| parse_healthcheck(&mut cx, h, protocols.as_deref()));
    let acl_value = match acl {
        Some(a) => parse_acl(a, &mut |f, e| cx.error(&f, e)),
        None => Some(Acl::default()),
    };
    let proxy_protocol_value = match proxy_protocol {
        Some(p) => {
            let t = p.as_str().map(|s| s.trim().to_ascii_lowercase());
            let r = match t.as_deref() {
                Some("off" | "false") => Ok(ProxyProtocol::Off),
                Some("v1") => Ok(ProxyProtocol::V1),
                Some("v2") => Ok(ProxyProtocol::V2),
                _ => Err(ConfigError::new(
                    &p.pos,
                    p.describe(),
                    "`off`, `v1` or `v2`",
                )),
            };
            cx.take("proxy_protocol", r)
        }
        None => Some(ProxyProtocol::Off),
    };
    let godoxy_header_value = godoxy_proxy_header
        .and_then(|g| cx.take("relay_proxy_protocol_header", values::boolean(g)));
    let accept_proxy_value = match accept_proxy {
        Some(a) => parse_cidrs(&mut cx, "accept_proxy_protocol", a),
        None => Some(Vec::new()),
    };

    let max_connections_value = max_connections.and_then(|m| {
        cx.take(
            "max_connections",
            values::integer(m, 1, MAX_CONNECTIONS_MAX).map(|n| n as u32),
        )
    });
    if let Some(m) = max_connections {
        max_connections_together(
            &mut cx,
            m,
            protocols.as_deref(),
            path.zip(path_mode),
            preserve.zip(preserve_value),
        );
    }

    // Fields that only make sense together.
    if let (Some(ProxyProtocol::V1), Some(protocols), Some(p)) =
        (proxy_protocol_value, &protocols, proxy_protocol)
        && protocols.contains(&Protocol::Udp)
    {
        cx.error(
            "proxy_protocol",
            ConfigError::new(
                &p.pos,
                "`v1` on a udp route",
                "`v2` (v1 cannot describe udp)",
            ),
        );
    }
    proxy_protocol_together(
        &mut cx,
        ProxyFields {
            ours: proxy_protocol.zip(proxy_protocol_value),
            godoxy: godoxy_proxy_header.zip(godoxy_header_value),
            accept: accept_proxy.zip(accept_proxy_value.as_ref()),
        },
        protocols.as_deref(),
        path.zip(path_mode),
        preserve.zip(preserve_value),
    );
    if let (Some(true), Some(PathMode::Relay), Some(p)) = (preserve_value, path_mode, preserve) {
        cx.error(
            "preserve_client_ip",
            ConfigError::new(
                &p.pos,
                "`true` with `path: relay`",
                "`false`: the relay cannot keep the client's address; only the kernel path can",
            ),
        );
    }

    if !cx.ok {
        unchecked.extend(targets.into_iter().map(|t| (raw.alias.clone(), t)));
        return None;
    }
    let port_spec = port_spec?;
    Some(RouteSpec {
        alias: raw.alias.clone(),
        alias_pos: raw.pos.clone(),
        protocols: protocols?,
        bind: bind_ip,
        bind_pos: bind.map_or_else(|| raw.pos.clone(), |b| b.pos.clone()),
        listen: port_spec.listen,
        ports: port_spec.ports,
        port_pos: port.map_or_else(|| raw.pos.clone(), |p| p.pos.clone()),
        targets,
        targets_pos,
        timeouts: timeouts_value?,
        path: path_mode.unwrap_or_default(),
        path_pos: path.map_or_else(|| raw.pos.clone(), |p| p.pos.clone()),
        preserve_client_ip: preserve_value.unwrap_or(false),
        preserve_pos: preserve.map_or_else(|| raw.pos.clone(), |p| p.pos.clone()),
        healthcheck: healthcheck_value.filter(|h| !h.disabled),
        acl: acl_value?,
        proxy_protocol: match (proxy_protocol_value?, godoxy_header_value) {
            (ProxyProtocol::Off, Some(true)) => ProxyProtocol::V2,
            (ours, _) => ours,
        },
        proxy_protocol_on_udp: proxy_protocol.is_some(),
        accept_proxy_protocol: accept_proxy_value?,
        max_connections: max_connections_value,
    })
}

/// `max_connections` is the relay's count of a tcp rule's connections:
/// the kernel path keeps no such count, so it cannot go with a path that
/// requires the kernel, nor with `preserve_client_ip`, which needs it.
fn max_connections_together(
    cx: &mut Ctx<'_>,
    node: &Node,
    protocols: Option<&[Protocol]>,
    path: Option<(&Node, PathMode)>,
    preserve: Option<(&Node, bool)>,
) {
    if let Some([Protocol::Udp]) = protocols {
        cx.error(
            "max_connections",
            ConfigError::new(
                &node.pos,
                "`max_connections` on a udp route",
                "tcp routes only: the relay's udp sessions are bounded by `relay.max_udp_sessions` and the free ephemeral ports",
            ),
        );
    }
    relay_only_conflicts(
        cx,
        (node, "`max_connections`"),
        path,
        preserve,
        "`auto` or `relay`: only the relay counts a rule's connections, so `max_connections` makes the tcp rule relay-only",
        "`false`: `max_connections` makes the tcp rule relay-only, and the relay cannot keep the client's address",
    );
}

/// The PROXY protocol fields of a route, each with its value where valid.
struct ProxyFields<'a> {
    ours: Option<(&'a Node, ProxyProtocol)>,
    godoxy: Option<(&'a Node, bool)>,
    accept: Option<(&'a Node, &'a Vec<Cidr>)>,
}

/// What PROXY protocol cannot go with: another way of asking for the same
/// header, UDP for accepting headers, and the kernel path, which can
/// neither insert nor read one.
fn proxy_protocol_together(
    cx: &mut Ctx<'_>,
    proxy: ProxyFields<'_>,
    protocols: Option<&[Protocol]>,
    path: Option<(&Node, PathMode)>,
    preserve: Option<(&Node, bool)>,
) {
    if let (Some((ours, _)), Some((g, true))) = (proxy.ours, proxy.godoxy) {
        cx.error(
            "relay_proxy_protocol_header",
            ConfigError::new(
                &g.pos,
                "`true` together with `proxy_protocol`",
                "one of them: Godoxy's `relay_proxy_protocol_header: true` is `proxy_protocol: v2` on tcp",
            )
            .hint(format!("`proxy_protocol` is at {}", ours.pos)),
        );
    }
    let udp = protocols.is_some_and(|p| p.contains(&Protocol::Udp));
    if let (Some((g, true)), Some([Protocol::Udp])) = (proxy.godoxy, protocols) {
        cx.error(
            "relay_proxy_protocol_header",
            ConfigError::new(
                &g.pos,
                "`true` on a udp route",
                "`false`: Godoxy sends this header on tcp only; for a header on every datagram, `proxy_protocol: v2`",
            ),
        );
    }
    if let (Some((a, cidrs)), true) = (proxy.accept, udp)
        && !cidrs.is_empty()
    {
        cx.error(
            "accept_proxy_protocol",
            ConfigError::new(
                &a.pos,
                "`accept_proxy_protocol` on a udp route",
                "tcp routes only: forwarder reads PROXY headers on TCP connections (put the udp side in a route of its own)",
            ),
        );
    }
    // Which field asks for the relay, as the errors name it.
    let sends = match (proxy.ours, proxy.godoxy) {
        (Some((n, v)), _) if v != ProxyProtocol::Off => {
            Some((n, format!("`proxy_protocol: {}`", v.as_str())))
        }
        (_, Some((n, true))) => Some((n, "`relay_proxy_protocol_header: true`".to_owned())),
        _ => None,
    };
    let accepts = proxy
        .accept
        .filter(|(_, c)| !c.is_empty())
        .map(|(n, _)| (n, "`accept_proxy_protocol`".to_owned()));
    let Some((asker, what)) = sends.or(accepts) else {
        return;
    };
    relay_only_conflicts(
        cx,
        (asker, &what),
        path,
        preserve,
        "`auto` or `relay`: only the relay sends and reads PROXY protocol headers",
        "`false`: PROXY protocol rules go through the relay, which cannot keep the client's address (the header carries it)",
    );
}

/// A field (`asker`, named `what`) that makes a rule relay-only, against
/// a path that requires the kernel and `preserve_client_ip`, which needs
/// it; `*_allowed` say what may be written instead.
fn relay_only_conflicts(
    cx: &mut Ctx<'_>,
    (asker, what): (&Node, &str),
    path: Option<(&Node, PathMode)>,
    preserve: Option<(&Node, bool)>,
    path_allowed: &str,
    preserve_allowed: &str,
) {
    if let Some((p, mode)) = path
        && mode.requires_kernel()
    {
        cx.error(
            "path",
            ConfigError::new(
                &p.pos,
                format!("`path: {}` with {what}", mode.as_str()),
                path_allowed,
            )
            .hint(format!("{what} is at {}", asker.pos)),
        );
    }
    if let Some((p, true)) = preserve {
        cx.error(
            "preserve_client_ip",
            ConfigError::new(&p.pos, format!("`true` with {what}"), preserve_allowed)
                .hint(format!("{what} is at {}", asker.pos)),
        );
    }
}

/// Why a route is one of Godoxy's web routes, which forwarder skips
/// without looking at its other fields: an http-like `scheme`, or no
/// scheme and no listen port (Godoxy then takes it for http).
fn web_route(entries: &[(Node, Node)], alias_pos: &Pos) -> Option<(Pos, String)> {
    let field = |name: &str| entries.iter().find(|(k, _)| k.key_text() == name);
    match field("scheme") {
        Some((_, node)) => match parse_scheme(node) {
            Ok(Scheme::Http(s)) => Some((
                node.pos.clone(),
                format!(
                    "scheme `{s}` is Godoxy's web proxy; forwarder carries tcp and udp only, so the route is skipped"
                ),
            )),
            _ => None,
        },
        None => {
            let listen = match field("port") {
                None => Some(0),
                // Only the listen port matters here: any name will do.
                Some((_, p)) => values::port(p, true, &|_| Ok(1))
                    .ok()
                    .map(|spec| spec.listen),
            };
            (listen == Some(0)).then(|| {
                (
                    alias_pos.clone(),
                    "no `scheme` and no listen port: Godoxy takes this for an http route; skipped (set `scheme: tcp` or `udp`)"
                        .into(),
                )
            })
        }
    }
}

enum Scheme {
    Stream(Vec<Protocol>),
    Http(String),
}

/// `tcp`, `udp`, `tcp,udp`, `udp,tcp` (or a list); Godoxy's web schemes
/// are reported so that the route can be skipped.
fn parse_scheme(node: &Node) -> Result<Scheme, ConfigError> {
    let items = values::list(node, true, SCHEME_ALLOWED)?;
    if items.is_empty() {
        return Err(ConfigError::new(&node.pos, node.describe(), SCHEME_ALLOWED));
    }
    let mut protocols = Vec::new();
    for item in &items {
        let name = item.as_str().unwrap_or("").to_ascii_lowercase();
        let p = match name.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            s if HTTP_SCHEMES.contains(&s) && items.len() == 1 => return Ok(Scheme::Http(name)),
            s => {
                let hint = closest(s, &["tcp", "udp"]).map(|c| format!("did you mean `{c}`?"));
                let found = if items.len() == 1 {
                    quoted(s)
                } else {
                    format!("{} in {}", quoted(s), node.describe())
                };
                return Err(ConfigError::new(&item.pos, found, SCHEME_ALLOWED).maybe_hint(hint));
            }
        };
        if protocols.contains(&p) {
            return Err(ConfigError::new(
                &item.pos,
                format!("{} twice in {}", quoted(p.as_str()), node.describe()),
                SCHEME_ALLOWED,
            ));
        }
        protocols.push(p);
    }
    Ok(Scheme::Stream(protocols))
}

/// `backends:` a list of `host:port [weight=N]` or {host, port, weight}.
fn parse_backends(
    cx: &mut Ctx<'_>,
    node: &Node,
    default_port: Option<u16>,
) -> Option<Vec<TargetSpec>> {
    let items: Vec<Node> = match &node.value {
        Value::Seq(items) => items
            .iter()
            .flat_map(|i| match i.as_str() {
                Some(s) => values::split(i, s, false),
                None => vec![i.clone()],
            })
            .collect(),
        Value::Str(s) => values::split(node, s, false),
        _ => {
            cx.error(
                "backends",
                ConfigError::new(
                    &node.pos,
                    node.describe(),
                    format!("a list of {BACKEND_ALLOWED}"),
                ),
            );
            return None;
        }
    };
    if items.is_empty() {
        cx.error(
            "backends",
            ConfigError::new(
                &node.pos,
                "an empty list",
                format!("1 to {MAX_BACKENDS_PER_RULE} backends"),
            ),
        );
        return None;
    }
    if items.len() > MAX_BACKENDS_PER_RULE as usize {
        cx.error(
            "backends",
            ConfigError::new(
                &node.pos,
                format!("{} backends", items.len()),
                format!("at most {MAX_BACKENDS_PER_RULE} backends per route"),
            ),
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for item in &items {
        match parse_backend(cx, item, default_port) {
            Some(t) => out.push(t),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn parse_backend(cx: &mut Ctx<'_>, item: &Node, default_port: Option<u16>) -> Option<TargetSpec> {
    let no_port = |cx: &mut Ctx<'_>, found: String| {
        cx.error(
            "backends",
            ConfigError::new(&item.pos, found, BACKEND_ALLOWED)
                .hint("give each backend a port, or a target port in `port: listen:target`"),
        );
    };
    match &item.value {
        Value::Str(s) => {
            let mut words = s.split_whitespace();
            let addr = words.next().unwrap_or("");
            let mut weight = 1;
            for w in words {
                match w.strip_prefix("weight=").map(str::parse::<u16>) {
                    Some(Ok(n)) if n > 0 => weight = n,
                    _ => {
                        cx.error(
                            "backends",
                            ConfigError::new(&item.pos, quoted(s), BACKEND_ALLOWED),
                        );
                        return None;
                    }
                }
            }
            let Some((host, port)) = split_host_port(addr) else {
                cx.error(
                    "backends",
                    ConfigError::new(&item.pos, quoted(s), BACKEND_ALLOWED),
                );
                return None;
            };
            let Some(host) = values::parse_host(host) else {
                cx.error(
                    "backends",
                    ConfigError::new(
                        &item.pos,
                        format!("{} (bad host)", quoted(s)),
                        BACKEND_ALLOWED,
                    ),
                );
                return None;
            };
            let port = match port {
                Some(p) => match p.parse::<u16>() {
                    Ok(p) if p > 0 => p,
                    _ => {
                        cx.error(
                            "backends",
                            ConfigError::new(
                                &item.pos,
                                format!("{} (bad port)", quoted(s)),
                                BACKEND_ALLOWED,
                            ),
                        );
                        return None;
                    }
                },
                None => match default_port {
                    Some(p) => p,
                    None => {
                        no_port(cx, format!("{} without a port", quoted(s)));
                        return None;
                    }
                },
            };
            Some(TargetSpec {
                host,
                port,
                weight,
                pos: item.pos.clone(),
                field: "backends",
            })
        }
        Value::Map(entries) => {
            let (mut host, mut port, mut weight) = (None, default_port, 1u16);
            let mut ok = true;
            for (k, v) in entries {
                match k.key_text() {
                    "host" => {
                        host = cx.take("backends.host", values::host(v)).or_else(|| {
                            ok = false;
                            None
                        })
                    }
                    "port" => match cx.take("backends.port", values::integer(v, 1, 65535)) {
                        Some(p) => port = Some(p as u16),
                        None => ok = false,
                    },
                    "weight" => match cx.take("backends.weight", values::integer(v, 1, 65535)) {
                        Some(w) => weight = w as u16,
                        None => ok = false,
                    },
                    _ => {
                        cx.unknown("backends", k, &["host", "port", "weight"], &[]);
                        ok = false;
                    }
                }
            }
            if !ok {
                return None;
            }
            let Some(host) = host else {
                cx.error(
                    "backends",
                    ConfigError::new(&item.pos, "a backend without `host`", BACKEND_ALLOWED),
                );
                return None;
            };
            let Some(port) = port else {
                no_port(cx, "a backend without `port`".into());
                return None;
            };
            Some(TargetSpec {
                host,
                port,
                weight,
                pos: item.pos.clone(),
                field: "backends",
            })
        }
        _ => {
            cx.error(
                "backends",
                ConfigError::new(&item.pos, item.describe(), BACKEND_ALLOWED),
            );
            None
        }
    }
}

/// `host:port`, `[v6]:port`, `host`, `[v6]` or a bare IPv6 address.
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        return match after {
            "" => Some((v6, None)),
            a => Some((v6, Some(a.strip_prefix(':')?))),
        };
    }
    // No colon is a host alone; two or more, a bare IPv6 address.
    match s.matches(':').count() {
        1 => s.split_once(':').map(|(h, p)| (h, Some(p))),
        _ => Some((s, None)),
    }
}

/// `timeouts: {udp_idle, udp_unreplied, tcp_established, tcp_half_closed,
/// tcp_close, connect}` over `base`.
pub(crate) fn parse_timeouts(
    node: &Node,
    base: Timeouts,
    error: &mut dyn FnMut(&str, ConfigError),
) -> Option<Timeouts> {
    let map = match values::mapping(
        node,
        "a mapping of udp_idle, udp_unreplied, tcp_established, tcp_half_closed, tcp_close, connect",
    ) {
        Ok(m) => m.into_owned(),
        Err(es) => {
            es.into_iter().for_each(|e| error("timeouts", e));
            return None;
        }
    };
    let mut t = base;
    let mut ok = true;
    for (k, v) in map.entries().unwrap_or_default() {
        let name = k.key_text();
        let field = format!("timeouts.{name}");
        let slot = match name {
            "udp_idle" => &mut t.udp_idle,
            "udp_unreplied" => &mut t.udp_unreplied,
            "tcp_established" => &mut t.tcp_established,
            "tcp_half_closed" => &mut t.tcp_half_closed,
            "tcp_close" => &mut t.tcp_close,
            "connect" => &mut t.connect,
            _ => {
                let list: Vec<String> = TIMEOUT_FIELDS.iter().map(|k| format!("`{k}`")).collect();
                error(
                    &field,
                    ConfigError::new(
                        &k.pos,
                        format!("unknown field {}", quoted(name)),
                        list.join(", "),
                    )
                    .maybe_hint(
                        closest(name, TIMEOUT_FIELDS).map(|c| format!("did you mean `{c}`?")),
                    ),
                );
                ok = false;
                continue;
            }
        };
        match values::duration(v, false) {
            Ok(d) => *slot = d,
            Err(e) => {
                error(&field, e);
                ok = false;
            }
        }
    }
    ok.then_some(t)
}

fn parse_healthcheck(
    cx: &mut Ctx<'_>,
    node: &Node,
    protocols: Option<&[Protocol]>,
) -> Option<HealthCheck> {
    let map = match values::mapping(
        node,
        "a mapping of disabled, interval, timeout, fall (or retries), rise, payload, expect",
    ) {
        Ok(m) => m.into_owned(),
        Err(es) => {
            cx.errors("healthcheck", es);
            return None;
        }
    };
    let mut h = HealthCheck::default();
    let mut ok = true;
    let mut timeout_pos = None;
    let mut fall_key: Option<&'static str> = None;
    let mut expect_pos = None;
    for (k, v) in map.entries().unwrap_or_default() {
        let name = k.key_text();
        let field = format!("healthcheck.{name}");
        let r = match name {
            // Godoxy spells it `disable` and takes `disabled` too.
            "disable" | "disabled" => values::boolean(v).map(|b| h.disabled = b),
            "interval" => values::duration(v, false).map(|d| h.interval = d),
            "timeout" => {
                timeout_pos = Some(v.pos.clone());
                values::duration(v, false).map(|d| h.timeout = d)
            }
            "fall" | "retries" if fall_key.is_some() => Err(ConfigError::new(
                &k.pos,
                format!("both `{}` and `{name}`", fall_key.unwrap_or_default()),
                "one of them: `retries` is Godoxy's name for `fall`",
            )),
            "fall" => {
                fall_key = Some("fall");
                values::integer(v, 1, 1000).map(|n| h.fall = n as u32)
            }
            // Godoxy's failure threshold: below 1 (`0`, `-1`) is at once.
            "retries" => {
                fall_key = Some("retries");
                if v.as_str().map(str::trim) == Some("-1") {
                    h.fall = 1;
                    Ok(())
                } else {
                    values::integer(v, 0, 1000)
                        .map(|n| h.fall = (n as u32).max(1))
                        .map_err(|e| ConfigError {
                            allowed: "-1 or 0 (out at the first failure), or 1 to 1000".into(),
                            ..e
                        })
                }
            }
            "rise" => values::integer(v, 1, 1000).map(|n| h.rise = n as u32),
            "payload" => probe_bytes(v).map(|b| h.payload = Some(b)),
            "expect" => {
                expect_pos = Some(v.pos.clone());
                probe_bytes(v).map(|b| h.expect = Some(b))
            }
            n if HEALTHCHECK_IGNORED.contains(&n) => {
                cx.warn(
                    &k.pos,
                    &field,
                    "an HTTP-only Godoxy health check setting; ignored".into(),
                );
                Ok(())
            }
            _ => {
                cx.unknown("healthcheck", k, HEALTHCHECK_FIELDS, HEALTHCHECK_IGNORED);
                ok = false;
                Ok(())
            }
        };
        if let Err(e) = r {
            cx.error(&field, e);
            ok = false;
        }
    }
    if timeout_pos.is_none() {
        // Left out, the timeout follows a short interval down.
        h.timeout = h.timeout.min(h.interval);
    }
    if ok && h.timeout > h.interval {
        cx.error(
            "healthcheck.timeout",
            ConfigError::new(
                timeout_pos.as_ref().unwrap_or(&node.pos),
                format!(
                    "{} (longer than the interval {})",
                    quoted(&values::format_duration(h.timeout)),
                    values::format_duration(h.interval)
                ),
                "a timeout no longer than `interval`",
            ),
        );
        ok = false;
    }
    if ok && h.expect.is_some() && h.payload.is_none() {
        cx.error(
            "healthcheck.expect",
            ConfigError::new(
                expect_pos.as_ref().unwrap_or(&node.pos),
                "`expect` without `payload`",
                "a `payload` to send: `expect` checks the reply to it",
            ),
        );
        ok = false;
    }
    if ok && h.payload.is_some() && protocols.is_some_and(|p| !p.contains(&Protocol::Udp)) {
        cx.error(
            "healthcheck.payload",
            ConfigError::new(
                &node.pos,
                "`payload` on a route without udp",
                "no `payload` or `expect`: a tcp check is a connect",
            ),
        );
        ok = false;
    }
    // A UDP "probe" that sends nothing cannot tell a dead backend from a
    // live one: nothing answers an empty socket either way.
    if ok
        && !h.disabled
        && h.payload.is_none()
        && protocols.is_some_and(|p| p.contains(&Protocol::Udp))
    {
        cx.error(
            "healthcheck",
            ConfigError::new(
                &node.pos,
                "a udp health check without `payload`",
                "a `payload` the backend answers (and, optionally, `expect`: the start of \
                 the reply), or `disabled: true`; without one no udp check can tell a dead \
                 backend from a live one",
            ),
        );
        ok = false;
    }
    ok.then_some(h)
}

/// A list of CIDRs (one, or a list); `None` when any is wrong (errors recorded).
fn parse_cidrs(cx: &mut Ctx<'_>, field: &str, node: &Node) -> Option<Vec<Cidr>> {
    let items = cx.take(field, values::list(node, true, "a list of CIDRs"))?;
    let cidrs: Vec<Option<Cidr>> = items
        .iter()
        .map(|item| cx.take(field, values::cidr(item)))
        .collect();
    cidrs.into_iter().collect()
}

/// A probe's bytes: a text, or `hex:` and pairs of hex digits.
fn probe_bytes(node: &Node) -> Result<Vec<u8>, ConfigError> {
    const ALLOWED: &str = "a text, or `hex:` and an even number of hex digits (`hex:0a1b`)";
    let text = values::text(node, ALLOWED)?;
    let bytes = match text.strip_prefix("hex:") {
        Some(hex) => {
            let hex: String = hex.chars().filter(|c| !c.is_whitespace()).collect();
            (hex.len().is_multiple_of(2) && hex.is_ascii())
                .then(|| {
                    (0..hex.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
                        .collect::<Option<Vec<u8>>>()
                })
                .flatten()
        }
        None => Some(text.as_bytes().to_vec()),
    };
    match bytes {
        Some(b) if !b.is_empty() => Ok(b),
        _ => Err(ConfigError::new(&node.pos, node.describe(), ALLOWED)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_bytes_known_answers() {
        let pos = Pos::new(&std::sync::Arc::from("t.yaml"), 1, 1);
        let bytes = |text: &str| probe_bytes(&Node::str(pos.clone(), text)).ok();
        assert_eq!(bytes("ping"), Some(b"ping".to_vec()));
        assert_eq!(bytes("hex:00 0a FF"), Some(vec![0, 10, 255]));
        // Nothing to send, an odd digit, and digits that are not ASCII.
        for wrong in ["", "hex:", "hex: ", "hex:0a1", "hex:0\u{e9}a", "hex:zz"] {
            assert_eq!(bytes(wrong), None, "{wrong:?}");
        }
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("a:1"), Some(("a", Some("1"))));
        assert_eq!(split_host_port("a"), Some(("a", None)));
        assert_eq!(split_host_port("[::1]:80"), Some(("::1", Some("80"))));
        assert_eq!(split_host_port("[::1]"), Some(("::1", None)));
        assert_eq!(split_host_port("2001:db8::1"), Some(("2001:db8::1", None)));
        assert_eq!(split_host_port("[::1]x"), None);
    }
}
