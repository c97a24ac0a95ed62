//! TCP: accept, connect to a backend, copy both ways (splice, or buffered
//! where splice is refused), half-close, idle timeout. Bounded: at most
//! `max_connections` open per rule (more are reset at accept), a reset for
//! a connection that carries no byte within `relay.first_byte_timeout`,
//! and pipes of `relay.pipe_size`.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use super::Phase;
use super::backend::Alarm;
use super::buffered::copy_one_way;
use super::counters::RuleCounters;
use super::flow::{FlowGuard, RuleCtx};
use super::gate::{
    Described, FlowAddrs, Gate, ListenerRecord, Registered, TcpPairRecord, Ticket, idle_ms,
};
use super::idle::{IdleClock, Millis};
use super::next_phase;
use super::proxy_protocol::{
    self, HEADER_MAX, PROXY_HEADER_TIMEOUT, ParseError, Received, Transport, Version,
};
use super::splice::{Pipe, SpliceEnd, splice_one_way};
use super::sys::canonical;
use crate::acl::AclAction;
use crate::health::Source;
use crate::rules::{ProxyProtocol, RelaySettings};

/// Serves one listener until the relay closes it, or it drains (or
/// retires) and has no flow left. Each new flow takes the rule current at
/// its accept; a flow keeps the rule it started with.
pub async fn serve(
    // `None`: a rule removed before an upgrade, whose handed-over flows drain.
    listener: Option<TcpListener>,
    mut rules: watch::Receiver<Arc<RuleCtx>>,
    phase: Arc<watch::Sender<Phase>>,
    settings: RelaySettings,
    // The gate's, taken by the caller before spawning (see `Gate::close`).
    ticket: Ticket,
    bind: SocketAddr,
    inherited: Vec<ResumedPair>,
) {
    let gate = ticket.gate().clone();
    let mut flows = JoinSet::new();
    let listener_phase = phase.clone();
    for pair in inherited {
        let rule = rules.borrow().clone();
        let at = Accepted {
            bind,
            phase: listener_phase.clone(),
        };
        flows.spawn(resume(pair, rule, gate.clone(), at, gate.ticket()));
    }
    let mut registered =
        (listener.as_ref()).and_then(|l| register_listener(&gate, l, bind, &rules));
    let mut listener = listener;
    let accept_failing = Alarm::default();
    let mut phase = phase.subscribe();
    while listener.is_some() || !flows.is_empty() {
        let rule = rules.borrow_and_update().clone();
        tokio::select! {
            accepted = accept(&listener), if listener.is_some() => match accepted {
                Ok((stream, peer)) => {
                    accept_failing.clear();
                    // The rule of now: a reload may have changed it while we waited.
                    let rule = rules.borrow_and_update().clone();
                    // Flows that ended meanwhile make room first.
                    while let Some(joined) = flows.try_join_next() {
                        flow_joined(&rule, joined);
                    }
                    if flows.len() >= rule.max_connections {
                        over_limit(&rule, stream, flows.len());
                    } else {
                        let ticket = gate.ticket();
                        let at = Accepted { bind, phase: listener_phase.clone() };
                        flows.spawn(flow(stream, peer, rule, settings, gate.clone(), at, ticket));
                    }
                }
                Err(e) => accept_error(&rule, &accept_failing, e).await,
            },
            // Accepts nothing while an upgrade hands the socket over.
            () = gate.closing() => gate.park().await,
            Some(joined) = flows.join_next(), if !flows.is_empty() => flow_joined(&rule, joined),
            Ok(()) = rules.changed() => {}
            next = next_phase(&mut phase) => match next {
                Phase::Serving => {}
                // Closing the socket refuses new connections at once;
                // accepted ones go on.
                Phase::Draining | Phase::Retiring => {
                    drop(registered.take());
                    if listener.take().is_some() {
                        debug!(alias = %rule.alias, flows = flows.len(), "tcp listener closed, draining");
                    }
                }
                Phase::Closing => break,
            },
        }
    }
    // Closing: whatever still runs is cut off (sockets closed as tasks drop).
    flows.shutdown().await;
}

