//! Health-gated backends on the kernel path, through the daemon: two
//! backends (two addresses in the backend namespace) that say who they
//! are; one stops, comes back, or stops answering the UDP check; then both
//! stop. Every flow is counted by the backend that answered it.

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, relay_rule, spawn_in,
};
use crate::common::{self, Netns, Topology};

const PORT: u16 = 3478;
const LISTEN: u16 = 7300;
/// The check settings of the rule below.
const INTERVAL: Duration = Duration::from_millis(400);
const FALL: u32 = 3;
const RISE: u32 = 2;

/// The client | forwarder | backend topology, with a second address in
/// the backend namespace: backends A (198.18.2.2) and B (198.18.2.3).
pub(crate) fn two_backends() -> (Topology, SocketAddr, SocketAddr) {
    let topo = Topology::new();
    forwarding_on(&topo);
    let b = SocketAddr::from((Ipv4Addr::new(198, 18, 2, 3), PORT));
    let b_if = topo.backend_link.b_if.clone();
    topo.backend
        .ip(&["addr", "add", &format!("{}/24", b.ip()), "dev", &b_if]);
    let a = SocketAddr::from((topo.backend_addr(), PORT));
    (topo, a, b)
}

fn rule_file(a: SocketAddr, b: SocketAddr) -> String {
    format!(
        "routes:
  hc:
    scheme: tcp,udp
    port: {LISTEN}:{PORT}
    backends: [{a}, {b}]
    path: tc
    healthcheck: {{interval: 400ms, timeout: 300ms, fall: {FALL}, rise: {RISE}, payload: ping, expect: pong}}
"
    )
}

