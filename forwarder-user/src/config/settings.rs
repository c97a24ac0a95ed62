//! The daemon-wide sections: `interfaces`, `relay`, `kernel`, `dns`,
//! `timeouts`, `docker`, `acl`, `metrics`.
//! Each is optional; what is left out keeps the defaults of `rules.rs`.

use super::acl::{self, Acl};
use super::docker::{self, DockerSettings};
use super::errors::{ConfigError, Diag, Pos, closest, quoted};
use super::fields::parse_timeouts;
use super::source::RawFile;
use super::values;
use super::yaml::Node;
use crate::rules::{DnsSettings, KernelSettings, MetricsSettings, RelaySettings, Timeouts};

const RELAY_FIELDS: &[&str] = &[
    "max_udp_sessions",
    "drain_timeout",
    "first_byte_timeout",
    "pipe_size",
];
/// Below 64 KiB splice moves too little per call (the relay would copy
/// through a buffer instead); above 1 MiB is `fs.pipe-max-size`.
pub const PIPE_SIZE_MIN: usize = 64 << 10;
pub const PIPE_SIZE_MAX: usize = 1 << 20;
const FIRST_BYTE_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const FIRST_BYTE_MAX: std::time::Duration = std::time::Duration::from_secs(7200);
const KERNEL_FIELDS: &[&str] = &["conntrack_size", "snat_ports", "snat_addresses"];
const DNS_FIELDS: &[&str] = &["refresh", "min_ttl", "max_ttl"];
const METRICS_FIELDS: &[&str] = &["listen"];
const METRICS_LISTEN_ALLOWED: &str =
    "an address and port to serve GET /metrics on (e.g. `127.0.0.1:9531`, `[::1]:9531`)";
const SNAT_ALLOWED: &str = "`min-max` within 1024–65535, min ≤ max (e.g. `40000-59999`)";
/// How often names may be resolved again (each of `dns`' durations): not
/// a load on the resolver, not so rarely that a moved backend waits long.
const DNS_REFRESH_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const DNS_REFRESH_MAX: std::time::Duration = std::time::Duration::from_secs(3600);
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

#[derive(Debug, Default)]
pub(crate) struct Globals {
    pub interfaces: Option<Vec<String>>,
    pub relay: RelaySettings,
    pub kernel: KernelSettings,
    pub dns: DnsSettings,
    /// The defaults for every route's `timeouts`.
    pub timeouts: Timeouts,
    /// Where `kernel.snat_ports` is written, if it is.
    pub snat_pos: Option<Pos>,
    /// Docker discovery; off when `None`.
    pub docker: Option<DockerSettings>,
    /// Combined with every route's own `acl`.
    pub acl: Acl,
    /// The Prometheus endpoint; off when `None`.
    pub metrics: Option<MetricsSettings>,
}

