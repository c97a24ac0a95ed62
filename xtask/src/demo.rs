//! `cargo xtask demo`: forwarder doing what it is for, in a few seconds.
//!
//! client / forwarder / backend namespaces (the tests' `Topology`), a
//! TURN-like backend (TCP and UDP on port 3478, served by threads of this
//! process inside the backend namespace), the daemon on config/demo.yaml,
//! then a bulk TCP transfer, a UDP stream and one UDP flow whose first
//! datagram arrives in fragments, which the kernel path leaves to the
//! relay. It shows `forwarder status` while the traffic runs and explains
//! the counters at the end. Everything it makes is removed on the way
//! out, on an error or Ctrl-C too (see bench/procs.rs).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::bench::netns::{Netns, Topology};
use crate::bench::procs::{self, Proc, TempDir};
use crate::{build, setup, workspace_root};

#[allow(dead_code)]
#[path = "../../forwarder-user/src/status_view.rs"]
mod status_view;
use status_view::{bytes, count};

/// demo.yaml's rules: listen here, forward to the backend's TURN port.
const LISTEN_PORT: u16 = 7878;
const BACKEND_PORT: u16 = 3478;
/// Over the links' MTU of 1500: the first datagram of the relay's flow
/// leaves the client in three fragments.
const FRAGMENTED_DATAGRAM: usize = 4000;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Seconds of traffic.
    #[arg(long, default_value_t = 6)]
    seconds: u64,
    /// Run this forwarder binary instead of building target/release/forwarder.
    #[arg(long, value_name = "PATH")]
    forwarder: Option<PathBuf>,
}

pub fn run(args: DemoArgs) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo makes network namespaces and loads BPF: run it as root");
    }
    if !(2..=60).contains(&args.seconds) {
        bail!(
            "--seconds {}: the traffic runs 2 to 60 seconds",
            args.seconds
        );
    }
    let bin = match args.forwarder {
        Some(bin) => bin,
        None => {
            setup::run()?;
            build::daemon()?
        }
    };
    procs::install_signal_handlers();
    let config = workspace_root().join("config/demo.yaml");
    let outcome = demo(&bin, &config, Duration::from_secs(args.seconds));
    // The guards inside `demo` have run: say so, whatever happened.
    println!("\nremoved the demo's namespaces, processes and files");
    let explanation = outcome?;
    if !explanation.kernel_and_relay {
        bail!("the demo did not show both paths: see the explanation above");
    }
    Ok(())
}

fn demo(bin: &Path, config: &Path, traffic_time: Duration) -> Result<Explanation> {
    let dir = TempDir::new()?;
    println!("==> client 198.18.1.2 | forwarder 198.18.1.1, 198.18.2.1 | backend 198.18.2.2");
    let topo = Topology::new();
    topo.forwarder.sysctl("net.ipv4.ip_forward", "1");
    let backend = Backend::start(&topo.backend)?;

    println!("==> forwarder run -c {}", config.display());
    let control = dir.path.join("control.sock");
    let log = dir.path.join("forwarder.log");
    let mut cmd = topo.forwarder.command(&bin.display().to_string());
    cmd.arg("run")
        .arg("-c")
        .arg(config)
        .arg("--control")
        .arg(&control);
    let mut daemon = Proc::spawn(&mut cmd, "forwarder", &log)?;
    wait_for_status(bin, &control, &mut daemon)?;

    println!(
        "==> {} s of traffic from the client to 198.18.1.1:{LISTEN_PORT}: bulk TCP, a UDP stream, \
         and a UDP flow whose first datagram is {FRAGMENTED_DATAGRAM} bytes (fragments)",
        traffic_time.as_secs()
    );
    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT));
    let traffic = Traffic::start(&topo.client, to);
    let started = Instant::now();
    // The status while the traffic runs (it samples for a second).
    procs::sleep(traffic_time.saturating_sub(Duration::from_secs(2)))?;
    daemon.check_alive()?;
    println!("\n==> forwarder status (while the traffic runs)\n");
    let status = procs::run_bounded(
        Command::new(bin)
            .arg("status")
            .arg("--control")
            .arg(&control),
        Duration::from_secs(10),
    )?;
    if !status.status.success() {
        bail!(
            "forwarder status failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
    print!("{}", String::from_utf8_lossy(&status.stdout));
    procs::sleep(traffic_time.saturating_sub(started.elapsed()))?;
    let sent = traffic.stop();
    daemon.check_alive()?;
    let doc = status_json(bin, &control)?;
    drop(daemon);
    drop(backend);

    println!("\n==> the client's side");
    println!(
        "  TCP: sent {}; UDP stream: {} of {} datagrams echoed; fragmented flow: {} of {} echoed",
        bytes(sent.tcp_bytes as f64),
        count(sent.stream_echoed),
        count(sent.stream_sent),
        sent.fragmented_echoed,
        sent.fragmented_sent
    );
    let explanation = explain(&doc);
    println!("\n==> what went where");
    for line in &explanation.lines {
        println!("{}", wrapped(line, 100));
    }
    Ok(explanation)
}

fn wait_for_status(bin: &Path, control: &Path, daemon: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        daemon.check_alive()?;
        if status_json(bin, control).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the forwarder did not answer in 20 s: {}",
                daemon.log_tail()
            );
        }
        procs::sleep(Duration::from_millis(50))?;
    }
}

