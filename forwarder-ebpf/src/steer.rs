//! Socket lookup for port ranges: one relay socket per range rule and
//! protocol takes every port of the range (see `forwarder_common::steer`).

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::map,
    maps::{SockMap, lpm_trie::Key},
    programs::SkLookupContext,
};
use forwarder_common::{
    ADDR_ANY, Addr, addr_from_ipv4_be,
    ranges::RangeKey,
    steer::{FAMILY_V4, FAMILY_V6, STEER_SOCKETS_SIZE},
};

use crate::maps::RANGES;

/// Each range rule's relay socket, by rule id; written by userspace.
#[map]
pub static STEER_SOCKETS: SockMap = SockMap::with_max_entries(STEER_SOCKETS_SIZE, 0);

/// Assigns the rule's socket when the destination is in a range rule
/// (exact address first, then the wildcard); always passes, so that a
/// port no rule covers (or a rule whose socket is gone) is looked up as
/// usual and refused.
#[inline(always)]
pub fn lookup(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Each field read on its own at its fixed offset: the verifier refuses
    // a context load at a computed one (which the optimizer would make of
    // the two families' address words).
    // SAFETY: the kernel hands a valid context for the program's run.
    let field = |p: *const u32| unsafe { core::ptr::read_volatile(p) };
    // local_ip4 is read for either family (0 for IPv6), so that the
    // branches below share no load.
    let (family, proto, port, ip4) = unsafe {
        (
            field(&raw const (*l).family),
            field(&raw const (*l).protocol),
            // Host byte order.
            field(&raw const (*l).local_port),
            field(&raw const (*l).local_ip4),
        )
    };
    let addr: Addr = match family {
        FAMILY_V4 => addr_from_ipv4_be(ip4),
        FAMILY_V6 => unsafe {
            [
                field(&raw const (*l).local_ip6[0]),
                field(&raw const (*l).local_ip6[1]),
                field(&raw const (*l).local_ip6[2]),
                field(&raw const (*l).local_ip6[3]),
            ]
        },
        _ => return SK_PASS,
    };
    let (proto, port) = (proto as u8, port as u16);
    let mut key = Key::new(
        RangeKey::LOOKUP_PREFIX_LEN,
        RangeKey::new(addr, proto, port),
    );
    let rule = match RANGES.get(&key) {
        Some(v) => v.rule.rule_id,
        None => {
            key.data = RangeKey::new(ADDR_ANY, proto, port);
            match RANGES.get(&key) {
                Some(v) => v.rule.rule_id,
                None => return SK_PASS,
            }
        }
    };
    // No socket at the id (not yet inserted, or closed): the usual lookup.
    let _ = STEER_SOCKETS.redirect_sk_lookup(ctx, rule, 0);
    SK_PASS
}
