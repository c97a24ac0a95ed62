//! UDP: one session per client (and local address it sent to), each with
//! its own connected upstream socket. The listener task reads client
//! datagrams in batches and owns the session table (creation, idle sweep);
//! one task per session carries the replies back.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::{AbortHandle, Id, JoinError, JoinSet};
use tokio::time::MissedTickBehavior;
use tracing::{debug, error, info, warn};

use super::backend::Alarm;
use super::batch::{Datagrams, OnDemand, PacketInfo};
use super::counters::RuleCounters;
use super::flow::{FlowGuard, RuleCtx};
use super::gate::{Described, Gate, ListenerRecord, Registered, Ticket, UdpSessionRecord, idle_ms};
use super::idle::{IdleClock, Millis, sweep_interval};
use super::limits::{SessionPort, UdpBudget};
use super::proxy_protocol::{self, Transport, Version};
use super::sessions::SessionTable;
use super::socket::{client_udp, connect_udp};
use super::{Phase, next_phase, sys};
use crate::health::Source;
use crate::rules::ProxyProtocol;

/// Batches read in one go before the task lets others run.
const ROUNDS: usize = 16;

/// A client as the relay tells it apart: its address and the local address
/// it sent to (so a reply leaves from there); on a port range's socket
/// also the port it sent to (0 elsewhere), so that a client's flows to two
/// ports of the range are two sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SessionKey {
    client: SocketAddr,
    local: Option<IpAddr>,
    port: u16,
}

impl SessionKey {
    fn of(batch: &Datagrams, i: usize) -> Option<SessionKey> {
        Some(SessionKey {
            client: batch.peer[i]?,
            local: batch.dst[i].map(|d| d.local_ip()),
            port: batch.dst_port[i].unwrap_or(0),
        })
    }
}

struct Session {
    upstream: UdpSocket,
    /// The client's address as the listener socket knows it.
    client: SocketAddr,
    /// Where the client sent to: the source of every reply.
    source: Option<PacketInfo>,
    /// A port range's session: its own socket bound to the port the client
    /// sent to and connected to the client. Replies leave from it, and the
    /// client's later datagrams arrive on it.
    toward_client: Option<UdpSocket>,
    clock: IdleClock,
    /// The PROXY v2 header put before every datagram to the backend, or empty.
    header: Vec<u8>,
    /// The backend has sent a datagram back: the session lives by
    /// `udp_idle` from now on, not the shorter `udp_unreplied`.
    answered: AtomicBool,
    /// The backend's index in the rule, for its health.
    backend: usize,
    /// The session's share of the relay's ephemeral ports; after `upstream`
    /// so that it is given back once the port is.
    _port: SessionPort,
}

struct Entry {
    session: Arc<Session>,
    task: Id,
    abort: AbortHandle,
    /// The session in an upgrade's record while it lives.
    _registered: Registered,
}

/// A session the previous image handed over, with its socket.
pub struct ResumedSession {
    pub record: UdpSessionRecord,
    pub upstream: UdpSocket,
    pub toward_client: Option<UdpSocket>,
}

struct UdpListener {
    socket: Arc<UdpSocket>,
    bound: SocketAddr,
    /// The rule's address, as the record names the listener.
    bind: SocketAddr,
    gate: Gate,
    rule: Arc<RuleCtx>,
    table: SessionTable<SessionKey, Entry>,
    tasks: JoinSet<SessionKey>,
    accepting: bool,
    table_full: Alarm,
    budget: Arc<UdpBudget>,
}

enum Event {
    Readable(io::Result<()>),
    Sweep,
    Joined(Result<(Id, SessionKey), JoinError>),
    Rule,
    Phase(Phase),
    Handover,
}

/// Serves one listener until the relay closes it, or it drains (or
/// retires) and has no session left. New sessions take the rule current at
/// their first datagram; a session keeps its backend.
/// How many sessions one listener may hold, and the relay-wide budget of
/// ephemeral ports they all draw on.
pub struct SessionBounds {
    pub max_sessions: usize,
    pub budget: Arc<UdpBudget>,
}

