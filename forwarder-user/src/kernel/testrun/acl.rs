//! The TC program's ACL check on crafted first packets: allowed clients
//! open a kernel flow, denied ones are dropped (or a TCP SYN is answered
//! with an RST) and counted, and no flow is created for them.

use std::net::Ipv4Addr;

use forwarder_common::{
    PROTO_TCP, PROTO_UDP, RULE_F_ACL, RULE_F_ACL_DEFAULT_DENY, RULE_F_ACL_REJECT,
};

use super::fixture::{
    BACKEND, LISTEN_PORT, LISTENER, SNAT_PORTS, TCP_RULE, UDP_RULE, listener, rule, tables,
    with_router,
};
use super::packet::{ETH_LEN, Spec, TCP_ACK, TCP_RST, TCP_SYN, ip_csum_ok, l4_csum_ok, view};
use super::*;
use crate::acl::{AclAction, RuleAcl};
use crate::config::{Acl, Cidr};
use crate::kernel::tables::Tables;

fn cidr(text: &str) -> Cidr {
    let (addr, prefix) = text.split_once('/').expect("a CIDR");
    Cidr {
        addr: addr.parse().expect("an address"),
        prefix: prefix.parse().expect("a prefix"),
    }
}

/// TCP rule 0 and UDP rule 1 with the ACL `allow`/`deny`, as `compile`
/// would flag and fill them.
fn with_acl(allow: &[&str], deny: &[&str], action: AclAction) -> Tables {
    let acl = RuleAcl::combine(
        &Acl {
            allow: allow.iter().map(|c| cidr(c)).collect(),
            deny: deny.iter().map(|c| cidr(c)).collect(),
            action: Some(action),
            default_allow: None,
        },
        &Acl::default(),
    )
    .expect("entries");
    let mut flags = RULE_F_ACL;
    if !acl.default_allow {
        flags |= RULE_F_ACL_DEFAULT_DENY;
    }
    if acl.action == AclAction::Reject {
        flags |= RULE_F_ACL_REJECT;
    }
    let mut rows = rule(PROTO_TCP, TCP_RULE, flags, &[(BACKEND, 1)]);
    rows.extend(rule(PROTO_UDP, UDP_RULE, flags, &[(BACKEND, 1)]));
    let mut t = tables(rows, SNAT_PORTS);
    t.acl = acl.kernel_entries(TCP_RULE);
    t.acl.extend(acl.kernel_entries(UDP_RULE));
    t
}

fn first_packet(proto: u8, src: Ipv4Addr) -> Vec<u8> {
    if proto == PROTO_TCP {
        Spec::tcp((src, 50000), listener(), TCP_SYN).build()
    } else {
        Spec::udp((src, 50000), listener()).build()
    }
}

#[test]
fn the_most_specific_entry_decides_and_denied_clients_get_no_flow() {
    if !require_root("the_most_specific_entry_decides_and_denied_clients_get_no_flow") {
        return;
    }
    // An allow inside a wider deny: an allow list, so the rest is denied.
    let t = with_acl(
        &["198.18.1.2/32", "10.0.0.0/8"],
        &["198.18.1.0/24", "10.6.0.0/16"],
        AclAction::Drop,
    );
    with_router(1024, t, |k| {
        for (proto, rule_id) in [(PROTO_TCP, TCP_RULE), (PROTO_UDP, UDP_RULE)] {
            let cases = [
                ("198.18.1.2", true),  // the /32 allow inside the /24 deny
                ("198.18.1.3", false), // the /24 deny
                ("10.1.2.3", true),    // the /8 allow
                ("10.6.0.9", false),   // the /16 deny inside it
                ("192.0.2.1", false),  // no entry: an allow list denies
            ];
            for (src, allowed) in cases {
                let before = k.conntrack().len();
                let out = k.run_tc(&first_packet(proto, src.parse().unwrap()));
                if allowed {
                    assert_eq!(out.verdict, TC_ACT_REDIRECT, "{proto} from {src}");
                    assert_eq!(k.conntrack().len(), before + 2, "{proto} from {src}");
                } else {
                    assert_eq!(out.verdict, TC_ACT_SHOT, "{proto} from {src}");
                    assert_eq!(k.conntrack().len(), before, "{proto} from {src}");
                }
            }
            let c = k.rule_counters(rule_id);
            assert_eq!((c.flows, c.acl_denied), (2, 3), "rule {rule_id}");
        }
        assert!(k.relay_flows().is_empty(), "nothing left to the relay");
    });
}

