//! `cargo xtask bench`: forwarder against direct routing, nftables, nginx
//! stream, HAProxy and socat, with the same traffic through the same
//! client / forwarder / backend namespaces, one contender after the other.
mod configs;
mod connrate;
mod contenders;
mod cpu;
mod forwarder;
mod iperf;
mod lab;
mod measure;
#[path = "../../../tests/common/netns.rs"]
mod netns;
mod pin;
mod procs;
mod report;
mod rss;
mod sockperf;
mod stats;
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use self::contenders::{ALL, Contender, Started};
use self::measure::{Figure, Measure, Note, Samples, Traffic};
use crate::{build, cmd, setup, workspace_root};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Contenders, comma-separated: direct, nftables, nginx, haproxy, socat,
    /// relay, tc, xdp (default: all). Direct routing always runs: every
    /// ratio is to it.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Measures, comma-separated: tcp, udp, latency, connect (default: all).
    #[arg(long, value_delimiter = ',')]
    measures: Vec<String>,
    /// Seconds of each iperf3, sockperf and connection run.
    #[arg(short = 't', long, default_value_t = 5)]
    seconds: u64,
    /// Runs of everything; the report shows each figure's median.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// At most this many connections in the connection-rate run.
    #[arg(long, default_value_t = 100_000)]
    connections: u64,
}

/// Picks contenders by name, in the report's order, direct routing first.
fn select(names: &[String]) -> Result<Vec<&'static Contender>> {
    for name in names {
        if !ALL.iter().any(|c| c.name == name.trim()) {
            let allowed: Vec<_> = ALL.iter().map(|c| c.name).collect();
            bail!(
                "--only: unknown contender `{name}`; allowed: {}",
                allowed.join(", ")
            );
        }
    }
    Ok(ALL
        .iter()
        .filter(|c| {
            names.is_empty() || c.name == "direct" || names.iter().any(|n| n.trim() == c.name)
        })
        .collect())
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.seconds == 0 || args.repeat == 0 {
        bail!("--seconds and --repeat must be at least 1");
    }
    let contenders = select(&args.only)?;
    let measures = measure::select(&args.measures)?;
    if !netns::require_root("cargo xtask bench") {
        bail!("cargo xtask bench needs root: it creates network namespaces");
    }
    procs::install_signal_handlers();
    let mut packages = vec!["iproute2", "ethtool", "iperf3", "sockperf"];
    packages.extend(contenders.iter().flat_map(|c| c.packages));
    tools::ensure(&packages)?;
    let forwarder_bin = if contenders.iter().any(|c| c.is_forwarder()) {
        setup::run()?;
        Some(build::daemon()?)
    } else {
        None
    };
    let dir = procs::TempDir::new()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut samples: Vec<Samples> = vec![Samples::default(); contenders.len()];
    for round in 1..=args.repeat {
        for (c, s) in contenders.iter().zip(&mut samples) {
            eprintln!("bench: [{round}/{}] {}", args.repeat, c.label);
            run_contender(c, &args, &measures, &dir.path, forwarder_bin.as_deref(), s)?;
        }
    }
    let rows: Vec<report::Row> = contenders
        .iter()
        .zip(samples)
        .map(|(c, samples)| report::Row {
            name: c.name,
            label: c.label,
            samples,
        })
        .collect();
    let mut figures: Vec<Figure> = measures.iter().flat_map(|m| m.figures()).copied().collect();
    figures.push(Figure::RssMib);
    let baseline = rows.iter().find(|r| r.name == "direct");
    let text = format!(
        "# forwarder bench\n\n{}\n{}\n## Targets\n\n{}\n{}",
        machine(&args, load.trim()),
        report::table(&rows, &figures, baseline),
        report::targets(&rows),
        EXPLANATION
    );
    println!("\n{text}");
    let path = write_results(&text)?;
    eprintln!("bench: written to {}", path.display());
    Ok(())
}

