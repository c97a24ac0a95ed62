//! Integration tests: real sockets on loopback, and network namespaces
//! with real traffic (those need root).
mod common;

mod acl;
mod broadcast;
mod config_cli;
mod crash;
mod daemon;
mod demo;
mod flow_timeouts;
mod health;
mod host_hooks;
mod icmp;
mod interfaces;
mod kernel_path;
mod names;
mod preserve;
mod relay;
mod reload;
mod status_view;