#[test]
fn a_deny_list_lets_the_rest_through() {
    if !require_root("a_deny_list_lets_the_rest_through") {
        return;
    }
    with_router(
        1024,
        with_acl(&[], &["198.18.1.3/32"], AclAction::Drop),
        |k| {
            let out = k.run_tc(&first_packet(PROTO_UDP, "198.18.1.3".parse().unwrap()));
            assert_eq!(out.verdict, TC_ACT_SHOT);
            let out = k.run_tc(&first_packet(PROTO_UDP, "198.18.1.4".parse().unwrap()));
            assert_eq!(out.verdict, TC_ACT_REDIRECT);
            let c = k.rule_counters(UDP_RULE);
            assert_eq!((c.flows, c.acl_denied), (1, 1));
        },
    );
}

#[test]
fn a_rejected_syn_is_answered_with_an_rst_and_udp_is_dropped() {
    if !require_root("a_rejected_syn_is_answered_with_an_rst_and_udp_is_dropped") {
        return;
    }
    with_router(
        1024,
        with_acl(&[], &["198.18.1.0/24"], AclAction::Reject),
        |k| {
            let client = Ipv4Addr::new(198, 18, 1, 2);
            // Options and data on the SYN: the RST answers them all, and carries none.
            let mut spec = Spec::tcp((client, 50000), listener(), TCP_SYN);
            spec.payload = vec![7; 11];
            let syn = spec.build();
            // Trimmed, the skb is CHECKSUM_NONE (the receiver checks the bytes,
            // as here), so the test run's CHECKSUM_COMPLETE check does not apply.
            let out = k.run_tc(&syn);
            assert_eq!(out.verdict, TC_ACT_REDIRECT);
            let p = &out.packet;
            assert_eq!(p.len(), ETH_LEN + 40, "headers only");
            assert_eq!(
                (&p[0..6], &p[6..12]),
                (&syn[6..12], &syn[0..6]),
                "MACs swapped"
            );
            let v = view(p);
            assert_eq!(
                (v.src, v.sport, v.dst, v.dport),
                (LISTENER, LISTEN_PORT, client, 50000)
            );
            let tcp = &p[ETH_LEN + 20..];
            let seq = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
            let ack = u32::from_be_bytes(tcp[8..12].try_into().unwrap());
            // The builder's SYN has seq 1000; SYN and 11 bytes of data.
            assert_eq!((seq, ack), (0, 1000 + 1 + 11));
            assert_eq!(tcp[13], TCP_RST | TCP_ACK);
            assert_eq!(u16::from_be_bytes([p[ETH_LEN + 2], p[ETH_LEN + 3]]), 40);
            assert!(ip_csum_ok(p), "IPv4 checksum");
            assert!(l4_csum_ok(p), "TCP checksum");
            let udp = k.run_tc(&first_packet(PROTO_UDP, client)).verdict;
            assert_eq!(udp, TC_ACT_SHOT, "udp has no reset");
            assert!(k.conntrack().is_empty());
            assert_eq!(k.rule_counters(TCP_RULE).acl_denied, 1);
            assert_eq!(k.rule_counters(UDP_RULE).acl_denied, 1);
        },
    );
}

#[test]
fn established_flows_are_not_checked_again() {
    if !require_root("established_flows_are_not_checked_again") {
        return;
    }
    // Opened while allowed; the same client's later packets pass the
    // ACL that now denies it (new tables under the same rule ids).
    with_router(1024, with_acl(&[], &["10.0.0.0/8"], AclAction::Drop), |k| {
        let client = Ipv4Addr::new(198, 18, 1, 2);
        let syn = first_packet(PROTO_TCP, client);
        assert_eq!(k.run_tc(&syn).verdict, TC_ACT_REDIRECT);
        k.write_tables(&with_acl(&[], &["198.18.1.0/24"], AclAction::Drop));
        let ack = Spec::tcp((client, 50000), listener(), TCP_ACK).build();
        assert_eq!(
            k.run_tc(&ack).verdict,
            TC_ACT_REDIRECT,
            "the live flow goes on"
        );
        let other = Spec::tcp((client, 50001), listener(), TCP_SYN).build();
        assert_eq!(
            k.run_tc(&other).verdict,
            TC_ACT_SHOT,
            "a new flow is denied"
        );
        let c = k.rule_counters(TCP_RULE);
        assert_eq!((c.flows, c.acl_denied), (1, 1));
    });
}