fn flow_joined(rule: &RuleCtx, joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && e.is_panic()
    {
        error!(alias = %rule.alias, "tcp flow panicked: {e}");
    }
}

/// The rule has `max_connections` open: this one is reset at once (the
/// kernel completed its handshake already), counted, and said at most
/// once per [`LOG_INTERVAL`](super::limits::LOG_INTERVAL).
fn over_limit(rule: &RuleCtx, client: TcpStream, open: usize) {
    RuleCounters::add(&rule.counters.connections_refused, 1);
    if let Some(held) = rule.over_limit_log.hit(Millis::now()) {
        warn!(
            alias = %rule.alias,
            "{open} tcp connections open, the rule's max_connections: new connections are reset \
             until some close (counted in connections_refused; {held} reset since the last such line)"
        );
    }
    let _ = client.set_zero_linger();
}

/// The listener's socket and counters, for an upgrade's record.
fn register_listener(
    gate: &Gate,
    listener: &TcpListener,
    bind: SocketAddr,
    rules: &watch::Receiver<Arc<RuleCtx>>,
) -> Option<Registered> {
    let fd = listener.as_raw_fd();
    let rules = rules.clone();
    Some(
        gate.register(Described::Listener(Box::new(move || ListenerRecord {
            protocol: "tcp".into(),
            bind,
            fd,
            counters: rules.borrow().counters.values(),
        }))),
    )
}

