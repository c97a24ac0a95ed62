//! Test harness shared by the integration tests.
#![allow(dead_code)]

mod netns;
mod tcx_counter;
#[allow(unused_imports)]
pub use netns::*;
pub use tcx_counter::TcxCounter;

use std::path::PathBuf;

/// Path of the `forwarder` binary built for these tests.
pub fn forwarder_bin() -> &'static str {
    env!("CARGO_BIN_EXE_forwarder")
}

/// The non-empty lines a command wrote to stderr.
pub fn stderr_lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// `forwarder reload` of the daemon at `control`; fails the test if it
/// does not answer within `limit`.
pub fn reload(control: &std::path::Path, limit: std::time::Duration) -> std::process::Output {
    output_within(
        std::process::Command::new(forwarder_bin())
            .arg("reload")
            .arg("--control")
            .arg(control),
        limit,
    )
}

/// A rule file in a fresh temp dir; removed with the returned guard.
pub struct TempConfig {
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl TempConfig {
    pub fn new(name: &str, yaml: &str) -> TempConfig {
        let dir = std::env::temp_dir().join(format!("fwdt-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("forwarder.yaml");
        std::fs::write(&path, yaml).unwrap();
        TempConfig { dir, path }
    }

    pub fn control(&self) -> String {
        self.dir.join("control.sock").display().to_string()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
