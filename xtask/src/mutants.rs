//! `cargo xtask mutants`: mutation testing with cargo-mutants (not in CI).
//! Each target's mutants must be caught by its unit tests; equivalent
//! mutants are listed with their reason in `.cargo/mutants.toml`.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{build, cmd, workspace_root};

/// What one run mutates, and the unit tests that must catch it.
struct Target {
    name: &'static str,
    /// Arguments that pick the mutants.
    select: &'static [&'static str],
    /// The `cargo test` arguments: only the unit tests of that code, so a
    /// mutant is caught by them and not by a namespace test of the daemon.
    test: &'static [&'static str],
}

const TARGETS: &[Target] = &[
    Target {
        name: "forwarder-common",
        select: &["--package", "forwarder-common"],
        test: &["--lib"],
    },
    Target {
        name: "sweeper expiry policy",
        // By file, whatever its functions are called; the map I/O and the
        // task loop around the policy are the namespace tests' to drive.
        select: &[
            "--file",
            "forwarder-user/src/kernel/sweeper.rs",
            "--exclude-re",
            r"Sweeper::|monotonic_ns",
        ],
        test: &["--lib", "--", "kernel::sweeper"],
    },
];

/// Reported, not yet held to zero missed (`--all`).
const MORE_TARGETS: &[Target] = &[
    Target {
        name: "config",
        select: &["--file", "forwarder-user/src/config/**"],
        test: &["--lib", "--", "config::"],
    },
    Target {
        name: "relay pure parts",
        select: &[
            "--file",
            "forwarder-user/src/relay/backend.rs",
            "--file",
            "forwarder-user/src/relay/idle.rs",
            "--file",
            "forwarder-user/src/relay/sessions.rs",
        ],
        test: &["--lib", "--", "relay::"],
    },
];

pub fn run(all: bool, jobs: u32) -> Result<()> {
    install()?;
    let object = build::ebpf_object()?;
    let root = workspace_root();
    let targets = TARGETS.iter().chain(if all { MORE_TARGETS } else { &[] });
    let mut reports = Vec::new();
    for target in targets {
        eprintln!("\n==> cargo mutants: {}", target.name);
        let out = root
            .join("target/mutants")
            .join(target.name.replace(' ', "-"));
        let status = Command::new("cargo")
            .current_dir(&root)
            .env("FORWARDER_EBPF_OBJ", &object)
            // Built once here and reused by every later run.
            .env("CARGO_TARGET_DIR", root.join("target/mutants/build"))
            .args(["mutants", "--no-shuffle", "--jobs", &jobs.to_string()])
            .arg("--output")
            .arg(&out)
            .args(target.select)
            .arg("--")
            .args(target.test)
            .status()
            .context("cannot start cargo mutants")?;
        // 0: all caught; 2: some missed; 3: some timed out. Anything else
        // (4: the tests fail without a mutant) is no score.
        if !matches!(status.code(), Some(0 | 2 | 3)) {
            bail!("cargo mutants for {} failed ({status})", target.name);
        }
        reports.push((target.name, score(&out.join("mutants.out/outcomes.json"))?));
    }
    println!("\nmutants by file (caught + timed out of viable):");
    for (name, by_file) in &reports {
        println!("{name}:");
        for (file, t) in by_file {
            println!("  {file}: {}", t.line());
        }
    }
    // Only the held targets fail the command; the others are reported.
    let missed: u64 = reports[..TARGETS.len()]
        .iter()
        .flat_map(|(_, by_file)| by_file.values())
        .map(|t| t.missed)
        .sum();
    if missed > 0 {
        bail!(
            "{missed} missed mutants where none may be: see target/mutants/*/mutants.out/missed.txt"
        );
    }
    Ok(())
}

fn install() -> Result<()> {
    if cmd::output(Command::new("cargo").args(["mutants", "--version"])).is_some() {
        return Ok(());
    }
    eprintln!("installing cargo-mutants (cargo install cargo-mutants --locked)");
    cmd::run(Command::new("cargo").args(["install", "cargo-mutants", "--locked"]))
}

#[derive(Default, Debug, PartialEq)]
struct Tally {
    caught: u64,
    timeout: u64,
    missed: u64,
    unviable: u64,
}

impl Tally {
    fn line(&self) -> String {
        let viable = self.caught + self.timeout + self.missed;
        let pct = if viable == 0 {
            100.0
        } else {
            100.0 * (self.caught + self.timeout) as f64 / viable as f64
        };
        format!(
            "{pct:.0}% ({} caught, {} timed out, {} missed, {} unviable)",
            self.caught, self.timeout, self.missed, self.unviable
        )
    }
}

/// Outcomes by mutated file, from cargo-mutants' `outcomes.json`.
fn score(path: &Path) -> Result<BTreeMap<String, Tally>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    tally(&text).with_context(|| format!("in {}", path.display()))
}

fn tally(outcomes_json: &str) -> Result<BTreeMap<String, Tally>> {
    let doc: serde_json::Value = serde_json::from_str(outcomes_json)?;
    let mut by_file = BTreeMap::<String, Tally>::new();
    let outcomes = doc["outcomes"].as_array().context("no outcomes")?;
    for o in outcomes {
        let Some(mutant) = o["scenario"].get("Mutant") else {
            continue; // the baseline
        };
        let file = mutant["file"].as_str().context("a mutant without a file")?;
        let t = by_file.entry(file.to_owned()).or_default();
        match o["summary"].as_str() {
            Some("CaughtMutant") => t.caught += 1,
            Some("Timeout") => t.timeout += 1,
            Some("MissedMutant") => t.missed += 1,
            Some("Unviable") => t.unviable += 1,
            other => bail!("unknown outcome {other:?} of {}", mutant["name"]),
        }
    }
    Ok(by_file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_outcomes_by_file() {
        let json = r#"{"outcomes": [
            {"scenario": "Baseline", "summary": "Success"},
            {"scenario": {"Mutant": {"file": "a.rs", "name": "a1"}}, "summary": "CaughtMutant"},
            {"scenario": {"Mutant": {"file": "a.rs", "name": "a2"}}, "summary": "MissedMutant"},
            {"scenario": {"Mutant": {"file": "a.rs", "name": "a3"}}, "summary": "Timeout"},
            {"scenario": {"Mutant": {"file": "b.rs", "name": "b1"}}, "summary": "Unviable"}
        ]}"#;
        let t = tally(json).unwrap();
        let a = Tally {
            caught: 1,
            timeout: 1,
            missed: 1,
            unviable: 0,
        };
        assert_eq!(t["a.rs"], a);
        assert_eq!(
            a.line(),
            "67% (1 caught, 1 timed out, 1 missed, 0 unviable)"
        );
        assert_eq!(t["b.rs"].unviable, 1);
        assert!(tally(r#"{"outcomes": [{"scenario": {"Mutant": {"file": "c.rs", "name": "c"}}, "summary": "Odd"}]}"#).is_err());
    }
}
