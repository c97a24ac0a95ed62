//! Checking checksums as packets really travel: switching veth checksum
//! offloads off (so receivers verify in software), capturing with
//! AF_PACKET (which says when a checksum is left to offload), and the
//! kernel's own checksum error counters.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::common::Netns;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_SRXCSUM: u32 = 0x15;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_SGSO: u32 = 0x24;
const ETHTOOL_SGRO: u32 = 0x2c;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IF_NAMESIZE],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

fn socket(domain: i32, ty: i32, proto: i32) -> OwnedFd {
    // SAFETY: plain socket call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Turns checksum offloads, TSO, GSO and GRO off on `interface` (in the
/// calling thread's namespace): every packet then carries a full checksum
/// and the receiving stack verifies it.
pub fn offloads_off(interface: &str) {
    let s = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    for cmd in [
        ETHTOOL_STSO,
        ETHTOOL_SGSO,
        ETHTOOL_SGRO,
        ETHTOOL_STXCSUM,
        ETHTOOL_SRXCSUM,
    ] {
        let mut value = EthtoolValue { cmd, data: 0 };
        let mut req = IfreqData {
            name: [0; libc::IF_NAMESIZE],
            data: (&mut value as *mut EthtoolValue).cast(),
            _pad: [0; 16],
        };
        for (d, c) in req.name.iter_mut().zip(interface.bytes()) {
            *d = c as libc::c_char;
        }
        // SAFETY: SIOCETHTOOL with an ifreq pointing at a live ethtool_value.
        let rc = unsafe { libc::ioctl(s.as_raw_fd(), SIOCETHTOOL, &mut req) };
        assert_eq!(
            rc,
            0,
            "ethtool {cmd:#x} off on {interface}: {}",
            io::Error::last_os_error()
        );
    }
}

/// `InCsumErrors` of TCP and UDP in `ns` (from /proc/net/snmp).
pub fn csum_errors(ns: &Netns) -> (u64, u64) {
    let out = ns.exec("cat", &["/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |proto: &str| -> u64 {
        let mut lines = text.lines().filter(|l| l.starts_with(&format!("{proto}:")));
        let names: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let values: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let i = names.iter().position(|n| *n == "InCsumErrors").unwrap();
        values[i].parse().unwrap()
    };
    (field("Tcp"), field("Udp"))
}

const PACKET_AUXDATA: i32 = 8;
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct TpacketAuxdata {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}

/// A captured frame and whether its L4 checksum was left to offload
/// (CHECKSUM_PARTIAL: the field holds the pseudo-header sum only).
pub struct Captured {
    pub frame: Vec<u8>,
    pub partial: bool,
}

/// An AF_PACKET socket on one interface, in the calling thread's namespace.
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    pub fn open(interface: &str) -> Capture {
        let fd = socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        );
        let name = std::ffi::CString::new(interface).unwrap();
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "{interface}");
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        let one: i32 = 1;
        let size: i32 = 32 << 20;
        // SAFETY: binding and setting options with live values of the sizes given.
        unsafe {
            assert_eq!(
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ),
                0
            );
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_AUXDATA,
                (&one as *const i32).cast(),
                4,
            );
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const i32).cast(),
                4,
            );
        }
        Capture { fd }
    }

    /// Everything received so far (incoming frames only).
    pub fn drain(&self) -> Vec<Captured> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        loop {
            let mut cmsg = [0u64; 16];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cmsg);
            // SAFETY: recvmsg into the live buffers described by `msg`.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
            if n < 0 {
                break;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let mut aux = TpacketAuxdata::default();
            // SAFETY: walking the control messages recvmsg filled in.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                        aux = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            out.push(Captured {
                frame: buf[..n as usize].to_vec(),
                partial: aux.tp_status & TP_STATUS_CSUMNOTREADY != 0,
            });
        }
        out
    }
}

fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Checks an Ethernet/IPv4 TCP or UDP frame: the IPv4 header checksum,
/// and the L4 checksum (full, or pseudo-header only when `partial`).
/// `None` for frames that are not IPv4 TCP/UDP; `Some(Err(why))` when wrong.
pub fn check(c: &Captured) -> Option<Result<(), String>> {
    let p = &c.frame;
    if p.len() < 34 || p[12..14] != [0x08, 0x00] {
        return None;
    }
    let ihl = usize::from(p[14] & 0x0f) * 4;
    let proto = p[23];
    if proto != 6 && proto != 17 {
        return None;
    }
    if fold(sum(&p[14..14 + ihl])) != 0xffff {
        return Some(Err("IPv4 header checksum".into()));
    }
    let total = usize::from(u16::from_be_bytes([p[16], p[17]]));
    let l4 = &p[14 + ihl..14 + total];
    let pseudo = sum(&p[26..34]) + u32::from(proto) + l4.len() as u32;
    let field_at = if proto == 6 { 16 } else { 6 };
    let field = u16::from_be_bytes([l4[field_at], l4[field_at + 1]]);
    if proto == 17 && field == 0 {
        return Some(Ok(()));
    }
    let ok = if c.partial {
        field == fold(pseudo)
    } else {
        fold(pseudo + sum(l4)) == 0xffff
    };
    Some(if ok {
        Ok(())
    } else {
        Err(format!(
            "L4 checksum {field:#06x} wrong (partial: {}, proto {proto}, len {})",
            c.partial,
            l4.len()
        ))
    })
}
