//! The Prometheus endpoint (`metrics:`): scraped over HTTP inside the
//! forwarder's namespace and parsed by the Prometheus project's own
//! Python parser (Debian's `python3-prometheus-client`); its counters move
//! exactly with the traffic sent, and a fallback shows under its reason.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use forwarder_common::reasons::Fallback;

use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule};
use crate::common::traffic::{BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket};
use crate::common::turn::{listener_addr, turn_rules};
use crate::common::{self, Netns, Topology};

/// Debian's interpreter, which has Debian's python3-prometheus-client.
const PYTHON: &str = "/usr/bin/python3";
/// The parser of the format the endpoint serves (OpenMetrics text; the
/// package's classic-format parser does not tie `_total` to its counter).
const PARSE: &str = "
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([family.type, s.name, s.labels, s.value])
print(json.dumps(out))
";

fn parser_present(test: &str) -> bool {
    let present = Command::new(PYTHON)
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    common::require_tool(test, "python3-prometheus-client", present)
}

/// One sample of a parsed scrape.
#[derive(Debug)]
struct Sample {
    family_type: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Scrape(Vec<Sample>);

impl Scrape {
    /// The one sample `name` whose labels include `labels`.
    fn sample(&self, name: &str, labels: &[(&str, &str)]) -> &Sample {
        let found: Vec<&Sample> = self
            .0
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:#?}");
        found[0]
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sample(name, labels).value
    }
}

/// One HTTP/1.1 request to `addr` in `ns`; the status line and the body.
fn http(ns: &Netns, addr: SocketAddr, method: &str, path: &str) -> (String, String) {
    in_netns(ns, || {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(common::harness::WAIT)).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        (head.to_owned(), body.to_owned())
    })
}

/// `GET /metrics`, parsed.
fn scrape(ns: &Netns, addr: SocketAddr) -> Scrape {
    let (head, body) = http(ns, addr, "GET", "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    let mut python = Command::new(PYTHON)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the parser");
    python
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the scrape: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    Scrape(
        rows.into_iter()
            .map(|(family_type, name, labels, value)| Sample {
                family_type,
                name,
                labels,
                value,
            })
            .collect(),
    )
}

