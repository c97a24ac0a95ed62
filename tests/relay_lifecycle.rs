//! The relay's start and shutdown: a failed bind, the drain of live flows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forwarder::relay::Relay;
use forwarder::rules::{Protocol, RelaySettings, Timeouts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::common::relay::{
    Recorder, TEST_LIMIT, WAIT, addr_of, counters, listener, localhost, quick, start, tcp_echo,
    udp_echo, udp_round_trip,
};
use crate::common::{TIMEOUT_MARGIN, eventually};

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
        eventually("both flows open", || counters(&relay, 0).active == 2);

        // Room for the probes and the echo below on two busy cores.
        const DRAIN: Duration = Duration::from_secs(2);
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
        let took = started.elapsed();
        let latest = 3 * DRAIN + TIMEOUT_MARGIN;
        assert!(
            took >= DRAIN && took <= latest,
            "a live flow got its drain time and no more: {took:?}, not within {DRAIN:?}..={latest:?}"
        );
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
    const IDLE: Duration = Duration::from_millis(500);
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
            listener(1, Protocol::Udp, localhost(0), &[(udp, 1)], quick(IDLE)),
        ];
        let (relay, _) = start(&rules, RelaySettings::default()).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sent = Instant::now();
        assert_eq!(
            udp_round_trip(&client, addr_of(&relay, 1), b"x").await,
            b"x"
        );
        // The UDP session idles out; nothing else is live, so the drain
        // ends with it, long before its 60 s.
        relay.shutdown(Duration::from_secs(60)).await;
        let took = sent.elapsed();
        let latest = 3 * IDLE + TIMEOUT_MARGIN;
        assert!(
            took >= IDLE && took <= latest,
            "drain ended {took:?} after the last datagram, not within {IDLE:?}..={latest:?}"
        );
    })
    .await
    .expect("test finished in time");
}
