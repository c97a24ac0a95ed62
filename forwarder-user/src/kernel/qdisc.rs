//! The clsact qdisc for netlink-attached TC programs (kernels without TCX).
//!
//! aya adds it; removing it is one rtnetlink request, sent here. Only a
//! qdisc this daemon added is ever removed.

use std::io;
use std::mem::size_of;

use aya::programs::tc;

const RTM_DELQDISC: u16 = 37;
const TCA_KIND: u16 = 1;
/// `TC_H_MAKE(TC_H_CLSACT, 0)` and `TC_H_CLSACT`.
const CLSACT_HANDLE: u32 = 0xffff_0000;
const CLSACT_PARENT: u32 = 0xffff_fff1;

#[repr(C)]
struct TcMsg {
    family: u8,
    pad1: u8,
    pad2: u16,
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
}

#[repr(C)]
struct Request {
    header: libc::nlmsghdr,
    tc: TcMsg,
    attr_len: u16,
    attr_type: u16,
    kind: [u8; 8],
}

/// Adds clsact to `interface`. `Ok(true)`: added by us; `Ok(false)`: it was
/// there already (someone else's, to be left alone).
pub fn add_clsact(interface: &str) -> io::Result<bool> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => Ok(true),
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(io::Error::other(format!(
            "cannot add the clsact qdisc to {interface}: {e}"
        ))),
    }
}

/// Removes the clsact qdisc of `ifindex` (and the filters on it).
/// A vanished interface or qdisc is not an error.
pub fn remove_clsact(ifindex: u32) -> io::Result<()> {
    let fd = super::netlink::socket(libc::NETLINK_ROUTE)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut kind = [0u8; 8];
    kind[..6].copy_from_slice(b"clsact");
    let req = Request {
        header: libc::nlmsghdr {
            nlmsg_len: size_of::<Request>() as u32,
            nlmsg_type: RTM_DELQDISC,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        tc: TcMsg {
            family: libc::AF_UNSPEC as u8,
            pad1: 0,
            pad2: 0,
            ifindex: ifindex as i32,
            handle: CLSACT_HANDLE,
            parent: CLSACT_PARENT,
            info: 0,
        },
        // Header (4) + "clsact\0" (7); the padding byte is not counted.
        attr_len: 4 + 7,
        attr_type: TCA_KIND,
        kind,
    };
    // SAFETY: sending the bytes of a repr(C) request.
    let sent = unsafe {
        libc::send(
            raw,
            (&req as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: receiving into a local buffer.
    let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let hdr = size_of::<libc::nlmsghdr>();
    if n < hdr + 4 {
        return Err(io::Error::other("short netlink answer"));
    }
    let msg_type = u16::from_ne_bytes([buf[4], buf[5]]);
    if msg_type != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::other(format!(
            "unexpected netlink answer type {msg_type}"
        )));
    }
    let code = i32::from_ne_bytes([buf[hdr], buf[hdr + 1], buf[hdr + 2], buf[hdr + 3]]);
    match -code {
        0 | libc::ENODEV | libc::ENOENT | libc::EINVAL => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}
