//! The relay path: userspace TCP and UDP forwarding for every rule.
//!
//! Every listener gets a real socket, so whatever the kernel path does not
//! take (or all of it, without BPF) is still forwarded. TCP is copied with
//! `splice(2)` through a pipe (buffered where the kernel refuses); UDP keeps
//! one session per client with its own connected upstream socket and moves
//! datagrams in batches (recvmmsg/sendmmsg).
//!
//! The [`FlowObserver`] hears of every flow with canonical addresses: an
//! IPv4 client of a dual-stack `[::]` listener is reported as IPv4, and
//! `local` is the address the client sent to (for UDP, from the packet
//! info), with the listener's port.
//!
//! Each UDP session holds an ephemeral port of its own towards its backend,
//! so the relay's sessions over all rules are bounded by a share of the
//! free ephemeral ports ([`limits`]), read at start and at every reload; a
//! session whose socket cannot be made is counted as an error.

mod backend;
mod batch;
mod buffered;
mod counters;
mod flow;
pub mod gate;
mod handover;
mod idle;
mod limits;
pub mod proxy_protocol;
mod sessions;
mod socket;
mod splice;
mod sys;
mod tcp;
mod udp;

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use counters::RelayRuleCounters;
pub use gate::{RelayRecord, RetiringRecord};
pub use limits::{EphemeralPorts, UdpSessionsStatus};

use crate::health::HealthBook;
use crate::kernel::Steering;
use crate::reload::{ListenKey, Plan};
use crate::rules::{FlowObserver, Listener, Protocol, RelaySettings};
use backend::BackendPicker;
use counters::RuleCounters;
use flow::RuleCtx;
use gate::{CounterValues, Gate};
use limits::UdpBudget;

/// Where a listener is in its life; it watches this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// The relay stops: accept nothing new; live flows go on.
    Draining,
    /// A reload removed the rule: like draining, but a later reload that
    /// brings the rule back may revive a UDP listener that still has
    /// sessions (its socket cannot be bound twice).
    Retiring,
    /// End everything now.
    Closing,
}

/// The next phase; a relay dropped without `shutdown` closes.
async fn next_phase(phase: &mut watch::Receiver<Phase>) -> Phase {
    match phase.changed().await {
        Ok(()) => *phase.borrow_and_update(),
        Err(_) => Phase::Closing,
    }
}

/// How long listeners may take to close their flows once told to.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long a reload waits for a retiring listener to let go of the
/// socket a returning rule needs.
const REBIND_WAIT: Duration = Duration::from_secs(2);

/// One listener task and what steers it.
struct Served {
    key: ListenKey,
    rule: watch::Sender<Arc<RuleCtx>>,
    phase: Arc<watch::Sender<Phase>>,
    local: SocketAddr,
    task: JoinHandle<()>,
    /// A port range's socket, for steering it at the rule's next id; held
    /// only while serving (a retiring TCP listener must close).
    steered: Option<OwnedFd>,
}

impl Served {
    fn rule(&self) -> Arc<RuleCtx> {
        self.rule.borrow().clone()
    }
}

#[derive(Default)]
struct Listeners {
    serving: Vec<Served>,
    /// Rules a reload removed, until their last flow ends.
    retiring: Vec<Served>,
}

impl Listeners {
    /// Forgets retiring listeners whose flows have all ended.
    fn reap(&mut self) {
        self.retiring.retain(|s| !s.task.is_finished());
    }
}

/// The running relay: one task per listener, one per flow.
/// Dropping it without [`Relay::shutdown`] closes everything at once.
pub struct Relay {
    listeners: Mutex<Listeners>,
    settings: RelaySettings,
    observer: Arc<dyn FlowObserver>,
    health: Arc<HealthBook>,
    udp_budget: Arc<UdpBudget>,
    /// Closed while an upgrade hands everything over.
    gate: Gate,
    /// Steers each port range to its one socket per protocol; `None`
    /// without BPF, where a range rule cannot be served.
    steering: std::sync::OnceLock<Arc<Steering>>,
}

