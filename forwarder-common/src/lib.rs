//! Map keys and values shared by the eBPF programs and the daemon.
//!
//! Every type here is `#[repr(C)]`, has explicit padding and is the only
//! definition of its layout. Conventions:
//! - addresses are [`Addr`]: IPv6, IPv4 as IPv4-mapped (`::ffff:a.b.c.d`),
//!   each word as it sits in the packet (network byte order);
//! - ports are in network byte order, as read from the packet.
#![no_std]

/// An IPv6 address as four words in network byte order; IPv4 is mapped.
pub type Addr = [u32; 4];

pub mod csum;
pub mod host_nat;
pub mod icmp;
pub mod mss;
pub mod ranges;
pub mod reasons;
pub mod snat;
pub mod steer;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The IPv4-mapped form of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn addr_from_ipv4_be(v4: u32) -> Addr {
    [0, 0, u32::from_be(0x0000_ffff), v4]
}

/// The IPv4 address (network byte order) if `addr` is IPv4-mapped.
#[inline(always)]
pub const fn addr_ipv4_be(addr: &Addr) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_be(0x0000_ffff) {
        Some(addr[3])
    } else {
        None
    }
}

/// The all-zero address: a wildcard bind in [`RuleKey`].
pub const ADDR_ANY: Addr = [0; 4];

/// Most rules the kernel tables hold.
pub const MAX_RULES: u32 = 16_384;
/// Rule ids, and so the size of the arrays indexed by one: twice
/// [`MAX_RULES`], so that a reload can write every rule anew beside the
/// running ones (a changed rule takes a fresh id; see the daemon's reload).
pub const RULE_IDS: u32 = 2 * MAX_RULES;
/// Most backends one rule may have; `BACKENDS` is indexed
/// `rule_id * MAX_BACKENDS_PER_RULE + n`.
pub const MAX_BACKENDS_PER_RULE: u32 = 16;

/// Which rule a packet's destination matches. Looked up with the exact bind
/// address first, then with [`ADDR_ANY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RuleKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The rule must not be taken by the kernel path: its flows go to the relay.
pub const RULE_F_RELAY: u32 = 1 << 0;
/// DNAT only: the client's address is kept, replies must route back via us.
pub const RULE_F_PRESERVE_CLIENT_IP: u32 = 1 << 1;
/// Established flows may be carried by XDP.
pub const RULE_F_XDP: u32 = 1 << 2;
/// The rule has an ACL: a new flow's client is looked up in `ACL`.
pub const RULE_F_ACL: u32 = 1 << 3;
/// A client no ACL entry matches is denied (the ACL has an allow entry).
pub const RULE_F_ACL_DEFAULT_DENY: u32 = 1 << 4;
/// A denied TCP SYN is answered with an RST (else dropped, as is UDP).
pub const RULE_F_ACL_REJECT: u32 = 1 << 5;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleValue {
    /// Index into per-rule arrays (backends, counters); below [`RULE_IDS`].
    pub rule_id: u32,
    /// `RULE_F_*`.
    pub flags: u32,
    /// Backends in use at `BACKENDS[rule_id * MAX_BACKENDS_PER_RULE ..][..backend_count]`.
    pub backend_count: u32,
    /// Sum of the weights of the healthy backends; 0 means none can be picked.
    pub total_weight: u32,
}

/// Most entries the `ACL` trie holds: each rule's entries, the global
/// ones copied into each rule, twice over while a reload swaps rules.
pub const MAX_ACL_ENTRIES: u32 = 131_072;

/// The data of an `ACL` trie key: a rule, an address family and a client
/// network. Its prefix length is 64 (rule id and family) plus the
/// network's, in the IPv4-mapped 128-bit form, so that a lookup never
/// crosses rules or families (`::/0` does not cover IPv4 clients).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AclKey {
    /// Network byte order: the trie matches bits from the first byte.
    pub rule_id_be: u32,
    /// `ACL_FAMILY_*`.
    pub family: u32,
    pub addr: Addr,
}

pub const ACL_FAMILY_V4: u32 = 4;
pub const ACL_FAMILY_V6: u32 = 6;
/// The bits of an `AclKey` before the address.
pub const ACL_KEY_HEAD_BITS: u32 = 64;

/// `ACL` values.
pub const ACL_DENY: u32 = 0;
pub const ACL_ALLOW: u32 = 1;

/// The backend may be picked.
pub const BACKEND_F_HEALTHY: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: Addr,
    /// The source address the forwarder uses toward this backend (SNAT).
    /// Filled by the daemon from the routing table.
    pub snat_addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub weight: u16,
    /// `BACKEND_F_*`.
    pub flags: u32,
}

/// One direction of a flow, as seen on the wire at ingress.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    /// The key of packets flowing the other way.
    #[inline(always)]
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// The datagram a fragment belongs to, as IP reassembly names it: maps a
/// kernel flow's later fragments (which carry no ports) to the flow its
/// first fragment had.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// The identification field: IPv4's 16 bits as on the wire, widened
    /// (IPv6's fragment header has 32).
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REVERSE: u8 = 1;

