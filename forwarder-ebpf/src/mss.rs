//! Clamping the MSS of a kernel flow's SYN and SYN-ACK to the MTU of the
//! interface it leaves by, as `iptables -j TCPMSS --clamp-mss-to-pmtu`
//! does: then neither end sends segments that link cannot carry. The
//! option walk and the value are `forwarder_common::mss`.

use aya_ebpf::{
    helpers::{bpf_check_mtu, bpf_skb_load_bytes},
    programs::TcContext,
};
use forwarder_common::mss::{MAX_OPTIONS_LEN, clamped, mss_value_offset};

use crate::maps::Scratch;
use crate::parse::Packet;

const TCP_LEN: usize = 20;

/// Lowers the MSS option of `pkt`, a TCP SYN already rewritten and routed
/// (its egress interface is in `s.fib`), where that interface's MTU is
/// smaller. Anything unexpected (no option, malformed options) leaves the
/// segment as it is.
#[inline(never)]
pub fn clamp(ctx: &TcContext, pkt: &Packet, s: &mut Scratch) {
    let l4 = usize::from(pkt.l4_off);
    let Ok(data_offset) = ctx.load::<u8>(l4 + 12) else {
        return;
    };
    let header_len = usize::from(data_offset >> 4) * 4;
    if header_len <= TCP_LEN {
        return;
    }
    let opts_len = header_len - TCP_LEN;
    if opts_len > MAX_OPTIONS_LEN {
        return;
    }
    // SAFETY: reads `opts_len` (1..=40) bytes into the 40-byte buffer.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            (l4 + TCP_LEN) as u32,
            s.tcp_opts.as_mut_ptr().cast(),
            opts_len as u32,
        )
    };
    if rc != 0 {
        return;
    }
    let Some(at) = mss_value_offset(&s.tcp_opts, opts_len) else {
        return;
    };
    if at + 2 > MAX_OPTIONS_LEN {
        return;
    }
    let old = u16::from_be_bytes([s.tcp_opts[at], s.tcp_opts[at + 1]]);
    let mut mtu: u32 = 0;
    // SAFETY: the helper writes the interface's MTU into `mtu`.
    let rc = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), s.fib.ifindex, &mut mtu, 0, 0) };
    if rc < 0 {
        return;
    }
    let Some(new) = clamped(old, mtu) else {
        return;
    };
    let (old, new) = (old.to_be(), new.to_be());
    // The checksum first: a failed store after it is what cannot happen
    // (the option is inside the segment just read).
    if ctx
        .l4_csum_replace(pkt.l4_csum_off(), old.into(), new.into(), 2)
        .is_ok()
    {
        let _ = ctx.store(l4 + TCP_LEN + at, &new, 0);
    }
}
