//! Quiescing the relay for an upgrade in place: every task that moves bytes
//! (listener loops, TCP directions, UDP reply tasks) is a participant that,
//! once the gate closes, parks at a point where no byte is held in
//! userspace (a splice pipe may hold some: the pipe is handed over). Flows
//! and listeners describe their descriptors here for the whole of their
//! life, so that the handover record is a snapshot of this registry taken
//! while everything is parked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

/// A listener socket as handed over, with its rule's counters.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ListenerRecord {
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    pub bind: SocketAddr,
    pub fd: i32,
    pub counters: CounterValues,
}

/// The counters of one rule, carried on by the new image.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CounterValues {
    pub flows: u64,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub datagrams_to_backend: u64,
    pub datagrams_to_client: u64,
    pub connect_failures: u64,
    pub connections_refused: u64,
    pub first_byte_timeouts: u64,
    pub sessions_refused: u64,
    pub proxy_headers_refused: u64,
    pub no_backend: u64,
    pub client_ip_refused: u64,
    pub acl_denied: u64,
    pub errors: u64,
}

/// The addresses a flow is accounted under (see `FlowGuard`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowAddrs {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub client: SocketAddr,
    pub destination: SocketAddr,
}

/// A splice pipe: read end, write end. Bytes in it are in flight.
pub type PipeFds = (i32, i32);

/// A relay TCP pair as handed over.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TcpPairRecord {
    /// The listener it came from: `protocol` is tcp.
    pub bind: SocketAddr,
    pub client_fd: i32,
    pub backend_fd: i32,
    pub up_pipe: Option<PipeFds>,
    pub down_pipe: Option<PipeFds>,
    /// The direction saw FIN, which went on as a write shutdown.
    pub up_done: bool,
    pub down_done: bool,
    pub addrs: FlowAddrs,
    /// Milliseconds since the flow last moved a byte.
    pub idle_ms: u64,
    /// Its rule was removed by a reload: it drains with that rule, not
    /// with a running one that listens on the same address now.
    #[serde(default)]
    pub retiring: bool,
}

/// A relay UDP session as handed over.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UdpSessionRecord {
    pub bind: SocketAddr,
    pub upstream_fd: i32,
    /// A port range's session: its own socket toward the client, bound
    /// to the port the client sent to and connected to the client.
    #[serde(default)]
    pub toward_client_fd: Option<i32>,
    /// The port of a range the client sent to (0 for a single port).
    #[serde(default)]
    pub port: u16,
    /// The client as the listener socket knows it.
    pub client: SocketAddr,
    /// The local address the client sent to, and the interface (IPv6).
    pub source: Option<SourceRecord>,
    pub backend: usize,
    pub answered: bool,
    pub header: Vec<u8>,
    pub addrs: FlowAddrs,
    pub idle_ms: u64,
}

/// `PacketInfo`, as handed over.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum SourceRecord {
    V4 {
        addr: std::net::Ipv4Addr,
        spec_dst: std::net::Ipv4Addr,
    },
    V6 {
        addr: std::net::Ipv6Addr,
        ifindex: u32,
    },
}

/// A rule a reload removed whose flows still drain: what its flows need
/// of it in the new image, which no longer has it in its rules. Its TCP
/// socket is closed already; a UDP one is among the listeners.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RetiringRecord {
    pub alias: String,
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    pub bind: SocketAddr,
    /// A port range's length from `bind`'s port (1: a single port), and
    /// whether every port of it went to the backend's one port.
    #[serde(default = "one_port")]
    pub port_count: u16,
    #[serde(default)]
    pub many_to_one: bool,
    /// (address, weight), in the rule's order: sessions name theirs by index.
    pub backends: Vec<(SocketAddr, u16)>,
    /// The rule's timeouts in milliseconds: udp_idle, udp_unreplied,
    /// tcp_established, tcp_half_closed, tcp_close, connect.
    pub timeouts_ms: [u64; 6],
    pub counters: CounterValues,
}

fn one_port() -> u16 {
    1
}

/// Everything the relay hands to its successor.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RelayRecord {
    pub listeners: Vec<ListenerRecord>,
    pub tcp: Vec<TcpPairRecord>,
    pub udp: Vec<UdpSessionRecord>,
    /// Rules removed by a reload whose flows go on draining.
    #[serde(default)]
    pub retiring: Vec<RetiringRecord>,
}

impl RelayRecord {
    /// Every descriptor the record names.
    pub fn fds(&self) -> Vec<i32> {
        let mut fds: Vec<i32> = self.listeners.iter().map(|l| l.fd).collect();
        for p in &self.tcp {
            fds.extend([p.client_fd, p.backend_fd]);
            for (r, w) in [p.up_pipe, p.down_pipe].into_iter().flatten() {
                fds.extend([r, w]);
            }
        }
        for s in &self.udp {
            fds.push(s.upstream_fd);
            fds.extend(s.toward_client_fd);
        }
        fds
    }
}

