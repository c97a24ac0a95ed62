//! The source address toward each backend, from the routing table.
//!
//! Connecting a UDP socket sends nothing; it only makes the kernel pick
//! the route and the local address it would use. A backend whose route is
//! local (an address of this host) cannot be reached by redirecting
//! packets, so its rule is the relay's.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use forwarder_common::Addr;

/// How this host reaches a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// Through an interface, leaving from this local address.
    From(IpAddr),
    /// The backend is this host.
    Local,
}

/// The route to `backend`, as the kernel would pick it now.
pub fn egress(backend: SocketAddr) -> io::Result<Egress> {
    if backend.ip().is_loopback() {
        return Ok(Egress::Local);
    }
    let any: SocketAddr = match backend {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(backend)?;
    let local = socket.local_addr()?.ip();
    if local == backend.ip() {
        Ok(Egress::Local)
    } else {
        Ok(Egress::From(local))
    }
}

/// An address of the maps as an `IpAddr` (IPv4 when mapped).
pub fn ip_of(addr: &Addr) -> IpAddr {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_mut(4).zip(addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(bytes).to_canonical()
}

/// An `IpAddr` in the maps' form (IPv4 mapped, words in network order).
pub fn addr_of(ip: IpAddr) -> Addr {
    let bytes = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let word = |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_in_the_maps_form() {
        for ip in ["198.18.2.2", "::1", "2001:db8::7", "0.0.0.0"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_of(&addr_of(ip)), ip);
        }
        let v4 = Ipv4Addr::new(192, 0, 2, 7);
        assert_eq!(
            addr_of(IpAddr::V4(v4)),
            forwarder_common::addr_from_ipv4_be(u32::from_ne_bytes(v4.octets()))
        );
    }

    #[test]
    fn loopback_and_own_addresses_are_local() {
        assert_eq!(
            egress("127.0.0.9:80".parse().unwrap()).unwrap(),
            Egress::Local
        );
        // 127.0.0.1 connected from the unspecified address picks itself.
        assert_eq!(egress("[::1]:80".parse().unwrap()).unwrap(), Egress::Local);
    }
}
