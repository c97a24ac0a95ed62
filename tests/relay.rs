//! Integration tests: the relay as a library, with real sockets on loopback;
//! iperf3 through it across network namespaces (root).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream as StdTcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forwarder::relay::{Relay, RelayRuleCounters};
use forwarder::rules::{
    BackendSpec, FlowObserver, Listener, PathMode, Protocol, RelaySettings, Timeouts,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::common;

/// Every test ends within this, pass or fail.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// Generous bound on a single wait, to fail rather than hang.
const WAIT: Duration = Duration::from_secs(10);

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn any6(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
}

fn listener(
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
        listen_picked: false,
        health: None,
        acl: None,
    }
}

/// Records what the relay tells the kernel path.
#[derive(Default)]
struct Recorder {
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
    fn events(&self) -> Vec<(bool, Protocol, SocketAddr, SocketAddr)> {
        self.events.lock().unwrap().clone()
    }
}

async fn start(listeners: &[Listener], settings: RelaySettings) -> (Relay, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let relay = Relay::start(listeners, settings, recorder.clone())
        .await
        .expect("relay starts");
    (relay, recorder)
}

fn addr_of(relay: &Relay, rule_id: u32) -> SocketAddr {
    relay
        .local_addrs()
        .into_iter()
        .find(|&(id, _)| id == rule_id)
        .map(|(_, a)| a)
        .expect("rule is bound")
}

/// The counters of one listener, by rule id.
fn counters(relay: &Relay, rule_id: u32) -> RelayRuleCounters {
    relay
        .counters()
        .into_iter()
        .find(|c| c.rule_id == rule_id)
        .expect("rule has counters")
}

