//! Integration tests: reloading the rule file of a running daemon (SIGHUP,
//! `forwarder reload`) while traffic runs, in namespaces.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::eventually;
use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, relay_rule, reserved_ports,
    spawn_in,
};
use crate::common::traffic::{
    BACKEND_PORT, BackendServers, paced_transfer, tcp_echo_conn, tcp_echo_round, udp_echo,
    udp_socket,
};
use crate::common::{self, Netns, Topology};

/// A UDP server in `ns` on `port` that answers each datagram with `tag`
/// followed by the datagram: which backend answered is visible.
pub struct TaggedUdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TaggedUdpEcho {
    pub fn start(ns: &Netns, port: u16, tag: &'static str) -> TaggedUdpEcho {
        TaggedUdpEcho::start_on(ns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), tag)
    }

    /// On one address of `ns` only.
    pub fn start_on(ns: &Netns, addr: SocketAddr, tag: &'static str) -> TaggedUdpEcho {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, up) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = spawn_in(ns, move || {
            let socket = UdpSocket::bind(addr).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            ready.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let mut reply = tag.as_bytes().to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        up.recv_timeout(WAIT).expect("tagged echo up");
        TaggedUdpEcho {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TaggedUdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `msg` on `socket` until an answer comes (the first datagram of a
/// flow may wait for neighbour resolution) and returns the answer.
pub fn udp_ask(socket: &UdpSocket, msg: &[u8]) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    for _ in 0..10 {
        socket.send(msg).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => return buf[..n].to_vec(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => panic!("udp via {:?}: {e}", socket.peer_addr()),
        }
    }
    panic!("no answer via {:?}", socket.peer_addr());
}

/// Echoes numbered datagrams one at a time until `stop`, and returns
/// (sent, answered): a lost or wrong answer ends the stream early.
pub fn udp_stream(socket: UdpSocket, stop: Arc<AtomicBool>) -> (u64, u64) {
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (mut sent, mut answered) = (0u64, 0u64);
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        let msg = sent.to_be_bytes();
        socket.send(&msg).unwrap();
        sent += 1;
        match socket.recv(&mut buf) {
            Ok(8) if buf[..8] == msg => answered += 1,
            _ => break,
        }
    }
    (sent, answered)
}

const HUP_RULES_BEFORE: &str = "
routes:
  keep-tcp: {scheme: tcp, host: 198.18.2.2, port: 7001:3478}
  keep-udp: {scheme: udp, host: 198.18.2.2, port: 7002:3478}
  gone: {scheme: tcp, host: 198.18.2.2, port: 7003:3478}
  moved: {scheme: udp, host: 198.18.2.2, port: 7004:5001}
";

const HUP_RULES_AFTER: &str = "
routes:
  keep-tcp: {scheme: tcp, host: 198.18.2.2, port: 7001:3478}
  moved: {scheme: udp, host: 198.18.2.2, port: 7004:5002}
  keep-udp: {scheme: udp, host: 198.18.2.2, port: 7002:3478}
  new: {scheme: udp, host: 198.18.2.2, port: 7005:5002}
";

#[test]
fn sighup_adds_removes_and_changes_rules_while_flows_go_on() {
    if !common::require_root("sighup_adds_removes_and_changes_rules_while_flows_go_on") {
        return;
    }
    assert_eq!(BACKEND_PORT, 3478);
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let _one = TaggedUdpEcho::start(&topo.backend, 5001, "one:");
    let _two = TaggedUdpEcho::start(&topo.backend, 5002, "two:");
    let fwd = topo.forwarder_addr();
    let at = move |port: u16| SocketAddr::from((fwd, port));
    let daemon = Daemon::start(&topo.forwarder, "reload-hup", HUP_RULES_BEFORE);
    let reserved_before_stop = reserved_ports(&topo.forwarder);

    // Flows that must live through the reload.
    const SIZE: u64 = 256 << 20;
    let progress = Arc::new(AtomicU64::new(0));
    let transfer = {
        let progress = progress.clone();
        spawn_in(&topo.client, move || {
            paced_transfer(at(7001), SIZE, progress)
        })
    };
    let stop_udp = Arc::new(AtomicBool::new(false));
    let stream = {
        let socket = in_netns(&topo.client, || udp_socket(at(7002)));
        udp_echo(&socket, b"warm up");
        let stop = stop_udp.clone();
        std::thread::spawn(move || udp_stream(socket, stop))
    };
    let mut gone_conn = in_netns(&topo.client, || tcp_echo_conn(at(7003)));
    tcp_echo_round(&mut gone_conn, b"before");
    let moved_old = in_netns(&topo.client, || udp_socket(at(7004)));
    assert_eq!(udp_ask(&moved_old, b"a"), b"one:a");

    eventually("a quarter of the transfer sent", || {
        progress.load(Ordering::Relaxed) >= SIZE / 4
    });
    std::fs::write(daemon.config_path(), HUP_RULES_AFTER).unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("the reload is logged", || {
        daemon
            .log_text()
            .contains("reload: 1 added, 1 changed, 1 removed, 2 unchanged")
    });
    let at_reload = progress.load(Ordering::Relaxed);
    assert!(at_reload < SIZE, "the transfer ended before the reload");

    // The new rule forwards, the changed one sends new flows to its new
    // target while its old flow keeps the old one.
    let new = in_netns(&topo.client, || udp_socket(at(7005)));
    assert_eq!(udp_ask(&new, b"n"), b"two:n");
    let moved_new = in_netns(&topo.client, || udp_socket(at(7004)));
    assert_eq!(udp_ask(&moved_new, b"b"), b"two:b");
    assert_eq!(udp_ask(&moved_old, b"c"), b"one:c");
    // The removed rule refuses new connections; its open one goes on.
    tcp_echo_round(&mut gone_conn, b"after");
    let refused = in_netns(&topo.client, || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect_timeout(&at(7003), Duration::from_secs(2)) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return true,
                _ if Instant::now() > deadline => return false,
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    assert!(
        refused,
        "a new connection to the removed rule was not refused"
    );
    tcp_echo_round(&mut gone_conn, b"still");
    drop(gone_conn);

    let (sent, got) = transfer.join().expect("the transfer");
    assert_eq!(sent, got, "the 256 MiB transfer arrived intact");
    stop_udp.store(true, Ordering::Relaxed);
    let (udp_sent, udp_answered) = stream.join().unwrap();
    assert_eq!(
        udp_sent, udp_answered,
        "every datagram of the stream came back"
    );
    assert!(udp_sent > 100, "the stream ran ({udp_sent} datagrams)");

    // The kernel path carried them all, and counts a changed rule's flows
    // under both its versions.
    let status = daemon.status();
    for (alias, protocol, flows) in [
        ("keep-tcp", "tcp", 1),
        ("keep-udp", "udp", 1),
        ("moved", "udp", 2),
        ("new", "udp", 1),
    ] {
        let kernel = kernel_rule(&status, alias, protocol);
        assert_eq!(counter(kernel, "flows"), flows, "{alias}: {status}");
        let relay = relay_rule(&status, alias, protocol);
        assert_eq!(counter(relay, "flows"), 0, "{alias} on the relay: {status}");
    }
    let rules: Vec<&str> = status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alias"].as_str().unwrap())
        .collect();
    assert!(!rules.contains(&"gone"), "{rules:?}");
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
    assert_ne!(reserved_before_stop, "");
    assert_eq!(
        reserved_ports(&topo.forwarder),
        "",
        "the SNAT ports are given back"
    );
}

#[test]
fn reload_of_an_invalid_file_exits_2_and_the_old_rules_run_on() {
    if !common::require_root("reload_of_an_invalid_file_exits_2_and_the_old_rules_run_on") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let yaml = "routes:\n  echo: {scheme: udp, host: 198.18.2.2, port: 7002:3478}\n";
    let daemon = Daemon::start(&topo.forwarder, "reload-invalid", yaml);
    let to = SocketAddr::from((topo.forwarder_addr(), 7002));
    let before = in_netns(&topo.client, || udp_socket(to));
    udp_echo(&before, b"before");

    let bad = "routes:\n  echo: {scheme: udp, host: 198.18.2.2, port: 7002:70000}\n  \
               other: {scheme: sctp, port: 7003:3478}\n";
    std::fs::write(daemon.config_path(), bad).unwrap();
    let out = daemon.reload();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = daemon.config_path().display().to_string();
    for (line, what) in [(2, "70000"), (3, "sctp")] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&format!("{file}:{line}:")) && l.contains(what)),
            "no error at line {line} about {what}:\n{stderr}"
        );
    }
    assert!(stderr.contains("the running rules stay"), "{stderr}");

    // The old rule forwards on, old flow and new.
    udp_echo(&before, b"after");
    let after = in_netns(&topo.client, || udp_socket(to));
    udp_echo(&after, b"new flow");
    let status = daemon.status();
    assert_eq!(counter(kernel_rule(&status, "echo", "udp"), "flows"), 2);
    assert!(daemon.log_text().contains("the running rules stay"));
    daemon.stop();
}