/// A TCP server on `addr` that sends `name` to each client and closes.
pub(crate) struct TcpServer {
    stop: Arc<AtomicBool>,
    /// Connections accepted (flows and checks).
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    pub(crate) fn start(ns: &Netns, addr: SocketAddr, name: u8) -> TcpServer {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (flag, count) = (stop.clone(), accepted.clone());
        let thread = spawn_in(ns, move || {
            let listener = TcpListener::bind(addr).unwrap();
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        let _ = std::io::Write::write_all(&mut stream, &[name]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        ready_rx.recv_timeout(WAIT).expect("tcp server up");
        TcpServer {
            stop,
            accepted,
            thread: Some(thread),
        }
    }
}

impl Drop for TcpServer {
    /// Closes the listening socket: new connections are refused.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server on `addr`: answers `ping` with `pong` while `answer_checks`
/// holds, and any other datagram with `name`.
struct UdpServer {
    stop: Arc<AtomicBool>,
    answer_checks: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    fn start(ns: &Netns, addr: SocketAddr, name: u8) -> UdpServer {
        let stop = Arc::new(AtomicBool::new(false));
        let answer_checks = Arc::new(AtomicBool::new(true));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (flag, answer) = (stop.clone(), answer_checks.clone());
        let thread = spawn_in(ns, move || {
            let socket = UdpSocket::bind(addr).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if &buf[..n] == b"ping" {
                    if answer.load(Ordering::Relaxed) {
                        let _ = socket.send_to(b"pong", from);
                    }
                } else {
                    let _ = socket.send_to(&[name], from);
                }
            }
        });
        ready_rx.recv_timeout(WAIT).expect("udp server up");
        UdpServer {
            stop,
            answer_checks,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Which backend answered each of `n` new TCP connections: counts of `A`, `B`.
fn tcp_flows(topo: &Topology, n: usize) -> [usize; 2] {
    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN));
    in_netns(&topo.client, || {
        let mut counts = [0; 2];
        for _ in 0..n {
            let mut s = TcpStream::connect_timeout(&to, WAIT).expect("connect");
            s.set_read_timeout(Some(WAIT)).unwrap();
            let mut who = Vec::new();
            s.read_to_end(&mut who).expect("read the backend's name");
            counts[usize::from(who == b"B")] += 1;
            assert!(who == b"A" || who == b"B", "answer {who:?}");
        }
        counts
    })
}

/// A client socket that has opened a UDP flow; returns who answered.
fn udp_flow(socket: &UdpSocket) -> u8 {
    socket.send(b"who").unwrap();
    let mut buf = [0u8; 16];
    let n = socket
        .recv(&mut buf)
        .expect("a reply through the forwarder");
    assert_eq!(n, 1, "{:?}", &buf[..n]);
    buf[0]
}

fn udp_client(to: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    s.connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// Which backend answered each of `n` new UDP flows (a new socket each).
fn udp_flows(topo: &Topology, n: usize) -> [usize; 2] {
    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN));
    in_netns(&topo.client, || {
        let mut counts = [0; 2];
        for _ in 0..n {
            let who = udp_flow(&udp_client(to));
            assert!(who == b'A' || who == b'B', "answer {who}");
            counts[usize::from(who == b'B')] += 1;
        }
        counts
    })
}

/// The state (`up`/`down`) of backend `index` of rule hc/`protocol`.
fn state(daemon: &Daemon, protocol: &str, index: usize) -> String {
    let status = daemon.status();
    let rule = status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alias"] == "hc" && r["protocol"] == protocol)
        .unwrap_or_else(|| panic!("no rule hc/{protocol} in {status}"))
        .clone();
    rule["health"][index]["state"]
        .as_str()
        .unwrap_or_else(|| panic!("no health in {rule}"))
        .to_owned()
}

/// Waits for backend `index` of hc/`protocol` to reach `want`, from the
/// moment its backend changed (`since`), and checks how long it took:
/// not before `runs - 1` more checks can have passed (when `since` is
/// when the backend changed), and not much later than `runs` checks
/// (three times that, and a margin for busy cores).
fn wait_state(
    daemon: &Daemon,
    protocol: &str,
    index: usize,
    want: &str,
    runs: u32,
    since: Option<Instant>,
) -> Duration {
    let (since, lower) = match since {
        Some(changed) => (changed, INTERVAL * (runs - 1) - Duration::from_millis(100)),
        // Checks that began before we looked.
        None => (Instant::now(), Duration::ZERO),
    };
    let upper = INTERVAL * runs * 3 + Duration::from_secs(2);
    loop {
        let now = state(daemon, protocol, index);
        let took = since.elapsed();
        if now == want {
            assert!(
                took >= lower,
                "{protocol} backend {index} {want} after {took:?}, before {runs} checks could run ({lower:?})"
            );
            return took;
        }
        assert!(
            took <= upper,
            "{protocol} backend {index} not {want} after {took:?} (bound {upper:?}):\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn new_flows_go_only_to_healthy_backends_and_come_back() {
    if !common::require_root("new_flows_go_only_to_healthy_backends_and_come_back") {
        return;
    }
    let (topo, a, b) = two_backends();
    let a_tcp = TcpServer::start(&topo.backend, a, b'A');
    let _b_tcp = TcpServer::start(&topo.backend, b, b'B');
    let a_udp = UdpServer::start(&topo.backend, a, b'A');
    let _b_udp = UdpServer::start(&topo.backend, b, b'B');
    let daemon = Daemon::start(&topo.forwarder, "health", &rule_file(a, b));

    // Both take new flows at first.
    let tcp = tcp_flows(&topo, 20);
    assert!(tcp[0] > 0 && tcp[1] > 0, "tcp flows per backend {tcp:?}");
    let udp = udp_flows(&topo, 20);
    assert!(udp[0] > 0 && udp[1] > 0, "udp flows per backend {udp:?}");
    // A UDP flow that A carries, to see it live on once A is out.
    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN));
    let on_a = in_netns(&topo.client, || {
        loop {
            let s = udp_client(to);
            if udp_flow(&s) == b'A' {
                break s;
            }
        }
    });

    // A's TCP port closes: within FALL checks, no new TCP flow goes there.
    let stopped = Instant::now();
    drop(a_tcp);
    let took = wait_state(&daemon, "tcp", 0, "down", FALL, Some(stopped));
    eprintln!("tcp backend down after {took:?}");
    assert_eq!(tcp_flows(&topo, 20), [0, 20]);
    assert_eq!(state(&daemon, "udp", 0), "up", "udp checks are their own");

    // A's UDP port stays open but stops answering the check.
    let silenced = Instant::now();
    a_udp.answer_checks.store(false, Ordering::Relaxed);
    let took = wait_state(&daemon, "udp", 0, "down", FALL, Some(silenced));
    eprintln!("udp backend down after {took:?}");
    assert_eq!(udp_flows(&topo, 20), [0, 20]);
    // A's live flow is A's to end, not the checks'.
    assert_eq!(in_netns(&topo.client, || udp_flow(&on_a)), b'A');

    // Back: after RISE passed checks, A takes new flows again.
    let restarted = Instant::now();
    let a_tcp = TcpServer::start(&topo.backend, a, b'A');
    a_udp.answer_checks.store(true, Ordering::Relaxed);
    wait_state(&daemon, "tcp", 0, "up", RISE, Some(restarted));
    wait_state(&daemon, "udp", 0, "up", RISE, Some(restarted));
    let tcp = tcp_flows(&topo, 20);
    assert!(tcp[0] > 0 && tcp[1] > 0, "tcp flows per backend {tcp:?}");
    let udp = udp_flows(&topo, 20);
    assert!(udp[0] > 0 && udp[1] > 0, "udp flows per backend {udp:?}");

    // Every flow of the rule so far went by the kernel path.
    let status = daemon.status();
    assert_eq!(counter(relay_rule(&status, "hc", "tcp"), "flows"), 0);
    assert_eq!(counter(relay_rule(&status, "hc", "udp"), "flows"), 0);
    assert!(counter(kernel_rule(&status, "hc", "tcp"), "flows") >= 60);
    assert!(counter(kernel_rule(&status, "hc", "udp"), "flows") >= 60);
    drop(a_tcp);
    daemon.stop();
}

#[test]
fn with_every_backend_down_tcp_clients_are_reset_at_once() {
    if !common::require_root("with_every_backend_down_tcp_clients_are_reset_at_once") {
        return;
    }
    let (topo, a, b) = two_backends();
    let a_udp = UdpServer::start(&topo.backend, a, b'A');
    let b_udp = UdpServer::start(&topo.backend, b, b'B');
    // No TCP server at all: both TCP backends refuse.
    let daemon = Daemon::start(&topo.forwarder, "alldown", &rule_file(a, b));
    wait_state(&daemon, "tcp", 0, "down", FALL, None);
    wait_state(&daemon, "tcp", 1, "down", FALL, None);
    a_udp.answer_checks.store(false, Ordering::Relaxed);
    b_udp.answer_checks.store(false, Ordering::Relaxed);
    let silenced = Instant::now();
    wait_state(&daemon, "udp", 0, "down", FALL, Some(silenced));
    wait_state(&daemon, "udp", 1, "down", FALL, Some(silenced));

    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN));
    in_netns(&topo.client, || {
        for _ in 0..5 {
            let asked = Instant::now();
            let ended = TcpStream::connect_timeout(&to, WAIT).and_then(|mut s| {
                s.set_read_timeout(Some(WAIT)).unwrap();
                let mut buf = [0u8; 1];
                s.read(&mut buf)
            });
            let took = asked.elapsed();
            let e = ended.expect_err("no backend, so no byte and no clean close");
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
                ),
                "{e}"
            );
            assert!(took < Duration::from_secs(1), "reset after {took:?}");
        }
    });
    // UDP: dropped, and counted.
    in_netns(&topo.client, || {
        let s = udp_client(to);
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.send(b"who").unwrap();
        let mut buf = [0u8; 16];
        assert!(s.recv(&mut buf).is_err(), "a reply with every backend down");
    });
    let status = daemon.status();
    assert_eq!(counter(relay_rule(&status, "hc", "tcp"), "no_backend"), 5);
    assert!(counter(relay_rule(&status, "hc", "udp"), "no_backend") >= 1);
    assert_eq!(counter(relay_rule(&status, "hc", "udp"), "flows"), 0);
    daemon.stop();
}

