//! The new image's side of an upgrade: the descriptors the record names
//! become the listeners, pairs and sessions they were.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::gate::{ListenerRecord, RelayRecord, RetiringRecord, TcpPairRecord, UdpSessionRecord};
use super::splice::Pipe;
use super::tcp::{Pipes, ResumedPair};
use super::udp::ResumedSession;
use super::{Adopted, Bound};
use crate::rules::Listener;

/// What the previous image handed over and no listener has claimed yet.
#[derive(Default)]
pub struct Inherited {
    listeners: Vec<ListenerRecord>,
    tcp: Vec<TcpPairRecord>,
    udp: Vec<UdpSessionRecord>,
    retiring: Vec<RetiringRecord>,
}

/// A rule a reload removed, as its handed-over flows drain in this image:
/// the rule as they need it, its UDP socket (a TCP one was closed), its flows.
pub(super) struct Retiring {
    pub(super) listener: Listener,
    pub(super) socket: Option<Bound>,
    pub(super) adopted: Adopted,
}

/// Takes ownership of an inherited descriptor, which must be open; it
/// is close-on-exec again from here on.
pub fn own(fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only inspects the descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if fd < 3 || flags < 0 {
        return Err(io::Error::other(format!(
            "descriptor {fd} of the handover record is not open"
        )));
    }
    // SAFETY: the record hands each descriptor to exactly one owner.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: open (checked above) and owned by nobody else in this image.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn own_pipe(fds: Option<(i32, i32)>) -> io::Result<Option<Pipe>> {
    fds.map(|(r, w)| Pipe::adopt(own(r)?, own(w)?)).transpose()
}

impl Inherited {
    pub fn take(record: RelayRecord) -> Inherited {
        Inherited {
            listeners: record.listeners,
            tcp: record.tcp,
            udp: record.udp,
            retiring: record.retiring,
        }
    }

    /// The rules a reload removed before the upgrade, with their sockets
    /// and flows; after every running rule took its own.
    pub(super) fn retiring(&mut self) -> Result<Vec<Retiring>> {
        let mut all = Vec::new();
        for r in std::mem::take(&mut self.retiring) {
            let protocol = match r.protocol.as_str() {
                "tcp" => crate::rules::Protocol::Tcp,
                "udp" => crate::rules::Protocol::Udp,
                other => anyhow::bail!("{}: protocol {other:?} in the handover record", r.alias),
            };
            let [
                udp_idle,
                udp_unreplied,
                tcp_established,
                tcp_half_closed,
                tcp_close,
                connect,
            ] = r.timeouts_ms.map(std::time::Duration::from_millis);
            let listener = Listener {
                // Not in this image's tables, which never see it.
                rule_id: u32::MAX,
                alias: r.alias.clone(),
                protocol,
                bind: r.bind,
                listen_picked: false,
                ports: crate::rules::ListenPorts {
                    count: r.port_count,
                    target: match r.many_to_one {
                        true => crate::rules::TargetPorts::Same,
                        false => crate::rules::TargetPorts::Shifted,
                    },
                },
                backends: (r.backends.iter())
                    .map(|&(addr, weight)| crate::rules::BackendSpec { addr, weight })
                    .collect(),
                timeouts: crate::rules::Timeouts {
                    udp_idle,
                    udp_unreplied,
                    tcp_established,
                    tcp_half_closed,
                    tcp_close,
                    connect,
                },
                path: crate::rules::PathMode::Relay,
                preserve_client_ip: false,
                proxy: Default::default(),
                health: None,
                acl: None,
                max_connections: None,
            };
            let claimed = match protocol {
                crate::rules::Protocol::Udp => self.listener(&listener)?,
                crate::rules::Protocol::Tcp => None,
            };
            let (socket, mut adopted) = match claimed {
                Some((socket, adopted)) => (Some(socket), adopted),
                None => {
                    let mut adopted = Adopted::default();
                    for pair in extract(&mut self.tcp, |p| p.bind == r.bind) {
                        adopted.tcp.push(
                            resumed_pair(pair)
                                .with_context(|| format!("{}: a tcp pair handed over", r.alias))?,
                        );
                    }
                    (None, adopted)
                }
            };
            if socket.is_none() || adopted.counters.is_none() {
                adopted.counters = Some(r.counters.clone());
            }
            info!(
                alias = %r.alias,
                "relay: {} {} was removed by a reload; its {} tcp pairs and {} udp sessions drain here",
                r.protocol,
                r.bind,
                adopted.tcp.len(),
                adopted.udp.len()
            );
            all.push(Retiring {
                listener,
                socket,
                adopted,
            });
        }
        Ok(all)
    }

