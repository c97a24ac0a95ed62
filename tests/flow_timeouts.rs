//! How long the daemon keeps kernel flows, with real traffic: a half-closed
//! TCP flow outlives `tcp_close` and still carries the backend's late
//! answer; an unanswered UDP flow ends at `udp_unreplied`, an answered one
//! at `udp_idle`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::common::{Topology, require_root};
use crate::kernel_path::harness::{
    Daemon, counter, eventually, forwarding_on, in_netns, kernel_rule, relay_rule,
};
use crate::kernel_path::traffic::{BackendServers, udp_echo, udp_socket};

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
