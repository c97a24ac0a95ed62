//! Beside the host's own NAT: a "container" namespace behind the
//! forwarder's namespace, masqueraded by nftables on its way to the
//! backend (as Docker does), talks to the ip:port of a kernel rule's
//! backend from source ports inside the SNAT range, while the kernel path
//! carries 5,000 UDP flows there. Masquerade keeps those ports (nothing in
//! nf_conntrack uses them), so without care the backend sees one tuple for
//! two flows and a kernel flow takes the container's answers. Half the
//! container's flows start before ours (the SNAT allocator must skip their
//! ports), half on ports our flows hold (they must be moved). Every
//! datagram's echo returns to its own sender, on both sides. The same for
//! TCP connections on ports kernel flows hold, and the README's zero-cost
//! alternative: a route `src` that masquerade never picks.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, relay_rule, spawn_in,
};
use crate::common::{self, Netns, Topology, veth};

const LISTEN_PORT: u16 = 7878;
const BACKEND_PORT: u16 = 3478;
/// The default `kernel.snat_ports`.
const SNAT_PORTS: (u16, u16) = (40000, 59999);
const KERNEL_FLOWS: usize = 5_000;
/// Container flows started before the kernel flows, and as many after,
/// on ports the kernel flows hold.
const CONTAINER_FLOWS_EACH: usize = 100;
/// Datagrams in flight at once: the backend's one socket must not drop.
const BATCH: usize = 64;
/// How long a batch may wait for its echoes.
const BATCH_WAIT: Duration = Duration::from_secs(2);

fn rules(backend: Ipv4Addr) -> String {
    format!(
        "relay: {{drain_timeout: 1s}}\n\
         routes:\n\
         \x20 t-udp: {{scheme: udp, host: {backend}, port: {LISTEN_PORT}:{BACKEND_PORT}}}\n\
         \x20 t-tcp: {{scheme: tcp, host: {backend}, port: {LISTEN_PORT}:{BACKEND_PORT}}}\n"
    )
}

/// The topology with a container namespace on 198.18.3.0/24 behind the
/// forwarder, masqueraded toward the backend as Docker does.
struct HostNat {
    topo: Topology,
    container: Netns,
}

impl HostNat {
    fn new() -> HostNat {
        let topo = Topology::new();
        forwarding_on(&topo);
        let container = Netns::new("container");
        let link = veth(&topo.forwarder, &container, 3);
        container.ip(&["route", "add", "default", "via", &link.a_addr.to_string()]);
        let out_if = topo.backend_link.a_if.as_str();
        let nft = |args: &[&str]| topo.forwarder.exec("nft", args);
        nft(&["add", "table", "ip", "hostnat"]);
        nft(&[
            "add",
            "chain",
            "ip",
            "hostnat",
            "post",
            "{ type nat hook postrouting priority srcnat; policy accept; }",
        ]);
        nft(&[
            "add",
            "rule",
            "ip",
            "hostnat",
            "post",
            "ip",
            "saddr",
            "198.18.3.0/24",
            "oifname",
            out_if,
            "masquerade",
        ]);
        HostNat { topo, container }
    }

    fn snat_addr(&self) -> Ipv4Addr {
        self.topo.backend_link.a_addr
    }

    fn backend(&self) -> SocketAddr {
        (self.topo.backend_addr(), BACKEND_PORT).into()
    }

    fn listener(&self) -> SocketAddr {
        (self.topo.forwarder_addr(), LISTEN_PORT).into()
    }
}

/// The backend's UDP and TCP echo on 3478, noting every source it sees.
struct RecordingEcho {
    stop: Arc<AtomicBool>,
    udp_seen: Arc<Mutex<HashSet<SocketAddrV4>>>,
    tcp_seen: Arc<Mutex<HashSet<SocketAddrV4>>>,
    threads: Vec<JoinHandle<()>>,
}

