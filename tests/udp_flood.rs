//! A cheap UDP flood against a kernel-path rule: 20,000 spoofed one-datagram
//! flows the backend never answers. They take the backend's whole SNAT
//! range; a second later, new flows take over their ports, so legitimate
//! clients stay on the kernel path, answered flows keep theirs, and the
//! host keeps its ephemeral ports. A full conntrack table leaves new flows
//! to the relay and spares the flows it holds.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::harness::{
    Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule, spawn_in,
};
use crate::common::traffic::{udp_echo, udp_socket};
use crate::common::{Topology, eventually, require_root};

/// The backend's port: it echoes datagrams that start with [`LEGIT`] and
/// only counts the rest.
const BACKEND_PORT: u16 = 3990;
const LISTEN_PORT: u16 = 7000;
const LEGIT: &[u8] = b"legit";
const FLOOD: &[u8] = b"flood";

/// The default SNAT range, 40000-59999: exactly this many ports per backend.
const SNAT_RANGE: std::ops::RangeInclusive<u16> = 40000..=59999;

/// Flood sources: 200 addresses of the client's /24 (none of them the
/// client's own), each with ports from 20000 up.
const FLOOD_ADDRS: u8 = 200;

/// The backend: echoes legitimate datagrams, counts the flood's.
struct Backend {
    flood: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    fn start(topo: &Topology) -> Backend {
        let socket = in_netns(&topo.backend, || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).unwrap();
            // Room for a burst: the flood must all be counted.
            let size: libc::c_int = 16 << 20;
            // SAFETY: an int option on a socket this function owns.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_RCVBUFFORCE");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            s
        });
        let flood = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, st) = (flood.clone(), stop.clone());
        let thread = spawn_in(&topo.backend, move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if buf[..n].starts_with(LEGIT) {
                    socket.send_to(&buf[..n], from).unwrap();
                } else {
                    f.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Backend {
            flood,
            stop,
            thread: Some(thread),
        }
    }

    fn flood_received(&self) -> u64 {
        self.flood.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rules(topo: &Topology, kernel: &str) -> String {
    format!(
        "interfaces: [{}, {}]\nrelay: {{drain_timeout: 1s}}\n{kernel}routes:\n  \
         game: {{scheme: udp, host: {}, port: {LISTEN_PORT}:{BACKEND_PORT}, path: auto}}\n",
        topo.client_link.a_if,
        topo.backend_link.a_if,
        topo.backend_addr(),
    )
}

/// The IPv4 header checksum of `header`.
fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` one-datagram flows to `to` from a raw socket in the
/// client's namespace, each from its own source address and port (none a
/// socket of the client's), paced in bursts so that no queue on the way
/// drops one. UDP checksum 0 ("none"), as IPv4 allows.
fn flood(topo: &Topology, to: SocketAddr, count: u32) {
    let SocketAddr::V4(to) = to else {
        unreachable!()
    };
    let net = topo.client_link.b_addr.octets();
    in_netns(&topo.client, || {
        // SAFETY: a plain socket call; the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(to.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        for n in 0..count {
            let host = 10 + (n % u32::from(FLOOD_ADDRS)) as u8;
            let sport = 20000 + (n / u32::from(FLOOD_ADDRS)) as u16;
            let src = [net[0], net[1], net[2], host];
            let len = 20 + 8 + FLOOD.len();
            let mut p = Vec::with_capacity(len);
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
            p.extend_from_slice(&(n as u16).to_be_bytes());
            p.extend_from_slice(&[0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
            p.extend_from_slice(&src);
            p.extend_from_slice(&to.ip().octets());
            let c = ip_checksum(&p);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p.extend_from_slice(&sport.to_be_bytes());
            p.extend_from_slice(&to.port().to_be_bytes());
            p.extend_from_slice(&((8 + FLOOD.len()) as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
            p.extend_from_slice(FLOOD);
            // SAFETY: sends the buffer given to the address given.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&dst as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert_eq!(
                sent,
                p.len() as isize,
                "{}",
                std::io::Error::last_os_error()
            );
            if n % 500 == 499 {
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        // SAFETY: closes the descriptor opened above.
        unsafe { libc::close(fd) };
    });
}

/// Binds `n` UDP sockets to port 0 in the forwarder's namespace, all at
/// once: each must get an ephemeral port, none in the SNAT range.
fn host_binds_ephemeral_ports(topo: &Topology, n: usize) {
    in_netns(&topo.forwarder, || {
        let sockets: Vec<UdpSocket> = (0..n)
            .map(|i| {
                UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                    .unwrap_or_else(|e| panic!("ephemeral UDP socket {i} of {n}: {e}"))
            })
            .collect();
        for s in &sockets {
            let port = s.local_addr().unwrap().port();
            assert!(
                !SNAT_RANGE.contains(&port),
                "ephemeral port {port} is a SNAT port"
            );
        }
    });
}

/// Kernel and relay counters of the rule, and the kernel's conntrack gauge.
fn counts(daemon: &Daemon) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let status = daemon.status();
    (
        kernel_rule(&status, "game", "udp").clone(),
        relay_rule(&status, "game", "udp").clone(),
        status["kernel"].clone(),
    )
}

/// A daemon on [`rules`] with `kernel` settings, a client it answered
/// before the flood, and `flows` flood flows sent and all accounted for:
/// each a kernel flow or the relay's, each at the backend.
struct Flooded {
    topo: Topology,
    backend: Backend,
    daemon: Daemon,
    resident: UdpSocket,
    to: SocketAddr,
}

fn flooded(name: &str, kernel: &str, flows: u32) -> Flooded {
    let topo = Topology::new();
    forwarding_on(&topo);
    let backend = Backend::start(&topo);
    let daemon = Daemon::start(&topo.forwarder, name, &rules(&topo, kernel));
    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT));
    // A client answered before the flood: its flow must never be taken.
    let resident = in_netns(&topo.client, || {
        let s = udp_socket(to);
        udp_echo(&s, b"legit resident");
        s
    });
    flood(&topo, to, flows);
    eventually("the flood counted", || {
        let (k, _, _) = counts(&daemon);
        counter(&k, "flows") + counter(&k, "fallback_full") == 1 + u64::from(flows)
    });
    eventually("the flood at the backend", || {
        backend.flood_received() == u64::from(flows)
    });
    Flooded {
        topo,
        backend,
        daemon,
        resident,
        to,
    }
}

#[test]
fn a_udp_flood_leaves_the_kernel_path_to_legitimate_clients() {
    if !require_root("a_udp_flood_leaves_the_kernel_path_to_legitimate_clients") {
        return;
    }
    const FLOWS: u32 = 20_000;
    const LEGIT_FLOWS: u64 = 100;
    let Flooded {
        topo,
        backend: _backend,
        daemon,
        resident,
        to,
    } = flooded("udp-flood", "", FLOWS);
    let (k, r, _) = counts(&daemon);
    assert_eq!(counter(&k, "fallback_other"), 0, "{k}");
    assert_eq!(counter(&k, "dropped"), 0, "{k}");
    assert_eq!(counter(&r, "datagrams_to_client"), 0, "{r}");
    assert_eq!(
        counter(&k, "packets_fwd") + counter(&r, "datagrams_to_backend"),
        1 + u64::from(FLOWS),
        "kernel {k}, relay {r}"
    );
    // The flood fills most of the backend's range; 64 random probes then
    // mostly miss the few free ports (without the takeover, 69 of the 100
    // clients below went to the relay).
    assert!(
        counter(&k, "flows") > 19_000,
        "the flood took the range: {k}"
    );

    // The host still opens ephemeral sockets, none from the SNAT range.
    host_binds_ephemeral_ports(&topo, 1000);

    // A second after the flood its flows are quiet and unanswered: new
    // flows take their ports, every one on the kernel path.
    std::thread::sleep(Duration::from_millis(1500));
    let (before, relay_before, _) = counts(&daemon);
    in_netns(&topo.client, || {
        udp_echo(&resident, b"legit resident again");
        let clients: Vec<UdpSocket> = (0..LEGIT_FLOWS).map(|_| udp_socket(to)).collect();
        for (i, s) in clients.iter().enumerate() {
            udp_echo(s, format!("legit client {i}").as_bytes());
        }
    });
    let (after, relay_after, kernel) = counts(&daemon);
    let delta = |name: &str| counter(&after, name) - counter(&before, name);
    assert_eq!(delta("flows"), LEGIT_FLOWS, "{after}");
    assert_eq!(delta("packets_fwd"), LEGIT_FLOWS + 1, "{after}");
    assert_eq!(counter(&after, "packets_rev"), LEGIT_FLOWS + 2, "{after}");
    assert_eq!(delta("fallback_full"), 0, "{after}");
    for name in ["flows", "datagrams_to_backend", "datagrams_to_client"] {
        assert_eq!(
            counter(&relay_after, name),
            counter(&relay_before, name),
            "the relay carried none of it: {relay_after}"
        );
    }
    let taken = counter(&after, "unanswered_taken_over");
    assert!(
        taken >= 1 && taken <= LEGIT_FLOWS + u64::from(FLOWS),
        "ports taken over: {after}"
    );
    assert!(
        kernel["snat_ports_in_use"].as_u64() <= Some(20_000),
        "{kernel}"
    );
    host_binds_ephemeral_ports(&topo, 1000);
    daemon.stop();
}

#[test]
fn a_full_conntrack_table_leaves_new_flows_to_the_relay_and_spares_its_flows() {
    if !require_root("a_full_conntrack_table_leaves_new_flows_to_the_relay_and_spares_its_flows") {
        return;
    }
    const FLOWS: u32 = 1_000;
    const ENTRIES: u64 = 256;
    let Flooded {
        topo,
        backend: _backend,
        daemon,
        resident,
        to,
    } = flooded(
        "conntrack-full",
        &format!("kernel: {{conntrack_size: {ENTRIES}}}\n"),
        FLOWS,
    );
    let (k, r, kernel) = counts(&daemon);
    assert_eq!(kernel["conntrack_capacity"].as_u64(), Some(ENTRIES / 2));
    // Two entries a flow: the table holds ENTRIES / 2 flows, the resident's
    // among them; the rest went to the relay, each a session of its own.
    assert_eq!(counter(&k, "flows"), ENTRIES / 2, "{k}");
    let to_relay = 1 + u64::from(FLOWS) - ENTRIES / 2;
    assert_eq!(counter(&k, "fallback_full"), to_relay, "{k}");
    assert_eq!(counter(&r, "flows"), to_relay, "{r}");
    assert_eq!(counter(&r, "datagrams_to_backend"), to_relay, "{r}");
    assert_eq!(counter(&k, "unanswered_taken_over"), 0, "{k}");

    // The flow the table holds goes on in the kernel; a new client is the
    // relay's, and served.
    in_netns(&topo.client, || {
        udp_echo(&resident, b"legit resident again");
        udp_echo(&udp_socket(to), b"legit newcomer");
    });
    let (after, relay_after, _) = counts(&daemon);
    assert_eq!(counter(&after, "flows"), ENTRIES / 2, "{after}");
    assert_eq!(counter(&after, "packets_rev"), 2, "{after}");
    assert_eq!(counter(&after, "fallback_full"), to_relay + 1, "{after}");
    assert_eq!(
        counter(&relay_after, "datagrams_to_client"),
        1,
        "{relay_after}"
    );
    host_binds_ephemeral_ports(&topo, 1000);
    daemon.stop();
}
