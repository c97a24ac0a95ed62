//! Creating the relay's sockets: listeners (dual-stack for `[::]`) and the
//! connected upstream socket of a UDP session.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use super::sys;

/// Pending connections a TCP listener queues (the kernel caps it at somaxconn).
const BACKLOG: i32 = 4096;

/// Socket buffers of a UDP listener: room for bursts of many clients.
const UDP_LISTENER_BUFFER: usize = 4 << 20;

fn new_socket(addr: SocketAddr, kind: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        kind.nonblocking().cloexec(),
        Some(protocol),
    )?;
    if addr.is_ipv6() {
        // `[::]` means every address, IPv4 included.
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

pub fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    // Replies must leave from the address each client sent to.
    sys::enable_packet_info(socket.as_raw_fd(), addr.is_ipv6())?;
    if sys::force_buffer_sizes(socket.as_raw_fd(), UDP_LISTENER_BUFFER).is_err() {
        // Not root: as much as net.core.{r,w}mem_max allow.
        let _ = socket.set_recv_buffer_size(UDP_LISTENER_BUFFER);
        let _ = socket.set_send_buffer_size(UDP_LISTENER_BUFFER);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The one UDP socket of a port range: every port of the range is steered
/// to it, and each datagram says which one it was sent to
/// (`IP_RECVORIGDSTADDR`). `SO_REUSEADDR` lets the sessions' client-facing
/// sockets bind its port too, and a returning rule bind beside its
/// retiring predecessor.
pub fn bind_udp_range(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    socket.set_reuse_address(true)?;
    sys::enable_packet_info(socket.as_raw_fd(), addr.is_ipv6())?;
    sys::enable_original_destination(socket.as_raw_fd(), addr.is_ipv6())?;
    if sys::force_buffer_sizes(socket.as_raw_fd(), UDP_LISTENER_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(UDP_LISTENER_BUFFER);
        let _ = socket.set_send_buffer_size(UDP_LISTENER_BUFFER);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A range session's socket toward its client: bound to the address and
/// port the client sent to and connected to the client, so that replies
/// leave from that port, and the client's next datagrams come here (the
/// kernel finds a connected socket before socket lookup steers).
pub fn client_udp(local: SocketAddr, client: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(local),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&local.into())?;
    socket.connect(&client.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// A UDP socket connected to `backend`, on an ephemeral port of its own.
pub fn connect_udp(backend: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let socket = new_socket(backend, Type::DGRAM, Protocol::UDP)?;
    socket.connect(&backend.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}
