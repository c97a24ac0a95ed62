//! Integration tests: a backend name answered by a real DNS server in the
//! forwarder's namespace (its resolv.conf points there) is looked up again
//! when the answer's TTL, held within `dns.min_ttl`..`dns.max_ttl`, lapses.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::dns::{NetnsEtc, TestDns, Zone};
use crate::common::harness::{Daemon, counter, in_netns, kernel_rule, relay_rule, spawn_in};
use crate::common::traffic::{BackendServers, paced_transfer, udp_socket};
use crate::common::{self, TIMEOUT_MARGIN, Topology, eventually, expires_in_time};
use crate::names::two_backends;
use crate::reload::{TaggedUdpEcho, udp_ask};

const OLD: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const NEW: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 3);

/// The forwarder's namespace with a DNS server for `backend.test` on its
/// loopback, the [`two_backends`] (OLD answers UDP with `one:`, NEW with
/// `two:`) and the daemon with `dns` as its `dns:` section.
struct Named {
    daemon: Daemon,
    dns: TestDns,
    _etc: NetnsEtc,
    _backends: (BackendServers, [TaggedUdpEcho; 2]),
    topo: Topology,
}

impl Named {
    fn start(name: &str, dns: &str, ttl: u32) -> Named {
        let topo = Topology::new();
        let backends = two_backends(&topo);
        let etc = NetnsEtc::new(&topo.forwarder);
        // Only DNS answers for the name; the server is the only one asked.
        etc.set("hosts", "127.0.0.1 localhost\n");
        etc.set("resolv.conf", "nameserver 127.0.0.1\n");
        let server = TestDns::start(
            &topo.forwarder,
            "127.0.0.1:53".parse().unwrap(),
            "backend.test",
            Zone::A(OLD, ttl),
        );
        let rules = format!(
            "dns: {dns}
routes:
  bulk: {{scheme: tcp, host: backend.test, port: 7001:3478}}
  dgram: {{scheme: udp, host: backend.test, port: 7004:5001}}
"
        );
        let daemon = Daemon::start(&topo.forwarder, name, &rules);
        Named {
            daemon,
            dns: server,
            _etc: etc,
            _backends: backends,
            topo,
        }
    }

    fn at(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.topo.forwarder_addr(), port))
    }

    /// The tag of the backend a new UDP flow reaches.
    fn new_flow_goes_to(&self) -> Vec<u8> {
        let to = self.at(7004);
        in_netns(&self.topo.client, || udp_ask(&udp_socket(to), b"n"))
    }
}

/// Each gap between queries is at least `least` (the server was not asked
/// again before the answer lapsed) and at most 3x it plus the margin.
/// How late the test's server may note a query: its thread runs when a
/// busy core lets it, so a query can be noted tens of ms after the daemon
/// sent it (a CI run saw a refresh 21 ms "early" from the noted time).
const NOTED_LATE: Duration = Duration::from_millis(100);

fn assert_spaced(queries: &[Instant], least: Duration) {
    assert!(queries.len() >= 2, "{} queries", queries.len());
    for pair in queries.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap + NOTED_LATE >= least && gap <= 3 * least + TIMEOUT_MARGIN,
            "asked again after {gap:?}, the answer stands {least:?}: {:?}",
            gaps(queries)
        );
    }
}

fn gaps(queries: &[Instant]) -> Vec<Duration> {
    queries.windows(2).map(|p| p[1] - p[0]).collect()
}

#[test]
fn new_flows_follow_a_dns_answer_within_its_ttl_and_old_ones_finish() {
    if !common::require_root("new_flows_follow_a_dns_answer_within_its_ttl_and_old_ones_finish") {
        return;
    }
    let ttl = Duration::from_secs(2);
    let n = Named::start("dns-ttl", "{min_ttl: 1s, max_ttl: 1m}", 2);
    let old = in_netns(&n.topo.client, || udp_socket(n.at(7004)));
    assert_eq!(udp_ask(&old, b"a"), b"one:a");

    // Paced to last past the move (about 8 s at the least).
    const SIZE: u64 = 1 << 30;
    let progress = Arc::new(AtomicU64::new(0));
    let transfer = {
        let (progress, to) = (progress.clone(), n.at(7001));
        spawn_in(&n.topo.client, move || paced_transfer(to, SIZE, progress))
    };
    eventually("the transfer is under way", || {
        progress.load(Ordering::Relaxed) > 0
    });

    // Moved right after the daemon asked: the answer it got stands for the TTL.
    let asked = n.dns.next_query(3 * ttl + TIMEOUT_MARGIN);
    n.dns.set(Zone::A(NEW, 2));
    expires_in_time("new flows follow the name", asked - NOTED_LATE, ttl, || {
        n.new_flow_goes_to() == b"two:n"
    });
    assert!(
        progress.load(Ordering::Relaxed) < SIZE,
        "the transfer ended before the move"
    );
    assert_spaced(&n.dns.queries(), ttl);

    // The established flows keep the address they started with.
    assert_eq!(udp_ask(&old, b"b"), b"one:b");
    let (sent, got) = transfer.join().expect("the transfer");
    assert_eq!(sent, got, "the transfer to the old address arrived intact");
    // The kernel path carried them, across two rule versions.
    let status = n.daemon.status();
    assert_eq!(
        counter(kernel_rule(&status, "bulk", "tcp"), "flows"),
        1,
        "{status}"
    );
    assert_eq!(
        counter(relay_rule(&status, "bulk", "tcp"), "flows"),
        0,
        "{status}"
    );
    assert_eq!(
        counter(relay_rule(&status, "dgram", "udp"), "flows"),
        0,
        "{status}"
    );
    let log = n.daemon.log_text();
    assert!(
        log.contains("names: new flows of udp go to 198.18.2.3:5001"),
        "{log}"
    );
    assert!(
        log.contains("names: new flows of tcp go to 198.18.2.3:3478"),
        "{log}"
    );
    n.daemon.stop();
}

