//! Flow state: the conntrack pair of a kernel flow, SNAT port allocation,
//! and the flows the relay owns.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use forwarder_common::{
    ADDR_ANY, Addr, Backend, CT_DIR_FORWARD, CT_DIR_REVERSE, CT_STATE_CLOSING,
    CT_STATE_ESTABLISHED, CT_STATE_NEW, CT_STATE_RESET, CtKey, CtValue, MAX_SNAT_PROBES, PROTO_TCP,
    RELAY_OWNER_KERNEL, RULE_F_PRESERVE_CLIENT_IP, RelayFlow, RuleValue, Settings, addr_ipv4_be,
    reasons::Fallback,
    snat::{BACKEND_F_SNAT_POOL, MAX_SNAT_ADDRS, probe_pair, probes_walk},
};

use crate::counters::with_rule;
use crate::host_nat;
use crate::maps::{CONNTRACK, RELAY_FLOWS, SETTINGS, SNAT_POOL, Scratch, SnatPair};
use crate::parse::{TCP_FIN, TCP_RST, TCP_SYN};

/// Timestamps in the maps are refreshed at most this often, so that busy
/// flows do not write a shared cache line on every packet.
pub(crate) const TOUCH_EVERY_NS: u64 = 100_000_000;

const EEXIST: i32 = 17;

/// True if the relay owns the flow of `key`; refreshes its timestamp.
#[inline(always)]
pub fn relay_owns(key: &CtKey, now: u64) -> bool {
    match RELAY_FLOWS.get_ptr_mut(key) {
        Some(flow) => {
            // SAFETY: a value of the map; a racing writer only writes a timestamp.
            let flow = unsafe { &mut *flow };
            if now.wrapping_sub(flow.last_seen_ns) > TOUCH_EVERY_NS {
                flow.last_seen_ns = now;
            }
            true
        }
        None => false,
    }
}

/// Hands the flow of `key` to the relay for its whole life.
#[inline(always)]
pub fn give_to_relay(key: &CtKey, rule_id: u32, now: u64) {
    let flow = RelayFlow {
        last_seen_ns: now,
        rule_id,
        owner: RELAY_OWNER_KERNEL,
        _pad: [0; 3],
    };
    // An existing entry (the relay's own) stays as it is.
    let _ = RELAY_FLOWS.insert(key, &flow, u64::from(BPF_NOEXIST));
}

/// The conntrack entry of `key`, if the kernel path carries that flow.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    CONNTRACK.get_ptr_mut(key)
}

/// What a packet did to the state of its direction of a flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// Its FIN or RST closed this direction.
    Closed,
    /// A SYN from the client started the closed flow over (the client
    /// reused its port).
    Restarted,
}

/// Records a packet of a known flow: last seen, and the state (TCP's
/// FIN/RST/SYN, and for both protocols whether the backend answered).
#[inline(always)]
pub fn touch(entry: *mut CtValue, proto: u8, tcp_flags: u8, now: u64) -> Change {
    // SAFETY: a value of the map; racing writers store the same kind of data.
    let ct = unsafe { &mut *entry };
    if now.wrapping_sub(ct.last_seen_ns) > TOUCH_EVERY_NS {
        ct.last_seen_ns = now;
    }
    if proto == PROTO_TCP {
        if tcp_flags & TCP_RST != 0 {
            if ct.state == CT_STATE_RESET {
                return Change::None;
            }
            ct.state = CT_STATE_RESET;
            ct.last_seen_ns = now;
            return Change::Closed;
        }
        if tcp_flags & TCP_FIN != 0 {
            if ct.state >= CT_STATE_CLOSING {
                return Change::None;
            }
            ct.state = CT_STATE_CLOSING;
            ct.last_seen_ns = now;
            return Change::Closed;
        }
        if tcp_flags & TCP_SYN != 0 && ct.direction == CT_DIR_FORWARD {
            if ct.state < CT_STATE_CLOSING {
                return Change::None;
            }
            ct.state = CT_STATE_NEW;
            ct.closed_first = 0;
            ct.last_seen_ns = now;
            return Change::Restarted;
        }
    }
    if ct.direction == CT_DIR_REVERSE && ct.state == CT_STATE_NEW {
        // The backend answered: the flow leaves the unanswered timeout.
        ct.state = CT_STATE_ESTABLISHED;
        ct.last_seen_ns = now;
    }
    Change::None
}

