//! Why the kernel path did not carry a packet or a flow: the one list of
//! reasons, their names (for `status` and the metrics) and where each is
//! counted in the [`REASON_COUNTERS_MAP`] per-CPU array of `u64`.
//!
//! A rule's reasons are one row of [`REASONS_PER_RULE`] slots at
//! `rule_id * REASONS_PER_RULE`: the fallbacks first, then XDP's passes,
//! then the drops. Row [`NO_RULE`] counts what XDP passed before it knew
//! the packet's rule (not a kernel flow, or a frame it cannot read).

use crate::RULE_IDS;

/// The name of the per-CPU array of `u64` counters in the eBPF object.
pub const REASON_COUNTERS_MAP: &str = "REASON_COUNTERS";

/// The row of reasons counted before a rule was known (XDP only).
pub const NO_RULE: u32 = RULE_IDS;

/// Why the relay got a new flow a rule's kernel path would have carried.
/// Each flow counts once, at its first packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fallback {
    /// The first packet is a fragment.
    Fragment,
    /// The first packet's IPv4 header has options.
    IpOptions,
    /// No backend is healthy.
    NoBackend,
    /// The backend is IPv6 (the kernel path speaks IPv4).
    NotIpv4,
    /// The daemon found no source address of this host toward the backend.
    NoSnatAddress,
    /// The first packet's TTL would expire on the way on.
    TtlExpiring,
    /// The FIB has no route to the backend.
    NoRoute,
    /// IPv4 forwarding is off on the interface the flow came in by.
    ForwardingOff,
    /// The conntrack table is full.
    ConntrackFull,
    /// Every SNAT port probed is taken toward that backend.
    SnatPortsExhausted,
    /// Another flow holds the entry this one needs (with
    /// `preserve_client_ip`, the same client port toward the backend).
    FlowClash,
    /// No SNAT port range is set (the daemon has not written its settings).
    NoSnatRange,
}

impl Fallback {
    pub const ALL: [Fallback; 12] = [
        Fallback::Fragment,
        Fallback::IpOptions,
        Fallback::NoBackend,
        Fallback::NotIpv4,
        Fallback::NoSnatAddress,
        Fallback::TtlExpiring,
        Fallback::NoRoute,
        Fallback::ForwardingOff,
        Fallback::ConntrackFull,
        Fallback::SnatPortsExhausted,
        Fallback::FlowClash,
        Fallback::NoSnatRange,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Fallback::Fragment => "fragment",
            Fallback::IpOptions => "ip_options",
            Fallback::NoBackend => "no_backend",
            Fallback::NotIpv4 => "not_ipv4",
            Fallback::NoSnatAddress => "no_snat_address",
            Fallback::TtlExpiring => "ttl_expiring",
            Fallback::NoRoute => "no_route",
            Fallback::ForwardingOff => "forwarding_off",
            Fallback::ConntrackFull => "conntrack_full",
            Fallback::SnatPortsExhausted => "snat_ports_exhausted",
            Fallback::FlowClash => "flow_clash",
            Fallback::NoSnatRange => "no_snat_range",
        }
    }

    /// A table was full: more room (`kernel.conntrack`, `kernel.snat_ports`) helps.
    pub const fn is_full(self) -> bool {
        matches!(self, Fallback::ConntrackFull | Fallback::SnatPortsExhausted)
    }

    /// This reason's slot in rule `rule_id`'s row.
    #[inline(always)]
    pub const fn slot(self, rule_id: u32) -> u32 {
        row(rule_id) + FALLBACK_BASE + self as u32
    }
}

/// Why XDP left a packet to TC.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XdpPass {
    /// Not a whole IPv4 TCP or UDP packet without options (IPv6, ARP,
    /// ICMP, fragments, IP options, truncated). Counted in [`NO_RULE`].
    Unparsed,
    /// Its L4 checksum is left to the device (a sender on this host):
    /// a redirected frame would lose that mark. Counted in [`NO_RULE`].
    ChecksumPartial,
    /// No kernel flow has it: a new flow, the relay's, or not ours.
    /// Counted in [`NO_RULE`].
    NoFlow,
    /// A TCP SYN, FIN or RST: TC keeps the flow's state.
    TcpControl,
    /// Its TTL expires here: TC answers or drops it.
    TtlExpiring,
    /// The flow's rule does not ask for XDP (`path: xdp`).
    RuleNotXdp,
    /// The backend has not answered yet.
    NotEstablished,
    /// The flow's addresses are not IPv4.
    NotIpv4,
    /// The FIB gave no complete answer (no route, unresolved neighbour).
    NoRoute,
    /// The egress interface takes no XDP frames (not in `XDP_EGRESS`).
    EgressNotXdp,
    /// The rewrite failed.
    RewriteFailed,
}

impl XdpPass {
    pub const ALL: [XdpPass; 11] = [
        XdpPass::Unparsed,
        XdpPass::ChecksumPartial,
        XdpPass::NoFlow,
        XdpPass::TcpControl,
        XdpPass::TtlExpiring,
        XdpPass::RuleNotXdp,
        XdpPass::NotEstablished,
        XdpPass::NotIpv4,
        XdpPass::NoRoute,
        XdpPass::EgressNotXdp,
        XdpPass::RewriteFailed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            XdpPass::Unparsed => "unparsed",
            XdpPass::ChecksumPartial => "checksum_partial",
            XdpPass::NoFlow => "no_flow",
            XdpPass::TcpControl => "tcp_control",
            XdpPass::TtlExpiring => "ttl_expiring",
            XdpPass::RuleNotXdp => "rule_not_xdp",
            XdpPass::NotEstablished => "not_established",
            XdpPass::NotIpv4 => "not_ipv4",
            XdpPass::NoRoute => "no_route",
            XdpPass::EgressNotXdp => "egress_not_xdp",
            XdpPass::RewriteFailed => "rewrite_failed",
        }
    }

    #[inline(always)]
    pub const fn slot(self, rule_id: u32) -> u32 {
        row(rule_id) + XDP_PASS_BASE + self as u32
    }
}