async fn accept(listener: &Option<TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_error(rule: &RuleCtx, failing: &Alarm, e: io::Error) {
    rule.error();
    let out_of_resources = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if !out_of_resources {
        // The client went away before we took it: nothing to worry about.
        debug!(alias = %rule.alias, "accept: {e}");
        return;
    }
    if failing.raise() {
        warn!(alias = %rule.alias, "cannot accept tcp connections: {e}; retrying");
    }
    // The connection waits in the backlog; give the process a moment to free descriptors.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// One accepted connection; `connecting` keeps an upgrade waiting until
/// the flow carries bytes (or ended).
/// The listener a pair came from: its address, and its phase (a pair of
/// a rule a reload removed is handed over as such).
struct Accepted {
    bind: SocketAddr,
    phase: Arc<watch::Sender<Phase>>,
}

async fn flow(
    mut client: TcpStream,
    peer: SocketAddr,
    rule: Arc<RuleCtx>,
    settings: RelaySettings,
    gate: Gate,
    at: Accepted,
    connecting: Ticket,
) {
    // From the accept: connecting to the backend counts against the
    // first-byte timeout too.
    let accepted = Millis::now();
    // A trusted upstream's client is checked once its PROXY header names it.
    let trusted = rule.trusts_proxy_header_from(canonical(peer));
    if !trusted && !rule.admits(peer) {
        return deny(&rule, client);
    }
    let local = match client.local_addr() {
        Ok(local) => local,
        Err(e) => {
            // Reset by the client already.
            debug!(alias = %rule.alias, %peer, "accepted socket gone: {e}");
            rule.error();
            return;
        }
    };
    let mut guard = FlowGuard::start(&rule, peer, local);
    if rule.refuses_client_ip() {
        let _ = client.set_zero_linger();
        return;
    }
    // Bytes that came with a trusted upstream's header: the stream's start.
    let mut early = Vec::new();
    // A header is a first byte.
    let mut header_at = None;
    if rule.trusts_proxy_header_from(guard.client) {
        match read_proxy_header(&mut client).await {
            Ok((received, rest)) => {
                if rule.proxy_headers_failing.clear() {
                    info!(alias = %rule.alias, upstream = %guard.client, "trusted upstreams send valid PROXY headers again");
                }
                header_at = Some(Millis::now());
                if let Some((source, destination)) = received.addresses {
                    guard.proxied(source, destination);
                }
                if !rule.admits(guard.client) {
                    return deny(&rule, client);
                }
                early = rest;
            }
            Err(why) => {
                RuleCounters::add(&rule.counters.proxy_headers_refused, 1);
                if rule.proxy_headers_failing.raise() {
                    warn!(alias = %rule.alias, upstream = %guard.client, "{why}; connection reset, as every connection of a trusted upstream (accept_proxy_protocol) without a valid PROXY header");
                } else {
                    debug!(alias = %rule.alias, upstream = %guard.client, "{why}; connection reset");
                }
                let _ = client.set_zero_linger();
                return;
            }
        }
    }
    // A port range's flows come to one socket; the local port is the one
    // the client connected to.
    let Some((index, backend_addr)) = rule.pick_for(local.port()) else {
        // Every backend is down: a prompt reset, not a wait for nothing.
        RuleCounters::add(&rule.counters.no_backend, 1);
        debug!(alias = %rule.alias, client = %guard.client, "no healthy backend; reset");
        let _ = client.set_zero_linger();
        return;
    };
    let connect = tokio::time::timeout(rule.timeouts.connect, TcpStream::connect(backend_addr));
    let mut backend = match connect.await {
        Ok(Ok(backend)) => backend,
        Ok(Err(e)) => return connect_failed(&rule, index, backend_addr, client, &e.to_string()),
        Err(_) => {
            let why = format!("no answer within {:?}", rule.timeouts.connect);
            return connect_failed(&rule, index, backend_addr, client, &why);
        }
    };
    if rule.backends.down(index).clear() {
        info!(alias = %rule.alias, backend = %backend_addr, "backend answers again");
    }
    rule.backends.health().record(index, Ok(()), Source::Relay);
    // A relay must not hold back small writes; the endpoints chose their own pacing.
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    debug!(alias = %rule.alias, client = %guard.client, backend = %backend_addr, "tcp connected");
    let mut first = match rule.proxy.send {
        ProxyProtocol::Off => Vec::new(),
        ProxyProtocol::V1 => proxy_protocol::encode(
            Version::V1,
            Transport::Stream,
            guard.client,
            guard.destination,
        ),
        ProxyProtocol::V2 => proxy_protocol::encode(
            Version::V2,
            Transport::Stream,
            guard.client,
            guard.destination,
        ),
    };
    first.extend_from_slice(&early);
    if !first.is_empty() {
        if let Err(e) = backend.write_all(&first).await {
            debug!(alias = %rule.alias, client = %guard.client, "cannot send the stream's start to the backend: {e}; resetting both ends");
            rule.error();
            let _ = client.set_zero_linger();
            let _ = backend.set_zero_linger();
            return;
        }
        RuleCounters::add(&rule.counters.bytes_to_backend, early.len() as u64);
    }
    let pipes = Pipes::new(CopyMode::Splice, settings.pipe_size);
    let shared = Arc::new(PairShared::new(
        at,
        &client,
        &backend,
        &pipes,
        guard.addrs(),
        accepted,
        settings.first_byte_timeout,
    ));
    if let Some(at) = header_at {
        shared.clock.touch(at);
    }
    let _registered = gate.register(shared.describe());
    let ended = carry(&client, &backend, &rule, &pipes, &shared, &gate, connecting).await;
    finish(ended, &rule, &guard, &client, &backend);
}

/// A pair the previous image handed over, with its descriptors.
pub struct ResumedPair {
    pub record: TcpPairRecord,
    pub client: TcpStream,
    pub backend: TcpStream,
    pub pipes: Pipes,
}

/// Carries on a pair the previous image handed over: bytes in its pipes
/// go first, a direction that had ended stays ended.
async fn resume(pair: ResumedPair, rule: Arc<RuleCtx>, gate: Gate, at: Accepted, ticket: Ticket) {
    let guard = FlowGuard::resume(&rule, pair.record.addrs);
    let shared = Arc::new(PairShared::resumed(at.bind, &pair.record, Some(at.phase)));
    let _registered = gate.register(shared.describe());
    let ended = carry(
        &pair.client,
        &pair.backend,
        &rule,
        &pair.pipes,
        &shared,
        &gate,
        ticket,
    )
    .await;
    finish(ended, &rule, &guard, &pair.client, &pair.backend);
}

fn finish(
    ended: Ended,
    rule: &RuleCtx,
    guard: &FlowGuard,
    client: &TcpStream,
    backend: &TcpStream,
) {
    match ended {
        Ended::Closed => {
            debug!(alias = %rule.alias, client = %guard.client, "tcp closed by both ends")
        }
        Ended::Idle => debug!(
            alias = %rule.alias, client = %guard.client,
            "tcp idle past tcp_established (tcp_half_closed once one end closed), closed"
        ),
        Ended::Silent => {
            RuleCounters::add(&rule.counters.first_byte_timeouts, 1);
            debug!(
                alias = %rule.alias, client = %guard.client,
                "no byte either way within relay.first_byte_timeout of the accept; resetting both ends"
            );
            let _ = client.set_zero_linger();
            let _ = backend.set_zero_linger();
        }
        Ended::Failed(e) => {
            // An end that resets is the endpoints' business (iperf3 does it
            // on every test); anything else is the relay's error.
            if !matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) {
                rule.error();
            }
            debug!(alias = %rule.alias, client = %guard.client, "tcp flow failed: {e}; resetting both ends");
            // The end still open learns of the failure as a reset, not a clean close.
            let _ = client.set_zero_linger();
            let _ = backend.set_zero_linger();
        }
    }
}

/// Both directions' pipes (`None`: copied through a buffer).
pub struct Pipes {
    pub up: Option<Pipe>,
    pub down: Option<Pipe>,
}

impl Pipes {
    pub fn new(mode: CopyMode, size: usize) -> Pipes {
        let one = || match mode {
            CopyMode::Buffered => None,
            CopyMode::Splice => Pipe::new(size)
                .inspect_err(|e| debug!("no pipe for splice ({e}); copying through a buffer"))
                .ok(),
        };
        Pipes {
            up: one(),
            down: one(),
        }
    }
}

/// What a pair's record says beyond its descriptors: where its
/// directions are, and when it last moved a byte.
pub struct PairShared {
    fixed: TcpPairRecord,
    up_done: AtomicBool,
    down_done: AtomicBool,
    clock: IdleClock,
    /// No byte either way this long from the clock's start ends the pair.
    first_byte: Option<Duration>,
    /// Its listener's.
    phase: Option<Arc<watch::Sender<Phase>>>,
}

impl PairShared {
    fn new(
        at: Accepted,
        client: &TcpStream,
        backend: &TcpStream,
        pipes: &Pipes,
        addrs: FlowAddrs,
        accepted: Millis,
        first_byte: Duration,
    ) -> PairShared {
        let fds = |p: &Option<Pipe>| {
            p.as_ref()
                .map(|p| (p.read.as_raw_fd(), p.write.as_raw_fd()))
        };
        let bind = at.bind;
        let shared = PairShared::resumed(
            bind,
            &TcpPairRecord {
                bind,
                client_fd: client.as_raw_fd(),
                backend_fd: backend.as_raw_fd(),
                up_pipe: fds(&pipes.up),
                down_pipe: fds(&pipes.down),
                up_done: false,
                down_done: false,
                addrs,
                // Its clock starts at the accept.
                idle_ms: Millis::now().0.saturating_sub(accepted.0),
                retiring: false,
            },
            Some(at.phase),
        );
        PairShared {
            first_byte: Some(first_byte),
            ..shared
        }
    }

    fn resumed(
        bind: SocketAddr,
        record: &TcpPairRecord,
        phase: Option<Arc<watch::Sender<Phase>>>,
    ) -> PairShared {
        let now = Millis::now().0;
        PairShared {
            fixed: TcpPairRecord {
                bind,
                ..record.clone()
            },
            up_done: AtomicBool::new(record.up_done),
            down_done: AtomicBool::new(record.down_done),
            clock: IdleClock::new(Millis(now.saturating_sub(record.idle_ms))),
            // A handed-over pair carried bytes before the upgrade.
            first_byte: None,
            phase,
        }
    }

    #[cfg(test)]
    fn fresh() -> PairShared {
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        let addrs = FlowAddrs {
            peer: any,
            local: any,
            client: any,
            destination: any,
        };
        PairShared::resumed(
            any,
            &TcpPairRecord {
                bind: any,
                client_fd: -1,
                backend_fd: -1,
                up_pipe: None,
                down_pipe: None,
                up_done: false,
                down_done: false,
                addrs,
                idle_ms: 0,
                retiring: false,
            },
            None,
        )
    }

    fn describe(self: &Arc<Self>) -> Described {
        let shared = self.clone();
        Described::Tcp(Box::new(move || TcpPairRecord {
            up_done: shared.up_done.load(Relaxed),
            down_done: shared.down_done.load(Relaxed),
            idle_ms: idle_ms(&shared.clock),
            retiring: (shared.phase.as_ref()).is_some_and(|p| *p.borrow() == Phase::Retiring),
            ..shared.fixed.clone()
        }))
    }
}

/// A denied client's connection ends before a byte goes either way. The
/// handshake is done by now (only the kernel path can refuse a SYN):
/// `reject` resets it, `drop` closes it.
fn deny(rule: &RuleCtx, client: TcpStream) {
    if rule
        .acl
        .as_ref()
        .is_some_and(|a| a.action == AclAction::Reject)
    {
        let _ = client.set_zero_linger();
    }
    drop(client);
}

/// Why a trusted upstream's connection was refused.
#[derive(Debug)]
enum HeaderRefused {
    Invalid(ParseError),
    Late,
    Closed,
    Io(io::Error),
}

impl std::fmt::Display for HeaderRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderRefused::Invalid(e) => write!(f, "{e}"),
            HeaderRefused::Late => write!(f, "no PROXY header within {PROXY_HEADER_TIMEOUT:?}"),
            HeaderRefused::Closed => f.write_str("closed before a whole PROXY header"),
            HeaderRefused::Io(e) => write!(f, "reading the PROXY header: {e}"),
        }
    }
}