impl RecordingEcho {
    fn start(ns: &Netns) -> RecordingEcho {
        let stop = Arc::new(AtomicBool::new(false));
        let udp_seen = Arc::new(Mutex::new(HashSet::new()));
        let tcp_seen = Arc::new(Mutex::new(HashSet::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let udp = {
            let (stop, seen, ready) = (stop.clone(), udp_seen.clone(), ready_tx.clone());
            spawn_in(ns, move || {
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                ready.send(()).unwrap();
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, SocketAddr::V4(from))) = socket.recv_from(&mut buf) {
                        seen.lock().unwrap().insert(from);
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
        };
        let tcp = {
            let (stop, seen) = (stop.clone(), tcp_seen.clone());
            spawn_in(ns, move || {
                let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).unwrap();
                listener.set_nonblocking(true).unwrap();
                ready_tx.send(()).unwrap();
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, SocketAddr::V4(from))) => {
                            seen.lock().unwrap().insert(from);
                            let stop = stop.clone();
                            conns.push(std::thread::spawn(move || echo_tcp(stream, &stop)));
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        for _ in 0..2 {
            ready_rx.recv_timeout(WAIT).expect("backend echo up");
        }
        RecordingEcho {
            stop,
            udp_seen,
            tcp_seen,
            threads: vec![udp, tcp],
        }
    }

    /// The source ports the backend saw from `addr` (UDP or TCP).
    fn ports_from(&self, addr: Ipv4Addr, tcp: bool) -> HashSet<u16> {
        let seen = if tcp { &self.tcp_seen } else { &self.udp_seen };
        let seen = seen.lock().unwrap();
        seen.iter()
            .filter(|s| *s.ip() == addr)
            .map(|s| s.port())
            .collect()
    }
}

fn echo_tcp(mut stream: TcpStream, stop: &AtomicBool) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for RecordingEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// UDP senders of one side, each with its own socket.
struct Senders {
    side: &'static str,
    sockets: Vec<UdpSocket>,
}

impl Senders {
    /// `count` sockets in `ns` connected to `to`, bound to `ports` (0: any).
    fn open(ns: &Netns, side: &'static str, ports: &[u16], to: SocketAddr) -> Senders {
        let sockets = in_netns(ns, || {
            ports
                .iter()
                .map(|&port| {
                    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
                        .unwrap_or_else(|e| panic!("bind {side} port {port}: {e}"));
                    socket.connect(to).unwrap();
                    socket.set_nonblocking(true).unwrap();
                    socket
                })
                .collect()
        });
        Senders { side, sockets }
    }

    fn payload(&self, index: usize, round: u32) -> Vec<u8> {
        format!("{}-{index}-{round}", self.side).into_bytes()
    }

    /// One datagram from every socket, `BATCH` at a time, each waiting for
    /// its echo. Returns what went wrong: an echo missing, or another's.
    fn round(&self, round: u32) -> Vec<String> {
        let mut problems = Vec::new();
        let mut buf = [0u8; 256];
        for (chunk_no, chunk) in self.sockets.chunks(BATCH).enumerate() {
            let first = chunk_no * BATCH;
            for (i, socket) in chunk.iter().enumerate() {
                socket.send(&self.payload(first + i, round)).unwrap();
            }
            let mut pending: Vec<usize> = (0..chunk.len()).collect();
            let deadline = Instant::now() + BATCH_WAIT;
            while !pending.is_empty() && Instant::now() < deadline {
                pending.retain(|&i| match chunk[i].recv(&mut buf) {
                    Ok(n) => {
                        let want = self.payload(first + i, round);
                        if buf[..n] != want[..] {
                            problems.push(format!(
                                "{} {}: got {:?} instead of its own echo",
                                self.side,
                                first + i,
                                String::from_utf8_lossy(&buf[..n])
                            ));
                        }
                        false
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                    Err(e) => {
                        problems.push(format!("{} {}: {e}", self.side, first + i));
                        false
                    }
                });
                std::thread::sleep(Duration::from_micros(200));
            }
            for i in pending {
                problems.push(format!("{} {}: no echo", self.side, first + i));
            }
        }
        problems
    }

    /// Datagrams that arrived beyond their own echoes.
    fn strays(&self) -> Vec<String> {
        let mut buf = [0u8; 256];
        let mut out = Vec::new();
        for (i, socket) in self.sockets.iter().enumerate() {
            while let Ok(n) = socket.recv(&mut buf) {
                out.push(format!(
                    "{} {i}: stray {:?}",
                    self.side,
                    String::from_utf8_lossy(&buf[..n])
                ));
            }
        }
        out
    }
}

fn assert_no_problems(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} echoes went wrong, e.g. {:?}",
        problems.len(),
        &problems[..problems.len().min(8)]
    );
}

/// `forwarder status` counts `n` host flows moved, once the sweeper has
/// looked (it counts at each pass).
fn assert_moved(daemon: &Daemon, n: usize) {
    common::eventually(&format!("status shows {n} host flows moved"), || {
        daemon.status()["kernel"]["host_flows_moved"].as_u64() == Some(n as u64)
    });
}

/// Ports spread over the SNAT range: the container's first flows.
fn spread_ports(n: usize) -> Vec<u16> {
    let span = usize::from(SNAT_PORTS.1 - SNAT_PORTS.0) + 1;
    (0..n)
        .map(|i| SNAT_PORTS.0 + (7 + i * (span / n)) as u16)
        .collect()
}

#[test]
fn masqueraded_udp_flows_on_snat_ports_and_5000_kernel_flows_each_get_their_own_echoes() {
    if !common::require_root(
        "masqueraded_udp_flows_on_snat_ports_and_5000_kernel_flows_each_get_their_own_echoes",
    ) {
        return;
    }
    let lab = HostNat::new();
    let echo = RecordingEcho::start(&lab.topo.backend);
    let daemon = Daemon::start(
        &lab.topo.forwarder,
        "hostnat-udp",
        &rules(lab.topo.backend_addr()),
    );
    let snat = lab.snat_addr();

    // The container first: masquerade keeps its ports, inside our range.
    let early_ports = spread_ports(CONTAINER_FLOWS_EACH);
    let early = Senders::open(&lab.container, "early", &early_ports, lab.backend());
    assert_no_problems(early.round(0));
    let early_set: HashSet<u16> = early_ports.iter().copied().collect();
    assert_eq!(
        echo.ports_from(snat, false),
        early_set,
        "masquerade kept the container's ports"
    );

    // Then the kernel flows: none may take a port the container uses.
    let clients = Senders::open(
        &lab.topo.client,
        "client",
        &vec![0; KERNEL_FLOWS],
        lab.listener(),
    );
    assert_no_problems(clients.round(0));
    let ours: HashSet<u16> = &echo.ports_from(snat, false) - &early_set;
    assert_eq!(
        ours.len(),
        KERNEL_FLOWS,
        "each kernel flow has a port of its own, none of the container's"
    );

    // Then the container on ports our flows hold: masquerade keeps them
    // too (nf_conntrack knows nothing of ours), so they must be moved.
    let mut taken: Vec<u16> = ours.iter().copied().collect();
    taken.sort_unstable();
    let late_ports: Vec<u16> = taken
        .iter()
        .step_by(KERNEL_FLOWS / CONTAINER_FLOWS_EACH)
        .copied()
        .collect();
    assert_eq!(late_ports.len(), CONTAINER_FLOWS_EACH);
    let late = Senders::open(&lab.container, "late", &late_ports, lab.backend());
    assert_no_problems(late.round(0));

    // Everyone again, the kernel flows between the container's.
    let mut problems = early.round(1);
    problems.extend(clients.round(1));
    problems.extend(late.round(1));
    for side in [&early, &clients, &late] {
        problems.extend(side.strays());
    }
    assert_no_problems(problems);

    // On the wire every flow was a tuple of its own.
    assert_eq!(
        echo.ports_from(snat, false).len(),
        KERNEL_FLOWS + 2 * CONTAINER_FLOWS_EACH,
        "distinct source ports the backend saw"
    );
    let status = daemon.status();
    let k = kernel_rule(&status, "t-udp", "udp");
    assert_eq!(counter(k, "flows"), KERNEL_FLOWS as u64, "{k}");
    assert_eq!(counter(k, "packets_fwd"), 2 * KERNEL_FLOWS as u64, "{k}");
    assert_eq!(counter(k, "packets_rev"), 2 * KERNEL_FLOWS as u64, "{k}");
    let r = relay_rule(&status, "t-udp", "udp");
    assert_eq!(counter(r, "flows"), 0, "the relay carried none: {r}");
    assert_moved(&daemon, CONTAINER_FLOWS_EACH);
    drop(daemon);
}

/// Kernel TCP flows, then the container connects from the very ports
/// they hold toward the backend.
const TCP_FLOWS: usize = 20;
/// A connect that the backend answers comes back well within this.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// A TCP connection from `ns` to `to`, from local `port` (0: any).
fn tcp_connect(ns: &Netns, port: u16, to: SocketAddr) -> io::Result<TcpStream> {
    in_netns(ns, || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
        socket.connect_timeout(&to.into(), CONNECT_WAIT)?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(WAIT))?;
        Ok(stream)
    })
}

/// One message each way on `stream`: its own echo, exactly.
fn tcp_round(stream: &mut TcpStream, msg: &str) -> Result<(), String> {
    stream
        .write_all(msg.as_bytes())
        .map_err(|e| format!("{msg}: {e}"))?;
    let mut buf = vec![0u8; msg.len()];
    stream
        .read_exact(&mut buf)
        .map_err(|e| format!("{msg}: {e}"))?;
    match buf == msg.as_bytes() {
        true => Ok(()),
        false => Err(format!("{msg}: got {:?}", String::from_utf8_lossy(&buf))),
    }
}

#[test]
fn a_masqueraded_tcp_connection_on_a_kernel_flows_snat_port_is_moved_and_both_echo() {
    if !common::require_root(
        "a_masqueraded_tcp_connection_on_a_kernel_flows_snat_port_is_moved_and_both_echo",
    ) {
        return;
    }
    let lab = HostNat::new();
    let echo = RecordingEcho::start(&lab.topo.backend);
    let daemon = Daemon::start(
        &lab.topo.forwarder,
        "hostnat-tcp",
        &rules(lab.topo.backend_addr()),
    );
    let snat = lab.snat_addr();
    let mut ours: Vec<TcpStream> = (0..TCP_FLOWS)
        .map(|i| {
            let mut s = tcp_connect(&lab.topo.client, 0, lab.listener()).expect("kernel flow");
            tcp_round(&mut s, &format!("client-{i}-0")).unwrap();
            s
        })
        .collect();
    let mut held: Vec<u16> = echo.ports_from(snat, true).into_iter().collect();
    held.sort_unstable();
    assert_eq!(held.len(), TCP_FLOWS);
    assert!(
        held.iter()
            .all(|p| (SNAT_PORTS.0..=SNAT_PORTS.1).contains(p))
    );

    // The container connects from each of those ports: masquerade keeps
    // them, the egress program moves them.
    let mut problems = Vec::new();
    let mut theirs = Vec::new();
    for (i, &port) in held.iter().enumerate() {
        match tcp_connect(&lab.container, port, lab.backend()) {
            Ok(mut s) => {
                problems.extend(tcp_round(&mut s, &format!("container-{i}-0")).err());
                theirs.push(s);
            }
            Err(e) => problems.push(format!("container {i} from port {port}: connect: {e}")),
        }
    }
    for (i, s) in ours.iter_mut().enumerate() {
        problems.extend(tcp_round(s, &format!("client-{i}-1")).err());
    }
    for (i, s) in theirs.iter_mut().enumerate() {
        problems.extend(tcp_round(s, &format!("container-{i}-1")).err());
    }
    assert_no_problems(problems);
    assert_eq!(
        echo.ports_from(snat, true).len(),
        2 * TCP_FLOWS,
        "distinct source ports the backend saw"
    );
    let status = daemon.status();
    let k = kernel_rule(&status, "t-tcp", "tcp");
    assert_eq!(counter(k, "flows"), TCP_FLOWS as u64, "{k}");
    let r = relay_rule(&status, "t-tcp", "tcp");
    assert_eq!(counter(r, "flows"), 0, "the relay carried none: {r}");
    assert_moved(&daemon, TCP_FLOWS);
    drop(daemon);
}

#[test]
fn with_a_route_src_the_kernel_path_snats_to_an_address_masquerade_never_picks() {
    if !common::require_root(
        "with_a_route_src_the_kernel_path_snats_to_an_address_masquerade_never_picks",
    ) {
        return;
    }
    const FLOWS: usize = 500;
    let lab = HostNat::new();
    // The README's zero-cost alternative: a secondary address in the
    // backend's subnet, and the route to the backends through it.
    let dedicated = Ipv4Addr::new(198, 18, 2, 250);
    let out_if = lab.topo.backend_link.a_if.as_str();
    let fwd = &lab.topo.forwarder;
    fwd.ip(&["addr", "add", &format!("{dedicated}/24"), "dev", out_if]);
    fwd.ip(&[
        "route",
        "replace",
        "198.18.2.0/24",
        "dev",
        out_if,
        "src",
        &dedicated.to_string(),
    ]);
    let echo = RecordingEcho::start(&lab.topo.backend);
    let daemon = Daemon::start(fwd, "hostnat-src", &rules(lab.topo.backend_addr()));

    let clients = Senders::open(&lab.topo.client, "client", &vec![0; FLOWS], lab.listener());
    assert_no_problems(clients.round(0));
    let ours = echo.ports_from(dedicated, false);
    assert_eq!(ours.len(), FLOWS, "the kernel flows leave from {dedicated}");
    // The container on the very ports ours use: masquerade takes the
    // primary address, so nothing collides and nothing is moved.
    let mut ports: Vec<u16> = ours.iter().copied().collect();
    ports.sort_unstable();
    ports.truncate(CONTAINER_FLOWS_EACH);
    let container = Senders::open(&lab.container, "container", &ports, lab.backend());
    let mut problems = container.round(0);
    problems.extend(clients.round(1));
    problems.extend(container.round(1));
    problems.extend(clients.strays());
    problems.extend(container.strays());
    assert_no_problems(problems);
    assert_eq!(
        echo.ports_from(lab.snat_addr(), false),
        ports.iter().copied().collect::<HashSet<u16>>(),
        "the container left from the primary address with its own ports"
    );
    assert_eq!(echo.ports_from(dedicated, false), ours);
    assert_moved(&daemon, 0);
    drop(daemon);
}

#[test]
fn a_moved_container_flow_to_a_closed_backend_port_is_refused_like_any_other() {
    if !common::require_root(
        "a_moved_container_flow_to_a_closed_backend_port_is_refused_like_any_other",
    ) {
        return;
    }
    const CLOSED: u16 = 3479;
    let lab = HostNat::new();
    let backend = lab.topo.backend_addr();
    let yaml = format!(
        "relay: {{drain_timeout: 1s}}\n\
         routes:\n\
         \x20 t-closed: {{scheme: udp, host: {backend}, port: {LISTEN_PORT}:{CLOSED}}}\n"
    );
    let daemon = Daemon::start(&lab.topo.forwarder, "hostnat-icmp", &yaml);
    // A kernel flow to the backend's 3479, whose SNAT port the backend
    // notes while it still listens there; then the port closes.
    let recorder = in_netns(&lab.topo.backend, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, CLOSED)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    });
    let client = Senders::open(&lab.topo.client, "client", &[0], lab.listener());
    client.sockets[0].send(b"open").unwrap();
    let mut buf = [0u8; 16];
    let (_, from) = recorder
        .recv_from(&mut buf)
        .expect("the kernel flow's datagram");
    assert_eq!(from.ip(), std::net::IpAddr::V4(lab.snat_addr()));
    drop(recorder);

    // The container on that very port, to the now closed 3479: moved, and
    // the backend's port unreachable reaches it as ECONNREFUSED.
    let to: SocketAddr = (backend, CLOSED).into();
    let container = in_netns(&lab.container, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, from.port())).unwrap();
        s.connect(to).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    });
    container.send(b"anyone?").unwrap();
    let err = container
        .recv(&mut buf)
        .expect_err("nothing listens on the backend's port");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert_moved(&daemon, 1);
    drop(daemon);
}
