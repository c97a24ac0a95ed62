//! The TURN-like layout through the daemon: TCP and UDP on 7878 of the
//! forwarder namespace to the backend's 3478.

use std::net::SocketAddr;

use super::Topology;
use super::harness::{
    Daemon, counter, forwarding_on, in_netns, kernel_rule, program_loaded, relay_rule,
    reserved_ports, seen,
};
use super::traffic::{
    BackendServers, tcp_echo_conn, tcp_echo_round, tcp_hash_transfer, udp_echo, udp_socket,
};

pub const LISTEN_PORT: u16 = 7878;

/// TCP and UDP on 7878 to the backend's 3478 (a TURN server's layout).
pub fn turn_rules(topo: &Topology, extra: &str) -> String {
    turn_rules_on(topo, extra, "auto")
}

/// [`turn_rules`] with both rules on `path`.
pub fn turn_rules_on(topo: &Topology, extra: &str, path: &str) -> String {
    format!(
        "interfaces: [{a}, {b}]\n\
         relay: {{drain_timeout: 1s}}\n\
         {extra}\
         routes:\n\
         \x20 turn-tcp: {{scheme: tcp, host: {backend}, port: {LISTEN_PORT}:3478, path: {path}}}\n\
         \x20 turn-udp: {{scheme: udp, host: {backend}, port: {LISTEN_PORT}:3478, path: {path}}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        backend = topo.backend_addr(),
    )
}

pub fn listener_addr(topo: &Topology) -> SocketAddr {
    SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT))
}

/// After a stop: nothing of ours on either interface, the programs gone,
/// the reserved ports as they were.
pub fn assert_nothing_left(topo: &Topology, programs: &[u32], reserved_before: &str) {
    for i in [&topo.client_link.a_if, &topo.backend_link.a_if] {
        let after = seen(&topo.forwarder, i);
        assert!(after.nothing(), "{i}: {after:?}");
    }
    for &id in programs {
        assert!(!program_loaded(id), "program {id} still loaded");
    }
    assert_eq!(reserved_ports(&topo.forwarder), reserved_before);
}

/// The ids of our programs on the client-side interface: TC, and XDP
/// exactly when `with_xdp`.
pub fn our_programs(topo: &Topology, with_xdp: bool) -> Vec<u32> {
    let s = seen(&topo.forwarder, &topo.client_link.a_if);
    assert_eq!(s.tcx_progs.len(), 1, "TC attached: {s:?}");
    assert_eq!(s.xdp_prog.is_some(), with_xdp, "XDP attached: {s:?}");
    let mut ids = s.tcx_progs.clone();
    ids.extend(s.xdp_prog);
    for &id in &ids {
        assert!(program_loaded(id), "program {id} loaded while running");
    }
    ids
}

/// The TURN-like run on `path`: a 256 MiB TCP transfer with UDP and short
/// TCP flows on the same port at once, through the daemon. Checks what
/// holds on any kernel path (the data, the flows, nothing for the relay,
/// nothing left after the stop) and returns the last status.
/// `name` keeps the daemon's files apart from those of tests running at
/// the same time.
pub fn turn_like_run(topo: &Topology, name: &str, path: &str) -> serde_json::Value {
    forwarding_on(topo);
    let _servers = BackendServers::start(&topo.backend);
    let reserved_before = reserved_ports(&topo.forwarder);
    let daemon = Daemon::start(&topo.forwarder, name, &turn_rules_on(topo, "", path));
    assert_eq!(reserved_ports(&topo.forwarder), "40000-59999");
    let programs = our_programs(topo, path == "xdp");
    let to = listener_addr(topo);
    let size: u64 = 256 << 20;

    let (sent, received) = in_netns(&topo.client, || {
        std::thread::scope(|s| {
            let bulk = s.spawn(|| tcp_hash_transfer(to, size));
            // Meanwhile, on the same port: UDP and short TCP flows.
            let udp = udp_socket(to);
            for n in 0..200u32 {
                udp_echo(&udp, format!("turn datagram {n}").as_bytes());
            }
            for n in 0..20u32 {
                let mut c = tcp_echo_conn(to);
                tcp_echo_round(&mut c, format!("turn stream {n}").as_bytes());
            }
            bulk.join().unwrap()
        })
    });
    assert_eq!(sent, received, "SHA-256 of the 256 MiB at the backend");

    let status = daemon.status();
    let tcp = kernel_rule(&status, "turn-tcp", "tcp");
    let udp = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(tcp, "flows"), 21, "{tcp}");
    assert!(counter(tcp, "bytes_fwd") >= size, "{tcp}");
    assert!(counter(tcp, "packets_rev") > 0, "{tcp}");
    assert_eq!(counter(udp, "flows"), 1, "{udp}");
    // Each datagram once each way: no resend, no loss.
    assert_eq!(counter(udp, "packets_fwd"), 200, "{udp}");
    assert_eq!(counter(udp, "packets_rev"), 200, "{udp}");
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        assert_eq!(
            counter(k, "fallback_full") + counter(k, "fallback_other"),
            0,
            "{k}"
        );
        let r = relay_rule(&status, alias, proto);
        assert_eq!(counter(r, "flows"), 0, "the relay carried nothing: {r}");
        assert_eq!(counter(r, "bytes_to_backend"), 0, "{r}");
    }

    daemon.stop();
    assert_nothing_left(topo, &programs, &reserved_before);
    status
}
