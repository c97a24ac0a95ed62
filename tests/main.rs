//! Integration tests: real sockets on loopback, and network namespaces
//! with real traffic (those need root).
mod common;

mod acl;
mod broadcast;
mod config_cli;
mod crash;
mod daemon;
mod flow_timeouts;
mod host_hooks;
mod kernel_path;
mod relay;
mod reload;
