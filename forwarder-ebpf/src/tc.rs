//! The TC ingress pipeline: parse, relay-owned flows first, then a known
//! kernel flow (either direction), then a new flow for a matching rule.
//! Whatever the kernel path does not take is passed on unmodified, with
//! [`NEXT`] so that the hook's other programs and filters still see it.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use forwarder_common::{
    ADDR_ANY, CT_DIR_FORWARD, CtKey, CtValue, PROTO_TCP, RULE_F_ACL, RULE_F_PRESERVE_CLIENT_IP,
    RULE_F_RELAY, addr_ipv4_be,
    host_nat::CT_DIR_HOST_IN,
    reasons::{Dropped, Fallback},
};

use crate::acl;
use crate::conntrack;
use crate::counters::{Hook, count_interface, count_reason, with_rule};
use crate::fragments;
use crate::host_nat;
use crate::icmp::{self, Unforwardable};
use crate::maps::{Scratch, scratch};
use crate::mss;
use crate::nat;
use crate::parse::{self, Packet, TCP_ACK, TCP_SYN, Unfit};
use crate::redirect::{self, Flow};
use crate::rules::{self, Matched};

/// Lets the FIB check the skb against the MTU: TC sees GRO/GSO skbs.
const SKB_MTU_CHECK: u16 = 0;

/// The length the FIB checks a known flow's packet against the next hop's
/// MTU with. A DF packet that is no GRO/GSO aggregate gives its own
/// length, which the FIB checks exactly, against the route's MTU. For the
/// rest the FIB checks the skb against the egress interface's MTU, as for
/// new flows (a plain skb with some slack for link headers; a GSO one not
/// at all, see `icmp::segments_fit`). A DF packet found too big is
/// answered with frag-needed and the MTU.
#[inline(always)]
fn mtu_check_len(ctx: &TcContext, pkt: &Packet) -> u16 {
    // SAFETY: the context pointer is valid for the program's run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if pkt.dont_fragment && !gso {
        pkt.tot_len
    } else {
        SKB_MTU_CHECK
    }
}

/// The verdict for packets we leave alone (not ours, the relay's, fallbacks):
/// TCX runs its next program, cls_bpf (direct-action) its next filter, and
/// after the last one the stack takes the packet. Only packets we redirect or
/// drop get a final verdict.
const NEXT: i32 = TC_ACT_UNSPEC;

/// `skb->pkt_type` of frames sent to the link's broadcast or a multicast address.
const PACKET_BROADCAST: u32 = 1;
const PACKET_MULTICAST: u32 = 2;

/// One packet on its way through the pipeline.
struct Work {
    pkt: Packet,
    ifindex: u32,
    now: u64,
}

pub fn handle(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if count_interface(ifindex, Hook::Tc, u64::from(ctx.len())) {
        log_first_packet(ctx, ifindex);
    }
    let Some(pkt) = parse::parse(ctx) else {
        return icmp::translate_error(ctx, ifindex).unwrap_or(NEXT);
    };
    let Some(s) = scratch() else {
        return NEXT;
    };
    s.key = pkt.key();
    let w = Work {
        pkt,
        ifindex,
        // SAFETY: a helper without arguments.
        now: unsafe { bpf_ktime_get_ns() },
    };
    if conntrack::relay_owns(&s.key, w.now) {
        return NEXT;
    }
    // A kernel flow stays one whatever its packets are: fragments and IP
    // options included.
    if w.pkt.unfit == Unfit::LaterFragment {
        return match fragments::flow_of(&w.pkt, s) {
            Some(entry) => known_flow(ctx, &w, entry, s),
            None => NEXT,
        };
    }
    if let Some(entry) = conntrack::lookup(&s.key) {
        if host_nat::is_host(entry) {
            return host_nat::follow(ctx, &w.pkt, entry, w.now, CT_DIR_HOST_IN);
        }
        if w.pkt.unfit == Unfit::Fragment {
            fragments::remember(&w.pkt, s);
        }
        return known_flow(ctx, &w, entry, s);
    }
    if !unicast(ctx, &w.pkt) {
        return NEXT;
    }
    if w.pkt.unfit != Unfit::None {
        return unfit(ctx, &w, s);
    }
    let Some(matched) = rules::lookup(&w.pkt) else {
        return NEXT;
    };
    if matched.rule.flags & RULE_F_RELAY != 0 {
        return NEXT;
    }
    // Only a SYN opens a TCP flow; anything else without an entry is a
    // flow the relay (or nobody) has.
    if w.pkt.proto == PROTO_TCP && w.pkt.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return NEXT;
    }
    if matched.wildcard && !addressed_here(ctx, &w, s) {
        return NEXT;
    }
    if matched.rule.flags & RULE_F_ACL != 0 && !acl::allows(&matched.rule, w.pkt.src) {
        return acl::deny(ctx, &w.pkt, &matched.rule, w.ifindex);
    }
    new_flow(ctx, &w, &matched, s)
}

