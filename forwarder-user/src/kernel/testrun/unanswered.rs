//! When no SNAT port toward a backend is free, a new UDP flow takes the
//! port of one the backend never answered and that has been quiet for a
//! second; answered flows, young ones and the sweeper's keep theirs.

use std::time::Duration;

use forwarder_common::reasons::Fallback;
use forwarder_common::{CT_DIR_FORWARD, CT_STATE_ESTABLISHED, CtKey, CtValue, PROTO_UDP};

use super::fixture::*;
use super::packet::{Spec, view};
use super::*;

/// A datagram from client port `cport`, forwarded through SNAT port `snat`.
fn forwarded(k: &Loaded, cport: u16, snat: u16) {
    let p = Spec::udp(client(cport), listener()).build();
    assert_eq!(assert_forwarded(&k.run_tc(&p), PROTO_UDP, &p), snat);
}

/// A datagram from client port `cport` finds no port: the relay gets it.
fn left_to_relay(k: &Loaded, cport: u16) {
    let p = Spec::udp(client(cport), listener()).build();
    let out = k.run_tc(&p);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &p));
}

/// The backend's datagram to SNAT port 40000: the client port it reaches.
fn answer(k: &Loaded) -> u16 {
    let p = Spec::udp((BACKEND, BACKEND_PORT), (SNAT, 40000)).build();
    let out = k.run_tc(&p);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let v = view(&out.packet);
    assert_eq!((v.src, v.sport, v.dst), (LISTENER, LISTEN_PORT, CLIENT));
    v.dport
}

/// New flows the rule left to the relay for want of a SNAT port.
fn exhausted(k: &Loaded) -> u64 {
    k.reasons(UDP_RULE).fallback(Fallback::SnatPortsExhausted)
}

/// The client ports of the forward entries.
fn clients(k: &Loaded) -> Vec<u16> {
    let mut ports: Vec<u16> = k
        .conntrack()
        .iter()
        .filter(|(_, v)| v.direction == CT_DIR_FORWARD)
        .map(|(key, _)| u16::from_be(key.sport))
        .collect();
    ports.sort_unstable();
    ports
}

#[test]
fn an_unanswered_flow_quiet_for_a_second_gives_its_port_to_a_new_flow() {
    if !require_root("an_unanswered_flow_quiet_for_a_second_gives_its_port_to_a_new_flow") {
        return;
    }
    with_router(1024, one_snat_port(), |k| {
        forwarded(k, 50200, 40000);
        age_conntrack(k, Duration::from_secs(2));
        forwarded(k, 50201, 40000);
        let c = k.rule_counters(UDP_RULE);
        assert_eq!((c.flows, c.unanswered_taken_over, exhausted(k)), (2, 1, 0));
        // The old pair is gone whole; the new flow's pair took its place.
        assert_eq!(clients(k), [50201]);
        assert_eq!(k.conntrack().len(), 2);
        // The backend's answer reaches the flow that holds the port now.
        assert_eq!(answer(k), 50201);
        // The old client's next datagram is not sent on the new flow's
        // port: it is a new flow, and finds no port (the new flow is young).
        left_to_relay(k, 50200);
        let c = k.rule_counters(UDP_RULE);
        assert_eq!((c.unanswered_taken_over, exhausted(k)), (1, 1));
        assert_eq!(clients(k), [50201]);
    });
}

#[test]
fn an_answered_flow_keeps_its_port_however_quiet() {
    if !require_root("an_answered_flow_keeps_its_port_however_quiet") {
        return;
    }
    with_router(1024, one_snat_port(), |k| {
        forwarded(k, 50210, 40000);
        assert_eq!(answer(k), 50210);
        age_conntrack(k, Duration::from_secs(2));
        left_to_relay(k, 50211);
        let c = k.rule_counters(UDP_RULE);
        assert_eq!((c.unanswered_taken_over, exhausted(k)), (0, 1));
        assert_eq!(clients(k), [50210]);
        forwarded(k, 50210, 40000);
    });
    // A forward entry marked established (as XDP does) counts as answered
    // even where the reverse one is not.
    with_router(1024, one_snat_port(), |k| {
        forwarded(k, 50215, 40000);
        age_conntrack(k, Duration::from_secs(2));
        set_forward_state(k, CT_STATE_ESTABLISHED);
        left_to_relay(k, 50216);
        assert_eq!(k.rule_counters(UDP_RULE).unanswered_taken_over, 0);
        assert_eq!(clients(k), [50215]);
    });
}

#[test]
fn an_unanswered_flow_keeps_its_port_while_young_active_or_the_sweepers() {
    if !require_root("an_unanswered_flow_keeps_its_port_while_young_active_or_the_sweepers") {
        return;
    }
    // Created half a second ago.
    with_router(1024, one_snat_port(), |k| {
        forwarded(k, 50220, 40000);
        age_conntrack(k, Duration::from_millis(500));
        left_to_relay(k, 50221);
        assert_eq!(clients(k), [50220]);
        let c = k.rule_counters(UDP_RULE);
        assert_eq!((c.unanswered_taken_over, exhausted(k)), (0, 1));
    });
    // Old, but its client sent again just now.
    with_router(1024, one_snat_port(), |k| {
        forwarded(k, 50230, 40000);
        age_conntrack(k, Duration::from_secs(5));
        forwarded(k, 50230, 40000);
        left_to_relay(k, 50231);
        assert_eq!(clients(k), [50230]);
    });
    // Quiet past the window's end (udp_unreplied less the guard): the
    // sweeper removes it, and the kernel must not act on the same pair.
    with_router(1024, one_snat_port(), |k| {
        forwarded(k, 50240, 40000);
        age_conntrack(k, Duration::from_secs(29) + Duration::from_millis(500));
        left_to_relay(k, 50241);
        assert_eq!(clients(k), [50240]);
    });
    // No window (udp_unreplied too short to leave one): never taken.
    let mut no_window = one_snat_port();
    no_window.settings.unanswered_reuse_after_ns = 0;
    no_window.settings.unanswered_reuse_before_ns = 0;
    with_router(1024, no_window, |k| {
        forwarded(k, 50250, 40000);
        age_conntrack(k, Duration::from_secs(2));
        left_to_relay(k, 50251);
        assert_eq!(clients(k), [50250]);
    });
}

/// Sets the state of every forward entry.
fn set_forward_state(k: &mut Loaded, state: u8) {
    let entries = k.conntrack();
    let mut map: aya::maps::HashMap<_, CtKey, CtValue> =
        aya::maps::HashMap::try_from(k.ebpf.map_mut("CONNTRACK").unwrap()).unwrap();
    for (key, mut value) in entries {
        if value.direction == CT_DIR_FORWARD {
            value.state = state;
            map.insert(key, value, 0).unwrap();
        }
    }
}
