//! `forwarder status` for people: the status document as a table of rules
//! with their paths' counters and rates, then the totals.
//!
//! Pure functions of one or two documents. Every field is read as
//! optional: a daemon older or newer than this client (fields added in
//! parallel, say) still gets a table, with `-` where a count is missing.

use serde_json::Value;

/// Lines are cut to this width.
pub const WIDTH: usize = 100;

/// Rates need two documents; this is the earlier one.
pub struct Earlier<'a> {
    pub doc: &'a Value,
    /// Seconds between the two, if the documents do not say (no
    /// `uptime_ms`, an older daemon): the client's own measure.
    pub measured_secs: f64,
}

/// The seconds between two documents, by the daemon's clock when both
/// carry it.
pub fn interval_secs(earlier: &Earlier, now: &Value) -> (f64, &'static str) {
    match (earlier.doc["uptime_ms"].as_u64(), now["uptime_ms"].as_u64()) {
        (Some(a), Some(b)) if b > a => ((b - a) as f64 / 1000.0, "daemon clock"),
        _ => (earlier.measured_secs, "client clock"),
    }
}

/// The whole human form of `now`, with rates against `earlier`.
pub fn render(now: &Value, earlier: Option<&Earlier>) -> String {
    let mut out = Vec::new();
    let secs = earlier.map(|e| interval_secs(e, now));
    out.push(headline(now));
    out.push(match secs {
        Some((s, clock)) => format!("rates over the last {s:.1} s ({clock})"),
        None => "rates: need two samples".to_owned(),
    });
    out.push(String::new());
    out.push(format!(
        "{:<12}{:>7}{:>7}{:>9}{:>10}{:>11}{:>12}  {}",
        "RULE / PATH", "FLOWS", "ACTIVE", "PACKETS", "PKT/S", "BYTES", "BYTES/S", "NOTES"
    ));
    let before = |section: &str, alias: &str, protocol: &str| {
        earlier.and_then(|e| find(&e.doc[section], alias, protocol).cloned())
    };
    let empty = Vec::new();
    for rule in now["rules"].as_array().unwrap_or(&empty) {
        let alias = text(&rule["alias"]);
        let protocol = text(&rule["protocol"]);
        out.extend(rule_lines(rule));
        let kernel_now = find(&now["kernel"], &alias, &protocol);
        if let Some(k) = kernel_now {
            let prev = before("kernel", &alias, &protocol);
            out.push(path_row(
                "kernel",
                &kernel_path_counts(k),
                prev.as_ref().map(kernel_path_counts).as_ref(),
                secs.map(|s| s.0),
            ));
        }
        if let Some(r) = find(&now["relay"], &alias, &protocol) {
            let prev = before("relay", &alias, &protocol);
            out.push(path_row(
                "relay",
                &relay_path_counts(r, &protocol, kernel_now),
                prev.as_ref()
                    .map(|p| relay_path_counts(p, &protocol, None))
                    .as_ref(),
                secs.map(|s| s.0),
            ));
        }
    }
    out.push(String::new());
    out.extend(totals(now));
    let mut text: String = out
        .iter()
        .flat_map(|l| l.split('\n'))
        .map(|l| fit(l.trim_end(), WIDTH))
        .collect::<Vec<_>>()
        .join("\n");
    text.push('\n');
    text
}

fn headline(doc: &Value) -> String {
    let mut parts = vec![format!("forwarder pid {}", number(&doc["pid"]))];
    if let Some(config) = doc["config"].as_str() {
        parts.push(config.to_owned());
    }
    parts.push(match doc["kernel_path"].as_bool() {
        Some(true) => "kernel path on".to_owned(),
        Some(false) => "kernel path off (relay only)".to_owned(),
        None => "kernel path ?".to_owned(),
    });
    if let Some(ms) = doc["uptime_ms"].as_u64() {
        parts.push(format!("up {}", duration(ms / 1000)));
    }
    let process = &doc["process"];
    if let (Some(fds), Some(rss)) = (process["open_fds"].as_u64(), process["rss_bytes"].as_u64()) {
        parts.push(format!("{fds} fds, {} resident", bytes(rss as f64)));
    }
    if let Some(docker) = docker_part(&doc["docker"]) {
        parts.push(docker);
    }
    parts.join(" · ")
}

