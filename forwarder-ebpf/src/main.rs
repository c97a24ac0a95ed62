//! The forwarder's kernel path: a TC classifier on clsact ingress and an XDP
//! program, both attached to the interfaces the daemon serves.
#![no_std]
#![no_main]

mod counters;
mod maps;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;

use counters::{Hook, count_interface};

/// Counts every packet and passes it on unchanged.
#[xdp]
pub fn forwarder_xdp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let ifindex = ctx.ingress_ifindex() as u32;
    if count_interface(ifindex, Hook::Xdp, bytes) {
        debug!(&ctx, "xdp: first packet on ifindex {}", ifindex);
    }
    xdp_action::XDP_PASS
}

/// Counts every packet and passes it on unchanged.
#[classifier]
pub fn forwarder_tc(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if count_interface(ifindex, Hook::Tc, u64::from(ctx.len())) {
        debug!(&ctx, "tc: first packet on ifindex {}", ifindex);
    }
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
