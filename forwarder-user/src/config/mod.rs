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
//! kernel: {conntrack_size: 262144, snat_ports: 40000-59999}
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
mod env;
mod errors;
mod fields;
mod labels;
mod resolve;
mod services;
mod settings;
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
pub use compile::{Config, Route, addr_of, compile};
pub use errors::{ConfigError, Errors, Pos, Warning};
pub use fields::{HealthCheck, ProxyProtocol};
pub use table::table;
pub use values::{Cidr, format_duration};

use crate::rules::Compiled;
use env::{Env, System};
use errors::Diag;

/// Reads, validates and compiles the rule file at `path`: includes are
/// resolved relative to it, hostnames resolved, listen ports 0 picked.
/// Warnings (ignored Godoxy fields, skipped http routes) are logged.
pub fn load(path: &Path) -> Result<Compiled, Errors> {
    let name: Arc<str> = Arc::from(path.display().to_string());
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            return Err(Errors::from_vec(vec![ConfigError::new(
                &Pos::new(&name, 1, 1),
                format!("a file that cannot be read ({e})"),
                "a readable UTF-8 rule file",
            )]));
        }
    };
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

/// The whole load against an environment; warnings are returned.
fn load_with(
    text: &str,
    file: &Arc<str>,
    base: &Path,
    env: &dyn Env,
) -> Result<(Compiled, Vec<Warning>), Errors> {
    let mut diag = Diag::default();
    let raw = source::read(text, file, base, env, &mut diag);
    let globals = settings::globals(&raw, &mut diag);
    let raw_routes = validate::unique_aliases(raw.routes, &mut diag);
    let mut unchecked = Vec::new();
    let specs: Vec<fields::RouteSpec> = raw_routes
        .iter()
        .filter_map(|r| fields::route(r, &globals.timeouts, env, &mut diag, &mut unchecked))
        .collect();
    let targets = resolve::hosts(&specs, &unchecked, env, &mut diag);
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
    compiled.hostnames = resolve::names(&specs);
    Ok((compiled, diag.warnings))
}
