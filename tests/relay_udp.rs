//! The relay carrying UDP sessions between real sockets on loopback.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use forwarder::rules::{Protocol, RelaySettings, Timeouts};
use tokio::net::UdpSocket;

use crate::common::relay::{
    TEST_LIMIT, WAIT, addr_of, any6, counters, listener, localhost, quick, raise_open_files, start,
    udp_echo, udp_round_trip,
};
use crate::common::{eventually, expires_in_time};

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
        });
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
    const IDLE: Duration = Duration::from_secs(1);
    // A datagram every 200 ms for 3 idle timeouts, each way.
    const ROUNDS: u8 = 15;
    const EVERY: Duration = Duration::from_millis(200);
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

        // Client -> backend only.
        let mut sources = HashSet::new();
        let mut buf = [0u8; 64];
        for i in 0..ROUNDS {
            client.send_to(&[i], front).await.unwrap();
            let (n, from) = tokio::time::timeout(WAIT, sink.recv_from(&mut buf))
                .await
                .expect("datagram reaches the backend")
                .unwrap();
            assert_eq!(&buf[..n], [i]);
            sources.insert(from);
            tokio::time::sleep(EVERY).await;
        }
        assert_eq!(sources.len(), 1, "one session all along: {sources:?}");
        assert_eq!(counters(&relay, 0).flows, 1);

        // Backend -> client only keeps it too.
        let upstream = *sources.iter().next().unwrap();
        let mut last_datagram = Instant::now();
        for i in 0..ROUNDS {
            last_datagram = Instant::now();
            sink.send_to(&[i], upstream).await.unwrap();
            let (n, from) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
                .await
                .expect("reply reaches the client")
                .unwrap();
            assert_eq!((&buf[..n], from), (&[i][..], front));
            tokio::time::sleep(EVERY).await;
        }
        let c = counters(&relay, 0);
        assert_eq!((c.flows, c.active), (1, 1));
        let all = u64::from(ROUNDS);
        assert_eq!((c.bytes_to_backend, c.bytes_to_client), (all, all));
        assert_eq!((c.datagrams_to_backend, c.datagrams_to_client), (all, all));

        // Silence ends it, in time: the kernel path hears, and the next
        // datagram opens a new session (a new upstream port).
        expires_in_time("idle session expires", last_datagram, IDLE, || {
            counters(&relay, 0).active == 0
        });
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
        });
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
