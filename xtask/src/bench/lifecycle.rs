//! `cargo xtask bench --lifecycle`: what a reload and an upgrade in place
//! cost. The daemon runs 4,000 kernel-path rules (2,000 `tcp,udp` aliases) plus one UDP rule that
//! carries an echoed stream of numbered datagrams at a fixed rate; the
//! figures are the wall time of `forwarder reload` (every rule changed,
//! then nothing changed) and of `forwarder upgrade` (the new binary's check,
//! the relay's freeze, the exec, the new image up and answering), and the
//! datagrams the stream lost in a window with a reload or an upgrade against
//! an equal window without one.
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::datagrams::{
    BATCH, Batch, ahead_of_the_daemon, big_buffers, echo_server, rcvbuf_errors, spawn_in,
};
use super::netns::Topology;
use super::procs::{self, Proc};

/// Rules in the table: this many `tcp,udp` aliases, two rules each.
const ALIASES: u16 = 2000;
const FIRST_PORT: u16 = 20000;
const STREAM_PORT: u16 = 19999;
const ECHO_PORT: u16 = 9000;
/// Datagrams per second of the stream: one rate these two cores carry
/// without loss, so that a loss is the reload's, and the 100k/s.
const RATES: [u64; 2] = [20_000, 100_000];
/// One window of the stream.
const WINDOW: Duration = Duration::from_secs(3);

fn rules(backend: Ipv4Addr, target: u16) -> String {
    let mut yaml = format!(
        "routes:\n  stream: {{scheme: udp, host: {backend}, port: {STREAM_PORT}:{ECHO_PORT}}}\n"
    );
    for i in 0..ALIASES {
        yaml.push_str(&format!(
            "  r{i}: {{scheme: \"tcp,udp\", host: {backend}, port: {}:{target}}}\n",
            FIRST_PORT + i
        ));
    }
    yaml
}

/// One window of the stream, and where its losses were.
struct Window {
    sent: u64,
    echoed: u64,
    /// Datagrams that reached the echo server.
    reached: u64,
    /// Datagrams full socket buffers dropped in the client's and the
    /// backend's namespaces: the bench's own, not the forwarder's.
    socket_drops: u64,
    took: Option<Duration>,
}

impl Window {
    fn row(&self, rate: u64, what: &str) -> String {
        format!(
            "| {rate} | {what} | {} of {} | {} | {} |\n",
            self.sent - self.echoed,
            self.sent,
            self.sent - self.reached,
            self.socket_drops
        )
    }
}