pub async fn serve(
    socket: UdpSocket,
    mut rules: watch::Receiver<Arc<RuleCtx>>,
    bounds: SessionBounds,
    phase_control: Arc<watch::Sender<Phase>>,
    // The gate's, taken by the caller before spawning (see `Gate::close`).
    ticket: Ticket,
    bind: SocketAddr,
    inherited: Vec<ResumedSession>,
) {
    let gate = ticket.gate().clone();
    let rule = rules.borrow_and_update().clone();
    let bound = match socket.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            error!(alias = %rule.alias, "udp listener has no address: {e}");
            return;
        }
    };
    let mut phase = phase_control.subscribe();
    let registered = {
        let (fd, rules) = (socket.as_raw_fd(), rules.clone());
        gate.register(Described::Listener(Box::new(move || ListenerRecord {
            protocol: "udp".into(),
            bind,
            fd,
            counters: rules.borrow().counters.values(),
        })))
    };
    let mut l = UdpListener {
        socket: Arc::new(socket),
        bound,
        bind,
        gate,
        rule,
        table: SessionTable::new(bounds.max_sessions),
        tasks: JoinSet::new(),
        accepting: *phase.borrow_and_update() == Phase::Serving,
        table_full: Alarm::default(),
        budget: bounds.budget,
    };
    for session in inherited {
        l.resume(session);
    }
    let mut batch = OnDemand::default();
    let mut sweep = tokio::time::interval(sweep_interval(l.rule.timeouts.udp_unanswered()));
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let socket = l.socket.clone();
    loop {
        // Done once nothing is left, unless a reload revived the listener
        // meanwhile: the phase decides, under the channel's lock.
        if !l.accepting
            && l.table.is_empty()
            && phase_control.send_if_modified(|p| {
                let done = matches!(p, Phase::Draining | Phase::Retiring);
                if done {
                    *p = Phase::Closing;
                }
                done
            })
        {
            break;
        }
        let event = tokio::select! {
            ready = socket.readable() => Event::Readable(ready),
            _ = sweep.tick() => Event::Sweep,
            Some(joined) = l.tasks.join_next_with_id(), if !l.tasks.is_empty() => Event::Joined(joined),
            Ok(()) = rules.changed() => Event::Rule,
            next = next_phase(&mut phase) => Event::Phase(next),
            // Reads nothing while an upgrade hands the socket over.
            () = l.gate.closing() => Event::Handover,
        };
        match event {
            Event::Readable(Ok(())) => {
                // A reload that landed while both were ready: new sessions
                // must see it, whichever event the select took first.
                if rules.has_changed().unwrap_or(false) {
                    l.rule = rules.borrow_and_update().clone();
                }
                l.receive(batch.get()).await
            }
            Event::Readable(Err(e)) => {
                error!(alias = %l.rule.alias, "udp listener failed: {e}");
                break;
            }
            Event::Sweep => {
                batch.tick();
                l.sweep()
            }
            Event::Joined(joined) => l.session_task_ended(joined),
            Event::Rule => l.rule = rules.borrow_and_update().clone(),
            Event::Phase(Phase::Serving) => {
                if !l.accepting {
                    debug!(alias = %l.rule.alias, "udp listener serves again");
                }
                l.accepting = true;
            }
            Event::Phase(Phase::Draining | Phase::Retiring) => {
                l.accepting = false;
                debug!(alias = %l.rule.alias, sessions = l.table.len(), "udp listener draining");
            }
            Event::Phase(Phase::Closing) => break,
            Event::Handover => l.gate.park().await,
        }
    }
    drop(registered);
    // Closing (or drained): end every session still there.
    l.table.drain();
    l.tasks.shutdown().await;
}

