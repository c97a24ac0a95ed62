//! `forwarder`: TCP and UDP port forwarding in the kernel, with a relay under it.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use forwarder::control::{self, DEFAULT_SOCKET};
use forwarder::daemon::{self, RunError, RunOptions};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "forwarder",
    version,
    about = "TCP and UDP port forwarder with an eBPF kernel path"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon on a rule file (needs root for the kernel path).
    Run {
        /// The rule file.
        #[arg(short, long)]
        config: PathBuf,
        /// Forward in userspace only; load no BPF.
        #[arg(long)]
        relay_only: bool,
        /// Where `forwarder status` reaches this daemon.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        control: PathBuf,
    },
    /// Validate a rule file and print the compiled table (exit 2 if invalid).
    Check {
        /// The rule file.
        #[arg(short, long)]
        config: PathBuf,
        /// Add the routes of the running containers' labels, read from the
        /// Docker Engine of the file's `docker:` section (exit 2 if a
        /// container's labels are wrong, 1 if Docker cannot be reached).
        #[arg(long)]
        docker: bool,
    },
    /// Make the running daemon read its rule file again and apply the
    /// difference without losing a flow (exit 2 if the file is invalid).
    Reload {
        /// The daemon's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        control: PathBuf,
    },
    /// Make the running daemon re-execute its binary in place (same pid),
    /// handing over the kernel path, the relay's sockets and live flows,
    /// and its counters; as SIGUSR2 does. Exit 1 if it did not happen.
    Upgrade {
        /// The daemon's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        control: PathBuf,
    },
    /// Remove what a daemon that died (SIGKILL, crash) left on this host:
    /// its reserved ports and its control socket. Refuses while it runs.
    Cleanup {
        /// The dead daemon's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        control: PathBuf,
    },
    /// Print the rules of a running daemon with each path's counters and
    /// rates (over one second), then the totals.
    Status {
        /// The daemon's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        control: PathBuf,
        /// Print the raw JSON document instead (one sample, no rates).
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Refresh every SECS seconds (default 2): in place on a terminal,
        /// one block after the other otherwise. Ctrl-C ends it.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            config,
            docker: true,
        } => check_docker(&config),
        Command::Check { config, .. } => {
            // The file's warnings (ignored Godoxy fields, skipped web
            // routes) are part of the check's answer.
            init_logging("warn", false);
            match forwarder::config::load(&config) {
                Ok(compiled) => {
                    print!("{}", forwarder::config::table(&compiled));
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Status {
            control,
            json: true,
            ..
        } => match control::query(&control) {
            Ok(status) => {
                println!("{status}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("forwarder: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Status { control, watch, .. } => match status(&control, watch) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("forwarder: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Reload { control } => reload(&control),
        Command::Upgrade { control } => upgrade(&control),
        Command::Cleanup { control } => cleanup(&control),
        Command::Run {
            config,
            relay_only,
            control,
        } => {
            init_logging("info", true);
            forwarder::upgrade::remember_start_path();
            // Only the thread that runs the daemon takes its signals: it
            // unblocks them once its handlers are in, and an upgrade
            // blocks them again just before the exec.
            forwarder::upgrade::block_signals();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .on_thread_start(forwarder::upgrade::block_signals)
                .build();
            let runtime = match runtime {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("forwarder: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = RunOptions {
                config,
                relay_only,
                control,
            };
            match runtime.block_on(daemon::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(RunError::Config(errors)) => {
                    eprintln!("{errors}");
                    ExitCode::from(2)
                }
                Err(RunError::Fatal(e)) => {
                    eprintln!("forwarder: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `check --docker`: the file's rules and those of the running containers.
fn check_docker(config: &std::path::Path) -> ExitCode {
    init_logging("warn", false);
    let settings = match forwarder::config::load_with_containers(config, &[]) {
        Ok(loaded) => loaded.docker,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let Some(settings) = settings else {
        eprintln!(
            "forwarder: {} has no `docker:` section (e.g. `docker: {{socket: /var/run/docker.sock}}`); nothing to discover",
            config.display()
        );
        return ExitCode::from(2);
    };
    let listed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(forwarder::docker::Client::new(&settings.socket).containers()));
    let containers = match listed {
        Ok(containers) => containers,
        Err(e) => {
            eprintln!("forwarder: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let loaded = match forwarder::config::load_with_containers(config, &containers) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    print!("{}", forwarder::config::table(&loaded.compiled));
    let mut wrong = false;
    for c in &loaded.containers {
        for w in &c.warnings {
            eprintln!("warning: {w}");
        }
        if c.errors.is_empty() {
            println!("docker container `{}`: {}", c.name, c.aliases.join(", "));
        } else {
            wrong = true;
            println!("docker container `{}`: skipped", c.name);
            for e in &c.errors {
                eprintln!("{e}");
            }
        }
    }
    if wrong {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// Seconds between the two samples of a one-shot `status`.
const RATE_SAMPLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The human `status`: two samples for the rates, then with `--watch` one
/// more each period, rates against the one before.
fn status(control: &std::path::Path, watch: Option<f64>) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    use std::time::{Duration, Instant};
    let period = match watch {
        Some(secs) if !(0.1..=3600.0).contains(&secs) => {
            anyhow::bail!("--watch {secs}: the period is in seconds, from 0.1 to 3600")
        }
        Some(secs) => Duration::from_secs_f64(secs),
        None => RATE_SAMPLE,
    };
    let terminal = std::io::stdout().is_terminal();
    let mut earlier = (control::query(control)?, Instant::now());
    loop {
        std::thread::sleep(period);
        let now = (control::query(control)?, Instant::now());
        let previous = forwarder::status_view::Earlier {
            doc: &earlier.0,
            measured_secs: now.1.duration_since(earlier.1).as_secs_f64(),
        };
        let text = forwarder::status_view::render(&now.0, Some(&previous));
        let mut out = std::io::stdout().lock();
        if watch.is_none() {
            write!(out, "{text}")?;
            return Ok(());
        }
        if terminal {
            // Home, the new table, then clear what the last one left below.
            write!(out, "\x1b[H{}\x1b[J", text.replace('\n', "\x1b[K\n"))?;
        } else {
            writeln!(out, "{text}")?;
        }
        out.flush()?;
        earlier = now;
    }
}

/// Asks the daemon to reload and prints what changed, or why nothing did.
fn reload(control: &std::path::Path) -> ExitCode {
    // A reload resolves names and binds sockets: allow it some time.
    let answer = match control::request(control, "reload", std::time::Duration::from_secs(60)) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("forwarder: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    match answer["outcome"].as_str() {
        Some("applied") => {
            let s = &answer["summary"];
            let list = |key: &str| -> Vec<String> {
                s[key]
                    .as_array()
                    .map(|a| a.iter().map(text).collect())
                    .unwrap_or_default()
            };
            let (added, changed, removed) = (list("added"), list("changed"), list("removed"));
            println!(
                "reloaded: {} added, {} changed, {} removed, {} unchanged",
                added.len(),
                changed.len(),
                removed.len(),
                s["unchanged"].as_u64().unwrap_or(0)
            );
            for (what, rules) in [("added", added), ("changed", changed), ("removed", removed)] {
                for rule in rules {
                    println!("  {what:<8} {rule}");
                }
            }
            for setting in list("needs_restart") {
                println!("  needs a restart: {setting}");
            }
            ExitCode::SUCCESS
        }
        Some("invalid") => {
            eprintln!("{}", text(&answer["errors"]));
            eprintln!("forwarder: the rule file is invalid; the running rules stay");
            ExitCode::from(2)
        }
        Some("refused") => {
            eprintln!(
                "forwarder: {}; the running rules stay",
                text(&answer["errors"])
            );
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("forwarder: unexpected answer from the daemon: {answer}");
            ExitCode::FAILURE
        }
    }
}

/// Asks the daemon to upgrade in place and prints the outcome.
fn upgrade(control: &std::path::Path) -> ExitCode {
    // The new binary checks the rule file first, and the relay drains its
    // buffers: allow it some time.
    let answer = match control::request(control, "upgrade", std::time::Duration::from_secs(120)) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("forwarder: {e:#}; the upgrade may not have happened (see the daemon's log)");
            return ExitCode::FAILURE;
        }
    };
    match answer["outcome"].as_str() {
        Some("upgraded") => {
            println!(
                "upgraded in place: pid {}, version {} (was {}), relay frozen for {} ms, all \
                 running after {} ms",
                answer["pid"],
                answer["version"].as_str().unwrap_or("?"),
                answer["from_version"].as_str().unwrap_or("?"),
                answer["frozen_ms"],
                answer["took_ms"]
            );
            ExitCode::SUCCESS
        }
        Some("failed") => {
            eprintln!(
                "forwarder: upgrade failed, the daemon runs on unchanged: {}",
                answer["error"].as_str().unwrap_or_default()
            );
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("forwarder: unexpected answer from the daemon: {answer}");
            ExitCode::FAILURE
        }
    }
}

/// Removes what a dead daemon left; refuses while one runs.
fn cleanup(control: &std::path::Path) -> ExitCode {
    if let Ok(status) = control::query(control) {
        eprintln!(
            "forwarder: a forwarder (pid {}) is running at {}; stop it first",
            status["pid"],
            control.display()
        );
        return ExitCode::FAILURE;
    }
    let mut done = Vec::new();
    let leftovers = forwarder::state::dir()
        .map_err(anyhow::Error::from)
        .and_then(|dir| forwarder::kernel::cleanup_leftovers(&dir));
    match leftovers {
        Ok(lines) => done.extend(lines),
        Err(e) => {
            eprintln!("forwarder: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    if control.exists() {
        match std::fs::remove_file(control) {
            Ok(()) => done.push(format!(
                "removed the stale control socket {}",
                control.display()
            )),
            Err(e) => {
                eprintln!("forwarder: cannot remove {}: {e}", control.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if done.is_empty() {
        println!("nothing to clean up");
    }
    for line in done {
        println!("{line}");
    }
    ExitCode::SUCCESS
}

/// Logs to stderr at `default_level` unless `RUST_LOG` says otherwise;
/// a one-shot command has no use for timestamps and module paths.
fn init_logging(default_level: &str, daemon: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only for a terminal, not in log files and journals.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if daemon {
        fmt.init();
    } else {
        fmt.without_time().with_target(false).init();
    }
}
