//! Per-rule client ACLs, checked before a new flow is created: a denied
//! first packet is dropped, or for a rule with `acl.action: reject` a TCP
//! SYN is answered with an RST built from it, as the host's stack answers a
//! SYN to a closed port. Established flows never come here.

use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use forwarder_common::{
    ACL_ALLOW, ACL_FAMILY_V4, ACL_KEY_HEAD_BITS, AclKey, PROTO_TCP, RULE_F_ACL_DEFAULT_DENY,
    RULE_F_ACL_REJECT, RuleValue, addr_from_ipv4_be, csum,
};

use crate::counters::with_rule;
use crate::maps::ACL;
use crate::parse::{ETH_LEN, L4_OFF, Packet, TCP_ACK, TCP_RST};

/// Every bit of the key: rule id and family, and the mapped address.
const FULL_PREFIX: u32 = ACL_KEY_HEAD_BITS + 128;

/// Whether the rule's ACL lets IPv4 client `src` (network order) open a
/// flow: the most specific entry decides, else the rule's default.
#[inline(never)]
pub fn allows(rule: &RuleValue, src: u32) -> bool {
    let key = Key::new(
        FULL_PREFIX,
        AclKey {
            rule_id_be: rule.rule_id.to_be(),
            family: ACL_FAMILY_V4,
            addr: addr_from_ipv4_be(src),
        },
    );
    match ACL.get(&key) {
        Some(verdict) => *verdict == ACL_ALLOW,
        None => rule.flags & RULE_F_ACL_DEFAULT_DENY == 0,
    }
}

/// Counts and answers a denied first packet: an RST for a TCP SYN of a
/// rejecting rule, a drop otherwise (and if the RST cannot be built).
#[inline(never)]
pub fn deny(ctx: &TcContext, pkt: &Packet, rule: &RuleValue, ifindex: u32) -> i32 {
    let rule_id = rule.rule_id;
    with_rule(rule_id, |c| c.acl_denied += 1);
    debug!(
        ctx,
        "rule {}: {:i}:{} denied by the acl",
        rule_id,
        u32::from_be(pkt.src),
        u16::from_be(pkt.sport)
    );
    if pkt.proto == PROTO_TCP && rule.flags & RULE_F_ACL_REJECT != 0 {
        if let Ok(action) = reset(ctx, pkt, ifindex) {
            return action;
        }
    }
    TC_ACT_SHOT as i32
}

/// The IPv4 and TCP headers of an RST, as on the wire (network order).
#[repr(C)]
#[derive(Default)]
struct ResetHeaders {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    ip_csum: u16,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    doff: u8,
    flags: u8,
    window: u16,
    tcp_csum: u16,
    urgent: u16,
}

const RESET_IP_LEN: u16 = 20;
const RESET_TCP_LEN: u16 = 20;

/// The one's complement sum of `words` 16 bits at a time (no loop over a
/// slice: the verifier sees fixed offsets).
#[inline(always)]
fn sum_words(initial: u32, words: &[u32]) -> u32 {
    let mut sum = initial;
    for w in words {
        sum = csum::add(sum, (w & 0xffff) + (w >> 16));
    }
    sum
}

/// Turns the SYN into the RST|ACK that answers it (RFC 9293 3.10.7.1: seq
/// 0, ack = SYN's seq + its length) and sends it back out the interface it
/// came in on, to the MAC it came from.
#[inline(never)]
fn reset(ctx: &TcContext, pkt: &Packet, ifindex: u32) -> Result<i32, i64> {
    let seq = u32::from_be(ctx.load::<u32>(L4_OFF + 4)?);
    let doff = usize::from(ctx.load::<u8>(L4_OFF + 12)? >> 4) * 4;
    let payload = usize::from(pkt.tot_len).saturating_sub(usize::from(RESET_IP_LEN) + doff);
    let macs: [u8; 12] = ctx.load(0)?;
    let mut h = ResetHeaders {
        ver_ihl: 0x45,
        tot_len: (RESET_IP_LEN + RESET_TCP_LEN).to_be(),
        frag_off: 0x4000u16.to_be(),
        ttl: 64,
        proto: PROTO_TCP,
        src: pkt.dst,
        dst: pkt.src,
        sport: pkt.dport,
        dport: pkt.sport,
        ack: seq.wrapping_add(1).wrapping_add(payload as u32).to_be(),
        doff: 5 << 4,
        flags: TCP_RST | TCP_ACK,
        ..ResetHeaders::default()
    };
    // SAFETY: 40 bytes of plain integers, 4-aligned.
    let words: &[u32; 10] = unsafe { &*(&h as *const ResetHeaders).cast() };
    h.ip_csum = !csum::fold(sum_words(0, &words[..5]));
    let pseudo = sum_words(
        0,
        &[
            pkt.src,
            pkt.dst,
            u32::from(u16::from_ne_bytes([0, PROTO_TCP])) + u32::from(RESET_TCP_LEN.to_be()),
        ],
    );
    // SAFETY: as above; re-read after the IP checksum was written.
    let words: &[u32; 10] = unsafe { &*(&h as *const ResetHeaders).cast() };
    h.tcp_csum = !csum::fold(sum_words(pseudo, &words[5..]));
    // The SYN's options and data go; if the skb cannot be trimmed they stay
    // as padding past the IP total length, which receivers cut off. A
    // trimmed CHECKSUM_COMPLETE skb becomes CHECKSUM_NONE: the checksums
    // above are whole. A CHECKSUM_PARTIAL one (a sender on this host)
    // goes back out the veth it came from, whose peer trusts it.
    let frame = (ETH_LEN as u32) + u32::from(RESET_IP_LEN + RESET_TCP_LEN);
    // SAFETY: the program's own skb.
    let _ = unsafe { bpf_skb_change_tail(ctx.skb.skb.cast(), frame, 0) };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    let recompute = u64::from(BPF_F_RECOMPUTE_CSUM);
    ctx.store(0, &swapped, recompute)?;
    ctx.store(ETH_LEN, &h, recompute)?;
    // SAFETY: a helper taking plain values.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
