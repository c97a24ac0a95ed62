//! Test harness shared by the integration tests.
#![allow(dead_code)]

pub mod conntrack;
pub mod dns;
pub mod docker;
pub mod harness;
mod netns;
pub mod port_servers;
pub mod relay;
pub mod seccomp;
mod tcx_counter;
pub mod traffic;
pub mod turn;
pub mod wire;

#[allow(unused_imports)]
pub use netns::*;
pub use tcx_counter::TcxCounter;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Path of the `forwarder` binary built for these tests.
pub fn forwarder_bin() -> &'static str {
    env!("CARGO_BIN_EXE_forwarder")
}

/// Every [`eventually`] gives up after this, to fail rather than hang.
pub const EVENTUALLY: Duration = Duration::from_secs(20);

/// Polls `f` until it holds, or fails the test after [`EVENTUALLY`].
pub fn eventually(why: &str, mut f: impl FnMut() -> bool) {
    blocking(|| {
        let deadline = Instant::now() + EVENTUALLY;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for: {why}");
            std::thread::sleep(POLL);
        }
    })
}

/// What a timeout test allows on top of 3x the configured value: two
/// cores busy with other tests' transfers.
pub const TIMEOUT_MARGIN: Duration = Duration::from_secs(1);

/// Polls `done` until it holds; fails unless that happens no sooner than
/// `configured` after `since` (the last activity) and no later than 3x
/// `configured` plus [`TIMEOUT_MARGIN`]. Returns how long it took.
pub fn expires_in_time(
    why: &str,
    since: Instant,
    configured: Duration,
    mut done: impl FnMut() -> bool,
) -> Duration {
    let latest = 3 * configured + TIMEOUT_MARGIN;
    blocking(|| {
        loop {
            let elapsed = since.elapsed();
            if done() {
                assert!(
                    elapsed >= configured,
                    "{why}: after {elapsed:?}, before the configured {configured:?}"
                );
                return elapsed;
            }
            assert!(
                elapsed <= latest,
                "{why}: not within {latest:?} (configured {configured:?})"
            );
            std::thread::sleep(POLL);
        }
    })
}

const POLL: Duration = Duration::from_millis(20);

/// Runs blocking `f`. Inside a multi-threaded tokio runtime (the relay
/// tests) the worker hands its tasks over meanwhile, so the relay under
/// test keeps running.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
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