/// Docker discovery in a few words; `None` when it is off.
fn docker_part(docker: &Value) -> Option<String> {
    docker.as_object()?;
    let containers = docker["containers"].as_array().cloned().unwrap_or_default();
    let skipped = containers
        .iter()
        .filter(|c| c["errors"].as_array().is_some_and(|e| !e.is_empty()))
        .count();
    let mut part = if docker["connected"] == true {
        format!("docker: {} containers", containers.len())
    } else {
        let retry = docker["retry_in_ms"].as_u64().unwrap_or(0);
        format!("docker unreachable (retry in {} s)", retry.div_ceil(1000))
    };
    if skipped > 0 {
        part.push_str(&format!(", {skipped} skipped"));
    }
    Some(part)
}

/// `turn-tcp  tcp  [::]:7878 -> 198.18.2.2:3478  path auto`, with
/// whatever else the daemon says of the rule after it, then its health
/// check and the backends it took out, if it has one.
fn rule_lines(rule: &Value) -> Vec<String> {
    let targets: Vec<String> = rule["backends"]
        .as_array()
        .map(|b| b.iter().map(text).collect())
        .unwrap_or_default();
    let mut line = format!(
        "{}  {}  {} -> {}  path {}",
        text(&rule["alias"]),
        text(&rule["protocol"]),
        text(&rule["bind"]),
        targets_elided(&targets),
        text(&rule["path"])
    );
    let known = [
        "rule_id",
        "alias",
        "protocol",
        "bind",
        "backends",
        "path",
        "health_check",
        "health",
    ];
    if let Some(fields) = rule.as_object() {
        for (key, value) in fields.iter().filter(|(k, _)| !known.contains(&k.as_str())) {
            let shown = match value {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            line.push_str(&format!("  {key} {shown}"));
        }
    }
    let mut lines = vec![line];
    if let Some(check) = rule["health_check"].as_str() {
        let backends = rule["health"].as_array().cloned().unwrap_or_default();
        let down: Vec<&Value> = backends.iter().filter(|b| b["state"] == "down").collect();
        lines.push(format!(
            "    health: {} of {} up; {check}",
            backends.len() - down.len(),
            backends.len()
        ));
        for b in down {
            let why = b["last_failure"].as_str().unwrap_or("no reason recorded");
            lines.push(format!("    down: {} ({why})", text(&b["backend"])));
        }
    }
    lines
}

/// One target, two, or the first two and how many more.
pub fn targets_elided(targets: &[String]) -> String {
    match targets {
        [] => "-".to_owned(),
        [one] => one.clone(),
        [a, b] => format!("{a}, {b}"),
        [a, b, rest @ ..] => format!("{a}, {b} +{} more", rest.len()),
    }
}

/// The counts of one path of one rule; `None` where the document lacks it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PathCounts {
    pub flows: Option<u64>,
    pub active: Option<u64>,
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
    pub notes: Vec<String>,
}

fn sum(a: &Value, b: &Value) -> Option<u64> {
    Some(a.as_u64()? + b.as_u64()?)
}

pub fn kernel_path_counts(k: &Value) -> PathCounts {
    let mut notes = Vec::new();
    for (key, what) in [
        ("fallbacks", "to relay"),
        ("drops", "dropped"),
        ("xdp_passes", "XDP left to TC"),
    ] {
        if let Some(note) = reasons_note(&k[key]) {
            notes.push(format!("{what}: {note}"));
        }
    }
    for (key, what) in [
        ("icmp_translated", "ICMP errors passed on"),
        ("icmp_sent", "ICMP errors sent"),
        ("acl_denied", "denied by the ACL"),
        ("unanswered_taken_over", "unanswered flows' ports taken"),
    ] {
        if let Some(n) = k[key].as_u64().filter(|n| *n > 0) {
            notes.push(format!("{what}: {}", count(n)));
        }
    }
    if let (Some(xdp), Some(all)) = (
        k["xdp_packets"].as_u64(),
        sum(&k["packets_fwd"], &k["packets_rev"]),
    ) && xdp > 0
        && all > 0
    {
        notes.push(format!("XDP {}%", xdp * 100 / all));
    }
    PathCounts {
        flows: k["flows"].as_u64(),
        active: None,
        packets: sum(&k["packets_fwd"], &k["packets_rev"]),
        bytes: sum(&k["bytes_fwd"], &k["bytes_rev"]),
        notes,
    }
}