/// Why TC dropped a packet of a kernel flow.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dropped {
    /// No route to the flow's other side any more.
    NoRoute,
    /// Too big for the next hop, and without DF (the kernel path does not
    /// fragment) or with DF where no frag-needed error could be sent.
    TooBig,
    /// Its TTL expired and no time-exceeded error could be sent.
    TtlExpired,
    /// The flow's addresses are not IPv4.
    NotIpv4,
    /// The rewrite failed.
    RewriteFailed,
}

impl Dropped {
    pub const ALL: [Dropped; 5] = [
        Dropped::NoRoute,
        Dropped::TooBig,
        Dropped::TtlExpired,
        Dropped::NotIpv4,
        Dropped::RewriteFailed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Dropped::NoRoute => "no_route",
            Dropped::TooBig => "too_big",
            Dropped::TtlExpired => "ttl_expired",
            Dropped::NotIpv4 => "not_ipv4",
            Dropped::RewriteFailed => "rewrite_failed",
        }
    }

    #[inline(always)]
    pub const fn slot(self, rule_id: u32) -> u32 {
        row(rule_id) + DROP_BASE + self as u32
    }
}

const FALLBACK_BASE: u32 = 0;
const XDP_PASS_BASE: u32 = FALLBACK_BASE + Fallback::ALL.len() as u32;
const DROP_BASE: u32 = XDP_PASS_BASE + XdpPass::ALL.len() as u32;
/// Slots of one rule's row.
pub const REASONS_PER_RULE: u32 = DROP_BASE + Dropped::ALL.len() as u32;
/// Entries of [`REASON_COUNTERS_MAP`]: every rule id's row and [`NO_RULE`]'s.
pub const REASON_SLOTS: u32 = (RULE_IDS + 1) * REASONS_PER_RULE;

#[inline(always)]
const fn row(rule_id: u32) -> u32 {
    rule_id.wrapping_mul(REASONS_PER_RULE)
}

/// One rule's reason counts, summed over CPUs (userspace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReasonCounts(pub [u64; REASONS_PER_RULE as usize]);

impl Default for ReasonCounts {
    fn default() -> ReasonCounts {
        ReasonCounts([0; REASONS_PER_RULE as usize])
    }
}

impl ReasonCounts {
    /// The slots of `rule_id`'s row, in the order of `self.0`.
    pub fn slots(rule_id: u32) -> core::ops::Range<u32> {
        row(rule_id)..row(rule_id) + REASONS_PER_RULE
    }

    pub fn add(&mut self, other: &ReasonCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }

    pub fn fallback(&self, why: Fallback) -> u64 {
        self.0[(FALLBACK_BASE + why as u32) as usize]
    }

    pub fn xdp_pass(&self, why: XdpPass) -> u64 {
        self.0[(XDP_PASS_BASE + why as u32) as usize]
    }

    pub fn dropped(&self, why: Dropped) -> u64 {
        self.0[(DROP_BASE + why as u32) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_inside_its_rules_row() {
        let mut seen = [false; REASONS_PER_RULE as usize];
        let slots = Fallback::ALL
            .iter()
            .map(|r| r.slot(3))
            .chain(XdpPass::ALL.iter().map(|r| r.slot(3)))
            .chain(Dropped::ALL.iter().map(|r| r.slot(3)));
        for slot in slots {
            assert!(ReasonCounts::slots(3).contains(&slot), "{slot}");
            let at = (slot - 3 * REASONS_PER_RULE) as usize;
            assert!(!seen[at], "slot {slot} twice");
            seen[at] = true;
        }
        assert!(seen.iter().all(|&s| s), "a slot of the row has no reason");
        assert_eq!(Dropped::RewriteFailed.slot(NO_RULE), REASON_SLOTS - 1);
    }

    #[test]
    fn the_all_lists_follow_the_discriminants() {
        for (i, r) in Fallback::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in XdpPass::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in Dropped::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn names_are_distinct_within_a_kind_and_snake_case() {
        let kinds: [&[&str]; 3] = [
            &Fallback::ALL.map(Fallback::name),
            &XdpPass::ALL.map(XdpPass::name),
            &Dropped::ALL.map(Dropped::name),
        ];
        for names in kinds {
            for (i, a) in names.iter().enumerate() {
                assert!(
                    a.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                    "{a}"
                );
                assert!(!names[i + 1..].contains(a), "{a} twice");
            }
        }
    }

    #[test]
    fn counts_read_back_by_reason_and_add() {
        let mut a = ReasonCounts::default();
        a.0[(Fallback::NoRoute.slot(0)) as usize] = 2;
        a.0[(XdpPass::TcpControl.slot(0)) as usize] = 3;
        a.0[(Dropped::TooBig.slot(0)) as usize] = 5;
        let mut b = a;
        b.add(&a);
        assert_eq!(b.fallback(Fallback::NoRoute), 4);
        assert_eq!(b.xdp_pass(XdpPass::TcpControl), 6);
        assert_eq!(b.dropped(Dropped::TooBig), 10);
        assert_eq!(b.fallback(Fallback::Fragment), 0);
    }
}
