//! A rule file that sets nothing gets the defaults README.md and
//! config/forwarder.yaml document.

use std::net::SocketAddr;
use std::time::Duration;

use super::load;
use crate::rules::PathMode;

const BARE: &str = "routes:\n  turn: {scheme: 'tcp,udp', port: 7878:3478}\n";

/// The block config/forwarder.yaml shows as "the defaults".
const DOCUMENTED: &str = "relay:
  max_udp_sessions: 65536
  drain_timeout: 10s
kernel:
  conntrack_size: 262144
  snat_ports: 40000-59999
timeouts:
  udp_idle: 2m
  tcp_established: 2h
  tcp_close: 10s
  connect: 5s
";

#[test]
fn a_file_that_sets_nothing_gets_the_documented_defaults() {
    let (bare, _) = load(BARE).unwrap_or_else(|e| panic!("{e}"));
    let (spelled_out, _) = load(&format!("{DOCUMENTED}{BARE}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bare.relay, spelled_out.relay);
    assert_eq!(bare.kernel_settings, spelled_out.kernel_settings);
    assert_eq!(bare.listeners.len(), 2);
    for (l, s) in bare.listeners.iter().zip(&spelled_out.listeners) {
        assert_eq!(l.timeouts, s.timeouts, "{}", l.alias);
        // README: connect 5 s, udp_idle 2 min.
        assert_eq!(l.timeouts.connect, Duration::from_secs(5));
        assert_eq!(l.timeouts.udp_idle, Duration::from_secs(120));
        assert_eq!(l.timeouts.tcp_close, Duration::from_secs(10));
        assert_eq!(l.timeouts.tcp_established, Duration::from_secs(7200));
        // host 127.0.0.1, bind every address (IPv4 and IPv6), path auto.
        let backend: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        assert_eq!(l.backends.len(), 1);
        assert_eq!(l.backends[0].addr, backend);
        assert_eq!(l.bind, "[::]:7878".parse::<SocketAddr>().unwrap());
        assert_eq!(l.path, PathMode::Auto);
        assert!(!l.preserve_client_ip);
    }
    // README: drain 10 s.
    assert_eq!(bare.relay.drain_timeout, Duration::from_secs(10));
    assert_eq!(bare.relay.max_udp_sessions, 65536);
    assert_eq!(bare.kernel_settings.conntrack_size, 262_144);
    assert_eq!(bare.kernel_settings.snat_ports, (40000, 59999));
}
