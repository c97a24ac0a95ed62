//! ICMP for kernel flows, both ways, as NAT does it:
//! - an error about a flow's packet (destination unreachable, time
//!   exceeded, parameter problem) is translated, outer and embedded
//!   headers with every checksum, and sent to the flow's other side;
//! - a flow's packet that cannot be forwarded (TTL expired, DF and too big
//!   for the next hop) is answered with the error the kernel would send.
//!   Passed up instead, it would be addressed to this host and land in the
//!   relay's socket, and nobody would answer.
//!
//! The arithmetic is in `forwarder_common::icmp`; IPv4 headers with
//! options, outer or embedded, are left to the stack.

use aya_ebpf::{
    bindings::{
        BPF_F_RECOMPUTE_CSUM, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS,
        bpf_check_mtu_ret::BPF_MTU_CHK_RET_SEGS_TOOBIG,
    },
    helpers::{bpf_check_mtu, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use forwarder_common::{
    PROTO_TCP, PROTO_UDP, addr_from_ipv4_be, addr_ipv4_be, csum,
    host_nat::CT_DIR_HOST_IN,
    icmp::{
        CODE_FRAG_NEEDED, CODE_TTL_EXCEEDED, EMBEDDED_LEN, ERROR_LEN, ICMP_CSUM_OFF,
        ICMP_DEST_UNREACH, ICMP_OFF, ICMP_TIME_EXCEEDED, INNER_IP_CSUM_OFF, INNER_IP_OFF,
        INNER_L4_OFF, INNER_SRC_OFF, Inner, MIN_ERROR_LEN, PROTO_ICMP, build_error,
        inner_l4_csum_off, is_error, translate_inner,
    },
};

use crate::conntrack;
use crate::counters::with_rule;
use crate::host_nat;
use crate::maps::{Scratch, scratch};
use crate::parse::{ETH_LEN, IP_CSUM_OFF, IP_LEN, IP_SRC_OFF, IP_TTL_OFF, L4_OFF, Packet, Unfit};
use crate::redirect::{self, Flow};
use crate::tc::{drop, drop_unlogged};
use forwarder_common::reasons::Dropped;

/// A cheap first look, in place: IPv4 carrying ICMP. Everything else that
/// is not TCP or UDP (ARP, IPv6, ...) goes on without a helper call.
#[inline(always)]
fn maybe_icmp(ctx: &TcContext) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_LEN + IP_LEN > end {
        return false;
    }
    // SAFETY: inside the linear data, as just checked.
    unsafe {
        *((data + 12) as *const [u8; 2]) == [0x08, 0x00]
            && *((data + ETH_LEN + 9) as *const u8) == PROTO_ICMP
    }
}

/// Reads the first bytes of an ICMP error into `s.icmp`, if the frame is
/// one this module handles: IPv4 without options, not a fragment, an error
/// type that names a packet, and that packet's IPv4 header (without
/// options, not a later fragment) and ports.
#[inline(always)]
fn read_error(ctx: &TcContext, s: &mut Scratch) -> Option<u16> {
    if !load_exact(ctx, ETH_LEN, &mut s.icmp) {
        return None;
    }
    let b = &s.icmp;
    let tot_len = u16::from_be_bytes([b[2], b[3]]);
    let whole = ETH_LEN + usize::from(tot_len) <= ctx.len() as usize;
    let unfragmented = u16::from_be_bytes([b[6], b[7]]) & 0x3fff == 0;
    if b[0] != 0x45 || b[9] != PROTO_ICMP || !unfragmented || !whole {
        return None;
    }
    if usize::from(tot_len) < MIN_ERROR_LEN || !is_error(b[ICMP_OFF]) {
        return None;
    }
    let inner = INNER_IP_OFF;
    let first_fragment = u16::from_be_bytes([b[inner + 6], b[inner + 7]]) & 0x1fff == 0;
    let proto = b[inner + 9];
    if b[inner] != 0x45 || !first_fragment || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return None;
    }
    Some(tot_len)
}

/// Reads exactly `N` bytes at `offset` (aya's `load_bytes` may ask for
/// fewer, which the verifier refuses when that could be none).
#[inline(always)]
fn load_exact<const N: usize>(ctx: &TcContext, offset: usize, dst: &mut [u8; N]) -> bool {
    // SAFETY: the helper writes at most `N` bytes into `dst`.
    unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            dst.as_mut_ptr().cast(),
            N as u32,
        ) == 0
    }
}

