//! The Prometheus endpoint (`metrics: {listen: ...}`): `GET /metrics`
//! answers with the daemon's counters in the OpenMetrics text format,
//! built fresh from the same sources as `forwarder status`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use forwarder_common::reasons::{Dropped, Fallback, XdpPass};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::docker::DiscoveryStatus;
use crate::health::BackendStatus;
use crate::kernel::{KernelCounters, KernelRuleCounters};
use crate::process::Footprint;
use crate::relay::RelayRuleCounters;

/// The content type of what [`render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything one scrape reports.
pub struct Sample<'a> {
    pub relay: &'a [RelayRuleCounters],
    /// `None` without a kernel path.
    pub kernel: Option<&'a KernelCounters>,
    /// Each rule's backends: (alias, protocol, their health).
    pub health: Vec<(String, &'static str, Vec<BackendStatus>)>,
    /// `None` without `docker:`.
    pub docker: Option<&'a DiscoveryStatus>,
    /// The daemon's descriptors and memory; `None` if /proc could not say.
    pub process: Option<Footprint>,
}

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type GaugesF64 = Family<Labels, Gauge<f64, AtomicU64>>;

fn rule_labels(alias: &str, protocol: &str, path: &'static str) -> Labels {
    vec![
        ("alias", alias.to_owned()),
        ("protocol", protocol.to_owned()),
        ("path", path.to_owned()),
    ]
}

fn with(mut labels: Labels, key: &'static str, value: &str) -> Labels {
    labels.push((key, value.to_owned()));
    labels
}

/// The families of one scrape, registered in `registry` as they are made.
struct Families {
    packets: Counters,
    bytes: Counters,
    flows: Counters,
    xdp_packets: Counters,
    fallbacks: Counters,
    xdp_passes: Counters,
    xdp_passes_without_rule: Counters,
    drops: Counters,
    icmp_translated: Counters,
    icmp_sent: Counters,
    acl_denied: Counters,
    unanswered_taken_over: Counters,
    relay_active: Gauges,
    relay_refused: Counters,
    relay_connect_failures: Counters,
    relay_errors: Counters,
    backend_up: Gauges,
}

impl Families {
    fn register(registry: &mut Registry) -> Families {
        let mut counter = |name: &str, help: &str| {
            let family = Counters::default();
            registry.register(name, help, family.clone());
            family
        };
        let packets = counter(
            "forwarder_packets",
            "Packets each way (direction to_backend or to_client); the relay counts UDP datagrams only",
        );
        let bytes = counter(
            "forwarder_bytes",
            "Bytes each way, as the path carried them",
        );
        let flows = counter("forwarder_flows_opened", "Flows the path opened");
        let xdp_packets = counter(
            "forwarder_xdp_packets",
            "Packets of kernel flows that XDP carried (TC carried the rest)",
        );
        let fallbacks = counter(
            "forwarder_fallbacks",
            "New flows the kernel path left to the relay, by reason",
        );
        let xdp_passes = counter(
            "forwarder_xdp_passes",
            "Packets of a rule's kernel flows that XDP left to TC, by reason",
        );
        let xdp_passes_without_rule = counter(
            "forwarder_xdp_passes_without_rule",
            "Packets XDP left to TC before it knew their rule, by reason",
        );
        let drops = counter(
            "forwarder_drops",
            "Packets of kernel flows dropped, by reason",
        );
        let icmp_translated = counter(
            "forwarder_icmp_errors_translated",
            "ICMP errors about kernel flows translated and sent to the other side",
        );
        let icmp_sent = counter(
            "forwarder_icmp_errors_sent",
            "ICMP errors sent for kernel flows' packets that could not be forwarded",
        );
        let acl_denied = counter(
            "forwarder_acl_denied",
            "New flows' first packets (kernel) or connections and datagrams (relay) the ACL denied",
        );
        let unanswered_taken_over = counter(
            "forwarder_unanswered_taken_over",
            "New kernel flows that took the SNAT port of an unanswered, quiet UDP flow",
        );
        let relay_refused = counter(
            "forwarder_relay_refused",
            "New relay flows refused, by reason",
        );
        let relay_connect_failures = counter(
            "forwarder_relay_connect_failures",
            "TCP connects of the relay to a backend that failed",
        );
        let relay_errors = counter("forwarder_relay_errors", "Other I/O errors of the relay");
        let relay_active = Gauges::default();
        registry.register(
            "forwarder_relay_active_flows",
            "Relay TCP connections or UDP sessions open now",
            relay_active.clone(),
        );
        let backend_up = Gauges::default();
        registry.register(
            "forwarder_backend_up",
            "1 if the backend takes new flows, 0 if its health checks took it out",
            backend_up.clone(),
        );
        Families {
            packets,
            bytes,
            flows,
            xdp_packets,
            fallbacks,
            xdp_passes,
            xdp_passes_without_rule,
            drops,
            icmp_translated,
            icmp_sent,
            acl_denied,
            unanswered_taken_over,
            relay_active,
            relay_refused,
            relay_connect_failures,
            relay_errors,
            backend_up,
        }
    }