/// Whether a packet that matched a wildcard rule is for this host, as the
/// relay's wildcard socket would see it, rather than passing through.
#[inline(never)]
fn addressed_here(ctx: &TcContext, w: &Work, s: &mut Scratch) -> bool {
    let flow = Flow {
        ifindex: w.ifindex,
        src: w.pkt.src,
        dst: w.pkt.dst,
        proto: w.pkt.proto,
        sport: w.pkt.sport,
        dport: w.pkt.dport,
        tot_len: SKB_MTU_CHECK,
    };
    redirect::for_this_host(ctx, &flow, s)
}

/// False for broadcast and multicast, by link or IP destination: those are
/// the stack's (a flow would answer from the group or broadcast address).
#[inline(always)]
fn unicast(ctx: &TcContext, pkt: &Packet) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    let pkt_type = unsafe { (*ctx.skb.skb).pkt_type };
    let dst = u32::from_be(pkt.dst);
    let multicast_ip = dst >> 28 == 0xe;
    pkt_type != PACKET_BROADCAST && pkt_type != PACKET_MULTICAST && dst != u32::MAX && !multicast_ip
}

/// Its own BPF function: the log record's frame stays out of `handle`'s.
#[inline(never)]
fn log_first_packet(ctx: &TcContext, ifindex: u32) {
    debug!(ctx, "tc: first packet on ifindex {}", ifindex);
}

// The stages below are separate BPF functions, each with its own stack
// frame: together they would not fit the 512 bytes of one.

/// A new flow that begins with a fragment or a header with options: the
/// relay gets it, if it is one of ours.
#[inline(never)]
fn unfit(ctx: &TcContext, w: &Work, s: &mut Scratch) -> i32 {
    let Some(matched) = rules::lookup(&w.pkt) else {
        return NEXT;
    };
    let rule = matched.rule;
    if rule.flags & RULE_F_RELAY != 0 {
        return NEXT;
    }
    if matched.wildcard && !addressed_here(ctx, w, s) {
        return NEXT;
    }
    let why = if w.pkt.unfit == Unfit::Options {
        Fallback::IpOptions
    } else {
        Fallback::Fragment
    };
    fall_back(ctx, &s.key, rule.rule_id, w.now, why)
}

#[inline(never)]
fn known_flow(ctx: &TcContext, w: &Work, entry: *mut CtValue, s: &mut Scratch) -> i32 {
    let pkt = &w.pkt;
    // SAFETY: copied out at once.
    s.ct = unsafe { *entry };
    let (rule_id, direction) = (s.ct.rule_id, s.ct.direction);
    if pkt.ttl <= 1 {
        return icmp::reply_error(ctx, pkt, Unforwardable::TtlExpired, s);
    }
    let (Some(src), Some(dst)) = (addr_ipv4_be(&s.ct.new_src), addr_ipv4_be(&s.ct.new_dst)) else {
        return drop(ctx, rule_id, Dropped::NotIpv4);
    };
    let flow = Flow {
        ifindex: w.ifindex,
        src,
        dst,
        proto: pkt.proto,
        sport: s.ct.new_sport,
        dport: s.ct.new_dport,
        tot_len: mtu_check_len(ctx, pkt),
    };
    if let Err(rc) = redirect::route(ctx, &flow, s) {
        if rc != i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) || !pkt.dont_fragment {
            let why = if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
                Dropped::TooBig
            } else {
                Dropped::NoRoute
            };
            return drop(ctx, rule_id, why);
        }
        return icmp::reply_error(ctx, pkt, Unforwardable::TooBig, s);
    }
    if pkt.dont_fragment && !icmp::segments_fit(ctx, s) {
        return icmp::reply_error(ctx, pkt, Unforwardable::TooBig, s);
    }
    let change = conntrack::touch(entry, pkt.proto, pkt.tcp_flags, w.now);
    conntrack::follow_up(entry, change, pkt.proto, w.now, &mut s.reverse_key);
    if nat::rewrite(ctx, pkt, &s.ct).is_err() {
        return drop(ctx, rule_id, Dropped::RewriteFailed);
    }
    if pkt.tcp_flags & TCP_SYN != 0 {
        mss::clamp(ctx, pkt, s);
    }
    let bytes = u64::from(ctx.len());
    with_rule(rule_id, |c| {
        if direction == CT_DIR_FORWARD {
            c.packets_fwd += 1;
            c.bytes_fwd += bytes;
        } else {
            c.packets_rev += 1;
            c.bytes_rev += bytes;
        }
    });
    host_nat::mark_forwarded(ctx);
    redirect::send(s)
}

