//! Rewriting a packet to a conntrack entry: addresses, ports, TTL, and the
//! IPv4 and L4 checksums through the skb helpers (which also keep
//! CHECKSUM_PARTIAL and CHECKSUM_COMPLETE skbs right).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};
use forwarder_common::{CtValue, PROTO_UDP, csum};

use crate::parse::{IP_CSUM_OFF, IP_SRC_OFF, IP_TTL_OFF, Packet, Unfit};

/// Rewrites `pkt` (as parsed from `ctx`) to `to` and decrements its TTL;
/// the caller made sure the TTL is above 1.
///
/// Each checksum is updated once, by the summed difference of every field
/// it covers (the helpers' diff form): helper calls are most of this
/// program's cost per packet. Its own BPF function: inlined, its frame
/// would push the callers' stacks past 512 bytes.
///
/// A later fragment has no L4 header: only its IPv4 header changes (the
/// first fragment's L4 checksum covered the whole datagram).
#[inline(never)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, to: &CtValue) -> Result<(), i64> {
    let (new_src, new_dst) = (to.new_src[3], to.new_dst[3]);
    let has_l4 = pkt.unfit != Unfit::LaterFragment;
    let addrs_change = new_src != pkt.src || new_dst != pkt.dst;
    let ports_change = has_l4 && (to.new_sport != pkt.sport || to.new_dport != pkt.dport);
    let diffs = Diffs::of(pkt, to);

    if has_l4 {
        let l4_csum = pkt.l4_csum_off();
        // A zero UDP checksum means "none" and must stay zero; a checksum
        // that becomes zero is written as 0xffff.
        let mangled = if pkt.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        // Size 0 in the flags: `to` is a difference, `from` must be 0.
        if addrs_change {
            let pseudo = u64::from(BPF_F_PSEUDO_HDR);
            ctx.l4_csum_replace(l4_csum, 0, diffs.addrs.into(), pseudo | mangled)?;
        }
        if ports_change {
            ctx.l4_csum_replace(l4_csum, 0, diffs.ports.into(), mangled)?;
        }
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, 0, diffs.ip_header().into(), 0)?;

    if addrs_change {
        // Source and destination are adjacent: one store.
        ctx.store(IP_SRC_OFF, &[new_src, new_dst], 0)?;
    }
    if ports_change {
        // A port change is balanced by the checksum change, so skb->csum
        // (CHECKSUM_COMPLETE) stays right; without a UDP checksum nothing
        // balances it and the store must update skb->csum itself.
        let flags = if pkt.udp_no_csum {
            u64::from(BPF_F_RECOMPUTE_CSUM)
        } else {
            0
        };
        ctx.store(
            usize::from(pkt.l4_off),
            &[to.new_sport, to.new_dport],
            flags,
        )?;
    }
    ctx.store(IP_TTL_OFF, &(pkt.ttl - 1), 0)?;
    Ok(())
}

/// What rewriting a packet to a conntrack entry adds to its checksums, by
/// field group; shared by the TC and the XDP rewrite.
pub struct Diffs {
    /// Source and destination address (IPv4 header and L4 pseudo-header).
    pub addrs: u32,
    /// Source and destination port (L4 header).
    pub ports: u32,
    /// The TTL's decrement (IPv4 header).
    pub ttl: u32,
}

impl Diffs {
    #[inline(always)]
    pub fn of(pkt: &Packet, to: &CtValue) -> Diffs {
        Diffs {
            addrs: csum::add(
                csum::diff4(pkt.src, to.new_src[3]),
                csum::diff4(pkt.dst, to.new_dst[3]),
            ),
            ports: csum::add(
                csum::diff2(pkt.sport, to.new_sport),
                csum::diff2(pkt.dport, to.new_dport),
            ),
            // TTL and protocol share a 16-bit word of the header checksum.
            ttl: csum::diff2(
                u16::from_ne_bytes([pkt.ttl, pkt.proto]),
                u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]),
            ),
        }
    }

    /// The IPv4 header checksum's part.
    #[inline(always)]
    pub fn ip_header(&self) -> u32 {
        csum::add(self.addrs, self.ttl)
    }

    /// The L4 checksum's part (ports and pseudo-header addresses).
    #[inline(always)]
    pub fn l4(&self) -> u32 {
        csum::add(self.addrs, self.ports)
    }
}
