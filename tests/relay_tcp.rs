//! The relay carrying TCP between real sockets on loopback.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream as StdTcpStream};
use std::time::{Duration, Instant};

use forwarder::rules::{Protocol, RelaySettings, Timeouts};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::relay::{
    TEST_LIMIT, WAIT, addr_of, any6, counters, listener, localhost, raise_open_files, start,
    tcp_echo, tcp_round_trip,
};
use crate::common::{TIMEOUT_MARGIN, eventually};

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
        eventually("both flows end", || counters(&relay, 0).active == 0);
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
    eventually("flow ends", || counters(&relay, 0).active == 0);
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

        eventually("flows end", || counters(&relay, 0).active == 0);
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
        eventually("flow ends", || counters(&relay, 0).active == 0);
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
            });
        }
        eventually("flows end", || counters(&relay, 0).active == 0);
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
        });
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
        eventually("all flows end", || counters(&relay, 0).active == 0);
        let c = counters(&relay, 0);
        assert_eq!(c.flows, CLIENTS as u64);
        assert_eq!(c.errors, 0);
        relay.shutdown(Duration::from_secs(1)).await;
    })
    .await
    .expect("test finished in time");
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
    const CONNECT: Duration = Duration::from_secs(1);
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
        let latest = 3 * CONNECT + TIMEOUT_MARGIN;
        assert!(
            waited >= CONNECT && waited <= latest,
            "closed after {waited:?}, not within {CONNECT:?}..={latest:?}"
        );
        eventually("failure counted", || {
            counters(&relay, 0).connect_failures == 1
        });
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_idle_flow_is_closed_and_a_busy_one_is_not() {
    const IDLE: Duration = Duration::from_secs(1);
    tokio::time::timeout(TEST_LIMIT, async {
        let echo = tcp_echo().await;
        let timeouts = Timeouts {
            tcp_established: IDLE,
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
        let idle_since = Instant::now();
        let mut idle = TcpStream::connect(front).await.unwrap();
        let closed = tokio::spawn(async move {
            let n = idle.read(&mut [0u8; 1]).await.unwrap();
            (n, Instant::now())
        });
        let mut busy = TcpStream::connect(front).await.unwrap();
        // Traffic every 200 ms for 3 timeouts keeps `busy` open.
        for i in 0..15u8 {
            busy.write_all(&[i]).await.unwrap();
            let mut b = [0u8];
            busy.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], i);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // `idle` was closed by the relay meanwhile, in time.
        let (n, closed_at) = tokio::time::timeout(WAIT, closed)
            .await
            .expect("idle flow closed")
            .unwrap();
        assert_eq!(n, 0);
        let after = closed_at - idle_since;
        let latest = 3 * IDLE + TIMEOUT_MARGIN;
        assert!(
            after >= IDLE && after <= latest,
            "idle flow closed after {after:?}, not within {IDLE:?}..={latest:?}"
        );
        assert_eq!(counters(&relay, 0).active, 1);
        relay.shutdown(Duration::from_millis(100)).await;
    })
    .await
    .expect("test finished in time");
}
