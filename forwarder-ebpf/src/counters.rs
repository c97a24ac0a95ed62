//! Per-CPU counters: per interface (both programs) and per rule.

use aya_ebpf::bindings::BPF_NOEXIST;
use forwarder_common::{IfaceCounters, RuleCounters};

use crate::maps::{IFACE_COUNTERS, REASON_COUNTERS, RULE_COUNTERS};

/// Which program counts.
#[derive(Clone, Copy)]
pub enum Hook {
    Xdp,
    Tc,
}

/// Counts one packet of `bytes` on interface `ifindex`. True when this was
/// the first packet counted there (the entry was created).
#[inline(always)]
pub fn count_interface(ifindex: u32, hook: Hook, bytes: u64) -> bool {
    let mut created = false;
    let counters = match IFACE_COUNTERS.get_ptr_mut(ifindex) {
        Some(c) => c,
        None => {
            // A per-CPU hash entry is created for every CPU at once, zeroed.
            created = IFACE_COUNTERS
                .insert(ifindex, IfaceCounters::default(), u64::from(BPF_NOEXIST))
                .is_ok();
            match IFACE_COUNTERS.get_ptr_mut(ifindex) {
                Some(c) => c,
                None => return created,
            }
        }
    };
    // SAFETY: a per-CPU value; programs do not nest on one CPU for the same hook.
    let c = unsafe { &mut *counters };
    match hook {
        Hook::Xdp => {
            c.xdp_packets += 1;
            c.xdp_bytes += bytes;
        }
        Hook::Tc => {
            c.tc_packets += 1;
            c.tc_bytes += bytes;
        }
    }
    created
}

/// Adds to rule `rule_id`'s counters on this CPU.
#[inline(always)]
pub fn with_rule(rule_id: u32, f: impl FnOnce(&mut RuleCounters)) {
    if let Some(c) = RULE_COUNTERS.get_ptr_mut(rule_id) {
        // SAFETY: a per-CPU slot of an array; no concurrent writer on this CPU.
        f(unsafe { &mut *c });
    }
}

/// Counts one reason at `slot` (a `forwarder_common::reasons` slot). Its
/// own BPF function: callers' frames are near the stack's limit.
#[inline(never)]
pub fn count_reason(slot: u32) {
    if let Some(c) = REASON_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot of an array; no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