/// Reads a trusted upstream's PROXY header, at most [`HEADER_MAX`] bytes
/// within [`PROXY_HEADER_TIMEOUT`]; returns it with the bytes read past it.
async fn read_proxy_header(client: &mut TcpStream) -> Result<(Received, Vec<u8>), HeaderRefused> {
    let read = async {
        let mut buf = Vec::with_capacity(HEADER_MAX);
        loop {
            let mut chunk = [0u8; HEADER_MAX];
            let room = HEADER_MAX - buf.len();
            let n = client
                .read(&mut chunk[..room.max(1)])
                .await
                .map_err(HeaderRefused::Io)?;
            if n == 0 {
                return Err(HeaderRefused::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
            match proxy_protocol::parse(&buf) {
                Ok(Some(received)) => return Ok((received, buf.split_off(received.len))),
                Ok(None) if buf.len() < HEADER_MAX => {}
                Ok(None) => return Err(HeaderRefused::Invalid(ParseError::TooLong)),
                Err(e) => return Err(HeaderRefused::Invalid(e)),
            }
        }
    };
    tokio::time::timeout(PROXY_HEADER_TIMEOUT, read)
        .await
        .unwrap_or(Err(HeaderRefused::Late))
}

/// The client is reset at once so that it does not wait for data that never comes.
fn connect_failed(rule: &RuleCtx, index: usize, backend: SocketAddr, client: TcpStream, why: &str) {
    RuleCounters::add(&rule.counters.connect_failures, 1);
    rule.backends
        .health()
        .record(index, Err(format!("relay connect: {why}")), Source::Relay);
    if rule.backends.down(index).raise() {
        warn!(
            alias = %rule.alias, %backend,
            "cannot connect to backend: {why}; its clients are reset until it answers"
        );
    } else {
        debug!(alias = %rule.alias, %backend, "cannot connect to backend: {why}");
    }
    let _ = client.set_zero_linger();
    drop(client);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// splice through a pipe, buffered where the kernel refuses.
    Splice,
    /// Always through a userspace buffer (the relay itself falls back to it
    /// per flow; tests force it).
    #[cfg_attr(not(test), allow(dead_code))]
    Buffered,
}

/// How a test's flow is copied and how long it may stay silent.
#[cfg(test)]
pub struct CopySpec {
    pub mode: CopyMode,
    /// Bytes of each direction's splice pipe.
    pub pipe_size: usize,
    /// No byte either way this long from the clock's start ends the flow.
    pub first_byte: Duration,
}

#[derive(Debug)]
pub enum Ended {
    /// Both directions saw FIN and delivered everything.
    Closed,
    /// No byte either way for the idle timeout: `tcp_established`, or
    /// `tcp_half_closed` once one end has closed.
    Idle,
    /// No byte either way within the first-byte timeout.
    Silent,
    Failed(io::Error),
}

/// Copies both ways until both ends closed, one failed, nothing passed
/// within the first-byte timeout, or the flow idled out.
#[cfg(test)]
pub async fn relay_streams(
    client: &TcpStream,
    backend: &TcpStream,
    rule: &RuleCtx,
    copy: &CopySpec,
) -> Ended {
    let gate = Gate::default();
    let entered = gate.ticket();
    let shared = PairShared {
        first_byte: Some(copy.first_byte),
        ..PairShared::fresh()
    };
    carry(
        client,
        backend,
        rule,
        &Pipes::new(copy.mode, copy.pipe_size),
        &shared,
        &gate,
        entered,
    )
    .await
}

/// Copies both ways until both ends closed, one failed, nothing passed
/// within `first_byte` of the clock's start, or the flow idled out. `entered` (the flow's ticket until now) is given up once both
/// directions hold theirs.
async fn carry(
    client: &TcpStream,
    backend: &TcpStream,
    rule: &RuleCtx,
    pipes: &Pipes,
    shared: &PairShared,
    gate: &Gate,
    entered: Ticket,
) -> Ended {
    let first_byte = shared.first_byte;
    let clock = &shared.clock;
    let counters = &rule.counters;
    let (mut up_done, mut down_done) =
        (shared.up_done.load(Relaxed), shared.down_done.load(Relaxed));
    let up_ticket = (!up_done).then(|| gate.ticket());
    let down_ticket = (!down_done).then(|| gate.ticket());
    drop(entered);
    let up = one_way(
        client,
        backend,
        pipes.up.as_ref(),
        &counters.bytes_to_backend,
        clock,
        gate,
        up_ticket,
    );
    let down = one_way(
        backend,
        client,
        pipes.down.as_ref(),
        &counters.bytes_to_client,
        clock,
        gate,
        down_ticket,
    );
    tokio::pin!(up, down);
    loop {
        let silent = !clock.carried();
        let idle = if up_done || down_done {
            rule.timeouts.tcp_half_closed
        } else {
            rule.timeouts.tcp_established
        };
        // The first-byte timeout only ever shortens a silent flow's life.
        let first_byte_ends = silent && first_byte.is_some_and(|limit| limit <= idle);
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => {
                    up_done = true;
                    shared.up_done.store(true, Relaxed);
                }
                Err(e) => return Ended::Failed(e),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => {
                    down_done = true;
                    shared.down_done.store(true, Relaxed);
                }
                Err(e) => return Ended::Failed(e),
            },
            _ = clock.expired(match first_byte {
                Some(limit) if first_byte_ends => limit,
                _ => idle,
            }) => {
                // Parked for an upgrade: the descriptors are in its record.
                if gate.is_closed() {
                    gate.opened().await;
                    continue;
                }
                match (first_byte_ends, clock.carried()) {
                    // Bytes came meanwhile: the idle timeouts apply from now on.
                    (true, true) => continue,
                    (true, false) => return Ended::Silent,
                    (false, _) => return Ended::Idle,
                }
            }
        }
        if up_done && down_done {
            return Ended::Closed;
        }
    }
}