/// Follows up a [`Change`] of `entry` on the other direction's entry, whose
/// key goes into the scratch `pair_key`:
/// - `Closed`: marks `entry` as the side that closed first if the other
///   side is still open;
/// - `Restarted`: starts the other side over too, so that the backend's
///   answer establishes the flow again and it lives by the established
///   timeout, not the closing one.
#[inline(always)]
pub fn follow_up(entry: *mut CtValue, change: Change, proto: u8, now: u64, pair_key: &mut CtKey) {
    if change == Change::None {
        return;
    }
    // SAFETY: a value of the map; racing writers store the same kind of data.
    let ct = unsafe { &mut *entry };
    *pair_key = ct.pair_key(proto);
    let Some(other) = CONNTRACK.get_ptr_mut(pair_key) else {
        if change == Change::Closed {
            ct.closed_first = 1;
        }
        return;
    };
    // SAFETY: as above.
    let other = unsafe { &mut *other };
    if change == Change::Closed {
        if other.state < CT_STATE_CLOSING {
            ct.closed_first = 1;
        }
    } else {
        other.state = CT_STATE_NEW;
        other.closed_first = 0;
        other.last_seen_ns = now;
    }
}

/// Creates the pair of entries of a new flow from `s.key` (client to
/// listener) to `backend`; the forward one is left in `s.ct`. SNAT takes a free
/// port of the reserved range (on an address of the pool if the backend
/// uses it): a random start, then a bounded probe, each try being the
/// no-exist insert of the reverse entry (see `reserve_port`).
/// `Ok(false)`: another CPU created the same flow a moment ago, and its
/// forward entry is in `s.ct`.
#[inline(never)]
pub fn create(
    rule: &RuleValue,
    backend: &Backend,
    // The backend port this flow goes to (network order): a range's own.
    dport: u16,
    now: u64,
    s: &mut Scratch,
) -> Result<bool, Fallback> {
    let preserve = rule.flags & RULE_F_PRESERVE_CLIENT_IP != 0;
    let snat_addr = if preserve {
        s.key.src
    } else {
        backend.snat_addr
    };
    // This path is IPv4 only; anything else is the relay's.
    if snat_addr == ADDR_ANY {
        return Err(Fallback::NoSnatAddress);
    }
    if addr_ipv4_be(&snat_addr).is_none() || addr_ipv4_be(&backend.addr).is_none() {
        return Err(Fallback::NotIpv4);
    }
    // Both protocols start unanswered: the backend's first packet back
    // establishes the flow (see `touch`).
    let state = CT_STATE_NEW;
    // Written field by field, in place: a whole value would be built on the
    // stack first, which has no room for it beside the callers' frames.
    let (key, reverse_key) = (&s.key, &mut s.reverse_key);
    reverse_key.src = backend.addr;
    reverse_key.dst = snat_addr;
    reverse_key.sport = dport;
    reverse_key.dport = key.sport;
    reverse_key.proto = key.proto;
    reverse_key._pad = [0; 3];
    fill(
        &mut s.reverse,
        (key.dst, key.src),
        (key.dport, key.sport),
        rule.rule_id,
        now,
        CT_DIR_REVERSE,
        state,
    );
    if preserve {
        // Without SNAT the reverse key is the flow's own: taken, it may be
        // by another CPU that created this very flow.
        if let Err(why) = insert_new(&s.reverse_key, &s.reverse) {
            // SAFETY: copied out at once.
            s.ct = *unsafe { CONNTRACK.get(&s.key) }.ok_or(why)?;
            return Ok(false);
        }
    } else {
        reserve_port(s, now, backend.flags & BACKEND_F_SNAT_POOL != 0)?;
    }
    // The pool's address, if one was picked; the reply matches it exactly.
    let new_src = s.reverse_key.dst;
    let new_sport = s.reverse_key.dport;
    fill(
        &mut s.ct,
        (new_src, backend.addr),
        (new_sport, dport),
        rule.rule_id,
        now,
        CT_DIR_FORWARD,
        state,
    );
    match CONNTRACK.insert(&s.key, &s.ct, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(true),
        Err(e) => {
            let _ = CONNTRACK.remove(&s.reverse_key);
            if e != -EEXIST {
                return Err(Fallback::ConntrackFull);
            }
            // Another CPU created this flow a moment ago: use its entry.
            // SAFETY: copied out at once.
            s.ct = *unsafe { CONNTRACK.get(&s.key) }.ok_or(Fallback::FlowClash)?;
            Ok(false)
        }
    }
}

/// Sets every field of `ct`: the addresses and ports a packet is rewritten to.
#[inline(always)]
pub(crate) fn fill(
    ct: &mut CtValue,
    (new_src, new_dst): (Addr, Addr),
    (new_sport, new_dport): (u16, u16),
    rule_id: u32,
    now: u64,
    direction: u8,
    state: u8,
) {
    ct.new_src = new_src;
    ct.new_dst = new_dst;
    ct.new_sport = new_sport;
    ct.new_dport = new_dport;
    ct.rule_id = rule_id;
    ct.last_seen_ns = now;
    ct.direction = direction;
    ct.state = state;
    ct.closed_first = 0;
    ct._pad = [0; 5];
}