/// `no_route 2, fragment 1` from a reason-to-count object; `None` if empty.
fn reasons_note(reasons: &Value) -> Option<String> {
    let list: Vec<String> = reasons
        .as_object()?
        .iter()
        .filter_map(|(name, n)| Some((name, n.as_u64().filter(|n| *n > 0)?)))
        .map(|(name, n)| format!("{name} {}", count(n)))
        .collect();
    (!list.is_empty()).then(|| list.join(", "))
}

/// A TCP relay flow has no packets of its own (the sockets below segment
/// it). `kernel` is the same rule on the kernel path, whose fallbacks
/// say why the relay has flows of a rule the kernel path could take.
pub fn relay_path_counts(r: &Value, protocol: &str, kernel: Option<&Value>) -> PathCounts {
    let mut notes = Vec::new();
    for (key, what) in [
        ("connect_failures", "connect failures"),
        ("sessions_refused", "sessions refused"),
        ("connections_refused", "reset at max_connections"),
        (
            "first_byte_timeouts",
            "reset, silent past first_byte_timeout",
        ),
        ("no_backend", "refused, every backend down"),
        ("proxy_headers_refused", "PROXY headers refused"),
        ("acl_denied", "denied by the ACL"),
        ("errors", "errors"),
    ] {
        if let Some(n) = r[key].as_u64().filter(|n| *n > 0) {
            notes.push(format!("{what}: {}", count(n)));
        }
    }
    let fell_back = kernel.map_or(0, |k| {
        k["fallback_full"].as_u64().unwrap_or(0) + k["fallback_other"].as_u64().unwrap_or(0)
    });
    if fell_back > 0 {
        notes.push(format!("{} fell back from kernel", count(fell_back)));
    }
    PathCounts {
        flows: r["flows"].as_u64(),
        active: r["active"].as_u64(),
        packets: match protocol {
            "udp" => sum(&r["datagrams_to_backend"], &r["datagrams_to_client"]),
            _ => None,
        },
        bytes: sum(&r["bytes_to_backend"], &r["bytes_to_client"]),
        notes,
    }
}

fn path_row(
    name: &str,
    now: &PathCounts,
    before: Option<&PathCounts>,
    secs: Option<f64>,
) -> String {
    let rate = |pick: fn(&PathCounts) -> Option<u64>| -> Option<f64> {
        let (now, before, secs) = (pick(now)?, pick(before?)?, secs?);
        // A reload that replaced the rule starts its counts again.
        (now >= before && secs > 0.0).then(|| (now - before) as f64 / secs)
    };
    let dash = || "-".to_owned();
    let row = format!(
        "  {:<10}{:>7}{:>7}{:>9}{:>10}{:>11}{:>12}",
        name,
        now.flows.map_or_else(dash, count),
        now.active.map_or_else(dash, count),
        now.packets.map_or_else(dash, count),
        rate(|c| c.packets).map_or_else(dash, |r| format!("{}/s", count_f(r))),
        now.bytes.map_or_else(dash, |b| bytes(b as f64)),
        rate(|c| c.bytes).map_or_else(dash, |r| format!("{}/s", bytes(r))),
    );
    let notes = now.notes.join(", ");
    if notes.is_empty() {
        row
    } else if row.chars().count() + 2 + notes.chars().count() <= WIDTH {
        format!("{row}  {notes}")
    } else {
        // Too long for the row: on a line of its own.
        format!("{row}\n      {notes}")
    }
}