/// Sends numbered datagrams to `to` at `rate` for [`WINDOW`], in batches
/// of a millisecond's worth, counting the echoes. `during` runs once, a
/// third in.
fn stream(
    topo: &Topology,
    to: SocketAddr,
    rate: u64,
    reached: &AtomicU64,
    during: impl FnOnce() -> Result<Duration> + Send + 'static,
) -> Result<Window> {
    let socket = spawn_in(&topo.client, move || -> Result<UdpSocket> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(to)?;
        big_buffers(&s);
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("socket thread panicked"))???;
    let drops_before = rcvbuf_errors(&topo.client)? + rcvbuf_errors(&topo.backend)?;
    let reached_before = reached.load(Ordering::Relaxed);
    let receiver = socket.try_clone()?;
    receiver.set_read_timeout(Some(Duration::from_millis(100)))?;
    let done = Arc::new(AtomicBool::new(false));
    let counting = {
        let done = done.clone();
        std::thread::spawn(move || {
            ahead_of_the_daemon();
            let total = (rate * WINDOW.as_secs()) as usize;
            let mut seen = vec![false; total];
            let mut batch = Batch::default();
            while !done.load(Ordering::Relaxed) {
                for i in 0..batch.recv(&receiver) {
                    let Ok(seq) = <[u8; 8]>::try_from(batch.get(i)) else {
                        continue;
                    };
                    if let Some(s) = seen.get_mut(u64::from_be_bytes(seq) as usize) {
                        *s = true;
                    }
                }
            }
            seen.iter().filter(|s| **s).count() as u64
        })
    };
    let reload = std::thread::spawn(move || {
        std::thread::sleep(WINDOW / 3);
        during()
    });
    let start = Instant::now();
    let total = rate * WINDOW.as_secs();
    let per_ms = rate / 1000;
    let mut batch = Batch::default();
    let mut sent = 0u64;
    while sent < total {
        let tick = sent + per_ms;
        while sent < tick {
            let n = (tick - sent).min(BATCH as u64) as usize;
            for i in 0..n {
                batch.set(i, &(sent + i as u64).to_be_bytes());
            }
            // Counted as sent either way: a datagram the client's own
            // stack refused is a loss of the window too.
            batch.send(&socket, n, false);
            sent += n as u64;
        }
        let due = start + Duration::from_micros(sent * 1_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let took = reload
        .join()
        .map_err(|_| anyhow::anyhow!("the reload thread panicked"))??;
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    let echoed = counting
        .join()
        .map_err(|_| anyhow::anyhow!("the counting thread panicked"))?;
    let drops_after = rcvbuf_errors(&topo.client)? + rcvbuf_errors(&topo.backend)?;
    Ok(Window {
        sent,
        echoed,
        reached: reached.load(Ordering::Relaxed) - reached_before,
        socket_drops: drops_after - drops_before,
        took: (took > Duration::ZERO).then_some(took),
    })
}

/// `forwarder reload`, timed.
fn reload(bin: &Path, socket: &Path) -> Result<Duration> {
    let start = Instant::now();
    let out = Command::new(bin)
        .arg("reload")
        .arg("--control")
        .arg(socket)
        .output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "forwarder reload failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "  {} in {} ms",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or(""),
        took.as_millis()
    );
    Ok(took)
}

/// `forwarder upgrade`, timed; also returns how long the relay was frozen,
/// as the new image measured it.
fn upgrade(bin: &Path, socket: &Path) -> Result<(Duration, u64)> {
    let start = Instant::now();
    let out = Command::new(bin)
        .arg("upgrade")
        .arg("--control")
        .arg(socket)
        .output()?;
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "forwarder upgrade failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout.lines().next().unwrap_or("");
    eprintln!("  {line} ({} ms in all)", took.as_millis());
    let frozen = line
        .split("frozen for ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .with_context(|| format!("no freeze time in {line:?}"))?;
    Ok((took, frozen))
}

pub fn run(bin: &Path, dir: &Path) -> Result<String> {
    let topo = Topology::new();
    topo.forwarder.sysctl("net.ipv4.ip_forward", "1");
    let backend = topo.backend_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let reached = Arc::new(AtomicU64::new(0));
    let echo = echo_server(&topo.backend, ECHO_PORT, stop.clone(), reached.clone());
    let config = dir.join("lifecycle.yaml");
    let socket = dir.join("lifecycle.sock");
    std::fs::write(&config, rules(backend, 9001))?;
    let mut cmd = topo.forwarder.command(&bin.display().to_string());
    cmd.arg("run")
        .arg("-c")
        .arg(&config)
        .arg("--control")
        .arg(&socket);
    let started = Instant::now();
    let mut daemon = Proc::spawn(&mut cmd, "forwarder", &dir.join("lifecycle.log"))?;
    while Command::new(bin)
        .arg("status")
        .arg("--json")
        .arg("--control")
        .arg(&socket)
        .output()
        .map_or(true, |o| !o.status.success())
    {
        daemon.check_alive()?;
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the daemon did not answer in 60 s");
        }
        procs::sleep(Duration::from_millis(50))?;
    }
    let start_time = started.elapsed();
    eprintln!(
        "bench: lifecycle, {} rules up in {} ms",
        2 * ALIASES + 1,
        start_time.as_millis()
    );
    let to = SocketAddr::from((topo.forwarder_addr(), STREAM_PORT));
    // Warm up the stream's flow (neighbours, conntrack).
    stream(&topo, to, RATES[0], &reached, || Ok(Duration::ZERO))?;
    let mut rows = String::new();
    let mut changed_ms = Vec::new();
    let mut unchanged_ms = Vec::new();
    let upgrades = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut target = 9001;
    for rate in RATES {
        let window = stream(&topo, to, rate, &reached, || Ok(Duration::ZERO))?;
        rows.push_str(&window.row(rate, "no reload"));
        target += 1;
        std::fs::write(&config, rules(backend, target))?;
        let (bin2, socket2) = (bin.to_path_buf(), socket.clone());
        let window = stream(&topo, to, rate, &reached, move || reload(&bin2, &socket2))?;
        changed_ms.extend(window.took);
        rows.push_str(&window.row(rate, &format!("reload, {} rules changed", 2 * ALIASES)));
        let (bin3, socket3) = (bin.to_path_buf(), socket.clone());
        let window = stream(&topo, to, rate, &reached, move || reload(&bin3, &socket3))?;
        unchanged_ms.extend(window.took);
        rows.push_str(&window.row(rate, "reload, nothing changed"));
        let (bin4, socket4, seen) = (bin.to_path_buf(), socket.clone(), upgrades.clone());
        let window = stream(&topo, to, rate, &reached, move || {
            let (took, frozen) = upgrade(&bin4, &socket4)?;
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((took, frozen));
            Ok(took)
        })?;
        rows.push_str(&window.row(rate, "upgrade in place (`forwarder upgrade`)"));
    }
    daemon.check_alive()?;
    drop(daemon);
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    let ms = |all: &[Duration]| {
        all.iter()
            .map(|d| d.as_millis().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rules = 2 * u32::from(ALIASES) + 1;
    let upgrades = upgrades.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let upgrade_ms: Vec<Duration> = upgrades.iter().map(|(took, _)| *took).collect();
    let frozen_ms: Vec<String> = upgrades.iter().map(|(_, f)| f.to_string()).collect();
    Ok(format!(
        "## Lifecycle\n\n\
         {rules} kernel-path rules ({ALIASES} `tcp,udp` aliases and one UDP rule); a UDP \
         stream of numbered datagrams echoed through the one rule no reload touches, {} s \
         per window, the reload a third into it.\n\n\
         | figure | ms |\n|---|---:|\n\
         | daemon start to first status | {} |\n\
         | `forwarder reload`, {} rules changed | {} |\n\
         | `forwarder reload`, nothing changed | {} |\n\
         | `forwarder upgrade` (check, freeze, exec, new image answering) | {} |\n\
         | of which the relay was frozen (freeze to the new image's relay running) | {} |\n\n\
         Lost: sent and not echoed back. Of those, \"not at the backend\" never reached the \
         echo server, and \"socket drops\" are what full socket buffers of the bench's own \
         client and echo server dropped (`RcvbufErrors`), not the forwarder.\n\n\
         | datagrams/s | window | lost | not at the backend | socket drops |\n\
         |---:|---|---:|---:|---:|\n{rows}",
        WINDOW.as_secs(),
        start_time.as_millis(),
        2 * ALIASES,
        ms(&changed_ms),
        ms(&unchanged_ms),
        ms(&upgrade_ms),
        frozen_ms.join(", "),
    ))
}
