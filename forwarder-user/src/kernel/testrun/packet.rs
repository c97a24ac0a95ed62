//! Crafted Ethernet/IPv4/TCP|UDP frames and independent checksum checks.

use std::net::Ipv4Addr;

pub const ETH_LEN: usize = 14;
pub const IP_LEN: usize = 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// How the L4 checksum field is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Csum {
    /// The full checksum, as on the wire.
    Full,
    /// Zero (UDP: "no checksum").
    Zero,
    /// Only the pseudo-header sum, as a sender with checksum offload
    /// leaves it (CHECKSUM_PARTIAL).
    Partial,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub ttl: u8,
    pub payload: Vec<u8>,
    pub csum: Csum,
    /// IPv4 flags+fragment offset word (host order), e.g. 0x2000 for MF.
    pub frag: u16,
    /// Extra IPv4 option bytes (a multiple of 4).
    pub ip_options: Vec<u8>,
    /// TCP option bytes (a multiple of 4).
    pub tcp_options: Vec<u8>,
}

impl Spec {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Spec {
        Spec {
            proto: 6,
            src: src.0,
            dst: dst.0,
            sport: src.1,
            dport: dst.1,
            tcp_flags: flags,
            ttl: 64,
            payload: b"kernel path payload".to_vec(),
            csum: Csum::Full,
            frag: 0x4000, // DF
            ip_options: Vec::new(),
            tcp_options: Vec::new(),
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Spec {
        Spec {
            proto: 17,
            tcp_flags: 0,
            ..Spec::tcp(src, dst, 0)
        }
    }

    pub fn csum(mut self, csum: Csum) -> Spec {
        self.csum = csum;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let ihl = IP_LEN + self.ip_options.len();
        let tcp_len = 20 + self.tcp_options.len();
        let l4_len = if self.proto == 6 { tcp_len } else { 8 } + self.payload.len();
        let mut p = Vec::with_capacity(ETH_LEN + ihl + l4_len);
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst MAC
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src MAC
        p.extend_from_slice(&0x0800u16.to_be_bytes());
        let ip = p.len();
        p.push(0x40 | (ihl / 4) as u8);
        p.push(0);
        p.extend_from_slice(&((ihl + l4_len) as u16).to_be_bytes());
        p.extend_from_slice(&0x1234u16.to_be_bytes());
        p.extend_from_slice(&self.frag.to_be_bytes());
        p.push(self.ttl);
        p.push(self.proto);
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&self.ip_options);
        let c = fold(sum(&p[ip..ip + ihl]));
        p[ip + 10..ip + 12].copy_from_slice(&(!c).to_be_bytes());
        let l4 = p.len();
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == 6 {
            p.extend_from_slice(&1000u32.to_be_bytes()); // seq
            p.extend_from_slice(&0u32.to_be_bytes()); // ack
            p.push(((tcp_len / 4) as u8) << 4);
            p.push(self.tcp_flags);
            p.extend_from_slice(&64240u16.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0]); // csum, urg
            p.extend_from_slice(&self.tcp_options);
        } else {
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
        }
        p.extend_from_slice(&self.payload);
        let off = l4 + l4_csum_offset(self.proto);
        let value = match self.csum {
            Csum::Zero => 0,
            Csum::Partial => fold(pseudo_sum(&p, ip)),
            Csum::Full => {
                let c = !fold(pseudo_sum(&p, ip) + sum(&p[l4..]));
                if c == 0 && self.proto == 17 {
                    0xffff
                } else {
                    c
                }
            }
        };
        p[off..off + 2].copy_from_slice(&value.to_be_bytes());
        p
    }
}

pub fn l4_csum_offset(proto: u8) -> usize {
    if proto == 6 { 16 } else { 6 }
}

pub fn sum(bytes: &[u8]) -> u32 {
    let mut s = 0u32;
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        s += u32::from(word);
    }
    s
}

pub fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The pseudo-header sum of the IPv4 packet at `ip`.
fn pseudo_sum(p: &[u8], ip: usize) -> u32 {
    let ihl = usize::from(p[ip] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[ip + 2], p[ip + 3]]));
    sum(&p[ip + 12..ip + 20]) + u32::from(p[ip + 9]) + (total - ihl) as u32
}

/// A parsed frame, for assertions.
#[derive(Debug, PartialEq, Eq)]
pub struct View {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub l4_csum: u16,
}

pub fn view(p: &[u8]) -> View {
    let ip = ETH_LEN;
    let ihl = usize::from(p[ip] & 0x0f) * 4;
    let l4 = ip + ihl;
    let proto = p[ip + 9];
    let off = l4 + l4_csum_offset(proto);
    View {
        src: Ipv4Addr::new(p[ip + 12], p[ip + 13], p[ip + 14], p[ip + 15]),
        dst: Ipv4Addr::new(p[ip + 16], p[ip + 17], p[ip + 18], p[ip + 19]),
        sport: u16::from_be_bytes([p[l4], p[l4 + 1]]),
        dport: u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]),
        ttl: p[ip + 8],
        l4_csum: u16::from_be_bytes([p[off], p[off + 1]]),
    }
}

/// The folded one's complement sum over the pseudo-header and the L4
/// segment, checksum field included.
pub fn folded_sum(p: &[u8]) -> u16 {
    let ihl = usize::from(p[ETH_LEN] & 0x0f) * 4;
    fold(pseudo_sum(p, ETH_LEN) + sum(&p[ETH_LEN + ihl..]))
}

/// The IPv4 header checksum verifies.
pub fn ip_csum_ok(p: &[u8]) -> bool {
    let ihl = usize::from(p[ETH_LEN] & 0x0f) * 4;
    fold(sum(&p[ETH_LEN..ETH_LEN + ihl])) == 0xffff
}

/// The full L4 checksum verifies (a zero UDP checksum does not count).
pub fn l4_csum_ok(p: &[u8]) -> bool {
    folded_sum(p) == 0xffff
}

/// The L4 checksum field holds exactly the pseudo-header sum
/// (what CHECKSUM_PARTIAL needs).
pub fn l4_partial_ok(p: &[u8]) -> bool {
    view(p).l4_csum == fold(pseudo_sum(p, ETH_LEN))
}

#[test]
fn the_builder_makes_valid_checksums() {
    let a = (Ipv4Addr::new(198, 18, 1, 2), 40000);
    let b = (Ipv4Addr::new(198, 18, 1, 1), 7878);
    let tcp = Spec::tcp(a, b, TCP_SYN).build();
    assert!(ip_csum_ok(&tcp) && l4_csum_ok(&tcp));
    let udp = Spec::udp(a, b).build();
    assert!(ip_csum_ok(&udp) && l4_csum_ok(&udp));
    let zero = Spec::udp(a, b).csum(Csum::Zero).build();
    assert_eq!(view(&zero).l4_csum, 0);
    let partial = Spec::udp(a, b).csum(Csum::Partial).build();
    assert!(l4_partial_ok(&partial) && !l4_csum_ok(&partial));
    assert_eq!(
        view(&tcp),
        View {
            src: a.0,
            dst: b.0,
            sport: a.1,
            dport: b.1,
            ttl: 64,
            l4_csum: view(&tcp).l4_csum
        }
    );
}
