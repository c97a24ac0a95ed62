//! `cargo xtask bench`: forwarder against direct routing, nftables, nginx
//! stream, HAProxy and socat, with the same traffic through the same
//! client / forwarder / backend namespaces, one contender after the other.
mod configs;
mod connrate;
mod contenders;
mod cpu;
mod datagrams;
mod forwarder;
mod iperf;
mod lab;
mod lifecycle;
mod lookup;
mod measure;
#[path = "../../../tests/common/netns.rs"]
pub mod netns;
mod pin;
pub mod procs;
mod report;
mod results;
mod rss;
mod scale;
mod sockperf;
mod stats;
mod sweep;
mod tools;

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};

use self::contenders::{ALL, Contender, Started};
use self::measure::{Figure, Measure, Note, Samples, Traffic};
use crate::{build, setup};

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
    /// At most this many connections in the connection-rate run. The
    /// default stays under the kernel path's 20,000 SNAT ports: its
    /// backend closes first, so each port is held through the backend's
    /// 60 s TIME_WAIT, and more would spill to the relay (and void the
    /// kernel rows' figure).
    #[arg(long, default_value_t = 15_000)]
    connections: u64,
    /// Only the lifecycle figures: reload and upgrade time with 4,000
    /// rules, and the datagrams a 100k/s UDP stream loses during each.
    #[arg(long)]
    lifecycle: bool,
    /// Only the scale figures: start time, RSS idle and under load, status
    /// time, fds and UDP kpps through the kernel path at 10, 1,000 and
    /// 10,000 rules, then the sweeper's figures (as `--sweep`).
    #[arg(long)]
    scale: bool,
    /// Only the rule lookup's cost: ns per packet of the TC program with
    /// 10 and 10,000 rules and a 16,384-port range (`BPF_PROG_TEST_RUN`),
    /// and UDP kpps of 2,048 flows through the kernel path at 10 and 10,000
    /// rules; `--repeat` rounds of each.
    #[arg(long, conflicts_with_all = ["lifecycle", "scale", "sweep"])]
    lookup: bool,
    /// Only the conntrack sweeper's CPU with 10k, 250k and 1M idle flows
    /// written into the table.
    #[arg(long)]
    sweep: bool,
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
    if args.lifecycle || args.sweep {
        tools::ensure(&["iproute2"])?;
        setup::run()?;
        let bin = build::daemon()?;
        let dir = procs::TempDir::new()?;
        let text = if args.sweep {
            sweep::run(&bin, &dir.path)?
        } else {
            lifecycle::run(&bin, &dir.path)?
        };
        println!("\n{text}");
        let path = results::write(&text)?;
        eprintln!("bench: written to {}", path.display());
        return Ok(());
    }
    if args.lookup {
        tools::ensure(&["iproute2", "ethtool", "iperf3", "sockperf"])?;
        setup::run()?;
        let bin = build::daemon()?;
        let dir = procs::TempDir::new()?;
        let text = lookup::run(&bin, &dir.path, args.seconds, args.repeat)?;
        println!("\n{text}");
        let path = results::write(&text)?;
        eprintln!("bench: written to {}", path.display());
        return Ok(());
    }
    if args.scale {
        tools::ensure(&["iproute2", "ethtool", "iperf3", "sockperf"])?;
        setup::run()?;
        let bin = build::daemon()?;
        let dir = procs::TempDir::new()?;
        let mut text = scale::run(&bin, &dir.path, args.seconds, args.repeat)?;
        text.push('\n');
        text.push_str(&sweep::run(&bin, &dir.path)?);
        println!("\n{text}");
        let path = results::write(&text)?;
        eprintln!("bench: written to {}", path.display());
        return Ok(());
    }
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
    let options = format!(
        "{} s per run, {} run(s), at most {} connections",
        args.seconds, args.repeat, args.connections
    );
    let text = results::document(&rows, &figures, &options, load.trim());
    println!("\n{text}");
    let path = results::write(&text)?;
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
        let watch = running.kernel_watch.as_ref();
        for (figure, outcome) in forwarder::on_kernel_path(watch, || measure::run(m, &traffic))? {
            progress(figure, &outcome);
            samples.record(figure, outcome);
        }
        procs::sleep(Duration::from_millis(300))?;
    }
    if let Some(rss) = rss {
        let dropped = running.kernel_watch.as_ref().and_then(|w| w.dropped());
        let mib = match dropped {
            Some(why) => Err(Note::NotApplicable(why)),
            None => Ok(rss.peak_kib() as f64 / 1024.0),
        };
        progress(Figure::RssMib, &mib);
        samples.record(Figure::RssMib, mib);
    }
    Ok(())
}

/// One figure of this run, as it comes.
fn progress(figure: Figure, outcome: &Result<f64, Note>) {
    let text = match outcome {
        Ok(v) => format!("{v:.*}", figure.decimals()),
        Err(note) => note.text(),
    };
    eprintln!("  {}: {text}", figure.header());
}