/// What a listener takes over from the previous image.
#[derive(Default)]
struct Adopted {
    counters: Option<CounterValues>,
    tcp: Vec<tcp::ResumedPair>,
    udp: Vec<udp::ResumedSession>,
}

enum Bound {
    Tcp(tokio::net::TcpListener),
    Udp(tokio::net::UdpSocket),
}

impl AsRawFd for Bound {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Bound::Tcp(s) => s.as_raw_fd(),
            Bound::Udp(s) => s.as_raw_fd(),
        }
    }
}

impl Bound {
    fn duplicate(&self) -> std::io::Result<OwnedFd> {
        match self {
            Bound::Tcp(s) => s.as_fd().try_clone_to_owned(),
            Bound::Udp(s) => s.as_fd().try_clone_to_owned(),
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Bound::Tcp(s) => s.local_addr(),
            Bound::Udp(s) => s.local_addr(),
        }
    }
}

fn bind(listener: &Listener) -> std::io::Result<Bound> {
    Ok(match listener.protocol {
        Protocol::Tcp => Bound::Tcp(tokio::net::TcpListener::from_std(socket::bind_tcp(
            listener.bind,
        )?)?),
        Protocol::Udp if listener.ports.is_range() => Bound::Udp(tokio::net::UdpSocket::from_std(
            socket::bind_udp_range(listener.bind)?,
        )?),
        Protocol::Udp => Bound::Udp(tokio::net::UdpSocket::from_std(socket::bind_udp(
            listener.bind,
        )?)?),
    })
}

/// Steers a port range's ports to its new socket; nothing for a single port.
fn steer(steering: Option<&Steering>, l: &Listener, socket: &Bound) -> Result<()> {
    if !l.ports.is_range() {
        return Ok(());
    }
    let Some(steering) = steering else {
        bail!(
            "{}: {} {} is a port range, which the relay serves with one socket steered by a \
             socket-lookup BPF program (sk_lookup), and it is not loaded here (it needs root \
             and BPF); use single ports, or run as root",
            l.alias,
            l.protocol,
            l.listen_text()
        );
    };
    steering.set_socket(l.rule_id, socket)
}

fn bind_error(l: &Listener, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "{}: cannot bind {} {}: {}",
        l.alias,
        l.protocol,
        l.listen_text(),
        e
    )
}

/// Sockets bound for a reload's new rules, and the retiring listeners it
/// revived; [`Relay::apply`] serves them, dropping them undoes the binds.
pub struct Prepared {
    bound: Vec<(Listener, Bound, Adopted)>,
    /// Keys of retiring UDP listeners put back to serving.
    revived: Vec<ListenKey>,
    /// A new range that takes over the socket of a removed one on the same
    /// first port (other ports or target): the removed one's key and the
    /// new rule. Its socket is in the sockmap at the new id already.
    taken: Vec<(ListenKey, Listener)>,
}

impl Relay {
    /// Binds every listener (all or none: on any failure, nothing stays
    /// bound and the error names the alias, protocol and address) and
    /// starts serving on the current tokio runtime.
    pub async fn start(
        listeners: &[Listener],
        settings: RelaySettings,
        observer: Arc<dyn FlowObserver>,
    ) -> Result<Relay> {
        Relay::start_inheriting(listeners, settings, observer, None).await
    }

    /// [`Relay::start_steered`] without steering: no port range.
    pub async fn start_inheriting(
        listeners: &[Listener],
        settings: RelaySettings,
        observer: Arc<dyn FlowObserver>,
        inherited: Option<RelayRecord>,
    ) -> Result<Relay> {
        Relay::start_steered(listeners, settings, observer, inherited, None).await
    }