/// How a registered item describes itself at the moment of the snapshot.
pub enum Described {
    Listener(Box<dyn Fn() -> ListenerRecord + Send + Sync>),
    Tcp(Box<dyn Fn() -> TcpPairRecord + Send + Sync>),
    Udp(Box<dyn Fn() -> UdpSessionRecord + Send + Sync>),
}

#[derive(Default)]
struct Inner {
    closed: watch::Sender<bool>,
    live: AtomicUsize,
    parked: AtomicUsize,
    changed: Notify,
    next_id: AtomicU64,
    registry: Mutex<HashMap<u64, Arc<Described>>>,
}

/// Shared by the relay and all its tasks.
#[derive(Clone, Default)]
pub struct Gate(Arc<Inner>);

/// A participant: counted live until dropped.
pub struct Ticket(Gate);

/// A registry entry, removed on drop.
pub struct Registered {
    gate: Gate,
    id: u64,
}

impl Gate {
    pub fn ticket(&self) -> Ticket {
        self.0.live.fetch_add(1, Relaxed);
        Ticket(self.clone())
    }

    pub fn register(&self, described: Described) -> Registered {
        let id = self.0.next_id.fetch_add(1, Relaxed);
        self.registry().insert(id, Arc::new(described));
        Registered {
            gate: self.clone(),
            id,
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Described>>> {
        self.0.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_closed(&self) -> bool {
        *self.0.closed.borrow()
    }

    /// Resolves once the gate is closed (at once if it is).
    pub async fn closing(&self) {
        let mut rx = self.0.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Resolves once the gate is open (at once if it is).
    pub async fn opened(&self) {
        let mut rx = self.0.closed.subscribe();
        let _ = rx.wait_for(|closed| !*closed).await;
    }

    /// Parks the caller, which is at a safe point, until the gate opens.
    pub async fn park(&self) {
        let mut rx = self.0.closed.subscribe();
        if !*rx.borrow_and_update() {
            return;
        }
        self.0.parked.fetch_add(1, Relaxed);
        self.0.changed.notify_waiters();
        let _ = rx.wait_for(|closed| !*closed).await;
        self.0.parked.fetch_sub(1, Relaxed);
    }

    /// Closes the gate and waits until every participant is parked;
    /// then describes every registered item. On timeout the gate opens
    /// again and nothing changed.
    pub async fn close(&self, within: Duration) -> Result<RelayRecord, String> {
        self.0.closed.send_replace(true);
        let all_parked = async {
            loop {
                let changed = self.0.changed.notified();
                let (live, parked) = (self.0.live.load(Relaxed), self.0.parked.load(Relaxed));
                if parked >= live {
                    return;
                }
                // Tickets dropped or parked wake us; poll as well, as a
                // participant may end between the loads and the wait.
                let _ = tokio::time::timeout(Duration::from_millis(5), changed).await;
            }
        };
        if tokio::time::timeout(within, all_parked).await.is_err() {
            let waiting = self.0.live.load(Relaxed) - self.0.parked.load(Relaxed);
            self.open();
            return Err(format!(
                "{waiting} relay tasks did not reach a safe point within {within:?} (a \
                 connect under way, or a receiver that does not read)"
            ));
        }
        let items: Vec<Arc<Described>> = self.registry().values().cloned().collect();
        let mut record = RelayRecord::default();
        for item in items {
            match &*item {
                Described::Listener(f) => record.listeners.push(f()),
                Described::Tcp(f) => record.tcp.push(f()),
                Described::Udp(f) => record.udp.push(f()),
            }
        }
        Ok(record)
    }

    /// Lets every parked task go on.
    pub fn open(&self) {
        self.0.closed.send_replace(false);
    }
}

impl Ticket {
    pub fn gate(&self) -> &Gate {
        &self.0
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.0.live.fetch_sub(1, Relaxed);
        self.0.0.changed.notify_waiters();
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.gate.registry().remove(&self.id);
    }
}

pub use super::handover::own as own_fd;

/// Milliseconds since `last`, for a record.
pub fn idle_ms(clock: &super::idle::IdleClock) -> u64 {
    super::idle::Millis::now().0.saturating_sub(clock.last().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_waits_for_every_participant_and_times_out_otherwise() {
        let gate = Gate::default();
        let ticket = gate.ticket();
        let _entry = gate.register(Described::Listener(Box::new(|| ListenerRecord {
            protocol: "tcp".into(),
            bind: "127.0.0.1:1".parse().unwrap(),
            fd: 7,
            counters: CounterValues::default(),
        })));
        // Nobody parks: refused, and the gate is open again.
        let err = gate.close(Duration::from_millis(50)).await.unwrap_err();
        assert!(err.contains("1 relay tasks"), "{err}");
        assert!(!gate.is_closed());
        let parker = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _ticket = ticket;
                loop {
                    gate.closing().await;
                    gate.park().await;
                }
            })
        };
        let record = gate.close(Duration::from_secs(5)).await.unwrap();
        assert_eq!(record.listeners.len(), 1);
        assert_eq!(record.fds(), vec![7]);
        gate.open();
        parker.abort();
        let _ = parker.await;
        // The participant is gone: nothing to wait for.
        gate.close(Duration::from_millis(50)).await.unwrap();
    }
}
