//! Internet checksum arithmetic (RFC 1071) and its incremental update
//! (RFC 1624): whole for program types that have no checksum helpers (XDP),
//! and as a difference for the skb helpers' diff form (TC), which then
//! applies several changed fields in one call.
//!
//! Words are taken as they sit in memory (read with native byte order from
//! network-order bytes): one's complement sums do not depend on byte order
//! as long as every word is read the same way, so no swaps are needed.

/// Folds a 32-bit one's complement sum to 16 bits (not inverted).
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field after one 16-bit word changed from `old` to `new`
/// (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    apply(check, diff2(old, new))
}

/// The checksum field after a 32-bit value (an IPv4 address) changed.
#[inline(always)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    apply(check, diff4(old, new))
}

/// Adds two unfolded one's complement sums (end-around carry).
#[inline(always)]
pub const fn add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum + carry as u32
}

/// What a 16-bit word changing from `old` to `new` adds to a sum: `~old +
/// new`, unfolded, as the kernel's `__wsum` diffs are.
#[inline(always)]
pub const fn diff2(old: u16, new: u16) -> u32 {
    (!old as u32) + (new as u32)
}

/// What a 32-bit value (an IPv4 address, two ports) changing adds to a sum.
#[inline(always)]
pub const fn diff4(old: u32, new: u32) -> u32 {
    diff2(old as u16, new as u16) + diff2((old >> 16) as u16, (new >> 16) as u16)
}

/// The checksum field after the words it covers changed by `diff` (RFC
/// 1624 eqn. 3, HC' = ~(~HC + diff)); what `csum_replace_by_diff` does.
#[inline(always)]
pub const fn apply(check: u16, diff: u32) -> u16 {
    !fold(add(!check as u32, diff))
}

/// The checksum field after a 128-bit value (an IPv6 address) changed.
#[inline(always)]
pub const fn replace16(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut c = check;
    let mut i = 0;
    while i < 4 {
        c = replace4(c, old[i], new[i]);
        i += 1;
    }
    c
}

