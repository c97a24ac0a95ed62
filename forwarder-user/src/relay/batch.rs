//! Buffers for moving datagrams in batches (one recvmmsg/sendmmsg per batch):
//! one per worker thread for replies, and one per listener while it has
//! traffic ([`OnDemand`]), never per packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::gate::SourceRecord;

/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 32;

/// Room for one datagram: more than the largest UDP payload over IPv4
/// (65,507) or IPv6 (65,527), so a datagram is never truncated.
pub const SLOT: usize = 65_536;

/// The destination of a received datagram, from `IP_PKTINFO` or
/// `IPV6_PKTINFO`: where the client sent to, so the reply can leave from there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketInfo {
    /// On an IPv4 socket: `addr` is the header's destination, `spec_dst` the
    /// local address the kernel matched (they differ for broadcasts).
    V4 { addr: Ipv4Addr, spec_dst: Ipv4Addr },
    /// On an IPv6 socket, IPv4 clients of a dual-stack socket included
    /// (their address comes as `::ffff:a.b.c.d`).
    V6 { addr: Ipv6Addr, ifindex: u32 },
}

impl PacketInfo {
    pub fn to_record(self) -> SourceRecord {
        match self {
            PacketInfo::V4 { addr, spec_dst } => SourceRecord::V4 { addr, spec_dst },
            PacketInfo::V6 { addr, ifindex } => SourceRecord::V6 { addr, ifindex },
        }
    }

    pub fn from_record(r: SourceRecord) -> PacketInfo {
        match r {
            SourceRecord::V4 { addr, spec_dst } => PacketInfo::V4 { addr, spec_dst },
            SourceRecord::V6 { addr, ifindex } => PacketInfo::V6 { addr, ifindex },
        }
    }

    /// The address the client sent to, IPv4 unmapped.
    pub fn local_ip(&self) -> IpAddr {
        match *self {
            PacketInfo::V4 { addr, .. } => IpAddr::V4(addr),
            PacketInfo::V6 { addr, .. } => match addr.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(addr),
            },
        }
    }
}

/// Up to [`BATCH`] received datagrams: payloads in fixed slots, with their
/// lengths, senders and destinations.
pub struct Datagrams {
    pub data: Box<[u8]>,
    pub len: [usize; BATCH],
    pub peer: [Option<SocketAddr>; BATCH],
    pub dst: [Option<PacketInfo>; BATCH],
    /// The port each was sent to, on a port range's socket (which asks).
    pub dst_port: [Option<u16>; BATCH],
    pub count: usize,
}

/// A listener's receive buffer (2 MiB): made at its first datagram and
/// given back after a whole sweep interval without one, so that thousands
/// of idle listeners hold none.
#[derive(Default)]
pub struct OnDemand {
    batch: Option<Box<Datagrams>>,
    used: bool,
}

impl OnDemand {
    pub fn get(&mut self) -> &mut Datagrams {
        self.used = true;
        self.batch.get_or_insert_with(Datagrams::new)
    }

    /// At each sweep: releases the buffer if unused since the last one.
    pub fn tick(&mut self) {
        if !self.used {
            self.batch = None;
        }
        self.used = false;
    }

    #[cfg(test)]
    pub fn held(&self) -> bool {
        self.batch.is_some()
    }
}

impl Datagrams {
    pub fn new() -> Box<Datagrams> {
        Box::new(Datagrams {
            data: vec![0; BATCH * SLOT].into_boxed_slice(),
            len: [0; BATCH],
            peer: [None; BATCH],
            dst: [None; BATCH],
            dst_port: [None; BATCH],
            count: 0,
        })
    }

    pub fn payload(&self, i: usize) -> &[u8] {
        &self.data[i * SLOT..i * SLOT + self.len[i]]
    }

    /// The payloads of datagrams `from..to`.
    pub fn payloads(&self, from: usize, to: usize) -> impl Iterator<Item = &[u8]> {
        (from..to).map(|i| self.payload(i))
    }

    /// Total payload bytes of datagrams `from..to`.
    pub fn bytes(&self, from: usize, to: usize) -> u64 {
        self.len[from..to].iter().map(|&l| l as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_is_made_on_use_and_released_after_an_idle_interval() {
        let mut b = OnDemand::default();
        assert!(!b.held(), "nothing before the first datagram");
        b.tick();
        assert!(!b.held());
        b.get().len[0] = 7;
        assert!(b.held());
        b.tick();
        assert!(b.held(), "used during this interval: kept");
        assert_eq!(b.get().len[0], 7, "the same buffer");
        b.tick();
        assert!(b.held(), "used again since the last tick");
        b.tick();
        assert!(!b.held(), "a whole interval unused: released");
        assert_eq!(b.get().len[0], 0, "a fresh one");
    }
}
