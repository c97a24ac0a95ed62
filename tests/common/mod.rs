//! Test harness shared by the integration tests.
#![allow(dead_code)]

pub mod harness;
mod netns;
pub mod relay;
pub mod traffic;
pub mod turn;
pub mod wire;

#[allow(unused_imports)]
pub use netns::*;

use std::time::{Duration, Instant};

/// Path of the `forwarder` binary built for these tests.
pub fn forwarder_bin() -> &'static str {
    env!("CARGO_BIN_EXE_forwarder")
}

/// Every [`eventually`] gives up after this, to fail rather than hang.
pub const EVENTUALLY: Duration = Duration::from_secs(20);

/// Polls `f` until it holds, or fails the test after [`EVENTUALLY`].
/// Inside a multi-threaded tokio runtime (the relay tests) the worker hands
/// its tasks over while this blocks, so the relay under test keeps running.
pub fn eventually(why: &str, mut f: impl FnMut() -> bool) {
    let mut poll = || {
        let deadline = Instant::now() + EVENTUALLY;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for: {why}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(poll)
        }
        _ => poll(),
    }
}
