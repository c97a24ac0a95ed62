//! Kernel flows ending: idle and closed flows expire and hand their SNAT
//! ports on.

use std::time::{Duration, Instant};

use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule};
use crate::common::traffic::{
    BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket_from,
};
use crate::common::turn::{listener_addr, turn_rules};
use crate::common::{self, Topology, expires_in_time};

#[test]
fn closed_flows_hand_their_snat_ports_on_so_waves_of_connections_stay_in_the_kernel() {
    if !common::require_root(
        "closed_flows_hand_their_snat_ports_on_so_waves_of_connections_stay_in_the_kernel",
    ) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // Ten ports, thirty connections: every wave after the first needs the
    // ports of the one before, long before tcp_close (10 s) frees them.
    let rules = turn_rules(&topo, "kernel: {snat_ports: 40000-40009}\n");
    let daemon = Daemon::start(&topo.forwarder, "reuse", &rules);
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        for wave in 0..3 {
            if wave > 0 {
                // Past the second of quiet a closed flow must keep.
                std::thread::sleep(Duration::from_millis(1500));
            }
            for n in 0..10 {
                let mut c = tcp_echo_conn(to);
                tcp_echo_round(&mut c, format!("wave {wave} conn {n}").as_bytes());
                // Closed by us first; the echo server closes on our FIN.
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                std::io::Read::read_to_end(&mut c, &mut rest).unwrap();
                assert!(rest.is_empty(), "{rest:?}");
            }
        }
    });
    let status = daemon.status();
    let tcp = kernel_rule(&status, "turn-tcp", "tcp");
    assert_eq!(counter(tcp, "flows"), 30, "{tcp}");
    assert_eq!(counter(tcp, "fallback_full"), 0, "{tcp}");
    assert_eq!(counter(relay_rule(&status, "turn-tcp", "tcp"), "flows"), 0);
    daemon.stop();
}

#[test]
fn idle_flows_expire_and_give_their_snat_port_back() {
    if !common::require_root("idle_flows_expire_and_give_their_snat_port_back") {
        return;
    }
    // udp_idle, tcp_close and connect alike.
    const IDLE: Duration = Duration::from_secs(1);
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // One SNAT port: one kernel flow to the backend at a time.
    let rules = turn_rules(
        &topo,
        "kernel: {snat_ports: 40000-40000}\n\
         timeouts: {udp_idle: 1s, tcp_close: 1s, connect: 1s}\n",
    );
    let daemon = Daemon::start(&topo.forwarder, "expiry", &rules);
    let to = listener_addr(&topo);
    let first_sent = Instant::now();
    in_netns(&topo.client, || {
        udp_echo(&udp_socket_from(5000, to), b"takes the port");
        // The range is used up: this one is the relay's.
        udp_echo(&udp_socket_from(5001, to), b"overflow");
    });
    let k = |status: &serde_json::Value| kernel_rule(status, "turn-udp", "udp").clone();
    let status = daemon.status();
    assert_eq!(counter(&k(&status), "flows"), 1);
    assert_eq!(counter(&k(&status), "fallback_full"), 1);
    expires_in_time("the idle flow expires", first_sent, IDLE, || {
        let s = daemon.status();
        s["kernel"]["expired_flows"].as_u64() == Some(1)
            && s["kernel"]["conntrack_entries"].as_u64() == Some(0)
    });
    in_netns(&topo.client, || {
        udp_echo(&udp_socket_from(5002, to), b"the port is free again");
    });
    let status = daemon.status();
    assert_eq!(counter(&k(&status), "flows"), 2, "{}", k(&status));
    assert_eq!(counter(&k(&status), "fallback_full"), 1);

    // A TCP flow that closed goes after tcp_close, and frees the port too.
    let tcp_opened = Instant::now();
    in_netns(&topo.client, || {
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"short-lived");
    });
    expires_in_time(
        "the closed TCP flow and the UDP flow expire",
        tcp_opened,
        IDLE,
        || {
            let s = daemon.status();
            s["kernel"]["expired_flows"].as_u64() == Some(3)
                && s["kernel"]["conntrack_entries"].as_u64() == Some(0)
        },
    );
    daemon.stop();
}

#[test]
fn a_busy_tcp_flow_stays_and_an_idle_one_goes_after_tcp_established() {
    if !common::require_root("a_busy_tcp_flow_stays_and_an_idle_one_goes_after_tcp_established") {
        return;
    }
    const IDLE: Duration = Duration::from_secs(1);
    // 3x the timeout plus the sweep period (1.25 s with the default
    // connect) and status polling on two busy cores.
    const LATEST: Duration = Duration::from_secs(3 + 2);
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let rules = turn_rules(&topo, "timeouts: {tcp_established: 1s}\n");
    let daemon = Daemon::start(&topo.forwarder, "established", &rules);
    let to = listener_addr(&topo);
    let (mut idle, mut busy) = in_netns(&topo.client, || (tcp_echo_conn(to), tcp_echo_conn(to)));
    tcp_echo_round(&mut busy, b"busy from the start");
    let quiet_from = Instant::now();
    tcp_echo_round(&mut idle, b"then quiet");
    let expired = |daemon: &Daemon| daemon.status()["kernel"]["expired_flows"].as_u64();
    // `busy` talks every 200 ms (a refresh each time) while `idle` is
    // silent; only `idle` may go.
    let mut gone_after = None;
    let mut rounds = 0;
    while quiet_from.elapsed() < 3 * IDLE || gone_after.is_none() {
        assert!(
            quiet_from.elapsed() < LATEST,
            "the idle flow did not expire within {LATEST:?}: {}",
            daemon.status()
        );
        tcp_echo_round(&mut busy, format!("round {rounds}").as_bytes());
        rounds += 1;
        match expired(&daemon) {
            Some(0) => {}
            Some(1) if gone_after.is_none() => gone_after = Some(quiet_from.elapsed()),
            Some(1) => {}
            other => panic!(
                "{other:?} flows expired; only the idle one may: {}",
                daemon.status()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let gone_after = gone_after.unwrap();
    assert!(
        gone_after >= IDLE,
        "expired after {gone_after:?} of quiet, before tcp_established ({IDLE:?})"
    );
    let status = daemon.status();
    assert_eq!(
        status["kernel"]["conntrack_entries"].as_u64(),
        Some(2),
        "{status}"
    );
    let tcp = kernel_rule(&status, "turn-tcp", "tcp");
    assert_eq!(counter(tcp, "flows"), 2, "{tcp}");
    assert_eq!(counter(relay_rule(&status, "turn-tcp", "tcp"), "flows"), 0);
    drop(idle);
    daemon.stop();
}
