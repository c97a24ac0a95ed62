//! The daemon's life as a user sees it: its control socket and plain
//! status, the signals that stop it, and the drain of a live flow.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::harness::{Daemon, forwarding_on, in_netns, reserved_ports};
use crate::common::traffic::{BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket};
use crate::common::turn::{assert_nothing_left, listener_addr, our_programs, turn_rules};
use crate::common::{self, TIMEOUT_MARGIN, Topology, forwarder_bin};

#[test]
fn the_control_socket_is_root_only_status_prints_plainly_and_sigquit_stops_cleanly() {
    if !common::require_root(
        "the_control_socket_is_root_only_status_prints_plainly_and_sigquit_stops_cleanly",
    ) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let reserved_before = reserved_ports(&topo.forwarder);
    let daemon = Daemon::start(&topo.forwarder, "sigquit", &turn_rules(&topo, ""));
    let programs = our_programs(&topo, false);
    let control = daemon.control_path().to_path_buf();
    let meta = std::fs::metadata(&control).expect("the control socket");
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "root only");

    in_netns(&topo.client, || {
        udp_echo(&udp_socket(listener_addr(&topo)), b"count me");
    });
    // Without --json: the table for people, naming every rule.
    let plain = Command::new(forwarder_bin())
        .args(["status", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(plain.status.success(), "{plain:?}");
    let text = String::from_utf8(plain.stdout).unwrap();
    for alias in ["turn-tcp", "turn-udp"] {
        assert!(text.contains(alias), "{alias} in:\n{text}");
    }
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "{text}"
    );

    daemon.signal(libc::SIGQUIT);
    let log = daemon.wait_for_exit();
    assert!(log.contains("SIGQUIT") && log.contains("stopped"), "{log}");
    assert!(!control.exists(), "the control socket is removed at stop");
    assert_nothing_left(&topo, &programs, &reserved_before);
}

#[test]
fn sigterm_lets_a_live_flow_finish_for_the_drain_then_closes_it() {
    if !common::require_root("sigterm_lets_a_live_flow_finish_for_the_drain_then_closes_it") {
        return;
    }
    const DRAIN: Duration = Duration::from_secs(2);
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // The relay drains; kernel flows end with the programs.
    let yaml = format!(
        "relay: {{drain_timeout: 2s}}\n\
         routes:\n\
         \x20 turn-tcp: {{scheme: tcp, host: {backend}, port: 7878:3478, path: relay}}\n",
        backend = topo.backend_addr(),
    );
    let daemon = Daemon::start(&topo.forwarder, "drain", &yaml);
    let to = listener_addr(&topo);
    let (mut finishing, mut lingering) = in_netns(&topo.client, || {
        let mut a = tcp_echo_conn(to);
        tcp_echo_round(&mut a, b"before the stop");
        let mut b = tcp_echo_conn(to);
        tcp_echo_round(&mut b, b"before the stop too");
        (a, b)
    });

    let stopped = Instant::now();
    daemon.signal(libc::SIGTERM);
    // No new flows: the listener is closed at once.
    in_netns(&topo.client, || {
        common::eventually("new connections refused", || {
            TcpStream::connect_timeout(&to, Duration::from_secs(1))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
    });
    // A live flow still works during the drain, and finishes.
    tcp_echo_round(&mut finishing, b"during the drain");
    finishing.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    finishing.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    // The one that outlives the drain is closed by the daemon.
    lingering
        .set_read_timeout(Some(3 * DRAIN + TIMEOUT_MARGIN))
        .unwrap();
    let closed = lingering.read(&mut [0u8; 8]);
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let log = daemon.wait_for_exit();
    let took = stopped.elapsed();
    let latest = 3 * DRAIN + TIMEOUT_MARGIN;
    assert!(
        took >= DRAIN && took <= latest,
        "stopped {took:?} after SIGTERM with a live flow, not within {DRAIN:?}..={latest:?}\n{log}"
    );
    assert!(log.contains("SIGTERM") && log.contains("stopped"), "{log}");
}