/// One direction until FIN, which then goes on to `dst` as a write shutdown
/// while the other direction keeps flowing. Through `pipe` with splice,
/// else (or where splice is refused) through a buffer.
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: Option<&Pipe>,
    moved: &AtomicU64,
    clock: &IdleClock,
    gate: &Gate,
    _ticket: Option<Ticket>,
) -> io::Result<()> {
    let pending = match pipe {
        None => Some(Vec::new()),
        Some(pipe) => match splice_one_way(src, dst, pipe, moved, clock, gate).await? {
            SpliceEnd::Eof => None,
            SpliceEnd::Refused { pending } => {
                debug!("splice refused for this flow; copying through a buffer");
                Some(pending)
            }
        },
    };
    if let Some(pending) = pending {
        copy_one_way(src, dst, pending, moved, clock, gate).await?;
    }
    match SockRef::from(dst).shutdown(Shutdown::Write) {
        // The peer is gone entirely; the other direction finds out itself.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{BackendSpec, Listener, NoKernelPath, PathMode, Protocol, Timeouts};
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn rule(idle: Duration) -> RuleCtx {
        rule_with(Timeouts {
            tcp_established: idle,
            ..Timeouts::default()
        })
    }

    fn rule_with(timeouts: Timeouts) -> RuleCtx {
        let listener = Listener {
            rule_id: 0,
            alias: "unit".into(),
            protocol: Protocol::Tcp,
            bind: "127.0.0.1:1".parse().unwrap(),
            backends: vec![BackendSpec {
                addr: "127.0.0.1:2".parse().unwrap(),
                weight: 1,
            }],
            timeouts,
            path: PathMode::Relay,
            preserve_client_ip: false,
            acl: None,
            max_connections: None,
            proxy: Default::default(),
            listen_picked: false,
            ports: crate::rules::ListenPorts::SINGLE,
            health: None,
        };
        let health = crate::health::HealthBook::default().rule(&listener);
        RuleCtx::new(&listener, Arc::new(NoKernelPath), health)
    }

    fn spec(mode: CopyMode) -> CopySpec {
        CopySpec {
            mode,
            pipe_size: RelaySettings::default().pipe_size,
            first_byte: Duration::from_secs(3600),
        }
    }

    /// A connected pair of loopback sockets: (the end we hold, the end the relay holds).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// client <-> [relay: c, b] <-> backend, copied in `mode`. The client
    /// sends and half-closes; the backend answers after seeing the FIN.
    async fn half_close_through(mode: CopyMode) {
        let rule = rule(Duration::from_secs(30));
        let (mut client, c) = pair().await;
        let (b, mut backend) = pair().await;
        let copy = spec(mode);
        let relay = relay_streams(&c, &b, &rule, &copy);
        let ends = async {
            let request: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
            client.write_all(&request).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, request);
            backend.write_all(b"answer after FIN").await.unwrap();
            backend.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, b"answer after FIN");
        };
        let (ended, ()) = tokio::join!(relay, ends);
        assert!(matches!(ended, Ended::Closed), "{ended:?}");
        assert_eq!(rule.counters.bytes_to_backend.load(Relaxed), 300_000);
        assert_eq!(rule.counters.bytes_to_client.load(Relaxed), 16);
    }

    #[tokio::test]
    async fn buffered_copy_carries_data_and_half_close() {
        half_close_through(CopyMode::Buffered).await;
    }

    #[tokio::test]
    async fn splice_copy_carries_data_and_half_close() {
        half_close_through(CopyMode::Splice).await;
    }

    #[tokio::test]
    async fn idle_flow_ends() {
        let rule = rule(Duration::from_millis(100));
        let (_client, c) = pair().await;
        let (b, _backend) = pair().await;
        let ended = relay_streams(&c, &b, &rule, &spec(CopyMode::Splice)).await;
        assert!(matches!(ended, Ended::Idle), "{ended:?}");
    }

    /// Bounded both ways: not before `tcp_half_closed`, and long before
    /// `tcp_established`.
    #[tokio::test]
    async fn a_half_closed_flow_ends_after_tcp_half_closed_idle() {
        let half_closed = Duration::from_millis(200);
        let rule = rule_with(Timeouts {
            tcp_established: Duration::from_secs(30),
            tcp_half_closed: half_closed,
            ..Timeouts::default()
        });
        let (mut client, c) = pair().await;
        let (b, _backend) = pair().await;
        client.shutdown().await.unwrap();
        let started = std::time::Instant::now();
        let ended = relay_streams(&c, &b, &rule, &spec(CopyMode::Splice)).await;
        let took = started.elapsed();
        assert!(matches!(ended, Ended::Idle), "{ended:?}");
        // The idle clock counts whole milliseconds: it may end the flow up
        // to one early, measured from here.
        assert!(
            took + Duration::from_millis(2) >= half_closed
                && took <= half_closed * 3 + Duration::from_millis(500),
            "ended after {took:?}"
        );
    }

    /// Bounded both ways: not before the first-byte timeout, not long after.
    #[tokio::test]
    async fn a_flow_without_a_byte_ends_at_the_first_byte_timeout() {
        let rule = rule(Duration::from_secs(30));
        let (_client, c) = pair().await;
        let (b, _backend) = pair().await;
        let first_byte = Duration::from_millis(200);
        let copy = CopySpec {
            first_byte,
            ..spec(CopyMode::Splice)
        };
        let started = std::time::Instant::now();
        let ended = relay_streams(&c, &b, &rule, &copy).await;
        let took = started.elapsed();
        assert!(matches!(ended, Ended::Silent), "{ended:?}");
        assert!(
            took + Duration::from_millis(2) >= first_byte
                && took <= first_byte * 3 + Duration::from_millis(500),
            "ended after {took:?}"
        );
    }

    /// One byte, and the flow lives by `tcp_established`, not the
    /// first-byte timeout.
    #[tokio::test]
    async fn a_flow_that_carried_a_byte_outlives_the_first_byte_timeout() {
        let established = Duration::from_millis(900);
        let rule = rule(established);
        let (mut client, c) = pair().await;
        let (b, mut backend) = pair().await;
        let copy = CopySpec {
            first_byte: Duration::from_millis(100),
            ..spec(CopyMode::Splice)
        };
        let started = std::time::Instant::now();
        let relay = relay_streams(&c, &b, &rule, &copy);
        let ends = async {
            client.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            backend.read_exact(&mut one).await.unwrap();
        };
        let (ended, ()) = tokio::join!(relay, ends);
        let took = started.elapsed();
        assert!(matches!(ended, Ended::Idle), "{ended:?}");
        // Whole milliseconds: the idle clock may end it up to one early.
        assert!(
            took + Duration::from_millis(2) >= established,
            "ended after {took:?}"
        );
    }

    #[tokio::test]
    async fn a_reset_fails_the_flow() {
        let rule = rule(Duration::from_secs(30));
        let (client, c) = pair().await;
        let (b, _backend) = pair().await;
        client.set_zero_linger().unwrap();
        drop(client);
        let ended = relay_streams(&c, &b, &rule, &spec(CopyMode::Buffered)).await;
        assert!(matches!(ended, Ended::Failed(_)), "{ended:?}");
    }
}
