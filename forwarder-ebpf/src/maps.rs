//! Every map of the programs. Keys and values come from `forwarder-common`;
//! userspace finds the maps by these names and sizes the conntrack and
//! relay-flow maps at load.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_fib_lookup, bpf_redir_neigh},
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use forwarder_common::{
    AclKey, Backend, CtKey, CtValue, FragKey, IfaceCounters, MAX_ACL_ENTRIES,
    MAX_BACKENDS_PER_RULE, MAX_RULES, MAX_SNAT_PROBES, RULE_IDS, RelayFlow, RuleCounters, RuleKey,
    RuleValue, Settings,
    host_nat::{HOST_PORTS_SIZE, HostPortKey},
    icmp::ERROR_LEN,
    mss::MAX_OPTIONS_LEN,
    ranges::{MAX_RANGE_ENTRIES, RangeKey, RangeValue},
    reasons::REASON_SLOTS,
    snat::SnatPool,
};

/// Interfaces counted at once (each attached interface takes one entry).
pub const MAX_INTERFACES: u32 = 1024;

/// Packets and bytes each program saw, per interface index.
#[map]
pub static IFACE_COUNTERS: PerCpuHashMap<u32, IfaceCounters> =
    PerCpuHashMap::with_max_entries(MAX_INTERFACES, 0);

/// Per-rule counters, indexed by rule id.
#[map]
pub static RULE_COUNTERS: PerCpuArray<RuleCounters> = PerCpuArray::with_max_entries(RULE_IDS, 0);

/// Why flows and packets were not carried, per rule and reason; the slot
/// of each is `forwarder_common::reasons`'s, and so is this map's name.
#[map]
pub static REASON_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_SLOTS, 0);

/// (address, port, protocol) to rule; written by userspace.
#[map]
pub static RULES: HashMap<RuleKey, RuleValue> = HashMap::with_max_entries(MAX_RULES, 0);

/// Blocks of range rules' ports to rule; written by userspace. Named by
/// `ranges::RANGES_MAP`.
#[map]
pub static RANGES: LpmTrie<RangeKey, RangeValue> = LpmTrie::with_max_entries(MAX_RANGE_ENTRIES, 0);

/// How many range rules `RANGES` holds; 0 skips its lookups. Named by
/// `ranges::RANGE_COUNT_MAP`.
#[map]
pub static RANGE_COUNT: Array<u32> = Array::with_max_entries(1, 0);

/// Backends at `rule_id * MAX_BACKENDS_PER_RULE + n`; written by userspace.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(RULE_IDS * MAX_BACKENDS_PER_RULE, 0);

/// (rule, client network) to `ACL_ALLOW` or `ACL_DENY`, for rules with
/// `RULE_F_ACL`; written by userspace before the rule's key points at it.
#[map]
pub static ACL: LpmTrie<AclKey, u32> = LpmTrie::with_max_entries(MAX_ACL_ENTRIES, 0);

/// The one [`Settings`] entry; written by userspace.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// The SNAT address pool (`snat::SNAT_POOL_MAP`), one entry; written by
/// userspace at start and reload.
#[map]
pub static SNAT_POOL: Array<SnatPool> = Array::with_max_entries(1, 0);

/// Both directions of every kernel flow. Preallocated: the fast path never
/// allocates, and a full table is a clean insert failure. Sized at load.
#[map]
pub static CONNTRACK: HashMap<CtKey, CtValue> = HashMap::with_max_entries(1, 0);

/// Flows the relay carries, keyed by their client to listener direction.
/// Sized at load.
#[map]
pub static RELAY_FLOWS: HashMap<CtKey, RelayFlow> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// Fragmented datagrams of kernel flows, to the flow's key in `CONNTRACK`
/// (the packet's direction). Written at each first fragment; the least
/// recently used go when full, and a datagram's fragments follow its
/// first closely.
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, CtKey> = LruHashMap::with_max_entries(8192, 0);

/// Source ports the host's own traffic (its NAT, its sockets) used toward
/// a backend, seen by the egress program, to when; the SNAT allocator
/// skips them. Named by `host_nat::HOST_PORTS_MAP`.
#[map]
pub static HOST_PORTS: LruHashMap<HostPortKey, u64> =
    LruHashMap::with_max_entries(HOST_PORTS_SIZE, 0);

/// Per-CPU working space for values too big for the 512-byte stack.
/// Private to the programs: userspace never reads it, so it is no shared
/// layout (those live in forwarder-common).
#[repr(C)]
pub struct Scratch {
    /// The conntrack key of the packet's direction.
    pub key: CtKey,
    pub fib: bpf_fib_lookup,
    pub neigh: bpf_redir_neigh,
    /// The entry a packet is rewritten to.
    pub ct: CtValue,
    /// A new flow's reverse entry and key.
    pub reverse: CtValue,
    pub reverse_key: CtKey,
    /// The forward key of a closed flow whose SNAT port is taken over.
    pub old_key: CtKey,
    /// The datagram of a fragment.
    pub frag_key: FragKey,
    /// An ICMP error's first bytes, read or built.
    pub icmp: [u8; ERROR_LEN],
    /// A SYN's TCP options.
    pub tcp_opts: [u8; MAX_OPTIONS_LEN],
    /// The FIB's working space when asked only for a path's MTU (`fib`
    /// holds the packet's route meanwhile).
    pub mtu_fib: bpf_fib_lookup,
    /// A `HOST_PORTS` key the SNAT allocator looks up.
    pub host_port: HostPortKey,
    /// The pairs `conntrack::reserve_port` probes, in order.
    pub probes: [SnatPair; MAX_SNAT_PROBES as usize],
}

/// One (address, port) pair `conntrack::reserve_port` probes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SnatPair {
    /// IPv4, network byte order.
    pub addr: u32,
    pub port_be: u16,
    pub _pad: u16,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch space.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: a per-CPU slot; one program run uses it at a time on a CPU.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The interfaces XDP may redirect to (those the daemon attached to), by
/// ifindex; written by userspace. A frame for any other interface goes up
/// to TC.
#[map]
pub static XDP_EGRESS: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);

/// Each rule's `RULE_F_*` flags by rule id; written by userspace. XDP
/// needs them for replies too, which match no `RULES` key.
#[map]
pub static RULE_FLAGS: Array<u32> = Array::with_max_entries(RULE_IDS, 0);
