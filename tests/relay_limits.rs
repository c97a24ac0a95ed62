//! The relay's bounds through the daemon, with real traffic in namespaces:
//! `max_connections` (reset at accept, counted, logged once an interval),
//! `relay.first_byte_timeout`, `relay.pipe_size` (read back from the
//! daemon's own pipes) and the UDP session limit derived from the free
//! ephemeral ports.

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule};
use crate::common::traffic::{
    BackendServers, connect, tcp_echo_conn, tcp_echo_round, tcp_hash_transfer, udp_echo, udp_socket,
};
use crate::common::{self, Topology, eventually, expires_in_time};

const PORT: u16 = 7878;

fn rules(topo: &Topology, relay: &str, route: &str) -> String {
    format!(
        "interfaces: [{a}, {b}]\n\
         relay: {{drain_timeout: 1s{relay}}}\n\
         routes:\n\
         \x20 bounded: {{host: {backend}, port: {PORT}:3478, {route}}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        backend = topo.backend_addr(),
    )
}

fn listen(topo: &Topology) -> SocketAddr {
    SocketAddr::from((topo.forwarder_addr(), PORT))
}

/// A connection the relay refused: reset at once, before or after the
/// connect returns (the kernel completes the handshake before the relay
/// sees the connection).
fn assert_reset_at_once(to: SocketAddr) {
    let started = Instant::now();
    let outcome = match TcpStream::connect_timeout(&to, common::harness::WAIT) {
        Err(e) => e.kind(),
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 1];
            match s.read(&mut buf) {
                Ok(n) => panic!("read {n} bytes from a refused connection"),
                Err(e) => e.kind(),
            }
        }
    };
    assert_eq!(outcome, ErrorKind::ConnectionReset);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "reset after {:?}",
        started.elapsed()
    );
}

#[test]
fn max_connections_resets_the_one_over_counts_it_and_logs_once() {
    if !common::require_root("max_connections_resets_the_one_over_counts_it_and_logs_once") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _backend = BackendServers::start(&topo.backend);
    // A plain rule keeps the kernel path loaded; the capped rule goes by
    // the relay all the same.
    let yaml = format!(
        "{}  plain: {{scheme: tcp, host: {}, port: 7879:3478}}\n",
        rules(&topo, "", "scheme: tcp, max_connections: 3"),
        topo.backend_addr()
    );
    let daemon = Daemon::start(&topo.forwarder, "maxconn", &yaml);
    let to = listen(&topo);
    let _held = in_netns(&topo.client, || {
        let mut open: Vec<TcpStream> = (0..3)
            .map(|_| {
                let mut c = tcp_echo_conn(to);
                tcp_echo_round(&mut c, b"held");
                c
            })
            .collect();
        for _ in 0..50 {
            assert_reset_at_once(to);
        }
        // The three held ones are untouched.
        for c in &mut open {
            tcp_echo_round(c, b"still here");
        }
        drop(open.pop());
        eventually("the closed connection leaves the relay", || {
            counter(relay_rule(&daemon.status(), "bounded", "tcp"), "active") == 2
        });
        let mut again = tcp_echo_conn(to);
        tcp_echo_round(&mut again, b"room again");
        assert_reset_at_once(to);
        open.push(again);
        open
    });
    let status = daemon.status();
    assert_eq!(status["kernel_path"], true, "{status}");
    let relay = relay_rule(&status, "bounded", "tcp");
    assert_eq!(counter(relay, "connections_refused"), 51, "{relay}");
    assert_eq!(counter(relay, "flows"), 4, "{relay}");
    assert_eq!(counter(relay, "active"), 3, "{relay}");
    assert_eq!(counter(kernel_rule(&status, "bounded", "tcp"), "flows"), 0);
    let rule = status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alias"] == "bounded")
        .unwrap();
    assert_eq!(rule["max_connections"], 3, "{rule}");
    let log = daemon.stop();
    let said = log
        .lines()
        .filter(|l| l.contains("the rule's max_connections"))
        .count();
    // 51 resets within one 10 s interval: one line.
    assert_eq!(said, 1, "{log}");
}

#[test]
fn a_silent_connection_is_reset_at_the_first_byte_timeout_and_a_talking_one_lives() {
    if !common::require_root(
        "a_silent_connection_is_reset_at_the_first_byte_timeout_and_a_talking_one_lives",
    ) {
        return;
    }
    let topo = Topology::new();
    let _backend = BackendServers::start(&topo.backend);
    let first_byte = Duration::from_secs(1);
    let yaml = rules(
        &topo,
        ", first_byte_timeout: 1s",
        "scheme: tcp, path: relay",
    );
    let daemon = Daemon::start(&topo.forwarder, "firstbyte", &yaml);
    let to = listen(&topo);
    in_netns(&topo.client, || {
        let mut talking = tcp_echo_conn(to);
        tcp_echo_round(&mut talking, b"hello");
        let since = Instant::now();
        let mut silent = connect(to);
        // Never blocks: each poll's time is when it looked.
        silent.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        // The relay's clock counts whole milliseconds from its accept: it
        // may reset a moment before a second from here.
        expires_in_time(
            "the silent connection's reset",
            since,
            first_byte - Duration::from_millis(2),
            || match silent.read(&mut buf) {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
                other => panic!("the silent connection: {other:?}"),
            },
        );
        // Quiet well past the first-byte timeout, the talking one goes on.
        std::thread::sleep((since + 3 * first_byte).saturating_duration_since(Instant::now()));
        tcp_echo_round(&mut talking, b"still talking");
    });
    let relay = relay_rule(&daemon.status(), "bounded", "tcp").clone();
    assert_eq!(counter(&relay, "first_byte_timeouts"), 1, "{relay}");
    assert_eq!(counter(&relay, "flows"), 2, "{relay}");
    daemon.stop();
}

