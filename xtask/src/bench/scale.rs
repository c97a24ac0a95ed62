//! `cargo xtask bench --scale`: the daemon with 10, 1,000 and 10,000
//! rules, each in a fresh lab. Per table size: start to first status,
//! resident memory idle and under a light load (echoed UDP through the
//! first, middle and last rules on the kernel path and through one relay
//! rule, with a status query), the time of one status, the open fds, and
//! the UDP packet rate through the kernel path (iperf3, 64-byte datagrams,
//! one flow through one rule) so that 10 and 10,000 rules compare in one run.
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::datagrams::{echo_server, spawn_in};
use super::forwarder::{kernel_path_off, query, relay_flows};
use super::lab::Lab;
use super::netns::Netns;
use super::procs::{self, Proc};
use super::rss::{RssSampler, parse_vm_rss};
use super::{iperf, stats};

/// Rules in the table of each run.
const SIZES: [u32; 3] = [10, 1_000, 10_000];
const ECHO_PORT: u16 = 9000;
const RELAY_PORT: u16 = 19_998;
const FIRST_PORT: u16 = 20_000;
/// Datagrams echoed through each loaded rule.
const ECHOES: u32 = 2_000;

/// A table of `total` rules: iperf3's port (`tcp,udp`), one UDP rule the
/// relay carries, and filler `tcp,udp` aliases (one UDP-only for an odd
/// remainder) on ports from [`FIRST_PORT`] to the backend's echo.
pub fn rules(backend: Ipv4Addr, total: u32) -> String {
    let p = iperf::PORT;
    let mut yaml = format!(
        "# Written by `cargo xtask bench --scale`.\nroutes:\n\
         \x20 bench-iperf: {{scheme: \"tcp,udp\", host: {backend}, port: {p}:{p}}}\n\
         \x20 relayed: {{scheme: udp, host: {backend}, port: {RELAY_PORT}:{ECHO_PORT}, path: relay}}\n"
    );
    let fillers = total - 3;
    for i in 0..fillers.div_ceil(2) {
        let scheme = if 2 * i + 1 < fillers {
            "tcp,udp"
        } else {
            "udp"
        };
        yaml.push_str(&format!(
            "  r{i}: {{scheme: \"{scheme}\", host: {backend}, port: {}:{ECHO_PORT}}}\n",
            u32::from(FIRST_PORT) + i
        ));
    }
    yaml
}

/// Every filler port of a `total`-rule table (each has a UDP rule).
pub fn udp_filler_ports(total: u32) -> Vec<u16> {
    (0..(total - 3).div_ceil(2))
        .map(|i| FIRST_PORT + i as u16)
        .collect()
}

/// The filler ports of a `total`-rule table: first, middle, last.
fn spread(total: u32) -> [u16; 3] {
    let aliases = (total - 3).div_ceil(2);
    [0, aliases / 2, aliases - 1].map(|i| FIRST_PORT + i as u16)
}

struct Row {
    rules: u32,
    start_ms: u128,
    idle_kib: u64,
    load_kib: u64,
    status_ms: u128,
    open_fds: u64,
    kpps: Result<f64, String>,
}

fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&status).context("no VmRSS")
}