fn totals(doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let k = &doc["kernel"];
    if let Some(error) = k["error"].as_str() {
        out.push(format!("kernel counters unreadable: {error}"));
    } else if let Some(entries) = k["conntrack_entries"].as_u64() {
        let flows = entries / 2;
        out.push(match k["conntrack_capacity"].as_u64().filter(|c| *c > 0) {
            Some(cap) => format!(
                "conntrack   {} of {} flows ({})",
                count(flows),
                count(cap),
                percent(flows, cap)
            ),
            None => format!("conntrack   {} flows", count(flows)),
        });
        if let (Some(used), Some(ports)) =
            (k["snat_ports_in_use"].as_u64(), k["snat_ports"].as_u64())
        {
            out.push(format!(
                "SNAT ports  {} of {} in use toward the busiest backend ({})",
                count(used),
                count(ports),
                percent(used, ports)
            ));
        }
        if let Some(addrs) = k["snat_addresses"].as_array().filter(|a| !a.is_empty()) {
            let addrs: Vec<&str> = addrs.iter().filter_map(|a| a.as_str()).collect();
            out.push(format!(
                "SNAT addrs  {}: {} (the ports above are per address)",
                addrs.len(),
                addrs.join(", ")
            ));
        }
        if let Some(moved) = k["host_flows_moved"].as_u64().filter(|n| *n > 0) {
            out.push(format!(
                "host NAT    {} host flows moved off kernel flows' SNAT ports",
                count(moved)
            ));
        }
        if let Some(note) = reasons_note(&k["xdp_passes_without_rule"]) {
            out.push(format!("XDP left to TC, no kernel flow: {note}"));
        }
    }
    let empty = Vec::new();
    let relay = doc["relay"].as_array().unwrap_or(&empty);
    let open = |protocol: &str| -> u64 {
        relay
            .iter()
            .filter(|r| r["protocol"] == protocol)
            .filter_map(|r| r["active"].as_u64())
            .sum()
    };
    let (tcp, udp) = (open("tcp"), open("udp"));
    let limit = &doc["relay_udp_sessions"];
    let udp_limit = match (limit["session_limit"].as_u64(), limit["free"].as_u64()) {
        (Some(max), Some(free)) => format!(
            " of {} (of {} free ephemeral ports)",
            count(max),
            count(free)
        ),
        _ => String::new(),
    };
    out.push(format!(
        "relay       {} open: {} TCP connections, {} UDP sessions{udp_limit}",
        count(tcp + udp),
        count(tcp),
        count(udp)
    ));
    out
}

/// The counters of `alias`/`protocol` in a section: the relay's list, or
/// the kernel's object with its `rules` list.
fn find<'a>(section: &'a Value, alias: &str, protocol: &str) -> Option<&'a Value> {
    let list = section.as_array().or_else(|| section["rules"].as_array())?;
    list.iter()
        .find(|c| c["alias"] == alias && c["protocol"] == protocol)
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| "?".to_owned(), str::to_owned)
}

fn number(v: &Value) -> String {
    v.as_u64().map_or_else(|| "?".to_owned(), |n| n.to_string())
}

