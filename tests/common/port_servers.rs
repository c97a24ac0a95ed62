//! Backends that say which port they were reached on, for rules that
//! map many listen ports (ranges) onto many backend ports.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Netns;
use super::harness::{WAIT, spawn_in};

/// Backends on `ports` of the backend namespace: TCP answers with the
/// port it was reached on (two bytes) then echoes; UDP answers each
/// datagram with that port and the datagram.
pub struct PortServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PortServers {
    pub fn start(ns: &Netns, ports: &[u16]) -> PortServers {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for &port in ports {
            let (stop_t, ready) = (stop.clone(), ready_tx.clone());
            threads.push(spawn_in(ns, move || {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
                l.set_nonblocking(true).unwrap();
                ready.send(()).unwrap();
                let mut conns = Vec::new();
                while !stop_t.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => conns.push(std::thread::spawn(move || {
                            s.set_nonblocking(false).unwrap();
                            s.set_read_timeout(Some(WAIT)).unwrap();
                            let _ = s.write_all(&port.to_be_bytes());
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        })),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                drop(l);
                for c in conns {
                    let _ = c.join();
                }
            }));
            let (stop_u, ready) = (stop.clone(), ready_tx.clone());
            threads.push(spawn_in(ns, move || {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                ready.send(()).unwrap();
                let mut buf = [0u8; 2048];
                while !stop_u.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        let reply = [&port.to_be_bytes()[..], &buf[..n]].concat();
                        let _ = s.send_to(&reply, from);
                    }
                }
            }));
        }
        for _ in 0..threads.len() {
            ready_rx.recv_timeout(WAIT).expect("backend servers up");
        }
        PortServers { stop, threads }
    }
}

impl Drop for PortServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP connection to `to`: the port the backend says it was reached on,
/// and an echo through it.
pub fn tcp_port_of(to: SocketAddr) -> u16 {
    let mut s = TcpStream::connect_timeout(&to, WAIT).unwrap_or_else(|e| panic!("{to}: {e}"));
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut port = [0u8; 2];
    s.read_exact(&mut port).unwrap();
    s.write_all(b"ping").unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");
    u16::from_be_bytes(port)
}

/// One datagram to `to` from `socket`: the backend's port, and where the
/// reply came from.
pub fn udp_port_of(socket: &UdpSocket, to: SocketAddr, msg: &[u8]) -> (u16, SocketAddr) {
    socket.send_to(msg, to).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("reply from {to}: {e}"));
    assert_eq!(&buf[2..n], msg, "the reply carries the datagram");
    (u16::from_be_bytes([buf[0], buf[1]]), from)
}