/// UDP over IPv4: a zero checksum means "none" and must stay zero; a
/// computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_replace4(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace4(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// UDP: [`replace2`] with the zero rules of [`udp_replace4`].
#[inline(always)]
pub const fn udp_replace2(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace2(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// The one's complement sum of `bytes` (odd length padded with zero),
/// added to `initial`; fold and invert it for a checksum.
pub fn sum_bytes(initial: u32, bytes: &[u8]) -> u32 {
    let mut sum = initial as u64;
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum += u16::from_ne_bytes([pair[0], pair[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u64;
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// The checksum of `bytes` as it would be stored in a header field.
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum_bytes(0, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: deterministic cases without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn word(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    fn dword(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// A 40-byte "header" whose checksum field sits at bytes 10..12.
    fn header(rng: &mut Rng) -> [u8; 40] {
        let mut h = [0u8; 40];
        for b in h.iter_mut() {
            *b = rng.next() as u8;
        }
        h[10] = 0;
        h[11] = 0;
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    #[test]
    fn a_stored_checksum_verifies_to_zero() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..1000 {
            let h = header(&mut rng);
            assert_eq!(fold(sum_bytes(0, &h)), 0xffff);
        }
    }

    #[test]
    fn incremental_updates_match_full_recomputation() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for _ in 0..20_000 {
            let mut h = header(&mut rng);
            let check = word(&h, 10);
            match rng.next() % 3 {
                0 => {
                    let at = 12 + 2 * (rng.next() as usize % 14);
                    let old = word(&h, at);
                    let new = rng.next() as u16;
                    h[at..at + 2].copy_from_slice(&new.to_ne_bytes());
                    let inc = replace2(check, old, new);
                    assert_eq!(verify(&h, inc), 0xffff, "replace2 at {at}");
                }
                1 => {
                    let at = 12 + 4 * (rng.next() as usize % 7);
                    let old = dword(&h, at);
                    let new = rng.next() as u32;
                    h[at..at + 4].copy_from_slice(&new.to_ne_bytes());
                    let inc = replace4(check, old, new);
                    assert_eq!(verify(&h, inc), 0xffff, "replace4 at {at}");
                }
                _ => {
                    let at = 12;
                    let old = [dword(&h, 12), dword(&h, 16), dword(&h, 20), dword(&h, 24)];
                    let new = [rng.next() as u32, rng.next() as u32, 0, u32::MAX];
                    for (i, w) in new.iter().enumerate() {
                        h[at + 4 * i..at + 4 * i + 4].copy_from_slice(&w.to_ne_bytes());
                    }
                    let inc = replace16(check, &old, &new);
                    assert_eq!(verify(&h, inc), 0xffff, "replace16");
                }
            }
        }
    }

    #[test]
    fn summed_diffs_apply_several_changes_at_once() {
        let mut rng = Rng(0xfeed_f00d_dead_beef);
        for _ in 0..20_000 {
            let mut h = header(&mut rng);
            let check = word(&h, 10);
            // Two 32-bit values and one 16-bit word, as a NAT changes
            // addresses, ports and the TTL.
            let mut diff = 0;
            for at in [12, 16] {
                let (old, new) = (dword(&h, at), rng.next() as u32);
                h[at..at + 4].copy_from_slice(&new.to_ne_bytes());
                diff = add(diff, diff4(old, new));
            }
            let (old, new) = (word(&h, 20), rng.next() as u16);
            h[20..22].copy_from_slice(&new.to_ne_bytes());
            diff = add(diff, diff2(old, new));
            assert_eq!(verify(&h, apply(check, diff)), 0xffff);
        }
        assert_eq!(add(u32::MAX, 2), 2, "the carry wraps around");
    }

    /// Sum of the header with `check` in its field: 0xffff when valid.
    fn verify(h: &[u8; 40], check: u16) -> u16 {
        let mut h = *h;
        h[10..12].copy_from_slice(&check.to_ne_bytes());
        fold(sum_bytes(0, &h))
    }

    #[test]
    fn udp_keeps_zero_and_never_produces_zero() {
        assert_eq!(udp_replace4(0, 0x0102_0304, 0x0506_0708), 0);
        assert_eq!(udp_replace2(0, 1, 2), 0);
        // Where the update would give 0x0000, UDP sends 0xffff (the same
        // value in one's complement) instead.
        let mut rng = Rng(42);
        let mut saw_zero = false;
        for _ in 0..200_000 {
            let (c, o, n) = (rng.next() as u16 | 1, rng.next() as u16, rng.next() as u16);
            if replace2(c, o, n) == 0 {
                saw_zero = true;
                assert_eq!(udp_replace2(c, o, n), 0xffff);
            } else {
                assert_eq!(udp_replace2(c, o, n), replace2(c, o, n));
            }
        }
        assert!(saw_zero, "the zero case was exercised");
    }

    /// A checksum field as it sits in the header, in network byte order.
    fn field(check: u16) -> [u8; 2] {
        check.to_ne_bytes()
    }

    fn be(bytes: [u8; 2]) -> u16 {
        u16::from_ne_bytes(bytes)
    }

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// The pseudo-header sum of IPv4 `src`, `dst`, `proto` and `len`.
    fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
        let mut p = [0u8; 12];
        p[..4].copy_from_slice(&src);
        p[4..8].copy_from_slice(&dst);
        p[9] = proto;
        p[10..].copy_from_slice(&len.to_be_bytes());
        sum_bytes(0, &p)
    }

    // Known answers: the vectors below come from RFC 1071 and from Python
    // (a plain big-endian one's complement sum), not from this code.

    #[test]
    fn rfc_1071_worked_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 2ddf0,
        // which folds to ddf2; the checksum is its complement.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(field(fold(sum_bytes(0, &bytes))), [0xdd, 0xf2]);
        assert_eq!(field(checksum(&bytes)), [0x22, 0x0d]);
    }

    /// A captured IPv4 header (192.168.0.1 -> 192.168.0.199, UDP, the
    /// usual textbook capture) whose checksum field reads b861.
    const IPV4_HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn a_captured_ipv4_header_checks_out() {
        let mut h = IPV4_HEADER;
        assert_eq!(fold(sum_bytes(0, &h)), 0xffff, "valid as captured");
        h[10..12].fill(0);
        assert_eq!(field(checksum(&h)), [0xb8, 0x61]);
        // TTL 64 -> 63 (the word it shares with the protocol): the field
        // Python computes for the forwarded header.
        let check = be([0xb8, 0x61]);
        let old = be([0x40, 0x11]);
        let new = be([0x3f, 0x11]);
        assert_eq!(field(replace2(check, old, new)), [0xb9, 0x61]);
        // Destination 192.168.0.199 -> 10.0.0.9.
        let (old, new) = (addr([192, 168, 0, 199]), addr([10, 0, 0, 9]));
        assert_eq!(field(replace4(check, old, new)), [0x6f, 0xc8]);
    }

    /// UDP 192.168.1.10:5000 -> 10.0.0.5:3478, "hello turn!", checksum c71c.
    const UDP: [u8; 19] = [
        0x13, 0x88, 0x0d, 0x96, 0x00, 0x13, 0xc7, 0x1c, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x20, 0x74,
        0x75, 0x72, 0x6e, 0x21,
    ];

    #[test]
    fn a_udp_datagram_and_its_dnat() {
        let (src, dst) = ([192, 168, 1, 10], [10, 0, 0, 5]);
        let mut u = UDP;
        assert_eq!(fold(sum_bytes(pseudo(src, dst, 17, 19), &u)), 0xffff);
        u[6..8].fill(0);
        assert_eq!(
            field(!fold(sum_bytes(pseudo(src, dst, 17, 19), &u))),
            [0xc7, 0x1c]
        );
        // DNAT to 10.0.0.9: Python's checksum of the rewritten datagram.
        let check = be([0xc7, 0x1c]);
        let (old, new) = (addr(dst), addr([10, 0, 0, 9]));
        assert_eq!(field(udp_replace4(check, old, new)), [0xc7, 0x18]);
        assert_eq!(field(replace4(check, old, new)), [0xc7, 0x18]);
        // The same datagram sent without a checksum stays without one.
        assert_eq!(udp_replace4(0, old, new), 0);
    }

    #[test]
    fn a_udp_dnat_whose_checksum_comes_out_zero_sends_ffff() {
        // Payload "zero&$" from 192.168.1.10:5000 to 10.0.0.5:3478 has the
        // checksum 0004; after DNAT to 10.0.0.9 the sum is all ones, so the
        // computed checksum is 0, which UDP sends as ffff (RFC 768).
        let check = be([0x00, 0x04]);
        let (old, new) = (addr([10, 0, 0, 5]), addr([10, 0, 0, 9]));
        assert_eq!(replace4(check, old, new), 0);
        assert_eq!(udp_replace4(check, old, new), 0xffff);
        let (old_word, new_word) = (be([0x00, 0x05]), be([0x00, 0x09]));
        assert_eq!(replace2(check, old_word, new_word), 0);
        assert_eq!(udp_replace2(check, old_word, new_word), 0xffff);
        assert_eq!(udp_replace2(0, old_word, new_word), 0);
    }

    /// A TCP SYN 192.168.1.10:40001 -> 10.0.0.5:7878 with MSS, SACK-ok and
    /// timestamp options; checksum 8f70.
    const TCP_SYN: [u8; 36] = [
        0x9c, 0x41, 0x1e, 0xc6, 0x12, 0x34, 0x56, 0x78, 0x00, 0x00, 0x00, 0x00, 0x90, 0x02, 0xfa,
        0xf0, 0x8f, 0x70, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01,
        0xe2, 0x40, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn a_tcp_syn_and_its_dnat_with_port_change() {
        let (src, dst) = ([192, 168, 1, 10], [10, 0, 0, 5]);
        let mut t = TCP_SYN;
        assert_eq!(fold(sum_bytes(pseudo(src, dst, 6, 36), &t)), 0xffff);
        t[16..18].fill(0);
        assert_eq!(
            field(!fold(sum_bytes(pseudo(src, dst, 6, 36), &t))),
            [0x8f, 0x70]
        );
        // DNAT to 10.0.0.9:3478 in one diff, as the TC program applies it.
        let check = be([0x8f, 0x70]);
        let diff = add(
            diff4(addr(dst), addr([10, 0, 0, 9])),
            diff2(be([0x1e, 0xc6]), be([0x0d, 0x96])),
        );
        assert_eq!(field(apply(check, diff)), [0xa0, 0x9c]);
    }

    #[test]
    fn sums_past_32_bits_fold_their_carries_back() {
        // ffffffff + ffff = 1_0000_fffe, which folds to ffff.
        assert_eq!(sum_bytes(u32::MAX, &[0xff, 0xff]), 0xffff);
        // 2^16 words of ffff on top: 1_fffe_ffff, which folds to ffff0000.
        let ones = [0xffu8; 1 << 17];
        assert_eq!(sum_bytes(u32::MAX, &ones), 0xffff_0000);
        assert_eq!(sum_bytes(0, &ones), 0xffff_0000);
    }

    #[test]
    fn odd_lengths_pad_with_zero() {
        assert_eq!(
            checksum(&[0x45, 0x00, 0x01]),
            checksum(&[0x45, 0x00, 0x01, 0x00])
        );
    }
}
