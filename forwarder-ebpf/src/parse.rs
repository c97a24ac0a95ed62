//! Reading the Ethernet, IPv4 and TCP/UDP headers of a packet at TC.

use aya_ebpf::programs::TcContext;
use forwarder_common::{CtKey, PROTO_TCP, PROTO_UDP, addr_from_ipv4_be};

pub const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IP_LEN: usize = 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offsets of fields the rewrite touches, from the start of the frame.
pub const IP_TTL_OFF: usize = ETH_LEN + 8;
pub const IP_CSUM_OFF: usize = ETH_LEN + 10;
pub const IP_SRC_OFF: usize = ETH_LEN + 12;
pub const IP_DST_OFF: usize = ETH_LEN + 16;
pub const L4_OFF: usize = ETH_LEN + IP_LEN;
pub const L4_SPORT_OFF: usize = L4_OFF;
pub const L4_DPORT_OFF: usize = L4_OFF + 2;
pub const TCP_CSUM_OFF: usize = L4_OFF + 16;
pub const UDP_CSUM_OFF: usize = L4_OFF + 6;

/// Why a packet that has ports cannot be rewritten here.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unfit {
    None,
    /// The first fragment of a fragmented datagram.
    Fragment,
    /// An IPv4 header with options (the rewrite assumes 20 bytes).
    Options,
}

/// An IPv4 TCP or UDP packet.
pub struct Packet {
    /// Addresses and ports as on the wire (network byte order).
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub ttl: u8,
    /// The IPv4 total length, host order.
    pub tot_len: u16,
    /// A UDP datagram without checksum (the field is zero).
    pub udp_no_csum: bool,
    pub unfit: Unfit,
}

impl Packet {
    /// The conntrack key of this packet's direction.
    #[inline(always)]
    pub fn key(&self) -> CtKey {
        CtKey {
            src: addr_from_ipv4_be(self.src),
            dst: addr_from_ipv4_be(self.dst),
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            TCP_CSUM_OFF
        } else {
            UDP_CSUM_OFF
        }
    }
}

/// Bytes the parse reads at fixed places: Ethernet, a 20-byte IPv4 header
/// and TCP up to its flags (UDP's 8-byte header is shorter).
const FIXED_HEADERS_LEN: u32 = (L4_OFF + 14) as u32;

/// The packet's headers, or `None` for anything that is not IPv4 TCP/UDP
/// with ports (other protocols, non-first fragments, truncated headers).
///
/// Headers are read in place (direct packet access): the load helper,
/// called for each header, cost more than the rest of the parse. Headers
/// the skb keeps outside its linear part are pulled in first, which moves
/// no byte of the packet.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    let linear = ctx.data_end() - ctx.data();
    let len = ctx.len();
    if linear < FIXED_HEADERS_LEN as usize && len as usize > linear {
        ctx.pull_data(len.min(FIXED_HEADERS_LEN)).ok()?;
    }
    read_headers(ctx)
}

/// Bytes `offset..offset + size_of::<T>()` of the linear data.
#[inline(always)]
fn at<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    if ctx.data() + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: inside the linear data, as just checked.
    Some(unsafe { ((ctx.data() + offset) as *const T).read_unaligned() })
}

/// A field `offset` bytes into the L4 header that starts at `l4`. Behind
/// IP options (which only the relay carries) the header's place varies,
/// which direct access cannot prove safe: the load helper reads it.
#[inline(always)]
fn l4_field<T: Copy>(ctx: &TcContext, l4: usize, offset: usize) -> Option<T> {
    if l4 == L4_OFF {
        at::<T>(ctx, L4_OFF + offset)
    } else {
        ctx.load::<T>(l4 + offset).ok()
    }
}

#[inline(always)]
fn read_headers(ctx: &TcContext) -> Option<Packet> {
    let ethertype = u16::from_be(at::<u16>(ctx, 12)?);
    if ethertype != ETH_P_IP {
        return None;
    }
    let ip = at::<[u8; IP_LEN]>(ctx, ETH_LEN)?;
    let version = ip[0] >> 4;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if version != 4 || ihl < IP_LEN {
        return None;
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
    if usize::from(tot_len) < ihl || ETH_LEN + usize::from(tot_len) > ctx.len() as usize {
        return None;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let offset = frag & 0x1fff;
    if offset != 0 {
        return None;
    }
    let more_fragments = frag & 0x2000 != 0;
    let proto = ip[9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = ETH_LEN + (ihl & 0x3c);
    let ports = l4_field::<[u8; 4]>(ctx, l4, 0)?;
    let mut tcp_flags = 0;
    let mut udp_no_csum = false;
    if proto == PROTO_TCP {
        tcp_flags = l4_field::<u8>(ctx, l4, 13)?;
    } else if !more_fragments {
        let udp = l4_field::<[u8; 8]>(ctx, l4, 0)?;
        udp_no_csum = udp[6] == 0 && udp[7] == 0;
    }
    let unfit = if more_fragments {
        Unfit::Fragment
    } else if ihl != IP_LEN {
        Unfit::Options
    } else {
        Unfit::None
    };
    Some(Packet {
        src: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        dst: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        ttl: ip[8],
        tot_len,
        udp_no_csum,
        unfit,
    })
}
