//! Clamping the MSS option of a TCP SYN or SYN-ACK to what the egress
//! path carries, as `iptables -j TCPMSS --clamp-mss-to-pmtu` does: finding
//! the option, and the value it should have.

/// Most option bytes a TCP header holds (data offset 15 words).
pub const MAX_OPTIONS_LEN: usize = 40;

const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_MSS_LEN: u8 = 4;

/// IPv4 and TCP headers without options: what an MTU holds beside the
/// segment.
pub const IPV4_TCP_HEADERS: u32 = 40;

/// Where the MSS option's 16-bit value starts in `opts`, whose first `len`
/// bytes are a TCP header's options; `None` without one, or if the options
/// are malformed (an option that runs past the end or has a length below
/// 2), which are then left as they are.
#[inline(always)]
pub fn mss_value_offset(opts: &[u8; MAX_OPTIONS_LEN], len: usize) -> Option<usize> {
    let len = if len > MAX_OPTIONS_LEN {
        MAX_OPTIONS_LEN
    } else {
        len
    };
    let mut i = 0;
    // Every step moves on by at least one byte: at most 40 rounds.
    while i < len {
        let kind = opts[i];
        if kind == OPT_END {
            return None;
        }
        if kind == OPT_NOP {
            i += 1;
            continue;
        }
        if i + 1 >= len {
            return None;
        }
        let opt_len = opts[i + 1] as usize;
        if opt_len < 2 || i + opt_len > len {
            return None;
        }
        if kind == OPT_MSS {
            return (opt_len == OPT_MSS_LEN as usize).then_some(i + 2);
        }
        i += opt_len;
    }
    None
}

/// The MSS to write instead of `mss` (host order) for a path of `mtu`
/// bytes, or `None` where `mss` already fits (or the MTU is unknown, 0).
#[inline(always)]
pub const fn clamped(mss: u16, mtu: u32) -> Option<u16> {
    if mtu <= IPV4_TCP_HEADERS {
        return None;
    }
    let most = mtu - IPV4_TCP_HEADERS;
    if (mss as u32) > most {
        Some(most as u16)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum;

    fn opts(bytes: &[u8]) -> [u8; MAX_OPTIONS_LEN] {
        let mut o = [0u8; MAX_OPTIONS_LEN];
        o[..bytes.len()].copy_from_slice(bytes);
        o
    }

    /// The options of a SYN Linux 6.18 sent (MSS 1460, SACK permitted,
    /// timestamps, NOP, window scale 7).
    const LINUX_SYN: [u8; 20] = [
        0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x9f, 0x4e, 0x1c, 0x6d, 0x00, 0x00, 0x00,
        0x00, 0x01, 0x03, 0x03, 0x07,
    ];

    #[test]
    fn finds_the_mss_where_stacks_put_it() {
        assert_eq!(mss_value_offset(&opts(&LINUX_SYN), 20), Some(2));
        // Behind NOPs and another option (window scale).
        let late = [1, 1, 3, 3, 7, 2, 4, 0x05, 0xb4, 0];
        assert_eq!(mss_value_offset(&opts(&late), 10), Some(7));
        // No MSS at all, or the list ends first.
        assert_eq!(mss_value_offset(&opts(&[1, 3, 3, 7]), 4), None);
        assert_eq!(mss_value_offset(&opts(&[0, 2, 4, 5, 0xb4]), 5), None);
        assert_eq!(mss_value_offset(&opts(&[]), 0), None);
    }

    #[test]
    fn malformed_options_are_left_alone() {
        for bad in [
            &[2, 4, 5][..],         // runs past the end
            &[2, 3, 5, 0xb4],       // wrong MSS length
            &[3, 0, 2, 4, 5, 0xb4], // zero length would loop
            &[3, 1, 2, 4, 5, 0xb4], // length 1 likewise
            &[1, 1, 1, 2],          // kind without length
        ] {
            assert_eq!(mss_value_offset(&opts(bad), bad.len()), None, "{bad:?}");
        }
        // A length past 40 is cut to 40.
        let mut full = [1u8; MAX_OPTIONS_LEN];
        full[36..40].copy_from_slice(&[2, 4, 5, 0xb4]);
        assert_eq!(mss_value_offset(&full, 60), Some(38));
    }

    #[test]
    fn clamps_only_where_smaller() {
        assert_eq!(clamped(1460, 1400), Some(1360));
        assert_eq!(clamped(1360, 1400), None);
        assert_eq!(clamped(1200, 1400), None);
        assert_eq!(clamped(1460, 1500), None);
        assert_eq!(clamped(65535, 65536), Some(65496));
        assert_eq!(clamped(1460, 0), None);
        assert_eq!(clamped(1460, 40), None);
    }

    /// A SYN's checksum after the clamp, updated as the TC program does it,
    /// against one recomputed over the whole (hand-built) segment.
    #[test]
    fn the_checksum_update_matches_a_full_recomputation() {
        let mut seg = [0u8; 40];
        seg[..4].copy_from_slice(&[0xc3, 0x50, 0x1e, 0xc6]);
        seg[12] = 10 << 4; // 40 bytes of header: 20 of options
        seg[13] = 0x02; // SYN
        seg[20..].copy_from_slice(&LINUX_SYN);
        let pseudo = csum::sum_bytes(0, &[198, 18, 1, 2, 198, 18, 2, 2, 0, 6, 0, 40]);
        let full = |seg: &[u8; 40]| {
            let mut s = *seg;
            s[16] = 0;
            s[17] = 0;
            !csum::fold(csum::sum_bytes(pseudo, &s))
        };
        let check = full(&seg);
        let at = 20 + mss_value_offset(&opts(&LINUX_SYN), 20).unwrap();
        let old = u16::from_be_bytes([seg[at], seg[at + 1]]);
        let new = clamped(old, 1400).unwrap();
        seg[at..at + 2].copy_from_slice(&new.to_be_bytes());
        let updated = csum::replace2(check, old.to_be(), new.to_be());
        assert_eq!(updated, full(&seg));
    }
}
