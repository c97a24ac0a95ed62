//! The rule file: parsing, validation, compilation into [`crate::rules::Compiled`].
//!
//! A rule file (`forwarder.yaml`) is the daemon's whole configuration:
//!
//! ```yaml
//! interfaces: [eth0]       # optional: where the kernel path attaches
//! routes:                  # Godoxy route-file style: alias -> fields
//!   turn-tcp: {scheme: tcp, host: 10.0.0.5, port: 7878:3478}
//! labels:                  # Godoxy Docker-label style (see `labels`)
//!   proxy.aliases: game
//!   proxy.game.scheme: tcp,udp
//!   proxy.game.port: 25565:25565
//! include: [godoxy-routes.yml]   # Godoxy route files: alias -> fields
//! relay: {max_udp_sessions: 65536, drain_timeout: 10s}
//! kernel: {conntrack_size: 262144, snat_ports: 40000-59999, snat_addresses: [10.1.0.8/29]}
//! timeouts: {udp_idle: 2m, udp_unreplied: 30s, tcp_established: 2h,
//!            tcp_half_closed: 2m, tcp_close: 10s, connect: 5s}
//! acl: {deny: [192.0.2.0/24], action: reject}   # every route's, with its own
//! ```
//!
//! Loading runs in steps, each collecting every error it finds:
//! YAML with positions ([`yaml`]) → sections and route sources ([`source`],
//! [`labels`]) → fields ([`fields`], [`settings`]) → hostnames
//! ([`resolve`]) → checks across routes ([`validate`]) → listen port picks
//! ([`resolve`]) → the pure [`compile`]. Nothing is returned unless the
//! whole file is valid.

// Errors are the cold path of a load done once; boxing them buys nothing.
#![allow(clippy::result_large_err)]

mod acl;
mod catalog;
mod compile;
mod docker;
mod env;
mod errors;
mod fields;
mod labels;
mod resolve;
mod services;
mod settings;
mod snat;
mod source;
mod table;
mod validate;
mod values;
mod yaml;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

pub use acl::Acl;
pub use compile::{Config, Route, addr_of, compile, range_entries};
pub use docker::{Container, DockerSettings};
pub(crate) use env::parse_port_range;
pub use errors::{ConfigError, Errors, Pos, Warning};
pub use fields::{HealthCheck, ProxyProtocol};
pub use table::table;
pub use values::{Cidr, format_bytes, format_duration};

use std::collections::BTreeMap;

use crate::rules::{Answer, Compiled};
use env::{Answered, Env, System};
use errors::Diag;
use source::RawRoute;

/// Reads, validates and compiles the rule file at `path`: includes are
/// resolved relative to it, hostnames resolved, listen ports 0 picked.
/// Warnings (ignored Godoxy fields, skipped http routes) are logged.
pub fn load(path: &Path) -> Result<Compiled, Errors> {
    let name: Arc<str> = Arc::from(path.display().to_string());
    let text = read_file(path)?;
    let base = path.parent().unwrap_or(Path::new(""));
    log_warnings(load_with(&text, &name, base, &System))
}

/// Like [`load`] for a rule file held in memory; `file_name` names it in
/// messages and includes are relative to the current directory.
pub fn load_str(text: &str, file_name: &str) -> Result<Compiled, Errors> {
    log_warnings(load_with(
        text,
        &Arc::from(file_name),
        Path::new(""),
        &System,
    ))
}

fn log_warnings(r: Result<(Compiled, Vec<Warning>), Errors>) -> Result<Compiled, Errors> {
    r.map(|(compiled, warnings)| {
        for w in warnings {
            tracing::warn!("{w}");
        }
        compiled
    })
}

/// The rule file and the routes of Docker's containers, as one table.
pub struct Loaded {
    pub compiled: Compiled,
    /// The file's `docker:` section.
    pub docker: Option<DockerSettings>,
    /// What each container's labels gave besides routes.
    pub containers: Vec<ContainerReport>,
}

