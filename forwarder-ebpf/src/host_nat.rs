//! The host's own NAT beside ours (see `forwarder_common::host_nat`): the
//! egress program, the allocator's check, and the answers to host flows
//! moved off a kernel flow's port.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_RECOMPUTE_CSUM, BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use forwarder_common::{
    CT_DIR_REVERSE, CT_STATE_NEW, CtValue, PROTO_UDP, addr_from_ipv4_be, csum,
    host_nat::{
        CT_DIR_HOST_IN, CT_DIR_HOST_OUT, FORWARDED_MARK, HOST_RULE_ID, HostPortKey, host_port_held,
    },
    icmp::{ICMP_CSUM_OFF, INNER_L4_OFF, Inner, inner_l4_csum_off, translate_inner},
};

use crate::conntrack::{self, TOUCH_EVERY_NS};
use crate::maps::{CONNTRACK, HOST_PORTS, SETTINGS, Scratch, scratch};
use crate::parse::{self, ETH_LEN, Packet, Unfit};

/// Not ours: the hook's next program, then the qdisc or the stack.
const NEXT: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT as i32;

/// Marks a packet the kernel path is about to redirect as its own.
#[inline(always)]
pub fn mark_forwarded(ctx: &TcContext) {
    // SAFETY: the context pointer is valid for the program's run.
    unsafe { (*ctx.skb.skb).mark |= FORWARDED_MARK };
}

