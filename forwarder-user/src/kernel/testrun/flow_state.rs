//! The state the TC program keeps for a flow, as the sweeper reads it: a
//! UDP flow is unanswered until the backend's first datagram, a half-closed
//! TCP flow keeps carrying the open side, and an RST ends the TIME_WAIT
//! guard.

use std::collections::HashMap as StdHashMap;
use std::time::Duration;

use forwarder_common::{
    CT_DIR_FORWARD, CT_DIR_REVERSE, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW,
    CT_STATE_RESET, CtKey, CtValue,
};

use super::fixture::{BACKEND, BACKEND_PORT, SNAT, client, listener, standard, with_router};
use super::packet::{Spec, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, view};
use super::*;
use crate::kernel::sweeper::{RuleTimeouts, expired_flows};
use crate::rules::Timeouts;

/// (direction, state) of every conntrack entry, sorted.
fn states(k: &Loaded) -> Vec<(u8, u8)> {
    let mut v: Vec<_> = k
        .conntrack()
        .iter()
        .map(|(_, v)| (v.direction, v.state))
        .collect();
    v.sort();
    v
}

fn redirected(k: &Loaded, p: &Spec) {
    assert_eq!(k.run_tc(&p.build()).verdict, TC_ACT_REDIRECT);
}

/// Whether the sweeper would remove the flow after `idle` without a packet.
fn expired_after(k: &Loaded, idle: Duration) -> bool {
    let entries: StdHashMap<CtKey, CtValue> = k.conntrack().into_iter().collect();
    let latest = entries.values().map(|v| v.last_seen_ns).max().unwrap();
    let timeouts = RuleTimeouts(vec![Some(Timeouts::default()); 2]);
    let expired = expired_flows(&entries, latest + idle.as_nanos() as u64, &timeouts);
    assert!(expired.is_empty() || expired.len() == entries.len());
    !expired.is_empty()
}

#[test]
fn a_udp_flow_is_unanswered_until_the_backend_answers() {
    if !require_root("a_udp_flow_is_unanswered_until_the_backend_answers") {
        return;
    }
    with_router(1024, standard(0), |k| {
        let out = k.run_tc(&Spec::udp(client(52000), listener()).build());
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        let snat = (SNAT, view(&out.packet).sport);
        // More from the client does not count as an answer.
        redirected(k, &Spec::udp(client(52000), listener()));
        let unanswered = vec![
            (CT_DIR_FORWARD, CT_STATE_NEW),
            (CT_DIR_REVERSE, CT_STATE_NEW),
        ];
        assert_eq!(states(k), unanswered);
        let t = Timeouts::default();
        assert!(!expired_after(k, t.udp_unreplied));
        assert!(expired_after(k, t.udp_unreplied + Duration::from_nanos(1)));

        redirected(k, &Spec::udp((BACKEND, BACKEND_PORT), snat));
        assert_eq!(
            states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_NEW),
                (CT_DIR_REVERSE, CT_STATE_ESTABLISHED)
            ]
        );
        assert!(!expired_after(k, t.udp_idle));
        assert!(expired_after(k, t.udp_idle + Duration::from_nanos(1)));
    });
}

#[test]
fn a_half_closed_tcp_flow_carries_the_open_side_until_both_closed() {
    if !require_root("a_half_closed_tcp_flow_carries_the_open_side_until_both_closed") {
        return;
    }
    with_router(1024, standard(0), |k| {
        let out = k.run_tc(&Spec::tcp(client(52001), listener(), TCP_SYN).build());
        let snat = (SNAT, view(&out.packet).sport);
        let from_backend = |flags| Spec::tcp((BACKEND, BACKEND_PORT), snat, flags);
        redirected(k, &from_backend(TCP_SYN | TCP_ACK));
        redirected(k, &Spec::tcp(client(52001), listener(), TCP_ACK | TCP_FIN));
        // The backend goes on answering.
        redirected(k, &from_backend(TCP_ACK));
        let half = vec![
            (CT_DIR_FORWARD, CT_STATE_CLOSING),
            (CT_DIR_REVERSE, CT_STATE_ESTABLISHED),
        ];
        assert_eq!(states(k), half);
        let t = Timeouts::default();
        assert!(!expired_after(k, t.tcp_half_closed), "past tcp_close");
        assert!(expired_after(
            k,
            t.tcp_half_closed + Duration::from_nanos(1)
        ));

        redirected(k, &from_backend(TCP_ACK | TCP_FIN));
        assert_eq!(
            states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_CLOSING),
                (CT_DIR_REVERSE, CT_STATE_CLOSING)
            ]
        );
        assert!(expired_after(k, t.tcp_close + Duration::from_nanos(1)));
    });
}

#[test]
fn a_reset_ends_the_flow_without_the_time_wait_guard() {
    if !require_root("a_reset_ends_the_flow_without_the_time_wait_guard") {
        return;
    }
    let t = Timeouts::default();
    let just_past_close = t.tcp_close + Duration::from_nanos(1);
    // A backend that refuses the connection.
    with_router(1024, standard(0), |k| {
        let out = k.run_tc(&Spec::tcp(client(52002), listener(), TCP_SYN).build());
        let snat = (SNAT, view(&out.packet).sport);
        redirected(
            k,
            &Spec::tcp((BACKEND, BACKEND_PORT), snat, TCP_RST | TCP_ACK),
        );
        assert_eq!(
            states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_NEW),
                (CT_DIR_REVERSE, CT_STATE_RESET)
            ]
        );
        assert!(expired_after(k, just_past_close), "no 60 s TIME_WAIT");
    });
    // The backend closed first (it would hold TIME_WAIT), then the client
    // reset: the backend's socket is gone, and so is the guard.
    with_router(1024, standard(0), |k| {
        let out = k.run_tc(&Spec::tcp(client(52003), listener(), TCP_SYN).build());
        let snat = (SNAT, view(&out.packet).sport);
        let from_backend = |flags| Spec::tcp((BACKEND, BACKEND_PORT), snat, flags);
        redirected(k, &from_backend(TCP_SYN | TCP_ACK));
        redirected(k, &from_backend(TCP_ACK | TCP_FIN));
        redirected(k, &Spec::tcp(client(52003), listener(), TCP_ACK | TCP_FIN));
        assert!(!expired_after(k, just_past_close), "TIME_WAIT guard");
        redirected(k, &Spec::tcp(client(52003), listener(), TCP_RST));
        assert_eq!(
            states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_RESET),
                (CT_DIR_REVERSE, CT_STATE_CLOSING)
            ]
        );
        assert!(expired_after(k, just_past_close));
    });
}
