//! Clamping the MSS of a kernel flow's SYN and SYN-ACK to the MTU of the
//! path it leaves by, as `iptables -j TCPMSS --clamp-mss-to-pmtu` does:
//! then neither end sends segments that path cannot carry. The option
//! walk and the value are `forwarder_common::mss`.

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use forwarder_common::{
    PROTO_TCP,
    mss::{MAX_OPTIONS_LEN, clamped, mss_value_offset},
};

use crate::maps::Scratch;
use crate::parse::Packet;
use crate::redirect::{self, Flow};

const TCP_LEN: usize = 20;

/// Lowers the MSS option of `pkt`, a TCP SYN already rewritten to `s.ct`,
/// where the MTU of the path to its new destination is smaller (the same
/// MTU a too-big packet of the flow is answered with). Anything unexpected (no option, malformed options) leaves the
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
    let flow = Flow {
        // SAFETY: the context pointer is valid for the program's run.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        src: s.ct.new_src[3],
        dst: s.ct.new_dst[3],
        proto: PROTO_TCP,
        sport: s.ct.new_sport,
        dport: s.ct.new_dport,
        tot_len: 0,
    };
    let Some(mtu) = redirect::path_mtu(ctx, &flow, &mut s.mtu_fib) else {
        return;
    };
    let Some(new) = clamped(old, mtu.into()) else {
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