    /// The socket and flows of `l`'s listener, if it was handed over.
    pub fn listener(&mut self, l: &Listener) -> Result<Option<(Bound, Adopted)>> {
        let Some(at) = self
            .listeners
            .iter()
            .position(|r| r.protocol == l.protocol.as_str() && r.bind == l.bind)
        else {
            return Ok(None);
        };
        let record = self.listeners.swap_remove(at);
        let what = || {
            format!(
                "{}: the {} {} socket handed over",
                l.alias, l.protocol, l.bind
            )
        };
        let fd = own(record.fd).with_context(what)?;
        let mut adopted = Adopted {
            counters: Some(record.counters),
            ..Adopted::default()
        };
        let socket = match l.protocol {
            crate::rules::Protocol::Tcp => {
                // Not a removed rule's that listened here: see `retiring`.
                for pair in extract(&mut self.tcp, |p| p.bind == l.bind && !p.retiring) {
                    adopted.tcp.push(resumed_pair(pair).with_context(what)?);
                }
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)?;
                Bound::Tcp(tokio::net::TcpListener::from_std(std)?)
            }
            crate::rules::Protocol::Udp => {
                let udp = |fd: i32| -> io::Result<tokio::net::UdpSocket> {
                    let std = std::net::UdpSocket::from(own(fd)?);
                    std.set_nonblocking(true)?;
                    tokio::net::UdpSocket::from_std(std)
                };
                for session in extract(&mut self.udp, |s| s.bind == l.bind) {
                    adopted.udp.push(ResumedSession {
                        upstream: udp(session.upstream_fd).with_context(what)?,
                        toward_client: session
                            .toward_client_fd
                            .map(udp)
                            .transpose()
                            .with_context(what)?,
                        record: session,
                    });
                }
                let std = std::net::UdpSocket::from(fd);
                std.set_nonblocking(true)?;
                Bound::Udp(tokio::net::UdpSocket::from_std(std)?)
            }
        };
        info!(
            alias = %l.alias,
            "relay: took over {} {} from the previous image with {} tcp pairs and {} udp sessions",
            l.protocol,
            l.bind,
            adopted.tcp.len(),
            adopted.udp.len()
        );
        Ok(Some((socket, adopted)))
    }

    /// Closes what no listener of the new rules claimed, saying so.
    pub fn close_unclaimed(self) {
        let flows = self.tcp.len() + self.udp.len();
        if self.listeners.is_empty() && flows == 0 {
            return;
        }
        let fds = RelayRecord {
            listeners: self.listeners,
            tcp: self.tcp,
            udp: self.udp,
            retiring: Vec::new(),
        }
        .fds();
        warn!(
            "the new rules have no listener for {} handed-over descriptors ({flows} flows); closed",
            fds.len()
        );
        for fd in fds {
            drop(own(fd));
        }
    }
}

fn extract<T>(all: &mut Vec<T>, mut wanted: impl FnMut(&T) -> bool) -> Vec<T> {
    let (taken, kept) = std::mem::take(all).into_iter().partition(|t| wanted(t));
    *all = kept;
    taken
}

