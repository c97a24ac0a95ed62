//! The forwarder daemon as a library, so that its parts can be tested.
pub mod acl;
pub mod config;
pub mod control;
pub mod daemon;
pub mod docker;
pub mod health;
pub mod kernel;
pub mod metrics;
pub mod names;
pub mod privileges;
pub mod process;
pub mod relay;
pub mod reload;
pub mod rules;
pub mod state;
pub mod status_view;
pub mod upgrade;