impl UdpListener {
    /// Reads client datagrams until none is left (or a round limit) and
    /// forwards them, each to its client's session.
    async fn receive(&mut self, batch: &mut Datagrams) {
        let fd = self.socket.as_raw_fd();
        for _ in 0..ROUNDS {
            let n = match self
                .socket
                .try_io(Interest::READABLE, || sys::recv_batch(fd, batch))
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.rule.error();
                    debug!(alias = %self.rule.alias, "udp receive: {e}");
                    return;
                }
            };
            self.forward(batch, n).await;
        }
    }

    /// Sends datagrams `0..n` upstream; a run of datagrams of one client
    /// goes out with one sendmmsg.
    async fn forward(&mut self, batch: &Datagrams, n: usize) {
        let now = Millis::now();
        let mut i = 0;
        while i < n {
            let Some(key) = SessionKey::of(batch, i) else {
                i += 1;
                continue;
            };
            let session = match self.table.get(&key) {
                Some(entry) => entry.session.clone(),
                None => match self.open(key, batch.dst[i]) {
                    Some(session) => session,
                    None => {
                        i += 1;
                        continue;
                    }
                },
            };
            let mut end = i + 1;
            while end < n && SessionKey::of(batch, end) == Some(key) {
                end += 1;
            }
            session.clock.touch(now);
            send_upstream(&session, batch, i, end, &self.rule).await;
            i = end;
        }
    }

    /// A new session for `key`, unless refused (the ACL denies the client,
    /// draining, table full) or its socket cannot be made.
    fn open(&mut self, key: SessionKey, dst: Option<PacketInfo>) -> Option<Arc<Session>> {
        let rule = &self.rule;
        if !rule.admits(key.client) {
            return None;
        }
        if !self.accepting {
            RuleCounters::add(&rule.counters.sessions_refused, 1);
            return None;
        }
        if self.table.is_full() {
            RuleCounters::add(&rule.counters.sessions_refused, 1);
            if self.table_full.raise() {
                warn!(
                    alias = %rule.alias, max = self.table.len(),
                    "udp session table full; new clients are refused until sessions end"
                );
            }
            return None;
        }
        let Some(port) = self.budget.take() else {
            RuleCounters::add(&rule.counters.sessions_refused, 1);
            if let Some(held) = self.budget.refused() {
                let p = self.budget.ports();
                warn!(
                    alias = %rule.alias,
                    "the relay holds {} udp sessions, its share of the {} free ephemeral ports \
                     ({} are kept for the host's own sockets): new clients are refused until \
                     sessions end (counted in sessions_refused; {held} refused since the last \
                     such line)",
                    p.session_limit, p.free, p.kept_for_host
                );
            }
            return None;
        };
        if rule.refuses_client_ip() {
            return None;
        }
        // A port range's datagrams all come to this socket: each says its port.
        let local_port = if rule.ports.is_range() && key.port != 0 {
            key.port
        } else {
            self.bound.port()
        };
        let local = SocketAddr::new(key.local.unwrap_or(self.bound.ip()), local_port);
        let Some((index, backend)) = rule.pick_for(local_port) else {
            RuleCounters::add(&rule.counters.no_backend, 1);
            return None;
        };
        let toward_client = if rule.ports.is_range() {
            match client_udp(local, sys::canonical(key.client)) {
                Ok(socket) => Some(socket),
                Err(e) => {
                    rule.error();
                    debug!(alias = %rule.alias, client = %sys::canonical(key.client), %local, "cannot open a udp socket toward the client: {e}");
                    return None;
                }
            }
        } else {
            None
        };
        let upstream = match connect_udp(backend) {
            Ok(upstream) => upstream,
            Err(e) => {
                rule.error();
                if rule.backends.down(index).raise() {
                    warn!(alias = %rule.alias, %backend, "cannot open a udp socket to the backend: {e}");
                }
                return None;
            }
        };
        if rule.backends.down(index).clear() {
            info!(alias = %rule.alias, %backend, "backend reachable again");
        }
        let guard = FlowGuard::start(rule, key.client, local);
        let header = match rule.proxy.send {
            ProxyProtocol::Off => Vec::new(),
            // v1 cannot describe UDP: the config refuses it.
            ProxyProtocol::V1 | ProxyProtocol::V2 => proxy_protocol::encode(
                Version::V2,
                Transport::Datagram,
                guard.client,
                guard.destination,
            ),
        };
        let session = Arc::new(Session {
            upstream,
            client: key.client,
            source: dst,
            toward_client,
            clock: IdleClock::new(Millis::now()),
            header,
            answered: AtomicBool::new(false),
            backend: index,
            _port: port,
        });
        debug!(alias = %rule.alias, client = %guard.client, %backend, "udp session opened");
        self.start_session(key, session.clone(), guard);
        Some(session)
    }

    /// Spawns the session's reply task and enters it in the table (and
    /// in an upgrade's record).
    fn start_session(&mut self, key: SessionKey, session: Arc<Session>, guard: FlowGuard) {
        let described = {
            let (session, bind, addrs) = (session.clone(), self.bind, guard.addrs());
            Described::Udp(Box::new(move || UdpSessionRecord {
                bind,
                upstream_fd: session.upstream.as_raw_fd(),
                toward_client_fd: session.toward_client.as_ref().map(AsRawFd::as_raw_fd),
                port: key.port,
                client: session.client,
                source: session.source.map(PacketInfo::to_record),
                backend: session.backend,
                answered: session.answered.load(Relaxed),
                header: session.header.clone(),
                addrs,
                idle_ms: idle_ms(&session.clock),
            }))
        };
        let abort = if session.toward_client.is_some() {
            self.tasks.spawn(range_session(
                session.clone(),
                self.rule.clone(),
                guard,
                key,
                self.gate.ticket(),
            ))
        } else {
            self.tasks.spawn(replies(
                session.clone(),
                self.socket.clone(),
                self.rule.clone(),
                guard,
                key,
                self.gate.ticket(),
            ))
        };
        let entry = Entry {
            session,
            task: abort.id(),
            abort,
            _registered: self.gate.register(described),
        };
        // A handed-over session may find the table smaller now: it stays anyway.
        let _ = self.table.insert(key, entry);
    }

    /// Carries on a session the previous image handed over.
    fn resume(&mut self, resumed: ResumedSession) {
        let r = resumed.record;
        let source = r.source.map(PacketInfo::from_record);
        let key = SessionKey {
            client: r.client,
            local: source.map(|s| s.local_ip()),
            port: r.port,
        };
        let guard = FlowGuard::resume(&self.rule, r.addrs);
        let now = Millis::now().0;
        let session = Arc::new(Session {
            upstream: resumed.upstream,
            client: r.client,
            source,
            toward_client: resumed.toward_client,
            clock: IdleClock::new(Millis(now.saturating_sub(r.idle_ms))),
            header: r.header,
            answered: AtomicBool::new(r.answered),
            backend: r.backend,
            _port: self.budget.claim(),
        });
        self.start_session(key, session, guard);
    }

    /// Ends the sessions without a datagram either way for the idle
    /// timeout, or the unanswered one if the backend never sent one back.
    fn sweep(&mut self) {
        let now = Millis::now();
        let t = self.rule.timeouts;
        let limit = |s: &Session| {
            if s.answered.load(Relaxed) {
                t.udp_idle
            } else {
                t.udp_unanswered()
            }
        };
        for (key, entry) in self
            .table
            .remove_where(|e| e.session.clock.is_idle(now, limit(&e.session)))
        {
            entry.abort.abort();
            debug!(alias = %self.rule.alias, client = %sys::canonical(key.client), "udp session idle, ended");
        }
        if !self.table.is_full() && self.table_full.clear() {
            info!(alias = %self.rule.alias, "udp session table has room again");
        }
    }

    /// A session task that ended by itself (its socket failed) leaves the table.
    fn session_task_ended(&mut self, joined: Result<(Id, SessionKey), JoinError>) {
        let (id, key) = match joined {
            Ok(ended) => ended,
            Err(e) if e.is_cancelled() => return,
            Err(e) => {
                error!(alias = %self.rule.alias, "udp session panicked: {e}");
                let id = e.id();
                let gone: Vec<_> = self.table.remove_where(|entry| entry.task == id);
                drop(gone);
                return;
            }
        };
        if self.table.get(&key).is_some_and(|entry| entry.task == id) {
            self.table.remove(&key);
        }
    }
}

