//! Whether an interface takes frames XDP redirects to it, as the kernel
//! says: the `netdev` generic netlink family's `xdp-features` of the
//! device (kernel ≥ 6.3). A veth advertises it only while its peer has
//! GRO on or an XDP program.

use std::io;

use super::netlink::{align4, attribute};
use std::os::fd::{AsRawFd, OwnedFd};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// `NETDEV_XDP_ACT_NDO_XMIT`: the device implements ndo_xdp_xmit now.
const XDP_ACT_NDO_XMIT: u64 = 1 << 2;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

/// A generic netlink socket that asks about devices of this namespace.
pub struct NetdevFamily {
    socket: OwnedFd,
    family: u16,
    seq: u32,
}

impl NetdevFamily {
    /// Opens the socket and resolves the family; an error where the kernel
    /// has no `netdev` family (before 6.3).
    pub fn open() -> io::Result<NetdevFamily> {
        let socket = super::netlink::socket(libc::NETLINK_GENERIC)?;
        let mut netdev = NetdevFamily {
            socket,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let answer = netdev.ask(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            CTRL_ATTR_FAMILY_NAME,
            b"netdev\0",
        )?;
        let id = attribute(&answer, CTRL_ATTR_FAMILY_ID)
            .filter(|v| v.len() >= 2)
            .ok_or_else(|| io::Error::other("no netdev family id in the answer"))?;
        netdev.family = u16::from_ne_bytes([id[0], id[1]]);
        Ok(netdev)
    }

    /// True if the device `ifindex` takes frames redirected by XDP.
    pub fn takes_xdp_redirects(&mut self, ifindex: u32) -> io::Result<bool> {
        let answer = self.ask(
            self.family,
            NETDEV_CMD_DEV_GET,
            NETDEV_A_DEV_IFINDEX,
            &ifindex.to_ne_bytes(),
        )?;
        let features = attribute(&answer, NETDEV_A_DEV_XDP_FEATURES)
            .filter(|v| v.len() >= 8)
            .ok_or_else(|| io::Error::other("no xdp-features in the answer"))?;
        let features = u64::from_ne_bytes(features[..8].try_into().expect("8 bytes"));
        Ok(features & XDP_ACT_NDO_XMIT != 0)
    }

    /// Sends one request with one attribute; returns the answer's
    /// attributes (after the netlink and genetlink headers).
    fn ask(&mut self, family: u16, cmd: u8, attr: u16, value: &[u8]) -> io::Result<Vec<u8>> {
        self.seq = self.seq.wrapping_add(1);
        let attr_len = 4 + value.len();
        let len = NLMSG_HDRLEN + GENL_HDRLEN + align4(attr_len);
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&(len as u32).to_ne_bytes());
        req.extend_from_slice(&family.to_ne_bytes());
        req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(&[cmd, 1, 0, 0]);
        req.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        req.extend_from_slice(&attr.to_ne_bytes());
        req.extend_from_slice(value);
        req.resize(len, 0);
        let fd = self.socket.as_raw_fd();
        // SAFETY: sending a local buffer.
        if unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: receiving into a local buffer.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let msg = &buf[..n as usize];
            if msg.len() < NLMSG_HDRLEN {
                return Err(io::Error::other("short netlink answer"));
            }
            let seq = u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes"));
            if seq != self.seq {
                continue; // an answer to an earlier, abandoned request
            }
            let msg_type = u16::from_ne_bytes([msg[4], msg[5]]);
            if msg_type == libc::NLMSG_ERROR as u16 {
                let code = msg
                    .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                    .map(|c| i32::from_ne_bytes(c.try_into().expect("4 bytes")))
                    .unwrap_or(-libc::EIO);
                return Err(io::Error::from_raw_os_error(-code));
            }
            let total =
                (u32::from_ne_bytes(msg[..4].try_into().expect("4 bytes")) as usize).min(msg.len());
            return Ok(msg
                .get(NLMSG_HDRLEN + GENL_HDRLEN..total)
                .unwrap_or_default()
                .to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_found_past_padding() {
        let mut attrs = Vec::new();
        // kind 2, a 7-byte value padded to 8; then kind 3, 8 bytes.
        attrs.extend_from_slice(&11u16.to_ne_bytes());
        attrs.extend_from_slice(&2u16.to_ne_bytes());
        attrs.extend_from_slice(b"netdev\0\0");
        attrs.extend_from_slice(&12u16.to_ne_bytes());
        attrs.extend_from_slice(&3u16.to_ne_bytes());
        attrs.extend_from_slice(&7u64.to_ne_bytes());
        assert_eq!(attribute(&attrs, 2), Some(&b"netdev\0"[..]));
        assert_eq!(attribute(&attrs, 3), Some(&7u64.to_ne_bytes()[..]));
        assert_eq!(attribute(&attrs, 9), None);
        assert_eq!(attribute(&attrs[..6], 3), None, "truncated");
    }

    #[test]
    fn loopback_takes_no_xdp_redirects() {
        // Every kernel these tests run on has the family (6.3+).
        let mut netdev = NetdevFamily::open().expect("the netdev family");
        assert!(!netdev.takes_xdp_redirects(1).expect("lo"));
        assert!(
            netdev.takes_xdp_redirects(u32::MAX).is_err(),
            "no such device"
        );
    }
}
