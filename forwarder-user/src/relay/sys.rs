//! The Linux calls the relay needs beyond std and tokio: pipes and splice,
//! recvmmsg/sendmmsg with packet info, and socket address conversion.
//! Every `unsafe` of the relay lives here, behind safe functions.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::batch::{BATCH, Datagrams, PacketInfo, SLOT};

fn check(ret: libc::c_int) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A non-blocking pipe, `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asks for a pipe of `size` bytes; returns the size the kernel granted.
pub fn set_pipe_size(pipe: &OwnedFd, size: usize) -> io::Result<usize> {
    check(unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) })
}

/// The size of a pipe's buffer in bytes.
pub fn pipe_size(pipe: &OwnedFd) -> io::Result<usize> {
    check(unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ) })
}

/// The bytes waiting in a pipe (or a socket's receive queue).
pub fn pipe_bytes(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    check(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) })?;
    Ok(n as usize)
}

/// Moves up to `len` bytes from `from` to `to` without copying them through
/// userspace; one of the two must be a pipe. Never blocks on the pipe; the
/// socket is non-blocking already.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let ret = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `read(2)` on a raw descriptor (used to empty a pipe when splice is refused).
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let ret = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (root only: they pass net.core.*mem_max).
pub fn force_buffer_sizes(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = bytes as libc::c_int;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        check(unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

/// Asks for the destination address of every datagram (`IP_PKTINFO` or
/// `IPV6_RECVPKTINFO`; the latter covers IPv4 on a dual-stack socket too).
pub fn enable_packet_info(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    let (level, opt) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Asks for the original destination (address and port) of every
/// datagram: `IP_RECVORIGDSTADDR`, and on an IPv6 socket also
/// `IPV6_RECVORIGDSTADDR` (IPv4 datagrams of a dual-stack socket report
/// the former).
pub fn enable_original_destination(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    let mut opts = vec![(libc::IPPROTO_IP, libc::IP_RECVORIGDSTADDR)];
    if ipv6 {
        opts.push((libc::IPPROTO_IPV6, libc::IPV6_RECVORIGDSTADDR));
    }
    for (level, opt) in opts {
        check(unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says it is a sockaddr_in and it is long enough.
            let sin: &libc::sockaddr_in =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Room for a packet-info and an original-destination control message
/// (either family), aligned for cmsghdr.
type ControlBuf = [u64; 16];

/// The port a datagram was sent to, from `IP_ORIGDSTADDR` or `IPV6_ORIGDSTADDR`.
fn parse_original_port(msg: &libc::msghdr) -> Option<u16> {
    // SAFETY: as in parse_packet_info.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let data = libc::CMSG_DATA(cmsg);
            if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_ORIGDSTADDR {
                let sin: libc::sockaddr_in = std::ptr::read_unaligned(data.cast());
                return Some(u16::from_be(sin.sin_port));
            }
            if c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_ORIGDSTADDR {
                let sin6: libc::sockaddr_in6 = std::ptr::read_unaligned(data.cast());
                return Some(u16::from_be(sin6.sin6_port));
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
}

fn parse_packet_info(msg: &libc::msghdr) -> Option<PacketInfo> {
    // SAFETY: msg points at a control buffer the kernel just filled, with
    // msg_controllen set by it; the CMSG_* walk stays inside that length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let data = libc::CMSG_DATA(cmsg);
            if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                return Some(PacketInfo::V4 {
                    addr: Ipv4Addr::from(info.ipi_addr.s_addr.to_ne_bytes()),
                    spec_dst: Ipv4Addr::from(info.ipi_spec_dst.s_addr.to_ne_bytes()),
                });
            }
            if c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                return Some(PacketInfo::V6 {
                    addr: Ipv6Addr::from(info.ipi6_addr.s6_addr),
                    ifindex: info.ipi6_ifindex,
                });
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
}

/// Writes the control message that makes a reply leave from the address the
/// client sent to; returns its length (0: let the kernel choose).
fn write_packet_info(info: &PacketInfo, buf: &mut ControlBuf) -> usize {
    let (level, kind, payload_len) = match info {
        PacketInfo::V4 { .. } => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            size_of::<libc::in_pktinfo>(),
        ),
        // A multicast destination is no source address.
        PacketInfo::V6 { addr, .. } if addr.is_multicast() => return 0,
        PacketInfo::V6 { .. } => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            size_of::<libc::in6_pktinfo>(),
        ),
    };
    // SAFETY: the buffer is aligned for cmsghdr and CMSG_SPACE of either
    // payload (32 or 40 bytes) fits its 128 bytes; a msghdr describing it
    // makes CMSG_FIRSTHDR point at its start.
    unsafe {
        let space = libc::CMSG_SPACE(payload_len as libc::c_uint) as usize;
        debug_assert!(space <= size_of::<ControlBuf>());
        let mut msg: libc::msghdr = zeroed();
        msg.msg_control = buf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload_len as libc::c_uint) as usize;
        let data = libc::CMSG_DATA(cmsg);
        match *info {
            PacketInfo::V4 { spec_dst, .. } => {
                // ipi_spec_dst is the local address the datagram was for
                // (for a broadcast, the interface's address).
                let pi = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(spec_dst.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(data.cast(), pi);
            }
            PacketInfo::V6 { addr, ifindex } => {
                // The interface matters only where the address is link-local.
                let link_local = (addr.segments()[0] & 0xffc0) == 0xfe80;
                let pi = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: addr.octets(),
                    },
                    ipi6_ifindex: if link_local { ifindex } else { 0 },
                };
                std::ptr::write_unaligned(data.cast(), pi);
            }
        }
        space
    }
}

/// Receives up to [`BATCH`] datagrams with one `recvmmsg`; fills `into`
/// (payload, length, sender, destination) and returns how many came.
/// `WouldBlock` when there is none.
pub fn recv_batch(fd: RawFd, into: &mut Datagrams) -> io::Result<usize> {
    let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
    let mut controls: [ControlBuf; BATCH] = [[0; 16]; BATCH];
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let base = into.data.as_mut_ptr();
    for i in 0..BATCH {
        iovs[i] = libc::iovec {
            // SAFETY: slot i lies inside `data`, which is BATCH * SLOT long.
            iov_base: unsafe { base.add(i * SLOT) }.cast(),
            iov_len: SLOT,
        };
        let h = &mut msgs[i].msg_hdr;
        h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = controls[i].as_mut_ptr().cast();
        h.msg_controllen = size_of::<ControlBuf>();
    }
    // SAFETY: every header points at live buffers of the lengths given.
    let n = check(unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    })?;
    for (i, m) in msgs.iter().enumerate().take(n) {
        let h = &m.msg_hdr;
        into.len[i] = m.msg_len as usize;
        into.peer[i] = from_sockaddr(&names[i], h.msg_namelen);
        into.dst[i] = parse_packet_info(h);
        into.dst_port[i] = parse_original_port(h);
    }
    into.count = n;
    Ok(n)
}

/// Sends up to [`BATCH`] payloads with one `sendmmsg`, to `dest` (or to the
/// connected peer when `None`), from the address in `source` when given.
/// Returns how many went; a partial count means the rest would block.
pub fn send_batch<'a>(
    fd: RawFd,
    payloads: impl Iterator<Item = &'a [u8]>,
    dest: Option<&SocketAddr>,
    source: Option<&PacketInfo>,
) -> io::Result<usize> {
    let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let mut control: ControlBuf = [0; 16];
    let control_len = source.map_or(0, |s| write_packet_info(s, &mut control));
    let mut name = dest.map(to_sockaddr);
    let mut n = 0;
    for payload in payloads.take(BATCH) {
        iovs[n] = libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        };
        let h = &mut msgs[n].msg_hdr;
        if let Some((storage, len)) = name.as_mut() {
            h.msg_name = (storage as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = *len;
        }
        h.msg_iov = &mut iovs[n];
        h.msg_iovlen = 1;
        if control_len > 0 {
            // The kernel only reads it; every message shares the one buffer.
            h.msg_control = control.as_mut_ptr().cast();
            h.msg_controllen = control_len;
        }
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: every header points at live buffers of the lengths given.
    check(unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) })
}

/// An IPv4 address of a dual-stack socket comes as `::ffff:a.b.c.d`;
/// this gives it back as IPv4 (for logs and the flow observer).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        for addr in [
            "127.0.0.1:7878".parse::<SocketAddr>().unwrap(),
            "[::1]:53".parse().unwrap(),
            "[::ffff:198.18.1.2]:65535".parse().unwrap(),
        ] {
            let (storage, len) = to_sockaddr(&addr);
            assert_eq!(from_sockaddr(&storage, len), Some(addr));
        }
    }

    #[test]
    fn canonical_unmaps_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "127.0.0.1:80".parse().unwrap());
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn packet_info_round_trips_through_a_control_message() {
        for info in [
            PacketInfo::V4 {
                addr: Ipv4Addr::new(127, 0, 0, 2),
                spec_dst: Ipv4Addr::new(127, 0, 0, 2),
            },
            PacketInfo::V6 {
                addr: "::ffff:127.0.0.2".parse().unwrap(),
                ifindex: 0,
            },
        ] {
            let mut buf: ControlBuf = [0; 16];
            let len = write_packet_info(&info, &mut buf);
            assert!(len > 0);
            let mut msg: libc::msghdr = unsafe { zeroed() };
            msg.msg_control = buf.as_mut_ptr().cast();
            msg.msg_controllen = len;
            let parsed = parse_packet_info(&msg).unwrap();
            match (info, parsed) {
                // What is sent carries only the source; the received form also the header's.
                (PacketInfo::V4 { spec_dst, .. }, PacketInfo::V4 { spec_dst: got, .. }) => {
                    assert_eq!(spec_dst, got)
                }
                (a, b) => assert_eq!(a, b),
            }
        }
    }
}
