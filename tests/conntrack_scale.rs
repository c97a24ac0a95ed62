//! A big conntrack table: the sweeper reads it a bounded slice per tick
//! and removes exactly the flows past their timeout, both entries of a
//! pair together.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use forwarder::kernel::sweeper::pass_time;
use forwarder_common::{CtKey, PROTO_UDP};

use crate::common::conntrack::{conntrack, flow_pair, monotonic_ns};
use crate::common::harness::Daemon;
use crate::common::turn::turn_rules;
use crate::common::{self, Topology};

const S: u64 = 1_000_000_000;

#[test]
fn of_200k_flows_written_into_the_map_the_sweeper_removes_exactly_the_expired_ones() {
    if !common::require_root(
        "of_200k_flows_written_into_the_map_the_sweeper_removes_exactly_the_expired_ones",
    ) {
        return;
    }
    const PAIRS: u32 = 200_000;
    const LONE: u32 = 1_000;
    // No rule has this id: its flows live by the default timeouts
    // (udp_idle 120 s).
    const RULE: u32 = 4000;
    let topo = Topology::new();
    let rules = turn_rules(&topo, "kernel: {conntrack_size: 524288}\n");
    let daemon = Daemon::start(&topo.forwarder, "ctscale", &rules);
    let (mut map, info) = conntrack(daemon.pid()).unwrap();
    assert_eq!(info.max_entries, 524_288);
    let now = monotonic_ns();
    // Past udp_idle by half a minute (the clock counts from boot).
    let old = now.checked_sub(150 * S).expect("up for 150 s");
    let ahead = now + 60 * S;
    let mut stay: HashSet<CtKey> = HashSet::new();
    let mut go: HashSet<CtKey> = HashSet::new();
    // The sweeper runs while the map is written, and a pair is two
    // writes: a pair half written with its final times could show the
    // sweeper an idle entry whose other half is not there yet, which it
    // rightly removes. So every pair is written busy first, then given
    // its times: a half-updated pair still has a busy side.
    for n in 0..PAIRS {
        for (key, value) in flow_pair(n, PROTO_UDP, RULE, ahead, ahead) {
            map.insert(key, value, 0).unwrap();
        }
    }
    for n in 0..PAIRS {
        // Idle 150 s both ways goes; a pair with one side busy stays
        // (a timestamp ahead of the clock is not idle at all).
        let (fwd, rev, gone) = match n % 4 {
            0 => (old, old, true),
            1 => (now, now, false),
            2 => (old, now, false),
            _ => (ahead, old, false),
        };
        for (key, value) in flow_pair(n, PROTO_UDP, RULE, fwd, rev) {
            map.insert(key, value, 0).unwrap();
            if gone { &mut go } else { &mut stay }.insert(key);
        }
    }
    // Entries whose pair is gone, idle 150 s: reverse ones, then
    // forward ones (flows).
    for n in PAIRS..PAIRS + 2 * LONE {
        let (key, value) = flow_pair(n, PROTO_UDP, RULE, old, old)[usize::from(n < PAIRS + LONE)];
        map.insert(key, value, 0).unwrap();
        go.insert(key);
    }
    let written = Instant::now();
    let entries = (stay.len() + go.len()) as u64;
    assert_eq!(entries, 2 * u64::from(PAIRS) + 2 * u64::from(LONE));
    // The rules' shortest timeout is the default connect (5 s): ticks of
    // 1.25 s. The pass under way when the writing ended may have passed
    // some of them: two passes, and room for two busy cores.
    let latest = 2 * pass_time(entries, Duration::from_millis(1250)) + Duration::from_secs(3);
    let expected_flows = u64::from(PAIRS / 4 + LONE);
    common::eventually("the sweeper's pass over the written flows", || {
        let k = &daemon.status()["kernel"];
        let done = k["expired_flows"].as_u64() == Some(expected_flows)
            && k["conntrack_entries"].as_u64() == Some(stay.len() as u64);
        assert!(
            done || written.elapsed() < latest,
            "not within {latest:?}: {k}"
        );
        done
    });
    let left: HashSet<CtKey> = map.keys().map(Result::unwrap).collect();
    assert_eq!(left.len(), stay.len());
    assert!(
        left == stay,
        "the entries left are not exactly those that stay"
    );
    assert!(left.is_disjoint(&go));
    let k = &daemon.status()["kernel"];
    assert_eq!(k["expired_flows"].as_u64(), Some(expected_flows), "{k}");
    daemon.stop();
}