#[inline(never)]
fn new_flow(ctx: &TcContext, w: &Work, matched: &Matched, s: &mut Scratch) -> i32 {
    let (pkt, now, rule) = (&w.pkt, w.now, &matched.rule);
    let Some(backend) = rules::pick_backend(rule) else {
        return fall_back(ctx, &s.key, rule.rule_id, now, Fallback::NoBackend);
    };
    // A range's listen port + i goes to the backend's port + i.
    let dport = u16::from_be(backend.port)
        .wrapping_add(matched.shift)
        .to_be();
    let src = if rule.flags & RULE_F_PRESERVE_CLIENT_IP != 0 {
        Some(pkt.src)
    } else if backend.snat_addr == ADDR_ANY {
        return fall_back(ctx, &s.key, rule.rule_id, now, Fallback::NoSnatAddress);
    } else {
        addr_ipv4_be(&backend.snat_addr)
    };
    let (Some(src), Some(dst)) = (src, addr_ipv4_be(&backend.addr)) else {
        return fall_back(ctx, &s.key, rule.rule_id, now, Fallback::NotIpv4);
    };
    // Packets for us with TTL 1 are fine for the relay, not for forwarding.
    if pkt.ttl <= 1 {
        return fall_back(ctx, &s.key, rule.rule_id, now, Fallback::TtlExpiring);
    }
    // Route first: an unroutable backend must not cost a conntrack entry.
    let flow = Flow {
        ifindex: w.ifindex,
        src,
        dst,
        proto: pkt.proto,
        sport: pkt.sport,
        dport,
        tot_len: SKB_MTU_CHECK,
    };
    if let Err(rc) = redirect::route(ctx, &flow, s) {
        let why = if rc == i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED) {
            Fallback::ForwardingOff
        } else {
            Fallback::NoRoute
        };
        return fall_back(ctx, &s.key, rule.rule_id, now, why);
    }
    let created = match conntrack::create(rule, backend, dport, now, s) {
        Ok(created) => created,
        Err(why) => return fall_back(ctx, &s.key, rule.rule_id, now, why),
    };
    if nat::rewrite(ctx, pkt, &s.ct).is_err() {
        return drop(ctx, rule.rule_id, Dropped::RewriteFailed);
    }
    if pkt.tcp_flags & TCP_SYN != 0 {
        mss::clamp(ctx, pkt, s);
    }
    let bytes = u64::from(ctx.len());
    with_rule(rule.rule_id, |c| {
        // A flow another CPU created a moment ago is counted there.
        c.flows += u64::from(created);
        c.packets_fwd += 1;
        c.bytes_fwd += bytes;
    });
    log_new_flow(ctx, rule.rule_id, pkt, &s.ct);
    host_nat::mark_forwarded(ctx);
    redirect::send(s)
}

/// Its own BPF function, so that its frame does not add to `new_flow`'s.
#[inline(never)]
fn log_new_flow(ctx: &TcContext, rule_id: u32, pkt: &Packet, to: &CtValue) {
    debug!(
        ctx,
        "rule {}: new flow {:i}:{} -> {:i}:{} via {:i}:{}",
        rule_id,
        u32::from_be(pkt.src),
        u16::from_be(pkt.sport),
        u32::from_be(to.new_dst[3]),
        u16::from_be(to.new_dport),
        u32::from_be(to.new_src[3]),
        u16::from_be(to.new_sport)
    );
}

/// Leaves a new flow to the relay for its whole life: the one place that
/// gives TC's verdict for a fallback and counts its reason.
#[inline(always)]
fn fall_back(ctx: &TcContext, key: &CtKey, rule_id: u32, now: u64, why: Fallback) -> i32 {
    conntrack::give_to_relay(key, rule_id, now);
    count_reason(why.slot(rule_id));
    debug!(
        ctx,
        "rule {}: new flow left to the relay: {}",
        rule_id,
        why.name()
    );
    NEXT
}

/// Drops a packet of a kernel flow that cannot be sent on: the one place
/// that gives TC's drop verdict and counts its reason (the ACL's denials
/// are counted as such, by `acl::deny`).
#[inline(always)]
pub(crate) fn drop(ctx: &TcContext, rule_id: u32, why: Dropped) -> i32 {
    debug!(ctx, "rule {}: packet dropped: {}", rule_id, why.name());
    drop_unlogged(rule_id, why)
}

/// [`drop`] without the log record, for callers whose stack has no room
/// for its frame.
#[inline(always)]
pub(crate) fn drop_unlogged(rule_id: u32, why: Dropped) -> i32 {
    count_reason(why.slot(rule_id));
    TC_ACT_SHOT as i32
}
