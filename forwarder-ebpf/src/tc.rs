//! The TC ingress pipeline: parse, relay-owned flows first, then a known
//! kernel flow (either direction), then a new flow for a matching rule.
//! Whatever the kernel path does not take is passed on unmodified.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use forwarder_common::{
    CT_DIR_FORWARD, CtKey, CtValue, PROTO_TCP, RULE_F_PRESERVE_CLIENT_IP, RULE_F_RELAY, RuleValue,
    addr_ipv4_be,
};

use crate::conntrack::{self, Fallback};
use crate::counters::{Hook, count_interface, with_rule};
use crate::nat;
use crate::parse::{self, Packet, TCP_ACK, TCP_SYN, Unfit};
use crate::redirect;
use crate::rules;

pub fn handle(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if count_interface(ifindex, Hook::Tc, u64::from(ctx.len())) {
        debug!(ctx, "tc: first packet on ifindex {}", ifindex);
    }
    let Some(pkt) = parse::parse(ctx) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = pkt.key();
    if conntrack::relay_owns(&key, now) {
        return TC_ACT_OK as i32;
    }
    if pkt.unfit != Unfit::None {
        unfit(ctx, &pkt, &key, now);
        return TC_ACT_OK as i32;
    }
    if let Some(entry) = conntrack::lookup(&key) {
        return known_flow(ctx, &pkt, entry, ifindex, now);
    }
    let Some(rule) = rules::lookup(&pkt) else {
        return TC_ACT_OK as i32;
    };
    if rule.flags & RULE_F_RELAY != 0 {
        return TC_ACT_OK as i32;
    }
    // Only a SYN opens a TCP flow; anything else without an entry is a
    // flow the relay (or nobody) has.
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return TC_ACT_OK as i32;
    }
    new_flow(ctx, &pkt, &key, &rule, ifindex, now)
}

/// A fragment or a header with options: the relay gets the flow, if it is
/// one of ours and not already the kernel's.
#[inline(always)]
fn unfit(ctx: &TcContext, pkt: &Packet, key: &CtKey, now: u64) {
    let Some(rule) = rules::lookup(pkt) else {
        return;
    };
    if rule.flags & RULE_F_RELAY != 0 || conntrack::lookup(key).is_some() {
        return;
    }
    conntrack::give_to_relay(key, rule.rule_id, now);
    with_rule(rule.rule_id, |c| c.fallback_other += 1);
    debug!(
        ctx,
        "rule {}: fragment or IP options from {:i}:{}, flow left to the relay",
        rule.rule_id,
        u32::from_be(pkt.src),
        u16::from_be(pkt.sport)
    );
}

#[inline(always)]
fn known_flow(ctx: &TcContext, pkt: &Packet, entry: *mut CtValue, ifindex: u32, now: u64) -> i32 {
    // SAFETY: copied out at once.
    let ct = unsafe { *entry };
    if pkt.ttl <= 1 {
        return drop(ctx, ct.rule_id, "TTL expired");
    }
    let (Some(src), Some(dst)) = (addr_ipv4_be(&ct.new_src), addr_ipv4_be(&ct.new_dst)) else {
        return drop(ctx, ct.rule_id, "not IPv4");
    };
    let Ok(mut route) = redirect::route(
        ctx,
        ifindex,
        src,
        dst,
        pkt.proto,
        ct.new_sport,
        ct.new_dport,
        pkt.tot_len,
    ) else {
        return drop(ctx, ct.rule_id, "no route");
    };
    conntrack::touch(entry, pkt.proto, pkt.tcp_flags, now);
    if nat::rewrite(ctx, pkt, &ct).is_err() {
        return drop(ctx, ct.rule_id, "rewrite failed");
    }
    let bytes = u64::from(ctx.len());
    with_rule(ct.rule_id, |c| {
        if ct.direction == CT_DIR_FORWARD {
            c.packets_fwd += 1;
            c.bytes_fwd += bytes;
        } else {
            c.packets_rev += 1;
            c.bytes_rev += bytes;
        }
    });
    redirect::send(&mut route)
}

#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    pkt: &Packet,
    key: &CtKey,
    rule: &RuleValue,
    ifindex: u32,
    now: u64,
) -> i32 {
    let Some(backend) = rules::pick_backend(rule) else {
        return fall_back(ctx, key, rule.rule_id, now, Fallback::Other);
    };
    let src = if rule.flags & RULE_F_PRESERVE_CLIENT_IP != 0 {
        Some(pkt.src)
    } else {
        addr_ipv4_be(&backend.snat_addr)
    };
    let (Some(src), Some(dst)) = (src, addr_ipv4_be(&backend.addr)) else {
        return fall_back(ctx, key, rule.rule_id, now, Fallback::Other);
    };
    // Packets for us with TTL 1 are fine for the relay, not for forwarding.
    if pkt.ttl <= 1 {
        return fall_back(ctx, key, rule.rule_id, now, Fallback::Other);
    }
    // Route first: an unroutable backend must not cost a conntrack entry.
    let Ok(mut route) = redirect::route(
        ctx,
        ifindex,
        src,
        dst,
        pkt.proto,
        pkt.sport,
        backend.port,
        pkt.tot_len,
    ) else {
        return fall_back(ctx, key, rule.rule_id, now, Fallback::Other);
    };
    let forward = match conntrack::create(key, rule, &backend, now) {
        Ok(forward) => forward,
        Err(why) => return fall_back(ctx, key, rule.rule_id, now, why),
    };
    if nat::rewrite(ctx, pkt, &forward).is_err() {
        return drop(ctx, rule.rule_id, "rewrite failed");
    }
    let bytes = u64::from(ctx.len());
    with_rule(rule.rule_id, |c| {
        c.flows += 1;
        c.packets_fwd += 1;
        c.bytes_fwd += bytes;
    });
    debug!(
        ctx,
        "rule {}: new flow {:i}:{} -> {:i}:{} via {:i}:{}",
        rule.rule_id,
        u32::from_be(pkt.src),
        u16::from_be(pkt.sport),
        u32::from_be(dst),
        u16::from_be(backend.port),
        u32::from_be(src),
        u16::from_be(forward.new_sport)
    );
    redirect::send(&mut route)
}

/// Leaves a new flow to the relay for its whole life.
#[inline(always)]
fn fall_back(ctx: &TcContext, key: &CtKey, rule_id: u32, now: u64, why: Fallback) -> i32 {
    conntrack::give_to_relay(key, rule_id, now);
    with_rule(rule_id, |c| match why {
        Fallback::Full => c.fallback_full += 1,
        Fallback::Other => c.fallback_other += 1,
    });
    if why == Fallback::Full {
        debug!(
            ctx,
            "rule {}: table full, new flow left to the relay", rule_id
        );
    } else {
        debug!(ctx, "rule {}: new flow left to the relay", rule_id);
    }
    TC_ACT_OK as i32
}

/// Drops a packet of a kernel flow that cannot be sent on.
#[inline(always)]
fn drop(ctx: &TcContext, rule_id: u32, why: &'static str) -> i32 {
    with_rule(rule_id, |c| c.dropped += 1);
    debug!(ctx, "rule {}: packet dropped: {}", rule_id, why);
    TC_ACT_SHOT as i32
}
