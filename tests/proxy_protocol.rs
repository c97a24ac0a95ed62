//! Integration tests: PROXY protocol through rule files and the relay, with
//! real sockets on loopback. Clients bind their own 127.0.0.x addresses,
//! so the address a header carries is theirs, not the forwarder's. The
//! backends parse headers strictly with their own code, not forwarder's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forwarder::config::load_str;
use forwarder::relay::{Relay, RelayRuleCounters};
use forwarder::reload;
use forwarder::rules::{Compiled, NoKernelPath};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::common::harness::{
    Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule, runtime, spawn_in,
};
use crate::common::{self, TempConfig};

/// Every test ends within this, pass or fail.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// Generous bound on a single wait, to fail rather than hang.
const WAIT: Duration = Duration::from_secs(10);
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// forwarder's own limit for a trusted upstream's header, in the README.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// What a backend's strict parser saw on one connection or datagram.
#[derive(Debug, PartialEq)]
struct Seen {
    version: u8,
    source: SocketAddr,
    destination: SocketAddr,
    payload: [u8; 32],
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Deterministic bytes that are not a pattern.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn ip_of(bytes: &[u8]) -> IpAddr {
    match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).unwrap()),
        _ => IpAddr::from(<[u8; 16]>::try_from(bytes).unwrap()),
    }
}

fn port_of(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

/// A v2 header's fixed part: signature, PROXY command, the family byte
/// `want_family | transport`, and the exact address length.
fn v2_fixed(head: &[u8; 16], transport: u8) -> Result<usize, String> {
    if &head[..12] != V2_SIGNATURE {
        return Err(format!("no v2 signature: {head:?}"));
    }
    if head[12] != 0x21 {
        return Err(format!("version/command {:#x}, want 0x21", head[12]));
    }
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    match (head[13], len) {
        (f, 12) if f == 0x10 | transport => Ok(12),
        (f, 36) if f == 0x20 | transport => Ok(36),
        (f, l) => Err(format!("family {f:#x} with length {l}")),
    }
}

fn v2_addresses(block: &[u8]) -> (SocketAddr, SocketAddr) {
    let a = block.len() / 2 - 2;
    (
        SocketAddr::new(ip_of(&block[..a]), port_of(&block[2 * a..])),
        SocketAddr::new(ip_of(&block[a..2 * a]), port_of(&block[2 * a + 2..])),
    )
}

/// `PROXY TCP4|TCP6 src dst sport dport\r\n`.
fn parse_v1(line: &[u8]) -> Result<(SocketAddr, SocketAddr), String> {
    let text = std::str::from_utf8(&line[..line.len() - 2]).map_err(|e| e.to_string())?;
    let f: Vec<&str> = text.split(' ').collect();
    let [proxy, family, src, dst, sport, dport] = f[..] else {
        return Err(format!("v1 line of {} fields: {text:?}", f.len()));
    };
    let ip = |t: &str| -> Result<IpAddr, String> {
        match family {
            "TCP4" => t
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|e| e.to_string()),
            "TCP6" => t
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|e| e.to_string()),
            _ => Err(format!("family {family:?}")),
        }
    };
    let port = |t: &str| -> Result<u16, String> {
        if t.len() > 1 && t.starts_with('0') {
            return Err(format!("port {t:?} with a leading zero"));
        }
        t.parse().map_err(|_| format!("port {t:?}"))
    };
    if proxy != "PROXY" {
        return Err(format!("not PROXY: {text:?}"));
    }
    Ok((
        SocketAddr::new(ip(src)?, port(sport)?),
        SocketAddr::new(ip(dst)?, port(dport)?),
    ))
}