#[test]
fn a_long_ttl_is_cut_to_max_ttl_and_a_failing_name_backs_off() {
    if !common::require_root("a_long_ttl_is_cut_to_max_ttl_and_a_failing_name_backs_off") {
        return;
    }
    let (min_ttl, max_ttl) = (Duration::from_secs(1), Duration::from_secs(3));
    let n = Named::start("dns-max", "{min_ttl: 1s, max_ttl: 3s}", 3600);
    assert_eq!(n.new_flow_goes_to(), b"one:n");
    // An edit not reloaded neither holds the new answer back nor comes with it.
    let text = std::fs::read_to_string(n.daemon.config_path()).unwrap();
    let edited = format!("{text}  extra: {{scheme: udp, host: 198.18.2.2, port: 7009:5001}}\n");
    std::fs::write(n.daemon.config_path(), edited).unwrap();
    let asked = n.dns.next_query(3 * max_ttl + TIMEOUT_MARGIN);
    n.dns.set(Zone::A(NEW, 3600));
    expires_in_time(
        "new flows follow the name",
        asked - NOTED_LATE,
        max_ttl,
        || n.new_flow_goes_to() == b"two:n",
    );
    assert_spaced(&n.dns.queries(), max_ttl);
    let status = n.daemon.status();
    assert!(!status.to_string().contains("\"extra\""), "{status}");

    // The name is gone: the last answer stays, said once, and the lookups
    // back off from min_ttl, doubling, to max_ttl.
    let last_good = n.dns.next_query(3 * max_ttl + TIMEOUT_MARGIN);
    n.dns.set(Zone::Gone);
    let mut failed = Vec::new();
    for _ in 0..4 {
        failed.push(n.dns.next_query(3 * max_ttl + TIMEOUT_MARGIN));
    }
    let waits = [max_ttl, min_ttl, 2 * min_ttl, max_ttl];
    let mut prev = last_good;
    for (at, wait) in failed.iter().zip(waits) {
        let gap = *at - prev;
        assert!(
            gap + NOTED_LATE >= wait && gap <= 3 * wait + TIMEOUT_MARGIN,
            "a try {gap:?} after the one before, {wait:?} expected: {:?}",
            gaps(&failed)
        );
        prev = *at;
    }
    assert_eq!(n.new_flow_goes_to(), b"two:n");
    n.dns.set(Zone::A(NEW, 3600));
    eventually("the name resolves again", || {
        n.daemon
            .log_text()
            .contains("names: backend.test resolves again")
    });
    let log = n.daemon.log_text();
    assert_eq!(
        log.matches("names: backend.test does not resolve").count(),
        1,
        "{log}"
    );
    assert_eq!(n.new_flow_goes_to(), b"two:n");
    n.daemon.stop();
}

#[test]
fn a_short_ttl_is_stretched_to_min_ttl() {
    if !common::require_root("a_short_ttl_is_stretched_to_min_ttl") {
        return;
    }
    let min_ttl = Duration::from_secs(4);
    let n = Named::start("dns-min", "{min_ttl: 4s, max_ttl: 1m}", 1);
    for _ in 0..3 {
        n.dns.next_query(3 * min_ttl + TIMEOUT_MARGIN);
    }
    // The load's query, then three more, none sooner than min_ttl after
    // the one before.
    let queries = n.dns.queries();
    assert_eq!(queries.len(), 4, "{:?}", gaps(&queries));
    assert_spaced(&queries, min_ttl);
    assert_eq!(n.new_flow_goes_to(), b"one:n");
    n.daemon.stop();
}
