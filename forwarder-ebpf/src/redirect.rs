//! Sending a rewritten packet on: a FIB lookup for the egress interface and
//! next hop, then `bpf_redirect_neigh`, which fills in the MAC addresses.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};

const AF_INET: u8 = 2;

/// Where a packet leaves.
pub struct Route {
    ifindex: u32,
    neigh: bpf_redir_neigh,
}

/// The route from `src` to `dst` (network byte order) for a packet that
/// arrived on `ifindex`, or the FIB's refusal (no route, forwarding off on
/// the interface, too big for the egress MTU, a local destination, ...).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn route(
    ctx: &TcContext,
    ifindex: u32,
    src: u32,
    dst: u32,
    proto: u8,
    sport: u16,
    dport: u16,
    tot_len: u16,
) -> Result<Route, i64> {
    // SAFETY: a plain C struct; all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.sport = sport;
    params.dport = dport;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: the helper reads and writes `params`, of the size given.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return Err(rc);
    }
    // SAFETY: a plain C struct; all-zero is a valid value.
    let mut neigh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    neigh.nh_family = u32::from(params.family);
    // SAFETY: the FIB wrote the next hop in the family it set.
    unsafe {
        if params.family == AF_INET {
            neigh.__bindgen_anon_1.ipv4_nh = params.__bindgen_anon_4.ipv4_dst;
        } else {
            neigh.__bindgen_anon_1.ipv6_nh = params.__bindgen_anon_4.ipv6_dst;
        }
    }
    Ok(Route {
        ifindex: params.ifindex,
        neigh,
    })
}

/// Redirects the packet out of the route's interface; the TC verdict.
#[inline(always)]
pub fn send(route: &mut Route) -> i32 {
    // SAFETY: the helper reads `neigh`, of the size given.
    unsafe {
        bpf_redirect_neigh(
            route.ifindex,
            &mut route.neigh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}