#[inline(always)]
fn word(b: &[u8; ERROR_LEN], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn dword(b: &[u8; ERROR_LEN], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Translates an ICMP error about a packet of a kernel flow and sends it
/// to the flow's other side: `Some(verdict)`; `None` when the frame is no
/// such error (the caller passes it on unchanged).
///
/// The embedded packet went out from this host; its reply direction's key
/// is the flow's entry for that side, which says what the other side
/// knows the flow as. The error then goes where a reply would: from the
/// address the other side talked to, to the other side, with the
/// embedded packet as the other side sent it.
#[inline(never)]
pub fn translate_error(ctx: &TcContext, ifindex: u32) -> Option<i32> {
    if !maybe_icmp(ctx) {
        return None;
    }
    let s = scratch()?;
    let tot_len = read_error(ctx, s)?;
    let b = &s.icmp;
    let proto = b[INNER_IP_OFF + 9];
    let inner_src = dword(b, INNER_SRC_OFF);
    let inner_dst = dword(b, INNER_SRC_OFF + 4);
    // The error is for the sender of the packet it is about.
    if dword(b, IP_LEN - 4) != inner_src {
        return None;
    }
    let (ttl, outer_src, outer_dst) = (b[8], dword(b, 12), dword(b, 16));
    let (sport, dport) = (word(b, INNER_L4_OFF), word(b, INNER_L4_OFF + 2));
    let ip_csum = word(b, INNER_IP_CSUM_OFF);
    let l4_csum_at = inner_l4_csum_off(proto);
    // TCP's checksum lies past the 8 bytes every error holds.
    let l4_csum = if l4_csum_at + 2 <= usize::from(tot_len) {
        ctx.load::<u16>(ETH_LEN + l4_csum_at)
            .ok()
            .filter(|&c| c != 0 || proto == PROTO_TCP)
    } else {
        None
    };
    let key = &mut s.key;
    key.src = addr_from_ipv4_be(inner_dst);
    key.dst = addr_from_ipv4_be(inner_src);
    key.sport = dport;
    key.dport = sport;
    key.proto = proto;
    key._pad = [0; 3];
    let entry = conntrack::lookup(&s.key)?;
    // SAFETY: copied out at once.
    s.ct = unsafe { *entry };
    let inner = Inner {
        proto,
        src: inner_src,
        dst: inner_dst,
        sport,
        dport,
        ip_csum,
        l4_csum,
    };
    if host_nat::is_host(entry) {
        // Only an error about a packet sent from a port we moved it to.
        if s.ct.direction != CT_DIR_HOST_IN {
            return None;
        }
        return Some(host_nat::error_about(ctx, &inner, &s.ct));
    }
    let rule_id = s.ct.rule_id;
    if ttl <= 1 {
        return Some(drop(ctx, rule_id, Dropped::TtlExpired));
    }
    let (Some(new_src), Some(new_dst)) = (addr_ipv4_be(&s.ct.new_src), addr_ipv4_be(&s.ct.new_dst))
    else {
        return Some(drop(ctx, rule_id, Dropped::NotIpv4));
    };
    let flow = Flow {
        ifindex,
        src: new_src,
        dst: new_dst,
        proto: PROTO_ICMP,
        sport: 0,
        dport: 0,
        tot_len,
    };
    if redirect::route(ctx, &flow, s).is_err() {
        return Some(drop(ctx, rule_id, Dropped::NoRoute));
    }
    let ct = &s.ct;
    let to = translate_inner(&inner, (new_dst, ct.new_dport), (new_src, ct.new_sport));
    let outer = csum::add(
        csum::add(
            csum::diff4(outer_src, new_src),
            csum::diff4(outer_dst, new_dst),
        ),
        csum::diff2(
            u16::from_ne_bytes([ttl, PROTO_ICMP]),
            u16::from_ne_bytes([ttl - 1, PROTO_ICMP]),
        ),
    );
    let rewritten = (|| -> Result<(), i64> {
        // Each change is balanced by a checksum in the same span (outer
        // header, ICMP message), so skb->csum stays right without help.
        ctx.l3_csum_replace(IP_CSUM_OFF, 0, outer.into(), 0)?;
        ctx.store(IP_SRC_OFF, &[new_src, new_dst], 0)?;
        ctx.store(IP_TTL_OFF, &(ttl - 1), 0)?;
        ctx.l4_csum_replace(ETH_LEN + ICMP_CSUM_OFF, 0, to.icmp_diff.into(), 0)?;
        ctx.store(ETH_LEN + INNER_IP_CSUM_OFF, &to.ip_csum, 0)?;
        ctx.store(ETH_LEN + INNER_SRC_OFF, &[new_dst, new_src], 0)?;
        ctx.store(ETH_LEN + INNER_L4_OFF, &[ct.new_dport, ct.new_sport], 0)?;
        if let Some(c) = to.l4_csum {
            ctx.store(ETH_LEN + l4_csum_at, &c, 0)?;
        }
        Ok(())
    })();
    if rewritten.is_err() {
        return Some(drop(ctx, rule_id, Dropped::RewriteFailed));
    }
    with_rule(rule_id, |c| c.icmp_translated += 1);
    Some(redirect::send(s))
}

/// False if the egress interface the FIB found (in `s.fib`) cannot carry
/// the segments of this GRO/GSO packet; its MTU is then left in `s.fib`
/// for frag-needed. The FIB passes such packets whole, whatever their
/// segments; plain packets it checked itself.
#[inline(never)]
pub fn segments_fit(ctx: &TcContext, s: &mut Scratch) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    if unsafe { (*ctx.skb.skb).gso_size } == 0 {
        return true;
    }
    let mut mtu: u32 = 0;
    // SAFETY: the helper writes the interface's MTU into `mtu`.
    let rc = unsafe {
        bpf_check_mtu(
            ctx.skb.skb.cast(),
            s.fib.ifindex,
            &mut mtu,
            0,
            u64::from(BPF_MTU_CHK_SEGS),
        )
    };
    if rc != i64::from(BPF_MTU_CHK_RET_SEGS_TOOBIG) {
        return true;
    }
    s.fib.__bindgen_anon_1.mtu_result = mtu as u16;
    false
}

/// Why a kernel flow's packet cannot be forwarded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unforwardable {
    TtlExpired,
    /// DF and too big for the next hop, whose MTU the FIB left in `s.fib`.
    TooBig,
}

