//! Upgrading in place while port-range rules run: the range's relay
//! sockets, pairs and sessions (each with its own socket on the port the
//! client used) are handed over, the socket-lookup link stays attached
//! through the exec (no refused flow meanwhile), and kernel-path range
//! flows go on; a range a reload removed drains on through it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, program_loaded, relay_rule,
    spawn_in,
};
use crate::common::port_servers::{PortServers, tcp_port_of, udp_port_of};
use crate::common::{self, Netns, Topology, eventually};
use crate::crash::{BpffsAsFound, HOST_BPFFS, assert_nothing_left};

/// The relay-only range: 16,384 ports below the ephemeral ones.
const FIRST: u16 = 16384;
const LAST: u16 = 32767;
const MIDDLE: u16 = 24576;
/// Ports of the range the gap probes use (not those of the open flows).
const PROBES: [u16; 6] = [16385, 17000, 20000, 24000, 30001, 32766];

/// A TCP flow through the PortServers echo: 64 KiB rounds until told to
/// stop; SHA-256 of what went and of what came back.
struct TcpFlow {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: JoinHandle<(u64, [u8; 32], [u8; 32])>,
}

impl TcpFlow {
    fn start(ns: &Netns, to: SocketAddr) -> TcpFlow {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), rounds.clone());
        let thread = spawn_in(ns, move || {
            let mut conn = TcpStream::connect_timeout(&to, WAIT).unwrap();
            conn.set_read_timeout(Some(WAIT)).unwrap();
            let mut port = [0u8; 2];
            conn.read_exact(&mut port).unwrap();
            assert_eq!(u16::from_be_bytes(port), to.port(), "the backend's port");
            let (mut sent, mut got) = (Sha256::new(), Sha256::new());
            let mut chunk = vec![0u8; 64 << 10];
            let mut back = vec![0u8; 64 << 10];
            let mut seed = u64::from(to.port());
            let mut bytes = 0u64;
            while !s.load(Ordering::Relaxed) {
                for b in chunk.iter_mut() {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    *b = (seed >> 33) as u8;
                }
                sent.update(&chunk);
                conn.write_all(&chunk).unwrap();
                conn.read_exact(&mut back)
                    .unwrap_or_else(|e| panic!("echo on {to}: {e}"));
                got.update(&back);
                bytes += chunk.len() as u64;
                r.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            conn.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "nothing more than was sent");
            (bytes, sent.finalize().into(), got.finalize().into())
        });
        TcpFlow {
            stop,
            rounds,
            thread,
        }
    }

    /// Bytes sent; the digests must match.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (bytes, sent, got) = self.thread.join().expect("the tcp flow");
        assert_eq!(sent, got, "the echo is what was sent, across the upgrade");
        bytes
    }
}

/// A UDP session: numbered datagrams in lockstep until told to stop;
/// every reply is checked (number, backend port, source port).
struct UdpFlow {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: JoinHandle<u64>,
}

impl UdpFlow {
    fn start(ns: &Netns, to: SocketAddr) -> UdpFlow {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), rounds.clone());
        let thread = spawn_in(ns, move || {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            socket.set_read_timeout(Some(WAIT)).unwrap();
            let mut n = 0u32;
            while !s.load(Ordering::Relaxed) {
                let (port, from) = udp_port_of(&socket, to, &n.to_be_bytes());
                assert_eq!((port, from), (to.port(), to), "datagram {n}");
                n += 1;
                r.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            u64::from(n)
        });
        UdpFlow {
            stop,
            rounds,
            thread,
        }
    }

    /// Datagrams sent, each answered (a lost one fails the thread).
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the udp session")
    }
}

/// What the gap probes saw.
#[derive(Debug, Default, PartialEq)]
struct Probed {
    tcp_connected: u64,
    tcp_refused: u64,
    tcp_other: u64,
    udp_answered: u64,
    udp_refused: u64,
    udp_other: u64,
}