    /// [`Relay::start`], taking over the sockets and flows an upgrade
    /// handed over where their listener is still in `listeners`, with
    /// port ranges' sockets put in `steering`'s map (the caller then
    /// writes the ranges with [`Steering::set_ranges`]).
    pub async fn start_steered(
        listeners: &[Listener],
        settings: RelaySettings,
        observer: Arc<dyn FlowObserver>,
        inherited: Option<RelayRecord>,
        steering: Option<Arc<Steering>>,
    ) -> Result<Relay> {
        // One descriptor per listener; each TCP flow takes four more (two
        // sockets, two pipes), so the soft limit goes up to the hard one.
        let limit = crate::process::raise_nofile_limit(listeners.len())?;
        debug!("open files limit: {limit}");
        let mut inherited = match inherited {
            Some(record) => handover::Inherited::take(record),
            None => handover::Inherited::default(),
        };
        let mut bound = Vec::with_capacity(listeners.len());
        for l in listeners {
            if l.backends.is_empty() {
                bail!("{}: {} {} has no backend", l.alias, l.protocol, l.bind);
            }
            let (socket, adopted) = match inherited.listener(l)? {
                Some(taken) => taken,
                None => (bind(l).map_err(|e| bind_error(l, e))?, Adopted::default()),
            };
            steer(steering.as_deref(), l, &socket)?;
            bound.push((l.clone(), socket, adopted));
        }
        let (udp_budget, unread) = UdpBudget::of_host();
        if let Some(e) = unread {
            warn!(
                "cannot read the ephemeral port sysctls ({e}); udp sessions are bounded as for Linux's defaults"
            );
        }
        log_udp_limit(&udp_budget.ports());
        let retiring = inherited.retiring()?;
        inherited.close_unclaimed();
        let relay = Relay {
            listeners: Mutex::default(),
            settings,
            observer,
            health: Arc::default(),
            udp_budget,
            gate: Gate::default(),
            steering: steering.map(Into::into).unwrap_or_default(),
        };
        relay.serve(bound);
        relay.resume_retiring(retiring);
        Ok(relay)
    }

    /// Rules a reload removed before an upgrade: their flows drain here
    /// as they would have there, and they take no new ones.
    fn resume_retiring(&self, retiring: Vec<handover::Retiring>) {
        let mut listeners = self.listeners();
        for r in retiring {
            let l = &r.listener;
            let health = HealthBook::detached(l);
            let mut rule = RuleCtx::new(l, self.observer.clone(), health);
            if let Some(values) = &r.adopted.counters {
                rule.counters = Arc::new(RuleCounters::carried_on(values));
            }
            let (rule_tx, rule_rx) = watch::channel(Arc::new(rule));
            let phase = Arc::new(watch::channel(Phase::Retiring).0);
            // Counted before the task runs: a freeze right after the
            // start waits for it, so its flows are in the record.
            let ticket = self.gate.ticket();
            let task = match (l.protocol, r.socket) {
                (Protocol::Tcp, _) => tokio::spawn(tcp::serve(
                    None,
                    rule_rx,
                    phase.clone(),
                    self.settings,
                    ticket,
                    l.bind,
                    r.adopted.tcp,
                )),
                (Protocol::Udp, Some(Bound::Udp(s))) => tokio::spawn(udp::serve(
                    s,
                    rule_rx,
                    udp::SessionBounds {
                        max_sessions: self.settings.max_udp_sessions,
                        budget: self.udp_budget.clone(),
                    },
                    phase.clone(),
                    ticket,
                    l.bind,
                    r.adopted.udp,
                )),
                // Its socket closed as its last session ended, before the freeze.
                (Protocol::Udp, _) => continue,
            };
            listeners.retiring.push(Served {
                key: ListenKey::of(l),
                rule: rule_tx,
                phase,
                local: l.bind,
                task,
                steered: None,
            });
        }
    }

