//! Every map of the programs. Keys and values come from `forwarder-common`;
//! userspace finds the maps by these names.

use aya_ebpf::{macros::map, maps::PerCpuHashMap};
use forwarder_common::IfaceCounters;

/// Interfaces counted at once (each attached interface takes one entry).
pub const MAX_INTERFACES: u32 = 1024;

/// Packets and bytes each program saw, per interface index.
#[map]
pub static IFACE_COUNTERS: PerCpuHashMap<u32, IfaceCounters> =
    PerCpuHashMap::with_max_entries(MAX_INTERFACES, 0);
