//! `path: xdp` through the daemon: XDP carries established flows where
//! the peers take XDP frames, and leaves the rest to TC.

use crate::common::harness::{
    Daemon, counter, forwarding_on, in_netns, interface, kernel_rule, relay_rule,
};
use crate::common::traffic::{BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket};
use crate::common::turn::{listener_addr, turn_like_run, turn_rules_on};
use crate::common::{self, Topology, eventually};

#[test]
fn turn_like_tcp_and_udp_at_once_with_a_256_mib_transfer_on_the_xdp_path() {
    if !common::require_root(
        "turn_like_tcp_and_udp_at_once_with_a_256_mib_transfer_on_the_xdp_path",
    ) {
        return;
    }
    let topo = Topology::new();
    topo.accept_xdp_redirects();
    let status = turn_like_run(&topo, "turn-xdp", "xdp");
    // XDP carried most packets of the established flows, both ways; TC
    // opened and closed them.
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        let all = counter(k, "packets_fwd") + counter(k, "packets_rev");
        let xdp = counter(k, "xdp_packets");
        assert!(
            xdp > 0 && xdp * 10 >= all * 9,
            "XDP carried {xdp} of {all}: {k}"
        );
    }
    // Both programs counted on both interfaces: XDP every frame, TC what
    // XDP passed up (each flow's handshake and close, at the least).
    for i in [&topo.client_link.a_if, &topo.backend_link.a_if] {
        let c = interface(&status, i);
        assert!(counter(c, "xdp_packets") >= 200, "{i}: {c}");
        assert!(counter(c, "xdp_bytes") > 0, "{i}: {c}");
        assert!(counter(c, "tc_packets") >= 21, "{i}: {c}");
        assert!(
            counter(c, "tc_packets") < counter(c, "xdp_packets"),
            "{i}: {c}"
        );
    }
}

#[test]
fn under_path_xdp_veths_whose_peers_take_no_xdp_frames_are_left_to_tc() {
    if !common::require_root("under_path_xdp_veths_whose_peers_take_no_xdp_frames_are_left_to_tc") {
        return;
    }
    let topo = Topology::new();
    // Complete checksums, so XDP would take the flows; but GRO off on the
    // peers, which would drop the frames XDP sends them.
    let peers = [
        (&topo.client, &topo.client_link.b_if),
        (&topo.backend, &topo.backend_link.b_if),
    ];
    for (ns, i) in peers {
        ns.exec("ethtool", &["-K", i, "gro", "off", "tx", "off"]);
    }
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(
        &topo.forwarder,
        "xdp-nogro",
        &turn_rules_on(&topo, "", "xdp"),
    );
    let to = listener_addr(&topo);
    let traffic = |rounds: u32| {
        in_netns(&topo.client, || {
            let udp = udp_socket(to);
            let mut tcp = tcp_echo_conn(to);
            for n in 0..rounds {
                udp_echo(&udp, format!("datagram {n}").as_bytes());
                tcp_echo_round(&mut tcp, format!("segment {n}").as_bytes());
            }
        })
    };
    traffic(100);
    let log = daemon.log_text();
    for i in [&topo.client_link.a_if, &topo.backend_link.a_if] {
        assert!(
            log.contains(&format!("{i} takes no XDP frames now")),
            "{i} left to TC:\n{log}"
        );
    }
    let xdp_packets = |status: &serde_json::Value| -> u64 {
        [("turn-tcp", "tcp"), ("turn-udp", "udp")]
            .iter()
            .map(|(alias, proto)| counter(kernel_rule(status, alias, proto), "xdp_packets"))
            .sum()
    };
    let status = daemon.status();
    assert_eq!(xdp_packets(&status), 0, "XDP sent nothing: {status}");

    // The peers take XDP frames from now on: the daemon sees it, and XDP
    // carries the flows' packets.
    for (ns, i) in peers {
        ns.exec("ethtool", &["-K", i, "gro", "on"]);
    }
    eventually("both interfaces taken back", || {
        daemon.log_text().matches("takes XDP frames again").count() == 2
    });
    traffic(100);
    let status = daemon.status();
    assert!(xdp_packets(&status) >= 200, "XDP carried them: {status}");
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        assert_eq!(counter(relay_rule(&status, alias, proto), "flows"), 0);
        assert_eq!(counter(k, "dropped"), 0, "{k}");
    }
    daemon.stop();
}

#[test]
fn senders_with_checksum_offload_stay_on_tc_under_path_xdp() {
    if !common::require_root("senders_with_checksum_offload_stay_on_tc_under_path_xdp") {
        return;
    }
    let topo = Topology::new();
    // Redirects would arrive, but the senders leave checksums partial.
    topo.client
        .exec("ethtool", &["-K", &topo.client_link.b_if, "gro", "on"]);
    topo.backend
        .exec("ethtool", &["-K", &topo.backend_link.b_if, "gro", "on"]);
    let status = turn_like_run(&topo, "turn-xdp-offload", "xdp");
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        assert_eq!(counter(k, "xdp_packets"), 0, "{k}");
    }
}