    fn listeners(&self) -> std::sync::MutexGuard<'_, Listeners> {
        // A panic elsewhere leaves the lists whole: each change is one push or retain.
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn serve(&self, bound: Vec<(Listener, Bound, Adopted)>) {
        let mut listeners = self.listeners();
        for (l, socket, adopted) in bound {
            let health = self.health.rule(&l);
            let mut rule = RuleCtx::new(&l, self.observer.clone(), health);
            if let Some(values) = &adopted.counters {
                rule.counters = Arc::new(RuleCounters::carried_on(values));
            }
            let rule = Arc::new(rule);
            let local = socket.local_addr().unwrap_or(l.bind);
            log_listener(&l, local);
            let steered = if l.ports.is_range() {
                socket.duplicate().ok()
            } else {
                None
            };
            let (rule_tx, rule_rx) = watch::channel(rule);
            let phase = Arc::new(watch::channel(Phase::Serving).0);
            // Counted before the task runs: a freeze right after the
            // start waits for it, so its flows are in the record.
            let ticket = self.gate.ticket();
            let task = match socket {
                Bound::Tcp(s) => tokio::spawn(tcp::serve(
                    Some(s),
                    rule_rx,
                    phase.clone(),
                    self.settings,
                    ticket,
                    l.bind,
                    adopted.tcp,
                )),
                Bound::Udp(s) => tokio::spawn(udp::serve(
                    s,
                    rule_rx,
                    udp::SessionBounds {
                        max_sessions: self.settings.max_udp_sessions,
                        budget: self.udp_budget.clone(),
                    },
                    phase.clone(),
                    ticket,
                    l.bind,
                    adopted.udp,
                )),
            };
            listeners.serving.push(Served {
                key: ListenKey::of(&l),
                rule: rule_tx,
                phase,
                local,
                task,
                steered,
            });
        }
    }

    /// The first half of a reload: binds the sockets of the plan's new
    /// rules (all or none, as at start). A new rule on the socket of a
    /// retiring UDP listener revives it instead. Nothing serves yet.
    pub async fn prepare(&self, plan: &Plan) -> Result<Prepared> {
        let mut prepared = Prepared {
            bound: Vec::new(),
            revived: Vec::new(),
            taken: Vec::new(),
        };
        for l in &plan.added {
            if l.backends.is_empty() {
                self.unrevive(&prepared.revived);
                bail!("{}: {} {} has no backend", l.alias, l.protocol, l.bind);
            }
            let key = ListenKey::of(l);
            if let Some(old) = self.take_over(plan, l) {
                prepared.taken.push((old, l.clone()));
                continue;
            }
            // A port range's socket is bound anew beside a retiring one
            // (SO_REUSEADDR): its sessions' sockets hold its ports.
            if l.protocol == Protocol::Udp && !l.ports.is_range() && self.revive(key) {
                prepared.revived.push(key);
                continue;
            }
            let bound = self.bind_after_retired(l, key).await.and_then(|socket| {
                steer(self.steering.get().map(|s| &**s), l, &socket)?;
                Ok(socket)
            });
            match bound {
                Ok(socket) => prepared.bound.push((l.clone(), socket, Adopted::default())),
                Err(e) => {
                    self.unrevive(&prepared.revived);
                    return Err(e);
                }
            }
        }
        Ok(prepared)
    }

    /// The key of a removed range whose socket the new range `l` can take
    /// over (same protocol and first port: a second listening socket
    /// could not be bound there), with `l`'s id steered to it.
    fn take_over(&self, plan: &Plan, l: &Listener) -> Option<ListenKey> {
        let steering = self.steering.get()?;
        if !l.ports.is_range() {
            return None;
        }
        let old = plan
            .removed
            .iter()
            .find(|o| o.protocol == l.protocol && o.bind == l.bind && o.ports.is_range())?;
        let key = ListenKey::of(old);
        let listeners = self.listeners();
        let fd = listeners
            .serving
            .iter()
            .find(|s| s.key == key)?
            .steered
            .as_ref()?;
        match steering.set_socket(l.rule_id, fd) {
            Ok(()) => Some(key),
            Err(e) => {
                warn!(alias = %l.alias, "{e:#}; binding anew");
                None
            }
        }
    }

