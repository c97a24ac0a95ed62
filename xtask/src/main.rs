//! `cargo xtask`: set up the toolchain, build, run, test and bench forwarder.
mod bench;
mod build;
mod cmd;
mod demo;
mod mutants;
mod setup;
mod test;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test forwarder")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks: Debian's Rust with library source
    /// (for the eBPF target), bpf-linker, and the test tools. Idempotent.
    Setup,
    /// Build the eBPF object, then the daemon that embeds it (release).
    Build,
    /// Build, then run the daemon as root on config/forwarder.yaml.
    Run {
        /// Rule file [default: the workspace's config/forwarder.yaml].
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Further arguments for `forwarder run`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// See it work (root): client / forwarder / backend namespaces, a
    /// TURN-like backend, forwarder on config/demo.yaml, a few seconds of
    /// traffic, the live status, and which path carried what.
    Demo(demo::DemoArgs),
    /// fmt, clippy, unit tests, then the root-only integration tests.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Measure forwarder against direct routing, nftables, nginx, HAProxy
    /// and socat in network namespaces (root); writes bench-results/.
    Bench(bench::BenchArgs),
    /// Mutation testing with cargo-mutants (installed if missing; not in
    /// CI): forwarder-common and the sweeper's expiry policy must have no
    /// missed mutant. Writes target/mutants/.
    Mutants(mutants::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::run(),
        Command::Build => {
            setup::run()?;
            build::daemon()?;
            Ok(())
        }
        Command::Run { config, args } => {
            setup::run()?;
            let bin = build::daemon()?;
            let config = config.unwrap_or_else(|| workspace_root().join("config/forwarder.yaml"));
            build::exec_daemon(&bin, &config, &args)
        }
        Command::Test { filter } => {
            setup::run()?;
            test::run(filter.as_deref())
        }
        Command::Bench(args) => bench::run(args),
        Command::Mutants(args) => {
            setup::run()?;
            mutants::run(&args)
        }
        Command::Demo(args) => demo::run(args),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}