/// Sends datagrams `from..to` of `batch` on the session's upstream socket, in order.
async fn send_upstream(
    session: &Session,
    batch: &Datagrams,
    from: usize,
    to: usize,
    rule: &RuleCtx,
) {
    let fd = session.upstream.as_raw_fd();
    // With a PROXY header, each datagram goes out as header and payload.
    let framed: Vec<Vec<u8>> = if session.header.is_empty() {
        Vec::new()
    } else {
        batch
            .payloads(from, to)
            .map(|p| [&session.header[..], p].concat())
            .collect()
    };
    let datagrams = |at: usize| (at..to).map(|i| datagram(batch, &framed, from, i));
    let mut at = from;
    // The first try goes straight to the socket: a new one is writable
    // before tokio has heard so from epoll.
    let mut wait = false;
    let mut refused_before = false;
    while at < to {
        let sent = if wait {
            if session.upstream.writable().await.is_err() {
                break;
            }
            session.upstream.try_io(Interest::WRITABLE, || {
                sys::send_batch(fd, datagrams(at), None, None)
            })
        } else {
            sys::send_batch(fd, datagrams(at), None, None)
        };
        match sent {
            Ok(k) => {
                RuleCounters::add(&rule.counters.bytes_to_backend, batch.bytes(at, at + k));
                RuleCounters::add(&rule.counters.datagrams_to_backend, k as u64);
                at += k;
                wait = false;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait = true,
            // An ICMP error of an earlier datagram, reported now: this one
            // was not sent, try it once more.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) && !refused_before => {
                rule.error();
                refused_before = true;
            }
            Err(e) => {
                rule.error();
                debug!(alias = %rule.alias, "udp send to backend: {e}; datagram dropped");
                at += 1;
                refused_before = false;
            }
        }
    }
}