/// The egress program: packets the host sends from a port of our SNAT
/// range are noted, and moved to another port when a kernel flow holds
/// their tuple. Everything else goes on untouched.
pub fn egress(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & FORWARDED_MARK != 0 {
        // SAFETY: as above.
        unsafe { (*ctx.skb.skb).mark = mark & !FORWARDED_MARK };
        return NEXT;
    }
    let Some(pkt) = parse::parse(ctx) else {
        return NEXT;
    };
    // A later fragment has no ports; its first fragment had them moved.
    if pkt.unfit == Unfit::LaterFragment {
        return NEXT;
    }
    let Some(settings) = SETTINGS.get(0) else {
        return NEXT;
    };
    let sport = u16::from_be(pkt.sport);
    if sport < settings.snat_port_min || sport > settings.snat_port_max {
        return NEXT;
    }
    let Some(s) = scratch() else {
        return NEXT;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    s.key = pkt.key();
    if let Some(entry) = conntrack::lookup(&s.key) {
        return follow(ctx, &pkt, entry, now, CT_DIR_HOST_OUT);
    }
    note(&pkt, now);
    s.reverse_key = s.key.reversed();
    let Some(holder) = conntrack::lookup(&s.reverse_key) else {
        return NEXT;
    };
    // SAFETY: read at once.
    let direction = unsafe { (*holder).direction };
    if direction != CT_DIR_REVERSE && direction != CT_DIR_HOST_IN {
        return NEXT;
    }
    move_off(ctx, &pkt, now, s)
}

/// Remembers that the host uses the packet's source port toward its
/// destination.
#[inline(never)]
fn note(pkt: &Packet, now: u64) {
    let key = HostPortKey {
        addr: addr_from_ipv4_be(pkt.dst),
        port: pkt.dport,
        sport: pkt.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    if let Some(seen) = HOST_PORTS.get_ptr_mut(&key) {
        // SAFETY: a value of the map; racing writers store a time as well.
        let seen = unsafe { &mut *seen };
        if now.wrapping_sub(*seen) > TOUCH_EVERY_NS {
            *seen = now;
        }
        return;
    }
    let _ = HOST_PORTS.insert(&key, &now, 0);
}

/// True if the host may still use the SNAT port of `s.reverse_key` (a
/// reverse key: backend to our address and port). The lookup key is built
/// in the scratch space: this runs deep in the ingress program's calls.
#[inline(never)]
pub fn host_holds(s: &mut Scratch, now: u64) -> bool {
    let (reverse, key) = (&s.reverse_key, &mut s.host_port);
    key.addr = reverse.src;
    key.port = reverse.sport;
    key.sport = reverse.dport;
    key.proto = reverse.proto;
    key._pad = [0; 3];
    // SAFETY: read at once.
    unsafe { HOST_PORTS.get(&*key) }.is_some_and(|&seen| host_port_held(key.proto, seen, now))
}

/// The first host packet on a tuple a kernel flow holds: the host's flow
/// gets a free port of ours, and a pair of entries to keep it there
/// (`s.key` is the packet's tuple, `s.reverse_key` its answer's).
#[inline(never)]
fn move_off(ctx: &TcContext, pkt: &Packet, now: u64, s: &mut Scratch) -> i32 {
    conntrack::fill(
        &mut s.reverse,
        (s.key.dst, s.key.src),
        (pkt.dport, pkt.sport),
        HOST_RULE_ID,
        now,
        CT_DIR_HOST_IN,
        CT_STATE_NEW,
    );
    // Without a port the backend could not tell the two flows apart and
    // the host's answers would go to our client: dropped instead.
    if conntrack::reserve_port(s, now, false).is_err() {
        return DROP;
    }
    let port = s.reverse_key.dport;
    conntrack::fill(
        &mut s.ct,
        (s.key.src, s.key.dst),
        (port, pkt.dport),
        HOST_RULE_ID,
        now,
        CT_DIR_HOST_OUT,
        CT_STATE_NEW,
    );
    let port = match CONNTRACK.insert(&s.key, &s.ct, u64::from(BPF_NOEXIST)) {
        Ok(()) => port,
        Err(_) => {
            let _ = CONNTRACK.remove(&s.reverse_key);
            // Another CPU moved this flow a moment ago: its port.
            // SAFETY: read at once.
            match unsafe { CONNTRACK.get(&s.key) } {
                Some(ct) if ct.direction == CT_DIR_HOST_OUT => ct.new_sport,
                _ => return DROP,
            }
        }
    };
    verdict(rewrite_port(
        ctx,
        pkt,
        usize::from(pkt.l4_off),
        pkt.sport,
        port,
    ))
}

/// True for the entries of a moved host flow.
#[inline(always)]
pub fn is_host(entry: *mut CtValue) -> bool {
    // SAFETY: read at once.
    unsafe { (*entry).direction >= CT_DIR_HOST_OUT }
}

/// A packet of a moved host flow, by the entry of its direction
/// (`direction`; an entry of the other one is not this hook's): leaving,
/// its source port becomes the one it was moved to; the backend's answer,
/// at ingress, gets the host's port back as its destination, and the
/// stack (its conntrack and NAT) takes it from there, TTL included.
#[inline(never)]
pub fn follow(ctx: &TcContext, pkt: &Packet, entry: *mut CtValue, now: u64, direction: u8) -> i32 {
    // SAFETY: a value of the map; racing writers store a time as well.
    let ct = unsafe { &mut *entry };
    if ct.direction != direction {
        return NEXT;
    }
    refresh(ct, now);
    let l4 = usize::from(pkt.l4_off);
    let (at, from, to) = if direction == CT_DIR_HOST_OUT {
        (l4, pkt.sport, ct.new_sport)
    } else {
        (l4 + 2, pkt.dport, ct.new_dport)
    };
    verdict(rewrite_port(ctx, pkt, at, from, to))
}

/// An ICMP error about a packet of a moved host flow (`ct`, its incoming
/// entry, is keyed by the embedded packet's answer): the embedded source
/// port goes back to the host's, checksums with it, and the stack takes
/// it, so that its conntrack relates it to the host's own flow. Inlined:
/// as a BPF function, its borrowed `Inner` would be passed field by
/// field, more arguments than BPF calls carry.
#[inline(always)]
pub fn error_about(ctx: &TcContext, inner: &Inner, ct: &CtValue) -> i32 {
    let to = translate_inner(inner, (inner.src, ct.new_dport), (inner.dst, inner.dport));
    // Each change is balanced by the ICMP checksum over the same span, so
    // skb->csum stays right without help.
    if ctx
        .l4_csum_replace(ETH_LEN + ICMP_CSUM_OFF, 0, to.icmp_diff.into(), 0)
        .is_err()
        || ctx.store(ETH_LEN + INNER_L4_OFF, &ct.new_dport, 0).is_err()
    {
        return DROP;
    }
    if let Some(c) = to.l4_csum {
        verdict(ctx.store(ETH_LEN + inner_l4_csum_off(inner.proto), &c, 0))
    } else {
        NEXT
    }
}

#[inline(always)]
fn refresh(ct: &mut CtValue, now: u64) {
    if now.wrapping_sub(ct.last_seen_ns) > TOUCH_EVERY_NS {
        ct.last_seen_ns = now;
    }
}

#[inline(always)]
fn verdict(rewritten: Result<(), i64>) -> i32 {
    match rewritten {
        Ok(()) => NEXT,
        Err(_) => DROP,
    }
}

/// Writes the port at `at` (from `from` to `to`, network order) and fixes
/// the L4 checksum. A port is outside the pseudo-header: a
/// CHECKSUM_PARTIAL skb keeps its field, a CHECKSUM_COMPLETE one stays
/// balanced, and a UDP datagram without checksum keeps none.
#[inline(always)]
fn rewrite_port(ctx: &TcContext, pkt: &Packet, at: usize, from: u16, to: u16) -> Result<(), i64> {
    let mangled = if pkt.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    ctx.l4_csum_replace(pkt.l4_csum_off(), 0, csum::diff2(from, to).into(), mangled)?;
    let flags = if pkt.udp_no_csum {
        u64::from(BPF_F_RECOMPUTE_CSUM)
    } else {
        0
    };
    ctx.store(at, &to, flags)
}
