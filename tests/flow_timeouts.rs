//! How long flows are kept, with real traffic: a half-closed kernel TCP
//! flow outlives `tcp_close` and still carries the backend's late answer;
//! an unanswered UDP flow ends at `udp_unreplied`, an answered one at
//! `udp_idle`, on the kernel path and in the relay alike.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use forwarder::relay::Relay;
use forwarder::rules::{
    BackendSpec, Listener, NoKernelPath, PathMode, Protocol, RelaySettings, Timeouts,
};

use crate::common::eventually;
use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule};
use crate::common::traffic::{BackendServers, udp_echo, udp_socket};
use crate::common::{Topology, require_root};

/// A backend port that takes datagrams and never answers.
const SINK_PORT: u16 = 3999;
/// A backend port that answers a request only long after the client
/// half-closed.
const LATE_PORT: u16 = 3998;

fn rules(topo: &Topology, timeouts: &str, routes: &[(&str, &str, u16, u16)]) -> String {
    let mut yaml = format!(
        "interfaces: [{}, {}]\nrelay: {{drain_timeout: 1s}}\ntimeouts: {timeouts}\nroutes:\n",
        topo.client_link.a_if, topo.backend_link.a_if,
    );
    for (alias, scheme, listen, target) in routes {
        yaml += &format!(
            "  {alias}: {{scheme: {scheme}, host: {}, port: {listen}:{target}, path: kernel}}\n",
            topo.backend_addr()
        );
    }
    yaml
}

#[test]
fn a_half_closed_flow_outlives_tcp_close_and_carries_a_late_answer() {
    if !require_root("a_half_closed_flow_outlives_tcp_close_and_carries_a_late_answer") {
        return;
    }
    // Three times tcp_close: the flow would be gone had the client's FIN
    // moved it to tcp_close, as it did before.
    let tcp_close = Duration::from_secs(2);
    let delay = tcp_close * 3;
    let topo = Topology::new();
    forwarding_on(&topo);
    let listener = in_netns(&topo.backend, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, LATE_PORT)).unwrap()
    });
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut question = Vec::new();
        conn.read_to_end(&mut question).unwrap();
        std::thread::sleep(delay);
        conn.write_all(b"late answer to ").unwrap();
        conn.write_all(&question).unwrap();
    });
    let yaml = rules(
        &topo,
        &format!("{{tcp_close: {}s}}", tcp_close.as_secs()),
        &[("late", "tcp", 7878, LATE_PORT)],
    );
    let daemon = Daemon::start(&topo.forwarder, "half-closed", &yaml);
    let to = SocketAddr::from((topo.forwarder_addr(), 7878));
    let started = Instant::now();
    let answer = in_netns(&topo.client, || {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        conn.set_read_timeout(Some(delay * 3)).unwrap();
        conn.write_all(b"the question").unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer)
            .expect("the backend's late answer");
        answer
    });
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(answer, b"late answer to the question");
    server.join().unwrap();
    let status = daemon.status();
    let kernel = kernel_rule(&status, "late", "tcp");
    assert_eq!(counter(kernel, "flows"), 1, "{kernel}");
    assert!(counter(kernel, "packets_rev") >= 3, "{kernel}");
    assert_eq!(counter(relay_rule(&status, "late", "tcp"), "flows"), 0);
    daemon.stop();
}

#[test]
fn a_refused_connection_frees_its_port_after_tcp_close_not_time_wait() {
    if !require_root("a_refused_connection_frees_its_port_after_tcp_close_not_time_wait") {
        return;
    }
    let tcp_close = Duration::from_secs(1);
    let topo = Topology::new();
    forwarding_on(&topo);
    // Nothing listens on the backend's port: it answers the SYN with RST.
    let yaml = rules(
        &topo,
        &format!("{{tcp_close: {}s}}", tcp_close.as_secs()),
        &[("refused", "tcp", 7878, 3997)],
    );
    let daemon = Daemon::start(&topo.forwarder, "refused", &yaml);
    let to = SocketAddr::from((topo.forwarder_addr(), 7878));
    let err = in_netns(&topo.client, || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap_err()
    });
    let since = Instant::now();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let status = daemon.status();
    assert_eq!(counter(kernel_rule(&status, "refused", "tcp"), "flows"), 1);
    // The backend's RST leaves no TIME_WAIT: tcp_close, not the 60 s guard.
    let freed = expired_at(&daemon, 1, since);
    assert!(
        freed + Duration::from_millis(100) >= tcp_close
            && freed <= tcp_close * 3 + Duration::from_secs(1),
        "freed after {freed:?}"
    );
    daemon.stop();
}

/// When the daemon's count of expired flows reached `n`, from `since`.
fn expired_at(daemon: &Daemon, n: u64, since: Instant) -> Duration {
    eventually(&format!("{n} flows expired"), || {
        daemon.status()["kernel"]["expired_flows"].as_u64() >= Some(n)
    });
    since.elapsed()
}

