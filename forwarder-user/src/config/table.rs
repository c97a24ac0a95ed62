//! The compiled rule table as `forwarder check` prints it.

use std::fmt::Write;

use forwarder_common::RULE_F_RELAY;

use super::values::{format_bytes, format_duration};
use crate::rules::{
    BackendSpec, Compiled, DEFAULT_MAX_CONNECTIONS, Listener, PathMode, ProxyProtocol, TargetPorts,
};

/// One line per rule: id, alias, protocol, bind:listen → target(s), path,
/// ACL (entries in the order tried, the default, the action); then the
/// daemon-wide settings.
pub fn table(compiled: &Compiled) -> String {
    let header = [
        "ID", "ALIAS", "PROTO", "LISTEN", "", "TARGET", "PATH", "ACL",
    ];
    let mut rows: Vec<[String; 8]> = vec![header.map(str::to_owned)];
    for l in &compiled.listeners {
        rows.push([
            l.rule_id.to_string(),
            l.alias.clone(),
            l.protocol.to_string(),
            listen_text(l),
            "→".into(),
            targets_text(l),
            path_text(compiled, l),
            l.acl
                .as_ref()
                .map_or_else(|| "-".to_owned(), |a| a.compact()),
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    if compiled.listeners.is_empty() {
        out.push_str("(no rules)\n");
    } else {
        for row in &rows {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let _ = write!(line, "{cell:<w$}");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    let checked: Vec<&Listener> = compiled
        .listeners
        .iter()
        .filter(|l| l.health.is_some())
        .collect();
    if !checked.is_empty() {
        out.push_str("\nhealth checks:\n");
        for l in checked {
            let what = l.health.as_ref().map(crate::health::describe);
            let what = what.unwrap_or_default();
            let _ = writeln!(out, "  {} {} ({}): {what}", l.rule_id, l.alias, l.protocol);
        }
    }
    let interfaces = match &compiled.interfaces {
        None => "every up, non-loopback interface".to_owned(),
        Some(names) => names.join(", "),
    };
    let r = &compiled.relay;
    let k = &compiled.kernel_settings;
    let _ = writeln!(out, "\ninterfaces: {interfaces}");
    let _ = writeln!(
        out,
        "relay: max_udp_sessions {}, drain_timeout {}, first_byte_timeout {}, pipe_size {}, \
         max_connections {DEFAULT_MAX_CONNECTIONS} per tcp rule unless set",
        r.max_udp_sessions,
        format_duration(r.drain_timeout),
        format_duration(r.first_byte_timeout),
        format_bytes(r.pipe_size)
    );
    let _ = writeln!(
        out,
        "kernel: conntrack_size {}, snat_ports {}-{}, snat_addresses {}",
        k.conntrack_size,
        k.snat_ports.0,
        k.snat_ports.1,
        super::snat::describe(&k.snat_addresses)
    );
    if !compiled.hostnames.is_empty() {
        out.push_str(&names_text(compiled));
    }
    out
}

/// The `dns` settings and what each name answered, with when it is asked
/// again.
fn names_text(compiled: &Compiled) -> String {
    let d = &compiled.dns;
    let mut out = format!(
        "dns: refresh {}, min_ttl {}, max_ttl {}\n",
        format_duration(d.refresh),
        format_duration(d.min_ttl),
        format_duration(d.max_ttl)
    );
    for (name, answer) in &compiled.hostnames {
        let addrs: Vec<String> = answer.addrs.iter().map(ToString::to_string).collect();
        let again = format_duration(crate::names::keep_for(answer.ttl, d));
        let source = match answer.ttl {
            Some(ttl) => format!("TTL {}", format_duration(ttl)),
            None => "/etc/hosts".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {name}: {} ({source}; asked again after {again})",
            addrs.join(", ")
        );
    }
    out
}

fn listen_text(l: &Listener) -> String {
    if l.listen_picked {
        format!("{} (picked)", l.bind)
    } else {
        l.listen_text()
    }
}

/// A backend, with the ports a shifted range goes to.
fn target_text(l: &Listener, b: &BackendSpec) -> String {
    let first = l.bind.port();
    match l.ports.target {
        TargetPorts::Shifted if l.ports.is_range() => {
            let last = l
                .ports
                .target_port(first, l.ports.last(first), b.addr.port());
            format!("{}-{last}", b.addr)
        }
        _ => b.addr.to_string(),
    }
}

fn targets_text(l: &Listener) -> String {
    if l.backends.len() == 1 {
        return target_text(l, &l.backends[0]);
    }
    l.backends
        .iter()
        .map(|b| format!("{} (weight {})", target_text(l, b), b.weight))
        .collect::<Vec<_>>()
        .join(", ")
}

fn path_text(compiled: &Compiled, l: &Listener) -> String {
    let relay_flag = compiled
        .kernel
        .values()
        .find(|v| v.rule_id == l.rule_id)
        .is_some_and(|v| v.flags & RULE_F_RELAY != 0);
    let mut text = match (l.path, relay_flag) {
        (PathMode::Auto, true) if l.proxy.needs_relay() => "relay (proxy_protocol)".to_owned(),
        (PathMode::Auto, true) if l.max_connections.is_some() => {
            "relay (max_connections)".to_owned()
        }
        (PathMode::Auto, true) => "relay (loopback target)".to_owned(),
        (path, _) => path.as_str().to_owned(),
    };
    if l.preserve_client_ip {
        text.push_str(", client ip kept");
    }
    if let Some(max) = l.max_connections {
        let _ = write!(text, ", at most {max} connections");
    }
    if l.proxy.send != ProxyProtocol::Off {
        let _ = write!(text, ", PROXY {} to backend", l.proxy.send.as_str());
    }
    if !l.proxy.accept_from.is_empty() {
        let from: Vec<String> = l
            .proxy
            .accept_from
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = write!(text, ", PROXY read from {}", from.join(" "));
    }
    text
}
