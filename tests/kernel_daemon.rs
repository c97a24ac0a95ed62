//! The kernel path through the daemon (`forwarder run` in the forwarder
//! namespace): flows, counters, the stop, the programs' log.

use crate::common::harness::{
    Daemon, counter, forwarding_on, in_netns, interface, kernel_rule, relay_rule, reserved_ports,
};
use crate::common::traffic::{
    BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket, udp_socket_from,
};
use crate::common::turn::{
    assert_nothing_left, listener_addr, our_programs, turn_like_run, turn_rules,
};
use crate::common::{self, Topology, eventually};

#[test]
fn turn_like_tcp_and_udp_at_once_with_a_256_mib_transfer_on_the_kernel_path() {
    if !common::require_root(
        "turn_like_tcp_and_udp_at_once_with_a_256_mib_transfer_on_the_kernel_path",
    ) {
        return;
    }
    let topo = Topology::new();
    let status = turn_like_run(&topo, "turn-tc", "auto");
    // `auto` leaves XDP out: TC carried every packet.
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        assert_eq!(counter(k, "xdp_packets"), 0, "{k}");
    }
    // TC saw the traffic on both interfaces (as GSO skbs, so fewer
    // packets than segments): the 256 MiB from the client, at least the
    // 200 UDP replies from the backend. No rule asked for XDP, so none was
    // attached and it counted nothing.
    let from_client = interface(&status, &topo.client_link.a_if);
    assert!(
        counter(from_client, "tc_bytes") >= 256 << 20,
        "{from_client}"
    );
    let from_backend = interface(&status, &topo.backend_link.a_if);
    assert!(counter(from_backend, "tc_packets") >= 200, "{from_backend}");
    for c in [from_client, from_backend] {
        assert_eq!(counter(c, "xdp_packets"), 0, "{c}");
        assert_eq!(counter(c, "xdp_bytes"), 0, "{c}");
    }
}

#[test]
fn ten_thousand_udp_flows_on_the_kernel_path() {
    if !common::require_root("ten_thousand_udp_flows_on_the_kernel_path") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "10k", &turn_rules(&topo, ""));
    let to = listener_addr(&topo);
    let flows = 10_000u32;
    let threads = 4;
    in_netns(&topo.client, || {
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || {
                    for n in (t..flows).step_by(threads as usize) {
                        // A port per flow: an ephemeral one could come back
                        // and be the same flow again.
                        let socket = udp_socket_from(20_000 + n as u16, to);
                        udp_echo(&socket, format!("flow {n}").as_bytes());
                    }
                });
            }
        })
    });
    let status = daemon.status();
    let k = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(k, "flows"), u64::from(flows), "{k}");
    assert_eq!(
        counter(k, "fallback_full") + counter(k, "fallback_other"),
        0,
        "{k}"
    );
    assert_eq!(counter(k, "packets_fwd"), u64::from(flows), "{k}");
    assert_eq!(counter(k, "packets_rev"), u64::from(flows), "{k}");
    let r = relay_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(r, "flows"), 0, "{r}");
    daemon.stop();
}

#[test]
fn stop_leaves_nothing_behind_and_a_new_start_works() {
    if !common::require_root("stop_leaves_nothing_behind_and_a_new_start_works") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    // Someone else's reservation must survive us.
    topo.forwarder
        .sysctl("net.ipv4.ip_local_reserved_ports", "1000-1010,2222");
    let before = reserved_ports(&topo.forwarder);
    assert_eq!(before, "1000-1010,2222");
    let _servers = BackendServers::start(&topo.backend);
    let to = listener_addr(&topo);
    for round in 0..2 {
        let daemon = Daemon::start(
            &topo.forwarder,
            &format!("restart{round}"),
            &turn_rules(&topo, ""),
        );
        assert_eq!(
            reserved_ports(&topo.forwarder),
            "1000-1010,2222,40000-59999"
        );
        let programs = our_programs(&topo, false);
        in_netns(&topo.client, || {
            let mut c = tcp_echo_conn(to);
            tcp_echo_round(&mut c, b"before stop");
            udp_echo(&udp_socket(to), b"before stop");
        });
        let status = daemon.status();
        assert_eq!(counter(kernel_rule(&status, "turn-tcp", "tcp"), "flows"), 1);
        assert_eq!(counter(kernel_rule(&status, "turn-udp", "udp"), "flows"), 1);
        daemon.stop();
        assert_nothing_left(&topo, &programs, &before);
    }
}

#[test]
fn the_programs_log_through_the_daemon() {
    if !common::require_root("the_programs_log_through_the_daemon") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start_logging(
        &topo.forwarder,
        "log",
        &turn_rules(&topo, ""),
        "info,forwarder::ebpf=debug",
    );
    let to = listener_addr(&topo);
    let client_port = in_netns(&topo.client, || {
        let u = udp_socket(to);
        udp_echo(&u, b"log me");
        u.local_addr().unwrap().port()
    });
    eventually("the new flow is logged", || {
        daemon.log_text().contains(&format!(
            "rule 1: new flow {}:{client_port} -> {}:3478",
            topo.client_link.b_addr,
            topo.backend_addr()
        ))
    });
    let log = daemon.stop();
    assert!(log.contains("forwarder::ebpf"), "{log}");
}
