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
    },
    /// Print the rules and counters of a running daemon.
    Status {
        /// The daemon's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        control: PathBuf,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
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
        Command::Status { control, json } => match control::query(&control) {
            Ok(status) if json => {
                println!("{status}");
                ExitCode::SUCCESS
            }
            Ok(status) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("forwarder: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            relay_only,
            control,
        } => {
            init_logging("info", true);
            let runtime = match tokio::runtime::Runtime::new() {
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