    /// Binds `l`, waiting a moment for a retiring listener on the same
    /// socket to let go of it.
    async fn bind_after_retired(&self, l: &Listener, key: ListenKey) -> Result<Bound> {
        let deadline = tokio::time::Instant::now() + REBIND_WAIT;
        loop {
            match bind(l) {
                Ok(socket) => return Ok(socket),
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline
                        && self.listeners().retiring.iter().any(|s| s.key == key) =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(bind_error(l, e)),
            }
        }
    }

    /// Puts a retiring listener on `key` back to serving, unless it has
    /// already decided to end.
    fn revive(&self, key: ListenKey) -> bool {
        let listeners = self.listeners();
        listeners.retiring.iter().any(|s| {
            s.key == key
                && s.phase.send_if_modified(|p| {
                    let retiring = *p == Phase::Retiring;
                    if retiring {
                        *p = Phase::Serving;
                    }
                    retiring
                })
        })
    }

    fn unrevive(&self, keys: &[ListenKey]) {
        let listeners = self.listeners();
        for s in listeners.retiring.iter().filter(|s| keys.contains(&s.key)) {
            let _ = s.phase.send(Phase::Retiring);
        }
    }

    /// Undoes [`Relay::prepare`] when the reload cannot go on: the new
    /// sockets close, revived listeners retire again.
    pub fn abandon(&self, prepared: Prepared) {
        self.unrevive(&prepared.revived);
    }

    /// The second half of a reload: new rules serve, changed rules'
    /// listeners give new flows the new rule (live flows keep theirs), and
    /// removed rules' listeners take no new flows while theirs finish.
    pub fn apply(&self, plan: &Plan, prepared: Prepared) {
        let mut listeners = self.listeners();
        listeners.reap();
        for key in &prepared.revived {
            let Some(at) = listeners.retiring.iter().position(|s| s.key == *key) else {
                continue;
            };
            let served = listeners.retiring.swap_remove(at);
            let l = plan
                .added
                .iter()
                .find(|l| ListenKey::of(l) == *key)
                .expect("revived for an added rule");
            let next = served.rule().succeed(l, self.health.rule(l));
            let _ = served.rule.send(Arc::new(next));
            log_listener(l, served.local);
            listeners.serving.push(served);
        }
        let at: std::collections::HashMap<ListenKey, usize> = listeners
            .serving
            .iter()
            .enumerate()
            .map(|(i, s)| (s.key, i))
            .collect();
        let mut unsteer = Vec::new();
        for (old_key, l) in &prepared.taken {
            let Some(s) = listeners.serving.iter_mut().find(|s| s.key == *old_key) else {
                continue;
            };
            // A rule of its own (fresh counters); the old one's flows keep theirs.
            unsteer.push(s.rule().rule_id);
            let next = RuleCtx::new(l, self.observer.clone(), self.health.rule(l));
            let _ = s.rule.send(Arc::new(next));
            s.key = ListenKey::of(l);
            info!(alias = %l.alias, "relay: {} {} takes over the socket of the range it replaces", l.protocol, l.listen_text());
        }
        for (old, new) in &plan.changed {
            if let Some(s) = at.get(&ListenKey::of(new)).map(|&i| &listeners.serving[i]) {
                // A changed rule has a new id: its socket moves there
                // before the trie points at it.
                if let (Some(steering), Some(fd)) = (self.steering.get(), &s.steered)
                    && new.ports.is_range()
                {
                    if let Err(e) = steering.set_socket(new.rule_id, fd) {
                        warn!(alias = %new.alias, "{e:#}");
                    }
                    unsteer.push(old.rule_id);
                }
                let next = s.rule().succeed(new, self.health.rule(new));
                let _ = s.rule.send(Arc::new(next));
                log_listener(new, s.local);
            }
        }
        for old in &plan.removed {
            let key = ListenKey::of(old);
            if let Some(at) = listeners.serving.iter().position(|s| s.key == key) {
                let mut served = listeners.serving.swap_remove(at);
                if served.steered.take().is_some() {
                    unsteer.push(old.rule_id);
                }
                let _ = served.phase.send(Phase::Retiring);
                info!(alias = %old.alias, "relay: {} {} removed; its flows may finish", old.protocol, served.local);
                listeners.retiring.push(served);
            }
        }
        drop(listeners);
        self.serve(prepared.bound);
        self.listeners()
            .serving
            .sort_by_key(|s| s.rule.borrow().rule_id);
        if let Some(steering) = self.steering.get() {
            // New ranges' sockets are in place: the trie may point at them,
            // and removed ranges' ports go nowhere from now on.
            if let Err(e) = steering.set_ranges(&plan.next.kernel.ranges) {
                warn!("{e:#}");
            }
            for id in unsteer {
                if !plan.next.listeners.iter().any(|l| l.rule_id == id) {
                    steering.clear_socket(id);
                }
            }
        }
    }