fn status_json(bin: &Path, control: &Path) -> Result<Value> {
    let out = procs::run_bounded(
        Command::new(bin)
            .args(["status", "--json", "--control"])
            .arg(control),
        Duration::from_secs(5),
    )?;
    if !out.status.success() {
        bail!(
            "forwarder status: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("forwarder status --json")
}

/// This thread moves into the namespace (threads it starts inherit it).
fn enter(ns_name: &str) -> Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{ns_name}"))
        .with_context(|| format!("open namespace {ns_name}"))?;
    // SAFETY: setns on this thread only, with a namespace descriptor.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns_name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Threads that run until `stop`; joined on drop.
struct Threads {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Threads {
    fn new() -> Threads {
        Threads {
            stop: Arc::new(AtomicBool::new(false)),
            handles: Vec::new(),
        }
    }

    /// Runs `f` on a thread inside `ns`; `f` returns once the flag is set.
    fn spawn_in(&mut self, ns: &Netns, f: impl FnOnce(&AtomicBool) + Send + 'static) {
        let (name, stop) = (ns.name.clone(), self.stop.clone());
        self.handles.push(std::thread::spawn(move || {
            if let Err(e) = enter(&name) {
                eprintln!("demo: {e:#}");
                return;
            }
            f(&stop);
        }));
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How often blocked sockets look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// The TURN-like backend: a TCP sink and a UDP echo on one port.
struct Backend {
    _threads: Threads,
}

impl Backend {
    fn start(ns: &Netns) -> Result<Backend> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Threads::new();
        let ready = tx.clone();
        threads.spawn_in(ns, move |stop| {
            let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)) {
                Ok(l) => l,
                Err(e) => return drop(ready.send(Err(e))),
            };
            let _ = listener.set_nonblocking(true);
            let _ = ready.send(Ok(()));
            std::thread::scope(|s| {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            s.spawn(move || sink(conn, stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        });
        threads.spawn_in(ns, move |stop| {
            let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)) {
                Ok(s) => s,
                Err(e) => return drop(tx.send(Err(e))),
            };
            let _ = socket.set_read_timeout(Some(POLL));
            let _ = tx.send(Ok(()));
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5))
                .context("the backend did not start")?
                .context("the backend cannot listen on port 3478")?;
        }
        Ok(Backend { _threads: threads })
    }
}

/// Reads a TCP connection to its end.
fn sink(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::SeqCst) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// What the client sent and got back.
#[derive(Default)]
struct Sent {
    tcp_bytes: u64,
    stream_sent: u64,
    stream_echoed: u64,
    fragmented_sent: u64,
    fragmented_echoed: u64,
}

/// The client's three flows, each on a thread in the client namespace.
struct Traffic {
    threads: Threads,
    counters: Arc<[AtomicU64; 5]>,
}

impl Traffic {
    fn start(client: &Netns, to: SocketAddr) -> Traffic {
        let counters: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
        let mut threads = Threads::new();
        let c = counters.clone();
        threads.spawn_in(client, move |stop| {
            let Ok(mut conn) = TcpStream::connect_timeout(&to, Duration::from_secs(3)) else {
                return;
            };
            let _ = conn.set_write_timeout(Some(POLL));
            let buf = vec![0x5a_u8; 1 << 16];
            while !stop.load(Ordering::SeqCst) {
                match conn.write(&buf) {
                    Ok(n) => drop(c[0].fetch_add(n as u64, Ordering::Relaxed)),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
        });
        let c = counters.clone();
        threads.spawn_in(client, move |stop| {
            // About 1,000 datagrams a second of 1,200 bytes, like media.
            udp_flow(to, stop, &c[1], &c[2], |_| 1200, Duration::from_millis(1));
        });
        let c = counters.clone();
        threads.spawn_in(client, move |stop| {
            let size = |n: u64| if n == 0 { FRAGMENTED_DATAGRAM } else { 100 };
            udp_flow(to, stop, &c[3], &c[4], size, Duration::from_millis(100));
        });
        Traffic { threads, counters }
    }

    fn stop(mut self) -> Sent {
        self.threads.stop();
        let get = |i: usize| self.counters[i].load(Ordering::Relaxed);
        Sent {
            tcp_bytes: get(0),
            stream_sent: get(1),
            stream_echoed: get(2),
            fragmented_sent: get(3),
            fragmented_echoed: get(4),
        }
    }
}

/// One UDP flow (one client port): datagram `n` has `size(n)` bytes, one
/// every `gap`; echoes are counted as they come.
fn udp_flow(
    to: SocketAddr,
    stop: &AtomicBool,
    sent: &AtomicU64,
    echoed: &AtomicU64,
    size: impl Fn(u64) -> usize,
    gap: Duration,
) {
    let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return;
    };
    if socket.connect(to).is_err() || socket.set_nonblocking(true).is_err() {
        return;
    }
    let payload = vec![0xa5_u8; FRAGMENTED_DATAGRAM];
    let mut buf = vec![0u8; 65536];
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        while socket.recv(&mut buf).is_ok() {
            echoed.fetch_add(1, Ordering::Relaxed);
        }
        let due = started + gap * n as u32;
        if Instant::now() >= due {
            if socket.send(&payload[..size(n)]).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// `line` indented by two, continued lines by four, cut at spaces to fit
/// `width` columns.
fn wrapped(line: &str, width: usize) -> String {
    let mut out = String::new();
    let mut current = String::from("  ");
    for word in line.split_whitespace() {
        let fresh = current.trim().is_empty();
        if !fresh && current.chars().count() + 1 + word.chars().count() > width {
            out.push_str(&current);
            out.push('\n');
            current = String::from("    ");
        } else if !fresh {
            current.push(' ');
        }
        current.push_str(word);
    }
    out.push_str(&current);
    out
}

/// Which path carried what, from the final status document.
#[derive(Debug)]
pub struct Explanation {
    pub lines: Vec<String>,
    /// The kernel path carried flows and the relay took one from it.
    pub kernel_and_relay: bool,
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn find<'a>(list: &'a Value, alias: &str, protocol: &str) -> Option<&'a Value> {
    list.as_array()?
        .iter()
        .find(|c| c["alias"] == alias && c["protocol"] == protocol)
}

fn flows(n: u64, protocol: &str) -> String {
    match (n, protocol) {
        (1, "tcp") => "1 connection".to_owned(),
        (n, "tcp") => format!("{n} connections"),
        (1, _) => "1 flow".to_owned(),
        (n, _) => format!("{n} flows"),
    }
}

pub fn explain(doc: &Value) -> Explanation {
    let mut lines = Vec::new();
    let (mut kernel_bytes, mut relay_bytes, mut fell_back) = (0u64, 0u64, 0u64);
    let mut kernel_flows = 0u64;
    let empty = Vec::new();
    if doc["kernel_path"] != true {
        lines.push("the kernel path is not loaded: the relay carried everything".to_owned());
    }
    for rule in doc["rules"].as_array().unwrap_or(&empty) {
        let alias = rule["alias"].as_str().unwrap_or("?");
        let protocol = rule["protocol"].as_str().unwrap_or("?");
        let name = format!("{alias} ({protocol})");
        if let Some(k) = find(&doc["kernel"]["rules"], alias, protocol) {
            let b = n(&k["bytes_fwd"]) + n(&k["bytes_rev"]);
            let packets = n(&k["packets_fwd"]) + n(&k["packets_rev"]);
            kernel_bytes += b;
            kernel_flows += n(&k["flows"]);
            if n(&k["flows"]) > 0 {
                let programs = match n(&k["xdp_packets"]) {
                    0 => "TC",
                    _ => "XDP and TC",
                };
                lines.push(format!(
                    "{name}: {} by the kernel path, {} in {} packets: {programs} rewrote \
                     and redirected them; userspace never saw a byte",
                    flows(n(&k["flows"]), protocol),
                    bytes(b as f64),
                    count(packets)
                ));
            }
            let reasons = k["fallbacks"].as_object().cloned().unwrap_or_default();
            for (reason, left) in reasons {
                let left = n(&left);
                fell_back += left;
                let why = match reason.as_str() {
                    "fragment" => {
                        "the first datagram came in fragments, which the kernel path does \
                         not reassemble"
                    }
                    "conntrack_full" | "snat_ports_exhausted" => {
                        "the conntrack table or the SNAT ports were full"
                    }
                    _ => "see Reasons in README.md",
                };
                lines.push(format!(
                    "{name}: {} left to the relay (reason {reason}): {why}",
                    flows(left, protocol)
                ));
            }
        }
        if let Some(r) = find(&doc["relay"], alias, protocol) {
            let b = n(&r["bytes_to_backend"]) + n(&r["bytes_to_client"]);
            relay_bytes += b;
            if n(&r["flows"]) > 0 {
                lines.push(format!(
                    "{name}: {} by the relay, {}; a flow keeps the path it started on, so \
                     its later small datagrams stayed there too",
                    flows(n(&r["flows"]), protocol),
                    bytes(b as f64)
                ));
            }
        }
    }
    let total = kernel_bytes + relay_bytes;
    if total > 0 {
        lines.push(format!(
            "in all: {} of {} ({:.2}%) went by the kernel path, {} by the relay",
            bytes(kernel_bytes as f64),
            bytes(total as f64),
            kernel_bytes as f64 * 100.0 / total as f64,
            bytes(relay_bytes as f64)
        ));
    }
    Explanation {
        lines,
        kernel_and_relay: kernel_flows > 0 && fell_back > 0 && relay_bytes > 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(fallback_other: u64, relay_flows: u64) -> Value {
        json!({
            "kernel_path": true,
            "rules": [
                {"alias": "turn-tcp", "protocol": "tcp"},
                {"alias": "turn-udp", "protocol": "udp"}
            ],
            "kernel": {"rules": [
                {"alias": "turn-tcp", "protocol": "tcp", "flows": 1, "bytes_fwd": 3u64 << 30,
                 "bytes_rev": 0, "packets_fwd": 2_000_000, "packets_rev": 1_000_000,
                 "fallback_full": 0, "fallback_other": 0},
                {"alias": "turn-udp", "protocol": "udp", "flows": 1, "bytes_fwd": 6_000_000,
                 "bytes_rev": 6_000_000, "packets_fwd": 5000, "packets_rev": 5000,
                 "fallback_full": 0, "fallback_other": fallback_other,
                 "fallbacks": if fallback_other > 0 { json!({"fragment": fallback_other}) } else { json!({}) }}
            ]},
            "relay": [
                {"alias": "turn-tcp", "protocol": "tcp", "flows": 0, "bytes_to_backend": 0,
                 "bytes_to_client": 0},
                {"alias": "turn-udp", "protocol": "udp", "flows": relay_flows,
                 "bytes_to_backend": 8000 * relay_flows, "bytes_to_client": 8000 * relay_flows}
            ]
        })
    }

    #[test]
    fn the_explanation_names_each_path_and_why_the_relay_got_its_flow() {
        let e = explain(&doc(1, 1));
        let text = e.lines.join("\n");
        assert!(e.kernel_and_relay, "{text}");
        assert!(
            text.contains(
                "turn-tcp (tcp): 1 connection by the kernel path, 3.00 GiB in 3.00M packets"
            ),
            "{text}"
        );
        assert!(
            text.contains("turn-udp (udp): 1 flow left to the relay (reason fragment)"),
            "{text}"
        );
        assert!(
            text.contains("turn-udp (udp): 1 flow by the relay, 15.6 KiB"),
            "{text}"
        );
        assert!(text.contains("went by the kernel path"), "{text}");
    }

    #[test]
    fn explanations_wrap_at_spaces() {
        let line = "a ".repeat(60) + "end";
        let text = wrapped(&line, 20);
        assert!(text.lines().all(|l| l.len() <= 20), "{text}");
        assert!(text.starts_with("  a a"), "{text}");
        assert!(
            text.lines()
                .skip(1)
                .all(|l| l.starts_with("    a") || l.starts_with("    end")),
            "{text}"
        );
        assert_eq!(text.split_whitespace().count(), 61);
        assert_eq!(wrapped("short", 100), "  short");
    }

    #[test]
    fn without_a_fallback_the_demo_has_not_shown_its_point() {
        assert!(!explain(&doc(0, 0)).kernel_and_relay);
        assert!(!explain(&json!({"kernel_path": false})).kernel_and_relay);
    }
}