/// States of one direction's entry, ordered: a later one is further along.
/// Not yet answered by the backend (a forward entry stays here until it
/// closes; its reverse pair tells whether the backend answered).
pub const CT_STATE_NEW: u8 = 0;
/// The backend answered (reverse entries; XDP marks forward ones too).
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// TCP: this direction sent FIN.
pub const CT_STATE_CLOSING: u8 = 2;
/// TCP: this direction sent RST; nobody holds TIME_WAIT for the flow.
pub const CT_STATE_RESET: u8 = 3;

/// What to rewrite a packet matching a [`CtKey`] to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    pub new_src: Addr,
    pub new_dst: Addr,
    /// Network byte order.
    pub new_sport: u16,
    /// Network byte order.
    pub new_dport: u16,
    pub rule_id: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet either way.
    pub last_seen_ns: u64,
    /// `CT_DIR_*`.
    pub direction: u8,
    /// `CT_STATE_*`.
    pub state: u8,
    /// 1 if this direction sent the flow's first FIN or RST. Whoever
    /// closes first holds TIME_WAIT; a port whose backend does must not
    /// go to a new flow soon.
    pub closed_first: u8,
    pub _pad: [u8; 5],
}

impl CtValue {
    /// The key of the entry for the other direction of this entry's flow
    /// (of protocol `proto`): packets rewritten by this entry are answered
    /// from `new_dst`, `new_dport` to `new_src`, `new_sport`.
    #[inline(always)]
    pub const fn pair_key(&self, proto: u8) -> CtKey {
        CtKey {
            src: self.new_dst,
            dst: self.new_src,
            sport: self.new_dport,
            dport: self.new_sport,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Packets and bytes each program saw on one interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IfaceCounters {
    pub xdp_packets: u64,
    pub xdp_bytes: u64,
    pub tc_packets: u64,
    pub tc_bytes: u64,
}

impl IfaceCounters {
    /// Adds `other` field by field (summing the per-CPU copies).
    pub fn add(&mut self, other: &IfaceCounters) {
        let IfaceCounters {
            xdp_packets,
            xdp_bytes,
            tc_packets,
            tc_bytes,
        } = *other;
        self.xdp_packets += xdp_packets;
        self.xdp_bytes += xdp_bytes;
        self.tc_packets += tc_packets;
        self.tc_bytes += tc_bytes;
    }
}

/// Per-rule counters of the kernel path (per CPU, indexed by rule id);
/// why it did not carry a flow or packet is counted by [`reasons`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleCounters {
    /// Client to backend.
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    /// Backend to client.
    pub packets_rev: u64,
    pub bytes_rev: u64,
    /// Flows the kernel path created.
    pub flows: u64,
    /// Packets of these that XDP carried (the rest went through TC).
    pub xdp_packets: u64,
    /// ICMP errors about kernel flows' packets translated and sent on to
    /// the flow's other side.
    pub icmp_translated: u64,
    /// ICMP errors sent for kernel flows' packets that could not be
    /// forwarded (TTL expired; DF and too big for the next hop).
    pub icmp_sent: u64,
    /// New flows' first packets the rule's ACL denied (dropped or reset).
    pub acl_denied: u64,
    /// New flows that took the SNAT port of an unanswered, quiet UDP flow
    /// because no probed port was free; that flow is gone.
    pub unanswered_taken_over: u64,
}

impl RuleCounters {
    /// Adds `other` field by field (summing the per-CPU copies).
    pub fn add(&mut self, other: &RuleCounters) {
        // Destructured in full, so that a new field cannot be left out.
        let RuleCounters {
            packets_fwd,
            bytes_fwd,
            packets_rev,
            bytes_rev,
            flows,
            xdp_packets,
            icmp_translated,
            icmp_sent,
            acl_denied,
            unanswered_taken_over,
        } = *other;
        self.packets_fwd += packets_fwd;
        self.bytes_fwd += bytes_fwd;
        self.packets_rev += packets_rev;
        self.bytes_rev += bytes_rev;
        self.flows += flows;
        self.xdp_packets += xdp_packets;
        self.icmp_translated += icmp_translated;
        self.icmp_sent += icmp_sent;
        self.acl_denied += acl_denied;
        self.unanswered_taken_over += unanswered_taken_over;
    }
}

/// Who entered a flow in `RELAY_FLOWS`.
pub const RELAY_OWNER_RELAY: u8 = 0;
/// The kernel path fell back (table full, fragment, ...) and entered the
/// flow itself, before the relay saw it; such entries expire when idle.
pub const RELAY_OWNER_KERNEL: u8 = 1;

/// A flow the relay carries, keyed by the [`CtKey`] of its client to
/// listener direction. The kernel path leaves such flows alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RelayFlow {
    /// `bpf_ktime_get_ns` of the last packet the kernel path saw (coarse).
    pub last_seen_ns: u64,
    pub rule_id: u32,
    /// `RELAY_OWNER_*`.
    pub owner: u8,
    pub _pad: [u8; 3],
}

/// Global settings, the single entry of the `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// SNAT source ports, host byte order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Ports tried after the random start before giving up; at most
    /// [`MAX_SNAT_PROBES`].
    pub snat_probe_limit: u32,
    /// When no probed port is free, the port of a closed TCP flow (FIN or
    /// RST seen both ways, the client's first) may go to the new flow if
    /// the old one has been idle at least this long, as Linux reuses a
    /// TIME_WAIT port...
    pub closed_reuse_after_ns: u64,
    /// ...and less than this long: older ones are the sweeper's, which must
    /// never remove a pair the kernel just handed on. 0: no reuse.
    pub closed_reuse_before_ns: u64,
    /// Likewise for the port of a UDP flow the backend never answered,
    /// quiet (no packet either way) at least this long...
    pub unanswered_reuse_after_ns: u64,
    /// ...and less than this long (the sweeper's turn). 0: no reuse.
    pub unanswered_reuse_before_ns: u64,
}

