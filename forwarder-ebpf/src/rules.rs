//! Which rule a packet's destination matches, and which backend a new flow
//! goes to.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use forwarder_common::{
    ADDR_ANY, BACKEND_F_HEALTHY, Backend, MAX_BACKENDS_PER_RULE, RuleKey, RuleValue,
    addr_from_ipv4_be,
};

use crate::maps::{BACKENDS, RULES};
use crate::parse::Packet;

/// A rule a packet matched.
pub struct Matched {
    pub rule: RuleValue,
    /// Matched by the wildcard bind, which names no address: the packet
    /// may be passing through this host rather than be addressed to it.
    pub wildcard: bool,
}

/// The rule for the packet's (protocol, destination address, port): the
/// exact bind address first, then the wildcard.
#[inline(always)]
pub fn lookup(pkt: &Packet) -> Option<Matched> {
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
        });
    }
    key.addr = ADDR_ANY;
    unsafe { RULES.get(&key) }.map(|rule| Matched {
        rule: *rule,
        wildcard: true,
    })
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