#[test]
fn an_unanswered_udp_flow_ends_at_udp_unreplied_an_answered_one_at_udp_idle() {
    if !require_root("an_unanswered_udp_flow_ends_at_udp_unreplied_an_answered_one_at_udp_idle") {
        return;
    }
    let (unreplied, idle) = (Duration::from_secs(1), Duration::from_secs(5));
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let _sink = in_netns(&topo.backend, || {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, SINK_PORT)).unwrap()
    });
    let yaml = rules(
        &topo,
        &format!(
            "{{udp_unreplied: {}s, udp_idle: {}s}}",
            unreplied.as_secs(),
            idle.as_secs()
        ),
        &[
            ("sink", "udp", 7000, SINK_PORT),
            ("echo", "udp", 7001, 3478),
        ],
    );
    let daemon = Daemon::start(&topo.forwarder, "udp-unreplied", &yaml);
    let at = |port: u16| SocketAddr::from((topo.forwarder_addr(), port));
    let _sockets = in_netns(&topo.client, || {
        let sink = udp_socket(at(7000));
        sink.send(b"nobody answers").unwrap();
        let echo = udp_socket(at(7001));
        udp_echo(&echo, b"answered");
        (sink, echo)
    });
    let since = Instant::now();
    let status = daemon.status();
    for alias in ["sink", "echo"] {
        assert_eq!(counter(kernel_rule(&status, alias, "udp"), "flows"), 1);
    }
    let first = expired_at(&daemon, 1, since);
    assert_eq!(
        daemon.status()["kernel"]["conntrack_entries"].as_u64(),
        Some(2),
        "the answered flow stays"
    );
    let second = expired_at(&daemon, 2, since);
    // Lower bounds: the limit itself (less the moments between the last
    // packet and `since`); upper: three times it plus a margin for two
    // busy cores.
    let slack = Duration::from_millis(100);
    let margin = Duration::from_secs(1);
    assert!(
        first + slack >= unreplied && first <= unreplied * 3 + margin,
        "unanswered flow expired after {first:?}"
    );
    assert!(
        second + slack >= idle && second <= idle * 3 + margin,
        "answered flow expired after {second:?}"
    );
    daemon.stop();
}

/// A relay UDP rule on loopback to `backend`.
fn relay_udp(rule_id: u32, backend: SocketAddr, timeouts: Timeouts) -> Listener {
    Listener {
        rule_id,
        alias: format!("udp{rule_id}"),
        protocol: Protocol::Udp,
        bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        backends: vec![BackendSpec {
            addr: backend,
            weight: 1,
        }],
        timeouts,
        path: PathMode::Relay,
        preserve_client_ip: false,
        proxy: Default::default(),
        listen_picked: false,
        ports: forwarder::rules::ListenPorts::SINGLE,
        health: None,
        acl: None,
        max_connections: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_udp_sessions_end_unanswered_at_udp_unreplied_answered_at_udp_idle() {
    let (unreplied, idle) = (Duration::from_millis(300), Duration::from_millis(1500));
    let timeouts = Timeouts {
        udp_unreplied: unreplied,
        udp_idle: idle,
        ..Timeouts::default()
    };
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let rules = [
        relay_udp(0, sink.local_addr().unwrap(), timeouts),
        relay_udp(1, echo.local_addr().unwrap(), timeouts),
    ];
    let relay = Relay::start(
        &rules,
        RelaySettings::default(),
        std::sync::Arc::new(NoKernelPath),
    )
    .await
    .expect("relay starts");
    let front = |id: u32| {
        relay
            .local_addrs()
            .into_iter()
            .find(|&(rule, _)| rule == id)
            .unwrap()
            .1
    };
    let active = |id: u32| {
        relay
            .counters()
            .into_iter()
            .find(|c| c.rule_id == id)
            .unwrap()
            .active
    };
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 64];
    client.send_to(b"nobody answers", front(0)).await.unwrap();
    let wait = Duration::from_secs(5);
    tokio::time::timeout(wait, sink.recv_from(&mut buf))
        .await
        .expect("the datagram reaches the sink")
        .unwrap();
    client.send_to(b"answered", front(1)).await.unwrap();
    let (n, upstream) = tokio::time::timeout(wait, echo.recv_from(&mut buf))
        .await
        .expect("the datagram reaches the echo backend")
        .unwrap();
    echo.send_to(&buf[..n], upstream).await.unwrap();
    tokio::time::timeout(wait, client.recv_from(&mut buf))
        .await
        .expect("the echo reaches the client")
        .unwrap();
    let since = Instant::now();
    assert_eq!((active(0), active(1)), (1, 1));

    let ended = |id: u32| async move {
        let deadline = since + idle * 3 + wait;
        while active(id) != 0 {
            assert!(Instant::now() < deadline, "session {id} never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        since.elapsed()
    };
    let first = ended(0).await;
    assert_eq!(active(1), 1, "the answered session stays");
    let second = ended(1).await;
    // Lower bounds: the limit (less the moments since the last datagram);
    // upper: three times it plus a margin for two busy cores.
    let (slack, margin) = (Duration::from_millis(50), Duration::from_millis(500));
    assert!(
        first + slack >= unreplied && first <= unreplied * 3 + margin,
        "unanswered session ended after {first:?}"
    );
    assert!(
        second + slack >= idle && second <= idle * 3 + margin,
        "answered session ended after {second:?}"
    );
    relay.shutdown(Duration::ZERO).await;
}
