//! ICMP errors of kernel flows: translating an error about a flow's packet
//! to the other side, as NAT does (nf_nat_icmp_reply_translation), and
//! building the error the kernel would send about a packet it cannot
//! forward. Pure arithmetic, shared by the TC program and its tests.
//!
//! Both handle IPv4 headers without options only, outer and embedded:
//! the offsets below are then fixed. An error whose headers have options
//! is left to the stack.

use crate::{PROTO_TCP, PROTO_UDP, csum};

pub const PROTO_ICMP: u8 = 1;

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Destination unreachable: fragmentation needed and DF set (RFC 1191).
pub const CODE_FRAG_NEEDED: u8 = 4;
/// Time exceeded: TTL expired in transit.
pub const CODE_TTL_EXCEEDED: u8 = 0;

/// The error types that name the packet they are about, and so are
/// translated with its flow. Redirects and source quench are not.
#[inline(always)]
pub const fn is_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    )
}

/// Offsets from the outer IPv4 header of an error about a packet, both
/// headers 20 bytes long.
pub const ICMP_OFF: usize = 20;
pub const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
pub const INNER_IP_OFF: usize = ICMP_OFF + 8;
pub const INNER_IP_CSUM_OFF: usize = INNER_IP_OFF + 10;
pub const INNER_SRC_OFF: usize = INNER_IP_OFF + 12;
pub const INNER_L4_OFF: usize = INNER_IP_OFF + 20;
/// The shortest error worth translating: the embedded IPv4 header and the
/// 8 bytes of its L4 header every router returns (RFC 792), which hold
/// the ports (and UDP's checksum).
pub const MIN_ERROR_LEN: usize = INNER_L4_OFF + 8;

/// Where the embedded L4 checksum sits, from the outer IPv4 header.
#[inline(always)]
pub const fn inner_l4_csum_off(proto: u8) -> usize {
    INNER_L4_OFF + if proto == PROTO_TCP { 16 } else { 6 }
}

/// The embedded header fields a translation changes, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inner {
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub ip_csum: u16,
    /// The embedded L4 checksum, if the error holds it (TCP's lies past
    /// the 8 bytes a router must return) and it is in use (UDP's may be 0).
    pub l4_csum: Option<u16>,
}

/// The embedded header's new checksums, and what the whole change adds to
/// the ICMP checksum (as a difference, for the skb helpers' diff form).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InnerRewrite {
    pub ip_csum: u16,
    pub l4_csum: Option<u16>,
    pub icmp_diff: u32,
}

/// Rewrites the embedded header `inner` to `(src, sport) -> (dst, dport)`.
/// The embedded L4 checksum is updated incrementally for its pseudo-header
/// and ports, as Linux NAT does, even where the error holds only part of
/// the segment it covers: the receiver then sees the checksum its own
/// packet had. The ICMP checksum covers all of it.
#[inline(always)]
pub const fn translate_inner(
    inner: &Inner,
    (src, sport): (u32, u16),
    (dst, dport): (u32, u16),
) -> InnerRewrite {
    let addrs = csum::add(csum::diff4(inner.src, src), csum::diff4(inner.dst, dst));
    let ports = csum::add(
        csum::diff2(inner.sport, sport),
        csum::diff2(inner.dport, dport),
    );
    let ip_csum = csum::apply(inner.ip_csum, addrs);
    let mut icmp_diff = csum::add(csum::add(addrs, ports), csum::diff2(inner.ip_csum, ip_csum));
    let l4_csum = match inner.l4_csum {
        Some(old) => {
            let mut new = csum::apply(old, csum::add(addrs, ports));
            // A UDP checksum of zero means none: a computed zero is all ones.
            if new == 0 && inner.proto == PROTO_UDP {
                new = 0xffff;
            }
            icmp_diff = csum::add(icmp_diff, csum::diff2(old, new));
            Some(new)
        }
        None => None,
    };
    InnerRewrite {
        ip_csum,
        l4_csum,
        icmp_diff,
    }
}

/// The bytes of a packet an error the forwarder sends embeds: its IPv4
/// header and the first 8 bytes of its L4 header, the least RFC 792 asks
/// for and all the sender's stack reads.
pub const EMBEDDED_LEN: usize = 20 + 8;
/// The IPv4 packet of such an error.
pub const ERROR_LEN: usize = INNER_IP_OFF + EMBEDDED_LEN;

