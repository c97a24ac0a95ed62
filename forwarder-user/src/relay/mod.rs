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
//! so sessions per backend are bounded by `net.ipv4.ip_local_port_range`
//! too; a session whose socket cannot be made is counted as an error.

mod backend;
mod batch;
mod buffered;
mod counters;
mod flow;
mod idle;
mod sessions;
mod socket;
mod splice;
mod sys;
mod tcp;
mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use counters::RelayRuleCounters;

use crate::rules::{FlowObserver, Listener, Protocol, RelaySettings};
use backend::BackendPicker;
use flow::RuleCtx;

/// Where the relay is in its life; listeners watch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Accept nothing new; live flows go on.
    Draining,
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

struct Served {
    rule: Arc<RuleCtx>,
    local: SocketAddr,
    task: JoinHandle<()>,
}

/// The running relay: one task per listener, one per flow.
/// Dropping it without [`Relay::shutdown`] closes everything at once.
pub struct Relay {
    served: Vec<Served>,
    phase: watch::Sender<Phase>,
}

enum Bound {
    Tcp(tokio::net::TcpListener),
    Udp(tokio::net::UdpSocket),
}

fn bind(listener: &Listener) -> std::io::Result<Bound> {
    Ok(match listener.protocol {
        Protocol::Tcp => Bound::Tcp(tokio::net::TcpListener::from_std(socket::bind_tcp(
            listener.bind,
        )?)?),
        Protocol::Udp => Bound::Udp(tokio::net::UdpSocket::from_std(socket::bind_udp(
            listener.bind,
        )?)?),
    })
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
        // Each TCP flow takes six descriptors (two sockets, two pipes).
        match sys::raise_nofile_limit() {
            Ok(limit) => debug!("open files limit: {limit}"),
            Err(e) => warn!("cannot raise the open files limit: {e}"),
        }
        let mut bound = Vec::with_capacity(listeners.len());
        for l in listeners {
            if l.backends.is_empty() {
                bail!("{}: {} {} has no backend", l.alias, l.protocol, l.bind);
            }
            let socket = bind(l).map_err(|e| {
                anyhow!("{}: cannot bind {} {}: {}", l.alias, l.protocol, l.bind, e)
            })?;
            bound.push((l, socket));
        }
        let (phase, _) = watch::channel(Phase::Serving);
        let mut served = Vec::with_capacity(bound.len());
        for (l, socket) in bound {
            let rule = Arc::new(RuleCtx::new(l, observer.clone()));
            let local = match &socket {
                Bound::Tcp(s) => s.local_addr(),
                Bound::Udp(s) => s.local_addr(),
            }
            .unwrap_or(l.bind);
            info!(
                alias = %l.alias,
                "relay: {} {} -> {}, path {}",
                l.protocol,
                local,
                BackendPicker::describe(&l.backends),
                l.path.as_str()
            );
            let task = match socket {
                Bound::Tcp(s) => tokio::spawn(tcp::serve(s, rule.clone(), phase.subscribe())),
                Bound::Udp(s) => tokio::spawn(udp::serve(
                    s,
                    rule.clone(),
                    settings.max_udp_sessions,
                    phase.subscribe(),
                )),
            };
            served.push(Served { rule, local, task });
        }
        Ok(Relay { served, phase })
    }

    /// The address each listener is bound to, by rule id.
    pub fn local_addrs(&self) -> Vec<(u32, SocketAddr)> {
        self.served
            .iter()
            .map(|s| (s.rule.rule_id, s.local))
            .collect()
    }

    /// Counters per rule.
    pub fn counters(&self) -> Vec<RelayRuleCounters> {
        self.served
            .iter()
            .map(|s| {
                let r = &s.rule;
                r.counters.snapshot(r.rule_id, &r.alias, r.protocol)
            })
            .collect()
    }

    /// Stops accepting at once, lets live flows finish for at most `drain`,
    /// then closes the rest.
    pub async fn shutdown(mut self, drain: Duration) {
        let _ = self.phase.send(Phase::Draining);
        let deadline = tokio::time::Instant::now() + drain;
        let mut drained = true;
        for s in &mut self.served {
            if tokio::time::timeout_at(deadline, &mut s.task)
                .await
                .is_err()
            {
                drained = false;
                break;
            }
        }
        let _ = self.phase.send(Phase::Closing);
        if !drained {
            let active: u64 = self.counters().iter().map(|c| c.active).sum();
            info!("relay drain time over; closing {active} flows still open");
        }
        for s in &mut self.served {
            if s.task.is_finished() {
                continue;
            }
            if tokio::time::timeout(CLOSE_GRACE, &mut s.task)
                .await
                .is_err()
            {
                warn!(alias = %s.rule.alias, "relay listener did not close in time; aborted");
                s.task.abort();
            }
        }
        info!("relay stopped");
    }
}