#[inline(always)]
fn insert_new(key: &CtKey, value: &CtValue) -> Result<(), Fallback> {
    match CONNTRACK.insert(key, value, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(()),
        Err(e) if e == -EEXIST => Err(Fallback::FlowClash),
        Err(_) => Err(Fallback::ConntrackFull),
    }
}

/// Finds a free SNAT port by inserting the reverse entry with it (random
/// pairs, or every pair of a small table from a random start; see
/// `probes_walk`); leaves
/// the port in `s.reverse_key.dport` with the entry in place. With
/// `pooled`, each probe is an (address, port) pair of the SNAT pool, the
/// address left in `s.reverse_key.dst`; else the address there is kept
/// (an empty pool counts as none). Ports the
/// host's own NAT uses toward the backend are skipped. When every
/// probed port is taken, the first one held by a flow that may be taken
/// over (see `take_over`) goes to the new flow.
#[inline(always)]
pub(crate) fn reserve_port(s: &mut Scratch, now: u64, pooled: bool) -> Result<(), Fallback> {
    let settings = SETTINGS.get(0).ok_or(Fallback::NoSnatRange)?;
    let (min, max) = (
        u32::from(settings.snat_port_min),
        u32::from(settings.snat_port_max),
    );
    if min == 0 || max < min {
        return Err(Fallback::NoSnatRange);
    }
    let span = max - min + 1;
    if span == 0 {
        return Err(Fallback::NoSnatRange);
    }
    let pool = SNAT_POOL.get(0).ok_or(Fallback::NoSnatRange)?;
    let count = match pooled && pool.count <= MAX_SNAT_ADDRS {
        true => pool.count,
        false => 0,
    };
    // An empty pool is none: the flow's own address.
    let (count, pool_mask) = match count {
        0 => (1, 0),
        n => (n, u32::MAX),
    };
    let pairs = span * count;
    if pairs == 0 {
        return Err(Fallback::NoSnatRange);
    }
    let walk_mask = match probes_walk(count, span) {
        true => u32::MAX,
        false => 0,
    };
    let own_addr = s.reverse_key.dst[3];
    // SAFETY: a helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() } % pairs;
    let limit = settings.snat_probe_limit.min(pairs);
    // Every probe's pair first, chosen by masks rather than branches, into
    // the scratch; the probing loop below reads them back as values the
    // verifier knows nothing of. A choice the probing loop made by a branch
    // would have the verifier walk all its probes once per outcome (the TC
    // program took seconds to load).
    for i in 0..MAX_SNAT_PROBES {
        if i >= limit {
            break;
        }
        // SAFETY: a helper without arguments.
        let random = unsafe { bpf_get_prandom_u32() };
        let seed = match i {
            0 => start,
            _ => (start + i) & walk_mask | random & !walk_mask,
        };
        let (index, port) = probe_pair(seed, count, span, min);
        // Below `count` already, which LLVM knows and the verifier does
        // not: read through a volatile so that the mask (the pool's size is
        // a power of two) stays as the bound it sees.
        // SAFETY: a read of a local.
        let index = unsafe { core::ptr::read_volatile(&index) };
        let slot = pool.addrs[index as usize & (MAX_SNAT_ADDRS as usize - 1)];
        // A reload may be rewriting the pool: a torn (zero) slot gives
        // the flow's own address.
        let usable = pool_mask & 0u32.wrapping_sub((slot | slot.wrapping_neg()) >> 31);
        s.probes[i as usize] = SnatPair {
            addr: slot & usable | own_addr & !usable,
            port_be: port.to_be(),
            _pad: 0,
        };
    }
    let may_reuse = if s.reverse_key.proto == PROTO_TCP {
        settings.closed_reuse_before_ns != 0
    } else {
        settings.unanswered_reuse_before_ns != 0
    };
    let mut reusable: u16 = 0;
    let mut reusable_addr: u32 = 0;
    for i in 0..MAX_SNAT_PROBES {
        if i >= limit {
            break;
        }
        // SAFETY: a read of this CPU's scratch.
        let pair = unsafe { core::ptr::read_volatile(&s.probes[i as usize]) };
        let port = u16::from_be(pair.port_be);
        s.reverse_key.dst[3] = pair.addr;
        s.reverse_key.dport = pair.port_be;
        match CONNTRACK.insert(&s.reverse_key, &s.reverse, u64::from(BPF_NOEXIST)) {
            // Checked once the port is ours, so that a host packet racing
            // us finds either our entry (and moves) or its note here.
            Ok(()) if host_nat::host_holds(s, now) => {
                let _ = CONNTRACK.remove(&s.reverse_key);
            }
            Ok(()) => return Ok(()),
            Err(e) if e == -EEXIST => {
                // SAFETY: read at once.
                if may_reuse
                    && reusable == 0
                    && unsafe { CONNTRACK.get(&s.reverse_key) }
                        .is_some_and(|ct| may_be_taken(ct, s.reverse_key.proto, settings, now))
                {
                    reusable = port;
                    reusable_addr = s.reverse_key.dst[3];
                }
            }
            Err(_) => return Err(Fallback::ConntrackFull),
        }
    }
    if reusable == 0 {
        return Err(Fallback::SnatPortsExhausted);
    }
    s.reverse_key.dport = reusable.to_be();
    s.reverse_key.dst[3] = reusable_addr;
    take_over(s, settings, now)?;
    match CONNTRACK.insert(&s.reverse_key, &s.reverse, u64::from(BPF_NOEXIST)) {
        Ok(()) if host_nat::host_holds(s, now) => {
            let _ = CONNTRACK.remove(&s.reverse_key);
            Err(Fallback::SnatPortsExhausted)
        }
        Ok(()) => Ok(()),
        // Another CPU took the port first.
        Err(_) => Err(Fallback::SnatPortsExhausted),
    }
}