    fn set(family: &Counters, labels: Labels, value: u64) {
        family.get_or_create(&labels).inc_by(value);
    }

    fn kernel_rule(&self, k: &KernelRuleCounters) {
        let labels = rule_labels(&k.alias, k.protocol, "kernel");
        let each_way = [
            ("to_backend", k.packets_fwd, k.bytes_fwd),
            ("to_client", k.packets_rev, k.bytes_rev),
        ];
        for (direction, packets, bytes) in each_way {
            let l = with(labels.clone(), "direction", direction);
            Self::set(&self.packets, l.clone(), packets);
            Self::set(&self.bytes, l, bytes);
        }
        Self::set(&self.flows, labels.clone(), k.flows);
        Self::set(&self.xdp_packets, labels.clone(), k.xdp_packets);
        Self::set(&self.icmp_translated, labels.clone(), k.icmp_translated);
        Self::set(&self.icmp_sent, labels.clone(), k.icmp_sent);
        Self::set(&self.acl_denied, labels.clone(), k.acl_denied);
        Self::set(
            &self.unanswered_taken_over,
            labels.clone(),
            k.unanswered_taken_over,
        );
        let count = |map: &std::collections::BTreeMap<&'static str, u64>, name: &str| {
            map.get(name).copied().unwrap_or(0)
        };
        for r in Fallback::ALL {
            let l = with(labels.clone(), "reason", r.name());
            Self::set(&self.fallbacks, l, count(&k.fallbacks, r.name()));
        }
        for r in XdpPass::ALL {
            let l = with(labels.clone(), "reason", r.name());
            Self::set(&self.xdp_passes, l, count(&k.xdp_passes, r.name()));
        }
        for r in Dropped::ALL {
            let l = with(labels.clone(), "reason", r.name());
            Self::set(&self.drops, l, count(&k.drops, r.name()));
        }
    }

    fn relay_rule(&self, r: &RelayRuleCounters) {
        let labels = rule_labels(&r.alias, r.protocol, "relay");
        let each_way = [
            ("to_backend", r.datagrams_to_backend, r.bytes_to_backend),
            ("to_client", r.datagrams_to_client, r.bytes_to_client),
        ];
        for (direction, datagrams, bytes) in each_way {
            let l = with(labels.clone(), "direction", direction);
            // A TCP relay flow has no packets of its own (the sockets segment it).
            if r.protocol == "udp" {
                Self::set(&self.packets, l.clone(), datagrams);
            }
            Self::set(&self.bytes, l, bytes);
        }
        Self::set(&self.flows, labels.clone(), r.flows);
        Self::set(&self.acl_denied, labels.clone(), r.acl_denied);
        let refused = [
            ("session_table_full", r.sessions_refused),
            ("no_backend", r.no_backend),
            ("proxy_header", r.proxy_headers_refused),
            ("client_ip", r.client_ip_refused),
            ("max_connections", r.connections_refused),
            ("first_byte_timeout", r.first_byte_timeouts),
        ];
        for (reason, n) in refused {
            Self::set(
                &self.relay_refused,
                with(labels.clone(), "reason", reason),
                n,
            );
        }
        Self::set(
            &self.relay_connect_failures,
            labels.clone(),
            r.connect_failures,
        );
        Self::set(&self.relay_errors, labels.clone(), r.errors);
        self.relay_active
            .get_or_create(&labels)
            .set(r.active as i64);
    }
}

/// One gauge without labels.
fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

