//! Which rule a packet's destination matches, and which backend a new flow
//! goes to.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_ebpf::maps::lpm_trie::Key;
use forwarder_common::{
    ADDR_ANY, BACKEND_F_HEALTHY, Backend, MAX_BACKENDS_PER_RULE, RuleKey, RuleValue,
    addr_from_ipv4_be,
    ranges::{RangeKey, RangeValue},
};

use crate::maps::{BACKENDS, RANGE_COUNT, RANGES, RULES};
use crate::parse::Packet;

/// A rule a packet matched.
pub struct Matched {
    pub rule: RuleValue,
    /// Matched by the wildcard bind, which names no address: the packet
    /// may be passing through this host rather than be addressed to it.
    pub wildcard: bool,
    /// What to add to the backend's port (host order): a shifted range's
    /// offset of the packet's port; 0 for single ports.
    pub shift: u16,
}

/// The rule for the packet's (protocol, destination address, port): the
/// exact bind address first (a single port, then a range), then the
/// wildcard. Ranges are looked up only while some range rule exists.
#[inline(always)]
pub fn lookup(pkt: &Packet) -> Option<Matched> {
    let ranges = RANGE_COUNT.get(0).is_some_and(|n| *n != 0);
    let mut key = RuleKey {
        addr: addr_from_ipv4_be(pkt.dst),
        port: pkt.dport,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once; userspace replaces entries whole.
    if let Some(rule) = unsafe { RULES.get(&key) } {
        return Some(Matched {
            rule: *rule,
            wildcard: false,
            shift: 0,
        });
    }
    if ranges && let Some(r) = range_of(pkt.dst, pkt.dport, pkt.proto, false) {
        return Some(in_range(r, pkt.dport, false));
    }
    key.addr = ADDR_ANY;
    if let Some(rule) = unsafe { RULES.get(&key) } {
        return Some(Matched {
            rule: *rule,
            wildcard: true,
            shift: 0,
        });
    }
    if ranges && let Some(r) = range_of(pkt.dst, pkt.dport, pkt.proto, true) {
        return Some(in_range(r, pkt.dport, true));
    }
    None
}

#[inline(always)]
fn in_range(r: &RangeValue, dport: u16, wildcard: bool) -> Matched {
    // SAFETY: copied out at once; userspace replaces entries whole.
    let r = unsafe { core::ptr::read_volatile(r) };
    Matched {
        rule: r.rule,
        wildcard,
        shift: r.port_shift(u16::from_be(dport)),
    }
}

/// The `RANGES` entry holding `dport` (network order) of `proto` on `dst`
/// (network order), or on the wildcard bind. Its own BPF function: the
/// trie key's frame stays out of the caller's.
#[inline(never)]
fn range_of(dst: u32, dport: u16, proto: u8, wildcard: bool) -> Option<&'static RangeValue> {
    let addr = if wildcard {
        ADDR_ANY
    } else {
        addr_from_ipv4_be(dst)
    };
    let key = Key::new(
        RangeKey::LOOKUP_PREFIX_LEN,
        RangeKey::new(addr, proto, u16::from_be(dport)),
    );
    RANGES.get(&key)
}

/// A healthy backend of `rule`, picked by weight; one backend is the
/// common case and needs no random number. The map's own entry, not a
/// copy: the caller's stack frame has no room for one.
#[inline(always)]
pub fn pick_backend(rule: &RuleValue) -> Option<&'static Backend> {
    let base = rule.rule_id.wrapping_mul(MAX_BACKENDS_PER_RULE);
    if rule.backend_count == 1 {
        let b = BACKENDS.get(base)?;
        return (b.flags & BACKEND_F_HEALTHY != 0).then_some(b);
    }
    if rule.total_weight == 0 {
        return None;
    }
    // SAFETY: a helper without arguments.
    let mut ticket = unsafe { bpf_get_prandom_u32() } % rule.total_weight;
    for n in 0..MAX_BACKENDS_PER_RULE {
        if n >= rule.backend_count {
            break;
        }
        let Some(b) = BACKENDS.get(base + n) else {
            break;
        };
        if b.flags & BACKEND_F_HEALTHY == 0 {
            continue;
        }
        let weight = u32::from(b.weight);
        if ticket < weight {
            return Some(b);
        }
        ticket -= weight;
    }
    None
}
