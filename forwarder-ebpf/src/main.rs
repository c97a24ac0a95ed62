//! The forwarder's kernel path: a TC classifier on clsact ingress, one on
//! clsact egress and an XDP program, all attached to the interfaces the
//! daemon serves.
#![no_std]
#![no_main]

mod acl;
mod conntrack;
mod counters;
mod fragments;
mod host_nat;
mod icmp;
mod maps;
mod mss;
mod nat;
mod parse;
mod redirect;
mod rules;
mod steer;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{classifier, sk_lookup, xdp},
    programs::{SkLookupContext, TcContext, XdpContext},
};

/// The XDP accelerator for established kernel flows; everything else
/// passes on to TC unchanged.
#[xdp]
pub fn forwarder_xdp(ctx: XdpContext) -> u32 {
    xdp::handle(&ctx)
}

/// The kernel path: DNAT/SNAT, conntrack and redirect for the rules'
/// flows; everything else passes unchanged.
#[classifier]
pub fn forwarder_tc(ctx: TcContext) -> i32 {
    tc::handle(&ctx)
}

/// On clsact egress: the host's own packets from our SNAT ports (its NAT,
/// its sockets) are noted, or moved off a port a kernel flow holds.
#[classifier]
pub fn forwarder_tc_egress(ctx: TcContext) -> i32 {
    host_nat::egress(&ctx)
}

/// Socket lookup in the daemon's network namespace: every port of a range
/// rule goes to the rule's one relay socket.
#[sk_lookup]
pub fn forwarder_steer(ctx: SkLookupContext) -> u32 {
    steer::lookup(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