/// The exposition of `sample`.
pub fn render(sample: &Sample) -> String {
    let mut registry = Registry::default();
    let build = Gauges::default();
    registry.register(
        "forwarder_build_info",
        "Always 1; the labels say which build runs",
        build.clone(),
    );
    build
        .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
        .set(1);
    let f = Families::register(&mut registry);
    for r in sample.relay {
        f.relay_rule(r);
    }
    for (alias, protocol, backends) in &sample.health {
        for b in backends {
            let labels = vec![
                ("alias", alias.clone()),
                ("protocol", (*protocol).to_owned()),
                ("backend", b.backend.clone()),
            ];
            f.backend_up
                .get_or_create(&labels)
                .set(i64::from(b.state == "up"));
        }
    }
    if let Some(k) = sample.kernel {
        kernel(&mut registry, &f, k);
    }
    if let Some(d) = sample.docker {
        docker(&mut registry, d);
    }
    if let Some(p) = sample.process {
        process(&mut registry, p);
    }
    // About 2.5 KB per rule and path: sized once, not grown by doubling
    // (10,000 rules make 47 MB).
    let mut out = String::with_capacity(4096 + 2560 * (sample.relay.len() * 2));
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

/// The conventional process gauges (as the Prometheus clients name them).
fn process(registry: &mut Registry, p: Footprint) {
    gauge(
        registry,
        "process_open_fds",
        "Open file descriptors of the daemon",
        p.open_fds as i64,
    );
    gauge(
        registry,
        "process_max_fds",
        "The daemon's soft limit of open file descriptors",
        p.max_fds as i64,
    );
    gauge(
        registry,
        "process_resident_memory_bytes",
        "Resident memory of the daemon in bytes",
        p.rss_bytes as i64,
    );
}

fn kernel(registry: &mut Registry, f: &Families, k: &KernelCounters) {
    for rule in &k.rules {
        f.kernel_rule(rule);
    }
    for r in [XdpPass::Unparsed, XdpPass::ChecksumPartial, XdpPass::NoFlow] {
        let n = k
            .xdp_passes_without_rule
            .get(r.name())
            .copied()
            .unwrap_or(0);
        Families::set(
            &f.xdp_passes_without_rule,
            vec![("reason", r.name().to_owned())],
            n,
        );
    }
    gauge(
        registry,
        "forwarder_conntrack_flows",
        "Kernel flows in the conntrack table at the sweeper's last pass",
        (k.conntrack_entries / 2) as i64,
    );
    gauge(
        registry,
        "forwarder_conntrack_capacity_flows",
        "Kernel flows the conntrack table holds at most",
        k.conntrack_capacity as i64,
    );
    gauge(
        registry,
        "forwarder_snat_ports",
        "SNAT ports each (source address, backend) pair can hand out",
        k.snat_ports as i64,
    );
    gauge(
        registry,
        "forwarder_snat_ports_in_use_busiest_backend",
        "SNAT ports in use toward the busiest backend at the sweeper's last pass",
        k.snat_ports_in_use as i64,
    );
    let per_backend = Gauges::default();
    registry.register(
        "forwarder_snat_ports_in_use",
        "SNAT ports in use per source address and backend at the sweeper's last pass",
        per_backend.clone(),
    );
    for u in &k.snat_ports_in_use_per_backend {
        let labels = vec![
            ("source", u.source.to_string()),
            ("backend", u.backend.to_string()),
            ("protocol", u.protocol.to_owned()),
        ];
        per_backend.get_or_create(&labels).set(u.ports as i64);
    }
    counter(
        registry,
        "forwarder_kernel_flows_expired",
        "Kernel flows the sweeper expired",
        k.expired_flows,
    );
    counter(
        registry,
        "forwarder_sweeper_passes",
        "Sweeper passes over the conntrack table completed",
        k.sweeper_passes,
    );
    let seconds = |ns: u64| ns as f64 / 1e9;
    let total: Counter<f64, AtomicU64> = Counter::default();
    total.inc_by(seconds(k.sweeper_passes_ns));
    registry.register(
        "forwarder_sweeper_pass_seconds",
        "Time the sweeper spent in its ticks, all together",
        total,
    );
    let last = GaugesF64::default();
    registry.register(
        "forwarder_sweeper_last_pass_seconds",
        "Time the sweeper spent in the ticks of its last pass",
        last.clone(),
    );
    last.get_or_create(&Vec::new())
        .set(seconds(k.sweeper_last_pass_ns));
}

fn docker(registry: &mut Registry, d: &DiscoveryStatus) {
    gauge(
        registry,
        "forwarder_docker_connected",
        "1 while Docker discovery follows the Engine's events, else 0",
        i64::from(d.connected),
    );
    let containers = Gauges::default();
    registry.register(
        "forwarder_docker_containers",
        "Containers with proxy labels, by state (routed or skipped for errors)",
        containers.clone(),
    );
    let skipped = d.containers.iter().filter(|c| !c.errors.is_empty()).count();
    for (state, n) in [
        ("routed", d.containers.len() - skipped),
        ("skipped", skipped),
    ] {
        containers
            .get_or_create(&vec![("state", state.to_owned())])
            .set(n as i64);
    }
}

/// Produces the exposition of one scrape, or why it cannot (it may
/// block: map reads).
pub type ScrapeFn = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Binds the endpoint's socket.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen: cannot listen on {listen}: {e}"))
}

