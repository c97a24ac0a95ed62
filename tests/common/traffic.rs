//! The backend's servers and the client's side of the traffic.
//!
//! Backend on port 3478: TCP `E` echoes until EOF, TCP `H` reads a length
//! and that many bytes and answers their SHA-256; UDP echoes datagrams.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::harness::{WAIT, spawn_in};
use crate::common::Netns;

pub const BACKEND_PORT: u16 = 3478;

pub struct BackendServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServers {
    pub fn start(ns: &Netns) -> BackendServers {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let tcp = {
            let stop = stop.clone();
            let ready = ready_tx.clone();
            spawn_in(ns, move || {
                let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).unwrap();
                listener.set_nonblocking(true).unwrap();
                ready.send(()).unwrap();
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            conns.push(std::thread::spawn(move || {
                                let _ = serve_tcp(stream);
                            }));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
                drop(listener);
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        let udp = {
            let stop = stop.clone();
            spawn_in(ns, move || {
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
        };
        for _ in 0..2 {
            ready_rx.recv_timeout(WAIT).expect("backend servers up");
        }
        BackendServers {
            stop,
            threads: vec![tcp, udp],
        }
    }
}

impl Drop for BackendServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(WAIT))?;
    let mut cmd = [0u8; 1];
    stream.read_exact(&mut cmd)?;
    match cmd[0] {
        b'E' => {
            let mut buf = vec![0u8; 65536];
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                stream.write_all(&buf[..n])?;
            }
        }
        b'H' => {
            let mut len = [0u8; 8];
            stream.read_exact(&mut len)?;
            let mut left = u64::from_be_bytes(len);
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            while left > 0 {
                let want = buf.len().min(left as usize);
                let n = stream.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                hash.update(&buf[..n]);
                left -= n as u64;
            }
            stream.write_all(&hash.finalize())
        }
        _ => Ok(()),
    }
}

/// Deterministic, incompressible-looking bytes.
pub fn fill(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let bytes = seed.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

pub fn connect(to: SocketAddr) -> TcpStream {
    let stream =
        TcpStream::connect_timeout(&to, WAIT).unwrap_or_else(|e| panic!("connect to {to}: {e}"));
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream
}

/// Sends `size` bytes through `to` and returns (what was sent, what the
/// backend received) as SHA-256 digests.
pub fn tcp_hash_transfer(to: SocketAddr, size: u64) -> ([u8; 32], [u8; 32]) {
    let mut stream = connect(to);
    stream.write_all(b"H").unwrap();
    stream.write_all(&size.to_be_bytes()).unwrap();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut left = size;
    while left > 0 {
        let n = buf.len().min(left as usize);
        fill(&mut buf[..n], &mut seed);
        hash.update(&buf[..n]);
        stream.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    let mut got = [0u8; 32];
    stream.read_exact(&mut got).expect("the backend's digest");
    (hash.finalize().into(), got)
}

/// One echo round trip on an open `E` connection.
pub fn tcp_echo_round(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).expect("echo");
    assert_eq!(back, msg);
}

/// Opens an echo connection.
pub fn tcp_echo_conn(to: SocketAddr) -> TcpStream {
    let mut stream = connect(to);
    stream.write_all(b"E").unwrap();
    stream
}

/// A UDP socket for talking to `to`.
pub fn udp_socket(to: SocketAddr) -> UdpSocket {
    udp_socket_from(0, to)
}

/// A UDP socket on local port `port` (0: any) for talking to `to`.
pub fn udp_socket_from(port: u16, to: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
    socket.connect(to).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    socket
}

/// Sends `msg` once and waits for its echo, which must be the next
/// datagram to arrive: no resend, so counters can be exact and a lost or
/// crossed datagram fails the test.
pub fn udp_echo(socket: &UdpSocket, msg: &[u8]) {
    let mut buf = vec![0u8; msg.len() + 1];
    socket.send(msg).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                assert!(
                    &buf[..n] == msg,
                    "udp echo via {:?}: got {n} bytes that are not the {} sent",
                    socket.peer_addr(),
                    msg.len()
                );
                return;
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no UDP echo via {:?} in {WAIT:?}",
                    socket.peer_addr()
                );
            }
            Err(e) => panic!("udp echo via {:?}: {e}", socket.peer_addr()),
        }
    }
}