/// The kernel's bound on `Settings::snat_probe_limit`. Probes cost only
/// when the range is nearly full, where the alternative is the relay: with
/// three ports in four taken, 64 probes all miss once in 10^8 new flows.
pub const MAX_SNAT_PROBES: u32 = 64;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for RuleKey {}
    unsafe impl aya::Pod for RuleValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for IfaceCounters {}
    unsafe impl aya::Pod for RuleCounters {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for RelayFlow {}
    unsafe impl aya::Pod for AclKey {}
    unsafe impl aya::Pod for host_nat::HostPortKey {}
    unsafe impl aya::Pod for snat::SnatPool {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<RuleKey>(), 20);
        assert_eq!(size_of::<RuleValue>(), 16);
        assert_eq!(size_of::<Backend>(), 40);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<CtValue>(), 56);
        assert_eq!(size_of::<Settings>(), 40);
        assert_eq!(size_of::<IfaceCounters>(), 32);
        assert_eq!(size_of::<RuleCounters>(), 80);
        assert_eq!(size_of::<AclKey>(), 24);
        assert_eq!(size_of::<RelayFlow>(), 16);
    }

    #[test]
    fn rule_flags_are_distinct_bits() {
        let flags = [RULE_F_RELAY, RULE_F_PRESERVE_CLIENT_IP, RULE_F_XDP];
        for (i, a) in flags.iter().enumerate() {
            assert!(a.is_power_of_two(), "flag {i} is one bit: {a:#x}");
            for b in &flags[i + 1..] {
                assert_eq!(a & b, 0, "{a:#x} and {b:#x} overlap");
            }
        }
        assert!(BACKEND_F_HEALTHY.is_power_of_two());
    }

    #[test]
    fn rule_ids_leave_room_for_every_rule_anew_beside_the_running_ones() {
        // Read at run time, so that a wrong value fails this test rather
        // than the build.
        let ids = core::hint::black_box(RULE_IDS);
        assert!(ids >= 2 * MAX_RULES, "{ids} ids for {MAX_RULES} rules");
    }

    #[test]
    fn counters_add_field_by_field() {
        let mut sum = IfaceCounters {
            xdp_packets: 1,
            xdp_bytes: 20,
            tc_packets: 300,
            tc_bytes: 4_000,
        };
        sum.add(&IfaceCounters {
            xdp_packets: 2,
            xdp_bytes: 30,
            tc_packets: 400,
            tc_bytes: 5_000,
        });
        assert_eq!(
            sum,
            IfaceCounters {
                xdp_packets: 3,
                xdp_bytes: 50,
                tc_packets: 700,
                tc_bytes: 9_000,
            }
        );
        // Distinct values per field, so that a field added to another or
        // left out shows.
        let one = |k: u64| RuleCounters {
            packets_fwd: 3 * k,
            bytes_fwd: 5 * k,
            packets_rev: 7 * k,
            bytes_rev: 11 * k,
            flows: 13 * k,
            xdp_packets: 17 * k,
            icmp_sent: 31 * k,
            icmp_translated: 37 * k,
            acl_denied: 41 * k,
            unanswered_taken_over: 43 * k,
        };
        let mut sum = one(2);
        sum.add(&one(3));
        assert_eq!(sum, one(5));
    }

    #[test]
    fn ipv4_mapping_round_trips() {
        let be = u32::from_ne_bytes([192, 0, 2, 7]);
        let a = addr_from_ipv4_be(be);
        assert_eq!(addr_ipv4_be(&a), Some(be));
        assert_eq!(addr_ipv4_be(&ADDR_ANY), None);
    }
}
