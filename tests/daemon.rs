//! Integration tests: the daemon's command line and its answers to bad input.
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::{self, Netns};

/// A rule file in a fresh temp dir; removed with the returned guard.
struct TempConfig {
    dir: PathBuf,
    pub path: PathBuf,
}

impl TempConfig {
    fn new(name: &str, yaml: &str) -> TempConfig {
        let dir = std::env::temp_dir().join(format!("fwdt-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("forwarder.yaml");
        std::fs::write(&path, yaml).unwrap();
        TempConfig { dir, path }
    }

    fn control(&self) -> String {
        self.dir.join("control.sock").display().to_string()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A rule the kernel path would take (a loopback target would not need it).
/// No traffic is ever sent to its target.
const ONE_RULE: &str =
    "routes:\n  echo:\n    scheme: tcp\n    host: 198.18.9.2\n    port: 17001:17002\n";

/// Bad input ends the daemon at once; this only keeps a regression from hanging.
const EXIT_LIMIT: Duration = Duration::from_secs(30);

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Asserts a failed run that said exactly one line containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let lines = stderr_lines(out);
    assert!(
        !out.status.success(),
        "expected a failure, got {:?}",
        out.status
    );
    assert_eq!(
        lines.len(),
        1,
        "expected one line, got:\n{}",
        lines.join("\n")
    );
    assert!(
        lines[0].contains(needle),
        "expected `{needle}` in: {}",
        lines[0]
    );
}

#[test]
fn a_missing_config_file_is_one_clear_line() {
    let out = common::output_within(
        Command::new(common::forwarder_bin()).args([
            "run",
            "-c",
            "/nonexistent/forwarder.yaml",
            "--relay-only",
        ]),
        EXIT_LIMIT,
    );
    assert_one_line_error(&out, "/nonexistent/forwarder.yaml");
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unreadable rule file is a config error"
    );
}

#[test]
fn check_exits_2_on_a_missing_file() {
    let out = Command::new(common::forwarder_bin())
        .args(["check", "-c", "/nonexistent/forwarder.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/forwarder.yaml"));
}

#[test]
fn status_without_a_daemon_is_one_clear_line() {
    let out = Command::new(common::forwarder_bin())
        .args(["status", "--control", "/nonexistent/forwarder.sock"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "no forwarder is running");
}

#[test]
fn without_root_the_kernel_path_is_refused_in_one_line() {
    if !common::require_root("without_root_the_kernel_path_is_refused_in_one_line") {
        return;
    }
    let cfg = TempConfig::new("nonroot", ONE_RULE);
    // World-readable, so that `nobody` can read the file and fail on privileges alone.
    run_chmod(&cfg.dir, "755");
    run_chmod(&cfg.path, "644");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(common::forwarder_bin())
    .args(["run", "-c"])
    .arg(&cfg.path)
    .args(["--control", &cfg.control()]);
    let out = common::output_within(&mut cmd, EXIT_LIMIT);
    assert_one_line_error(&out, "needs root");
    assert_eq!(out.status.code(), Some(1));
}

fn run_chmod(path: &std::path::Path, mode: &str) {
    common::run(Command::new("chmod").arg(mode).arg(path));
}

#[test]
fn a_missing_interface_is_one_clear_line() {
    if !common::require_root("a_missing_interface_is_one_clear_line") {
        return;
    }
    let ns = Netns::new("noif");
    let cfg = TempConfig::new("noif", &format!("interfaces: [nosuch0]\n{ONE_RULE}"));
    let mut cmd = ns.command(common::forwarder_bin());
    cmd.args(["run", "-c"])
        .arg(&cfg.path)
        .args(["--control", &cfg.control()]);
    let out = common::output_within(&mut cmd, EXIT_LIMIT);
    assert_one_line_error(&out, "interface `nosuch0` does not exist");
    assert_eq!(out.status.code(), Some(1));
}
