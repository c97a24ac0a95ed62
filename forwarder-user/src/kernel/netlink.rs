//! Netlink sockets for the few requests the daemon sends itself.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// A netlink socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_GENERIC`).
pub fn socket(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a plain socket call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The value of attribute `kind` in a run of netlink attributes.
pub fn attribute(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let this = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if this == kind {
            return Some(&attrs[4..len]);
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;

/// The interface the kernel would send a packet to `dst` out of now
/// (`ip route get`); `None` when the answer names none (a local address).
pub fn route_oif(dst: std::net::Ipv4Addr) -> io::Result<Option<u32>> {
    use std::os::fd::AsRawFd;
    let fd = socket(libc::NETLINK_ROUTE)?;
    let len = NLMSG_HDRLEN + RTMSG_LEN + 8;
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: AF_INET, a /32 destination, everything else zero.
    req.extend_from_slice(&[libc::AF_INET as u8, 32, 0, 0, 0, 0, 0, 0]);
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&8u16.to_ne_bytes());
    req.extend_from_slice(&RTA_DST.to_ne_bytes());
    req.extend_from_slice(&dst.octets());
    // SAFETY: sending a local buffer.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 4096];
    // SAFETY: receiving into a local buffer.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let msg = &buf[..n as usize];
    if msg.len() < NLMSG_HDRLEN + 4 {
        return Err(io::Error::other("short netlink answer"));
    }
    match u16::from_ne_bytes([msg[4], msg[5]]) {
        RTM_NEWROUTE => {}
        t if t == libc::NLMSG_ERROR as u16 => {
            let code = i32::from_ne_bytes(msg[16..20].try_into().expect("4 bytes"));
            return Err(io::Error::from_raw_os_error(-code));
        }
        t => {
            return Err(io::Error::other(format!(
                "unexpected netlink answer type {t}"
            )));
        }
    }
    let total = (u32::from_ne_bytes(msg[..4].try_into().expect("4 bytes")) as usize).min(msg.len());
    let attrs = msg.get(NLMSG_HDRLEN + RTMSG_LEN..total).unwrap_or_default();
    Ok(attribute(attrs, RTA_OIF)
        .filter(|v| v.len() >= 4)
        .map(|v| u32::from_ne_bytes(v[..4].try_into().expect("4 bytes"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_routes_out_of_lo() {
        let lo = crate::kernel::interfaces::ifindex("lo").expect("lo");
        assert_eq!(route_oif(std::net::Ipv4Addr::LOCALHOST).unwrap(), Some(lo));
    }
}
