//! Fragmented datagrams of kernel flows. Only the first fragment carries
//! the ports that name the flow; it records the flow under the datagram's
//! reassembly key, and the later fragments find it there. New flows that
//! begin fragmented are the relay's (the stack reassembles them for it).

use forwarder_common::{CtValue, addr_from_ipv4_be};

use crate::conntrack;
use crate::maps::{FRAGMENTS, Scratch};
use crate::parse::Packet;

#[inline(always)]
fn datagram_key(pkt: &Packet, s: &mut Scratch) {
    let key = &mut s.frag_key;
    key.src = addr_from_ipv4_be(pkt.src);
    key.dst = addr_from_ipv4_be(pkt.dst);
    key.id = u32::from(pkt.ip_id);
    key.proto = pkt.proto;
    key._pad = [0; 3];
}

/// Notes that the datagram of `pkt`, a first fragment, is of the kernel
/// flow `s.key`. An entry of an earlier datagram with the same key (the
/// identification wrapped) is replaced.
#[inline(never)]
pub fn remember(pkt: &Packet, s: &mut Scratch) {
    datagram_key(pkt, s);
    let _ = FRAGMENTS.insert(&s.frag_key, &s.key, 0);
}

/// The conntrack entry of the flow whose first fragment began the datagram
/// of `pkt`, a later fragment; its key is left in `s.key`. `None` when the
/// first fragment was not a kernel flow's, or has not come yet: the stack
/// gets the fragment, and reassembles it for the relay if the flow is its.
///
/// These are BPF functions of their own, out of the packet path's frames.
#[inline(never)]
pub fn flow_of(pkt: &Packet, s: &mut Scratch) -> Option<*mut CtValue> {
    datagram_key(pkt, s);
    // SAFETY: copied out at once.
    s.key = *unsafe { FRAGMENTS.get(&s.frag_key) }?;
    conntrack::lookup(&s.key)
}
