//! Which backends may take new flows: active checks from the daemon (one
//! tokio task per backend of a rule with `healthcheck`), and the relay's
//! failed connects, feed one state per backend. The relay's picker reads it;
//! the kernel path is told of every change (see
//! `KernelPath::set_backend_health`). Live flows never look at it.
//!
//! A backend starts healthy (a new or changed rule forwards at once) and is
//! taken out after `fall` failed checks in a row, put back after `rise`
//! passed ones. A rule without `healthcheck` keeps every backend, always:
//! with no check to bring it back, a backend once out would stay out.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::rules::{HealthSpec, Listener, Probe};

/// Told the healthy flags of a rule's backends, in order, after every change.
pub type HealthSink = Arc<dyn Fn(u32, &[bool]) + Send + Sync>;

/// The state of every running rule's backends, and the checks that keep it.
#[derive(Default)]
pub struct HealthBook {
    rules: Mutex<HashMap<u32, Arc<RuleHealth>>>,
    checks: Mutex<HashMap<u32, JoinSet<()>>>,
    sink: Arc<OnceLock<HealthSink>>,
}

impl HealthBook {
    /// The state of `listener`'s backends, made on first use.
    pub fn rule(&self, listener: &Listener) -> Arc<RuleHealth> {
        lock(&self.rules)
            .entry(listener.rule_id)
            .or_insert_with(|| Arc::new(RuleHealth::new(listener, self.sink.clone())))
            .clone()
    }

    /// A state of its own, unchecked (every backend up): for a removed
    /// rule's flows handed over by an upgrade, which take no new flows.
    pub fn detached(listener: &Listener) -> Arc<RuleHealth> {
        let unchecked = Listener {
            health: None,
            ..listener.clone()
        };
        Arc::new(RuleHealth::new(&unchecked, Arc::default()))
    }

    /// Where changes go from now on (the kernel path); set once.
    pub fn set_sink(&self, sink: HealthSink) {
        let _ = self.sink.set(sink);
    }

    /// Makes the checks match `listeners`: rules new here (added, or changed
    /// and so under a fresh id) start theirs, removed rules' checks stop.
    /// Runs on the tokio runtime.
    pub fn sync(&self, listeners: &[Listener]) {
        let running: HashSet<u32> = listeners.iter().map(|l| l.rule_id).collect();
        let mut checks = lock(&self.checks);
        let mut rules = lock(&self.rules);
        rules.retain(|id, _| running.contains(id));
        checks.retain(|id, _| rules.contains_key(id));
        for l in listeners {
            let Some(spec) = &l.health else { continue };
            if checks.contains_key(&l.rule_id) {
                continue;
            }
            let rule = rules
                .entry(l.rule_id)
                .or_insert_with(|| Arc::new(RuleHealth::new(l, self.sink.clone())))
                .clone();
            let mut set = JoinSet::new();
            for index in 0..rule.backends.len() {
                set.spawn(check_loop(rule.clone(), index, spec.clone()));
            }
            checks.insert(l.rule_id, set);
        }
    }

    /// The state of every checked backend, for an upgrade's record.
    pub fn export(&self) -> Vec<HealthRecord> {
        let rules: Vec<Arc<RuleHealth>> = lock(&self.rules).values().cloned().collect();
        let mut records = Vec::new();
        for rule in rules.iter().filter(|r| r.spec.is_some()) {
            let tracks = lock(&rule.track);
            for (b, t) in rule.backends.iter().zip(tracks.iter()) {
                records.push(HealthRecord {
                    alias: rule.alias.clone(),
                    protocol: rule.protocol.to_owned(),
                    backend: b.addr,
                    healthy: b.healthy.load(Relaxed),
                    passes: t.passes,
                    failures: t.failures,
                    last_change_ms: t.last_change.map(unix_ms),
                    last_failure: t.last_failure.clone(),
                });
            }
        }
        records
    }

    /// Takes over the state an upgrade handed over for the backends of
    /// `listeners` (same alias, protocol and address, still checked) and
    /// tells the sink of those that are down. Before [`HealthBook::sync`]:
    /// the checks then go on from there.
    pub fn restore(&self, listeners: &[Listener], records: &[HealthRecord]) {
        for l in listeners.iter().filter(|l| l.health.is_some()) {
            let rule = self.rule(l);
            let mut tracks = lock(&rule.track);
            let mut restored = false;
            for (b, t) in rule.backends.iter().zip(tracks.iter_mut()) {
                let Some(r) = records.iter().find(|r| {
                    r.alias == l.alias && r.protocol == l.protocol.as_str() && r.backend == b.addr
                }) else {
                    continue;
                };
                b.healthy.store(r.healthy, Relaxed);
                *t = Track {
                    passes: r.passes,
                    failures: r.failures,
                    last_change: r
                        .last_change_ms
                        .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
                    last_failure: r.last_failure.clone(),
                };
                restored |= !r.healthy;
            }
            if restored && let Some(sink) = rule.sink.get() {
                sink(rule.rule_id, &rule.healthy_flags());
            }
            drop(tracks);
            if restored {
                info!(alias = %l.alias, "health: backends down before the upgrade stay down until their checks pass");
            }
        }
    }

