//! Port ranges on the relay: one socket per protocol for a whole range,
//! steered by the sk_lookup program, with real traffic between namespaces.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use forwarder::config::range_entries;
use forwarder::kernel::Steering;
use forwarder::relay::{Relay, RelayRuleCounters};
use forwarder::rules::{ListenPorts, Listener, Protocol, RelaySettings, TargetPorts, Timeouts};
use forwarder_common::{ADDR_ANY, RuleValue};

use crate::common::harness::{Daemon, WAIT, counter, in_netns, relay_rule, runtime, spawn_in};
use crate::common::port_servers::{PortServers, tcp_port_of, udp_port_of};
use crate::common::relay::{Recorder, listener};
use crate::common::{Netns, Topology, require_root};

/// The range: 16,384 ports, one aligned block, below the ephemeral ports.
const FIRST: u16 = 16384;
const COUNT: u16 = 16384;
const LAST: u16 = FIRST + (COUNT - 1);
const MIDDLE: u16 = FIRST + COUNT / 2;

fn range(l: Listener) -> Listener {
    Listener {
        ports: ListenPorts {
            count: COUNT,
            target: TargetPorts::Shifted,
        },
        ..l
    }
}

/// The relay as a library in the forwarder namespace, with the steering
/// program loaded there; stopping it gives its counters.
struct SteeredRelay {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<JoinHandle<Vec<RelayRuleCounters>>>,
    recorder: Arc<Recorder>,
}

impl SteeredRelay {
    fn start(ns: &Netns, listeners: Vec<Listener>) -> SteeredRelay {
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let recorder = Arc::new(Recorder::default());
        let observer = recorder.clone();
        let thread = spawn_in(ns, move || {
            runtime().block_on(async move {
                let steering = Arc::new(Steering::load().expect("steering loads"));
                let relay = Relay::start_steered(
                    &listeners,
                    RelaySettings::default(),
                    observer,
                    None,
                    Some(steering.clone()),
                )
                .await
                .expect("relay starts");
                // The trie entries as the config compiles them (wildcard binds).
                let entries: Vec<_> = listeners
                    .iter()
                    .flat_map(|l| {
                        let rule = RuleValue {
                            rule_id: l.rule_id,
                            ..RuleValue::default()
                        };
                        range_entries(ADDR_ANY, l.protocol, l.bind.port(), l.ports, rule)
                    })
                    .collect();
                steering.set_ranges(&entries).expect("ranges written");
                ready_tx.send(()).unwrap();
                tokio::task::spawn_blocking(move || stop_rx.recv_timeout(Duration::from_secs(120)))
                    .await
                    .unwrap()
                    .ok();
                // A reply's count lands just after the client may have read it.
                let settled = tokio::time::Instant::now() + Duration::from_secs(5);
                while relay
                    .counters()
                    .iter()
                    .any(|c| c.datagrams_to_client != c.datagrams_to_backend)
                    && tokio::time::Instant::now() < settled
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let counters = relay.counters();
                relay.shutdown(Duration::ZERO).await;
                counters
            })
        });
        ready_rx.recv_timeout(WAIT).expect("relay up");
        SteeredRelay {
            stop,
            thread: Some(thread),
            recorder,
        }
    }

