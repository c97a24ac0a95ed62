//! Sending a rewritten packet on: a FIB lookup for the egress interface and
//! next hop, then `bpf_redirect_neigh`, which fills in the MAC addresses.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::maps::Scratch;

const AF_INET: u8 = 2;

/// A packet to route: addresses and ports in network byte order.
#[derive(Clone, Copy)]
pub struct Flow {
    pub ifindex: u32,
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// The IP total length the FIB checks against the egress MTU; 0 makes
    /// the kernel check the skb itself, which passes a GRO/GSO skb whose
    /// segments fit (its header's total length may be up to 64 KiB).
    pub tot_len: u16,
}

/// Looks up the route of `flow` (which arrived on `flow.ifindex`) into
/// `params`; the FIB's answer.
#[inline(always)]
fn lookup(ctx: &TcContext, flow: &Flow, params: &mut bpf_fib_lookup) -> i64 {
    // SAFETY: a plain C struct; all-zero is a valid value.
    *params = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = flow.proto;
    params.sport = flow.sport;
    params.dport = flow.dport;
    params.__bindgen_anon_1.tot_len = flow.tot_len;
    params.ifindex = flow.ifindex;
    params.__bindgen_anon_3.ipv4_src = flow.src;
    params.__bindgen_anon_4.ipv4_dst = flow.dst;
    // SAFETY: the helper reads and writes `params`, of the size given.
    unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    }
}

/// The MTU of the path to `flow` as forwarding knows it (a locked route
/// MTU, a learnt path MTU, else the egress interface's), asked of the FIB
/// with a packet too big for any; `params` is its working space.
#[inline(always)]
pub fn path_mtu(ctx: &TcContext, flow: &Flow, params: &mut bpf_fib_lookup) -> Option<u16> {
    let too_big = Flow {
        tot_len: u16::MAX,
        ..*flow
    };
    if lookup(ctx, &too_big, params) != i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        return None;
    }
    // SAFETY: the FIB's answer to a too-big packet is the MTU.
    Some(unsafe { params.__bindgen_anon_1.mtu_result })
}

/// Looks up the route of `flow` (which arrived on `flow.ifindex`) into
/// `s`, or returns the FIB's refusal (no route, forwarding off on the
/// interface, too big for the egress MTU, a local destination, ...).
#[inline(always)]
pub fn route(ctx: &TcContext, flow: &Flow, s: &mut Scratch) -> Result<(), i64> {
    let rc = lookup(ctx, flow, &mut s.fib);
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && rc != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return Err(rc);
    }
    // SAFETY: a plain C struct; all-zero is a valid value.
    s.neigh = unsafe { core::mem::zeroed() };
    let (params, neigh) = (&s.fib, &mut s.neigh);
    neigh.nh_family = u32::from(params.family);
    // SAFETY: the FIB wrote the next hop in the family it set.
    unsafe {
        if params.family == AF_INET {
            neigh.__bindgen_anon_1.ipv4_nh = params.__bindgen_anon_4.ipv4_dst;
        } else {
            neigh.__bindgen_anon_1.ipv6_nh = params.__bindgen_anon_4.ipv6_dst;
        }
    }
    Ok(())
}

/// True unless the FIB would forward a packet to `flow` (as it arrived):
/// a destination of this host (local, broadcast), or one it cannot tell
/// because forwarding is off on the interface, where the stack keeps the
/// packet anyway. A destination the FIB refuses (unreachable, blackhole)
/// is no more ours than a routable one.
#[inline(always)]
pub fn for_this_host(ctx: &TcContext, flow: &Flow, s: &mut Scratch) -> bool {
    match route(ctx, flow, s) {
        Ok(()) => false,
        Err(rc) => {
            rc == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED)
                || rc == i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED)
        }
    }
}

/// Redirects the packet out of the interface `route` found; the TC verdict.
#[inline(always)]
pub fn send(s: &mut Scratch) -> i32 {
    // SAFETY: the helper reads `neigh`, of the size given.
    unsafe {
        bpf_redirect_neigh(
            s.fib.ifindex,
            &mut s.neigh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}
