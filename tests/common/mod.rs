//! Test harness shared by the integration tests.
#![allow(dead_code)]

mod netns;
mod tcx_counter;
#[allow(unused_imports)]
pub use netns::*;
pub use tcx_counter::TcxCounter;

/// Path of the `forwarder` binary built for these tests.
pub fn forwarder_bin() -> &'static str {
    env!("CARGO_BIN_EXE_forwarder")
}