    /// Stops every check.
    pub fn stop(&self) {
        lock(&self.checks).clear();
    }

    /// The backends of rule `rule_id` as `forwarder status` shows them.
    pub fn status(&self, rule_id: u32) -> Vec<BackendStatus> {
        let Some(rule) = lock(&self.rules).get(&rule_id).cloned() else {
            return Vec::new();
        };
        rule.status()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every change under these locks is a single insert, remove or assignment.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One rule's backends: healthy or not, and the runs that decide it.
pub struct RuleHealth {
    rule_id: u32,
    alias: String,
    protocol: &'static str,
    spec: Option<HealthSpec>,
    backends: Vec<BackendHealth>,
    /// Counts and the kernel's copy change together, so that the kernel
    /// never ends up with an older state than the relay.
    track: Mutex<Vec<Track>>,
    sink: Arc<OnceLock<HealthSink>>,
}

struct BackendHealth {
    addr: SocketAddr,
    weight: u16,
    healthy: AtomicBool,
}

#[derive(Default)]
struct Track {
    passes: u32,
    failures: u32,
    last_change: Option<SystemTime>,
    last_failure: Option<String>,
}

/// What a check or a relay connect found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Check,
    /// The relay's connect: a failure counts, a success only ends a run of
    /// failures (it cannot bring back a backend that is out: none is sent there).
    Relay,
}

impl RuleHealth {
    fn new(listener: &Listener, sink: Arc<OnceLock<HealthSink>>) -> RuleHealth {
        RuleHealth {
            rule_id: listener.rule_id,
            alias: listener.alias.clone(),
            protocol: listener.protocol.as_str(),
            spec: listener.health.clone(),
            backends: listener
                .backends
                .iter()
                .map(|b| BackendHealth {
                    addr: b.addr,
                    weight: b.weight,
                    healthy: AtomicBool::new(true),
                })
                .collect(),
            track: Mutex::new(listener.backends.iter().map(|_| Track::default()).collect()),
            sink,
        }
    }

    pub fn is_healthy(&self, index: usize) -> bool {
        self.backends
            .get(index)
            .is_some_and(|b| b.healthy.load(Relaxed))
    }

    pub fn healthy_flags(&self) -> Vec<bool> {
        self.backends
            .iter()
            .map(|b| b.healthy.load(Relaxed))
            .collect()
    }

    /// Counts one outcome for backend `index`; returns its new state when it changed.
    pub fn record(
        &self,
        index: usize,
        outcome: Result<(), String>,
        source: Source,
    ) -> Option<bool> {
        let spec = self.spec.as_ref()?;
        let backend = self.backends.get(index)?;
        let mut tracks = lock(&self.track);
        let t = &mut tracks[index];
        let healthy = backend.healthy.load(Relaxed);
        let change = match outcome {
            Ok(()) => {
                t.failures = 0;
                if source == Source::Check {
                    t.passes = t.passes.saturating_add(1);
                }
                (!healthy && t.passes >= spec.rise).then_some(true)
            }
            Err(why) => {
                t.passes = 0;
                t.failures = t.failures.saturating_add(1);
                t.last_failure = Some(why);
                (healthy && t.failures >= spec.fall).then_some(false)
            }
        }?;
        backend.healthy.store(change, Relaxed);
        t.last_change = Some(SystemTime::now());
        let why = t.last_failure.clone().unwrap_or_default();
        if change {
            info!(alias = %self.alias, backend = %backend.addr, "backend healthy again: it takes new flows");
        } else {
            warn!(alias = %self.alias, backend = %backend.addr, "backend down ({why}): no new flows go to it");
        }
        if !self.backends.iter().any(|b| b.healthy.load(Relaxed)) {
            warn!(alias = %self.alias, "every backend is down: new flows are refused");
        }
        if let Some(sink) = self.sink.get() {
            sink(self.rule_id, &self.healthy_flags());
        }
        drop(tracks);
        Some(change)
    }

