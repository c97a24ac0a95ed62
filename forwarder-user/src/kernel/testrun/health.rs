//! New flows of a rule whose backends' health changed, as the daemon
//! writes the change: only healthy backends are picked, none at all sends
//! the flow to the relay, and the half-written state between the flags
//! and the total weight never picks a backend that is down.

use std::net::Ipv4Addr;

use forwarder_common::{PROTO_TCP, RELAY_OWNER_KERNEL};

use super::fixture::{SNAT_PORTS, TCP_RULE, client, listener, rule, tables, with_router};
use super::packet::{Spec, TCP_SYN, view};
use super::*;
use crate::kernel::tables::Tables;
use forwarder_common::reasons::Fallback;

const FIRST: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// The router of `flows` has a neighbour entry for it too.
const SECOND: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 3);

fn two_backends() -> Tables {
    tables(
        rule(PROTO_TCP, TCP_RULE, 0, &[(FIRST, 1), (SECOND, 1)]),
        SNAT_PORTS,
    )
}

/// Where the SYNs of `n` new clients (ports from `first_port`) went: the
/// backend's address, or `None` when left to the relay.
fn syns(k: &Loaded, first_port: u16, n: u16) -> Vec<Option<Ipv4Addr>> {
    (first_port..first_port + n)
        .map(|port| {
            let out = k.run_tc(&Spec::tcp(client(port), listener(), TCP_SYN).build());
            match out.verdict {
                TC_ACT_REDIRECT => Some(view(&out.packet).dst),
                TC_ACT_UNSPEC => None,
                v => panic!("verdict {v}"),
            }
        })
        .collect()
}

#[test]
fn only_healthy_backends_take_new_flows() {
    if !require_root("only_healthy_backends_take_new_flows") {
        return;
    }
    let mut t = two_backends();
    with_router(1024, t.clone(), |k| {
        let both = syns(k, 20000, 40);
        assert!(both.contains(&Some(FIRST)) && both.contains(&Some(SECOND)));

        t.set_health(TCP_RULE, &[false, true]);
        k.write_health(&t, TCP_RULE);
        assert!(syns(k, 21000, 40).iter().all(|d| *d == Some(SECOND)));

        // Every backend down: the SYN goes to the relay, which resets it.
        let fallen = k.reasons(TCP_RULE).fallback(Fallback::NoBackend);
        t.set_health(TCP_RULE, &[false, false]);
        k.write_health(&t, TCP_RULE);
        assert_eq!(syns(k, 22000, 3), [None, None, None]);
        assert_eq!(fallen, 0);
        k.assert_reasons(TCP_RULE, &[(Fallback::NoBackend.slot(0), 3)]);
        let to_relay = k.relay_flows();
        assert_eq!(to_relay.len(), 3, "{to_relay:?}");
        assert!(to_relay.iter().all(|(_, f)| f.owner == RELAY_OWNER_KERNEL));

        t.set_health(TCP_RULE, &[true, false]);
        k.write_health(&t, TCP_RULE);
        assert!(syns(k, 23000, 40).iter().all(|d| *d == Some(FIRST)));
    });
}

#[test]
fn flags_written_before_the_total_never_pick_a_backend_that_is_down() {
    if !require_root("flags_written_before_the_total_never_pick_a_backend_that_is_down") {
        return;
    }
    let healthy = two_backends();
    with_router(1024, healthy.clone(), |k| {
        // The first backend's flag is cleared, the rule's total (2) not yet.
        let mut half = healthy.clone();
        half.set_health(TCP_RULE, &[false, true]);
        half.rules = healthy.rules.clone();
        k.write_tables(&half);
        let picked = syns(k, 30000, 60);
        assert!(!picked.contains(&Some(FIRST)), "{picked:?}");
        assert!(picked.contains(&Some(SECOND)), "{picked:?}");
    });
}
