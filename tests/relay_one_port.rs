//! TCP and UDP rules of the relay on one port, with weighted backends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use forwarder::relay::Relay;
use forwarder::rules::{Listener, Protocol, RelaySettings, Timeouts};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

use crate::common::relay::{
    Recorder, TEST_LIMIT, addr_of, any6, listener, localhost, tcp_named, udp_echo, udp_round_trip,
};

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