fn percent(part: u64, whole: u64) -> String {
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

/// 999, 1.2k, 12.3k, 123k, 1.23M, 4.56G.
pub fn count(n: u64) -> String {
    if n < 1000 {
        return n.to_string();
    }
    count_f(n as f64)
}

pub fn count_f(n: f64) -> String {
    scaled(n, 1000.0, &["", "k", "M", "G", "T"])
}

/// Binary units: 512 B, 1.5 KiB, 12.3 MiB, 1.02 GiB.
pub fn bytes(n: f64) -> String {
    let s = scaled(n, 1024.0, &[" B", " KiB", " MiB", " GiB", " TiB"]);
    if n < 1024.0 {
        format!("{} B", n.round() as u64)
    } else {
        s
    }
}

fn scaled(mut n: f64, step: f64, units: &[&str]) -> String {
    let mut unit = 0;
    while n >= step && unit + 1 < units.len() {
        n /= step;
        unit += 1;
    }
    let digits = if unit == 0 || n >= 100.0 {
        0
    } else if n >= 10.0 {
        1
    } else {
        2
    };
    if unit == 0 {
        return format!("{}{}", n.round() as u64, units[0]);
    }
    format!("{n:.digits$}{}", units[unit])
}

/// 45s, 3m07s, 2h05m, 3d04h.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Cuts a line to `width` characters, marking the cut.
fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_owned();
    }
    let mut cut: String = line.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(uptime_ms: u64, bytes_fwd: u64, packets: u64, relay_bytes: u64) -> Value {
        json!({
            "pid": 42,
            "uptime_ms": uptime_ms,
            "config": "/etc/forwarder.yaml",
            "kernel_path": true,
            "rules": [
                {"rule_id": 0, "alias": "turn-tcp", "protocol": "tcp", "bind": "[::]:7878",
                 "backends": ["10.0.0.5:3478"], "path": "auto"},
                {"rule_id": 1, "alias": "turn-udp", "protocol": "udp", "bind": "[::]:7878",
                 "backends": ["10.0.0.5:3478", "10.0.0.6:3478", "10.0.0.7:3478", "10.0.0.8:3478"],
                 "path": "auto"}
            ],
            "relay": [
                {"rule_id": 0, "alias": "turn-tcp", "protocol": "tcp", "flows": 0, "active": 0,
                 "bytes_to_backend": 0, "bytes_to_client": 0, "datagrams_to_backend": 0,
                 "datagrams_to_client": 0, "connect_failures": 0, "sessions_refused": 0, "errors": 0},
                {"rule_id": 1, "alias": "turn-udp", "protocol": "udp", "flows": 1, "active": 1,
                 "bytes_to_backend": relay_bytes, "bytes_to_client": relay_bytes,
                 "datagrams_to_backend": 5, "datagrams_to_client": 5, "connect_failures": 0,
                 "sessions_refused": 0, "errors": 0}
            ],
            "relay_udp_sessions": {"open": 1, "range": [32768, 60999], "free": 8232,
                                   "kept_for_host": 2058, "session_limit": 6174},
            "kernel": {
                "interfaces": [],
                "rules": [
                    {"rule_id": 0, "alias": "turn-tcp", "protocol": "tcp", "packets_fwd": packets,
                     "bytes_fwd": bytes_fwd, "packets_rev": packets, "bytes_rev": 0, "flows": 1,
                     "xdp_packets": 0, "fallback_full": 0, "fallback_other": 0, "dropped": 0},
                    {"rule_id": 1, "alias": "turn-udp", "protocol": "udp", "packets_fwd": 0,
                     "bytes_fwd": 0, "packets_rev": 0, "bytes_rev": 0, "flows": 0,
                     "xdp_packets": 0, "fallback_full": 0, "fallback_other": 1, "dropped": 0,
                     "fallbacks": {"fragment": 1}}
                ],
                "conntrack_entries": 2, "relay_flow_entries": 1, "expired_flows": 0,
                "conntrack_capacity": 65536, "snat_ports": 20000, "snat_ports_in_use": 1
            }
        })
    }

    #[test]
    fn units_are_human() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1234), "1.23k");
        assert_eq!(count(12_345), "12.3k");
        assert_eq!(count(123_456), "123k");
        assert_eq!(count(4_560_000), "4.56M");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.50 KiB");
        assert_eq!(bytes(5.0 * 1024.0 * 1024.0), "5.00 MiB");
        assert_eq!(bytes(300.0 * 1024.0 * 1024.0 * 1024.0), "300 GiB");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(187), "3m07s");
        assert_eq!(duration(7500), "2h05m");
        assert_eq!(duration(3 * 86_400 + 4 * 3600), "3d04h");
    }

    #[test]
    fn relay_refusals_at_a_bound_are_noted() {
        let relay = relay_path_counts(
            &json!({"flows": 9, "connections_refused": 51, "first_byte_timeouts": 2}),
            "tcp",
            None,
        );
        assert_eq!(
            relay.notes,
            [
                "reset at max_connections: 51",
                "reset, silent past first_byte_timeout: 2"
            ],
        );
    }

    #[test]
    fn acl_denials_are_noted_on_both_paths() {
        let kernel = kernel_path_counts(&json!({"flows": 1, "acl_denied": 2}));
        assert!(
            kernel.notes.contains(&"denied by the ACL: 2".to_owned()),
            "{kernel:?}"
        );
        let relay = relay_path_counts(&json!({"flows": 1, "acl_denied": 3}), "tcp", None);
        assert!(
            relay.notes.contains(&"denied by the ACL: 3".to_owned()),
            "{relay:?}"
        );
        let none = relay_path_counts(&json!({"flows": 1, "acl_denied": 0}), "tcp", None);
        assert!(none.notes.is_empty(), "{none:?}");
    }

    #[test]
    fn moved_host_flows_get_a_line_only_when_there_are_some() {
        let doc = |moved: u64| {
            json!({"kernel": {"conntrack_entries": 4, "conntrack_capacity": 100,
                              "snat_ports": 20000, "snat_ports_in_use": 1,
                              "host_flows_moved": moved}})
        };
        let line = "host NAT    3 host flows moved off kernel flows' SNAT ports".to_owned();
        assert!(totals(&doc(3)).contains(&line), "{:?}", totals(&doc(3)));
        assert!(
            !totals(&doc(0)).iter().any(|l| l.starts_with("host NAT")),
            "{:?}",
            totals(&doc(0))
        );
    }

    #[test]
    fn snat_addresses_get_a_line_only_when_set() {
        let doc = |addrs: serde_json::Value| {
            json!({"kernel": {"conntrack_entries": 4, "conntrack_capacity": 100,
                              "snat_ports": 20000, "snat_ports_in_use": 1,
                              "snat_addresses": addrs}})
        };
        let set = totals(&doc(json!(["10.1.0.10", "10.1.0.11"])));
        let line = "SNAT addrs  2: 10.1.0.10, 10.1.0.11 (the ports above are per address)";
        assert!(set.contains(&line.to_owned()), "{set:?}");
        let unset = totals(&doc(json!([])));
        assert!(
            !unset.iter().any(|l| l.starts_with("SNAT addrs")),
            "{unset:?}"
        );
    }

    #[test]
    fn many_targets_are_elided() {
        let t = |n: usize| (0..n).map(|i| format!("10.0.0.{i}:1")).collect::<Vec<_>>();
        assert_eq!(targets_elided(&t(0)), "-");
        assert_eq!(targets_elided(&t(1)), "10.0.0.0:1");
        assert_eq!(targets_elided(&t(2)), "10.0.0.0:1, 10.0.0.1:1");
        assert_eq!(targets_elided(&t(5)), "10.0.0.0:1, 10.0.0.1:1 +3 more");
    }

    #[test]
    fn rates_come_from_the_daemon_clock_between_two_documents() {
        let before = doc(10_000, 0, 0, 100);
        let now = doc(12_000, 4 * 1024 * 1024, 2000, 100);
        let earlier = Earlier {
            doc: &before,
            measured_secs: 9.0,
        };
        let text = render(&now, Some(&earlier));
        assert!(
            text.contains("rates over the last 2.0 s (daemon clock)"),
            "{text}"
        );
        let kernel_tcp = text
            .lines()
            .skip_while(|l| !l.starts_with("turn-tcp"))
            .nth(1)
            .unwrap();
        // 4 MiB and 4,000 packets in 2 s.
        assert!(kernel_tcp.contains("2.00 MiB/s"), "{kernel_tcp}");
        assert!(kernel_tcp.contains("2.00k/s"), "{kernel_tcp}");
        assert!(kernel_tcp.contains("4.00 MiB"), "{kernel_tcp}");
        assert!(
            kernel_tcp.trim_start().starts_with("kernel"),
            "{kernel_tcp}"
        );
        assert!(
            text.contains(
                "turn-udp  udp  [::]:7878 -> 10.0.0.5:3478, 10.0.0.6:3478 +2 more  path auto"
            ),
            "{text}"
        );
        assert!(text.contains("to relay: fragment 1"), "{text}");
        assert!(text.contains("1 fell back from kernel"), "{text}");
        assert!(
            text.contains("conntrack   1 of 65.5k flows (0.0%)"),
            "{text}"
        );
        assert!(text.contains("SNAT ports  1 of 20.0k in use"), "{text}");
        assert!(
            text.contains(
                "relay       1 open: 0 TCP connections, 1 UDP sessions of 6.17k (of 8.23k free \
                 ephemeral ports)"
            ),
            "{text}"
        );
        for line in text.lines() {
            assert!(line.chars().count() <= WIDTH, "too wide: {line}");
        }
    }

    #[test]
    fn without_the_daemon_clock_the_client_measure_is_used() {
        let mut before = doc(0, 0, 0, 0);
        let mut now = doc(0, 1000, 0, 0);
        before.as_object_mut().unwrap().remove("uptime_ms");
        now.as_object_mut().unwrap().remove("uptime_ms");
        let earlier = Earlier {
            doc: &before,
            measured_secs: 0.5,
        };
        let text = render(&now, Some(&earlier));
        assert!(
            text.contains("rates over the last 0.5 s (client clock)"),
            "{text}"
        );
        assert!(text.contains("1.95 KiB/s"), "{text}");
    }

    #[test]
    fn the_headline_says_how_docker_discovery_goes() {
        let mut doc =
            json!({"pid": 7, "kernel_path": true, "rules": [], "relay": [], "kernel": null});
        assert!(!render(&doc, None).contains("docker"));
        doc["docker"] = json!({"connected": true, "containers": [
            {"name": "a", "aliases": ["a"], "errors": []},
            {"name": "b", "aliases": [], "errors": ["bad"]}]});
        assert!(render(&doc, None).contains("docker: 2 containers, 1 skipped"));
        doc["docker"] = json!({"connected": false, "error": "no socket", "retry_in_ms": 4000,
                               "containers": []});
        assert!(render(&doc, None).contains("docker unreachable (retry in 4 s)"));
    }

    #[test]
    fn the_headline_says_the_daemons_descriptors_and_memory() {
        let mut doc =
            json!({"pid": 7, "kernel_path": true, "rules": [], "relay": [], "kernel": null});
        assert!(!render(&doc, None).contains("fds"));
        doc["process"] = json!({"open_fds": 10042, "rss_bytes": 48_234_496, "max_fds": 20000});
        let text = render(&doc, None);
        assert!(text.contains("10042 fds, 46.0 MiB resident"), "{text}");
    }

    #[test]
    fn missing_and_unknown_fields_are_tolerated() {
        let now = json!({
            "pid": 7,
            "kernel_path": false,
            "rules": [{"alias": "dns", "protocol": "udp", "bind": "0.0.0.0:53",
                       "backends": ["10.0.0.1:53"], "path": "relay", "acl": "2 rules",
                       "health_check": null, "health": []}],
            "relay": [{"alias": "dns", "protocol": "udp", "flows": 3}],
            "kernel": null
        });
        let text = render(&now, None);
        assert!(text.contains("kernel path off (relay only)"), "{text}");
        assert!(text.contains("rates: need two samples"), "{text}");
        assert!(text.contains("path relay  acl 2 rules"), "{text}");
        assert!(!text.contains("health"), "{text}");
        let relay = text
            .lines()
            .find(|l| l.trim_start().starts_with("relay "))
            .unwrap();
        assert!(relay.contains("  3  "), "{relay}");
        assert!(!text.contains("conntrack"), "{text}");
        // A rule whose counters are missing altogether still has its line.
        let bare = json!({"rules": [{"alias": "x"}]});
        assert!(render(&bare, None).contains("x  ?  ? -> -  path ?"));
    }

    #[test]
    fn a_checked_rule_shows_its_check_and_the_backends_it_took_out() {
        let mut now = doc(0, 0, 0, 0);
        let rule = &mut now["rules"][1];
        rule["health_check"] = json!("tcp connect every 5s, timeout 2s");
        rule["health"] = json!([
            {"backend": "10.0.0.5:3478", "weight": 1, "state": "up", "checked": true},
            {"backend": "10.0.0.6:3478", "weight": 1, "state": "down", "checked": true,
             "last_failure": "connection refused"},
        ]);
        now["relay"][1]["no_backend"] = json!(3);
        now["kernel"]["rules"][1]["icmp_sent"] = json!(2);
        let text = render(&now, None);
        let mut lines = text.lines().skip_while(|l| !l.starts_with("turn-udp"));
        assert!(lines.next().unwrap().ends_with("path auto"), "{text}");
        assert_eq!(
            lines.next(),
            Some("    health: 1 of 2 up; tcp connect every 5s, timeout 2s")
        );
        assert_eq!(
            lines.next(),
            Some("    down: 10.0.0.6:3478 (connection refused)")
        );
        assert!(text.contains("refused, every backend down: 3"), "{text}");
        assert!(text.contains("ICMP errors sent: 2"), "{text}");
    }

    #[test]
    fn trusted_upstreams_refused_for_their_proxy_headers_are_shown() {
        let mut now = doc(0, 0, 0, 0);
        now["relay"][0]["proxy_headers_refused"] = json!(4);
        let text = render(&now, None);
        assert!(text.contains("PROXY headers refused: 4"), "{text}");
    }

    #[test]
    fn ports_of_unanswered_flows_taken_over_are_shown() {
        let mut now = doc(0, 0, 0, 0);
        now["kernel"]["rules"][1]["unanswered_taken_over"] = json!(7);
        let text = render(&now, None);
        assert!(text.contains("unanswered flows' ports taken: 7"), "{text}");
    }

    #[test]
    fn a_counter_that_went_back_has_no_rate() {
        let before = doc(1000, 5000, 10, 0);
        let now = doc(2000, 100, 1, 0);
        let earlier = Earlier {
            doc: &before,
            measured_secs: 1.0,
        };
        let text = render(&now, Some(&earlier));
        let kernel_tcp = text
            .lines()
            .skip_while(|l| !l.starts_with("turn-tcp"))
            .nth(1)
            .unwrap();
        assert!(!kernel_tcp.contains("/s"), "{kernel_tcp}");
    }
}
