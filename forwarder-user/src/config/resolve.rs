//! The two steps that ask the machine: hostnames to addresses, and listen
//! ports for routes that asked for port 0.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::compile::Route;
use super::env::Env;
use super::errors::{ConfigError, Diag, quoted};
use super::fields::{RouteSpec, TargetSpec};
use super::values::HostSpec;
use crate::names::pick_addresses;
use crate::rules::{Answer, BackendSpec, Protocol};
use forwarder_common::MAX_BACKENDS_PER_RULE;

type Cache = HashMap<String, Result<Answer, String>>;

/// Each route's targets as addresses; `None` for a route with a target that
/// did not resolve (the error is recorded). The `unchecked` targets, of
/// routes that failed otherwise, are resolved only to report them. Also
/// the answer for each hostname of `specs`.
pub(crate) fn hosts(
    specs: &[RouteSpec],
    unchecked: &[(String, TargetSpec)],
    env: &dyn Env,
    diag: &mut Diag,
) -> (Vec<Option<Vec<BackendSpec>>>, BTreeMap<String, Answer>) {
    let mut cache = Cache::new();
    for (alias, t) in unchecked {
        resolve(alias, t, &mut cache, env, diag);
    }
    let targets = specs
        .iter()
        .map(|spec| {
            let resolved: Vec<Option<Vec<BackendSpec>>> = spec
                .targets
                .iter()
                .map(|t| resolve(&spec.alias, t, &mut cache, env, diag))
                .collect();
            let backends: Vec<BackendSpec> =
                resolved.into_iter().collect::<Option<Vec<_>>>()?.concat();
            if backends.len() > MAX_BACKENDS_PER_RULE as usize {
                let name = (spec.targets.iter())
                    .find(|t| matches!(t.host, HostSpec::Name(_)))
                    .or(spec.targets.first())?;
                diag.error(
                    ConfigError::new(
                        &name.pos,
                        format!(
                            "targets that resolve to {} addresses in all",
                            backends.len()
                        ),
                        format!(
                            "at most {MAX_BACKENDS_PER_RULE} backends per route, counting every \
                             address a name resolves to"
                        ),
                    )
                    .alias(Some(&spec.alias))
                    .field(name.field),
                );
                return None;
            }
            Some(backends)
        })
        .collect();
    let answers = (specs.iter().flat_map(|s| &s.targets))
        .filter_map(|t| match &t.host {
            HostSpec::Name(name) => Some((name.clone(), cache.get(name)?.clone().ok()?)),
            HostSpec::Ip(_) => None,
        })
        .collect();
    (targets, answers)
}

fn resolve(
    alias: &str,
    t: &TargetSpec,
    cache: &mut Cache,
    env: &dyn Env,
    diag: &mut Diag,
) -> Option<Vec<BackendSpec>> {
    let ips = match &t.host {
        HostSpec::Ip(ip) => vec![*ip],
        HostSpec::Name(name) => {
            let answer = cache
                .entry(name.clone())
                .or_insert_with(|| match env.resolve(name) {
                    Ok(answer) => {
                        let addrs = pick_addresses(&answer.addrs);
                        if addrs.is_empty() {
                            Err("no addresses".to_owned())
                        } else {
                            Ok(Answer { addrs, ..answer })
                        }
                    }
                    Err(e) => Err(e.to_string()),
                })
                .clone();
            match answer {
                Ok(answer) => answer.addrs,
                Err(why) => {
                    diag.error(
                        ConfigError::new(
                            &t.pos,
                            format!("{}, which does not resolve ({why})", quoted(name)),
                            "a hostname that resolves now, or an IP address",
                        )
                        .alias(Some(alias))
                        .field(t.field),
                    );
                    return None;
                }
            }
        }
    };
    let mut backends = Vec::with_capacity(ips.len());
    for ip in ips {
        backends.push(usable(alias, t, ip, diag)?);
    }
    Some(backends)
}

fn usable(alias: &str, t: &TargetSpec, ip: IpAddr, diag: &mut Diag) -> Option<BackendSpec> {
    if let Some(why) = unusable_target(ip) {
        diag.error(
            ConfigError::new(
                &t.pos,
                format!("{} ({why})", quoted(&ip.to_string())),
                "a unicast address to connect to",
            )
            .alias(Some(alias))
            .field(t.field),
        );
        return None;
    }
    Some(BackendSpec {
        addr: SocketAddr::new(ip, t.port),
        weight: t.weight,
    })
}

fn unusable_target(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("broadcast")
    } else {
        None
    }
}

/// Picks a free listen port for each route with listen 0: from the
/// ephemeral range, outside the SNAT range and the ports other routes
/// claim, bindable for every protocol of the route on its bind address.
pub(crate) fn pick_ports(
    routes: &mut [Route],
    specs: &[RouteSpec],
    snat: (u16, u16),
    env: &dyn Env,
    diag: &mut Diag,
) {
    let mut claimed: HashSet<(u16, Protocol)> = routes
        .iter()
        .filter(|r| r.listen != 0)
        .flat_map(|r| r.protocols.iter().map(move |p| (r.listen, *p)))
        .collect();
    let (lo, hi) = env.ephemeral_range();
    let span = u32::from(hi) - u32::from(lo) + 1;
    let start = (std::hash::RandomState::new().hash_one(0u8) % u64::from(span)) as u32;
    for (route, spec) in routes.iter_mut().zip(specs) {
        if route.listen != 0 {
            continue;
        }
        match pick_one(route, lo, span, start, snat, &claimed, env) {
            Ok(port) => {
                route.listen = port;
                route.listen_picked = true;
                for p in &route.protocols {
                    claimed.insert((port, *p));
                }
                tracing::info!("alias `{}`: picked listen port {port}", route.alias);
            }
            Err(why) => diag.error(
                ConfigError::new(
                    &spec.port_pos,
                    format!("listen port 0 ({why})"),
                    "a free port to pick, or an explicit listen port",
                )
                .alias(Some(&route.alias))
                .field("port"),
            ),
        }
    }
}

fn pick_one(
    route: &Route,
    lo: u16,
    span: u32,
    start: u32,
    snat: (u16, u16),
    claimed: &HashSet<(u16, Protocol)>,
    env: &dyn Env,
) -> Result<u16, String> {
    let mut bind = route.bind.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    for n in 0..span {
        let port = (u32::from(lo) + (start + n) % span) as u16;
        if (snat.0..=snat.1).contains(&port)
            || route
                .protocols
                .iter()
                .any(|p| claimed.contains(&(port, *p)))
        {
            continue;
        }
        let mut free = true;
        for &p in &route.protocols {
            let mut r = env.probe(SocketAddr::new(bind, port), p);
            if route.bind.is_none() && r.as_ref().is_err_and(no_ipv6) {
                // No IPv6 on this host: the wildcard is IPv4's.
                bind = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
                r = env.probe(SocketAddr::new(bind, port), p);
            }
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
                    return Err(format!("the bind address {bind} is not on this host"));
                }
                Err(_) => {
                    free = false;
                    break;
                }
            }
        }
        if free {
            return Ok(port);
        }
    }
    Err(format!(
        "no free port in the ephemeral range {lo}–{} outside kernel.snat_ports",
        u32::from(lo) + span - 1
    ))
}

fn no_ipv6(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAFNOSUPPORT) || e.kind() == io::ErrorKind::AddrNotAvailable
}
