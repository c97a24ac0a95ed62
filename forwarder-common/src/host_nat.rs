//! Living beside the host's own NAT (Docker's MASQUERADE, nftables
//! `masquerade`): the kernel and userspace halves of the contract.
//!
//! Masquerade keeps a sender's source port whenever nf_conntrack has no
//! entry using it, and kernel flows are not in nf_conntrack. So the host
//! may send from our SNAT address with a port of our SNAT range. A TC
//! egress program sees those packets after `POSTROUTING`:
//! - each (backend, port, protocol, source port) it sees goes into
//!   [`HOST_PORTS_MAP`], which the SNAT allocator never hands out while
//!   [`host_port_held`] says so;
//! - a host packet whose tuple a kernel flow already holds is moved to a
//!   free port of ours: a [`CT_DIR_HOST_OUT`] entry keyed by its tuple
//!   says which, and a [`CT_DIR_HOST_IN`] entry keyed by the backend's
//!   answer moves replies back before the stack's conntrack sees them.

use crate::{Addr, PROTO_TCP};

/// Name of the LRU map of [`HostPortKey`] to the `bpf_ktime_get_ns` the
/// port was last seen.
pub const HOST_PORTS_MAP: &str = "HOST_PORTS";
/// Tuples it remembers; the least recently seen go first when full.
pub const HOST_PORTS_SIZE: u32 = 65_536;

/// Conntrack directions of a host flow moved off a kernel flow's port
/// (beside `CT_DIR_FORWARD` and `CT_DIR_REVERSE`). Keyed by the host's
/// packet as it leaves (before the move): rewrite the source port to
/// `new_sport`.
pub const CT_DIR_HOST_OUT: u8 = 2;
/// Keyed by the backend's answer to the moved port: rewrite the
/// destination port back to `new_dport`, then let the stack have it.
pub const CT_DIR_HOST_IN: u8 = 3;

/// The rule id of host entries: no rule's (ids are below `RULE_IDS`).
pub const HOST_RULE_ID: u32 = u32::MAX;

/// Set on packets the kernel path redirects, so that the egress program
/// tells them from the host's own with the same tuple; cleared there.
/// Netfilter never sees these packets; only tc and TCX programs between
/// our ingress and egress hooks could.
pub const FORWARDED_MARK: u32 = 0x0800_0000;

/// A source port the host used toward a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct HostPortKey {
    /// The backend (the packet's destination).
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    /// The host's source port; network byte order.
    pub sport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

const SECOND_NS: u64 = 1_000_000_000;
/// Linux's nf_conntrack keeps an idle UDP flow at most 120 s
/// (`nf_conntrack_udp_timeout_stream`); a minute more covers its clock.
const UDP_HOLD_NS: u64 = 180 * SECOND_NS;
/// ...and an established TCP flow 5 days (`nf_conntrack_tcp_timeout_established`).
const TCP_HOLD_NS: u64 = 5 * 24 * 3600 * SECOND_NS;

/// How long after its last packet a host flow may still be in the host's
/// conntrack, and so its port must stay out of our hands.
#[inline(always)]
pub const fn host_hold_ns(proto: u8) -> u64 {
    if proto == PROTO_TCP {
        TCP_HOLD_NS
    } else {
        UDP_HOLD_NS
    }
}

/// Whether a port the host was seen using at `last_seen_ns` may still be
/// in use at `now_ns` (both `bpf_ktime_get_ns`).
#[inline(always)]
pub const fn host_port_held(proto: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) < host_hold_ns(proto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CT_DIR_FORWARD, CT_DIR_REVERSE, PROTO_UDP};

    #[test]
    fn a_host_port_is_held_for_as_long_as_the_hosts_conntrack_may_keep_it() {
        let t0 = 1_000 * SECOND_NS;
        for (proto, hold) in [(PROTO_UDP, 180), (PROTO_TCP, 5 * 24 * 3600)] {
            let hold = hold * SECOND_NS;
            assert!(host_port_held(proto, t0, t0));
            assert!(host_port_held(proto, t0, t0 + hold - 1));
            assert!(!host_port_held(proto, t0, t0 + hold));
            // A timestamp a racing CPU wrote just after `now` was read.
            assert!(host_port_held(proto, t0 + 5, t0));
        }
        assert!(host_hold_ns(PROTO_UDP) > 120 * SECOND_NS);
    }

    #[test]
    fn host_directions_are_neither_forward_nor_reverse() {
        let dirs = [
            CT_DIR_FORWARD,
            CT_DIR_REVERSE,
            CT_DIR_HOST_OUT,
            CT_DIR_HOST_IN,
        ];
        for (i, a) in dirs.iter().enumerate() {
            assert!(dirs[i + 1..].iter().all(|b| a != b));
        }
        assert_eq!(core::mem::size_of::<HostPortKey>(), 24);
        assert!(FORWARDED_MARK.is_power_of_two());
    }
}
