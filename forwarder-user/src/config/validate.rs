//! Checks across routes: aliases named twice, two rules claiming the same
//! (bind, port, protocol), the rule limit of the kernel tables, listen ports
//! inside the SNAT range, and targets a path cannot reach.

use std::collections::HashMap;
use std::net::IpAddr;

use forwarder_common::{MAX_ACL_ENTRIES, MAX_RULES};

use super::errors::{ConfigError, Diag, Pos, quoted};
use super::fields::RouteSpec;
use super::settings::Globals;
use super::source::RawRoute;
use crate::rules::{BackendSpec, PathMode};

/// The routes with their alias named once; a second route of the same
/// alias is an error naming the first.
pub(crate) fn unique_aliases(routes: Vec<RawRoute>, diag: &mut Diag) -> Vec<RawRoute> {
    let mut seen: HashMap<String, Pos> = HashMap::new();
    routes
        .into_iter()
        .filter(|r| match seen.get(&r.alias) {
            Some(first) => {
                diag.error(
                    ConfigError::new(
                        &r.pos,
                        format!("alias {} a second time", quoted(&r.alias)),
                        "each alias once across routes, labels and included files",
                    )
                    .alias(Some(&r.alias))
                    .hint(format!("first at {first}")),
                );
                false
            }
            None => {
                seen.insert(r.alias.clone(), r.pos.clone());
                true
            }
        })
        .collect()
}

/// What a bind address covers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cover {
    /// `[::]`: every address, IPv4 and IPv6.
    Dual,
    /// `0.0.0.0`: every IPv4 address.
    AnyV4,
    One(IpAddr),
}

fn cover(bind: Option<IpAddr>) -> Cover {
    match bind.map(|b| b.to_canonical()) {
        None => Cover::Dual,
        Some(ip) if ip.is_unspecified() && ip.is_ipv6() => Cover::Dual,
        Some(ip) if ip.is_unspecified() => Cover::AnyV4,
        Some(ip) => Cover::One(ip),
    }
}

fn overlap(a: Cover, b: Cover) -> bool {
    match (a, b) {
        (Cover::Dual, _) | (_, Cover::Dual) => true,
        (Cover::AnyV4, Cover::AnyV4) => true,
        (Cover::AnyV4, Cover::One(ip)) | (Cover::One(ip), Cover::AnyV4) => ip.is_ipv4(),
        (Cover::One(x), Cover::One(y)) => x == y,
    }
}

pub(crate) fn bind_text(bind: Option<IpAddr>, port: u16) -> String {
    match bind {
        None => format!("[::]:{port}"),
        Some(ip @ IpAddr::V4(_)) => format!("{ip}:{port}"),
        Some(ip @ IpAddr::V6(_)) => format!("[{ip}]:{port}"),
    }
}

/// `bind_text` of a route's listen port, or of its range (`[::]:5000-5099`).
fn listen_text(spec: &RouteSpec) -> String {
    let text = bind_text(spec.bind, spec.listen);
    if spec.ports.is_range() {
        format!("{text}-{}", spec.ports.last(spec.listen))
    } else {
        text
    }
}

/// The listen ports of a route, inclusive; `None` for a port picked at start.
fn listen_span(spec: &RouteSpec) -> Option<(u16, u16)> {
    (spec.listen != 0).then(|| (spec.listen, spec.ports.last(spec.listen)))
}

