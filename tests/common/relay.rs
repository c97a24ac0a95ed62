//! The relay as a library: rules, a recorder of what it tells the kernel
//! path, echo servers and round trips on loopback.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forwarder::relay::{Relay, RelayRuleCounters};
use forwarder::rules::{
    BackendSpec, FlowObserver, Listener, PathMode, Protocol, RelaySettings, Timeouts,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Every test ends within this, pass or fail.
pub const TEST_LIMIT: Duration = Duration::from_secs(120);
/// Generous bound on a single wait, to fail rather than hang.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

pub fn any6(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
}

pub fn listener(
    rule_id: u32,
    protocol: Protocol,
    bind: SocketAddr,
    backends: &[(SocketAddr, u16)],
    timeouts: Timeouts,
) -> Listener {
    Listener {
        rule_id,
        alias: format!("rule{rule_id}-{protocol}"),
        protocol,
        bind,
        backends: backends
            .iter()
            .map(|&(addr, weight)| BackendSpec { addr, weight })
            .collect(),
        timeouts,
        path: PathMode::Relay,
        preserve_client_ip: false,
        proxy: Default::default(),
        health: None,
        acl: None,
        max_connections: None,
        listen_picked: false,
        ports: forwarder::rules::ListenPorts::SINGLE,
    }
}

/// Records what the relay tells the kernel path.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<(bool, Protocol, SocketAddr, SocketAddr)>>,
}

impl FlowObserver for Recorder {
    fn relay_flow_started(&self, protocol: Protocol, client: SocketAddr, local: SocketAddr) {
        self.events
            .lock()
            .unwrap()
            .push((true, protocol, client, local));
    }
    fn relay_flow_ended(&self, protocol: Protocol, client: SocketAddr, local: SocketAddr) {
        self.events
            .lock()
            .unwrap()
            .push((false, protocol, client, local));
    }
}

impl Recorder {
    pub fn events(&self) -> Vec<(bool, Protocol, SocketAddr, SocketAddr)> {
        self.events.lock().unwrap().clone()
    }
}

pub async fn start(listeners: &[Listener], settings: RelaySettings) -> (Relay, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let relay = Relay::start(listeners, settings, recorder.clone())
        .await
        .expect("relay starts");
    (relay, recorder)
}

pub fn addr_of(relay: &Relay, rule_id: u32) -> SocketAddr {
    relay
        .local_addrs()
        .into_iter()
        .find(|&(id, _)| id == rule_id)
        .map(|(_, a)| a)
        .expect("rule is bound")
}

/// The counters of one listener, by rule id.
pub fn counters(relay: &Relay, rule_id: u32) -> RelayRuleCounters {
    relay
        .counters()
        .into_iter()
        .find(|c| c.rule_id == rule_id)
        .expect("rule has counters")
}

/// A TCP echo server; each connection echoes until FIN, then half-closes.
pub async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A TCP server that sends its name and closes (to see which backend a flow reached).
pub async fn tcp_named(name: u8) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(&[name]).await;
        }
    });
    addr
}

/// A UDP echo server that also records every sender it saw.
pub async fn udp_echo() -> (SocketAddr, Arc<Mutex<HashSet<SocketAddr>>>) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            record.lock().unwrap().insert(from);
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    (addr, seen)
}

pub async fn tcp_round_trip(to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    back
}

pub async fn udp_round_trip(socket: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    socket.send_to(msg, to).await.unwrap();
    let mut buf = vec![0; 65_536];
    let (n, from) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .expect("a reply")
        .unwrap();
    assert_eq!(
        from, to,
        "the reply comes from the address the client sent to"
    );
    buf.truncate(n);
    buf
}

pub fn quick(udp_idle: Duration) -> Timeouts {
    Timeouts {
        udp_idle,
        ..Timeouts::default()
    }
}

pub fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    assert!(
        lim.rlim_cur >= 10_000,
        "1,000 relayed connections need ~8,000 descriptors; the hard limit is {}",
        lim.rlim_max
    );
}