/// One backend connection: the header (v1 or v2, told by its first
/// byte), then the payload to its end, answered with the payload's hash.
async fn strict_tcp(mut s: TcpStream) -> Result<Seen, String> {
    let first = s.read_u8().await.map_err(|e| format!("no byte: {e}"))?;
    let (version, (source, destination)) = if first == b'P' {
        // Byte by byte, so that nothing past the line is taken.
        let mut line = vec![first];
        while !line.ends_with(b"\r\n") {
            if line.len() >= 107 {
                return Err("v1 line longer than 107 bytes".into());
            }
            line.push(s.read_u8().await.map_err(|e| e.to_string())?);
        }
        (1, parse_v1(&line)?)
    } else {
        let mut head = [0u8; 16];
        head[0] = first;
        s.read_exact(&mut head[1..])
            .await
            .map_err(|e| e.to_string())?;
        let len = v2_fixed(&head, 0x1)?;
        let mut block = vec![0u8; len];
        s.read_exact(&mut block).await.map_err(|e| e.to_string())?;
        (2, v2_addresses(&block))
    };
    let mut data = Vec::new();
    s.read_to_end(&mut data).await.map_err(|e| e.to_string())?;
    let payload = sha(&data);
    s.write_all(&payload).await.map_err(|e| e.to_string())?;
    s.shutdown().await.map_err(|e| e.to_string())?;
    Ok(Seen {
        version,
        source,
        destination,
        payload,
    })
}

type Sightings = mpsc::UnboundedReceiver<Result<Seen, String>>;

/// A TCP backend on `bind` whose every connection goes through [`strict_tcp`].
async fn tcp_backend(bind: &str) -> (SocketAddr, Sightings) {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(strict_tcp(s).await);
            });
        }
    });
    (addr, rx)
}

/// A UDP backend on `bind`: each datagram must be a v2 DGRAM header and a
/// payload; the payload goes back, plain, to the sender.
async fn udp_backend(bind: &str) -> (SocketAddr, Sightings) {
    let s = UdpSocket::bind(bind).await.unwrap();
    let addr = s.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let d = &buf[..n];
            let parsed = (|| {
                let head: &[u8; 16] = d.get(..16).ok_or("short")?.try_into().unwrap();
                let len = v2_fixed(head, 0x2)?;
                let block = d.get(16..16 + len).ok_or("short block")?;
                Ok::<_, String>((v2_addresses(block), 16 + len))
            })();
            let seen = parsed.map(|((source, destination), at)| {
                (
                    Seen {
                        version: 2,
                        source,
                        destination,
                        payload: sha(&d[at..]),
                    },
                    at,
                )
            });
            if let Ok((_, at)) = &seen {
                let _ = s.send_to(&buf[*at..n], from).await;
            }
            let _ = tx.send(seen.map(|(seen, _)| seen));
        }
    });
    (addr, rx)
}

async fn next_seen(rx: &mut Sightings) -> Seen {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the backend saw a flow")
        .expect("backend running")
        .unwrap_or_else(|e| panic!("the backend's strict parser refused: {e}"))
}

fn compile(yaml: &str) -> Compiled {
    load_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n---\n{yaml}"))
}

/// One route on 127.0.0.1 (listen port picked) to `backend`, with `extra` fields.
fn route(scheme: &str, backend: SocketAddr, extra: &str) -> String {
    format!(
        "routes:\n  pp:\n    scheme: {scheme}\n    bind: 127.0.0.1\n    host: 127.0.0.1\n    port: {}\n{extra}",
        backend.port()
    )
}

async fn start(compiled: &Compiled) -> (Relay, SocketAddr) {
    let relay = Relay::start(&compiled.listeners, compiled.relay, Arc::new(NoKernelPath))
        .await
        .expect("relay starts");
    let addr = relay.local_addrs()[0].1;
    (relay, addr)
}

fn counters(relay: &Relay) -> RelayRuleCounters {
    relay.counters().into_iter().next().expect("one rule")
}

