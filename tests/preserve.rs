//! Integration tests: `preserve_client_ip` never turns into SNAT. Its
//! flows go by the kernel path (DNAT only); what falls back to the relay,
//! which would connect from this host's address, is refused and counted.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::eventually;
use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, relay_rule, spawn_in,
};
use crate::common::traffic::udp_socket_from;
use crate::common::{self, Topology};
use crate::reload::udp_ask;

const RULES: &str =
    "routes:\n  keep: {scheme: udp, host: 198.18.2.2, port: 7300:5300, preserve_client_ip: true}\n";

#[test]
fn relay_only_refuses_to_run_a_preserve_client_ip_rule() {
    let dir = std::env::temp_dir().join(format!("fwdt-{}-preserve", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("forwarder.yaml");
    std::fs::write(&config, RULES).unwrap();
    let out = common::output_within(
        Command::new(common::forwarder_bin())
            .arg("run")
            .arg("--relay-only")
            .arg("-c")
            .arg(&config)
            .arg("--control")
            .arg(dir.join("control.sock")),
        WAIT,
    );
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rule `keep`") && stderr.contains("preserve_client_ip: true"),
        "{stderr}"
    );
    assert!(stderr.contains("--relay-only cannot carry it"), "{stderr}");
}

#[test]
fn a_preserve_client_ip_flow_that_falls_back_is_refused_not_relayed() {
    if !common::require_root("a_preserve_client_ip_flow_that_falls_back_is_refused_not_relayed") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    // The backend answers with the address it saw.
    let stop = Arc::new(AtomicBool::new(false));
    let (ready, up) = std::sync::mpsc::channel();
    let echo = {
        let stop = stop.clone();
        spawn_in(&topo.backend, move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5300)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            ready.send(()).unwrap();
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(from.ip().to_string().as_bytes(), from);
                }
            }
        })
    };
    up.recv_timeout(WAIT).unwrap();
    let daemon = Daemon::start(&topo.forwarder, "preserve", RULES);
    let to = SocketAddr::from((topo.forwarder_addr(), 7300));

    // A flow whose first datagram is fragmented goes to the relay...
    let fragmented = in_netns(&topo.client, || udp_socket_from(40_123, to));
    fragmented.send(&vec![7u8; 4000]).unwrap();
    let mut buf = [0u8; 64];
    fragmented
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    assert!(
        fragmented.recv(&mut buf).is_err(),
        "the relay answered for a preserve_client_ip rule"
    );
    eventually("the refusal is counted", || {
        counter(
            relay_rule(&daemon.status(), "keep", "udp"),
            "client_ip_refused",
        ) == 1
    });
    // ...and is refused, while a plain one goes by the kernel path with
    // the client's own address.
    let plain = in_netns(&topo.client, || udp_socket_from(40_124, to));
    let seen = udp_ask(&plain, b"hello");
    assert_eq!(
        String::from_utf8_lossy(&seen),
        topo.client_link.b_addr.to_string()
    );
    let status = daemon.status();
    assert_eq!(
        counter(kernel_rule(&status, "keep", "udp"), "flows"),
        1,
        "{status}"
    );
    assert_eq!(
        counter(relay_rule(&status, "keep", "udp"), "flows"),
        0,
        "{status}"
    );
    assert!(daemon.log_text().contains("so it is refused"));
    daemon.stop();
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
}
