//! Sending a rewritten frame on from XDP: a FIB lookup for the egress
//! interface and the next hop's MAC address, then `XDP_TX` back out of the
//! ingress interface or a redirect through the `XDP_EGRESS` devmap.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};

use crate::maps::{Scratch, XDP_EGRESS};
use crate::redirect::Flow;

const AF_INET: u8 = 2;

/// Looks up the route of `flow` into `s.fib`. Only a complete answer
/// counts: an unresolved neighbour (`NO_NEIGH`), like every refusal, is
/// left to TC, which can resolve it.
#[inline(always)]
pub fn route(ctx: &XdpContext, flow: &Flow, s: &mut Scratch) -> Result<(), ()> {
    // SAFETY: a plain C struct; all-zero is a valid value.
    s.fib = unsafe { core::mem::zeroed() };
    let params = &mut s.fib;
    params.family = AF_INET;
    params.l4_protocol = flow.proto;
    params.sport = flow.sport;
    params.dport = flow.dport;
    params.__bindgen_anon_1.tot_len = flow.tot_len;
    params.ifindex = flow.ifindex;
    params.__bindgen_anon_3.ipv4_src = flow.src;
    params.__bindgen_anon_4.ipv4_dst = flow.dst;
    // SAFETY: the helper reads and writes `params`, of the size given.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        Ok(())
    } else {
        Err(())
    }
}

/// True if the frame can leave by the interface `route` found: one in
/// `XDP_EGRESS`, which holds the interfaces that take XDP frames now (for
/// `XDP_TX` back out of the ingress one too: a veth needs its peer ready
/// for either).
#[inline(always)]
pub fn can_send(s: &Scratch) -> bool {
    XDP_EGRESS.get_ifindex(s.fib.ifindex).is_some()
}

/// The verdict that sends the frame out of the interface `route` found.
/// `can_send` checked the devmap first; only if the daemon takes the
/// interface out in between is the fallback taken, and the rewritten frame
/// goes up to the stack, which routes or drops it like any other.
#[inline(always)]
pub fn send(ingress: u32, s: &Scratch) -> u32 {
    if s.fib.ifindex == ingress {
        return xdp_action::XDP_TX;
    }
    XDP_EGRESS
        .redirect(s.fib.ifindex, u64::from(xdp_action::XDP_PASS))
        .unwrap_or(xdp_action::XDP_PASS)
}