    fn status(&self) -> Vec<BackendStatus> {
        let tracks = lock(&self.track);
        self.backends
            .iter()
            .zip(tracks.iter())
            .map(|(b, t)| BackendStatus {
                backend: b.addr.to_string(),
                weight: b.weight,
                state: if b.healthy.load(Relaxed) {
                    "up"
                } else {
                    "down"
                },
                checked: self.spec.is_some(),
                last_change: t.last_change.map(unix_seconds),
                last_failure: t.last_failure.clone(),
            })
            .collect()
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// One checked backend's state, as an upgrade hands it over.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct HealthRecord {
    pub alias: String,
    pub protocol: String,
    pub backend: SocketAddr,
    pub healthy: bool,
    pub passes: u32,
    pub failures: u32,
    pub last_change_ms: Option<u64>,
    pub last_failure: Option<String>,
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// One backend in `forwarder status`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendStatus {
    pub backend: String,
    pub weight: u16,
    /// `up`: takes new flows; `down`: taken out by its checks.
    pub state: &'static str,
    /// The rule has a `healthcheck` (otherwise the backend is always up).
    pub checked: bool,
    /// Unix time (seconds) of the last change of `state`; null: never changed.
    pub last_change: Option<f64>,
    pub last_failure: Option<String>,
}

/// Checks backend `index` every `spec.interval`, the first at once.
async fn check_loop(rule: Arc<RuleHealth>, index: usize, spec: HealthSpec) {
    let addr = rule.backends[index].addr;
    let mut ticks = tokio::time::interval(spec.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let outcome = check(addr, &spec.probe, spec.timeout).await;
        debug!(alias = %rule.alias, backend = %addr, ?outcome, "health check");
        rule.record(index, outcome, Source::Check);
    }
}

/// One check: `Err` says why it failed.
pub async fn check(addr: SocketAddr, probe: &Probe, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        match probe {
            Probe::TcpConnect => tokio::net::TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("connect: {e}")),
            Probe::Udp { payload, expect } => udp_check(addr, payload, expect).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {}", describe_duration(timeout))),
    }
}

async fn udp_check(addr: SocketAddr, payload: &[u8], expect: &[u8]) -> Result<(), String> {
    let any: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(any)
        .await
        .map_err(|e| format!("udp socket: {e}"))?;
    // Connected: an ICMP unreachable comes back as an error on recv.
    socket
        .connect(addr)
        .await
        .map_err(|e| format!("udp connect: {e}"))?;
    socket
        .send(payload)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = socket
            .recv(&mut buf)
            .await
            .map_err(|e| format!("no reply: {e}"))?;
        if buf[..n].starts_with(expect) {
            return Ok(());
        }
        // A stray or late datagram (an earlier check's reply) is not the answer.
        debug!(backend = %addr, "udp check: a reply that does not start with `expect`");
    }
}

fn describe_duration(d: Duration) -> String {
    crate::config::format_duration(d)
}

/// `tcp connect every 5s, timeout 5s, out after 3 failures, back after 2 passes`.
pub fn describe(spec: &HealthSpec) -> String {
    let probe = match &spec.probe {
        Probe::TcpConnect => "tcp connect".to_owned(),
        Probe::Udp { payload, expect } if expect.is_empty() => {
            format!("udp {} bytes, any reply", payload.len())
        }
        Probe::Udp { payload, expect } => {
            format!(
                "udp {} bytes, reply starting with {}",
                payload.len(),
                show_bytes(expect)
            )
        }
    };
    format!(
        "{probe} every {}, timeout {}, out after {} failures, back after {} passes",
        describe_duration(spec.interval),
        describe_duration(spec.timeout),
        spec.fall,
        spec.rise
    )
}