    fn stop(mut self) -> Vec<RelayRuleCounters> {
        let _ = self.stop.send(());
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for SteeredRelay {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rule(counters: &[RelayRuleCounters], id: u32) -> &RelayRuleCounters {
    counters.iter().find(|c| c.rule_id == id).unwrap()
}

#[test]
fn ranges_relay_library_steers_every_port_of_a_range_to_one_socket() {
    if !require_root("ranges_relay_library_steers_every_port_of_a_range_to_one_socket") {
        return;
    }
    let topo = Topology::new();
    let backend = SocketAddr::from((topo.backend_addr(), FIRST));
    let _servers = PortServers::start(&topo.backend, &[FIRST, MIDDLE, LAST]);
    let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, FIRST));
    let relay = SteeredRelay::start(
        &topo.forwarder,
        vec![
            range(listener(
                0,
                Protocol::Tcp,
                any,
                &[(backend, 1)],
                Timeouts::default(),
            )),
            range(listener(
                1,
                Protocol::Udp,
                any,
                &[(backend, 1)],
                Timeouts::default(),
            )),
        ],
    );
    let fwd = topo.forwarder_addr();
    in_netns(&topo.client, || {
        for port in [FIRST, MIDDLE, LAST] {
            assert_eq!(tcp_port_of(SocketAddr::from((fwd, port))), port);
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.set_read_timeout(Some(WAIT)).unwrap();
            for i in 0..3u8 {
                let (got, from) = udp_port_of(&socket, SocketAddr::from((fwd, port)), &[i; 10]);
                assert_eq!(got, port, "udp to {port} reaches the backend's {port}");
                assert_eq!(
                    from,
                    SocketAddr::from((fwd, port)),
                    "the reply comes from {port}"
                );
            }
        }
    });
    let recorder = relay.recorder.clone();
    let counters = relay.stop();
    let (tcp, udp) = (rule(&counters, 0), rule(&counters, 1));
    assert_eq!(tcp.flows, 3, "{tcp:?}");
    assert_eq!(udp.flows, 3, "{udp:?}");
    assert_eq!(udp.datagrams_to_backend, 9, "{udp:?}");
    assert_eq!(udp.datagrams_to_client, 9, "{udp:?}");
    // The flows are reported on the port the client used.
    let locals: HashSet<(Protocol, u16)> = recorder
        .events()
        .iter()
        .filter(|e| e.0)
        .map(|e| (e.1, e.3.port()))
        .collect();
    for p in [Protocol::Tcp, Protocol::Udp] {
        for port in [FIRST, MIDDLE, LAST] {
            assert!(locals.contains(&(p, port)), "{p} {port} in {locals:?}");
        }
    }
}

#[test]
fn ranges_relay_udp_clients_on_two_ports_get_only_their_own_replies() {
    if !require_root("ranges_relay_udp_clients_on_two_ports_get_only_their_own_replies") {
        return;
    }
    let topo = Topology::new();
    let (p1, p2) = (FIRST + 7, FIRST + 4000);
    let _servers = PortServers::start(&topo.backend, &[p1, p2]);
    let backend = SocketAddr::from((topo.backend_addr(), FIRST));
    let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, FIRST));
    let relay = SteeredRelay::start(
        &topo.forwarder,
        vec![range(listener(
            1,
            Protocol::Udp,
            any,
            &[(backend, 1)],
            Timeouts::default(),
        ))],
    );
    let fwd = topo.forwarder_addr();
    const ROUNDS: u8 = 50;
    in_netns(&topo.client, || {
        let a = UdpSocket::bind("0.0.0.0:0").unwrap();
        let b = UdpSocket::bind("0.0.0.0:0").unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(WAIT)).unwrap();
        }
        let (to1, to2) = (SocketAddr::from((fwd, p1)), SocketAddr::from((fwd, p2)));
        // Both at once: each sends before either reads.
        for i in 0..ROUNDS {
            a.send_to(&[b'a', i], to1).unwrap();
            b.send_to(&[b'b', i], to2).unwrap();
        }
        for (socket, to, tag) in [(&a, to1, b'a'), (&b, to2, b'b')] {
            let mut seen = Vec::new();
            let mut buf = [0u8; 64];
            for _ in 0..ROUNDS {
                let (n, from) = socket.recv_from(&mut buf).expect("a reply");
                assert_eq!(from, to, "replies come from the port the client sent to");
                assert_eq!(n, 4);
                assert_eq!(
                    u16::from_be_bytes([buf[0], buf[1]]),
                    to.port(),
                    "backend port"
                );
                assert_eq!(buf[2], tag, "only the client's own replies");
                seen.push(buf[3]);
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..ROUNDS).collect::<Vec<_>>());
        }
        // One client on both ports: two sessions, each answered from its port.
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        for to in [to1, to2, to1, to2] {
            let (port, from) = udp_port_of(&c, to, b"c");
            assert_eq!((port, from), (to.port(), to));
        }
    });
    let counters = relay.stop();
    let udp = rule(&counters, 1);
    assert_eq!(udp.flows, 4, "{udp:?}");
    let total = 2 * u64::from(ROUNDS) + 4;
    assert_eq!(udp.datagrams_to_backend, total, "{udp:?}");
    assert_eq!(udp.datagrams_to_client, total, "{udp:?}");
}

/// The rule file of the daemon tests: a `tcp,udp` range of 16,384 ports
/// 1:1 to the backend, and a single port beside it.
fn range_file(backend: Ipv4Addr, with_range: bool) -> String {
    let mut yaml = format!(
        "relay: {{drain_timeout: 1s}}\nroutes:\n  keep: {{scheme: tcp, host: {backend}, port: 7000:{FIRST}}}\n"
    );
    if with_range {
        yaml.push_str(&format!(
            "  media: {{scheme: 'tcp,udp', host: {backend}, port: {FIRST}-{LAST}:{FIRST}-{LAST}}}\n"
        ));
    }
    yaml
}

fn relay_only(cmd: &mut std::process::Command) {
    cmd.arg("--relay-only");
}

