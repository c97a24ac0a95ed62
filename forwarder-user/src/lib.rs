//! The forwarder daemon as a library, so that its parts can be tested.
pub mod rules;