fn show_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
        _ => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("hex:{hex}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{BackendSpec, PathMode, Protocol, Timeouts};

    fn listener(fall: u32, rise: u32, with_check: bool) -> Listener {
        Listener {
            rule_id: 7,
            alias: "unit".into(),
            protocol: Protocol::Tcp,
            bind: "127.0.0.1:1".parse().unwrap(),
            listen_picked: false,
            ports: crate::rules::ListenPorts::SINGLE,
            backends: vec![
                BackendSpec {
                    addr: "127.0.0.1:2".parse().unwrap(),
                    weight: 1,
                },
                BackendSpec {
                    addr: "127.0.0.1:3".parse().unwrap(),
                    weight: 2,
                },
            ],
            timeouts: Timeouts::default(),
            path: PathMode::Auto,
            preserve_client_ip: false,
            proxy: Default::default(),
            acl: None,
            max_connections: None,
            health: with_check.then_some(HealthSpec {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                fall,
                rise,
                probe: Probe::TcpConnect,
            }),
        }
    }

    fn fail() -> Result<(), String> {
        Err("refused".into())
    }

    #[test]
    fn exported_state_is_restored_in_a_new_book_and_told_to_the_sink() {
        let old = HealthBook::default();
        let l = listener(2, 2, true);
        let rule = old.rule(&l);
        for _ in 0..2 {
            rule.record(1, fail(), Source::Check);
        }
        rule.record(0, fail(), Source::Check);
        let records = old.export();
        assert_eq!(records.len(), 2);

        // The new image: another rule id, the same alias, protocol and backends.
        let new = HealthBook::default();
        type Seen = Mutex<Vec<(u32, Vec<bool>)>>;
        let seen: Arc<Seen> = Arc::default();
        let log = seen.clone();
        new.set_sink(Arc::new(move |id, flags| {
            log.lock().unwrap().push((id, flags.to_vec()))
        }));
        let moved = Listener {
            rule_id: 9,
            ..l.clone()
        };
        new.restore(std::slice::from_ref(&moved), &records);
        let rule = new.rule(&moved);
        assert_eq!(rule.healthy_flags(), vec![true, false]);
        assert_eq!(*seen.lock().unwrap(), vec![(9, vec![true, false])]);
        // The runs go on: one more failure takes backend 0 out (fall 2).
        assert_eq!(rule.record(0, fail(), Source::Check), Some(false));
        assert_eq!(new.status(9)[1].last_failure.as_deref(), Some("refused"));

        // Another alias, or a rule without checks, takes nothing over.
        let other = Listener {
            alias: "other".into(),
            ..l.clone()
        };
        let unchecked = Listener {
            alias: "unit".into(),
            rule_id: 11,
            health: None,
            ..l
        };
        let fresh = HealthBook::default();
        fresh.restore(&[other.clone(), unchecked.clone()], &records);
        assert_eq!(fresh.rule(&other).healthy_flags(), vec![true, true]);
        assert_eq!(fresh.rule(&unchecked).healthy_flags(), vec![true, true]);
    }

    #[test]
    fn fall_and_rise_count_runs() {
        let book = HealthBook::default();
        type Seen = Mutex<Vec<(u32, Vec<bool>)>>;
        let seen: Arc<Seen> = Arc::default();
        let log = seen.clone();
        book.set_sink(Arc::new(move |id, flags| {
            log.lock().unwrap().push((id, flags.to_vec()))
        }));
        let rule = book.rule(&listener(3, 2, true));
        // Two failures, a pass, two failures: never three in a row.
        for outcome in [fail(), fail(), Ok(()), fail(), fail()] {
            assert_eq!(rule.record(0, outcome, Source::Check), None);
        }
        assert!(rule.is_healthy(0));
        assert_eq!(rule.record(0, fail(), Source::Check), Some(false));
        assert!(!rule.is_healthy(0));
        assert_eq!(rule.record(0, fail(), Source::Check), None);
        // A relay success cannot bring it back; two check passes do.
        assert_eq!(rule.record(0, Ok(()), Source::Relay), None);
        assert_eq!(rule.record(0, Ok(()), Source::Check), None);
        assert_eq!(rule.record(0, Ok(()), Source::Check), Some(true));
        assert_eq!(
            *seen.lock().unwrap(),
            [(7, vec![false, true]), (7, vec![true, true])]
        );
        let status = book.status(7);
        assert_eq!(status[0].state, "up");
        assert!(status[0].last_change.is_some());
        assert_eq!(status[1].last_change, None);
    }

    #[test]
    fn relay_failures_count_toward_fall() {
        let book = HealthBook::default();
        let rule = book.rule(&listener(2, 1, true));
        assert_eq!(rule.record(1, fail(), Source::Relay), None);
        assert_eq!(rule.record(1, fail(), Source::Check), Some(false));
        assert_eq!(rule.healthy_flags(), [true, false]);
    }

    #[test]
    fn without_a_check_backends_stay_up() {
        let book = HealthBook::default();
        let rule = book.rule(&listener(1, 1, false));
        for _ in 0..5 {
            assert_eq!(rule.record(0, fail(), Source::Relay), None);
        }
        assert!(rule.is_healthy(0));
    }

    #[tokio::test]
    async fn udp_check_wants_a_matching_reply() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let answer = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            for reply in [&b"PONG ok"[..], b"nope"] {
                let (_, from) = server.recv_from(&mut buf).unwrap();
                server.send_to(reply, from).unwrap();
            }
        });
        let probe = |expect: &[u8]| Probe::Udp {
            payload: b"PING".to_vec(),
            expect: expect.to_vec(),
        };
        let t = Duration::from_millis(300);
        assert_eq!(check(addr, &probe(b"PONG"), t).await, Ok(()));
        let wrong = check(addr, &probe(b"PONG"), t).await;
        assert!(wrong.unwrap_err().contains("no answer"));
        answer.join().unwrap();
        // Nothing listens any more: the port is closed.
        let closed = check(addr, &probe(b""), t).await;
        assert!(closed.is_err(), "{closed:?}");
    }

    #[tokio::test]
    async fn tcp_check_connects() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_millis(300);
        assert_eq!(check(addr, &Probe::TcpConnect, t).await, Ok(()));
        drop(l);
        assert!(check(addr, &Probe::TcpConnect, t).await.is_err());
    }
}