    /// Whether port ranges can be served (the steering program is loaded).
    pub fn steers(&self) -> bool {
        self.steering.get().is_some()
    }

    /// The steering's descriptors for an upgrade's record, if it is loaded.
    pub fn steer_record(&self) -> Option<crate::kernel::SteerRecord> {
        self.steering.get().map(|s| s.record())
    }

    /// Serves port ranges from now on (a reload brought the first one).
    pub fn enable_steering(&self, steering: Arc<Steering>) {
        let _ = self.steering.set(steering);
    }

    /// Reads the ephemeral port sysctls again (a reload): the session limit
    /// follows them. Sessions over a lowered limit go on.
    pub fn refresh_udp_limit(&self) {
        match EphemeralPorts::of_host() {
            Ok(ports) if ports != self.udp_budget.ports() => {
                log_udp_limit(&ports);
                self.udp_budget.set_ports(ports);
            }
            Ok(_) => {}
            Err(e) => {
                warn!("cannot read the ephemeral port sysctls ({e}); the udp session limit stays")
            }
        }
    }

    /// The relay's UDP sessions against their limit.
    pub fn udp_sessions(&self) -> UdpSessionsStatus {
        self.udp_budget.status()
    }

    /// Quiesces the relay for an upgrade: no listener accepts or reads,
    /// no flow holds a byte in userspace, every descriptor is described
    /// in the record. Until [`Relay::thaw`] everything stays parked.
    pub async fn freeze(&self, within: Duration) -> Result<RelayRecord, String> {
        {
            let mut listeners = self.listeners();
            listeners.reap();
            for s in &listeners.retiring {
                let r = s.rule();
                // A pair says whether its rule retired (see `TcpPairRecord`);
                // a UDP session is named by its listener's address alone. (A
                // reload that listens where a UDP rule retires revives it,
                // so this is a guard, not a case that arises.)
                if let Some(other) = listeners.serving.iter().find(|o| {
                    s.key.protocol == Protocol::Udp
                        && o.key.protocol == s.key.protocol
                        && o.key.bind == s.key.bind
                }) {
                    return Err(format!(
                        "rule `{}` ({} {}), removed by a reload, still has {} flows, and rule \
                         `{}` listens on that address now: their flows cannot be told apart in \
                         a handover, so upgrade once they have finished",
                        r.alias,
                        r.protocol,
                        s.local,
                        r.counters.active.load(std::sync::atomic::Ordering::Relaxed),
                        other.rule().alias
                    ));
                }
            }
        }
        let mut record = self.gate.close(within).await?;
        // Parked: their counters hold still.
        let mut listeners = self.listeners();
        listeners.reap();
        record.retiring = listeners.retiring.iter().map(retiring_record).collect();
        Ok(record)
    }

    /// Lets the relay go on after a [`Relay::freeze`] (the upgrade did not happen).
    pub fn thaw(&self) {
        self.gate.open();
    }