fn refused(ns: &Netns, addr: SocketAddr) -> bool {
    in_netns(ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

const METRICS: &str = "127.0.0.1:9531";

#[test]
fn scraped_counters_move_exactly_with_the_traffic_and_a_fallback_shows_its_reason() {
    let test = "scraped_counters_move_exactly_with_the_traffic_and_a_fallback_shows_its_reason";
    if !common::require_root(test) || !parser_present(test) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // Room for one kernel flow: the UDP one; the TCP one finds the table full.
    let extra = format!("kernel: {{conntrack_size: 2}}\nmetrics: {{listen: {METRICS}}}\n");
    let yaml = turn_rules(&topo, &extra);
    let daemon = Daemon::start(&topo.forwarder, "metrics", &yaml);
    let at: SocketAddr = METRICS.parse().unwrap();
    let before = scrape(&topo.forwarder, at);
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        // The kernel path: five small datagrams of one flow...
        let kernel_flow = udp_socket(to);
        for n in 0..5u32 {
            udp_echo(&kernel_flow, format!("small {n}").as_bytes());
        }
        // ...and the relay: a flow whose first datagram comes in fragments,
        // and a TCP connection that finds the conntrack table full.
        udp_echo(&udp_socket(to), &[7; 4000]);
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"over TCP");
    });
    let after = scrape(&topo.forwarder, at);
    let moved = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    let udp_kernel = [
        ("alias", "turn-udp"),
        ("protocol", "udp"),
        ("path", "kernel"),
    ];
    let udp_relay = [
        ("alias", "turn-udp"),
        ("protocol", "udp"),
        ("path", "relay"),
    ];
    let with = |labels: &[(&'static str, &'static str)], more: (&'static str, &'static str)| {
        let mut l = labels.to_vec();
        l.push(more);
        l
    };
    // Ethernet, IPv4 and UDP headers and the 7 bytes of "small N", as TC counts.
    let small = 14 + 20 + 8 + 7;
    for direction in ["to_backend", "to_client"] {
        let d = ("direction", direction);
        assert_eq!(moved("forwarder_packets_total", &with(&udp_kernel, d)), 5.0);
        assert_eq!(
            moved("forwarder_bytes_total", &with(&udp_kernel, d)),
            (5 * small) as f64
        );
        assert_eq!(moved("forwarder_packets_total", &with(&udp_relay, d)), 1.0);
        assert_eq!(moved("forwarder_bytes_total", &with(&udp_relay, d)), 4000.0);
    }
    assert_eq!(moved("forwarder_flows_opened_total", &udp_kernel), 1.0);
    assert_eq!(moved("forwarder_flows_opened_total", &udp_relay), 1.0);
    // Each fallback under its own reason, and no other reason moved.
    for why in Fallback::ALL {
        let one = |reason| if why == reason { 1.0 } else { 0.0 };
        let l = with(&udp_kernel, ("reason", why.name()));
        assert_eq!(
            moved("forwarder_fallbacks_total", &l),
            one(Fallback::Fragment),
            "{why:?}"
        );
        let tcp = [
            ("alias", "turn-tcp"),
            ("protocol", "tcp"),
            ("reason", why.name()),
        ];
        assert_eq!(
            moved("forwarder_fallbacks_total", &tcp),
            one(Fallback::ConntrackFull),
            "{why:?}"
        );
    }
    let tcp = |path| [("alias", "turn-tcp"), ("protocol", "tcp"), ("path", path)];
    assert_eq!(moved("forwarder_flows_opened_total", &tcp("kernel")), 0.0);
    assert_eq!(moved("forwarder_flows_opened_total", &tcp("relay")), 1.0);
    assert_eq!(after.value("forwarder_relay_active_flows", &udp_relay), 1.0);

    // The same numbers as `forwarder status`.
    let status = daemon.status();
    let k = kernel_rule(&status, "turn-udp", "udp");
    let r = relay_rule(&status, "turn-udp", "udp");
    let d = |direction| ("direction", direction);
    for (metric, labels, value) in [
        (
            "forwarder_packets_total",
            with(&udp_kernel, d("to_backend")),
            counter(k, "packets_fwd"),
        ),
        (
            "forwarder_bytes_total",
            with(&udp_kernel, d("to_client")),
            counter(k, "bytes_rev"),
        ),
        (
            "forwarder_bytes_total",
            with(&udp_relay, d("to_backend")),
            counter(r, "bytes_to_backend"),
        ),
    ] {
        assert_eq!(
            after.value(metric, &labels),
            value as f64,
            "{metric} {labels:?}"
        );
    }

    // Types, as the parser read them, and the daemon-wide metrics.
    for (name, family_type) in [
        ("forwarder_packets_total", "counter"),
        ("forwarder_relay_active_flows", "gauge"),
        ("forwarder_conntrack_flows", "gauge"),
    ] {
        assert_eq!(
            after.sample(name, &udp_relay_or_none(name)).family_type,
            family_type,
            "{name}"
        );
    }
    let build = after.sample("forwarder_build_info", &[]);
    assert_eq!(
        (build.value, build.labels.get("version").map(String::as_str)),
        (1.0, Some(env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(after.value("forwarder_conntrack_capacity_flows", &[]), 1.0);

    // The sweeper's next pass counts the UDP flow's SNAT port toward the
    // backend (one flow, one port), and times itself.
    let backend = format!("{}:3478", topo.backend_addr());
    let snat = [("backend", backend.as_str()), ("protocol", "udp")];
    let passes = after.value("forwarder_sweeper_passes_total", &[]);
    common::eventually("a sweeper pass after the traffic", || {
        scrape(&topo.forwarder, at).value("forwarder_sweeper_passes_total", &[]) > passes + 1.0
    });
    let swept = scrape(&topo.forwarder, at);
    assert_eq!(swept.value("forwarder_snat_ports_in_use", &snat), 1.0);
    assert_eq!(
        swept
            .sample("forwarder_sweeper_pass_seconds_total", &[])
            .family_type,
        "counter"
    );
    assert!(swept.value("forwarder_sweeper_last_pass_seconds", &[]) > 0.0);
    daemon.stop();
}

/// Labels that pick one sample of `name` for the type check.
fn udp_relay_or_none(name: &str) -> Vec<(&'static str, &'static str)> {
    let mut l = vec![];
    if name != "forwarder_conntrack_flows" {
        l.extend([
            ("alias", "turn-udp"),
            ("protocol", "udp"),
            ("path", "relay"),
        ]);
    }
    if name == "forwarder_packets_total" {
        l.push(("direction", "to_backend"));
    }
    l
}

#[test]
fn a_reload_moves_or_closes_the_endpoint_and_only_get_metrics_is_served() {
    let test = "a_reload_moves_or_closes_the_endpoint_and_only_get_metrics_is_served";
    if !common::require_root(test) || !parser_present(test) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let ns = &topo.forwarder;
    let with_metrics =
        |listen: &str| turn_rules(&topo, &format!("metrics: {{listen: {listen}}}\n"));
    let daemon = Daemon::start(ns, "metrics-reload", &with_metrics(METRICS));
    let first: SocketAddr = METRICS.parse().unwrap();
    scrape(ns, first);
    let (head, _) = http(ns, first, "GET", "/");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http(ns, first, "POST", "/metrics");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");

    // Moved by a reload: the new address answers, the old one is closed.
    let second: SocketAddr = "127.0.0.1:9532".parse().unwrap();
    std::fs::write(daemon.config_path(), with_metrics("127.0.0.1:9532")).unwrap();
    let out = daemon.reload();
    assert!(out.status.success(), "{out:?}");
    scrape(ns, second);
    assert!(refused(ns, first), "the old endpoint is closed");

    // A port that is taken: the reload is refused, and nothing changes.
    let taken = in_netns(ns, || TcpListener::bind("127.0.0.1:9533").unwrap());
    std::fs::write(daemon.config_path(), with_metrics("127.0.0.1:9533")).unwrap();
    let out = daemon.reload();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("metrics.listen: cannot listen on 127.0.0.1:9533"),
        "{stderr}"
    );
    scrape(ns, second);
    drop(taken);

    // Left out: the endpoint closes.
    std::fs::write(daemon.config_path(), turn_rules(&topo, "")).unwrap();
    let out = daemon.reload();
    assert!(out.status.success(), "{out:?}");
    assert!(refused(ns, second), "the endpoint is closed");
    daemon.stop();
}

#[test]
fn backend_health_and_docker_discovery_state_are_scraped() {
    let test = "backend_health_and_docker_discovery_state_are_scraped";
    if !common::require_root(test) || !parser_present(test) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    // No backend servers: the checked TCP backend refuses its checks.
    let nowhere = std::env::temp_dir().join(format!("fwdt-{}-no-docker.sock", std::process::id()));
    let yaml = format!(
        "interfaces: [{a}, {b}]\n\
         metrics: {{listen: {METRICS}}}\n\
         docker: {{socket: {socket}}}\n\
         routes:\n\
         \x20 checked: {{scheme: tcp, host: {backend}, port: 7878:3478, \
         healthcheck: {{interval: 200ms, timeout: 200ms, fall: 1, rise: 1}}}}\n\
         \x20 unchecked: {{scheme: udp, host: {backend}, port: 7878:3478}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        socket = nowhere.display(),
        backend = topo.backend_addr(),
    );
    let daemon = Daemon::start(&topo.forwarder, "metrics-health", &yaml);
    let at: SocketAddr = METRICS.parse().unwrap();
    let backend = format!("{}:3478", topo.backend_addr());
    let up = |alias, protocol| {
        let labels = [
            ("alias", alias),
            ("protocol", protocol),
            ("backend", backend.as_str()),
        ];
        scrape(&topo.forwarder, at).value("forwarder_backend_up", &labels)
    };
    common::eventually("the checked backend is down", || {
        up("checked", "tcp") == 0.0
    });
    assert_eq!(
        up("unchecked", "udp"),
        1.0,
        "a backend without checks is up"
    );
    let s = scrape(&topo.forwarder, at);
    assert_eq!(s.value("forwarder_docker_connected", &[]), 0.0);
    for state in ["routed", "skipped"] {
        assert_eq!(
            s.value("forwarder_docker_containers", &[("state", state)]),
            0.0
        );
    }
    daemon.stop();
}
