//! The source address toward each backend, from the routing table.
//!
//! Connecting a UDP socket sends nothing; it only makes the kernel pick
//! the route and the local address it would use. A backend whose route is
//! local (an address of this host) cannot be reached by redirecting
//! packets, so its rule is the relay's.

use std::collections::HashMap;
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

/// The IPv4 addresses of this network namespace's interfaces, each with
/// the index of the interface it is on.
pub fn local_ipv4() -> io::Result<HashMap<Ipv4Addr, u32>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = HashMap::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a sockaddr of the list; its family says its type.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
        let addr = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
        // SAFETY: the interface's NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(ifa.ifa_name) };
        if index != 0 {
            out.insert(addr, index);
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The addresses of `pool` this host does not own (`owned` as from
/// [`local_ipv4`]).
pub fn not_owned(pool: &[Ipv4Addr], owned: &HashMap<Ipv4Addr, u32>) -> Vec<Ipv4Addr> {
    pool.iter()
        .filter(|a| !owned.contains_key(a))
        .copied()
        .collect()
}

/// The addresses of `pool` that are not on interface `oif`, the one the
/// route toward a backend leaves by: its replies would not come back to
/// them there. A backend uses the pool only if this is empty.
pub fn off_route(pool: &[Ipv4Addr], owned: &HashMap<Ipv4Addr, u32>, oif: u32) -> Vec<Ipv4Addr> {
    pool.iter()
        .filter(|a| owned.get(a) != Some(&oif))
        .copied()
        .collect()
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
    fn a_pool_is_owned_and_on_the_route_or_named() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let owned: HashMap<Ipv4Addr, u32> = [
            (a("10.1.0.10"), 3),
            (a("10.1.0.11"), 3),
            (a("192.0.2.1"), 4),
        ]
        .into();
        let pool = [a("10.1.0.10"), a("10.1.0.11")];
        assert!(not_owned(&pool, &owned).is_empty());
        assert!(off_route(&pool, &owned, 3).is_empty());
        assert_eq!(off_route(&pool, &owned, 4), pool);
        let mixed = [a("10.1.0.10"), a("192.0.2.1"), a("10.1.0.99")];
        assert_eq!(not_owned(&mixed, &owned), [a("10.1.0.99")]);
        assert_eq!(
            off_route(&mixed, &owned, 3),
            [a("192.0.2.1"), a("10.1.0.99")]
        );
        // This host's own loopback address is found with its interface.
        let here = local_ipv4().unwrap();
        let lo = crate::kernel::interfaces::ifindex("lo").unwrap();
        assert_eq!(here.get(&Ipv4Addr::LOCALHOST), Some(&lo));
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