/// Datagram `i` of a run that starts at `from`: framed with a header, or the payload as it came.
fn datagram<'a>(batch: &'a Datagrams, framed: &'a [Vec<u8>], from: usize, i: usize) -> &'a [u8] {
    if framed.is_empty() {
        batch.payload(i)
    } else {
        &framed[i - from]
    }
}

thread_local! {
    /// Reply batches of the session tasks running on this thread; used only
    /// between two awaits, so one per thread is enough.
    static REPLIES: RefCell<Box<Datagrams>> = RefCell::new(Datagrams::new());
}

/// Carries the backend's replies to the client, from the address the
/// client sent to. Returns when the upstream socket fails; ends earlier
/// when the listener aborts it (idle, closing).
async fn replies(
    session: Arc<Session>,
    listener: Arc<UdpSocket>,
    rule: Arc<RuleCtx>,
    guard: FlowGuard,
    key: SessionKey,
    ticket: Ticket,
) -> SessionKey {
    let _guard = guard;
    // Replies the listener socket had no room for, kept in order.
    let mut spill: Vec<Vec<u8>> = Vec::new();
    loop {
        // Here `spill` is empty: a safe point to park for an upgrade.
        let ready = tokio::select! {
            ready = session.upstream.ready(Interest::READABLE | Interest::ERROR) => ready,
            () = ticket.gate().closing() => {
                ticket.gate().park().await;
                continue;
            }
        };
        let ready = match ready {
            Ok(ready) => ready,
            Err(e) => {
                rule.error();
                debug!(alias = %rule.alias, "udp session socket failed: {e}");
                return key;
            }
        };
        if ready.is_error() {
            backend_error(&session, &rule);
        }
        if let Err(e) = reply_batches(&session, &listener, &rule, &mut spill) {
            rule.error();
            debug!(alias = %rule.alias, "udp session socket failed: {e}");
            return key;
        }
        if !spill.is_empty() {
            send_spill(&mut spill, &session, &listener, &rule).await;
        }
    }
}