/// One run of one contender: a fresh lab, the contender, every measure.
/// Only Ctrl-C is an error; a contender that fails gets notes instead.
fn run_contender(
    c: &Contender,
    args: &BenchArgs,
    measures: &[Measure],
    dir: &Path,
    forwarder_bin: Option<&Path>,
    samples: &mut Samples,
) -> Result<()> {
    let all: Vec<Figure> = measures
        .iter()
        .flat_map(|m| m.figures())
        .copied()
        .chain([Figure::RssMib])
        .collect();
    let lab = lab::Lab::new(dir, c.ip_forward)?;
    let mut running = match contenders::start(c, &lab, dir, forwarder_bin) {
        Ok(Started::Running(r)) => r,
        Ok(Started::Unavailable(why)) => {
            samples.note_all(&all, &Note::NotApplicable(why));
            return Ok(());
        }
        Err(e) => {
            procs::check_interrupted()?;
            samples.note_all(&all, &Note::Failed(format!("{e:#}")));
            return Ok(());
        }
    };
    let rss = if running.procs.is_empty() {
        samples.record(
            Figure::RssMib,
            Err(Note::NotApplicable("no process forwards".into())),
        );
        None
    } else {
        Some(rss::RssSampler::start(&lab.topo.forwarder.name)?)
    };
    let traffic = Traffic {
        client: &lab.topo.client,
        target: running.target,
        seconds: args.seconds,
        max_connections: args.connections,
        no_udp: c.no_udp,
    };
    for &m in measures {
        if let Err(e) = running.check_alive() {
            samples.note_all(m.figures(), &Note::Failed(format!("{e:#}")));
            continue;
        }
        for (figure, outcome) in measure::run(m, &traffic)? {
            samples.record(figure, outcome);
        }
        procs::sleep(Duration::from_millis(300))?;
    }
    if let Some(rss) = rss {
        samples.record(Figure::RssMib, Ok(rss.peak_kib() as f64 / 1024.0));
    }
    Ok(())
}

const EXPLANATION: &str = "
## What the figures are

- Each contender runs in fresh namespaces: client 198.18.1.2 - forwarder
  198.18.1.1 | 198.18.2.1 - backend 198.18.2.2, veth links with GRO on at the
  client's and backend's ends (so XDP redirects arrive, as on a NIC).
- Every figure is the median over `--repeat` runs; the ratio in brackets is to
  direct routing's figure (for time and memory, lower is better).
- TCP Gbit/s: one iperf3 stream for the run's seconds, as the receiver counted.
- UDP 64 B kpps: iperf3 `-u -l 64 -b 0`; datagrams the receiver got per second
  (sent minus lost).
- CPU ns/seg, ns/pkt: busy time of the whole machine (/proc/stat: user, nice,
  system, irq, softirq, steal) over the iperf3 run, divided by the UDP datagrams
  received, or for TCP by the bytes received over 1448 (one 1500-byte-MTU
  segment). Sender, forwarder and receiver share the cores, so this is what
  forwarding one packet cost in total; other load on the machine adds to it.
- RTT: sockperf ping-pong, 64-byte messages, one in flight, round-trip times.
- TCP conn/s: connections opened from the client, answered by the backend with
  one byte and closed; each counted once the client read the byte and the
  close. Two client threads, bounded by `--connections` and the run's seconds.
- RSS MiB: the peak of the summed VmRSS of every process in the forwarder
  namespace (the daemon, nginx's master and workers, HAProxy, socat and its
  forks), sampled every 200 ms while the contender ran.
";

/// Machine, load and options, so that two reports can be compared.
fn machine(args: &BenchArgs, load: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let commit = cmd::output(
        Command::new("git")
            .current_dir(workspace_root())
            .args(["describe", "--always", "--dirty"]),
    )
    .unwrap_or_default();
    format!(
        "- machine: {cpu}, {cores} cores, kernel {}\n- commit: {}\n- load average before: {load}\n\
         - {} s per run, {} run(s), at most {} connections\n",
        kernel.trim(),
        commit.trim(),
        args.seconds,
        args.repeat,
        args.connections
    )
}

fn write_results(text: &str) -> Result<PathBuf> {
    let dir = workspace_root().join("bench-results");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = dir.join(format!("{}.md", report::timestamp(now)));
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}
