//! `cargo xtask bench --sweep`: the conntrack sweeper's CPU with 10k, 250k
//! and 1M idle flows in the table, in one run, so that the figures show
//! whether its cost grows with the table. The flows are written straight
//! into the running daemon's map: established TCP flows idle a minute, the
//! costliest kind to judge (each pass looks up the pair of each), none due
//! to expire (tcp_established is two hours).
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use forwarder_common::PROTO_TCP;

use super::netns::Topology;
use super::procs::{self, Proc};

#[path = "../../../tests/common/conntrack.rs"]
mod conntrack;

/// Flows in the table at each measure, in order (the table only grows).
const FLOWS: [u32; 3] = [10_000, 250_000, 1_000_000];
/// Entries of the map: 1M flows, two entries each.
const CONNTRACK_SIZE: u32 = 2_097_152;
/// Each measure's window.
const WINDOW: Duration = Duration::from_secs(30);
/// No rule has this id: its flows live by the default timeouts.
const RULE_ID: u32 = 4000;

fn status(bin: &Path, socket: &Path) -> Result<serde_json::Value> {
    let out = Command::new(bin)
        .args(["status", "--json", "--control"])
        .arg(socket)
        .output()?;
    if !out.status.success() {
        bail!("forwarder status: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn kernel_u64(status: &serde_json::Value, field: &str) -> Result<u64> {
    status["kernel"][field]
        .as_u64()
        .with_context(|| format!("the status has no kernel.{field}"))
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis, from `state` (3rd).
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// Waits until the sweeper ends a pass; returns when it saw that.
fn pass_end(bin: &Path, socket: &Path, daemon: &mut Proc) -> Result<Instant> {
    let first = kernel_u64(&status(bin, socket)?, "sweeper_passes")?;
    let started = Instant::now();
    while kernel_u64(&status(bin, socket)?, "sweeper_passes")? == first {
        daemon.check_alive()?;
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the sweeper ended no pass in 120 s");
        }
        procs::sleep(Duration::from_millis(100))?;
    }
    Ok(Instant::now())
}

pub fn run(bin: &Path, dir: &Path) -> Result<String> {
    let topo = Topology::new();
    topo.forwarder.sysctl("net.ipv4.ip_forward", "1");
    let config = dir.join("sweep.yaml");
    let socket = dir.join("sweep.sock");
    std::fs::write(
        &config,
        format!(
            "kernel: {{conntrack_size: {CONNTRACK_SIZE}}}\n\
             routes:\n  one: {{scheme: udp, host: {}, port: 7000:7000}}\n",
            topo.backend_addr()
        ),
    )?;
    let mut cmd = topo.forwarder.command(&bin.display().to_string());
    cmd.arg("run")
        .arg("-c")
        .arg(&config)
        .arg("--control")
        .arg(&socket);
    let mut daemon = Proc::spawn(&mut cmd, "forwarder", &dir.join("sweep.log"))?;
    let started = Instant::now();
    while status(bin, &socket).is_err() {
        daemon.check_alive()?;
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the daemon did not answer in 60 s");
        }
        procs::sleep(Duration::from_millis(50))?;
    }
    let (mut map, info) = conntrack::conntrack(daemon.pid()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut rows = String::new();
    let mut written = 0;
    for flows in FLOWS {
        let last = conntrack::monotonic_ns() - 60_000_000_000;
        let fill = Instant::now();
        for n in written..flows {
            for (key, value) in conntrack::flow_pair(n, PROTO_TCP, RULE_ID, last, last) {
                map.insert(key, value, 0)
                    .with_context(|| format!("writing flow {n}"))?;
            }
        }
        written = flows;
        eprintln!(
            "bench: sweep, {flows} flows written in {} ms",
            fill.elapsed().as_millis()
        );
        // A whole pass over the new table before the window; how long
        // the next one takes, from end to end.
        pass_end(bin, &socket, &mut daemon)?;
        let begun = pass_end(bin, &socket, &mut daemon)?;
        let pass = pass_end(bin, &socket, &mut daemon)? - begun;
        let s0 = status(bin, &socket)?;
        let cpu0 = cpu_seconds(daemon.pid())?;
        let t0 = Instant::now();
        procs::sleep(WINDOW)?;
        let cpu1 = cpu_seconds(daemon.pid())?;
        let s1 = status(bin, &socket)?;
        let secs = t0.elapsed().as_secs_f64();
        daemon.check_alive()?;
        let entries = kernel_u64(&s1, "conntrack_entries")?;
        if entries != 2 * u64::from(flows) {
            bail!("the sweeper counts {entries} entries, not {}", 2 * flows);
        }
        let sweeper_ns =
            kernel_u64(&s1, "sweeper_passes_ns")? - kernel_u64(&s0, "sweeper_passes_ns")?;
        let passes = kernel_u64(&s1, "sweeper_passes")? - kernel_u64(&s0, "sweeper_passes")?;
        let row = format!(
            "| {flows} | {entries} | {:.2} | {:.1} | {passes} | {:.1} |\n",
            100.0 * (cpu1 - cpu0) / secs,
            sweeper_ns as f64 / 1e6 / secs,
            pass.as_secs_f64(),
        );
        eprint!("bench: sweep {row}");
        rows.push_str(&row);
    }
    daemon.check_alive()?;
    drop(daemon);
    Ok(format!(
        "## Conntrack sweeper\n\n\
         Idle established TCP flows written into the map of a daemon with \
         `conntrack_size: {CONNTRACK_SIZE}` (its memlock: {} bytes, {:.1} per entry), no \
         traffic; {} s windows. CPU is the daemon's utime+stime; sweeper time is its own \
         measure of its ticks' wall time (inflated on a busy machine); a pass is timed \
         end to end before the window.\n\n\
         | flows | entries | daemon CPU % | sweeper wall ms/s | passes in the window | one pass, s |\n\
         |---:|---:|---:|---:|---:|---:|\n{rows}",
        info.memlock,
        info.memlock as f64 / f64::from(info.max_entries),
        WINDOW.as_secs(),
    ))
}