/// Fills `out[..INNER_IP_OFF]` so that `out` is the IPv4 packet of an ICMP
/// error of `icmp_type`/`code` about the packet whose first bytes are
/// `out[INNER_IP_OFF..]`, sent back to that packet's source from its
/// destination (the address the sender talked to). `mtu` is the next-hop
/// MTU of a frag-needed error (0 otherwise). Linux's own errors look the
/// same: TOS internetwork control, TTL 64, no DF, ID 0 (RFC 6864: an
/// unfragmented datagram's ID means nothing).
#[inline(always)]
pub fn build_error(out: &mut [u8; ERROR_LEN], icmp_type: u8, code: u8, mtu: u16) {
    // Written in place: the eBPF stack has no room for copies.
    let (src, dst) = (INNER_IP_OFF + 16, INNER_IP_OFF + 12);
    let len = (ERROR_LEN as u16).to_be_bytes();
    out[..12].copy_from_slice(&[0x45, 0xc0, len[0], len[1], 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0]);
    let mut i = 0;
    while i < 4 {
        out[12 + i] = out[src + i];
        out[16 + i] = out[dst + i];
        i += 1;
    }
    let ip_csum = !csum::fold(csum::sum_bytes(0, &out[..ICMP_OFF]));
    out[10..12].copy_from_slice(&ip_csum.to_ne_bytes());
    let mtu = mtu.to_be_bytes();
    out[ICMP_OFF..INNER_IP_OFF].copy_from_slice(&[icmp_type, code, 0, 0, 0, 0, mtu[0], mtu[1]]);
    let icmp_csum = !csum::fold(csum::sum_bytes(0, &out[ICMP_OFF..]));
    out[ICMP_CSUM_OFF..ICMP_CSUM_OFF + 2].copy_from_slice(&icmp_csum.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// A port unreachable captured on a veth (Linux 6.18; the sender's
    /// checksum offload off, so the embedded UDP checksum is complete):
    /// 198.18.9.1 answers a datagram "hello kernel" from 198.18.9.2:40000 to its
    /// closed port 3478. As a forwarder sees the backend's answer to a
    /// flow it SNATed to 198.18.9.2:40000.
    const CAPTURED: &str = "45c0004490d0000040014b01c6120901c6120902\
        03039b4a00000000\
        450000280000400040119c9dc6120902c6120901\
        9c400d960014309568656c6c6f206b65726e656c";

    /// The same error as the client 198.18.1.2:50000 must get it for its
    /// flow to the listener 198.18.1.1:7878: outer from the listener to
    /// the client, TTL 63; embedded from the client to the listener. Every
    /// checksum was computed apart from this crate, from scratch over the
    /// whole header or message (a few lines of Python), not incrementally.
    const TRANSLATED: &str = "45c0004490d000003f015c01c6120101c6120102\
        03038b4a00000000\
        45000028000040004011ac9dc6120102c6120101\
        c3501ec60014085568656c6c6f206b65726e656c";

    fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn word(p: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([p[at], p[at + 1]])
    }

    fn dword(p: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
    }

    fn be(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    fn port(p: u16) -> u16 {
        p.to_be()
    }

    fn inner_of(p: &[u8]) -> Inner {
        let proto = p[INNER_IP_OFF + 9];
        let l4 = word(p, inner_l4_csum_off(proto));
        Inner {
            proto,
            src: dword(p, INNER_SRC_OFF),
            dst: dword(p, INNER_SRC_OFF + 4),
            sport: word(p, INNER_L4_OFF),
            dport: word(p, INNER_L4_OFF + 2),
            ip_csum: word(p, INNER_IP_CSUM_OFF),
            l4_csum: (l4 != 0).then_some(l4),
        }
    }

    /// Applies a translation the way the TC program does: fields stored,
    /// the ICMP checksum updated by the difference.
    fn apply(p: &mut [u8], src: (u32, u16), dst: (u32, u16)) {
        let inner = inner_of(p);
        let r = translate_inner(&inner, src, dst);
        p[INNER_SRC_OFF..INNER_SRC_OFF + 4].copy_from_slice(&src.0.to_ne_bytes());
        p[INNER_SRC_OFF + 4..INNER_SRC_OFF + 8].copy_from_slice(&dst.0.to_ne_bytes());
        p[INNER_L4_OFF..INNER_L4_OFF + 2].copy_from_slice(&src.1.to_ne_bytes());
        p[INNER_L4_OFF + 2..INNER_L4_OFF + 4].copy_from_slice(&dst.1.to_ne_bytes());
        p[INNER_IP_CSUM_OFF..INNER_IP_CSUM_OFF + 2].copy_from_slice(&r.ip_csum.to_ne_bytes());
        if let Some(c) = r.l4_csum {
            let at = inner_l4_csum_off(inner.proto);
            p[at..at + 2].copy_from_slice(&c.to_ne_bytes());
        }
        let icmp = csum::apply(word(p, ICMP_CSUM_OFF), r.icmp_diff);
        p[ICMP_CSUM_OFF..ICMP_CSUM_OFF + 2].copy_from_slice(&icmp.to_ne_bytes());
    }

    /// The outer header's part, as `nat::rewrite` does it.
    fn outer(p: &mut [u8], src: u32, dst: u32) {
        let mut diff = csum::add(
            csum::diff4(dword(p, 12), src),
            csum::diff4(dword(p, 16), dst),
        );
        diff = csum::add(
            diff,
            csum::diff2(word(p, 8), u16::from_ne_bytes([p[8] - 1, p[9]])),
        );
        p[8] -= 1;
        p[12..16].copy_from_slice(&src.to_ne_bytes());
        p[16..20].copy_from_slice(&dst.to_ne_bytes());
        let c = csum::apply(word(p, 10), diff);
        p[10..12].copy_from_slice(&c.to_ne_bytes());
    }

    #[test]
    fn a_captured_port_unreachable_translates_to_the_known_answer() {
        let mut p = bytes(CAPTURED);
        let client = (be([198, 18, 1, 2]), port(50000));
        let listener = (be([198, 18, 1, 1]), port(7878));
        apply(&mut p, client, listener);
        outer(&mut p, listener.0, client.0);
        assert_eq!(p, bytes(TRANSLATED));
    }

    #[test]
    fn every_checksum_verifies_after_translation() {
        let verify = |p: &[u8]| {
            assert_eq!(csum::fold(csum::sum_bytes(0, &p[..20])), 0xffff, "outer IP");
            assert_eq!(csum::fold(csum::sum_bytes(0, &p[20..])), 0xffff, "ICMP");
            let inner = &p[INNER_IP_OFF..INNER_L4_OFF];
            assert_eq!(csum::fold(csum::sum_bytes(0, inner)), 0xffff, "inner IP");
            // The captured error holds the whole datagram: its UDP
            // checksum verifies over the embedded pseudo-header.
            let l4 = &p[INNER_L4_OFF..];
            let mut pseudo = [0u8; 12];
            pseudo[..8].copy_from_slice(&inner[12..20]);
            pseudo[9] = inner[9];
            pseudo[10..12].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            let sum = csum::sum_bytes(csum::sum_bytes(0, &pseudo), l4);
            assert_eq!(csum::fold(sum), 0xffff, "inner UDP");
        };
        let captured = bytes(CAPTURED);
        verify(&captured);
        let mut p = captured.clone();
        // Many translations, including ones whose UDP checksum comes out 0.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let src = (seed as u32, (seed >> 32) as u16);
            let dst = ((seed >> 16) as u32, (seed >> 48) as u16);
            apply(&mut p, src, dst);
            outer(&mut p, dst.0, src.0);
            p[8] = 64;
            let c = csum::checksum(&{
                let mut h = [0u8; 20];
                h.copy_from_slice(&p[..20]);
                h[10] = 0;
                h[11] = 0;
                h
            });
            p[10..12].copy_from_slice(&c.to_ne_bytes());
            verify(&p);
        }
    }

    #[test]
    fn a_udp_checksum_of_zero_stays_zero() {
        let mut p = bytes(CAPTURED);
        let at = inner_l4_csum_off(PROTO_UDP);
        p[at..at + 2].fill(0);
        p[ICMP_CSUM_OFF..ICMP_CSUM_OFF + 2].fill(0);
        let c = csum::checksum(&p[ICMP_OFF..]);
        p[ICMP_CSUM_OFF..ICMP_CSUM_OFF + 2].copy_from_slice(&c.to_ne_bytes());
        let inner = inner_of(&p);
        assert_eq!(inner.l4_csum, None);
        let r = translate_inner(&inner, (1, 2), (3, 4));
        assert_eq!(r.l4_csum, None);
        // The ICMP checksum still balances the header changes.
        apply(&mut p, (1, 2), (3, 4));
        assert_eq!(word(&p, at), 0);
        assert_eq!(csum::fold(csum::sum_bytes(0, &p[20..])), 0xffff);
    }

    #[test]
    fn only_errors_about_a_packet_are_translated() {
        for t in [
            ICMP_DEST_UNREACH,
            ICMP_TIME_EXCEEDED,
            ICMP_PARAMETER_PROBLEM,
        ] {
            assert!(is_error(t));
        }
        // Echo reply and request, source quench, redirect.
        for t in [0, 8, 4, 5] {
            assert!(!is_error(t));
        }
    }

    /// A frag-needed for a 1,478-byte DF datagram from 198.18.1.2:50000 to
    /// 198.18.1.1:7878 toward a 1,400-byte link, laid out as Linux lays out
    /// its own (RFC 1191: MTU in the low 16 bits of the second word), from
    /// the datagram's destination; checksums computed from scratch apart
    /// from this crate, as above.
    const FRAG_NEEDED: &str = "45c00038000000004001ebddc6120101c6120102\
        03040fbb00000578\
        450005c6abcd40004011fb31c6120102c6120101\
        c3501ec605b20000";

    #[test]
    fn a_frag_needed_error_is_built_as_linux_builds_it() {
        let expected = bytes(FRAG_NEEDED);
        let mut out = [0u8; ERROR_LEN];
        out[INNER_IP_OFF..].copy_from_slice(&expected[INNER_IP_OFF..]);
        build_error(&mut out, ICMP_DEST_UNREACH, CODE_FRAG_NEEDED, 1400);
        assert_eq!(out.to_vec(), expected);
        assert_eq!(csum::fold(csum::sum_bytes(0, &out[..20])), 0xffff);
        assert_eq!(csum::fold(csum::sum_bytes(0, &out[20..])), 0xffff);
    }
}