/// A TCP server on 127.0.0.1 in `ns` that greets each connection with
/// `tag`, then echoes; it stops when the guard drops.
struct TaggedTcpEcho {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TaggedTcpEcho {
    fn start(ns: &Netns, tag: &'static [u8]) -> TaggedTcpEcho {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = spawn_in(ns, move || {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            listener.set_nonblocking(true).unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                std::thread::spawn(move || {
                    stream.set_nonblocking(false).unwrap();
                    stream.set_read_timeout(Some(WAIT)).unwrap();
                    if stream.write_all(tag).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TaggedTcpEcho {
            port: rx.recv_timeout(WAIT).unwrap(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TaggedTcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn greeting(stream: &mut TcpStream) -> [u8; 1] {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut tag = [0u8; 1];
    stream.read_exact(&mut tag).unwrap();
    tag
}

#[test]
fn relay_reload_keeps_the_listening_socket_and_its_flows() {
    if !common::require_root("relay_reload_keeps_the_listening_socket_and_its_flows") {
        return;
    }
    // One namespace, loopback only: the relay carries everything.
    let ns = Netns::new("relay-reload");
    let a = TaggedTcpEcho::start(&ns, b"A");
    let b = TaggedTcpEcho::start(&ns, b"B");
    let rules = |target: u16, extra: &str| {
        format!("routes:\n  r: {{scheme: tcp, host: 127.0.0.1, port: 7100:{target}}}\n{extra}")
    };
    let daemon = Daemon::start(&ns, "relay-reload", &rules(a.port, ""));
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 7100));
    let mut old = in_netns(&ns, || TcpStream::connect(listen).unwrap());
    assert_eq!(&greeting(&mut old), b"A");

    // Connections keep arriving through the reload: none may be refused.
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let stop = stop.clone();
        spawn_in(&ns, move || {
            let (mut ok, mut refused) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                match TcpStream::connect(listen) {
                    Ok(mut s) => {
                        let mut tag = [0u8; 1];
                        s.set_read_timeout(Some(WAIT)).unwrap();
                        if s.read_exact(&mut tag).is_ok() {
                            ok += 1;
                        }
                    }
                    Err(_) => refused += 1,
                }
            }
            (ok, refused)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(
        daemon.config_path(),
        rules(
            b.port,
            "  s: {scheme: udp, host: 127.0.0.1, port: 7101:9}\n",
        ),
    )
    .unwrap();
    let out = daemon.reload();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("reloaded: 1 added, 1 changed, 0 removed, 0 unchanged"),
        "{stdout}"
    );
    assert!(stdout.contains("added    s (udp [::]:7101)"), "{stdout}");
    assert!(stdout.contains("changed  r (tcp [::]:7100)"), "{stdout}");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (ok, refused) = hammer.join().unwrap();
    assert_eq!(
        refused, 0,
        "connections refused during the reload ({ok} accepted)"
    );
    assert!(ok > 10, "the hammer ran ({ok})");

    // The old flow keeps its backend; new flows go to the new one.
    old.write_all(b"x").unwrap();
    let mut echo = [0u8; 1];
    old.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"x");
    let mut new = in_netns(&ns, || TcpStream::connect(listen).unwrap());
    assert_eq!(&greeting(&mut new), b"B");
    let status = daemon.status();
    assert_eq!(status["rules"].as_array().unwrap().len(), 2, "{status}");
    assert!(
        counter(relay_rule(&status, "r", "tcp"), "flows") >= u64::from(ok) + 2,
        "the counters carried on through the change: {status}"
    );
    drop((old, new));
    daemon.stop();
}

#[test]
fn a_removed_udp_relay_rule_keeps_its_sessions_and_comes_back_on_the_same_socket() {
    if !common::require_root(
        "a_removed_udp_relay_rule_keeps_its_sessions_and_comes_back_on_the_same_socket",
    ) {
        return;
    }
    let ns = Netns::new("relay-udp-reload");
    let _one = TaggedUdpEcho::start(&ns, 5001, "one:");
    let _three = TaggedUdpEcho::start(&ns, 5003, "three:");
    let keep = "  keep: {scheme: tcp, host: 127.0.0.1, port: 7201:9}\n";
    let with_u = |target: u16| {
        format!("routes:\n  u: {{scheme: udp, host: 127.0.0.1, port: 7200:{target}}}\n{keep}")
    };
    let daemon = Daemon::start(&ns, "relay-udp-reload", &with_u(5001));
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 7200));
    let client = |ns: &Netns| {
        in_netns(ns, || {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            s.connect(listen).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        })
    };
    let old = client(&ns);
    assert_eq!(udp_ask(&old, b"a"), b"one:a");

    std::fs::write(daemon.config_path(), format!("routes:\n{keep}")).unwrap();
    let out = daemon.reload();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("reloaded: 0 added, 0 changed, 1 removed, 1 unchanged"),
        "{stdout}"
    );
    // The live session goes on; a new client is not served.
    assert_eq!(udp_ask(&old, b"b"), b"one:b");
    let stranger = client(&ns);
    stranger.send(b"anyone?").unwrap();
    let mut buf = [0u8; 64];
    assert!(
        stranger.recv(&mut buf).is_err(),
        "a removed rule served a new client"
    );

    // Back, with another target: the retiring listener serves again on its
    // socket (it cannot be bound twice), new clients at the new target.
    std::fs::write(daemon.config_path(), with_u(5003)).unwrap();
    let out = daemon.reload();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("reloaded: 1 added, 0 changed, 0 removed"),
        "{stdout}"
    );
    let new = client(&ns);
    assert_eq!(udp_ask(&new, b"x"), b"three:x");
    assert_eq!(
        udp_ask(&old, b"c"),
        b"one:c",
        "the old session keeps its backend"
    );
    let log = daemon.stop();
    assert!(!log.contains("cannot bind"), "{log}");
}