/// `targets[i]` are the resolved targets of `specs[i]` (`None`: unresolved).
pub(crate) fn routes(
    specs: &[RouteSpec],
    targets: &[Option<Vec<BackendSpec>>],
    globals: &Globals,
    diag: &mut Diag,
) {
    rule_limit(specs, diag);
    acl_limit(specs, globals, diag);
    conflicts(specs, diag);
    let (lo, hi) = globals.kernel.snat_ports;
    for (spec, targets) in specs.iter().zip(targets) {
        if let Some((first, last)) = listen_span(spec)
            && first <= hi
            && lo <= last
        {
            let whose = match &globals.snat_pos {
                Some(p) => format!("`kernel.snat_ports` at {p} is {lo}-{hi}"),
                None => format!("`kernel.snat_ports` is {lo}-{hi} by default"),
            };
            let found = if spec.ports.is_range() {
                format!("listen range {first}-{last} overlaps the SNAT range")
            } else {
                format!("listen port {first} inside the SNAT range")
            };
            diag.error(
                ConfigError::new(&spec.port_pos, found, "a listen port outside `kernel.snat_ports` (the kernel path uses those as source ports)")
                    .alias(Some(&spec.alias))
                    .field("port")
                    .hint(whose),
            );
        }
        if spec.preserve_client_ip && spec.path == PathMode::Relay {
            diag.error(
                ConfigError::new(
                    &spec.preserve_pos,
                    "`true` with `path: relay`",
                    "`false`, or a kernel path: the relay connects from this host's address \
                     and cannot keep the client's",
                )
                .alias(Some(&spec.alias))
                .field("preserve_client_ip"),
            );
        }
        let Some(targets) = targets else { continue };
        let loopback = targets.iter().find(|b| is_loopback(b.addr.ip()));
        if let Some(b) = loopback {
            if spec.path.requires_kernel() {
                diag.error(
                    ConfigError::new(
                        &spec.path_pos,
                        format!(
                            "`{}` with the loopback target {}",
                            spec.path.as_str(),
                            b.addr
                        ),
                        "`auto` or `relay`: only the relay reaches loopback targets",
                    )
                    .alias(Some(&spec.alias))
                    .field("path"),
                );
            }
            if spec.preserve_client_ip {
                diag.error(
                    ConfigError::new(&spec.preserve_pos, format!("`true` with the loopback target {}", b.addr), "`false`: loopback targets go through the relay, which cannot keep the client's address")
                        .alias(Some(&spec.alias))
                        .field("preserve_client_ip"),
                );
            }
        }
    }
}

pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

fn rule_limit(specs: &[RouteSpec], diag: &mut Diag) {
    let mut count: u64 = 0;
    for spec in specs {
        count += spec.protocols.len() as u64;
        if count > u64::from(MAX_RULES) {
            diag.error(
                ConfigError::new(
                    &spec.alias_pos,
                    format!("rule number {count} (one rule per alias and protocol)"),
                    format!("at most {MAX_RULES} rules, the size of the kernel tables"),
                )
                .alias(Some(&spec.alias)),
            );
            return;
        }
    }
}

/// The kernel's ACL trie holds every rule's entries, the global ones
/// copied into each, and room for a reload to hold both versions of a rule.
fn acl_limit(specs: &[RouteSpec], globals: &Globals, diag: &mut Diag) {
    let limit = u64::from(MAX_ACL_ENTRIES / 2);
    let global = (globals.acl.allow.len() + globals.acl.deny.len()) as u64;
    let mut count: u64 = 0;
    for spec in specs {
        let own = (spec.acl.allow.len() + spec.acl.deny.len()) as u64;
        count += (own + global) * spec.protocols.len() as u64;
        if count > limit {
            diag.error(
                ConfigError::new(
                    &spec.alias_pos,
                    format!("ACL entry number {count} (each rule's own and the global ones)"),
                    format!("at most {limit} ACL entries over all rules; use wider networks"),
                )
                .alias(Some(&spec.alias))
                .field("acl"),
            );
            return;
        }
    }
}

/// Two rules on overlapping ports and the same protocol whose bind
/// addresses overlap: the second bind would fail, and the kernel could
/// not tell them apart. Each is named with its place.
fn conflicts(specs: &[RouteSpec], diag: &mut Diag) {
    // Sorted by first port, so each route is compared only with those
    // whose spans can still reach it.
    let mut order: Vec<(u16, u16, usize)> = specs
        .iter()
        .enumerate()
        .filter_map(|(i, s)| listen_span(s).map(|(a, b)| (a, b, i)))
        .collect();
    order.sort_unstable();
    let mut found: Vec<(usize, usize)> = Vec::new();
    for (n, &(first, _, i)) in order.iter().enumerate() {
        for &(_, other_last, j) in &order[..n] {
            if other_last < first {
                continue;
            }
            found.push((i.max(j), i.min(j)));
        }
    }
    // Reported at the later route, in file order.
    found.sort_unstable();
    for (i, j) in found {
        let (spec, other) = (&specs[i], &specs[j]);
        let shared: Vec<&str> = spec
            .protocols
            .iter()
            .filter(|p| other.protocols.contains(p))
            .map(|p| p.as_str())
            .collect();
        if shared.is_empty() || !overlap(cover(spec.bind), cover(other.bind)) {
            continue;
        }
        let protos = shared.join(",");
        diag.error(
            ConfigError::new(
                &spec.port_pos,
                format!(
                    "{protos} {}, which alias `{}` also claims ({protos} {})",
                    listen_text(spec),
                    other.alias,
                    listen_text(other)
                ),
                "one rule per (bind, port, protocol), ranges included; a wildcard bind covers every address of its family",
            )
            .alias(Some(&spec.alias))
            .field("port")
            .hint(format!("alias `{}` is at {}", other.alias, other.port_pos)),
        );
    }
}
