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

/// What keeps a packet from being an ordinary one: new flows of these go
/// to the relay; a kernel flow's are rewritten all the same.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unfit {
    None,
    /// The first fragment of a fragmented datagram.
    Fragment,
    /// A later fragment: no L4 header, so no ports.
    LaterFragment,
    /// An IPv4 header with options: the L4 header is further in, where
    /// XDP does not look.
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
    /// The IPv4 identification, as on the wire.
    pub ip_id: u16,
    /// Where the L4 header starts, from the start of the frame.
    pub l4_off: u16,
    /// A UDP datagram without checksum (the field is zero).
    pub udp_no_csum: bool,
    /// DF is set: too big for the next hop, the sender wants frag-needed.
    pub dont_fragment: bool,
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
        usize::from(self.l4_off)
            + if self.proto == PROTO_TCP {
                TCP_CSUM_OFF - L4_OFF
            } else {
                UDP_CSUM_OFF - L4_OFF
            }
    }
}

/// Bytes the parse reads at fixed places: Ethernet, a 20-byte IPv4 header
/// and TCP up to its flags (UDP's 8-byte header is shorter).
const FIXED_HEADERS_LEN: u32 = (L4_OFF + 14) as u32;

/// The packet's headers, or `None` for anything that is not IPv4 TCP/UDP
/// (other protocols, truncated headers). A later fragment has no ports.
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
/// IP options (rare) the header's place varies, which direct access
/// cannot prove safe: the load helper reads it.
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
    let ip = ctx.data() + ETH_LEN;
    if ip + IP_LEN > ctx.data_end() {
        return None;
    }
    // Each field is read where it is, in one load: copying the header out,
    // or `read_unaligned` (byte loads), spills it to the stack byte by
    // byte, which the verifier's 512 bytes cannot spare.
    // SAFETY: inside the 20 bytes just checked to be in the linear data.
    // BPF loads from packet data need no alignment (the verifier enforces
    // it only where the architecture does; not on x86-64 or arm64).
    let field = |offset: usize| unsafe { ((ip + offset) as *const u8).read() };
    let word = |offset: usize| unsafe { ((ip + offset) as *const u16).read() };
    let dword = |offset: usize| unsafe { ((ip + offset) as *const u32).read() };
    let version = field(0) >> 4;
    let ihl = usize::from(field(0) & 0x0f) * 4;
    if version != 4 || ihl < IP_LEN {
        return None;
    }
    let tot_len = u16::from_be(word(2));
    if usize::from(tot_len) < ihl || ETH_LEN + usize::from(tot_len) > ctx.len() as usize {
        return None;
    }
    let proto = field(9);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let frag = u16::from_be(word(6));
    let more_fragments = frag & 0x2000 != 0;
    let l4 = ETH_LEN + (ihl & 0x3c);
    let mut pkt = Packet {
        src: dword(12),
        dst: dword(16),
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
        ttl: field(8),
        tot_len,
        ip_id: word(4),
        l4_off: l4 as u16,
        udp_no_csum: false,
        dont_fragment: frag & 0x4000 != 0,
        unfit: Unfit::LaterFragment,
    };
    if frag & 0x1fff != 0 {
        return Some(pkt);
    }
    let ports = l4_field::<[u8; 4]>(ctx, l4, 0)?;
    pkt.sport = u16::from_ne_bytes([ports[0], ports[1]]);
    pkt.dport = u16::from_ne_bytes([ports[2], ports[3]]);
    if proto == PROTO_TCP {
        pkt.tcp_flags = l4_field::<u8>(ctx, l4, 13)?;
    } else {
        // A first fragment holds at least 8 bytes past the IP header.
        let udp = l4_field::<[u8; 8]>(ctx, l4, 0)?;
        pkt.udp_no_csum = udp[6] == 0 && udp[7] == 0;
    }
    pkt.unfit = if more_fragments {
        Unfit::Fragment
    } else if ihl != IP_LEN {
        Unfit::Options
    } else {
        Unfit::None
    };
    Some(pkt)
}