/// The socket an upgrade handed over, if it is still bound to `listen`;
/// otherwise (or without one) a new one.
pub async fn adopt_or_bind(handed: Option<i32>, listen: SocketAddr) -> anyhow::Result<TcpListener> {
    if let Some(fd) = handed {
        let std = std::net::TcpListener::from(crate::relay::gate::own_fd(fd)?);
        if std.local_addr().ok() == Some(listen) {
            std.set_nonblocking(true)?;
            return Ok(TcpListener::from_std(std)?);
        }
    }
    bind(listen).await
}

/// How long a stop waits for the scrapes under way.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves `GET /metrics` on `listener` until aborted, or until `stop`:
/// then it accepts no more, lets the connections it has get their answer
/// (at most [`STOP_WAIT`]) and returns the listener, whose backlog keeps
/// new connections for whoever serves it next.
pub async fn serve(
    listener: TcpListener,
    scrape: ScrapeFn,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> TcpListener {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let scrape = scrape.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, scrape.clone()));
            let io = hyper_util::rt::TokioIo::new(stream);
            // One request per connection: at a stop, every accepted
            // connection is owed exactly one answer (a graceful shutdown
            // would close one whose request is not read yet).
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(io, service)
                .await;
        });
    }
    let _ = tokio::time::timeout(STOP_WAIT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    listener
}

