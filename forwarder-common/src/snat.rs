//! SNAT source addresses beyond the route's one (`kernel.snat_addresses`):
//! a new flow toward a backend flagged [`BACKEND_F_SNAT_POOL`] takes a free
//! (address, port) pair of the pool, so that concurrent flows per backend
//! ip:port scale with the number of addresses.

/// Name of the single-entry array holding the [`SnatPool`].
pub const SNAT_POOL_MAP: &str = "SNAT_POOL";

/// Most addresses a pool holds: a /24's worth, which already gives five
/// million ports per backend with the default range.
pub const MAX_SNAT_ADDRS: u32 = 256;

/// A bit of `Backend::flags`: new flows toward this backend take their
/// source address from the pool (every pool address is on the interface
/// toward it), not `Backend::snat_addr`.
pub const BACKEND_F_SNAT_POOL: u32 = 1 << 8;

/// The addresses of the pool, IPv4 in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatPool {
    /// Addresses in use at `addrs[..count]`; 0 means no pool.
    pub count: u32,
    pub addrs: [u32; MAX_SNAT_ADDRS as usize],
}

impl Default for SnatPool {
    fn default() -> SnatPool {
        SnatPool {
            count: 0,
            addrs: [0; MAX_SNAT_ADDRS as usize],
        }
    }
}

impl SnatPool {
    /// The pool of `addrs` (network byte order), at most [`MAX_SNAT_ADDRS`]
    /// of them; the rest are left out (the daemon refuses more before).
    pub fn of(addrs: &[u32]) -> SnatPool {
        let mut pool = SnatPool::default();
        for (slot, addr) in pool.addrs.iter_mut().zip(addrs) {
            *slot = *addr;
            pool.count += 1;
        }
        pool
    }
}

/// The (address index, port) of pair number `seed % (count * span)`,
/// over `count` addresses and `span` ports from `min`. Pairs are numbered
/// address first, so that consecutive numbers try each address at one
/// port before the next port.
#[inline(always)]
pub const fn probe_pair(seed: u32, count: u32, span: u32, min: u32) -> (u32, u16) {
    let pair = seed % (count * span);
    (pair % count, (min + pair / count) as u16)
}

/// Whether probes walk the pairs one after the other from a random start
/// (no more pairs than probes: each is tried once), or each probe takes a
/// random pair. Walking a large table from random starts would probe runs
/// that earlier walks filled (as linear probing does): with 100,000 flows
/// over 150,000 pairs, some runs outgrow the probe limit. Random probes
/// miss all 64 only once in 10^11 flows at two thirds full.
#[inline(always)]
pub const fn probes_walk(count: u32, span: u32) -> bool {
    count * span <= crate::MAX_SNAT_PROBES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_numbered_address_first_and_small_tables_are_walked() {
        let (count, span, min) = (3, 5, 40000);
        let mut seen = [[false; 5]; 3];
        for seed in 7..7 + count * span {
            let (a, port) = probe_pair(seed, count, span, min);
            let p = (u32::from(port) - min) as usize;
            assert!(!seen[a as usize][p], "pair {a} {port} twice");
            seen[a as usize][p] = true;
        }
        assert_eq!(probe_pair(0, 3, 5, 40000), (0, 40000));
        assert_eq!(probe_pair(1, 3, 5, 40000), (1, 40000));
        assert_eq!(probe_pair(3, 3, 5, 40000), (0, 40001));
        // Wraps past the last pair.
        assert_eq!(probe_pair(15, 3, 5, 40000), (0, 40000));
        assert_eq!(probe_pair(u32::MAX, 1, 20000, 40000), (0, 40000 + 7295));
        // One address is the plain port.
        assert_eq!(probe_pair(9, 1, 20000, 40000), (0, 40009));
        assert!(probes_walk(2, 32));
        assert!(!probes_walk(2, 33));
        assert!(!probes_walk(1, 20000));
    }

    #[test]
    fn a_pool_takes_at_most_its_capacity_and_the_flag_is_not_healthy() {
        let pool = SnatPool::of(&[1, 2, 3]);
        assert_eq!(pool.count, 3);
        assert_eq!(&pool.addrs[..4], &[1, 2, 3, 0]);
        let many: [u32; 300] = core::array::from_fn(|i| i as u32 + 1);
        assert_eq!(SnatPool::of(&many).count, MAX_SNAT_ADDRS);
        assert_eq!(core::mem::size_of::<SnatPool>(), 4 + 4 * 256);
        assert!(BACKEND_F_SNAT_POOL.is_power_of_two());
        // The kernel bounds an index by masking with the size.
        assert!(MAX_SNAT_ADDRS.is_power_of_two());
        assert_eq!(BACKEND_F_SNAT_POOL & crate::BACKEND_F_HEALTHY, 0);
    }
}