pub(crate) fn globals(raw: &RawFile, diag: &mut Diag) -> Globals {
    let mut g = Globals::default();
    if let Some(node) = &raw.interfaces {
        g.interfaces = interfaces(node, diag);
    }
    if let Some(node) = &raw.docker {
        g.docker = docker::settings(node, diag);
    }
    if let Some(node) = &raw.metrics {
        g.metrics = metrics(node, diag);
    }
    if let Some(node) = &raw.relay {
        for (k, v) in section(node, "relay", RELAY_FIELDS, diag) {
            let field = format!("relay.{}", k.key_text());
            let r = match k.key_text() {
                "max_udp_sessions" => values::integer(&v, 1, 16_777_216)
                    .map(|n| g.relay.max_udp_sessions = n as usize),
                "first_byte_timeout" => values::duration(&v, false).and_then(|d| {
                    if (FIRST_BYTE_MIN..=FIRST_BYTE_MAX).contains(&d) {
                        g.relay.first_byte_timeout = d;
                        Ok(())
                    } else {
                        Err(ConfigError::new(
                            &v.pos,
                            quoted(&values::format_duration(d)),
                            "from 1s to 2h (e.g. `30s`)",
                        ))
                    }
                }),
                "pipe_size" => values::pipe_bytes(&v, PIPE_SIZE_MIN, PIPE_SIZE_MAX)
                    .map(|n| g.relay.pipe_size = n),
                _ => values::duration(&v, true).map(|d| g.relay.drain_timeout = d),
            };
            if let Err(e) = r {
                diag.error(e.field(field));
            }
        }
    }
    if let Some(node) = &raw.dns {
        dns(node, &mut g.dns, diag);
    }
    if let Some(node) = &raw.kernel {
        for (k, v) in section(node, "kernel", KERNEL_FIELDS, diag) {
            let field = format!("kernel.{}", k.key_text());
            let r = match k.key_text() {
                "conntrack_size" => {
                    values::integer(&v, 2, 16_777_216).map(|n| g.kernel.conntrack_size = n as u32)
                }
                "snat_addresses" => {
                    match super::snat::parse(&v) {
                        Ok(addrs) => g.kernel.snat_addresses = addrs,
                        Err(errors) => {
                            for e in errors {
                                diag.error(e.field(field.clone()));
                            }
                        }
                    }
                    Ok(())
                }
                _ => snat_ports(&v).map(|r| {
                    g.kernel.snat_ports = r;
                    g.snat_pos = Some(v.pos.clone());
                }),
            };
            if let Err(e) = r {
                diag.error(e.field(field));
            }
        }
    }
    if let Some(node) = &raw.timeouts
        && let Some(t) = parse_timeouts(node, Timeouts::default(), &mut |f, e| {
            diag.error(e.field(f))
        })
    {
        g.timeouts = t;
    }
    if let Some(node) = &raw.acl
        && let Some(a) = acl::parse(node, &mut |f, e| diag.error(e.field(f)))
    {
        g.acl = a;
    }
    g
}

/// `dns`: each duration within bounds, and `min_ttl` at most `max_ttl`.
fn dns(node: &Node, dns: &mut DnsSettings, diag: &mut Diag) {
    let mut written = Vec::new();
    let mut bounds_valid = true;
    for (k, v) in section(node, "dns", DNS_FIELDS, diag) {
        let field = k.key_text();
        let r = values::duration(&v, false).and_then(|d| {
            if (DNS_REFRESH_MIN..=DNS_REFRESH_MAX).contains(&d) {
                Ok(d)
            } else {
                Err(ConfigError::new(
                    &v.pos,
                    format!("{d:?}"),
                    "from 1s to 1h (e.g. `30s`)",
                ))
            }
        });
        match (field, r) {
            ("refresh", Ok(d)) => dns.refresh = d,
            ("min_ttl", Ok(d)) => dns.min_ttl = d,
            (_, Ok(d)) => dns.max_ttl = d,
            (_, Err(e)) => {
                bounds_valid &= field == "refresh";
                diag.error(e.field(format!("dns.{field}")));
                continue;
            }
        }
        written.push((field.to_owned(), v.pos.clone()));
    }
    if bounds_valid && dns.min_ttl > dns.max_ttl {
        // Said at min_ttl if it is written, else at max_ttl (below the default).
        let (field, pos) = (written.iter().find(|(f, _)| f == "min_ttl"))
            .or_else(|| written.iter().find(|(f, _)| f == "max_ttl"))
            .expect("the defaults are in order, so one bound is written");
        diag.error(
            ConfigError::new(
                pos,
                format!(
                    "min_ttl {} above max_ttl {}",
                    values::format_duration(dns.min_ttl),
                    values::format_duration(dns.max_ttl)
                ),
                "min_ttl at most max_ttl (by default 5s and 5m)",
            )
            .field(format!("dns.{field}")),
        );
    }
}

