//! Traffic keeps a kernel flow alive: a packet refreshes `last_seen_ns` of
//! its side's conntrack entry (at most every 100 ms), which is what the
//! sweeper's expiry reads.

use std::time::Duration;

use forwarder_common::{CT_DIR_FORWARD, CT_DIR_REVERSE, PROTO_UDP};

use super::fixture::*;
use super::packet::{Spec, TCP_ACK};
use super::*;
use crate::kernel::sweeper::monotonic_ns;

/// Long past the 100 ms between refreshes.
const IDLE: Duration = Duration::from_secs(30);

/// `last_seen_ns` of the forward and the reverse entry of the one flow.
fn last_seen(k: &Loaded) -> (u64, u64) {
    let ct = k.conntrack();
    assert_eq!(ct.len(), 2, "one pair: {ct:?}");
    let of = |direction| {
        ct.iter()
            .find(|(_, v)| v.direction == direction)
            .map(|(_, v)| v.last_seen_ns)
            .expect("both directions")
    };
    (of(CT_DIR_FORWARD), of(CT_DIR_REVERSE))
}

/// Runs `send` and returns the monotonic clock before and after it.
fn timed(k: &mut Loaded, send: impl FnOnce(&mut Loaded)) -> (u64, u64) {
    let before = monotonic_ns();
    send(k);
    (before, monotonic_ns())
}

#[test]
fn tcp_packets_refresh_their_side_of_an_idle_flow() {
    if !require_root("tcp_packets_refresh_their_side_of_an_idle_flow") {
        return;
    }
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50100);
        age_conntrack(k, IDLE);
        let (_, aged_rev) = last_seen(k);

        let (before, after) = timed(k, |k| from_client(k, 50100, TCP_ACK));
        let (fwd, rev) = last_seen(k);
        assert!(
            (before..=after).contains(&fwd),
            "the client's packet refreshed the forward entry: {before} <= {fwd} <= {after}"
        );
        assert_eq!(rev, aged_rev, "the reverse entry saw nothing");

        let (before, after) = timed(k, |k| from_backend(k, TCP_ACK));
        let (fwd_now, rev) = last_seen(k);
        assert!(
            (before..=after).contains(&rev),
            "the backend's packet refreshed the reverse entry: {before} <= {rev} <= {after}"
        );
        assert_eq!(
            fwd_now, fwd,
            "the backend's packet leaves the forward entry"
        );
    });
}

#[test]
fn udp_datagrams_refresh_their_side_of_an_idle_flow() {
    if !require_root("udp_datagrams_refresh_their_side_of_an_idle_flow") {
        return;
    }
    with_router(1024, standard(0), |k| {
        let first = Spec::udp(client(50101), listener()).build();
        let snat_port = assert_forwarded(&k.run_tc(&first), PROTO_UDP, &first);
        age_conntrack(k, IDLE);
        let (aged_fwd, aged_rev) = last_seen(k);

        let (before, after) = timed(k, |k| {
            let reply = Spec::udp((BACKEND, BACKEND_PORT), (SNAT, snat_port)).build();
            assert_eq!(k.run_tc(&reply).verdict, TC_ACT_REDIRECT);
        });
        let (fwd, rev) = last_seen(k);
        assert!(
            (before..=after).contains(&rev),
            "the reply refreshed the reverse entry: {before} <= {rev} <= {after}"
        );
        assert_eq!(fwd, aged_fwd, "the forward entry saw nothing");
        assert!(rev > aged_rev);

        let (before, after) = timed(k, |k| {
            let again = Spec::udp(client(50101), listener()).build();
            assert_eq!(k.run_tc(&again).verdict, TC_ACT_REDIRECT);
        });
        let (fwd, _) = last_seen(k);
        assert!(
            (before..=after).contains(&fwd),
            "the next datagram refreshed the forward entry: {before} <= {fwd} <= {after}"
        );
    });
}
