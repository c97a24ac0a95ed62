//! Port-range rules on the kernel path: the `RANGES` LPM trie.
//!
//! A range rule is not one `RULES` entry per port: its listen range is cut
//! into aligned power-of-two blocks ([`prefixes`], at most 30 for any
//! range), each one trie entry whose prefix covers the exact address, the
//! protocol and the block's leading port bits. The TC program looks up
//! `RULES` then `RANGES` for the exact address, then both for the wildcard,
//! and only while [`RANGE_COUNT_MAP`] says some range rule exists.

use crate::{Addr, RuleValue};

/// Name of the `LpmTrie<RangeKey, RangeValue>`.
pub const RANGES_MAP: &str = "RANGES";
/// Name of the one-entry `Array<u32>`: how many range rules are in
/// `RANGES`; 0 lets packets skip both trie lookups.
pub const RANGE_COUNT_MAP: &str = "RANGE_COUNT";

/// Most prefixes one range takes: 2 per bit but the top and bottom ones.
pub const MAX_PREFIXES_PER_RANGE: u32 = 30;
/// Most entries of `RANGES`: every rule a range at its worst, twice over
/// while a reload writes rules anew beside the running ones.
pub const MAX_RANGE_ENTRIES: u32 = crate::RULE_IDS * MAX_PREFIXES_PER_RANGE;

/// Bits of a [`RangeKey`] before the port: the address, protocol and pad;
/// a key's prefix length is this plus the block's port bits.
pub const RANGE_KEY_HEAD_BITS: u32 = 128 + 16;

/// The data of a `RANGES` key. Field order is the trie's bit order: the
/// address and protocol always match in full, then the port's high bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RangeKey {
    /// The bind address, or `ADDR_ANY` for the wildcard bind.
    pub addr: Addr,
    pub proto: u8,
    pub _pad: u8,
    /// Big endian, so that the trie's prefix is the port's high bits.
    pub port: [u8; 2],
}

impl RangeKey {
    /// `port` in host byte order.
    #[inline(always)]
    pub const fn new(addr: Addr, proto: u8, port: u16) -> RangeKey {
        RangeKey {
            addr,
            proto,
            _pad: 0,
            port: port.to_be_bytes(),
        }
    }

    /// The prefix length of a block of `2^block_bits` ports.
    #[inline(always)]
    pub const fn prefix_len(block_bits: u32) -> u32 {
        RANGE_KEY_HEAD_BITS + 16 - block_bits
    }

    /// A lookup key matches any block holding its port: the full length.
    pub const LOOKUP_PREFIX_LEN: u32 = RANGE_KEY_HEAD_BITS + 16;
}

/// Every listen port `first_port + i` goes to the backend's port + i.
pub const RANGE_TARGET_SHIFTED: u8 = 0;
/// Every listen port goes to the backend's port.
pub const RANGE_TARGET_SAME: u8 = 1;

/// What a `RANGES` entry gives: the rule, and what the DNAT port needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RangeValue {
    /// As in `RULES`.
    pub rule: RuleValue,
    /// The range's first listen port, host byte order.
    pub first_port: u16,
    /// `RANGE_TARGET_*`.
    pub target: u8,
    pub _pad: u8,
}

impl RangeValue {
    #[inline(always)]
    pub const fn new(rule: RuleValue, first_port: u16, target: u8) -> RangeValue {
        RangeValue {
            rule,
            first_port,
            target,
            _pad: 0,
        }
    }

    /// What to add to a backend's port (host order) for a packet to listen
    /// port `port` (host order, within the range).
    #[inline(always)]
    pub const fn port_shift(&self, port: u16) -> u16 {
        if self.target == RANGE_TARGET_SAME {
            0
        } else {
            port.wrapping_sub(self.first_port)
        }
    }
}

/// The aligned blocks covering `first..=last`, as (first port of the
/// block, log2 of its size), lowest first; empty if `first > last`.
pub fn prefixes(first: u16, last: u16) -> Prefixes {
    Prefixes {
        next: first as u32,
        end: last as u32 + 1,
    }
}

/// See [`prefixes`].
#[derive(Clone, Debug)]
pub struct Prefixes {
    next: u32,
    /// One past the last port.
    end: u32,
}

impl Iterator for Prefixes {
    type Item = (u16, u32);

    fn next(&mut self) -> Option<(u16, u32)> {
        if self.next >= self.end {
            return None;
        }
        let start = self.next;
        // The largest block aligned at `start` that stays within the range.
        let mut bits = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1 << bits) > self.end {
            bits -= 1;
        }
        self.next = start + (1 << bits);
        Some((start as u16, bits))
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), Copy, explicit padding, no pointers.
    unsafe impl aya::Pod for RangeKey {}
    unsafe impl aya::Pod for RangeValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    fn covered(first: u16, last: u16) -> (u32, u32, u32) {
        // (count of prefixes, ports covered, lowest port) with a check that
        // blocks are aligned, adjacent and inside the range.
        let mut n = 0;
        let mut ports = 0u32;
        let mut expect = first as u32;
        for (start, bits) in prefixes(first, last) {
            assert_eq!(start as u32, expect, "blocks are adjacent");
            assert_eq!(
                start as u32 % (1 << bits),
                0,
                "block {start}/{bits} aligned"
            );
            expect += 1 << bits;
            ports += 1 << bits;
            n += 1;
        }
        assert_eq!(expect, last as u32 + 1, "blocks end at the last port");
        (n, ports, first as u32)
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<RangeKey>(), 20);
        assert_eq!(size_of::<RangeValue>(), 20);
    }

    #[test]
    fn key_port_is_big_endian_and_prefix_counts_port_bits() {
        let k = RangeKey::new([0; 4], 6, 49152);
        assert_eq!(k.port, [0xc0, 0x00]);
        assert_eq!(RangeKey::prefix_len(14), 128 + 16 + 2);
        assert_eq!(RangeKey::prefix_len(0), RangeKey::LOOKUP_PREFIX_LEN);
    }

    #[test]
    fn aligned_power_of_two_range_is_one_prefix() {
        let mut it = prefixes(49152, 65535);
        assert_eq!(it.next(), Some((49152, 14)));
        assert_eq!(it.next(), None);
        assert_eq!(covered(0, 65535), (1, 65536, 0));
        assert_eq!(covered(7, 7), (1, 1, 7));
    }

    #[test]
    fn worst_case_range_stays_within_the_bound() {
        let (n, ports, _) = covered(1, 65534);
        assert_eq!(ports, 65534);
        assert_eq!(n, MAX_PREFIXES_PER_RANGE);
        for (a, b) in [
            (20000, 20999),
            (5000, 5099),
            (1, 1024),
            (65535, 65535),
            (3, 60000),
        ] {
            let (n, ports, _) = covered(a, b);
            assert_eq!(ports, (b - a) as u32 + 1);
            assert!(n <= MAX_PREFIXES_PER_RANGE, "{a}-{b}: {n}");
        }
        assert_eq!(prefixes(10, 9).count(), 0);
    }

    #[test]
    fn port_shift_by_target() {
        let v = RangeValue::new(RuleValue::default(), 20000, RANGE_TARGET_SHIFTED);
        assert_eq!(v.port_shift(20000), 0);
        assert_eq!(v.port_shift(20999), 999);
        let same = RangeValue::new(RuleValue::default(), 5000, RANGE_TARGET_SAME);
        assert_eq!(same.port_shift(5099), 0);
    }
}