/// An ICMP error on the session's socket (with no datagram to read, it
/// wakes no reader): taken, so that it is reported once, and counted.
fn backend_error(session: &Session, rule: &RuleCtx) {
    let _ = session.upstream.try_io(Interest::ERROR, || {
        if let Ok(Some(e)) = session.upstream.take_error() {
            rule.error();
            if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                port_unreachable(session, rule);
            }
        }
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// The backend's port is closed: a failed check of its health.
fn port_unreachable(session: &Session, rule: &RuleCtx) {
    let why = Err("relay: udp port unreachable".to_owned());
    rule.backends
        .health()
        .record(session.backend, why, Source::Relay);
}

impl Session {
    /// Where replies go and from which address: the listener's socket
    /// names both; a range session's own socket is connected already.
    fn reply_target(&self) -> (Option<&SocketAddr>, Option<&PacketInfo>) {
        if self.toward_client.is_some() {
            (None, None)
        } else {
            (Some(&self.client), self.source.as_ref())
        }
    }
}

/// A range session after its first datagrams: replies go out on its own
/// socket, and the client's next datagrams come in there. Returns when a
/// socket fails; ends earlier when the listener aborts it.
async fn range_session(
    session: Arc<Session>,
    rule: Arc<RuleCtx>,
    guard: FlowGuard,
    key: SessionKey,
    ticket: Ticket,
) -> SessionKey {
    let _guard = guard;
    let Some(toward) = session.toward_client.as_ref() else {
        return key;
    };
    let mut spill: Vec<Vec<u8>> = Vec::new();
    loop {
        // Here `spill` is empty: a safe point to park for an upgrade.
        let (from_backend, ready) = tokio::select! {
            ready = session.upstream.ready(Interest::READABLE | Interest::ERROR) => (true, ready.map(|r| r.is_error())),
            ready = toward.readable() => (false, ready.map(|()| false)),
            () = ticket.gate().closing() => {
                ticket.gate().park().await;
                continue;
            }
        };
        let failed = match ready {
            Ok(error) if from_backend => {
                if error {
                    backend_error(&session, &rule);
                }
                let r = reply_batches(&session, toward, &rule, &mut spill);
                if r.is_ok() && !spill.is_empty() {
                    send_spill(&mut spill, &session, toward, &rule).await;
                }
                r.err()
            }
            Ok(_) => {
                let r = client_batches(&session, toward, &rule, &mut spill);
                if r.is_ok() && !spill.is_empty() {
                    send_spill_upstream(&mut spill, &session, &rule).await;
                }
                r.err()
            }
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            rule.error();
            debug!(alias = %rule.alias, "udp session socket failed: {e}");
            return key;
        }
    }
}

/// Reads the client's datagrams from a range session's own socket and
/// sends them to the backend; what the upstream socket has no room for
/// goes to `spill`, framed.
fn client_batches(
    session: &Session,
    toward: &UdpSocket,
    rule: &RuleCtx,
    spill: &mut Vec<Vec<u8>>,
) -> io::Result<()> {
    let (in_fd, up_fd) = (toward.as_raw_fd(), session.upstream.as_raw_fd());
    REPLIES.with_borrow_mut(|batch| {
        for _ in 0..ROUNDS {
            let n = match toward.try_io(Interest::READABLE, || sys::recv_batch(in_fd, batch)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // The client's port was closed (ICMP); its session idles out.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
                Err(e) => return Err(e),
            };
            session.clock.touch(Millis::now());
            let framed: Vec<Vec<u8>> = if session.header.is_empty() {
                Vec::new()
            } else {
                batch
                    .payloads(0, n)
                    .map(|p| [&session.header[..], p].concat())
                    .collect()
            };
            let mut at = 0;
            while at < n {
                let datagrams = (at..n).map(|i| datagram(batch, &framed, 0, i));
                match sys::send_batch(up_fd, datagrams, None, None) {
                    Ok(k) => {
                        RuleCounters::add(&rule.counters.bytes_to_backend, batch.bytes(at, at + k));
                        RuleCounters::add(&rule.counters.datagrams_to_backend, k as u64);
                        at += k;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        spill.extend((at..n).map(|i| datagram(batch, &framed, 0, i).to_vec()));
                        return Ok(());
                    }
                    Err(e) => {
                        rule.error();
                        debug!(alias = %rule.alias, "udp send to backend: {e}; datagram dropped");
                        at += 1;
                    }
                }
            }
        }
        Ok(())
    })
}

/// The slow path toward the backend: waits for room for spilled datagrams.
async fn send_spill_upstream(spill: &mut Vec<Vec<u8>>, session: &Session, rule: &RuleCtx) {
    let fd = session.upstream.as_raw_fd();
    let mut at = 0;
    while at < spill.len() {
        if session.upstream.writable().await.is_err() {
            break;
        }
        let sent = session.upstream.try_io(Interest::WRITABLE, || {
            sys::send_batch(fd, spill[at..].iter().map(Vec::as_slice), None, None)
        });
        match sent {
            Ok(k) => {
                let bytes: usize = spill[at..at + k]
                    .iter()
                    .map(|d| d.len() - session.header.len())
                    .sum();
                RuleCounters::add(&rule.counters.bytes_to_backend, bytes as u64);
                RuleCounters::add(&rule.counters.datagrams_to_backend, k as u64);
                at += k;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                rule.error();
                debug!(alias = %rule.alias, "udp send to backend: {e}; datagram dropped");
                at += 1;
            }
        }
    }
    spill.clear();
}

/// Reads reply batches until none is left, sending each to the client
/// with one sendmmsg. What the listener socket has no room for goes to `spill`.
fn reply_batches(
    session: &Session,
    listener: &UdpSocket,
    rule: &RuleCtx,
    spill: &mut Vec<Vec<u8>>,
) -> io::Result<()> {
    let (up_fd, out_fd) = (session.upstream.as_raw_fd(), listener.as_raw_fd());
    REPLIES.with_borrow_mut(|batch| {
        for _ in 0..ROUNDS {
            let n = match session
                .upstream
                .try_io(Interest::READABLE, || sys::recv_batch(up_fd, batch))
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // The backend's port was closed (ICMP); the session stays
                // for when it comes back.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    rule.error();
                    port_unreachable(session, rule);
                    continue;
                }
                Err(e) => return Err(e),
            };
            session.clock.touch(Millis::now());
            session.answered.store(true, Relaxed);
            let mut at = 0;
            while at < n {
                let (dest, source) = session.reply_target();
                match sys::send_batch(out_fd, batch.payloads(at, n), dest, source) {
                    Ok(k) => {
                        RuleCounters::add(&rule.counters.bytes_to_client, batch.bytes(at, at + k));
                        RuleCounters::add(&rule.counters.datagrams_to_client, k as u64);
                        at += k;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        spill.extend(batch.payloads(at, n).map(<[u8]>::to_vec));
                        return Ok(());
                    }
                    Err(e) => {
                        rule.error();
                        debug!(alias = %rule.alias, "udp send to client: {e}; datagram dropped");
                        at += 1;
                    }
                }
            }
        }
        Ok(())
    })
}

/// The slow path: waits for room on the listener socket for spilled replies.
async fn send_spill(
    spill: &mut Vec<Vec<u8>>,
    session: &Session,
    listener: &UdpSocket,
    rule: &RuleCtx,
) {
    let fd = listener.as_raw_fd();
    let mut at = 0;
    while at < spill.len() {
        if listener.writable().await.is_err() {
            break;
        }
        let (dest, source) = session.reply_target();
        let sent = listener.try_io(Interest::WRITABLE, || {
            sys::send_batch(fd, spill[at..].iter().map(Vec::as_slice), dest, source)
        });
        match sent {
            Ok(k) => {
                let bytes: usize = spill[at..at + k].iter().map(Vec::len).sum();
                RuleCounters::add(&rule.counters.bytes_to_client, bytes as u64);
                RuleCounters::add(&rule.counters.datagrams_to_client, k as u64);
                at += k;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                rule.error();
                debug!(alias = %rule.alias, "udp send to client: {e}; datagram dropped");
                at += 1;
            }
        }
    }
    spill.clear();
}
