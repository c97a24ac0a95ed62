//! Rewriting a packet to a conntrack entry: addresses, ports, TTL, and the
//! IPv4 and L4 checksums through the skb helpers (which also keep
//! CHECKSUM_PARTIAL and CHECKSUM_COMPLETE skbs right).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};
use forwarder_common::{CtValue, PROTO_UDP};

use crate::parse::{
    IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, L4_DPORT_OFF, L4_SPORT_OFF, Packet,
};

/// Rewrites `pkt` (as parsed from `ctx`) to `to` and decrements its TTL;
/// the caller made sure the TTL is above 1.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, to: &CtValue) -> Result<(), i64> {
    let l4_csum = pkt.l4_csum_off();
    // A zero UDP checksum means "none" and must stay zero; a checksum that
    // becomes zero is written as 0xffff.
    let mangled = if pkt.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    let (new_src, new_dst) = (to.new_src[3], to.new_dst[3]);
    if new_src != pkt.src {
        ctx.l4_csum_replace(
            l4_csum,
            pkt.src.into(),
            new_src.into(),
            pseudo | mangled | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, pkt.src.into(), new_src.into(), 4)?;
        ctx.store(IP_SRC_OFF, &new_src, 0)?;
    }
    if new_dst != pkt.dst {
        ctx.l4_csum_replace(
            l4_csum,
            pkt.dst.into(),
            new_dst.into(),
            pseudo | mangled | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, pkt.dst.into(), new_dst.into(), 4)?;
        ctx.store(IP_DST_OFF, &new_dst, 0)?;
    }
    // A port change is balanced by the checksum change, so skb->csum
    // (CHECKSUM_COMPLETE) stays right; without a UDP checksum nothing
    // balances it and the store must update skb->csum itself.
    let port_store = if pkt.udp_no_csum {
        u64::from(BPF_F_RECOMPUTE_CSUM)
    } else {
        0
    };
    if to.new_sport != pkt.sport {
        ctx.l4_csum_replace(l4_csum, pkt.sport.into(), to.new_sport.into(), mangled | 2)?;
        ctx.store(L4_SPORT_OFF, &to.new_sport, port_store)?;
    }
    if to.new_dport != pkt.dport {
        ctx.l4_csum_replace(l4_csum, pkt.dport.into(), to.new_dport.into(), mangled | 2)?;
        ctx.store(L4_DPORT_OFF, &to.new_dport, port_store)?;
    }
    // TTL and protocol share a 16-bit word of the header checksum.
    let old_word = u16::from_ne_bytes([pkt.ttl, pkt.proto]);
    let new_word = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]);
    ctx.l3_csum_replace(IP_CSUM_OFF, old_word.into(), new_word.into(), 2)?;
    ctx.store(IP_TTL_OFF, &(pkt.ttl - 1), 0)?;
    Ok(())
}