/// Echoes [`ECHOES`] numbered datagrams through `to`, one at a time;
/// returns how many came back.
fn echo_through(client: &Netns, to: SocketAddr) -> Result<u32> {
    spawn_in(client, move || -> Result<u32> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(to)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut back = 0;
        let mut buf = [0u8; 16];
        for n in 0..ECHOES {
            s.send(&n.to_be_bytes())?;
            if let Ok(4) = s.recv(&mut buf) {
                back += 1;
            }
        }
        Ok(back)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??
}

fn one(bin: &Path, dir: &Path, total: u32, seconds: u64) -> Result<Row> {
    let lab = Lab::new(dir, true)?;
    let topo = &lab.topo;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = echo_server(
        &topo.backend,
        ECHO_PORT,
        stop.clone(),
        Arc::new(AtomicU64::new(0)),
    );
    let config = dir.join(format!("scale-{total}.yaml"));
    let socket = dir.join(format!("scale-{total}.sock"));
    let _ = std::fs::remove_file(&socket);
    std::fs::write(&config, rules(topo.backend_addr(), total))?;
    let mut cmd = topo.forwarder.command(&bin.display().to_string());
    cmd.arg("run")
        .arg("-c")
        .arg(&config)
        .arg("--control")
        .arg(&socket);
    let started = Instant::now();
    let mut daemon = Proc::spawn(
        &mut cmd,
        "forwarder",
        &dir.join(format!("scale-{total}.log")),
    )?;
    let status = loop {
        daemon.check_alive()?;
        if let Ok(status) = query(&socket) {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the daemon did not answer in 120 s");
        }
        procs::sleep(Duration::from_millis(20))?;
    };
    let start_ms = started.elapsed().as_millis();
    if let Some(off) = kernel_path_off(&status) {
        bail!("{total} rules: {off}");
    }
    let rules_seen = status["rules"].as_array().map_or(0, Vec::len);
    if rules_seen != total as usize {
        bail!("{total} rules asked, the daemon runs {rules_seen}");
    }
    procs::sleep(Duration::from_secs(2))?;
    let idle_kib = vm_rss_kib(daemon.pid())?;
    // Light load, with the memory sampled meanwhile.
    let sampler = RssSampler::start(&topo.forwarder.name)?;
    let relayed_before = relay_flows(&query(&socket)?)?;
    let listen = topo.forwarder_addr();
    for port in spread(total) {
        let back = echo_through(&topo.client, SocketAddr::from((listen, port)))?;
        if back != ECHOES {
            bail!("{total} rules: {back} of {ECHOES} echoes through port {port}");
        }
    }
    let relayed = echo_through(&topo.client, SocketAddr::from((listen, RELAY_PORT)))?;
    if relayed != ECHOES {
        bail!("{total} rules: {relayed} of {ECHOES} echoes through the relay");
    }
    let asked = Instant::now();
    let status = query(&socket)?;
    let status_ms = asked.elapsed().as_millis();
    let load_kib = sampler.peak_kib().max(vm_rss_kib(daemon.pid())?);
    let relayed_after = relay_flows(&status)?;
    if relayed_after != relayed_before + 1 {
        bail!(
            "{total} rules: the relay took {} flows, only the relay rule's 1 expected",
            relayed_after - relayed_before
        );
    }
    let open_fds = status["process"]["open_fds"]
        .as_u64()
        .context("the status has no process.open_fds")?;
    let kpps = iperf::udp(&topo.client, listen, seconds)
        .map_err(|e| format!("{e:#}"))
        .and_then(|r| {
            let after = query(&socket)
                .and_then(|s| relay_flows(&s))
                .map_err(|e| format!("{e:#}"))?;
            if after != relayed_after {
                return Err("the relay carried part of the flood".into());
            }
            Ok(r.per_second() / 1000.0)
        });
    daemon.check_alive()?;
    drop(daemon);
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    Ok(Row {
        rules: total,
        start_ms,
        idle_kib,
        load_kib,
        status_ms,
        open_fds,
        kpps,
    })
}

pub fn run(bin: &Path, dir: &Path, seconds: u64, repeat: u32) -> Result<String> {
    let mut rows: Vec<Vec<Row>> = SIZES.iter().map(|_| Vec::new()).collect();
    for round in 1..=repeat {
        for (i, &total) in SIZES.iter().enumerate() {
            eprintln!("bench: [{round}/{repeat}] scale, {total} rules");
            let row = one(bin, dir, total, seconds)?;
            eprintln!(
                "  start {} ms, RSS idle {:.1} MiB, under load {:.1} MiB, status {} ms, {} fds, {}",
                row.start_ms,
                row.idle_kib as f64 / 1024.0,
                row.load_kib as f64 / 1024.0,
                row.status_ms,
                row.open_fds,
                match &row.kpps {
                    Ok(k) => format!("{k:.0} kpps"),
                    Err(e) => e.clone(),
                }
            );
            rows[i].push(row);
        }
    }
    Ok(document(&rows, seconds, repeat))
}

fn median(v: Vec<f64>) -> Option<f64> {
    stats::median(&v)
}

fn document(rows: &[Vec<Row>], seconds: u64, repeat: u32) -> String {
    let kpps = |runs: &[Row]| median(runs.iter().filter_map(|r| r.kpps.clone().ok()).collect());
    let mut table = String::from(
        "| rules | start to first status, ms | RSS idle, MiB | RSS under light load, MiB | \
         one status, ms | open fds | UDP 64 B kpps, kernel path |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for runs in rows {
        let m = |f: &dyn Fn(&Row) -> f64| median(runs.iter().map(f).collect()).unwrap_or(f64::NAN);
        let rate = match kpps(runs) {
            Some(k) => format!("{k:.0}"),
            None => runs
                .iter()
                .find_map(|r| r.kpps.clone().err())
                .unwrap_or_default(),
        };
        table.push_str(&format!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} | {rate} |\n",
            runs.first().map_or(0, |r| r.rules),
            m(&|r| r.start_ms as f64),
            m(&|r| r.idle_kib as f64 / 1024.0),
            m(&|r| r.load_kib as f64 / 1024.0),
            m(&|r| r.status_ms as f64),
            m(&|r| r.open_fds as f64),
        ));
    }
    let ratio = match (kpps(&rows[0]), kpps(&rows[rows.len() - 1])) {
        (Some(few), Some(many)) => format!(
            "{many:.0} kpps with {} rules against {few:.0} kpps with {}: a ratio of {:.3}.",
            SIZES[SIZES.len() - 1],
            SIZES[0],
            many / few
        ),
        _ => "no ratio: a rate is missing.".into(),
    };
    format!(
        "## Scale\n\n\
         Each table size in a fresh lab; the median of {repeat} run(s). The rules are \
         iperf3's port (`tcp,udp`), one UDP rule on `path: relay`, and `tcp,udp` fillers to \
         the backend's UDP echo. Idle: VmRSS 2 s after the first status. Light load: the \
         peak while {ECHOES} datagrams are echoed one at a time through the first, middle \
         and last filler rules (kernel path) and through the relay rule, and one status is \
         asked. The packet rate: iperf3 `-u -l 64 -b 0` for {seconds} s, one flow through \
         one rule; a run where the relay took part of it has no rate. Established flows \
         match conntrack before any rule, so the table's size is paid once per new flow.\n\n\
         {table}\nRule lookup: {ratio}\n\n\
         Goals (issue 14): under 30 MiB at 1,000 rules and under 100 MiB at 10,000, idle \
         and under load.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(yaml: &str) -> u32 {
        yaml.lines()
            .filter(|l| l.contains("scheme:"))
            .map(|l| if l.contains("tcp,udp") { 2 } else { 1 })
            .sum()
    }

    #[test]
    fn every_size_gets_exactly_its_rules() {
        for total in [10, 11, 1_000, 10_000] {
            let yaml = rules(Ipv4Addr::new(10, 0, 0, 2), total);
            assert_eq!(count(&yaml), total, "{yaml}");
        }
    }

    #[test]
    fn the_loaded_rules_are_the_first_middle_and_last_fillers() {
        // 7 fillers: r0..r2 tcp,udp and r3 udp only.
        assert_eq!(spread(10), [20_000, 20_002, 20_003]);
        assert_eq!(spread(10_000), [20_000, 22_499, 24_998]);
        assert_eq!(udp_filler_ports(10), [20_000, 20_001, 20_002, 20_003]);
        assert_eq!(udp_filler_ports(10_000).len(), 4_999);
    }
}