    /// The health of every rule's backends, which the relay's picks follow.
    pub fn health(&self) -> Arc<HealthBook> {
        self.health.clone()
    }

    /// The address each listener is bound to, by rule id.
    pub fn local_addrs(&self) -> Vec<(u32, SocketAddr)> {
        self.listeners()
            .serving
            .iter()
            .map(|s| (s.rule().rule_id, s.local))
            .collect()
    }

    /// Counters per rule, of the rules serving now.
    pub fn counters(&self) -> Vec<RelayRuleCounters> {
        self.listeners()
            .serving
            .iter()
            .map(|s| {
                let r = s.rule();
                r.counters.snapshot(r.rule_id, &r.alias, r.protocol)
            })
            .collect()
    }

    /// Stops accepting at once, lets live flows finish for at most `drain`,
    /// then closes the rest.
    pub async fn shutdown(self, drain: Duration) {
        let Listeners { serving, retiring } = self
            .listeners
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Served> = serving.into_iter().chain(retiring).collect();
        for s in &mut all {
            // A draining TCP listener must close, not hold connections in its backlog.
            s.steered = None;
        }
        for s in &all {
            s.phase.send_modify(|p| {
                if *p != Phase::Closing {
                    *p = Phase::Draining;
                }
            });
        }
        let deadline = tokio::time::Instant::now() + drain;
        let mut drained = true;
        for s in &mut all {
            if tokio::time::timeout_at(deadline, &mut s.task)
                .await
                .is_err()
            {
                drained = false;
                break;
            }
        }
        for s in &all {
            let _ = s.phase.send(Phase::Closing);
        }
        if !drained {
            let active: u64 = all
                .iter()
                .map(|s| {
                    s.rule()
                        .counters
                        .active
                        .load(std::sync::atomic::Ordering::Relaxed)
                })
                .sum();
            info!("relay drain time over; closing {active} flows still open");
        }
        for s in &mut all {
            if s.task.is_finished() {
                continue;
            }
            if tokio::time::timeout(CLOSE_GRACE, &mut s.task)
                .await
                .is_err()
            {
                warn!(alias = %s.rule().alias, "relay listener did not close in time; aborted");
                s.task.abort();
            }
        }
        info!("relay stopped");
    }
}

/// What the flows of a rule a reload removed need of it in the next image.
fn retiring_record(s: &Served) -> RetiringRecord {
    let r = s.rule();
    let t = r.timeouts;
    let ms = |d: Duration| d.as_millis() as u64;
    RetiringRecord {
        alias: r.alias.clone(),
        protocol: r.protocol.as_str().into(),
        bind: s.key.bind,
        port_count: r.ports.count,
        many_to_one: r.ports.target == crate::rules::TargetPorts::Same,
        backends: (r.backends.specs().iter())
            .map(|b| (b.addr, b.weight))
            .collect(),
        timeouts_ms: [
            ms(t.udp_idle),
            ms(t.udp_unreplied),
            ms(t.tcp_established),
            ms(t.tcp_half_closed),
            ms(t.tcp_close),
            ms(t.connect),
        ],
        counters: r.counters.values(),
    }
}

fn log_udp_limit(p: &EphemeralPorts) {
    if p.session_limit == 0 {
        warn!(
            "relay: no udp session is possible: ephemeral ports {}-{} have {} not reserved \
             (net.ipv4.ip_local_port_range, ip_local_reserved_ports with kernel.snat_ports)",
            p.range.0, p.range.1, p.free
        );
        return;
    }
    info!(
        "relay: at most {} udp sessions: ephemeral ports {}-{} have {} not reserved, {} of them kept for the host",
        p.session_limit, p.range.0, p.range.1, p.free, p.kept_for_host
    );
}

fn log_listener(l: &Listener, local: SocketAddr) {
    info!(
        alias = %l.alias,
        "relay: {} {} -> {}, path {}",
        l.protocol,
        local,
        BackendPicker::describe(&l.backends),
        l.path.as_str()
    );
}