/// Polls `what` until it holds, or fails the test after [`WAIT`].
async fn eventually(why: &str, mut what: impl FnMut() -> bool) {
    let start = Instant::now();
    while !what() {
        assert!(start.elapsed() < WAIT, "timed out waiting for: {why}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts listeners that share one port (TCP and UDP on the same number):
/// picks a free port and retries if something took it meanwhile.
async fn start_on_one_port(
    make: impl Fn(u16) -> Vec<Listener>,
    settings: RelaySettings,
) -> (Relay, Arc<Recorder>, u16) {
    for _ in 0..20 {
        let port = std::net::TcpListener::bind("[::]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let recorder = Arc::new(Recorder::default());
        match Relay::start(&make(port), settings, recorder.clone()).await {
            Ok(relay) => return (relay, recorder, port),
            Err(e) => eprintln!("port {port} taken meanwhile: {e:#}"),
        }
    }
    panic!("no free port for tcp and udp");
}

/// A TCP echo server; each connection echoes until FIN, then half-closes.
async fn tcp_echo() -> SocketAddr {
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
async fn tcp_named(name: u8) -> SocketAddr {
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
async fn udp_echo() -> (SocketAddr, Arc<Mutex<HashSet<SocketAddr>>>) {
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

async fn tcp_round_trip(to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    back
}

async fn udp_round_trip(socket: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
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

fn quick(udp_idle: Duration) -> Timeouts {
    Timeouts {
        udp_idle,
        ..Timeouts::default()
    }
}

// ---------------------------------------------------------------- TCP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_over_ipv4_and_ipv6_of_a_dual_stack_listener() {
    tokio::time::timeout(TEST_LIMIT, async {
        let echo = tcp_echo().await;
        let rules = [listener(
            0,
            Protocol::Tcp,
            any6(0),
            &[(echo, 1)],
            Timeouts::default(),
        )];
        let (relay, recorder) = start(&rules, RelaySettings::default()).await;
        let port = addr_of(&relay, 0).port();
        let v4 = localhost(port);
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        assert_eq!(
            tcp_round_trip(v4, b"hello over ipv4").await,
            b"hello over ipv4"
        );
        assert_eq!(
            tcp_round_trip(v6, b"hello over ipv6").await,
            b"hello over ipv6"
        );
        eventually("both flows end", || counters(&relay, 0).active == 0).await;
        let c = counters(&relay, 0);
        assert_eq!(
            (c.flows, c.bytes_to_backend, c.bytes_to_client),
            (2, 30, 30)
        );
        assert_eq!((c.connect_failures, c.errors), (0, 0));
        assert_eq!(c.protocol, "tcp");
        // The kernel path hears of both, with IPv4 as IPv4 and the local port.
        let events = recorder.events();
        assert_eq!(events.len(), 4, "{events:?}");
        for (started, protocol, client, local) in &events {
            assert_eq!(*protocol, Protocol::Tcp);
            assert_eq!(local.port(), port);
            assert_eq!(client.is_ipv4(), local.is_ipv4());
            assert!(client.ip().is_loopback());
            let ends = events.iter().filter(|e| e.2 == *client && e.0 != *started);
            assert_eq!(ends.count(), 1, "start and end pair up for {client}");
        }
        assert!(events.iter().any(|e| e.3 == v4));
        assert!(events.iter().any(|e| e.3 == v6));
        relay.shutdown(Duration::from_secs(1)).await;
    })
    .await
    .expect("test finished in time");
}

/// A stream of `blocks` MiB, different in every block, hashed as it goes.
fn send_stream(mut to: StdTcpStream, blocks: u64, seed: u64) -> [u8; 32] {
    let mut block = vec![0u8; 1 << 20];
    let mut x = seed | 1;
    for chunk in block.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let mut hash = Sha256::new();
    for k in 0..blocks {
        block[..8].copy_from_slice(&k.to_le_bytes());
        hash.update(&block);
        to.write_all(&block).unwrap();
    }
    to.shutdown(Shutdown::Write).unwrap();
    hash.finalize().into()
}

fn receive_stream(mut from: StdTcpStream) -> ([u8; 32], u64) {
    let mut buf = vec![0u8; 1 << 20];
    let mut hash = Sha256::new();
    let mut total = 0u64;
    loop {
        match from.read(&mut buf).unwrap() {
            0 => return (hash.finalize().into(), total),
            n => {
                hash.update(&buf[..n]);
                total += n as u64;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_256_mib_each_way_arrive_intact() {
    const MIB: u64 = 256;
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let rules = [listener(
        0,
        Protocol::Tcp,
        localhost(0),
        &[(backend_addr, 1)],
        Timeouts::default(),
    )];
    let (relay, _) = start(&rules, RelaySettings::default()).await;
    let front = addr_of(&relay, 0);
    let started = Instant::now();
    // Both ends send and receive at once, each on its own threads.
    let both = tokio::task::spawn_blocking(move || {
        let server = std::thread::spawn(move || {
            let (s, _) = backend.accept().unwrap();
            let reader = s.try_clone().unwrap();
            let rx = std::thread::spawn(move || receive_stream(reader));
            let sent = send_stream(s, MIB, 0xb0b);
            (sent, rx.join().unwrap())
        });
        let c = StdTcpStream::connect(front).unwrap();
        c.set_read_timeout(Some(TEST_LIMIT)).unwrap();
        let reader = c.try_clone().unwrap();
        let rx = std::thread::spawn(move || receive_stream(reader));
        let sent = send_stream(c, MIB, 0xa11ce);
        let client = (sent, rx.join().unwrap());
        (client, server.join().unwrap())
    });
    let ((client_sent, (client_got, client_len)), (server_sent, (server_got, server_len))) =
        tokio::time::timeout(TEST_LIMIT, both)
            .await
            .expect("transfer finished in time")
            .unwrap();
    eprintln!("2 x {MIB} MiB through the relay in {:?}", started.elapsed());
    assert_eq!(server_len, MIB << 20);
    assert_eq!(client_len, MIB << 20);
    assert_eq!(server_got, client_sent, "client -> backend hash");
    assert_eq!(client_got, server_sent, "backend -> client hash");
    eventually("flow ends", || counters(&relay, 0).active == 0).await;
    let c = counters(&relay, 0);
    assert_eq!(c.bytes_to_backend, MIB << 20);
    assert_eq!(c.bytes_to_client, MIB << 20);
    relay.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_half_close_goes_through_and_the_other_way_keeps_flowing() {
    tokio::time::timeout(TEST_LIMIT, async {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rules = [listener(
            0,
            Protocol::Tcp,
            localhost(0),
            &[(backend.local_addr().unwrap(), 1)],
            Timeouts::default(),
        )];
        let (relay, _) = start(&rules, RelaySettings::default()).await;
        let front = addr_of(&relay, 0);

        // The client half-closes first; the backend answers after the FIN.
        let mut client = TcpStream::connect(front).await.unwrap();
        let (mut server, _) = backend.accept().await.unwrap();
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        for i in 0..5u8 {
            server.write_all(&[i; 1000]).await.unwrap();
            let mut part = [0u8; 1000];
            client.read_exact(&mut part).await.unwrap();
            assert_eq!(
                part, [i; 1000],
                "backend keeps talking after the client's FIN"
            );
        }
        server.shutdown().await.unwrap();
        assert_eq!(client.read(&mut [0u8; 1]).await.unwrap(), 0);

        // And the other way round: the backend half-closes first.
        let mut client = TcpStream::connect(front).await.unwrap();
        let (mut server, _) = backend.accept().await.unwrap();
        server.write_all(b"banner").await.unwrap();
        server.shutdown().await.unwrap();
        let mut banner = Vec::new();
        client.read_to_end(&mut banner).await.unwrap();
        assert_eq!(banner, b"banner");
        client.write_all(b"still talking").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"still talking");

        eventually("flows end", || counters(&relay, 0).active == 0).await;
        assert_eq!(counters(&relay, 0).errors, 0);
        relay.shutdown(Duration::from_secs(1)).await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_reset_is_passed_on_as_a_reset() {
    tokio::time::timeout(TEST_LIMIT, async {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rules = [listener(
            0,
            Protocol::Tcp,
            localhost(0),
            &[(backend.local_addr().unwrap(), 1)],
            Timeouts::default(),
        )];
        let (relay, _) = start(&rules, RelaySettings::default()).await;
        let mut client = TcpStream::connect(addr_of(&relay, 0)).await.unwrap();
        let (mut server, _) = backend.accept().await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        client.set_zero_linger().unwrap();
        drop(client);
        let got = tokio::time::timeout(WAIT, server.read(&mut buf))
            .await
            .expect("the backend hears of the reset");
        assert_eq!(
            got.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionReset),
            "a reset, not a clean close"
        );
        eventually("flow ends", || counters(&relay, 0).active == 0).await;
        assert_eq!(
            counters(&relay, 0).errors,
            0,
            "an endpoint's reset is no relay error"
        );
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_backend_down_closes_the_client_at_once() {
    tokio::time::timeout(TEST_LIMIT, async {
        // A port nothing listens on.
        let down = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let rules = [listener(
            0,
            Protocol::Tcp,
            localhost(0),
            &[(down, 1)],
            Timeouts::default(),
        )];
        let (relay, recorder) = start(&rules, RelaySettings::default()).await;
        let front = addr_of(&relay, 0);
        for attempt in 1..=2 {
            let closed = tokio::time::timeout(Duration::from_secs(1), async {
                // The reset may come before the connect call returns.
                let mut client = TcpStream::connect(front).await?;
                client.read(&mut [0u8; 16]).await
            })
            .await
            .expect("the client sees the close within 1 s");
            assert_eq!(
                closed.map_err(|e| e.kind()).err(),
                Some(std::io::ErrorKind::ConnectionReset),
                "a refused backend resets the client, as a direct connect would be refused"
            );
            eventually("failure counted", || {
                counters(&relay, 0).connect_failures == attempt
            })
            .await;
        }
        eventually("flows end", || counters(&relay, 0).active == 0).await;
        let c = counters(&relay, 0);
        assert_eq!((c.flows, c.bytes_to_backend, c.bytes_to_client), (2, 0, 0));
        assert_eq!(recorder.events().len(), 4);
        relay.shutdown(Duration::from_secs(1)).await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_thousand_concurrent_clients() {
    const CLIENTS: usize = 1000;
    tokio::time::timeout(TEST_LIMIT, async {
        raise_open_files();
        let echo = tcp_echo().await;
        let rules = [listener(
            0,
            Protocol::Tcp,
            localhost(0),
            &[(echo, 1)],
            Timeouts::default(),
        )];
        let (relay, _) = start(&rules, RelaySettings::default()).await;
        let front = addr_of(&relay, 0);
        // All connected first, so that all are open at once.
        let mut clients = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            clients.push(TcpStream::connect(front).await.unwrap());
        }
        eventually("all flows open", || {
            counters(&relay, 0).active == CLIENTS as u64
        })
        .await;
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                tokio::spawn(async move {
                    let msg = format!("client {i} says hello").into_bytes();
                    s.write_all(&msg).await.unwrap();
                    s.shutdown().await.unwrap();
                    let mut back = Vec::new();
                    s.read_to_end(&mut back).await.unwrap();
                    assert_eq!(back, msg, "client {i} got its own echo");
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        eventually("all flows end", || counters(&relay, 0).active == 0).await;
        let c = counters(&relay, 0);
        assert_eq!(c.flows, CLIENTS as u64);
        assert_eq!(c.errors, 0);
        relay.shutdown(Duration::from_secs(1)).await;
    })
    .await
    .expect("test finished in time");
}

fn raise_open_files() {
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

/// A listener whose accept queue holds one connection, and holds it: SYNs
/// that come after are dropped, so a connect to it waits.
fn silent_tcp_backend() -> (std::os::fd::OwnedFd, StdTcpStream, SocketAddr) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor owned here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        assert_eq!(libc::bind(raw, (&raw const sin).cast(), len), 0);
        assert_eq!(libc::listen(raw, 0), 0);
        let mut len = len;
        assert_eq!(libc::getsockname(raw, (&raw mut sin).cast(), &mut len), 0);
        let addr = localhost(u16::from_be(sin.sin_port));
        // The one connection the queue holds; never accepted.
        let filler = StdTcpStream::connect(addr).unwrap();
        (fd, filler, addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connect_timeout_resets_the_client_of_a_silent_backend() {
    const CONNECT: Duration = Duration::from_millis(300);
    tokio::time::timeout(TEST_LIMIT, async {
        let (_backend, _filler, silent) = silent_tcp_backend();
        let timeouts = Timeouts {
            connect: CONNECT,
            ..Timeouts::default()
        };
        let rules = [listener(
            0,
            Protocol::Tcp,
            localhost(0),
            &[(silent, 1)],
            timeouts,
        )];
        let (relay, _) = start(&rules, RelaySettings::default()).await;
        let started = Instant::now();
        let mut client = TcpStream::connect(addr_of(&relay, 0)).await.unwrap();
        let read = tokio::time::timeout(WAIT, client.read(&mut [0u8; 16]))
            .await
            .expect("the client is closed, not left hanging");
        let waited = started.elapsed();
        assert_eq!(
            read.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionReset),
            "a reset, not a clean close"
        );
        // The rule's timeout, not the 5 s default and not a refusal.
        assert!(
            waited >= CONNECT && waited < Duration::from_secs(3),
            "closed after {waited:?}"
        );
        eventually("failure counted", || {
            counters(&relay, 0).connect_failures == 1
        })
        .await;
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_idle_flow_is_closed_and_a_busy_one_is_not() {
    tokio::time::timeout(TEST_LIMIT, async {
        let echo = tcp_echo().await;
        let timeouts = Timeouts {
            tcp_established: Duration::from_millis(300),
            ..Timeouts::default()
        };
        let rules = [listener(
            0,
            Protocol::Tcp,
            localhost(0),
            &[(echo, 1)],
            timeouts,
        )];
        let (relay, _) = start(&rules, RelaySettings::default()).await;
        let front = addr_of(&relay, 0);
        let mut idle = TcpStream::connect(front).await.unwrap();
        let mut busy = TcpStream::connect(front).await.unwrap();
        // Traffic every 100 ms for 1.2 s keeps `busy` open.
        for i in 0..12u8 {
            busy.write_all(&[i]).await.unwrap();
            let mut b = [0u8];
            busy.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], i);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // `idle` was closed by the relay meanwhile.
        let n = tokio::time::timeout(WAIT, idle.read(&mut [0u8; 1]))
            .await
            .expect("idle flow closed")
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(counters(&relay, 0).active, 1);
        relay.shutdown(Duration::from_millis(100)).await;
    })
    .await
    .expect("test finished in time");
}

// ---------------------------------------------------------------- UDP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_from_a_thousand_client_ports_never_crosses() {
    const CLIENTS: usize = 1000;
    tokio::time::timeout(TEST_LIMIT, async {
        raise_open_files();
        let (echo, seen) = udp_echo().await;
        let rules = [listener(
            0,
            Protocol::Udp,
            any6(0),
            &[(echo, 1)],
            Timeouts::default(),
        )];
        let (relay, recorder) = start(&rules, RelaySettings::default()).await;
        let front = localhost(addr_of(&relay, 0).port());
        let mut clients = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        let msg = |i: usize, port: u16| format!("client {i} on port {port}").into_bytes();
        let mut missing: Vec<usize> = (0..CLIENTS).collect();
        // Loopback drops datagrams when a burst overruns a socket buffer:
        // who got nothing sends again (bounded).
        for _round in 0..10 {
            for &i in &missing {
                let port = clients[i].local_addr().unwrap().port();
                clients[i].send_to(&msg(i, port), front).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut still = Vec::new();
            for &i in &missing {
                let port = clients[i].local_addr().unwrap().port();
                let mut buf = [0u8; 100];
                let mut got_own = false;
                while let Ok((n, from)) = clients[i].try_recv_from(&mut buf) {
                    assert_eq!(from, front);
                    assert_eq!(&buf[..n], msg(i, port), "reply crossed to client {i}");
                    got_own = true;
                }
                if !got_own {
                    still.push(i);
                }
            }
            missing = still;
            if missing.is_empty() {
                break;
            }
        }
        assert!(missing.is_empty(), "no reply for {} clients", missing.len());
        let c = counters(&relay, 0);
        assert_eq!(c.flows, CLIENTS as u64, "one session per client");
        assert_eq!(c.active, CLIENTS as u64);
        assert_eq!(
            seen.lock().unwrap().len(),
            CLIENTS,
            "one upstream socket each"
        );
        let started: HashSet<_> = recorder.events().into_iter().map(|e| e.2).collect();
        assert_eq!(started.len(), CLIENTS);
        assert!(started.iter().all(|a| a.is_ipv4()));
        relay.shutdown(Duration::ZERO).await;
        eventually("sessions closed on shutdown", || {
            recorder.events().iter().filter(|e| !e.0).count() == CLIENTS
        })
        .await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_bursts_keep_their_order_both_ways() {
    const BURSTS: u32 = 40;
    const BURST: u32 = 50;
    tokio::time::timeout(TEST_LIMIT, async {
        // An echo that checks the order it receives in.
        let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let backend_task = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            for expected in 0..BURSTS * BURST {
                let (n, from) = backend.recv_from(&mut buf).await.unwrap();
                let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                assert_eq!(seq, expected, "order at the backend");
                backend.send_to(&buf[..n], from).await.unwrap();
            }
        });
        let rules = [listener(
            0,
            Protocol::Udp,
            localhost(0),
            &[(backend_addr, 1)],
            Timeouts::default(),
        )];
        let (relay, _) = start(&rules, RelaySettings::default()).await;
        let front = addr_of(&relay, 0);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        let mut expected = 0u32;
        for burst in 0..BURSTS {
            // Back to back, without waiting for replies.
            for i in 0..BURST {
                let seq = burst * BURST + i;
                let mut msg = seq.to_be_bytes().to_vec();
                msg.extend_from_slice(b" in order");
                client.send_to(&msg, front).await.unwrap();
            }
            for _ in 0..BURST {
                let (n, _) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
                    .await
                    .expect("every reply")
                    .unwrap();
                assert_eq!(n, 13);
                let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                assert_eq!(seq, expected, "order at the client");
                expected += 1;
            }
        }
        backend_task.await.unwrap();
        let c = counters(&relay, 0);
        assert_eq!(c.flows, 1);
        let all = u64::from(BURSTS * BURST);
        assert_eq!((c.datagrams_to_backend, c.datagrams_to_client), (all, all));
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_largest_datagrams_pass_whole() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (echo, _) = udp_echo().await;
        let rules = [listener(
            0,
            Protocol::Udp,
            localhost(0),
            &[(echo, 1)],
            Timeouts::default(),
        )];
        let (relay, _) = start(&rules, RelaySettings::default()).await;
        let front = addr_of(&relay, 0);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // 65,507 is the most an IPv4 datagram can carry.
        for size in [60_000usize, 65_507, 0, 1] {
            let msg: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let back = udp_round_trip(&client, front, &msg).await;
            assert_eq!(back.len(), size);
            assert_eq!(back, msg);
        }
        let c = counters(&relay, 0);
        assert_eq!(c.bytes_to_backend, 125_508);
        assert_eq!(c.bytes_to_client, 125_508);
        assert_eq!(c.flows, 1);
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_replies_leave_from_the_address_the_client_sent_to() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (echo, _) = udp_echo().await;
        let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let rules = [
            listener(0, Protocol::Udp, any6(0), &[(echo, 1)], Timeouts::default()),
            listener(1, Protocol::Udp, any4, &[(echo, 1)], Timeouts::default()),
        ];
        let (relay, recorder) = start(&rules, RelaySettings::default()).await;
        // 127.0.0.2 is local too, but the kernel would pick 127.0.0.1 as the
        // source of a reply; a connected client drops that.
        let dual_stack = addr_of(&relay, 0).port();
        let ipv4_only = addr_of(&relay, 1).port();
        for to in [
            SocketAddr::from(([127, 0, 0, 2], dual_stack)),
            localhost(dual_stack),
            SocketAddr::from((Ipv6Addr::LOCALHOST, dual_stack)),
            SocketAddr::from(([127, 0, 0, 2], ipv4_only)),
            localhost(ipv4_only),
        ] {
            let bind: SocketAddr = if to.is_ipv4() {
                "127.0.0.1:0".parse().unwrap()
            } else {
                "[::1]:0".parse().unwrap()
            };
            let client = UdpSocket::bind(bind).await.unwrap();
            client.connect(to).await.unwrap();
            client.send(b"where from?").await.unwrap();
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(WAIT, client.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no reply from {to}"))
                .unwrap();
            assert_eq!(&buf[..n], b"where from?");
            let local = recorder.events().last().unwrap().3;
            assert_eq!(local, to, "the kernel path is told the address sent to");
        }
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test finished in time");
}

/// A backend that never answers, recording the source of each datagram.
async fn udp_sink() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    (s, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_one_way_traffic_keeps_its_session_and_silence_ends_it() {
    const IDLE: Duration = Duration::from_millis(300);
    tokio::time::timeout(TEST_LIMIT, async {
        let (sink, sink_addr) = udp_sink().await;
        let rules = [listener(
            0,
            Protocol::Udp,
            localhost(0),
            &[(sink_addr, 1)],
            quick(IDLE),
        )];
        let (relay, recorder) = start(&rules, RelaySettings::default()).await;
        let front = addr_of(&relay, 0);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();

        // Client -> backend only, every 50 ms for 4 idle timeouts.
        let mut sources = HashSet::new();
        let mut buf = [0u8; 64];
        for i in 0..24u8 {
            client.send_to(&[i], front).await.unwrap();
            let (n, from) = tokio::time::timeout(WAIT, sink.recv_from(&mut buf))
                .await
                .expect("datagram reaches the backend")
                .unwrap();
            assert_eq!(&buf[..n], [i]);
            sources.insert(from);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(sources.len(), 1, "one session all along: {sources:?}");
        assert_eq!(counters(&relay, 0).flows, 1);

        // Backend -> client only, every 50 ms, keeps it too.
        let upstream = *sources.iter().next().unwrap();
        for i in 0..24u8 {
            sink.send_to(&[i], upstream).await.unwrap();
            let (n, from) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
                .await
                .expect("reply reaches the client")
                .unwrap();
            assert_eq!((&buf[..n], from), (&[i][..], front));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let c = counters(&relay, 0);
        assert_eq!((c.flows, c.active), (1, 1));
        assert_eq!((c.bytes_to_backend, c.bytes_to_client), (24, 24));
        assert_eq!((c.datagrams_to_backend, c.datagrams_to_client), (24, 24));

        // Silence ends it: the kernel path hears, and the next datagram opens
        // a new session (a new upstream port).
        eventually("idle session expires", || counters(&relay, 0).active == 0).await;
        assert!(recorder.events().iter().any(|e| !e.0));
        client.send_to(b"again", front).await.unwrap();
        let (_, from) = tokio::time::timeout(WAIT, sink.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(from, upstream, "a new session");
        assert_eq!(counters(&relay, 0).flows, 2);
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_full_session_table_refuses_new_clients_only() {
    const MAX: usize = 4;
    tokio::time::timeout(TEST_LIMIT, async {
        let (echo, seen) = udp_echo().await;
        let rules = [listener(
            0,
            Protocol::Udp,
            localhost(0),
            &[(echo, 1)],
            Timeouts::default(),
        )];
        let settings = RelaySettings {
            max_udp_sessions: MAX,
            ..RelaySettings::default()
        };
        let (relay, _) = start(&rules, settings).await;
        let front = addr_of(&relay, 0);
        let mut clients = Vec::new();
        for i in 0..MAX {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            assert_eq!(udp_round_trip(&c, front, &[i as u8]).await, [i as u8]);
            clients.push(c);
        }
        let newcomer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..3 {
            newcomer.send_to(b"let me in", front).await.unwrap();
        }
        eventually("refusals counted", || {
            counters(&relay, 0).sessions_refused == 3
        })
        .await;
        // The old sessions still work.
        for (i, c) in clients.iter().enumerate() {
            assert_eq!(
                udp_round_trip(c, front, b"still here").await,
                b"still here",
                "client {i}"
            );
        }
        assert!(
            newcomer.try_recv_from(&mut [0u8; 64]).is_err(),
            "no reply to a refused client"
        );
        let c = counters(&relay, 0);
        assert_eq!((c.flows, c.active), (MAX as u64, MAX as u64));
        assert_eq!(seen.lock().unwrap().len(), MAX);
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test finished in time");
}

// ---------------------------------------------------------------- both

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_on_one_port_with_weighted_backends() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (a, b) = (tcp_named(b'a').await, tcp_named(b'b').await);
        let (udp_a, seen_a) = udp_echo().await;
        let (udp_b, seen_b) = udp_echo().await;
        let (relay, _, port) = start_on_one_port(
            |port| {
                vec![
                    listener(
                        0,
                        Protocol::Tcp,
                        any6(port),
                        &[(a, 3), (b, 1)],
                        Timeouts::default(),
                    ),
                    listener(
                        1,
                        Protocol::Udp,
                        any6(port),
                        &[(udp_a, 3), (udp_b, 1)],
                        Timeouts::default(),
                    ),
                ]
            },
            RelaySettings::default(),
        )
        .await;
        assert_eq!(addr_of(&relay, 0).port(), port);
        assert_eq!(addr_of(&relay, 1).port(), port);
        let front = localhost(port);
        let mut names = HashMap::new();
        for _ in 0..8 {
            let mut s = TcpStream::connect(front).await.unwrap();
            let mut name = Vec::new();
            s.read_to_end(&mut name).await.unwrap();
            *names.entry(name).or_insert(0) += 1;
        }
        assert_eq!(names.get(b"a".as_slice()), Some(&6));
        assert_eq!(names.get(b"b".as_slice()), Some(&2));
        for i in 0..8u8 {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            assert_eq!(udp_round_trip(&c, front, &[i]).await, [i]);
        }
        assert_eq!(seen_a.lock().unwrap().len(), 6);
        assert_eq!(seen_b.lock().unwrap().len(), 2);
        let all = relay.counters();
        let json = serde_json::to_value(&all).unwrap();
        assert_eq!(json[1]["protocol"], "udp");
        assert_eq!(json[1]["flows"], 8);
        assert_eq!(json[0]["alias"], "rule0-tcp");
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_failure_leaves_nothing_bound_and_names_the_rule() {
    tokio::time::timeout(TEST_LIMIT, async {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let taken_addr = taken.local_addr().unwrap();
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free_addr = free.local_addr().unwrap();
        drop(free);
        let backend = localhost(9);
        let rules = [
            listener(
                0,
                Protocol::Tcp,
                free_addr,
                &[(backend, 1)],
                Timeouts::default(),
            ),
            listener(
                1,
                Protocol::Udp,
                taken_addr,
                &[(backend, 1)],
                Timeouts::default(),
            ),
        ];
        let err = Relay::start(
            &rules,
            RelaySettings::default(),
            Arc::new(Recorder::default()),
        )
        .await
        .err()
        .expect("the second bind fails");
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!("rule1-udp: cannot bind udp {taken_addr}: ")),
            "{msg}"
        );
        // The TCP listener that did bind was released.
        std::net::TcpListener::bind(free_addr).expect("nothing stays bound");
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_live_flows_then_closes_the_rest() {
    tokio::time::timeout(TEST_LIMIT, async {
        let echo = tcp_echo().await;
        let rules = [listener(
            0,
            Protocol::Tcp,
            localhost(0),
            &[(echo, 1)],
            Timeouts::default(),
        )];
        let (relay, recorder) = start(&rules, RelaySettings::default()).await;
        let front = addr_of(&relay, 0);
        let mut finishing = TcpStream::connect(front).await.unwrap();
        let mut lingering = TcpStream::connect(front).await.unwrap();
        eventually("both flows open", || counters(&relay, 0).active == 2).await;

        const DRAIN: Duration = Duration::from_millis(800);
        let started = Instant::now();
        let shutdown = tokio::spawn(relay.shutdown(DRAIN));
        // Stopped accepting at once. (A probe that made it into the backlog
        // just before is reset when the listener closes.)
        let refused = async {
            while !matches!(
                TcpStream::connect(front).await,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
            ) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(WAIT, refused)
            .await
            .expect("listener closed");
        // A live flow still works during the drain and finishes.
        finishing.write_all(b"one more thing").await.unwrap();
        finishing.shutdown().await.unwrap();
        let mut back = Vec::new();
        finishing.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"one more thing");
        // The one that outlives the drain is closed by the relay.
        let mut buf = [0u8; 8];
        let closed = tokio::time::timeout(WAIT, lingering.read(&mut buf))
            .await
            .expect("lingering flow closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        tokio::time::timeout(WAIT, shutdown)
            .await
            .expect("shutdown returns")
            .unwrap();
        assert!(started.elapsed() >= DRAIN, "a live flow got its drain time");
        // Probes that connected before the listener closed are flows too.
        let events = recorder.events();
        let ended = events.iter().filter(|e| !e.0).count();
        assert!(ended >= 2);
        assert_eq!(
            ended * 2,
            events.len(),
            "the kernel path heard every flow end"
        );
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_early_when_flows_finish() {
    tokio::time::timeout(TEST_LIMIT, async {
        let echo = tcp_echo().await;
        let (udp, _) = udp_echo().await;
        let rules = [
            listener(
                0,
                Protocol::Tcp,
                localhost(0),
                &[(echo, 1)],
                Timeouts::default(),
            ),
            listener(
                1,
                Protocol::Udp,
                localhost(0),
                &[(udp, 1)],
                quick(Duration::from_millis(200)),
            ),
        ];
        let (relay, _) = start(&rules, RelaySettings::default()).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(
            udp_round_trip(&client, addr_of(&relay, 1), b"x").await,
            b"x"
        );
        let started = Instant::now();
        // The UDP session idles out after 200 ms; nothing else is live.
        relay.shutdown(Duration::from_secs(60)).await;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "drain ended with the last flow"
        );
    })
    .await
    .expect("test finished in time");
}

// ---------------------------------------------------------------- iperf3

/// Runs a relay inside `ns` on its own thread until `stop` is sent.
fn relay_in_namespace(
    ns: &common::Netns,
    listeners: Vec<Listener>,
) -> (
    std::thread::JoinHandle<Vec<RelayRuleCounters>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let path = format!("/run/netns/{}", ns.name);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // Only this thread moves; its sockets are made inside the namespace.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let relay = Relay::start(
                &listeners,
                RelaySettings::default(),
                Arc::new(Recorder::default()),
            )
            .await
            .unwrap();
            ready_tx.send(()).unwrap();
            let _ = tokio::time::timeout(TEST_LIMIT, stop_rx).await;
            let counters = relay.counters();
            relay.shutdown(Duration::ZERO).await;
            counters
        })
    });
    ready_rx
        .recv_timeout(WAIT)
        .expect("relay started in the namespace");
    (thread, stop_tx)
}

fn iperf3_json(out: std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 ({}) printed no JSON ({e}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn iperf3_tcp_and_udp_through_one_forwarded_port() {
    if !common::require_root("iperf3_tcp_and_udp_through_one_forwarded_port") {
        return;
    }
    let topo = common::Topology::new();
    let backend = SocketAddr::from((topo.backend_addr(), 5201));
    let port = 7000;
    let listeners = vec![
        listener(
            0,
            Protocol::Tcp,
            any6(port),
            &[(backend, 1)],
            Timeouts::default(),
        ),
        listener(
            1,
            Protocol::Udp,
            any6(port),
            &[(backend, 1)],
            Timeouts::default(),
        ),
    ];
    let _server = topo.backend.spawn("iperf3", &["-s", "-p", "5201"]);
    let (relay, stop) = relay_in_namespace(&topo.forwarder, listeners);
    let front = topo.forwarder_addr().to_string();
    let port = port.to_string();
    // The server needs a moment to listen: until then the relay resets the
    // client, which iperf3 3.12 reports in its JSON (with exit status 0).
    let run = |extra: &[&str]| {
        let mut args = vec!["-c", &front, "-p", &port, "-t", "2", "-J"];
        args.extend_from_slice(extra);
        let mut attempt = 0;
        loop {
            let out = topo.client.command("iperf3").args(&args).output().unwrap();
            let json = iperf3_json(out);
            if json.get("error").is_none() {
                return json;
            }
            attempt += 1;
            assert!(attempt < 30, "iperf3 {extra:?}: {}", json["error"]);
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let tcp = run(&[]);
    let tcp_bytes = tcp["end"]["sum_received"]["bytes"].as_u64().unwrap();
    assert!(tcp_bytes > 0, "iperf3 tcp moved nothing");
    let udp = run(&["-u", "-b", "200M", "-l", "1400"]);
    let sum = &udp["end"]["sum"];
    let packets = sum["packets"].as_u64().unwrap();
    let lost = sum["lost_packets"].as_u64().unwrap();
    assert!(packets > 0 && lost < packets, "iperf3 udp: {sum}");
    eprintln!(
        "iperf3 through the relay: tcp {:.2} Gbit/s, udp {:.0} pps ({lost} of {packets} lost)",
        tcp["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap()
            / 1e9,
        packets as f64 / sum["seconds"].as_f64().unwrap()
    );
    stop.send(()).unwrap();
    let counters = relay.join().unwrap();
    let (t, u) = (&counters[0], &counters[1]);
    assert!(t.flows >= 2, "control and data connection: {t:?}");
    assert!(t.bytes_to_backend >= tcp_bytes, "{t:?}");
    assert!(
        u.flows >= 1 && u.bytes_to_backend > 0 && u.bytes_to_client > 0,
        "{u:?}"
    );
}
