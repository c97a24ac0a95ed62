//! Test harness shared by the integration tests.
#![allow(dead_code)]

mod netns;
#[allow(unused_imports)]
pub use netns::*;

/// Path of the `forwarder` binary built for these tests.
pub fn forwarder_bin() -> &'static str {
    env!("CARGO_BIN_EXE_forwarder")
}