/// The first test of a taken port's reverse entry `ct` (`take_over` checks
/// the whole pair): closed and quiet (TCP), or unanswered and quiet (UDP).
#[inline(always)]
fn may_be_taken(ct: &CtValue, proto: u8, settings: &Settings, now: u64) -> bool {
    if proto == PROTO_TCP {
        return closed_and_quiet(ct, settings, now);
    }
    ct.state == CT_STATE_NEW
        && now.wrapping_sub(ct.last_seen_ns) >= settings.unanswered_reuse_after_ns
}

/// True if `ct` saw FIN or RST in its direction and has been idle within
/// the reuse window.
#[inline(always)]
fn closed_and_quiet(ct: &CtValue, settings: &Settings, now: u64) -> bool {
    let idle = now.wrapping_sub(ct.last_seen_ns);
    ct.state == CT_STATE_CLOSING
        && idle >= settings.closed_reuse_after_ns
        && idle < settings.closed_reuse_before_ns
}

/// True if neither side of a UDP pair has moved past unanswered (XDP marks
/// a forward entry established too) and the pair, idle since the later of
/// its two packets as the sweeper counts it, is within the reuse window.
#[inline(always)]
fn unanswered_and_quiet(fwd: &CtValue, rev: &CtValue, settings: &Settings, now: u64) -> bool {
    let idle = now.wrapping_sub(fwd.last_seen_ns.max(rev.last_seen_ns));
    fwd.state == CT_STATE_NEW
        && rev.state == CT_STATE_NEW
        && idle >= settings.unanswered_reuse_after_ns
        && idle < settings.unanswered_reuse_before_ns
}

/// Removes the flow that holds `s.reverse_key`, both entries, if it may
/// give up its port; the port is then free. A TCP flow may if both sides
/// closed, the client first, and are quiet; a UDP flow if the backend
/// never answered and it is quiet. An answered UDP flow never does.
#[inline(always)]
fn take_over(s: &mut Scratch, settings: &Settings, now: u64) -> Result<(), Fallback> {
    // SAFETY: read in place (the stack has no room for a copy).
    let Some(old) = (unsafe { CONNTRACK.get(&s.reverse_key) }) else {
        // Swept meanwhile: the port is free.
        return Ok(());
    };
    let proto = s.reverse_key.proto;
    // Checked again: another CPU may have handed the port on meanwhile.
    if old.direction != CT_DIR_REVERSE || !may_be_taken(old, proto, settings, now) {
        return Err(Fallback::SnatPortsExhausted);
    }
    s.old_key = old.pair_key(proto);
    // SAFETY: read at once.
    let Some(fwd) = (unsafe { CONNTRACK.get(&s.old_key) }) else {
        return Err(Fallback::SnatPortsExhausted);
    };
    // Still this pair's (a TCP client reusing its port starts a flow over).
    if fwd.new_sport != s.reverse_key.dport || fwd.new_src != s.reverse_key.dst {
        return Err(Fallback::SnatPortsExhausted);
    }
    if proto == PROTO_TCP {
        // The client's side must be closed and quiet too, and the client
        // must have closed first: then the backend closed passively and
        // holds no TIME_WAIT that would turn the new flow's SYN away.
        if !closed_and_quiet(fwd, settings, now) || fwd.closed_first == 0 || old.closed_first != 0 {
            return Err(Fallback::SnatPortsExhausted);
        }
    } else {
        if !unanswered_and_quiet(fwd, old, settings, now) {
            return Err(Fallback::SnatPortsExhausted);
        }
        with_rule(s.reverse.rule_id, |c| c.unanswered_taken_over += 1);
    }
    let _ = CONNTRACK.remove(&s.old_key);
    let _ = CONNTRACK.remove(&s.reverse_key);
    Ok(())
}
