//! Many concurrent flows through the kernel path: 100,000 UDP flows to one
//! backend ip:port, more than one SNAT address holds (`kernel.snat_addresses`
//! spreads them over six), and 10,000 TCP connections, each echoing its own
//! data. Every flow is the kernel's, nothing is lost, nothing crosses.

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::harness::{
    Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule, spawn_in,
};
use crate::common::{Topology, eventually, require_root};

const LISTEN_PORT: u16 = 7100;
const BACKEND_PORT: u16 = 3991;
/// Six SNAT addresses on the forwarder's backend-side veth, beside its .1.
const SNAT_ADDRS: [Ipv4Addr; 6] = [
    Ipv4Addr::new(198, 18, 2, 10),
    Ipv4Addr::new(198, 18, 2, 11),
    Ipv4Addr::new(198, 18, 2, 12),
    Ipv4Addr::new(198, 18, 2, 13),
    Ipv4Addr::new(198, 18, 2, 14),
    Ipv4Addr::new(198, 18, 2, 15),
];
/// 25,000 ports an address: one address holds a quarter of the UDP flows,
/// the six together 150,000 pairs, so that 64 random probes never all
/// miss (at two thirds full, once in 10^11 flows).
const SNAT_PORTS: (u16, u16) = (40000, 64999);
const UDP_FLOWS: usize = 100_000;
const TCP_CONNECTIONS: usize = 10_000;
/// Client addresses, each binding a share of the UDP sockets.
const CLIENT_ADDRS: u8 = 4;
/// Datagrams in flight at once: a batch is sent, then all its echoes
/// awaited, so no queue on the way (the per-CPU backlog holds 1,000)
/// can overflow.
const BATCH: usize = 500;
/// UDP sockets a client thread holds (in a descriptor table of its own).
const PER_THREAD: usize = 12_500;

/// One of these tests at a time: each sets the process's open-file limit
/// and puts it back, and each loads the machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn rules(topo: &Topology, scheme: &str) -> String {
    let pool: Vec<String> = SNAT_ADDRS.iter().map(ToString::to_string).collect();
    format!(
        "interfaces: [{}, {}]\n\
         kernel: {{conntrack_size: 262144, snat_ports: {}-{}, snat_addresses: [{}]}}\n\
         routes:\n  \
         many: {{scheme: {scheme}, host: {}, port: {LISTEN_PORT}:{BACKEND_PORT}, path: kernel, \
         timeouts: {{udp_idle: 10m, udp_unreplied: 10m}}}}\n",
        topo.client_link.a_if,
        topo.backend_link.a_if,
        SNAT_PORTS.0,
        SNAT_PORTS.1,
        pool.join(", "),
        topo.backend_addr(),
    )
}

/// The topology with the SNAT addresses on the forwarder and the client's
/// extra addresses.
fn topology() -> Topology {
    let topo = Topology::new();
    forwarding_on(&topo);
    for a in SNAT_ADDRS {
        topo.forwarder.ip(&[
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            &topo.backend_link.a_if,
        ]);
    }
    for i in 0..CLIENT_ADDRS {
        topo.client.ip(&[
            "addr",
            "add",
            &format!("{}/24", client_addr(i)),
            "dev",
            &topo.client_link.b_if,
        ]);
    }
    topo
}

fn client_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 10 + i)
}

/// Raises this process's soft open-file limit to `want` (at most the
/// hard limit, which a test without CAP_SYS_RESOURCE cannot raise: the
/// sockets are spread over threads with fd tables of their own, see
/// [`own_fd_table`]) and puts it back on drop. The host's limits stay.
struct FileLimit(libc::rlimit);

impl FileLimit {
    fn raise(want: u64) -> FileLimit {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads the limit into a local.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
        assert!(
            old.rlim_max >= want,
            "RLIMIT_NOFILE's hard limit {} is below the {want} descriptors a thread needs",
            old.rlim_max
        );
        let new = libc::rlimit {
            rlim_cur: old.rlim_cur.max(want),
            rlim_max: old.rlim_max,
        };
        // SAFETY: sets the limit from a local.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) };
        assert_eq!(rc, 0, "RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
        FileLimit(old)
    }
}

impl Drop for FileLimit {
    fn drop(&mut self) {
        // SAFETY: sets the limit read at start.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.0) };
    }
}

/// Gives the calling thread a file descriptor table of its own (a copy):
/// the open-file limit bounds each table, so threads holding their own
/// sockets together hold more than one process may. Its sockets close
/// when the thread ends.
fn own_fd_table() {
    // SAFETY: unshares this thread's descriptor table only.
    let rc = unsafe { libc::unshare(libc::CLONE_FILES) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_FILES): {}",
        std::io::Error::last_os_error()
    );
}

