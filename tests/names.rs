//! Integration tests: targets given as hostnames follow DNS (here the
//! forwarder namespace's own /etc/hosts, which `ip netns exec` takes from
//! /etc/netns/NAME/hosts) while flows run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::dns::{NetnsEtc, TestDns, Zone};
use crate::common::eventually;
use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, spawn_in};
use crate::common::traffic::{BackendServers, paced_transfer, udp_socket};
use crate::common::{self, Topology};
use crate::reload::{TaggedUdpEcho, udp_ask};

/// Forwarding on, and both backends a name may point to: 198.18.2.2
/// (answers UDP on 5001 with `one:`) and 198.18.2.3 (`two:`), each with the
/// TCP servers of [`BackendServers`].
pub fn two_backends(topo: &Topology) -> (BackendServers, [TaggedUdpEcho; 2]) {
    forwarding_on(topo);
    topo.backend.ip(&[
        "addr",
        "add",
        "198.18.2.3/24",
        "dev",
        &topo.backend_link.b_if,
    ]);
    let servers = BackendServers::start(&topo.backend);
    let echoes = [
        TaggedUdpEcho::start_on(&topo.backend, "198.18.2.2:5001".parse().unwrap(), "one:"),
        TaggedUdpEcho::start_on(&topo.backend, "198.18.2.3:5001".parse().unwrap(), "two:"),
    ];
    (servers, echoes)
}

const RULES: &str = "
dns: {refresh: 1s, min_ttl: 1s}
routes:
  bulk: {scheme: tcp, host: backend.test, port: 7001:3478}
  dgram: {scheme: udp, host: backend.test, port: 7004:5001}
";

#[test]
fn a_backend_name_that_moves_takes_new_flows_and_old_ones_finish() {
    if !common::require_root("a_backend_name_that_moves_takes_new_flows_and_old_ones_finish") {
        return;
    }
    let topo = Topology::new();
    let _backends = two_backends(&topo);
    let etc = NetnsEtc::new(&topo.forwarder);
    // DNS, asked only when /etc/hosts has no answer, says the name is gone.
    etc.set("resolv.conf", "nameserver 127.0.0.1\n");
    let dns = TestDns::start(
        &topo.forwarder,
        "127.0.0.1:53".parse().unwrap(),
        "backend.test",
        Zone::Gone,
    );
    let hosts = |text: &str| etc.set("hosts", text);
    hosts("198.18.2.2 backend.test\n");
    let daemon = Daemon::start(&topo.forwarder, "names", RULES);
    let fwd = topo.forwarder_addr();
    let at = move |port: u16| SocketAddr::from((fwd, port));

    const SIZE: u64 = 256 << 20;
    let progress = Arc::new(AtomicU64::new(0));
    let transfer = {
        let progress = progress.clone();
        spawn_in(&topo.client, move || {
            paced_transfer(at(7001), SIZE, progress)
        })
    };
    let old = in_netns(&topo.client, || udp_socket(at(7004)));
    assert_eq!(udp_ask(&old, b"a"), b"one:a");

    // The name moves: within a few refreshes new flows go to the new address.
    hosts("198.18.2.3 backend.test\n");
    let moved = Instant::now();
    let mut answer = Vec::new();
    while moved.elapsed() < Duration::from_secs(10) {
        let probe = in_netns(&topo.client, || udp_socket(at(7004)));
        answer = udp_ask(&probe, b"n");
        if answer == b"two:n" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = moved.elapsed();
    assert_eq!(answer, b"two:n", "new flows never followed the name");
    // One refresh is 1 s; allow three, and the probe's own time.
    assert!(
        took < Duration::from_secs(4),
        "new flows followed after {took:?}"
    );
    assert!(
        progress.load(Ordering::Relaxed) < SIZE,
        "the transfer ended too soon"
    );
    // The established flows keep the address they started with.
    assert_eq!(udp_ask(&old, b"b"), b"one:b");
    let (sent, got) = transfer.join().expect("the transfer");
    assert_eq!(sent, got, "the transfer to the old address arrived intact");

    // /etc/hosts answered: DNS was not asked.
    assert!(dns.queries().is_empty(), "{:?}", dns.queries());

    // A name that stops resolving keeps its last answer, said once.
    hosts("");
    eventually("the name fails", || {
        daemon
            .log_text()
            .contains("names: backend.test does not resolve")
    });
    // Later tries (1 s, then 2 s apart) fail too.
    dns.next_query(Duration::from_secs(4));
    dns.next_query(Duration::from_secs(7));
    let probe = in_netns(&topo.client, || udp_socket(at(7004)));
    assert_eq!(udp_ask(&probe, b"c"), b"two:c");
    let log = daemon.log_text();
    assert_eq!(
        log.matches("names: backend.test does not resolve").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("names: new flows of udp go to 198.18.2.3:5001"),
        "{log}"
    );
    hosts("198.18.2.3 backend.test\n");
    eventually("the name resolves again", || {
        daemon
            .log_text()
            .contains("names: backend.test resolves again")
    });
    let status = daemon.status();
    // Three flows on the kernel path, across two rule versions.
    let flows = counter(kernel_rule(&status, "dgram", "udp"), "flows");
    assert!(flows >= 3, "{flows} flows: {status}");
    daemon.stop();
}
