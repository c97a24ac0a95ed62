//! The configuration each proxy gets: the same ports, forwarded from the
//! forwarder's client-side address to the backend.
use std::fmt::Write;
use std::net::Ipv4Addr;
use std::path::Path;

use super::{connrate, iperf, sockperf};

/// One forwarded port; TCP always, UDP where the traffic has some.
pub struct Forward {
    pub name: &'static str,
    pub port: u16,
    pub udp: bool,
}

pub const FORWARDS: &[Forward] = &[
    Forward {
        name: "iperf",
        port: iperf::PORT,
        udp: true,
    },
    Forward {
        name: "sockperf",
        port: sockperf::PORT,
        udp: true,
    },
    Forward {
        name: "connect",
        port: connrate::PORT,
        udp: false,
    },
];

fn ports(udp_only: bool) -> String {
    FORWARDS
        .iter()
        .filter(|f| f.udp || !udp_only)
        .map(|f| f.port.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// DNAT what the client sends to `listen`, masquerade it towards the backend.
pub fn nftables(listen: Ipv4Addr, backend: Ipv4Addr) -> String {
    format!(
        "table ip fwdbench {{
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip daddr {listen} tcp dport {{ {tcp} }} dnat to {backend}
\t\tip daddr {listen} udp dport {{ {udp} }} dnat to {backend}
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tct status dnat masquerade
\t}}
}}
",
        tcp = ports(false),
        udp = ports(true),
    )
}

/// nginx with only the stream module; everything it writes stays in `dir`.
pub fn nginx(dir: &Path, listen: Ipv4Addr, backend: Ipv4Addr) -> String {
    let dir = dir.display();
    let mut servers = String::new();
    for f in FORWARDS {
        let p = f.port;
        let _ = writeln!(
            servers,
            "    server {{ listen {listen}:{p}; proxy_pass {backend}:{p}; }}"
        );
        if f.udp {
            let _ = writeln!(
                servers,
                "    server {{ listen {listen}:{p} udp; proxy_pass {backend}:{p}; }}"
            );
        }
    }
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
stream {{
{servers}}}
"
    )
}

/// HAProxy in TCP mode (it has no UDP proxy).
pub fn haproxy(listen: Ipv4Addr, backend: Ipv4Addr) -> String {
    let mut out = String::from(
        "global
    maxconn 8192
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
",
    );
    for f in FORWARDS {
        let p = f.port;
        let _ = write!(
            out,
            "listen {name}
    bind {listen}:{p}
    server backend {backend}:{p}
",
            name = f.name
        );
    }
    out
}

/// One socat per port and protocol, forking per connection or UDP peer.
pub fn socat(listen: Ipv4Addr, backend: Ipv4Addr) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for f in FORWARDS {
        let p = f.port;
        all.push(vec![
            format!("TCP-LISTEN:{p},bind={listen},fork,reuseaddr,backlog=4096"),
            format!("TCP:{backend}:{p}"),
        ]);
        if f.udp {
            // -T: a UDP child that hears nothing for this long ends.
            all.push(vec![
                "-T".into(),
                "30".into(),
                format!("UDP-LISTEN:{p},bind={listen},fork,reuseaddr"),
                format!("UDP:{backend}:{p}"),
            ]);
        }
    }
    all
}

/// forwarder's rule file: every port on the protocols it carries, taken by
/// the given `path` (relay, auto, tc, xdp, ...).
pub fn forwarder(backend: Ipv4Addr, path: &str) -> String {
    let mut out = String::from("# Written by `cargo xtask bench`.\nroutes:\n");
    for f in FORWARDS {
        let p = f.port;
        let scheme = if f.udp { "tcp,udp" } else { "tcp" };
        let _ = write!(
            out,
            "  bench-{name}:
    scheme: {scheme}
    host: {backend}
    port: {p}:{p}
    path: {path}
",
            name = f.name
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTEN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);

    #[test]
    fn nftables_forwards_every_port_on_its_protocols() {
        let rules = nftables(LISTEN, BACKEND);
        assert!(
            rules
                .contains("ip daddr 198.18.1.1 tcp dport { 5201, 11111, 5300 } dnat to 198.18.2.2")
        );
        assert!(rules.contains("ip daddr 198.18.1.1 udp dport { 5201, 11111 } dnat to 198.18.2.2"));
        assert!(rules.contains("ct status dnat masquerade"));
    }

    #[test]
    fn nginx_has_a_server_per_port_and_protocol() {
        let conf = nginx(Path::new("/tmp/b"), LISTEN, BACKEND);
        assert_eq!(conf.matches("server {").count(), 5);
        assert!(conf.contains("listen 198.18.1.1:5201 udp; proxy_pass 198.18.2.2:5201;"));
        assert!(!conf.contains("5300 udp"));
        assert!(conf.contains("pid /tmp/b/nginx.pid;"));
    }

    #[test]
    fn haproxy_is_tcp_only() {
        let conf = haproxy(LISTEN, BACKEND);
        assert_eq!(conf.matches("listen ").count(), 3);
        assert!(conf.contains("bind 198.18.1.1:11111\n    server backend 198.18.2.2:11111"));
        assert!(!conf.contains("udp"));
    }

    #[test]
    fn socat_runs_one_process_per_port_and_protocol() {
        let all = socat(LISTEN, BACKEND);
        assert_eq!(all.len(), 5);
        assert!(all.contains(&vec![
            "-T".to_string(),
            "30".into(),
            "UDP-LISTEN:11111,bind=198.18.1.1,fork,reuseaddr".into(),
            "UDP:198.18.2.2:11111".into(),
        ]));
    }

    #[test]
    fn forwarder_rules_use_the_path_asked_for() {
        let yaml = forwarder(BACKEND, "relay");
        assert!(yaml.contains(
            "  bench-iperf:\n    scheme: tcp,udp\n    host: 198.18.2.2\n    port: 5201:5201\n    path: relay\n"
        ));
        assert!(yaml.contains("  bench-connect:\n    scheme: tcp\n"));
        assert_eq!(yaml.matches("path: relay").count(), 3);
    }
}
