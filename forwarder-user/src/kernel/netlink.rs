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
