//! Reading a frame's headers at XDP, by direct packet access. Only what XDP
//! may carry parses: IPv4 without options or fragmentation, TCP or UDP
//! with the whole L4 header present and a complete checksum.
//!
//! A sender on this host with checksum offload hands a veth frames whose
//! L4 checksum field holds only the pseudo-header sum (CHECKSUM_PARTIAL).
//! XDP cannot see that mark, and a frame it redirects loses it, so the
//! receiver would see a bad checksum: such frames are left to TC, whose
//! skb keeps the mark. A complete checksum equals that sum only by a
//! 1 in 65536 chance, and then TC carries the packet, which is still right.

use aya_ebpf::programs::XdpContext;
use forwarder_common::{PROTO_TCP, PROTO_UDP, csum, reasons::XdpPass};

use crate::parse::{ETH_LEN, IP_LEN, L4_OFF, Packet, Unfit};

const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;

/// A pointer to a `T` at `offset` in the frame, if the frame holds it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The packet's headers, or why XDP leaves it to TC.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, XdpPass> {
    let ethertype: *const [u8; 2] = ptr_at(ctx, 12).ok_or(XdpPass::Unparsed)?;
    // SAFETY: bounds checked by `ptr_at`.
    if unsafe { *ethertype } != [0x08, 0x00] {
        return Err(XdpPass::Unparsed);
    }
    let ip: *const [u8; IP_LEN] = ptr_at(ctx, ETH_LEN).ok_or(XdpPass::Unparsed)?;
    // SAFETY: as above.
    let ip = unsafe { *ip };
    // Version 4 with a 20-byte header: the rewrite's offsets are fixed.
    if ip[0] != 0x45 {
        return Err(XdpPass::Unparsed);
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
    let frame_len = ctx.data_end() - ctx.data();
    if usize::from(tot_len) < IP_LEN || ETH_LEN + usize::from(tot_len) > frame_len {
        return Err(XdpPass::Unparsed);
    }
    // Any fragment (more-fragments set or an offset) is TC's.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(XdpPass::Unparsed);
    }
    let proto = ip[9];
    let mut tcp_flags = 0;
    let mut udp_no_csum = false;
    let (ports, l4_csum) = if proto == PROTO_TCP {
        let tcp: *const [u8; TCP_LEN] = ptr_at(ctx, L4_OFF).ok_or(XdpPass::Unparsed)?;
        // SAFETY: as above.
        let tcp = unsafe { *tcp };
        tcp_flags = tcp[13];
        ([tcp[0], tcp[1], tcp[2], tcp[3]], [tcp[16], tcp[17]])
    } else if proto == PROTO_UDP {
        let udp: *const [u8; UDP_LEN] = ptr_at(ctx, L4_OFF).ok_or(XdpPass::Unparsed)?;
        // SAFETY: as above.
        let udp = unsafe { *udp };
        udp_no_csum = udp[6] == 0 && udp[7] == 0;
        ([udp[0], udp[1], udp[2], udp[3]], [udp[6], udp[7]])
    } else {
        return Err(XdpPass::Unparsed);
    };
    if !udp_no_csum && is_pseudo_header_sum(&ip, tot_len, u16::from_ne_bytes(l4_csum)) {
        return Err(XdpPass::ChecksumPartial);
    }
    Ok(Packet {
        src: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        dst: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        ttl: ip[8],
        tot_len,
        ip_id: u16::from_ne_bytes([ip[4], ip[5]]),
        l4_off: L4_OFF as u16,
        udp_no_csum,
        dont_fragment: ip[6] & 0x40 != 0,
        unfit: Unfit::None,
    })
}

/// True if `field` holds just the pseudo-header sum of the IPv4 header
/// `ip` (a CHECKSUM_PARTIAL frame). Words as they sit in memory, like
/// `forwarder_common::csum`.
#[inline(always)]
fn is_pseudo_header_sum(ip: &[u8; IP_LEN], tot_len: u16, field: u16) -> bool {
    let word = |i: usize| u32::from(u16::from_ne_bytes([ip[i], ip[i + 1]]));
    let l4_len = (tot_len - IP_LEN as u16).to_be_bytes();
    let sum = word(12)
        + word(14)
        + word(16)
        + word(18)
        + u32::from(u16::from_ne_bytes([0, ip[9]]))
        + u32::from(u16::from_ne_bytes(l4_len));
    let folded = csum::fold(sum);
    // 0 and 0xffff are both zero in one's complement.
    folded == field || (folded == 0 && field == 0xffff) || (folded == 0xffff && field == 0)
}