/// A TCP connection from `source` (an address of this host).
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends `chunks` (with a pause between them, so that they arrive apart),
/// half-closes, and returns what came back.
async fn send_and_read(s: &mut TcpStream, chunks: &[&[u8]]) -> Vec<u8> {
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.write_all(chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_backends_get_the_clients_address_in_v1_v2_and_godoxys_header() {
    tokio::time::timeout(TEST_LIMIT, async {
        for (n, (field, version)) in [
            ("    proxy_protocol: v1\n", 1),
            ("    proxy_protocol: v2\n", 2),
            ("    relay_proxy_protocol_header: true\n", 2),
        ]
        .into_iter()
        .enumerate()
        {
            let (backend, mut seen) = tcp_backend("127.0.0.1:0").await;
            let (relay, listen) = start(&compile(&route("tcp", backend, field))).await;
            let mut client = connect_from("127.0.0.7", listen).await;
            let from = client.local_addr().unwrap();
            let data = payload(1 << 20, n as u64 + 1);
            let back = send_and_read(&mut client, &[&data]).await;
            let got = next_seen(&mut seen).await;
            assert_eq!(
                got,
                Seen {
                    version,
                    source: from,
                    destination: listen,
                    payload: sha(&data)
                },
                "{field}"
            );
            assert_eq!(back, sha(&data), "{field}: the answer came back");
            // Only the payload counts as bytes to the backend.
            assert_eq!(counters(&relay).bytes_to_backend, data.len() as u64);
            relay.shutdown(Duration::ZERO).await;
        }
    })
    .await
    .expect("test within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_backends_get_a_v2_header_on_every_datagram() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (backend, mut seen) = udp_backend("127.0.0.1:0").await;
        let (relay, listen) =
            start(&compile(&route("udp", backend, "    proxy_protocol: v2\n"))).await;
        let client = UdpSocket::bind("127.0.0.9:0").await.unwrap();
        let from = client.local_addr().unwrap();
        for (i, len) in [1usize, 1400, 60_000].into_iter().enumerate() {
            let data = payload(len, i as u64 + 7);
            client.send_to(&data, listen).await.unwrap();
            assert_eq!(
                next_seen(&mut seen).await,
                Seen {
                    version: 2,
                    source: from,
                    destination: listen,
                    payload: sha(&data)
                }
            );
            let mut buf = vec![0u8; 65_536];
            let (n, replier) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
                .await
                .expect("a reply")
                .unwrap();
            assert_eq!((&buf[..n], replier), (&data[..], listen), "plain reply");
        }
        let c = counters(&relay);
        assert_eq!((c.flows, c.datagrams_to_backend), (1, 3));
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test within its limit");
}

/// A v2 PROXY header for a TCP connection, as an upstream would send it.
fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    let (family, len) = if source.is_ipv4() {
        (0x11, 12u16)
    } else {
        (0x21, 36)
    };
    h.extend_from_slice(&[0x21, family]);
    h.extend_from_slice(&len.to_be_bytes());
    for ip in [source.ip(), destination.ip()] {
        match ip {
            IpAddr::V4(v4) => h.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => h.extend_from_slice(&v6.octets()),
        }
    }
    h.extend_from_slice(&source.port().to_be_bytes());
    h.extend_from_slice(&destination.port().to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_upstreams_headers_are_honoured_and_others_are_plain_clients() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (backend, mut seen) = tcp_backend("127.0.0.1:0").await;
        let yaml = route(
            "tcp",
            backend,
            "    proxy_protocol: v2\n    accept_proxy_protocol: [127.0.0.2/32]\n",
        );
        let (relay, listen) = start(&compile(&yaml)).await;
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();

        // A trusted upstream's v1 header, split across writes, then the payload.
        let data = payload(300_000, 11);
        let mut up = connect_from("127.0.0.2", listen).await;
        let header = b"PROXY TCP4 203.0.113.7 198.51.100.1 40001 443\r\n";
        let back = send_and_read(&mut up, &[&header[..20], &header[20..], &data]).await;
        let want = Seen {
            version: 2,
            source: sa("203.0.113.7:40001"),
            destination: sa("198.51.100.1:443"),
            payload: sha(&data),
        };
        assert_eq!(next_seen(&mut seen).await, want);
        assert_eq!(back, sha(&data));

        // A v2 header with the payload in the same write; an IPv6 client.
        let client = sa("[2001:db8::7]:5555");
        let original = sa("[2001:db8::1]:443");
        let mut first = v2_header(client, original);
        first.extend_from_slice(&data[..1000]);
        let mut up = connect_from("127.0.0.2", listen).await;
        let back = send_and_read(&mut up, &[&first, &data[1000..]]).await;
        let want = Seen {
            version: 2,
            source: client,
            destination: original,
            payload: sha(&data),
        };
        assert_eq!(next_seen(&mut seen).await, want);
        assert_eq!(back, sha(&data));

        // An untrusted peer's "header" is payload: the backend's header
        // names the peer itself.
        let mut forged = b"PROXY TCP4 203.0.113.9 198.51.100.1 40001 443\r\n".to_vec();
        forged.extend_from_slice(&data[..500]);
        let mut plain = connect_from("127.0.0.3", listen).await;
        let from = plain.local_addr().unwrap();
        let back = send_and_read(&mut plain, &[&forged]).await;
        let want = Seen {
            version: 2,
            source: from,
            destination: listen,
            payload: sha(&forged),
        };
        assert_eq!(next_seen(&mut seen).await, want);
        assert_eq!(back, sha(&forged));
        assert_eq!(counters(&relay).proxy_headers_refused, 0);

        // A trusted upstream without a valid header is closed and counted,
        // and the backend never hears of it.
        let mut bad = connect_from("127.0.0.2", listen).await;
        bad.write_all(b"hello, no header here\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(WAIT, bad.read(&mut buf))
            .await
            .expect("closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(counters(&relay).proxy_headers_refused, 1);

        // One that sends nothing is closed after the header timeout.
        let mut silent = connect_from("127.0.0.2", listen).await;
        let started = Instant::now();
        let read = tokio::time::timeout(WAIT * 2, silent.read(&mut buf))
            .await
            .expect("closed");
        let took = started.elapsed();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(
            took >= HEADER_TIMEOUT - Duration::from_millis(100)
                && took <= HEADER_TIMEOUT * 3 + Duration::from_secs(2),
            "closed after {took:?}, want about {HEADER_TIMEOUT:?}"
        );
        assert_eq!(counters(&relay).proxy_headers_refused, 2);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            seen.try_recv().is_err(),
            "the backend saw a refused connection"
        );
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_header_applies_to_new_flows() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (backend, mut seen) = tcp_backend("127.0.0.1:0").await;
        let running = compile(&route("tcp", backend, "    proxy_protocol: v1\n"));
        let (relay, listen) = start(&running).await;
        let data = payload(10_000, 3);
        for (field, version) in [
            ("    proxy_protocol: v1\n", 1),
            ("    proxy_protocol: v2\n", 2),
        ] {
            let loaded = compile(&route("tcp", backend, field));
            let plan = reload::plan(&running, loaded, &|_| false).unwrap();
            let prepared = relay.prepare(&plan).await.unwrap();
            relay.apply(&plan, prepared);
            let mut client = connect_from("127.0.0.5", listen).await;
            let from = client.local_addr().unwrap();
            send_and_read(&mut client, &[&data]).await;
            let got = next_seen(&mut seen).await;
            assert_eq!((got.version, got.source), (version, from), "{field}");
        }
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_turns_the_udp_header_on_applies_to_new_sessions() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (backend, mut seen) = udp_backend("127.0.0.1:0").await;
        let running = compile(&route("udp", backend, ""));
        let (relay, listen) = start(&running).await;
        // Without the header, the strict backend refuses the datagram.
        let before = UdpSocket::bind("127.0.0.6:0").await.unwrap();
        before.send_to(b"plain", listen).await.unwrap();
        let refused = tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(refused.is_err(), "{refused:?}");

        let loaded = compile(&route("udp", backend, "    proxy_protocol: v2\n"));
        let plan = reload::plan(&running, loaded, &|_| false).unwrap();
        let prepared = relay.prepare(&plan).await.unwrap();
        relay.apply(&plan, prepared);
        let after = UdpSocket::bind("127.0.0.6:0").await.unwrap();
        after.send_to(b"with a header", listen).await.unwrap();
        let got = next_seen(&mut seen).await;
        assert_eq!(
            (got.version, got.source, got.payload),
            (2, after.local_addr().unwrap(), sha(b"with a header"))
        );
        relay.shutdown(Duration::ZERO).await;
    })
    .await
    .expect("test within its limit");
}

#[test]
fn check_shows_the_proxy_mode() {
    // No traffic is sent: `check` only compiles.
    let cfg = TempConfig::new(
        "proxy-check",
        "routes:
  game: {scheme: 'tcp,udp', host: 198.18.9.2, port: 17031:7001, proxy_protocol: v2}
  ssh: {scheme: tcp, host: 198.18.9.2, port: 17032:22, relay_proxy_protocol_header: true, accept_proxy_protocol: [10.1.0.0/16]}
",
    );
    let out = Command::new(common::forwarder_bin())
        .args(["check", "-c"])
        .arg(&cfg.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    // Columns are padded: compare words.
    let rows: Vec<String> = table
        .lines()
        .skip(1)
        .take(3)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        rows,
        [
            "0 game tcp [::]:17031 → 198.18.9.2:7001 relay (proxy_protocol), PROXY v2 to backend -",
            "1 game udp [::]:17031 → 198.18.9.2:7001 relay (proxy_protocol), PROXY v2 to backend -",
            "2 ssh tcp [::]:17032 → 198.18.9.2:22 relay (proxy_protocol), PROXY v2 to backend, PROXY read from 10.1.0.0/16 -",
        ],
        "{table}"
    );
}

/// The strict backends on the backend namespace's port 3478, tcp and udp,
/// until dropped.
struct NsBackends {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    tcp: Sightings,
    udp: Sightings,
}

impl NsBackends {
    fn start(ns: &common::Netns) -> NsBackends {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready, up) = std::sync::mpsc::channel();
        let thread = spawn_in(ns, move || {
            runtime().block_on(async move {
                let (_, tcp) = tcp_backend("0.0.0.0:3478").await;
                let (_, udp) = udp_backend("0.0.0.0:3478").await;
                ready.send((tcp, udp)).unwrap();
                let _ = stopped.await;
            })
        });
        let (tcp, udp) = up.recv_timeout(WAIT).expect("backends up");
        NsBackends {
            stop: Some(stop),
            thread: Some(thread),
            tcp,
            udp,
        }
    }
}

impl Drop for NsBackends {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}

#[test]
fn with_the_kernel_path_on_proxy_rules_go_by_the_relay() {
    if !common::require_root("with_the_kernel_path_on_proxy_rules_go_by_the_relay") {
        return;
    }
    let topo = common::Topology::new();
    forwarding_on(&topo);
    let mut backends = NsBackends::start(&topo.backend);
    let yaml = format!(
        "interfaces: [{a}, {b}]\n\
         relay: {{drain_timeout: 1s}}\n\
         routes:\n\
         \x20 pp: {{scheme: 'tcp,udp', host: {backend}, port: 7878:3478, proxy_protocol: v2}}\n\
         \x20 plain: {{scheme: tcp, host: {backend}, port: 7879:3479}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        backend = topo.backend_addr(),
    );
    let daemon = Daemon::start(&topo.forwarder, "proxyv2", &yaml);
    let listen = SocketAddr::from((topo.forwarder_addr(), 7878));
    let data = payload(4 << 20, 5);
    let (tcp_from, udp_from) = in_netns(&topo.client, || {
        runtime().block_on(async {
            let mut c = TcpStream::connect(listen).await.unwrap();
            let tcp_from = c.local_addr().unwrap();
            assert_eq!(send_and_read(&mut c, &[&data]).await, sha(&data));
            let u = UdpSocket::bind("0.0.0.0:0").await.unwrap();
            u.send_to(&data[..1200], listen).await.unwrap();
            let mut buf = [0u8; 2048];
            let (n, _) = tokio::time::timeout(WAIT, u.recv_from(&mut buf))
                .await
                .expect("a udp reply")
                .unwrap();
            assert_eq!(&buf[..n], &data[..1200]);
            let mut udp_from = u.local_addr().unwrap();
            udp_from.set_ip(tcp_from.ip());
            (tcp_from, udp_from)
        })
    });
    runtime().block_on(async {
        let want = |source, payload| Seen {
            version: 2,
            source,
            destination: listen,
            payload,
        };
        assert_eq!(
            next_seen(&mut backends.tcp).await,
            want(tcp_from, sha(&data))
        );
        assert_eq!(
            next_seen(&mut backends.udp).await,
            want(udp_from, sha(&data[..1200]))
        );
    });
    let status = daemon.status();
    // A plain rule (no traffic) keeps the kernel path loaded.
    assert_eq!(status["kernel_path"], true, "{status}");
    for proto in ["tcp", "udp"] {
        let k = kernel_rule(&status, "pp", proto);
        assert_eq!(counter(k, "flows"), 0, "{proto}: {k}");
        assert_eq!(counter(k, "packets_fwd"), 0, "{proto}: {k}");
        assert_eq!(
            counter(relay_rule(&status, "pp", proto), "flows"),
            1,
            "{proto}"
        );
    }
    daemon.stop();
}

#[test]
fn a_reload_that_turns_the_header_on_moves_new_flows_from_the_kernel_to_the_relay() {
    if !common::require_root(
        "a_reload_that_turns_the_header_on_moves_new_flows_from_the_kernel_to_the_relay",
    ) {
        return;
    }
    let topo = common::Topology::new();
    forwarding_on(&topo);
    let mut backends = NsBackends::start(&topo.backend);
    let yaml = |extra: &str| {
        format!(
            "interfaces: [{a}, {b}]\n\
             relay: {{drain_timeout: 1s}}\n\
             routes:\n\
             \x20 pp: {{scheme: tcp, host: {backend}, port: 7878:3478{extra}}}\n",
            a = topo.client_link.a_if,
            b = topo.backend_link.a_if,
            backend = topo.backend_addr(),
        )
    };
    let daemon = Daemon::start(&topo.forwarder, "proxyreload", &yaml(""));
    let listen = SocketAddr::from((topo.forwarder_addr(), 7878));
    let data = payload(100_000, 9);
    // Before: the kernel path carries the flow, and no header reaches the
    // backend (its strict parser refuses the bare payload and closes, so
    // the client may well see a reset).
    in_netns(&topo.client, || {
        runtime().block_on(async {
            let mut c = TcpStream::connect(listen).await.unwrap();
            let _ = c.write_all(&data).await;
            let _ = c.shutdown().await;
            let mut back = Vec::new();
            let _ = c.read_to_end(&mut back).await;
            assert!(
                back.is_empty(),
                "the backend answered a flow without a header"
            );
        })
    });
    let refused = runtime().block_on(async {
        tokio::time::timeout(WAIT, backends.tcp.recv())
            .await
            .expect("the backend saw the flow")
            .expect("backend running")
    });
    assert!(refused.is_err(), "{refused:?}");
    let status = daemon.status();
    assert_eq!(counter(kernel_rule(&status, "pp", "tcp"), "flows"), 1);

    std::fs::write(daemon.config_path(), yaml(", proxy_protocol: v1")).unwrap();
    let out = common::output_within(
        Command::new(common::forwarder_bin())
            .arg("reload")
            .arg("--control")
            .arg(daemon.control_path()),
        WAIT,
    );
    assert!(out.status.success(), "{out:?}");

    let (from, back) = in_netns(&topo.client, || {
        runtime().block_on(async {
            let mut c = TcpStream::connect(listen).await.unwrap();
            let from = c.local_addr().unwrap();
            (from, send_and_read(&mut c, &[&data]).await)
        })
    });
    assert_eq!(back, sha(&data));
    let got = runtime().block_on(next_seen(&mut backends.tcp));
    assert_eq!(
        got,
        Seen {
            version: 1,
            source: from,
            destination: listen,
            payload: sha(&data)
        }
    );
    let status = daemon.status();
    assert_eq!(counter(kernel_rule(&status, "pp", "tcp"), "flows"), 1);
    assert_eq!(counter(relay_rule(&status, "pp", "tcp"), "flows"), 1);
    daemon.stop();
}
