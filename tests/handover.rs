//! The kernel path starting under a relay that already carries flows.

use std::time::Duration;

use forwarder::kernel::{KernelPath, StartOptions};

use crate::common::harness::{forwarding_on, in_netns, runtime};
use crate::common::traffic::{BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket};
use crate::common::turn::{listener_addr, turn_rules};
use crate::common::{self, Topology, eventually};

#[test]
fn flows_the_relay_carries_when_the_kernel_path_starts_stay_with_the_relay() {
    if !common::require_root(
        "flows_the_relay_carries_when_the_kernel_path_starts_stay_with_the_relay",
    ) {
        return;
    }
    use forwarder::kernel::RelayFlows;
    use forwarder::relay::Relay;
    use std::sync::Arc;

    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let compiled = forwarder::config::load_str(&turn_rules(&topo, ""), "midflow.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    // Its workers, where the relay's tasks connect, live in that namespace.
    let rt = in_netns(&topo.forwarder, runtime);
    let flows = Arc::new(RelayFlows::new());
    let relay = in_netns(&topo.forwarder, || {
        rt.block_on(Relay::start(
            &compiled.listeners,
            compiled.relay,
            flows.clone(),
        ))
    })
    .expect("relay");
    let to = listener_addr(&topo);

    // Flows open before the kernel path exists: the relay's.
    let (mut old_tcp, old_udp) = in_netns(&topo.client, || {
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"before");
        let u = udp_socket(to);
        udp_echo(&u, b"before");
        (c, u)
    });
    eventually("the relay reports both flows", || flows.len() == 2);

    let options = StartOptions {
        relay_flows: Some(flows.clone()),
        ..StartOptions::default()
    };
    let kernel = in_netns(&topo.forwarder, || {
        rt.block_on(KernelPath::start_with(&compiled, &options))
    })
    .expect("kernel path");
    let relay_before: Vec<_> = relay.counters();

    in_netns(&topo.client, || {
        for n in 0..10u32 {
            tcp_echo_round(&mut old_tcp, format!("after {n}").as_bytes());
            udp_echo(&old_udp, format!("after {n}").as_bytes());
        }
        // New flows: the kernel path's.
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"new");
        udp_echo(&udp_socket(to), b"new");
    });
    let k = kernel.counters().unwrap();
    for r in &k.rules {
        assert_eq!(r.flows, 1, "only the new flow is the kernel's: {r:?}");
    }
    let relay_after = relay.counters();
    for (before, after) in relay_before.iter().zip(&relay_after) {
        assert_eq!(after.flows, 1, "{after:?}");
        assert!(
            after.bytes_to_backend > before.bytes_to_backend,
            "the old flow went on through the relay: {before:?} -> {after:?}"
        );
    }
    drop((old_tcp, old_udp));
    in_netns(&topo.forwarder, || kernel.stop()).expect("stop");
    rt.block_on(relay.shutdown(Duration::ZERO));
}