/// Answers `pkt`, a packet of the kernel flow in `s.ct` that cannot be
/// forwarded, with the ICMP error the kernel
/// would send, in place of the packet: from the address it was sent to,
/// back to its sender, out of the way it came. Where no error can be sent
/// (IP options, a later fragment: Linux answers fragment 0 only; no route
/// back) the packet is dropped and counted. It logs nothing: a log
/// record's frame would not fit beside its callers' on the stack.
#[inline(never)]
pub fn reply_error(ctx: &TcContext, pkt: &Packet, why: Unforwardable, s: &mut Scratch) -> i32 {
    let rule_id = s.ct.rule_id;
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (icmp_type, code, mtu) = match why {
        Unforwardable::TtlExpired => (ICMP_TIME_EXCEEDED, CODE_TTL_EXCEEDED, 0),
        // SAFETY: the FIB's answer to a too-big packet is the MTU.
        Unforwardable::TooBig => (ICMP_DEST_UNREACH, CODE_FRAG_NEEDED, unsafe {
            s.fib.__bindgen_anon_1.mtu_result
        }),
    };
    if pkt.unfit == Unfit::LaterFragment || usize::from(pkt.l4_off) != L4_OFF {
        return not_answered(rule_id, why);
    }
    let embedded = (&mut s.icmp[INNER_IP_OFF..]).try_into().ok();
    if !embedded.is_some_and(|e: &mut [u8; EMBEDDED_LEN]| load_exact(ctx, ETH_LEN, e)) {
        return not_answered(rule_id, why);
    }
    build_error(&mut s.icmp, icmp_type, code, mtu);
    let flow = Flow {
        ifindex,
        src: pkt.dst,
        dst: pkt.src,
        proto: PROTO_ICMP,
        sport: 0,
        dport: 0,
        tot_len: ERROR_LEN as u16,
    };
    if redirect::route(ctx, &flow, s).is_err() {
        return not_answered(rule_id, why);
    }
    // SAFETY: the helper resizes the skb; the context pointer stays valid.
    let resized = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_LEN + ERROR_LEN) as u32, 0) };
    // Resizing turns CHECKSUM_COMPLETE into NONE (receivers verify in
    // software); where the size stays, skb->csum follows the bytes
    // stored. A CHECKSUM_PARTIAL skb (a sender on this host, over a veth)
    // stays so: the error goes back over that veth to that sender, whose
    // stack trusts it, and no device fills in a checksum on the way.
    if resized != 0
        || ctx
            .store(ETH_LEN, &s.icmp, u64::from(BPF_F_RECOMPUTE_CSUM))
            .is_err()
    {
        return not_answered(rule_id, why);
    }
    with_rule(rule_id, |c| c.icmp_sent += 1);
    redirect::send(s)
}

#[inline(always)]
fn not_answered(rule_id: u32, why: Unforwardable) -> i32 {
    let why = match why {
        Unforwardable::TtlExpired => Dropped::TtlExpired,
        Unforwardable::TooBig => Dropped::TooBig,
    };
    drop_unlogged(rule_id, why)
}
