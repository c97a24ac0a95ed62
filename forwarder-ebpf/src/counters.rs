//! Per-CPU counters: per interface (both programs).

use aya_ebpf::bindings::BPF_NOEXIST;
use forwarder_common::IfaceCounters;

use crate::maps::IFACE_COUNTERS;

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