/// One container's part of a [`Loaded`].
pub struct ContainerReport {
    pub id: String,
    pub name: String,
    /// The aliases it added to the table; none if it was skipped.
    pub aliases: Vec<String>,
    /// Why it was skipped, one line per error; empty if it was not.
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Like [`load`], with the routes of `containers` added: a container whose
/// labels are wrong, or whose routes clash with the file's or an earlier
/// container's, is skipped alone. Warnings of the file are logged.
pub fn load_with_containers(path: &Path, containers: &[Container]) -> Result<Loaded, Errors> {
    load_text_with_containers(&read_file(path)?, path, containers)
}

/// The text of the rule file at `path`.
pub fn read_file(path: &Path) -> Result<String, Errors> {
    std::fs::read_to_string(path).map_err(|e| {
        Errors::from_vec(vec![ConfigError::new(
            &Pos::new(&Arc::from(path.display().to_string()), 1, 1),
            format!("a file that cannot be read ({e})"),
            "a readable UTF-8 rule file",
        )])
    })
}

/// Like [`load_with_containers`] for the file's text as read before.
pub fn load_text_with_containers(
    text: &str,
    path: &Path,
    containers: &[Container],
) -> Result<Loaded, Errors> {
    load_text_in(text, path, containers, &System)
}

/// Like [`load_text_with_containers`], with the hostnames in `answers`
/// taken as answered there rather than looked up again.
pub fn load_text_with_answers(
    text: &str,
    path: &Path,
    containers: &[Container],
    answers: &BTreeMap<String, Answer>,
) -> Result<Loaded, Errors> {
    load_text_in(text, path, containers, &Answered { answers })
}

fn load_text_in(
    text: &str,
    path: &Path,
    containers: &[Container],
    env: &dyn Env,
) -> Result<Loaded, Errors> {
    let name: Arc<str> = Arc::from(path.display().to_string());
    let base = path.parent().unwrap_or(Path::new(""));
    let load = |extra: &[RawRoute]| load_inner(text, &name, base, env, extra);
    let (mut compiled, docker, warnings) = load(&[])?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let mut accepted: Vec<RawRoute> = Vec::new();
    let mut reports = Vec::new();
    let mut sorted: Vec<&Container> = containers.iter().filter(|c| c.has_proxy_labels()).collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for c in sorted {
        let mut diag = Diag::default();
        let routes = docker::routes(c, &mut diag);
        let mut report = ContainerReport {
            id: c.id.clone(),
            name: c.name.clone(),
            aliases: Vec::new(),
            errors: diag.errors.iter().map(ToString::to_string).collect(),
            warnings: diag.warnings.iter().map(ToString::to_string).collect(),
        };
        let own = format!("docker container `{}`,", c.name);
        if report.errors.is_empty() && !routes.is_empty() {
            let mut candidate = accepted.clone();
            candidate.extend(routes.iter().cloned());
            match load(&candidate) {
                Ok((next, _, warnings)) => {
                    compiled = next;
                    accepted = candidate;
                    report.aliases = routes.iter().map(|r| r.alias.clone()).collect();
                    // The file's warnings were logged above; these are the container's.
                    report.warnings.extend(
                        warnings
                            .iter()
                            .filter(|w| w.pos.file.starts_with(&own))
                            .map(ToString::to_string),
                    );
                    report.warnings.dedup();
                }
                Err(errors) => {
                    report.errors = errors.to_string().lines().map(str::to_owned).collect()
                }
            }
        }
        reports.push(report);
    }
    Ok(Loaded {
        compiled,
        docker,
        containers: reports,
    })
}

/// The whole load against an environment; warnings are returned.
fn load_with(
    text: &str,
    file: &Arc<str>,
    base: &Path,
    env: &dyn Env,
) -> Result<(Compiled, Vec<Warning>), Errors> {
    load_inner(text, file, base, env, &[]).map(|(compiled, _, warnings)| (compiled, warnings))
}

/// The load of a file with `extra` routes (Docker's) after its own.
fn load_inner(
    text: &str,
    file: &Arc<str>,
    base: &Path,
    env: &dyn Env,
    extra: &[RawRoute],
) -> Result<(Compiled, Option<DockerSettings>, Vec<Warning>), Errors> {
    let mut diag = Diag::default();
    let mut raw = source::read(text, file, base, env, &mut diag);
    raw.routes.extend(extra.iter().cloned());
    let globals = settings::globals(&raw, &mut diag);
    let raw_routes = validate::unique_aliases(raw.routes, &mut diag);
    let mut unchecked = Vec::new();
    let specs: Vec<fields::RouteSpec> = raw_routes
        .iter()
        .filter_map(|r| fields::route(r, &globals.timeouts, env, &mut diag, &mut unchecked))
        .collect();
    let (targets, answers) = resolve::hosts(&specs, &unchecked, env, &mut diag);
    validate::routes(&specs, &targets, &globals, &mut diag);
    if diag.has_errors() {
        return Err(diag.into_errors());
    }
    let mut routes: Vec<Route> = specs
        .iter()
        .zip(targets)
        .map(|(spec, backends)| Route {
            alias: spec.alias.clone(),
            protocols: spec.protocols.clone(),
            bind: spec.bind,
            listen: spec.listen,
            ports: spec.ports,
            listen_picked: false,
            backends: backends.unwrap_or_default(),
            timeouts: spec.timeouts,
            path: spec.path,
            preserve_client_ip: spec.preserve_client_ip,
            healthcheck: spec.healthcheck.clone(),
            acl: spec.acl.clone(),
            proxy_protocol: spec.proxy_protocol,
            proxy_protocol_on_udp: spec.proxy_protocol_on_udp,
            accept_proxy_protocol: spec.accept_proxy_protocol.clone(),
            max_connections: spec.max_connections,
        })
        .collect();
    resolve::pick_ports(
        &mut routes,
        &specs,
        globals.kernel.snat_ports,
        env,
        &mut diag,
    );
    if diag.has_errors() {
        return Err(diag.into_errors());
    }
    let config = Config {
        interfaces: globals.interfaces,
        routes,
        relay: globals.relay,
        kernel: globals.kernel,
        acl: globals.acl,
    };
    let mut compiled = compile(&config);
    compiled.dns = globals.dns;
    compiled.metrics = globals.metrics;
    compiled.hostnames = answers;
    Ok((compiled, globals.docker, diag.warnings))
}