/// Sets a flag on drop, also when the test panics, so that parked
/// threads end.
struct Release(Arc<AtomicBool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The backend: echoes every datagram, and notes each source it saw.
struct UdpBackend {
    sources: Arc<Mutex<HashMap<SocketAddrV4, u64>>>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpBackend {
    fn start(topo: &Topology) -> UdpBackend {
        let socket = in_netns(&topo.backend, || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).unwrap();
            let size: libc::c_int = 32 << 20;
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
        let sources = Arc::new(Mutex::new(HashMap::new()));
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (src, rx, st) = (sources.clone(), received.clone(), stop.clone());
        let thread = spawn_in(&topo.backend, move || {
            let mut buf = [0u8; 64];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                socket.send_to(&buf[..n], from).unwrap();
                let SocketAddr::V4(from) = from else {
                    unreachable!()
                };
                *src.lock().unwrap().entry(from).or_default() += 1;
                rx.fetch_add(1, Ordering::Relaxed);
            }
        });
        UdpBackend {
            sources,
            received,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Nonblocking UDP sockets for flows `flows` in the client's namespace,
/// spread over its extra addresses with explicit ports, each connected
/// to `to`.
fn udp_clients(flows: std::ops::Range<usize>, to: SocketAddr) -> Vec<UdpSocket> {
    let per_addr = UDP_FLOWS.div_ceil(usize::from(CLIENT_ADDRS));
    flows
        .map(|i| {
            let addr = client_addr((i / per_addr) as u8);
            let port = 20000 + (i % per_addr) as u16;
            let s = UdpSocket::bind((addr, port))
                .unwrap_or_else(|e| panic!("client socket {i} on {addr}:{port}: {e}"));
            s.connect(to).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect()
}

/// Sends each socket of `batch` (from index `first`) its index, then
/// waits for every echo, each checked on the socket that sent it. No
/// resend: a lost datagram fails the test.
fn udp_batch(batch: &[UdpSocket], first: usize) {
    for (n, s) in batch.iter().enumerate() {
        let index = (first + n) as u64;
        assert_eq!(s.send(&index.to_be_bytes()).unwrap(), 8);
    }
    let mut pending: Vec<usize> = (0..batch.len()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 16];
    while !pending.is_empty() {
        let before = pending.len();
        pending.retain(|&n| match batch[n].recv(&mut buf) {
            Ok(len) => {
                let index = (first + n) as u64;
                assert_eq!(
                    &buf[..len],
                    &index.to_be_bytes(),
                    "flow {index} got another flow's echo"
                );
                false
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => true,
            Err(e) => panic!("flow {}: {e}", first + n),
        });
        if pending.len() == before {
            assert!(
                Instant::now() < deadline,
                "{} echoes of the batch from flow {first} never came (e.g. flow {})",
                pending.len(),
                first + pending[0]
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn a_hundred_thousand_udp_flows_to_one_backend_stay_in_the_kernel_over_six_snat_addresses() {
    if !require_root(
        "a_hundred_thousand_udp_flows_to_one_backend_stay_in_the_kernel_over_six_snat_addresses",
    ) {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = topology();
    let backend = UdpBackend::start(&topo);
    let daemon = Daemon::start(&topo.forwarder, "scale-udp", &rules(&topo, "udp"));
    let status = daemon.status();
    let pool: Vec<String> = SNAT_ADDRS.iter().map(ToString::to_string).collect();
    assert_eq!(status["kernel"]["snat_addresses"], serde_json::json!(pool));
    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT));
    let limit = FileLimit::raise(PER_THREAD as u64 + 4096);
    let release = Release(Arc::new(AtomicBool::new(false)));
    let started = Instant::now();
    // One thread after the other, each with its own descriptor table and
    // its share of the sockets, which it holds until the end.
    let mut threads = Vec::new();
    for t in 0..UDP_FLOWS / PER_THREAD {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let release = release.0.clone();
        threads.push(spawn_in(&topo.client, move || {
            own_fd_table();
            let first = t * PER_THREAD;
            let clients = udp_clients(first..first + PER_THREAD, to);
            for (b, batch) in clients.chunks(BATCH).enumerate() {
                udp_batch(batch, first + b * BATCH);
            }
            done_tx.send(()).unwrap();
            while !release.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(clients);
        }));
        if done_rx.recv().is_err() {
            // The thread panicked: its panic is the test's.
            let thread = threads.pop().expect("just pushed");
            std::panic::resume_unwind(thread.join().expect_err("it panicked"));
        }
    }
    let took = started.elapsed();

    let flows = UDP_FLOWS as u64;
    let status = daemon.status();
    let (k, r) = (
        kernel_rule(&status, "many", "udp"),
        relay_rule(&status, "many", "udp"),
    );
    assert_eq!(counter(k, "flows"), flows, "{k}");
    assert_eq!(counter(k, "packets_fwd"), flows, "{k}");
    assert_eq!(counter(k, "packets_rev"), flows, "{k}");
    assert_eq!(counter(k, "unanswered_taken_over"), 0, "{k}");
    for name in ["fallback_full", "fallback_other", "dropped"] {
        assert_eq!(counter(k, name), 0, "{name}: {k}");
    }
    for name in ["flows", "datagrams_to_backend", "datagrams_to_client"] {
        assert_eq!(counter(r, name), 0, "the relay carried none: {r}");
    }
    // Each flow reached the backend once, from its own (address, port),
    // and the six addresses shared them.
    assert_eq!(backend.received.load(Ordering::Relaxed), flows);
    let sources = backend.sources.lock().unwrap().clone();
    assert_eq!(sources.len(), UDP_FLOWS, "one source tuple per flow");
    assert!(sources.values().all(|&n| n == 1));
    let per_addr: HashMap<Ipv4Addr, usize> = sources.keys().fold(HashMap::new(), |mut m, s| {
        *m.entry(*s.ip()).or_default() += 1;
        m
    });
    let used: HashSet<Ipv4Addr> = per_addr.keys().copied().collect();
    assert_eq!(used, SNAT_ADDRS.into_iter().collect(), "{per_addr:?}");
    let span = usize::from(SNAT_PORTS.1 - SNAT_PORTS.0) + 1;
    assert!(
        per_addr.values().all(|&n| n <= span),
        "an address holds at most its ports: {per_addr:?}"
    );
    assert!(
        sources
            .keys()
            .all(|s| (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&s.port()))
    );
    // All of them at once in the table, per address as the backend saw.
    eventually("the sweeper counts every flow", || {
        daemon.status()["kernel"]["conntrack_entries"].as_u64() == Some(2 * flows)
    });
    let mut seen: Vec<(String, u64)> = per_addr
        .iter()
        .map(|(a, n)| (a.to_string(), *n as u64))
        .collect();
    seen.sort();
    let in_use = || -> Vec<(String, u64)> {
        let status = daemon.status();
        let mut v: Vec<(String, u64)> = status["kernel"]["snat_ports_in_use_per_backend"]
            .as_array()
            .expect("per backend")
            .iter()
            .map(|u| {
                (
                    u["source"].as_str().unwrap().to_owned(),
                    u["ports"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    eventually("status counts the ports of each SNAT address", || {
        in_use() == seen
    });
    eprintln!(
        "{UDP_FLOWS} UDP flows in {:.1} s; per SNAT address: {seen:?}",
        took.as_secs_f64()
    );
    drop(release);
    for t in threads {
        t.join().unwrap();
    }
    drop(limit);
    daemon.stop();
}

#[test]
fn ten_thousand_tcp_connections_each_echo_their_own_data_through_the_kernel() {
    if !require_root("ten_thousand_tcp_connections_each_echo_their_own_data_through_the_kernel") {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let topo = topology();
    let accepted = Arc::new(AtomicU64::new(0));
    let echoed = Arc::new(AtomicU64::new(0));
    let limit = FileLimit::raise(TCP_CONNECTIONS as u64 + 4096);
    // Tokio's I/O driver dups a process-wide descriptor (its signal
    // pipe) made at the first runtime: made here, in the shared table,
    // every table copied below has it.
    drop(one_thread_runtime());
    let release = Release(Arc::new(AtomicBool::new(false)));
    // The backend: a runtime on one thread with its own descriptor table
    // in its namespace, one task a connection.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (acc, ech, stop) = (accepted.clone(), echoed.clone(), release.0.clone());
    let backend = spawn_in(&topo.backend, move || {
        own_fd_table();
        one_thread_runtime().block_on(async move {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.set_reuseaddr(true).unwrap();
            s.bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT).into())
                .unwrap();
            let listener = s.listen(4096).unwrap();
            ready_tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept());
                let Ok(Ok((mut conn, _))) = accepted.await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::Relaxed);
                let ech = ech.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                                ech.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
    });
    ready_rx.recv().expect("the backend listens");
    let daemon = Daemon::start(&topo.forwarder, "scale-tcp", &rules(&topo, "tcp"));
    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT));
    let started = Instant::now();
    // The clients: likewise a thread with its own descriptors.
    in_netns(&topo.client, || {
        own_fd_table();
        one_thread_runtime().block_on(async {
            // Open all, a batch of connects at a time, from the client's
            // addresses in turn.
            let mut conns = Vec::with_capacity(TCP_CONNECTIONS);
            for first in (0..TCP_CONNECTIONS).step_by(BATCH) {
                let batch = (first..(first + BATCH).min(TCP_CONNECTIONS)).map(|i| async move {
                    let s = tokio::net::TcpSocket::new_v4().unwrap();
                    s.bind((client_addr((i % usize::from(CLIENT_ADDRS)) as u8), 0).into())
                        .unwrap();
                    tokio::time::timeout(Duration::from_secs(30), s.connect(to))
                        .await
                        .unwrap_or_else(|_| panic!("connection {i}: connect timed out"))
                        .unwrap_or_else(|e| panic!("connection {i}: {e}"))
                });
                conns.extend(futures_join(batch.collect()).await);
            }
            assert_eq!(conns.len(), TCP_CONNECTIONS);
            // Then exchange on all: each sends its index and reads it back.
            let mut echoed_conns = Vec::with_capacity(TCP_CONNECTIONS);
            let mut conns = conns.into_iter().enumerate();
            loop {
                let batch: Vec<_> = conns.by_ref().take(BATCH).collect();
                if batch.is_empty() {
                    break;
                }
                let exchanges = batch.into_iter().map(|(i, mut c)| async move {
                    let i = i as u64;
                    let msg = [i.to_be_bytes(), (!i).to_be_bytes()].concat();
                    c.write_all(&msg).await.unwrap();
                    let mut got = [0u8; 16];
                    tokio::time::timeout(Duration::from_secs(30), c.read_exact(&mut got))
                        .await
                        .unwrap_or_else(|_| panic!("connection {i}: no echo"))
                        .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                    assert_eq!(&got[..], &msg[..], "connection {i} got another's data");
                    c
                });
                echoed_conns.extend(futures_join(exchanges.collect()).await);
            }
            // Then close all: each half-closes and sees the backend's close.
            let mut conns = echoed_conns.into_iter();
            loop {
                let batch: Vec<_> = conns.by_ref().take(BATCH).collect();
                if batch.is_empty() {
                    break;
                }
                let closes = batch.into_iter().map(|mut c| async move {
                    c.shutdown().await.unwrap();
                    let mut rest = Vec::new();
                    tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut rest))
                        .await
                        .expect("the backend closes")
                        .unwrap();
                    assert!(rest.is_empty());
                });
                futures_join(closes.collect()).await;
            }
        })
    });
    let took = started.elapsed();
    assert_eq!(accepted.load(Ordering::Relaxed), TCP_CONNECTIONS as u64);
    assert_eq!(echoed.load(Ordering::Relaxed), 16 * TCP_CONNECTIONS as u64);
    let status = daemon.status();
    let (k, r) = (
        kernel_rule(&status, "many", "tcp"),
        relay_rule(&status, "many", "tcp"),
    );
    assert_eq!(counter(k, "flows"), TCP_CONNECTIONS as u64, "{k}");
    for name in ["fallback_full", "fallback_other", "dropped"] {
        assert_eq!(counter(k, name), 0, "{name}: {k}");
    }
    assert_eq!(counter(r, "flows"), 0, "the relay carried none: {r}");
    assert_eq!(counter(r, "bytes_to_backend"), 0, "{r}");
    eprintln!(
        "{TCP_CONNECTIONS} TCP connections opened, echoed and closed in {:.1} s",
        took.as_secs_f64()
    );
    drop(release);
    backend.join().unwrap();
    drop(limit);
    daemon.stop();
}

/// A runtime on the calling thread.
fn one_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .unwrap()
}

/// Runs the futures together on this task and returns their outputs in
/// order (no extra crate: a join set keyed by index).
async fn futures_join<T: Send + 'static>(
    futures: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in futures.into_iter().enumerate() {
        set.spawn(async move { (i, f.await) });
    }
    let mut out: Vec<Option<T>> = (0..set.len()).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, v) = joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        out[i] = Some(v);
    }
    out.into_iter()
        .map(|v| v.expect("every future ran"))
        .collect()
}