async fn answer(
    req: Request<Incoming>,
    scrape: ScrapeFn,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = |status: StatusCode, text: &str| {
        let mut r = Response::new(Full::new(Bytes::from(text.to_owned())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return Ok(plain(StatusCode::NOT_FOUND, "only /metrics is served\n"));
    }
    if req.method() != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut()
            .insert(hyper::header::ALLOW, "GET".parse().expect("a header value"));
        return Ok(r);
    }
    let body = match tokio::task::spawn_blocking(move || scrape()).await {
        Ok(Ok(body)) => body,
        Ok(Err(why)) => {
            return Ok(plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("{why}\n"),
            ));
        }
        Err(_) => {
            return Ok(plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the scrape failed\n",
            ));
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        CONTENT_TYPE.parse().expect("a header value"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::ContainerStatus;

    fn relay(alias: &str, protocol: &'static str) -> RelayRuleCounters {
        RelayRuleCounters {
            rule_id: 0,
            alias: alias.to_owned(),
            protocol,
            flows: 3,
            bytes_to_backend: 100,
            bytes_to_client: 200,
            datagrams_to_backend: 4,
            datagrams_to_client: 5,
            connect_failures: 6,
            sessions_refused: 7,
            connections_refused: 0,
            first_byte_timeouts: 0,
            proxy_headers_refused: 0,
            no_backend: 8,
            client_ip_refused: 0,
            acl_denied: 9,
            errors: 10,
            active: 2,
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn each_rule_is_labelled_by_alias_protocol_and_path_with_reasons_and_base_units() {
        let mut rule = KernelRuleCounters {
            alias: "dns".into(),
            protocol: "udp",
            packets_fwd: 11,
            bytes_fwd: 1200,
            flows: 1,
            ..KernelRuleCounters::default()
        };
        rule.fallbacks.insert("no_route", 2);
        rule.drops.insert("too_big", 3);
        let mut kernel = KernelCounters {
            rules: vec![rule],
            conntrack_entries: 8,
            snat_ports_in_use_per_backend: vec![crate::kernel::SnatUse {
                source: "10.0.0.1".parse().unwrap(),
                backend: "10.0.0.5:53".parse().unwrap(),
                protocol: "udp",
                ports: 6,
            }],
            sweeper_last_pass_ns: 1_500_000,
            ..KernelCounters::default()
        };
        kernel.xdp_passes_without_rule.insert("no_flow", 4);
        let docker = DiscoveryStatus {
            connected: true,
            containers: vec![
                ContainerStatus {
                    name: "a".into(),
                    aliases: vec!["dns".into()],
                    errors: vec![],
                },
                ContainerStatus {
                    name: "b".into(),
                    aliases: vec![],
                    errors: vec!["bad label".into()],
                },
            ],
            ..DiscoveryStatus::default()
        };
        let text = render(&Sample {
            relay: &[relay("dns", "udp"), relay("ssh", "tcp")],
            kernel: Some(&kernel),
            health: vec![(
                "dns".into(),
                "udp",
                vec![BackendStatus {
                    backend: "10.0.0.5:53".into(),
                    weight: 1,
                    state: "down",
                    checked: true,
                    last_change: None,
                    last_failure: None,
                }],
            )],
            docker: Some(&docker),
            process: Some(Footprint {
                open_fds: 41,
                rss_bytes: 9 << 20,
                max_fds: 20_000,
            }),
        });
        let l = lines(&text);
        let k = r#"alias="dns",protocol="udp",path="kernel""#;
        for want in [
            format!(r#"forwarder_packets_total{{{k},direction="to_backend"}} 11"#),
            format!(r#"forwarder_bytes_total{{{k},direction="to_backend"}} 1200"#),
            format!(r#"forwarder_fallbacks_total{{{k},reason="no_route"}} 2"#),
            format!(r#"forwarder_fallbacks_total{{{k},reason="fragment"}} 0"#),
            format!(r#"forwarder_drops_total{{{k},reason="too_big"}} 3"#),
            format!(r#"forwarder_xdp_passes_total{{{k},reason="tcp_control"}} 0"#),
            r#"forwarder_xdp_passes_without_rule_total{reason="no_flow"} 4"#.into(),
            r#"forwarder_relay_refused_total{alias="dns",protocol="udp",path="relay",reason="no_backend"} 8"#.into(),
            r#"forwarder_relay_active_flows{alias="dns",protocol="udp",path="relay"} 2"#.into(),
            r#"forwarder_packets_total{alias="dns",protocol="udp",path="relay",direction="to_client"} 5"#.into(),
            r#"forwarder_backend_up{alias="dns",protocol="udp",backend="10.0.0.5:53"} 0"#.into(),
            "forwarder_conntrack_flows 4".into(),
            r#"forwarder_snat_ports_in_use{source="10.0.0.1",backend="10.0.0.5:53",protocol="udp"} 6"#.into(),
            "forwarder_sweeper_last_pass_seconds 0.0015".into(),
            "forwarder_docker_connected 1".into(),
            "process_open_fds 41".into(),
            "process_max_fds 20000".into(),
            "process_resident_memory_bytes 9437184".into(),
            r#"forwarder_docker_containers{state="skipped"} 1"#.into(),
            format!(
                r#"forwarder_build_info{{version="{}"}} 1"#,
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(l.contains(&want.as_str()), "no `{want}` in\n{text}");
        }
        // A TCP relay flow has no packets of its own.
        assert!(
            !text.contains(r#"forwarder_packets_total{alias="ssh""#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn without_a_kernel_path_or_docker_their_metrics_are_left_out() {
        let text = render(&Sample {
            relay: &[relay("dns", "udp")],
            kernel: None,
            health: vec![],
            docker: None,
            process: None,
        });
        for absent in [
            "path=\"kernel\"",
            "forwarder_conntrack",
            "forwarder_docker",
            "process_",
        ] {
            assert!(
                !text
                    .lines()
                    .any(|l| !l.starts_with('#') && l.contains(absent)),
                "{absent} in\n{text}"
            );
        }
    }
}