/// New flows to range ports in a tight loop: a TCP connect every 2 ms, a
/// new UDP client every 20 ms, until stopped. TCP connects are closed at
/// once (the kernel completes them into the listener's backlog, so they
/// do not wait for the frozen relay); each UDP client waits for its
/// answer once the loop ends.
struct Probes {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Probed>,
}

impl Probes {
    fn start(ns: &Netns, fwd: Ipv4Addr, ports: &'static [u16]) -> Probes {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = spawn_in(ns, move || {
            let mut seen = Probed::default();
            let mut clients = Vec::new();
            let mut i = 0usize;
            while !s.load(Ordering::Relaxed) {
                let to = SocketAddr::from((fwd, ports[i % ports.len()]));
                match TcpStream::connect_timeout(&to, WAIT) {
                    Ok(_) => seen.tcp_connected += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        seen.tcp_refused += 1
                    }
                    Err(_) => seen.tcp_other += 1,
                }
                if i.is_multiple_of(10) {
                    let u = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                    u.connect(to).unwrap();
                    u.send(b"probe").unwrap();
                    clients.push(u);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            let mut buf = [0u8; 64];
            for u in clients {
                u.set_read_timeout(Some(WAIT)).unwrap();
                match u.recv(&mut buf) {
                    Ok(7) if &buf[2..7] == b"probe" => seen.udp_answered += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        seen.udp_refused += 1
                    }
                    _ => seen.udp_other += 1,
                }
            }
            seen
        });
        Probes { stop, thread }
    }

    fn finish(self) -> Probed {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the probes")
    }
}

/// The ids of the socket-lookup programs the daemon logged (`program=Some(N)`).
fn steer_programs(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("port ranges: "))
        .filter_map(|l| {
            let at = l.find("program=Some(")? + "program=Some(".len();
            l[at..].split(')').next()?.parse().ok()
        })
        .collect()
}

fn upgrade(daemon: &Daemon) -> std::process::Output {
    common::output_within(
        std::process::Command::new(common::forwarder_bin())
            .arg("upgrade")
            .arg("--control")
            .arg(daemon.control_path()),
        WAIT,
    )
}

/// Lets the open flows and the probes run a little, then waits until every
/// flow has made `more` rounds past `marks`.
fn wait_rounds(rounds: &[&Arc<AtomicU64>], more: u64) {
    let marks: Vec<u64> = rounds.iter().map(|r| r.load(Ordering::Relaxed)).collect();
    eventually("every open flow made more rounds", || {
        rounds
            .iter()
            .zip(&marks)
            .all(|(r, m)| r.load(Ordering::Relaxed) >= m + more)
    });
}

