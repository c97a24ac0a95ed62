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

    #[test]
    fn odd_lengths_pad_with_zero() {
        assert_eq!(
            checksum(&[0x45, 0x00, 0x01]),
            checksum(&[0x45, 0x00, 0x01, 0x00])
        );
    }
}
