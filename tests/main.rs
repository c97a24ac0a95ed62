//! Integration tests: real sockets on loopback, and network namespaces
//! with real traffic (those need root). One file per concern; see
//! tests/README.md for what goes where.
mod common;

mod acl;
mod broadcast;
mod capabilities;
mod checksums;
mod config_cli;
mod conntrack_scale;
mod crash;
mod daemon;
mod daemon_lifecycle;
mod demo;
mod dns;
mod docker;
mod flow_timeouts;
mod handover;
mod health;
mod host_hooks;
mod host_nat;
mod icmp;
mod interfaces;
mod kernel_attach;
mod kernel_daemon;
mod kernel_expiry;
mod kernel_fallback;
mod kernel_xdp;
mod metrics;
mod names;
mod preserve;
mod preserve_client_ip;
mod proxy_protocol;
mod ranges;
mod ranges_relay;
mod relay_iperf3;
mod relay_lifecycle;
mod relay_limits;
mod relay_one_port;
mod relay_splice_fallback;
mod relay_tcp;
mod relay_udp;
mod reload;
mod rule_scale;
mod status_view;
mod udp_flood;
mod upgrade;