/// The known fields of a section; unknown ones are reported.
fn section(node: &Node, name: &str, known: &[&str], diag: &mut Diag) -> Vec<(Node, Node)> {
    let allowed = format!("a mapping of {}", known.join(", "));
    let map = match values::mapping(node, &allowed) {
        Ok(m) => m.into_owned(),
        Err(es) => {
            es.into_iter().for_each(|e| diag.error(e.field(name)));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (k, v) in map.entries().unwrap_or_default() {
        if known.contains(&k.key_text()) {
            out.push((k.clone(), v.clone()));
        } else {
            let list: Vec<String> = known.iter().map(|f| format!("`{f}`")).collect();
            diag.error(
                ConfigError::new(
                    &k.pos,
                    format!("unknown field {}", quoted(k.key_text())),
                    list.join(", "),
                )
                .field(format!("{name}.{}", k.key_text()))
                .maybe_hint(closest(k.key_text(), known).map(|c| format!("did you mean `{c}`?"))),
            );
        }
    }
    out
}

/// `metrics: {listen: ADDR:PORT}`: the listen address is required.
fn metrics(node: &Node, diag: &mut Diag) -> Option<MetricsSettings> {
    if node.entries().is_none() {
        diag.error(
            ConfigError::new(
                &node.pos,
                node.describe(),
                "a mapping with `listen` (e.g. `metrics: {listen: 127.0.0.1:9531}`)",
            )
            .field("metrics"),
        );
        return None;
    }
    let fields = section(node, "metrics", METRICS_FIELDS, diag);
    let Some((_, v)) = fields.into_iter().next() else {
        diag.error(
            ConfigError::new(&node.pos, "no `listen`", METRICS_LISTEN_ALLOWED)
                .field("metrics")
                .hint("leave `metrics:` out to serve no metrics"),
        );
        return None;
    };
    let text = match values::text(&v, METRICS_LISTEN_ALLOWED) {
        Ok(t) => t.trim().to_owned(),
        Err(e) => {
            diag.error(e.field("metrics.listen"));
            return None;
        }
    };
    match text.parse::<std::net::SocketAddr>() {
        Ok(listen) if listen.port() != 0 => {
            if !listen.ip().is_loopback() {
                diag.warn(
                    &v.pos,
                    None,
                    Some("metrics.listen"),
                    format!(
                        "{listen} is not a loopback address: every host that reaches it can \
                         read the rules' aliases and counters"
                    ),
                );
            }
            Some(MetricsSettings { listen })
        }
        _ => {
            diag.error(
                ConfigError::new(&v.pos, quoted(&text), METRICS_LISTEN_ALLOWED)
                    .field("metrics.listen"),
            );
            None
        }
    }
}

fn snat_ports(node: &Node) -> Result<(u16, u16), ConfigError> {
    let t = values::text(node, SNAT_ALLOWED)?.trim();
    let bad = || ConfigError::new(&node.pos, quoted(t), SNAT_ALLOWED);
    let (lo, hi) = t.split_once('-').ok_or_else(bad)?;
    let lo: u32 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u32 = hi.trim().parse().map_err(|_| bad())?;
    if !(1024..=65535).contains(&lo) || !(1024..=65535).contains(&hi) || lo > hi {
        return Err(bad());
    }
    Ok((lo as u16, hi as u16))
}

fn interfaces(node: &Node, diag: &mut Diag) -> Option<Vec<String>> {
    let items = match values::list(node, true, "a list of interface names") {
        Ok(items) => items,
        Err(e) => {
            diag.error(e.field("interfaces"));
            return None;
        }
    };
    if items.is_empty() {
        diag.error(
            ConfigError::new(
                &node.pos,
                "an empty list",
                "interface names; leave `interfaces` out to attach to every interface",
            )
            .field("interfaces"),
        );
        return None;
    }
    let mut names: Vec<String> = Vec::new();
    for item in items {
        let name = item.as_str().unwrap_or("");
        let valid = !name.is_empty()
            && name.len() <= IFNAME_MAX
            && name != "."
            && name != ".."
            && !name.contains(['/', ':'])
            && !name.chars().any(|c| c.is_whitespace() || c.is_control());
        if !valid {
            diag.error(
                ConfigError::new(
                    &item.pos,
                    quoted(name),
                    format!("an interface name of 1–{IFNAME_MAX} bytes without `/`, `:` or blanks"),
                )
                .field("interfaces"),
            );
        } else if names.iter().any(|n| n == name) {
            diag.error(
                ConfigError::new(
                    &item.pos,
                    format!("{} twice", quoted(name)),
                    "each interface once",
                )
                .field("interfaces"),
            );
        } else {
            names.push(name.to_owned());
        }
    }
    Some(names)
}
