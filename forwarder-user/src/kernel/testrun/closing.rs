//! Flows closing: resets, FINs, and when a closed flow's SNAT port goes
//! to a new flow.

use forwarder_common::{
    CT_DIR_FORWARD, CT_DIR_REVERSE, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW,
    CT_STATE_RESET, PROTO_TCP,
};

use super::fixture::*;
use super::packet::{Spec, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, view};
use super::*;
use forwarder_common::reasons::Fallback;

#[test]
fn a_reset_closes_the_flow_either_way() {
    if !require_root("a_reset_closes_the_flow_either_way") {
        return;
    }
    with_router(1024, standard(0), |k| {
        // From the client: the reset is forwarded and its side closes first.
        let syn = Spec::tcp(client(50005), listener(), TCP_SYN).build();
        let snat_port = assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn);
        let syn_ack = Spec::tcp(
            (BACKEND, BACKEND_PORT),
            (SNAT, snat_port),
            TCP_SYN | TCP_ACK,
        );
        assert_eq!(k.run_tc(&syn_ack.build()).verdict, TC_ACT_REDIRECT);
        let rst = Spec::tcp(client(50005), listener(), TCP_RST).build();
        assert_forwarded(&k.run_tc(&rst), PROTO_TCP, &rst);
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_RESET, 1),
                (CT_DIR_REVERSE, CT_STATE_ESTABLISHED, 0)
            ]
        );
    });
    with_router(1024, standard(0), |k| {
        // From the backend: restored to the client like any reply.
        let syn = Spec::tcp(client(50006), listener(), TCP_SYN).build();
        let snat_port = assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn);
        let rst = Spec::tcp(
            (BACKEND, BACKEND_PORT),
            (SNAT, snat_port),
            TCP_RST | TCP_ACK,
        );
        let back = k.run_tc(&rst.build());
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        assert_eq!(view(&back.packet).dst, CLIENT);
        let states = entry_states(k);
        assert_eq!(states[1], (CT_DIR_REVERSE, CT_STATE_RESET, 1), "{states:?}");
    });
}

#[test]
fn a_closed_flows_port_goes_to_a_new_flow_after_a_quiet_second() {
    if !require_root("a_closed_flows_port_goes_to_a_new_flow_after_a_quiet_second") {
        return;
    }
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50060);
        from_client(k, 50060, TCP_ACK | TCP_FIN);
        from_backend(k, TCP_ACK | TCP_FIN);
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_CLOSING, 1),
                (CT_DIR_REVERSE, CT_STATE_CLOSING, 0)
            ]
        );
        // Closed both ways but not yet quiet for a second: the port is held.
        assert_port_held(k, 50061);
        k.assert_reasons(TCP_RULE, &[(Fallback::SnatPortsExhausted.slot(0), 1)]);

        age_conntrack(k, std::time::Duration::from_secs(2));
        let syn = Spec::tcp(client(50062), listener(), TCP_SYN).build();
        assert_eq!(assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn), 40000);
        // The old pair is gone whole; the new flow's pair took its place.
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_NEW, 0),
                (CT_DIR_REVERSE, CT_STATE_NEW, 0)
            ]
        );
        let forward: Vec<u16> = k
            .conntrack()
            .iter()
            .filter(|(_, v)| v.direction == CT_DIR_FORWARD)
            .map(|(key, _)| u16::from_be(key.sport))
            .collect();
        assert_eq!(forward, vec![50062]);
        // The backend's answer reaches the new client.
        let syn_ack = Spec::tcp((BACKEND, BACKEND_PORT), (SNAT, 40000), TCP_SYN | TCP_ACK).build();
        let back = k.run_tc(&syn_ack);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        assert_eq!(view(&back.packet).dport, 50062);
        // A late segment of the old client no longer maps to the port.
        let late = Spec::tcp(client(50060), listener(), TCP_ACK).build();
        let out = k.run_tc(&late);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &late));
        assert_eq!(k.rule_counters(TCP_RULE).flows, 2);
    });
}

#[test]
fn a_client_reusing_its_port_after_a_close_starts_both_entries_over() {
    if !require_root("a_client_reusing_its_port_after_a_close_starts_both_entries_over") {
        return;
    }
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50100);
        from_backend(k, TCP_ACK | TCP_FIN);
        from_client(k, 50100, TCP_ACK | TCP_FIN);
        // The same client port again, at once: the same pair, started over.
        let syn = Spec::tcp(client(50100), listener(), TCP_SYN).build();
        assert_eq!(assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn), 40000);
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_NEW, 0),
                (CT_DIR_REVERSE, CT_STATE_NEW, 0)
            ]
        );
        // The backend's answer establishes it again, so the sweeper gives
        // it the established timeout, not the closing one.
        from_backend(k, TCP_SYN | TCP_ACK);
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_NEW, 0),
                (CT_DIR_REVERSE, CT_STATE_ESTABLISHED, 0)
            ]
        );
        assert_eq!(k.rule_counters(TCP_RULE).flows, 1);
    });
}

#[test]
fn a_port_stays_with_a_half_closed_backend_closed_or_sweepable_flow() {
    if !require_root("a_port_stays_with_a_half_closed_backend_closed_or_sweepable_flow") {
        return;
    }
    // Only the client sent FIN: the backend may still be sending.
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50070);
        from_client(k, 50070, TCP_ACK | TCP_FIN);
        age_conntrack(k, std::time::Duration::from_secs(2));
        assert_port_held(k, 50071);
    });
    // The backend closed first: it holds TIME_WAIT for the port, and a new
    // flow's SYN on it could be answered with a bare ACK.
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50080);
        from_backend(k, TCP_ACK | TCP_FIN);
        from_client(k, 50080, TCP_ACK | TCP_FIN);
        assert_eq!(
            entry_states(k),
            vec![
                (CT_DIR_FORWARD, CT_STATE_CLOSING, 0),
                (CT_DIR_REVERSE, CT_STATE_CLOSING, 1)
            ]
        );
        age_conntrack(k, std::time::Duration::from_secs(2));
        assert_port_held(k, 50081);
    });
    // Closed both ways, client first, but idle so long that it is the
    // sweeper's.
    with_router(1024, one_snat_port(), |k| {
        one_port_flow(k, 50090);
        from_client(k, 50090, TCP_ACK | TCP_FIN);
        from_backend(k, TCP_ACK | TCP_FIN);
        age_conntrack(k, std::time::Duration::from_secs(9));
        assert_port_held(k, 50091);
        assert_eq!(k.conntrack().len(), 2, "the old pair stays for the sweeper");
        k.assert_reasons(TCP_RULE, &[(Fallback::SnatPortsExhausted.slot(0), 1)]);
    });
}