fn resumed_pair(record: TcpPairRecord) -> io::Result<ResumedPair> {
    let stream = |fd: i32| -> io::Result<tokio::net::TcpStream> {
        let std = std::net::TcpStream::from(own(fd)?);
        std.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(std)
    };
    Ok(ResumedPair {
        client: stream(record.client_fd)?,
        backend: stream(record.backend_fd)?,
        pipes: Pipes {
            up: own_pipe(record.up_pipe)?,
            down: own_pipe(record.down_pipe)?,
        },
        record,
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::time::Duration;

    use super::*;
    use crate::relay::Relay;
    use crate::rules::{BackendSpec, NoKernelPath, PathMode, Protocol, RelaySettings, Timeouts};

    fn dup(fd: i32) -> i32 {
        // SAFETY: duplicates a descriptor the relay holds.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        assert!(new >= 3, "dup {fd}: {}", io::Error::last_os_error());
        new
    }

    /// What an exec would leave the new image: the same open files under
    /// descriptors the old image's tasks no longer use.
    fn duplicated(mut record: RelayRecord) -> RelayRecord {
        let pipe = |p: Option<(i32, i32)>| p.map(|(r, w)| (dup(r), dup(w)));
        for l in &mut record.listeners {
            l.fd = dup(l.fd);
        }
        for p in &mut record.tcp {
            (p.client_fd, p.backend_fd) = (dup(p.client_fd), dup(p.backend_fd));
            (p.up_pipe, p.down_pipe) = (pipe(p.up_pipe), pipe(p.down_pipe));
        }
        record
    }

    fn pattern(i: usize) -> u8 {
        (i * 7 + i / 251) as u8
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frozen_pair_goes_on_in_a_new_relay_with_the_bytes_in_its_pipe() {
        const SIZE: usize = 16 << 20;
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let go = Arc::new(AtomicBool::new(false));
        let reader = {
            let go = go.clone();
            std::thread::spawn(move || {
                let (mut conn, _) = backend.accept().unwrap();
                // Nothing is read until the handover is done: bytes pile
                // up in the socket buffers and the relay's pipe.
                while !go.load(Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let mut got = Vec::new();
                conn.read_to_end(&mut got).unwrap();
                conn.write_all(b"all read").unwrap();
                got
            })
        };
        let listener = Listener {
            rule_id: 0,
            alias: "handover".into(),
            protocol: Protocol::Tcp,
            bind: "127.0.0.1:0".parse().unwrap(),
            backends: vec![BackendSpec {
                addr: backend_addr,
                weight: 1,
            }],
            timeouts: Timeouts::default(),
            path: PathMode::Relay,
            preserve_client_ip: false,
            acl: None,
            proxy: Default::default(),
            listen_picked: false,
            ports: crate::rules::ListenPorts::SINGLE,
            health: None,
            max_connections: None,
        };
        let settings = RelaySettings::default();
        let old = Relay::start(
            std::slice::from_ref(&listener),
            settings,
            Arc::new(NoKernelPath),
        )
        .await
        .unwrap();
        let at = old.local_addrs()[0].1;
        let client = std::thread::spawn(move || {
            let mut conn = std::net::TcpStream::connect(at).unwrap();
            let data: Vec<u8> = (0..SIZE).map(pattern).collect();
            conn.write_all(&data).unwrap();
            conn.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = Vec::new();
            conn.read_to_end(&mut answer).unwrap();
            answer
        });
        // Wait until the relay is stuck with bytes it took from the client.
        let moved = || old.counters()[0].bytes_to_backend;
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = moved();
            if now > 0 && now == last {
                break;
            }
            last = now;
        }
        let record = old.freeze(Duration::from_secs(5)).await.unwrap();
        assert_eq!(record.listeners.len(), 1);
        assert_eq!(record.tcp.len(), 1, "{record:?}");
        let pair = &record.tcp[0];
        assert!(!pair.up_done && !pair.down_done);
        let (up_read, _) = pair.up_pipe.expect("a splice pipe");
        let in_flight = super::super::sys::pipe_bytes(up_read).unwrap();
        assert!(in_flight > 0, "bytes in the pipe at the handover");
        assert_eq!(record.listeners[0].counters.bytes_to_backend, last);

        let new = Relay::start_inheriting(
            &[listener],
            settings,
            Arc::new(NoKernelPath),
            Some(duplicated(record)),
        )
        .await
        .unwrap();
        // The old relay stays parked, as it would be gone after an exec.
        assert_eq!(new.local_addrs()[0].1, at, "the same listening socket");
        // Counted as active once its task runs, not as a new flow.
        for _ in 0..500 {
            if new.counters()[0].active == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(new.counters()[0].active, 1);
        go.store(true, Relaxed);
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert_eq!(got.len(), SIZE);
        assert!(
            got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
            "intact"
        );
        let answer = tokio::task::spawn_blocking(move || client.join().unwrap())
            .await
            .unwrap();
        assert_eq!(answer, b"all read", "the other direction goes on too");
        let counters = new.counters();
        assert_eq!(
            counters[0].bytes_to_backend, SIZE as u64,
            "counted once, carried on"
        );
        assert_eq!(counters[0].flows, 1);
    }
}