#[test]
fn upgrade_ranges_relay_only_hands_over_range_flows_with_no_refused_flow() {
    if !common::require_root(
        "upgrade_ranges_relay_only_hands_over_range_flows_with_no_refused_flow",
    ) {
        return;
    }
    let topo = Topology::new();
    let mut ports = vec![FIRST, MIDDLE, LAST];
    ports.extend(PROBES);
    let _servers = PortServers::start(&topo.backend, &ports);
    let yaml = format!(
        "relay: {{drain_timeout: 1s}}\nroutes:\n  media: {{scheme: 'tcp,udp', host: {}, port: {FIRST}-{LAST}:{FIRST}-{LAST}}}\n",
        topo.backend_addr()
    );
    let daemon = Daemon::start_with(&topo.forwarder, "upgrade-ranges", &yaml, "info", |cmd| {
        cmd.arg("--relay-only");
    });
    let pid = daemon.status()["pid"].as_u64().unwrap();
    let fwd = topo.forwarder_addr();
    let at = |port: u16| SocketAddr::from((fwd, port));
    let tcp: Vec<TcpFlow> = [FIRST, MIDDLE, LAST]
        .iter()
        .map(|&p| TcpFlow::start(&topo.client, at(p)))
        .collect();
    let udp: Vec<UdpFlow> = [FIRST, MIDDLE, LAST]
        .iter()
        .map(|&p| UdpFlow::start(&topo.client, at(p)))
        .collect();
    let all_rounds: Vec<&Arc<AtomicU64>> = tcp
        .iter()
        .map(|f| &f.rounds)
        .chain(udp.iter().map(|f| &f.rounds))
        .collect();
    wait_rounds(&all_rounds, 5);
    let before = daemon.status();
    assert_eq!(
        counter(relay_rule(&before, "media", "tcp"), "active"),
        3,
        "{before}"
    );

    let probes = Probes::start(&topo.client, fwd, &PROBES);
    std::thread::sleep(Duration::from_millis(200));
    let out = upgrade(&daemon);
    assert!(out.status.success(), "{out:?}\n{}", daemon.log_text());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("upgraded in place"), "{said}");
    // Every open flow goes on in the new image.
    wait_rounds(&all_rounds, 5);
    std::thread::sleep(Duration::from_millis(200));
    let probed = probes.finish();
    eprintln!("gap probes during the upgrade: {probed:?}");
    assert_eq!(
        (
            probed.tcp_refused,
            probed.tcp_other,
            probed.udp_refused,
            probed.udp_other
        ),
        (0, 0, 0, 0),
        "{probed:?}\n{}",
        daemon.log_text()
    );
    assert!(
        probed.tcp_connected > 20 && probed.udp_answered > 2,
        "{probed:?}"
    );

    let log = daemon.log_text();
    assert!(
        log.contains("took over the socket steering of the previous image"),
        "{log}"
    );
    let after = daemon.status();
    assert_eq!(after["pid"].as_u64(), Some(pid), "the same process");
    // New flows after the upgrade, from the ports they used.
    in_netns(&topo.client, || {
        for port in [FIRST, MIDDLE, LAST] {
            assert_eq!(tcp_port_of(at(port)), port);
            let u = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            u.set_read_timeout(Some(WAIT)).unwrap();
            assert_eq!(udp_port_of(&u, at(port), b"after"), (port, at(port)));
        }
    });
    let tcp_bytes: u64 = tcp.into_iter().map(TcpFlow::finish).sum();
    let udp_datagrams: u64 = udp.into_iter().map(UdpFlow::finish).sum();
    // Counted once each, across the upgrade: the flows' bytes and the
    // three new connections' "ping"; the sessions' datagrams, the probes'
    // and the three new clients'.
    let status = daemon.status();
    let t = relay_rule(&status, "media", "tcp");
    let u = relay_rule(&status, "media", "udp");
    assert_eq!(counter(t, "bytes_to_backend"), tcp_bytes + 3 * 4, "{t}");
    assert_eq!(counter(t, "flows"), 3 + probed.tcp_connected + 3, "{t}");
    assert_eq!(
        counter(u, "datagrams_to_backend"),
        udp_datagrams + probed.udp_answered + 3,
        "{u}"
    );
    // The sessions were handed over, not opened again: one flow each.
    assert_eq!(counter(u, "flows"), 3 + probed.udp_answered + 3, "{u}");
    assert_eq!(
        counter(u, "datagrams_to_client"),
        counter(u, "datagrams_to_backend"),
        "{u}"
    );

    let programs = steer_programs(&daemon.log_text());
    assert_eq!(programs.len(), 2, "loaded, then taken over: {programs:?}");
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
    for id in programs {
        assert!(!program_loaded(id), "the steering program {id} is gone");
    }
    assert_nothing_left(&topo);
}

