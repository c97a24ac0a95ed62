//! Integration tests: targets given as hostnames follow DNS (here the
//! forwarder namespace's own /etc/hosts, which `ip netns exec` takes from
//! /etc/netns/NAME/hosts) while flows run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::eventually;
use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, spawn_in};
use crate::common::traffic::{BackendServers, udp_socket};
use crate::common::{self, Netns, Topology};
use crate::reload::{TaggedUdpEcho, paced_transfer, udp_ask};

/// `/etc/netns/NAME/hosts` for `ns`, removed (with its directory) on drop.
struct NetnsHosts {
    dir: PathBuf,
}

impl NetnsHosts {
    fn new(ns: &Netns, text: &str) -> NetnsHosts {
        let dir = PathBuf::from("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = NetnsHosts { dir };
        hosts.set(text);
        hosts
    }

    /// Rewrites the file in place: the daemon sees it through a bind mount
    /// of this very file, so it must keep its inode.
    fn set(&self, text: &str) {
        std::fs::write(self.dir.join("hosts"), text).unwrap();
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // /etc/netns itself stays only if something else is in it.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

const RULES: &str = "
dns: {refresh: 1s}
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
    forwarding_on(&topo);
    topo.backend.ip(&[
        "addr",
        "add",
        "198.18.2.3/24",
        "dev",
        &topo.backend_link.b_if,
    ]);
    let _servers = BackendServers::start(&topo.backend);
    let _one = TaggedUdpEcho::start_on(&topo.backend, "198.18.2.2:5001".parse().unwrap(), "one:");
    let _two = TaggedUdpEcho::start_on(&topo.backend, "198.18.2.3:5001".parse().unwrap(), "two:");
    let hosts = NetnsHosts::new(&topo.forwarder, "198.18.2.2 backend.test\n");
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
    hosts.set("198.18.2.3 backend.test\n");
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

    // A name that stops resolving keeps its last answer, said once.
    hosts.set("");
    std::thread::sleep(Duration::from_secs(3));
    let probe = in_netns(&topo.client, || udp_socket(at(7004)));
    assert_eq!(udp_ask(&probe, b"c"), b"two:c");
    let log = daemon.log_text();
    assert_eq!(
        log.matches("the last answers stay until the names resolve again")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("names: new flows of udp go to 198.18.2.3:5001"),
        "{log}"
    );
    hosts.set("198.18.2.3 backend.test\n");
    eventually("the name resolves again", || {
        daemon
            .log_text()
            .contains("names: every name resolves again")
    });
    let status = daemon.status();
    // Three flows on the kernel path, across two rule versions.
    let flows = counter(kernel_rule(&status, "dgram", "udp"), "flows");
    assert!(flows >= 3, "{flows} flows: {status}");
    daemon.stop();
}