/// Connections `server` accepts during `window`.
fn accepted_during(server: &TcpServer, window: Duration) -> u64 {
    let before = server.accepted.load(Ordering::Relaxed);
    std::thread::sleep(window);
    server.accepted.load(Ordering::Relaxed) - before
}

#[test]
fn reloads_keep_restart_and_stop_the_checks() {
    if !common::require_root("reloads_keep_restart_and_stop_the_checks") {
        return;
    }
    let (topo, a, b) = two_backends();
    let b_server = TcpServer::start(&topo.backend, b, b'B');
    // A has no server: its checks fail.
    let file = |check: &str, extra: &str| {
        format!(
            "routes:
  hc:
    scheme: tcp
    port: {LISTEN}:{PORT}
    backends: [{a}, {b}]
    path: tc
    healthcheck: {{{check}}}
{extra}"
        )
    };
    let fast = "interval: 200ms, timeout: 150ms, fall: 1, rise: 1";
    let daemon = Daemon::start(&topo.forwarder, "health-reload", &file(fast, ""));
    wait_state(&daemon, "tcp", 0, "down", 1, None);
    let fast_checks = accepted_during(&b_server, Duration::from_secs(2));
    assert!(
        fast_checks >= 4,
        "{fast_checks} checks of B in 2 s every 200ms"
    );

    // A rule added beside it: hc is unchanged, and A stays out.
    let other = "  other: {scheme: tcp, host: 198.18.2.3, port: 7301:3478}\n";
    std::fs::write(daemon.config_path(), file(fast, other)).unwrap();
    let out = common::reload(daemon.control_path(), WAIT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(state(&daemon, "tcp", 0), "down");
    assert_eq!(tcp_flows(&topo, 10), [0, 10]);

    // New settings: the rule's checks start over with them (A starts
    // healthy, and is out again after its first check).
    let slow = "interval: 1500ms, timeout: 500ms, fall: 1, rise: 1";
    std::fs::write(daemon.config_path(), file(slow, other)).unwrap();
    let out = common::reload(daemon.control_path(), WAIT);
    assert!(out.status.success(), "{out:?}");
    wait_state(&daemon, "tcp", 0, "down", 1, None);
    let slow_checks = accepted_during(&b_server, Duration::from_secs(3));
    assert!(
        (1..=3).contains(&slow_checks),
        "{slow_checks} checks of B in 3 s every 1.5s"
    );

    // Removed: its checks stop.
    std::fs::write(daemon.config_path(), format!("routes:\n{other}")).unwrap();
    let out = common::reload(daemon.control_path(), WAIT);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(accepted_during(&b_server, Duration::from_secs(2)), 0);
    daemon.stop();
}

#[test]
fn relay_failures_take_a_backend_out() {
    if !common::require_root("relay_failures_take_a_backend_out") {
        return;
    }
    let (topo, a, b) = two_backends();
    let _b_tcp = TcpServer::start(&topo.backend, b, b'B');
    let _b_udp = UdpServer::start(&topo.backend, b, b'B');
    // One check at start (A's ports are closed: one failure), then none
    // for an hour: only the relay's own failures can take A out.
    let yaml = format!(
        "relay: {{drain_timeout: 1s}}
routes:
  hc:
    scheme: tcp,udp
    port: {LISTEN}:{PORT}
    backends: [{a}, {b}]
    path: relay
    healthcheck: {{interval: 1h, timeout: 1s, fall: 3, rise: 1, payload: ping, expect: pong}}
"
    );
    let daemon = Daemon::start(&topo.forwarder, "health-passive", &yaml);
    wait_for_a_failed_check(&daemon, 0);
    wait_for_a_failed_check(&daemon, 1);
    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN));
    let tcp: Vec<Option<u8>> = in_netns(&topo.client, || {
        (0..12)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&to, WAIT).ok()?;
                s.set_read_timeout(Some(WAIT)).unwrap();
                let mut who = Vec::new();
                s.read_to_end(&mut who).ok()?;
                who.first().copied()
            })
            .collect()
    });
    // A session to A hears of the closed port by ICMP, as the relay does.
    let udp: Vec<Option<u8>> = in_netns(&topo.client, || {
        (0..12)
            .map(|_| {
                let s = udp_client(to);
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                s.send(b"who").unwrap();
                let mut buf = [0u8; 16];
                s.recv(&mut buf).ok().map(|_| buf[0])
            })
            .collect()
    });
    // Picks alternate: two flows to A fail (its third failure in a row),
    // then only B.
    for (protocol, answers) in [("tcp", tcp), ("udp", udp)] {
        let failed = answers.iter().filter(|a| a.is_none()).count();
        assert_eq!(failed, 2, "{protocol}: {answers:?}");
        assert!(
            answers[6..].iter().all(|a| *a == Some(b'B')),
            "{protocol}: {answers:?}"
        );
        assert_eq!(state(&daemon, protocol, 0), "down");
    }
    let status = daemon.status();
    assert_eq!(
        counter(relay_rule(&status, "hc", "tcp"), "connect_failures"),
        2
    );
    daemon.stop();
}

/// Waits until backend A of rule `rule` (in file order) has failed a check.
fn wait_for_a_failed_check(daemon: &Daemon, rule: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = daemon.status();
        if status["rules"][rule]["health"][0]["last_failure"].is_string() {
            return;
        }
        assert!(Instant::now() < deadline, "no failed check of A:\n{status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
