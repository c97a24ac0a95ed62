//! The XDP accelerator: packets of flows that are established in conntrack
//! are rewritten and sent on right here, in both directions, for rules
//! with `RULE_F_XDP`. Everything else goes up to TC unchanged: new flows,
//! TCP before the backend answered, SYN/FIN/RST (TC keeps the flow's
//! state), fragments, IP options, an unresolved neighbour, an egress
//! interface outside `XDP_EGRESS`.
//!
//! UDP flows are established by the backend's first answer, as TCP ones by
//! its SYN-ACK: TC creates the flow and sees that answer, XDP carries the rest.

mod nat;
mod parse;
mod redirect;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use aya_log_ebpf::debug;
use forwarder_common::{
    CT_DIR_FORWARD, CT_DIR_REVERSE, CT_STATE_ESTABLISHED, CT_STATE_NEW, CtValue, PROTO_TCP,
    RULE_F_XDP, addr_ipv4_be,
    reasons::{NO_RULE, XdpPass},
};

use crate::conntrack;
use crate::counters::{Hook, count_interface, count_reason, with_rule};
use crate::maps::{RULE_FLAGS, Scratch, scratch};
use crate::parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN};
use crate::redirect::Flow;

const PASS: u32 = xdp_action::XDP_PASS;

/// One frame on its way through the pipeline.
struct Work {
    pkt: Packet,
    ifindex: u32,
    bytes: u64,
}

pub fn handle(ctx: &XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let ifindex = ctx.ingress_ifindex() as u32;
    if count_interface(ifindex, Hook::Xdp, bytes) {
        debug!(ctx, "xdp: first packet on ifindex {}", ifindex);
    }
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        Err(why) => return pass(NO_RULE, why),
    };
    // Never taken: a one-entry per-CPU array always has its slot.
    let Some(s) = scratch() else {
        return PASS;
    };
    s.key = pkt.key();
    let Some(entry) = conntrack::lookup(&s.key) else {
        return pass(NO_RULE, XdpPass::NoFlow);
    };
    let w = Work {
        pkt,
        ifindex,
        bytes,
    };
    carry(ctx, &w, entry, s)
}

/// Sends on a packet of a known flow, if the flow is XDP's to carry.
#[inline(never)]
fn carry(ctx: &XdpContext, w: &Work, entry: *mut CtValue, s: &mut Scratch) -> u32 {
    let (pkt, ifindex, bytes) = (&w.pkt, w.ifindex, w.bytes);
    // SAFETY: copied out at once.
    s.ct = unsafe { *entry };
    let (rule_id, direction) = (s.ct.rule_id, s.ct.direction);
    // A moved host flow's answers are TC's to move back: no kernel flow.
    if direction > CT_DIR_REVERSE {
        return pass(NO_RULE, XdpPass::NoFlow);
    }
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return pass(rule_id, XdpPass::TcpControl);
    }
    // TC answers or drops an expiring packet, and counts it.
    if pkt.ttl <= 1 {
        return pass(rule_id, XdpPass::TtlExpiring);
    }
    if !xdp_allowed(rule_id) {
        return pass(rule_id, XdpPass::RuleNotXdp);
    }
    if !established(entry, pkt.proto, s) {
        return pass(rule_id, XdpPass::NotEstablished);
    }
    let (Some(src), Some(dst)) = (addr_ipv4_be(&s.ct.new_src), addr_ipv4_be(&s.ct.new_dst)) else {
        return pass(rule_id, XdpPass::NotIpv4);
    };
    let flow = Flow {
        ifindex,
        src,
        dst,
        proto: pkt.proto,
        sport: s.ct.new_sport,
        dport: s.ct.new_dport,
        tot_len: pkt.tot_len,
    };
    if redirect::route(ctx, &flow, s).is_err() {
        return pass(rule_id, XdpPass::NoRoute);
    }
    if !redirect::can_send(s) {
        return pass(rule_id, XdpPass::EgressNotXdp);
    }
    if nat::rewrite(ctx, pkt, &s.ct, &s.fib).is_none() {
        return pass(rule_id, XdpPass::RewriteFailed);
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SYN, FIN and RST are TC's: XDP never changes a flow's state here.
    let _ = conntrack::touch(entry, pkt.proto, pkt.tcp_flags, now);
    with_rule(rule_id, |c| {
        if direction == CT_DIR_FORWARD {
            c.packets_fwd += 1;
            c.bytes_fwd += bytes;
        } else {
            c.packets_rev += 1;
            c.bytes_rev += bytes;
        }
        c.xdp_packets += 1;
    });
    redirect::send(ifindex, s)
}

/// Leaves the packet to TC: the one place that gives XDP's pass verdict
/// and counts its reason, in `rule_id`'s row (or `NO_RULE`'s).
#[inline(always)]
fn pass(rule_id: u32, why: XdpPass) -> u32 {
    count_reason(why.slot(rule_id));
    PASS
}

/// The rule lets XDP carry its flows (`path: xdp`).
#[inline(always)]
fn xdp_allowed(rule_id: u32) -> bool {
    RULE_FLAGS
        .get(rule_id)
        .is_some_and(|flags| flags & RULE_F_XDP != 0)
}

/// True if the flow of `s.ct` (the value at `entry`) is established. A
/// forward entry is not told when the backend answers, its reverse pair
/// is: when that one is established, so is the forward one from now on.
#[inline(always)]
fn established(entry: *mut CtValue, proto: u8, s: &mut Scratch) -> bool {
    let ct = &s.ct;
    if ct.state == CT_STATE_ESTABLISHED {
        return true;
    }
    if ct.state != CT_STATE_NEW || ct.direction != CT_DIR_FORWARD {
        return false;
    }
    s.reverse_key = ct.pair_key(proto);
    let Some(reverse) = conntrack::lookup(&s.reverse_key) else {
        return false;
    };
    // SAFETY: values of the map; a racing writer stores a state as well.
    unsafe {
        if (*reverse).state != CT_STATE_ESTABLISHED {
            return false;
        }
        (*entry).state = CT_STATE_ESTABLISHED;
    }
    true
}
