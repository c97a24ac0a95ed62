//! Rewriting a frame to a conntrack entry at XDP: MAC addresses from the
//! FIB, IPv4 addresses, ports and TTL, with the IPv4 and L4 checksums
//! updated incrementally (RFC 1624; XDP has no checksum helpers).

use aya_ebpf::{bindings::bpf_fib_lookup, programs::XdpContext};
use forwarder_common::{CtValue, PROTO_TCP, PROTO_UDP, csum};

use super::parse::ptr_at;
use crate::nat::Diffs;
use crate::parse::{
    IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, L4_DPORT_OFF, L4_SPORT_OFF, Packet,
    TCP_CSUM_OFF, UDP_CSUM_OFF,
};

/// Rewrites the frame `pkt` was parsed from to `to`, with the next hop's
/// MAC addresses from `fib`; the caller made sure the TTL is above 1.
/// Every pointer is checked before the first write, so `None` means the
/// frame is unchanged.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, to: &CtValue, fib: &bpf_fib_lookup) -> Option<()> {
    let macs: *mut [u8; 12] = ptr_at(ctx, 0)?;
    let ttl: *mut u8 = ptr_at(ctx, IP_TTL_OFF)?;
    let ip_csum: *mut u16 = ptr_at(ctx, IP_CSUM_OFF)?;
    let src: *mut u32 = ptr_at(ctx, IP_SRC_OFF)?;
    let dst: *mut u32 = ptr_at(ctx, IP_DST_OFF)?;
    let sport: *mut u16 = ptr_at(ctx, L4_SPORT_OFF)?;
    let dport: *mut u16 = ptr_at(ctx, L4_DPORT_OFF)?;
    // Constant offsets, which the verifier can check: XDP takes 20-byte
    // IPv4 headers only.
    let l4_csum_off = if pkt.proto == PROTO_TCP {
        TCP_CSUM_OFF
    } else {
        UDP_CSUM_OFF
    };
    let l4_csum: *mut u16 = ptr_at(ctx, l4_csum_off)?;
    let (new_src, new_dst) = (to.new_src[3], to.new_dst[3]);
    let diffs = Diffs::of(pkt, to);
    // SAFETY: every pointer was bounds-checked above; unaligned accesses
    // because the frame's start has no alignment guarantee.
    unsafe {
        ip_csum.write_unaligned(csum::apply(ip_csum.read_unaligned(), diffs.ip_header()));
        // A UDP datagram without checksum keeps none.
        if !pkt.udp_no_csum {
            let mut l4 = csum::apply(l4_csum.read_unaligned(), diffs.l4());
            // In UDP a computed zero is sent as all ones (zero means none).
            if l4 == 0 && pkt.proto == PROTO_UDP {
                l4 = 0xffff;
            }
            l4_csum.write_unaligned(l4);
        }
        src.write_unaligned(new_src);
        dst.write_unaligned(new_dst);
        sport.write_unaligned(to.new_sport);
        dport.write_unaligned(to.new_dport);
        *ttl = pkt.ttl - 1;
        let mut m = [0u8; 12];
        m[..6].copy_from_slice(&fib.dmac);
        m[6..].copy_from_slice(&fib.smac);
        macs.write_unaligned(m);
    }
    Some(())
}
