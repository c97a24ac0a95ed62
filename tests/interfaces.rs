//! Integration tests: which interfaces the kernel path serves, and the
//! rules whose backends lie beyond them.

use std::net::SocketAddr;

use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule};
use crate::common::traffic::{BackendServers, udp_echo, udp_socket};
use crate::common::{self, Topology};

#[test]
fn a_backend_behind_an_interface_not_served_goes_to_the_relay() {
    if !common::require_root("a_backend_behind_an_interface_not_served_goes_to_the_relay") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // Only the client side is served: replies from the backend would come
    // in where no program restores them.
    let yaml = format!(
        "interfaces: [{}]\nroutes:\n  dgram: {{scheme: udp, host: 198.18.2.2, port: 7002:3478}}\n",
        topo.client_link.a_if
    );
    let daemon = Daemon::start(&topo.forwarder, "unserved", &yaml);
    let log = daemon.log_text();
    assert!(
        log.contains(&format!(
            "backend 198.18.2.2:3478 is reached through {}, which the kernel path does not serve",
            topo.backend_link.a_if
        )),
        "{log}"
    );
    let to = SocketAddr::from((topo.forwarder_addr(), 7002));
    let socket = in_netns(&topo.client, || udp_socket(to));
    udp_echo(&socket, b"through the relay");
    udp_echo(&socket, b"and again");
    let status = daemon.status();
    assert_eq!(
        counter(kernel_rule(&status, "dgram", "udp"), "flows"),
        0,
        "{status}"
    );
    assert_eq!(
        counter(relay_rule(&status, "dgram", "udp"), "flows"),
        1,
        "{status}"
    );
    daemon.stop();
}
