//! `cargo xtask test`: fmt, clippy, unit tests, then the integration tests,
//! ending with one summary line over every test binary.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{build, cmd, workspace_root};

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Reads cargo test's `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }

    /// `n` tests that returned early because they need root.
    fn skip(&mut self, n: u64) {
        let n = n.min(self.passed);
        self.passed -= n;
        self.ignored += n;
    }
}

pub fn run(filter: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let object = build::ebpf_object()?;
    // Root-only tests that were skipped tell us here (libtest counts them
    // as passed).
    let skips = workspace_root().join("target/test-skips.txt");
    let _ = std::fs::remove_file(&skips);
    let cargo = || {
        let mut cmd = build::cargo_with_object(&object);
        cmd.env("FORWARDER_TEST_SKIPS", &skips);
        cmd
    };

    step("cargo fmt --check");
    cmd::run(cargo().args(["fmt", "--all", "--check"])).context("no test ran")?;

    step("clippy -D warnings (host crates)");
    cmd::run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
        .context("no test ran")?;

    let mut tally = Tally::default();
    step("unit tests");
    let unit = run_tests(
        cargo().args(["test", "--lib", "--bins"]),
        filter,
        &mut tally,
    );
    step("integration tests (root: network namespaces and BPF)");
    let integration = run_tests(
        cargo().args([
            "test",
            "--package",
            "forwarder-user",
            "--test",
            "integration",
        ]),
        filter,
        &mut tally,
    );
    let skipped = std::fs::read_to_string(&skips).unwrap_or_default();
    tally.skip(skipped.lines().count() as u64);
    for test in skipped.lines() {
        eprintln!("skipped (needs root): {test}");
    }
    eprintln!("tests took {} s", started.elapsed().as_secs());
    println!(
        "\ntests: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    unit?;
    integration?;
    if tally.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// Runs a `cargo test`, echoing its output and counting its results.
fn run_tests(cmd: &mut Command, filter: Option<&str>, tally: &mut Tally) -> Result<()> {
    if let Some(f) = filter {
        cmd.args(["--", f]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", cmd::describe(cmd)))?;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        tally.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed ({status})", cmd::describe(cmd));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn counts_cargo_test_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 12 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add_line(
            "test result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 5 filtered out",
        );
        t.add_line("running 4 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (13, 3, 2));
        t.skip(4);
        assert_eq!((t.passed, t.failed, t.ignored), (9, 3, 6));
    }
}
