//! Broadcast datagrams on a wildcard UDP rule are the stack's: the kernel
//! path opens no flow for them and leaves them as they are, so they reach
//! the relay's wildcard socket like any datagram to this host.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use crate::common::eventually;
use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule};
use crate::common::traffic::{BackendServers, udp_echo, udp_socket};
use crate::common::{Netns, Topology, require_root};

const LISTEN_PORT: u16 = 7878;

/// Gives `addr/24` on `interface` its subnet broadcast address, which the
/// topology leaves out.
fn with_broadcast(ns: &Netns, addr: Ipv4Addr, interface: &str) {
    let prefix = format!("{addr}/24");
    ns.ip(&["addr", "del", &prefix, "dev", interface]);
    ns.ip(&["addr", "add", &prefix, "brd", "+", "dev", interface]);
}

#[test]
fn broadcast_datagrams_on_a_wildcard_rule_are_left_to_the_stack() {
    if !require_root("broadcast_datagrams_on_a_wildcard_rule_are_left_to_the_stack") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let link = &topo.client_link;
    with_broadcast(&topo.forwarder, link.a_addr, &link.a_if);
    with_broadcast(&topo.client, link.b_addr, &link.b_if);
    let yaml = format!(
        "interfaces: [{}, {}]\nrelay: {{drain_timeout: 1s}}\nroutes:\n  bcast: {{scheme: udp, host: {}, port: {LISTEN_PORT}:3478}}\n",
        link.a_if,
        topo.backend_link.a_if,
        topo.backend_addr()
    );
    let daemon = Daemon::start(&topo.forwarder, "broadcast", &yaml);
    let subnet_broadcast = Ipv4Addr::new(198, 18, 1, 255);
    in_netns(&topo.client, || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        socket.set_broadcast(true).unwrap();
        // 255.255.255.255 has no route: it goes out of the interface named.
        socket2::SockRef::from(&socket)
            .bind_device(Some(link.b_if.as_bytes()))
            .unwrap();
        for to in [subnet_broadcast, Ipv4Addr::BROADCAST] {
            socket
                .send_to(b"to everyone", SocketAddr::from((to, LISTEN_PORT)))
                .unwrap();
        }
    });
    // The relay's socket got both, as they were sent.
    eventually("the relay receives both broadcasts", || {
        let status = daemon.status();
        counter(relay_rule(&status, "bcast", "udp"), "datagrams_to_backend") >= 2
    });
    let status = daemon.status();
    let kernel = kernel_rule(&status, "bcast", "udp");
    for field in ["flows", "packets_fwd", "fallback_other", "fallback_full"] {
        assert_eq!(counter(kernel, field), 0, "{field}: {kernel}");
    }
    // A datagram to the host's own address is still the kernel path's.
    in_netns(&topo.client, || {
        udp_echo(
            &udp_socket(SocketAddr::from((link.a_addr, LISTEN_PORT))),
            b"unicast",
        );
    });
    let status = daemon.status();
    assert_eq!(counter(kernel_rule(&status, "bcast", "udp"), "flows"), 1);
    daemon.stop();
}