/// The daemon's open descriptors.
fn open_fds(daemon: &Daemon) -> usize {
    let pid = daemon.status()["pid"].as_u64().expect("pid in the status");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn ranges_relay_only_daemon_serves_16384_ports_with_a_socket_per_protocol() {
    if !require_root("ranges_relay_only_daemon_serves_16384_ports_with_a_socket_per_protocol") {
        return;
    }
    let topo = Topology::new();
    let _servers = PortServers::start(&topo.backend, &[FIRST, MIDDLE, LAST]);
    let yaml = range_file(topo.backend_addr(), true);
    let daemon = Daemon::start_with(&topo.forwarder, "ranges-relay", &yaml, "info", relay_only);
    let fwd = topo.forwarder_addr();
    in_netns(&topo.client, || {
        for port in [FIRST, MIDDLE, LAST] {
            let to = SocketAddr::from((fwd, port));
            assert_eq!(tcp_port_of(to), port, "tcp to {port}");
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.set_read_timeout(Some(WAIT)).unwrap();
            assert_eq!(
                udp_port_of(&socket, to, b"hello"),
                (port, to),
                "udp to {port}"
            );
        }
    });
    let status = daemon.status();
    assert_eq!(status["kernel_path"], false, "--relay-only");
    let tcp = relay_rule(&status, "media", "tcp");
    assert_eq!(counter(tcp, "flows"), 3, "{tcp}");
    let udp = relay_rule(&status, "media", "udp");
    assert_eq!(counter(udp, "flows"), 3, "{udp}");
    assert_eq!(counter(udp, "datagrams_to_backend"), 3, "{udp}");
    // One socket per protocol for 16,384 ports (and a few per live UDP
    // session), not one per port.
    let fds = open_fds(&daemon);
    eprintln!("the relay-only daemon with a 16,384-port tcp,udp range holds {fds} descriptors");
    assert!(fds < 200, "the daemon holds {fds} descriptors");
    let log = daemon.stop();
    assert!(
        log.contains("port ranges: socket lookup steers them"),
        "{log}"
    );
}

#[test]
fn ranges_relay_removing_a_range_refuses_new_flows_and_lets_open_ones_finish() {
    if !require_root("ranges_relay_removing_a_range_refuses_new_flows_and_lets_open_ones_finish") {
        return;
    }
    let topo = Topology::new();
    let _servers = PortServers::start(&topo.backend, &[FIRST, MIDDLE]);
    let yaml = range_file(topo.backend_addr(), true);
    let daemon = Daemon::start_with(&topo.forwarder, "ranges-reload", &yaml, "info", relay_only);
    let fwd = topo.forwarder_addr();
    let to = SocketAddr::from((fwd, MIDDLE));
    // A TCP flow and a UDP session open before the reload.
    let (mut tcp, udp) = in_netns(&topo.client, || {
        let mut s = TcpStream::connect_timeout(&to, WAIT).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut port = [0u8; 2];
        s.read_exact(&mut port).unwrap();
        assert_eq!(u16::from_be_bytes(port), MIDDLE);
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(WAIT)).unwrap();
        assert_eq!(udp_port_of(&u, to, b"before"), (MIDDLE, to));
        (s, u)
    });
    std::fs::write(daemon.config_path(), range_file(topo.backend_addr(), false)).unwrap();
    let out = daemon.reload();
    assert!(out.status.success(), "{out:?}");
    in_netns(&topo.client, || {
        // New flows: no socket takes the range's ports any more.
        let err = TcpStream::connect_timeout(&to, WAIT).expect_err("refused after the reload");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        let fresh = UdpSocket::bind("0.0.0.0:0").unwrap();
        fresh.connect(to).unwrap();
        fresh
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        fresh.send(b"new").unwrap();
        let mut buf = [0u8; 64];
        assert!(fresh.recv(&mut buf).is_err(), "no reply to a new client");
        // The open ones go on.
        tcp.write_all(b"after").unwrap();
        let mut echo = [0u8; 5];
        tcp.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"after");
        assert_eq!(udp_port_of(&udp, to, b"after"), (MIDDLE, to));
    });
    drop(tcp);
    let status = daemon.status();
    let rules = status["rules"].as_array().unwrap();
    assert!(rules.iter().all(|r| r["alias"] != "media"), "{rules:?}");
    daemon.stop();
}

#[test]
fn ranges_relay_first_range_by_reload_needs_a_restart_under_relay_only() {
    if !require_root("ranges_relay_first_range_by_reload_needs_a_restart_under_relay_only") {
        return;
    }
    let topo = Topology::new();
    let yaml = range_file(topo.backend_addr(), false);
    let daemon = Daemon::start_with(&topo.forwarder, "ranges-first", &yaml, "info", relay_only);
    // Started without a range, the daemon gave up what loading BPF takes.
    std::fs::write(daemon.config_path(), range_file(topo.backend_addr(), true)).unwrap();
    let out = daemon.reload();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rule `media` is a port range") && err.contains("restart the daemon as root"),
        "{err}"
    );
    // The running rules stay, and the range's ports take nothing.
    let status = daemon.status();
    let rules = status["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["alias"], "keep");
    daemon.stop();
}