/// The pipes the process `pid` holds, by name (`pipe:[inode]`), with their sizes.
fn pipe_sizes(pid: u64) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let path = entry.unwrap().path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue; // closed meanwhile
        };
        let target = target.to_string_lossy().into_owned();
        if !target.starts_with("pipe:") {
            continue;
        }
        // Opened as a reader that never reads: the daemon sees nothing.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let size = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert!(
            size > 0,
            "F_GETPIPE_SZ: {}",
            std::io::Error::last_os_error()
        );
        seen.insert(target, size as usize);
    }
    seen
}

#[test]
fn the_relays_pipes_have_the_configured_size_and_carry_256_mib_intact() {
    if !common::require_root("the_relays_pipes_have_the_configured_size_and_carry_256_mib_intact") {
        return;
    }
    let topo = Topology::new();
    let _backend = BackendServers::start(&topo.backend);
    let yaml = rules(&topo, ", pipe_size: 128k", "scheme: tcp, path: relay");
    let daemon = Daemon::start(&topo.forwarder, "pipesize", &yaml);
    let pid = daemon.status()["pid"].as_u64().unwrap();
    // The runtime's own (a signal pipe); the relay's come with flows.
    let before = pipe_sizes(pid);
    let to = listen(&topo);
    in_netns(&topo.client, || {
        let mut held = tcp_echo_conn(to);
        tcp_echo_round(&mut held, b"pipes now");
        // One pipe each way.
        let flows: Vec<usize> = pipe_sizes(pid)
            .into_iter()
            .filter(|(pipe, _)| !before.contains_key(pipe))
            .map(|(_, size)| size)
            .collect();
        assert_eq!(flows, [128 << 10, 128 << 10]);
        let (sent, received) = tcp_hash_transfer(to, 256 << 20);
        assert_eq!(sent, received, "256 MiB through 128 KiB pipes");
    });
    let relay = relay_rule(&daemon.status(), "bounded", "tcp").clone();
    assert_eq!(counter(&relay, "flows"), 2, "{relay}");
    assert_eq!(counter(&relay, "errors"), 0, "{relay}");
    assert!(counter(&relay, "bytes_to_backend") >= 256 << 20, "{relay}");
    daemon.stop();
}

#[test]
fn udp_sessions_stop_at_their_share_of_the_ephemeral_ports_and_the_host_keeps_the_rest() {
    if !common::require_root(
        "udp_sessions_stop_at_their_share_of_the_ephemeral_ports_and_the_host_keeps_the_rest",
    ) {
        return;
    }
    let topo = Topology::new();
    let _backend = BackendServers::start(&topo.backend);
    // 400 ephemeral ports in the forwarder's namespace: 300 for the
    // relay, 100 for the host.
    topo.forwarder
        .sysctl("net.ipv4.ip_local_port_range", "61000 61399");
    let yaml = rules(&topo, "", "scheme: udp, path: relay");
    let daemon = Daemon::start(&topo.forwarder, "udpcap", &yaml);
    let limit = &daemon.status()["relay_udp_sessions"];
    assert_eq!(limit["free"], 400, "{limit}");
    assert_eq!(limit["kept_for_host"], 100, "{limit}");
    assert_eq!(limit["session_limit"], 300, "{limit}");
    let to = listen(&topo);
    in_netns(&topo.client, || {
        let served: Vec<UdpSocket> = (0..300)
            .map(|i: u32| {
                let s = udp_socket(to);
                udp_echo(&s, &i.to_be_bytes());
                s
            })
            .collect();
        let refused: Vec<UdpSocket> = (0..10).map(|_| udp_socket(to)).collect();
        for s in &refused {
            s.send(b"no room").unwrap();
        }
        let mut buf = [0u8; 16];
        for s in &refused {
            let got = s.recv(&mut buf);
            assert!(
                got.as_ref().is_err_and(|e| matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                )),
                "a client over the limit got {got:?}"
            );
        }
        // The sessions there are keep working.
        for (i, s) in served.iter().enumerate() {
            udp_echo(s, &(i as u32 + 1000).to_be_bytes());
        }
    });
    // The host's share is there: every kept port can be bound.
    let bound = in_netns(&topo.forwarder, || {
        let sockets: Vec<UdpSocket> = (0..100)
            .map(|i| {
                UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                    .unwrap_or_else(|e| panic!("ephemeral socket {i}: {e}"))
            })
            .collect();
        sockets.len()
    });
    assert_eq!(bound, 100);
    let status = daemon.status();
    let relay = relay_rule(&status, "bounded", "udp");
    assert_eq!(counter(relay, "sessions_refused"), 10, "{relay}");
    assert_eq!(counter(relay, "flows"), 300, "{relay}");
    assert_eq!(counter(relay, "active"), 300, "{relay}");
    assert_eq!(status["relay_udp_sessions"]["open"], 300);
    // A reload reads the sysctls again: a lowered limit refuses new
    // sessions, the ones over it go on.
    topo.forwarder
        .sysctl("net.ipv4.ip_local_port_range", "61000 61099");
    let out = common::reload(daemon.control_path(), common::harness::WAIT);
    assert!(out.status.success(), "{out:?}");
    let limit = &daemon.status()["relay_udp_sessions"];
    assert_eq!(limit["session_limit"], 75, "{limit}");
    assert_eq!(limit["kept_for_host"], 25, "{limit}");
    assert_eq!(limit["open"], 300, "{limit}");
    let log = daemon.stop();
    let said = log
        .lines()
        .filter(|l| l.contains("its share of the 400 free ephemeral ports"))
        .count();
    assert_eq!(said, 1, "{log}");
}