#[test]
fn upgrade_ranges_kernel_flows_go_on_and_relay_ranges_see_no_gap() {
    if !common::require_root("upgrade_ranges_kernel_flows_go_on_and_relay_ranges_see_no_gap") {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    // The kernel-path range below MIDDLE, a relay one (path: relay) above.
    let kernel_ports = [FIRST, FIRST + 4000, MIDDLE - 1];
    static RELAY_PROBES: [u16; 3] = [MIDDLE + 1, 30001, 32766];
    let mut ports = kernel_ports.to_vec();
    ports.extend(RELAY_PROBES);
    let _servers = PortServers::start(&topo.backend, &ports);
    let yaml = format!(
        "interfaces: [{a}, {b}]\n\
         relay: {{drain_timeout: 1s}}\n\
         routes:\n\
         \x20 media: {{scheme: 'tcp,udp', host: {backend}, port: {FIRST}-{k}:{FIRST}-{k}}}\n\
         \x20 rmedia: {{scheme: 'tcp,udp', host: {backend}, port: {MIDDLE}-{LAST}:{MIDDLE}-{LAST}, path: relay}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        backend = topo.backend_addr(),
        k = MIDDLE - 1,
    );
    let daemon = Daemon::start_pinning(&topo.forwarder, "upgrade-ranges-kernel", &yaml);
    let pid = daemon.status()["pid"].as_u64().unwrap();
    let fwd = topo.forwarder_addr();
    let at = |port: u16| SocketAddr::from((fwd, port));
    let tcp: Vec<TcpFlow> = kernel_ports
        .iter()
        .map(|&p| TcpFlow::start(&topo.client, at(p)))
        .collect();
    let udp: Vec<UdpFlow> = kernel_ports
        .iter()
        .map(|&p| UdpFlow::start(&topo.client, at(p)))
        .collect();
    let all_rounds: Vec<&Arc<AtomicU64>> = tcp
        .iter()
        .map(|f| &f.rounds)
        .chain(udp.iter().map(|f| &f.rounds))
        .collect();
    wait_rounds(&all_rounds, 5);

    let probes = Probes::start(&topo.client, fwd, &RELAY_PROBES);
    std::thread::sleep(Duration::from_millis(200));
    daemon.signal(libc::SIGUSR2);
    eventually("the new image is up", || {
        daemon.log_text().contains("upgrade done")
    });
    wait_rounds(&all_rounds, 5);
    std::thread::sleep(Duration::from_millis(200));
    let probed = probes.finish();
    eprintln!("gap probes during the upgrade: {probed:?}");
    assert_eq!(
        (
            probed.tcp_refused,
            probed.tcp_other,
            probed.udp_refused,
            probed.udp_other
        ),
        (0, 0, 0, 0),
        "{probed:?}\n{}",
        daemon.log_text()
    );
    assert!(
        probed.tcp_connected > 20 && probed.udp_answered > 2,
        "{probed:?}"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("adopted the kernel path of a previous daemon"),
        "{log}"
    );
    assert!(
        log.contains("took over the socket steering of the previous image"),
        "{log}"
    );
    assert_eq!(daemon.status()["pid"].as_u64(), Some(pid));
    let tcp_bytes: u64 = tcp.into_iter().map(TcpFlow::finish).sum();
    let udp_datagrams: u64 = udp.into_iter().map(UdpFlow::finish).sum();
    assert!(tcp_bytes > 0 && udp_datagrams > 0);
    // The kernel path carried the media flows, before and after, and the
    // relay none of them.
    let status = daemon.status();
    for proto in ["tcp", "udp"] {
        let k = kernel_rule(&status, "media", proto);
        assert_eq!(counter(k, "flows"), 3, "{proto}: {k}");
        let r = relay_rule(&status, "media", proto);
        assert_eq!(counter(r, "flows"), 0, "{proto}: {r}");
    }
    let k = kernel_rule(&status, "media", "udp");
    assert_eq!(counter(k, "packets_fwd"), udp_datagrams, "{k}");
    assert_eq!(counter(k, "packets_rev"), udp_datagrams, "{k}");
    let r = relay_rule(&status, "rmedia", "tcp");
    assert_eq!(counter(r, "flows"), probed.tcp_connected, "{r}");

    let programs = steer_programs(&daemon.log_text());
    assert_eq!(programs.len(), 2, "loaded, then taken over: {programs:?}");
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
    for id in programs {
        assert!(!program_loaded(id), "the steering program {id} is gone");
    }
    assert_nothing_left(&topo);
}

#[test]
fn a_range_removed_by_a_reload_drains_on_through_an_upgrade() {
    if !common::require_root("a_range_removed_by_a_reload_drains_on_through_an_upgrade") {
        return;
    }
    let topo = Topology::new();
    const END: u16 = FIRST + 7;
    let _servers = PortServers::start(&topo.backend, &[FIRST, END]);
    let backend = topo.backend_addr();
    let keep = format!("  keep: {{scheme: tcp, host: {backend}, port: 7001:{FIRST}}}\n");
    let yaml = format!(
        "routes:\n  media: {{scheme: 'tcp,udp', host: {backend}, port: {FIRST}-{END}:{FIRST}-{END}}}\n{keep}"
    );
    let daemon = Daemon::start_with(
        &topo.forwarder,
        "upgrade-range-gone",
        &yaml,
        "info",
        |cmd| {
            cmd.arg("--relay-only");
        },
    );
    let pid = daemon.status()["pid"].as_u64().unwrap();
    let fwd = topo.forwarder_addr();
    let at = |port: u16| SocketAddr::from((fwd, port));
    let tcp: Vec<TcpFlow> = [FIRST, END]
        .iter()
        .map(|&p| TcpFlow::start(&topo.client, at(p)))
        .collect();
    let udp: Vec<UdpFlow> = [FIRST, END]
        .iter()
        .map(|&p| UdpFlow::start(&topo.client, at(p)))
        .collect();
    let all_rounds: Vec<&Arc<AtomicU64>> = tcp
        .iter()
        .map(|f| &f.rounds)
        .chain(udp.iter().map(|f| &f.rounds))
        .collect();
    wait_rounds(&all_rounds, 5);

    // Removed: no new flow, the open ones drain.
    std::fs::write(daemon.config_path(), format!("routes:\n{keep}")).unwrap();
    let out = daemon.reload();
    assert!(out.status.success(), "{out:?}");
    let refused = || {
        in_netns(&topo.client, || {
            TcpStream::connect_timeout(&at(FIRST + 3), WAIT)
        })
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    assert!(refused(), "a new connection to the removed range");
    wait_rounds(&all_rounds, 5);

    let out = upgrade(&daemon);
    assert!(out.status.success(), "{out:?}\n{}", daemon.log_text());
    let log = daemon.log_text();
    for (protocol, pairs, sessions) in [("tcp", 2, 0), ("udp", 0, 2)] {
        let said = format!(
            "relay: {protocol} [::]:{FIRST} was removed by a reload; its {pairs} tcp pairs and \
             {sessions} udp sessions drain here"
        );
        assert!(log.contains(&said), "{said}:\n{log}");
    }
    assert_eq!(daemon.status()["pid"].as_u64(), Some(pid));
    // They go on in the new image, and the range still takes nothing new.
    wait_rounds(&all_rounds, 5);
    assert!(
        refused(),
        "a new connection to the removed range, after the upgrade"
    );
    let stranger = in_netns(&topo.client, || {
        let u = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        u.connect(at(FIRST + 3)).unwrap();
        u.send(b"new").unwrap();
        let mut buf = [0u8; 16];
        u.recv(&mut buf).is_err()
    });
    assert!(
        stranger,
        "a new client of the removed range is not answered"
    );
    for flow in tcp {
        assert!(flow.finish() > 0);
    }
    for flow in udp {
        assert!(flow.finish() > 10);
    }
    let mut kept = in_netns(&topo.client, || TcpStream::connect_timeout(&at(7001), WAIT)).unwrap();
    let mut port = [0u8; 2];
    kept.read_exact(&mut port).unwrap();
    assert_eq!(u16::from_be_bytes(port), FIRST, "the kept rule's backend");
    drop(kept);
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
    assert_nothing_left(&topo);
}
