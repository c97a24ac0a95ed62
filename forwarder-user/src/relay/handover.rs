//! The new image's side of an upgrade: the descriptors the record names
//! become the listeners, pairs and sessions they were.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::gate::{ListenerRecord, RelayRecord, TcpPairRecord, UdpSessionRecord};
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
        }
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
                for pair in extract(&mut self.tcp, |p| p.bind == l.bind) {
                    adopted.tcp.push(resumed_pair(pair).with_context(what)?);
                }
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)?;
                Bound::Tcp(tokio::net::TcpListener::from_std(std)?)
            }
            crate::rules::Protocol::Udp => {
                for session in extract(&mut self.udp, |s| s.bind == l.bind) {
                    let upstream = std::net::UdpSocket::from(own(session.upstream_fd)?);
                    upstream.set_nonblocking(true)?;
                    adopted.udp.push(ResumedSession {
                        record: session,
                        upstream: tokio::net::UdpSocket::from_std(upstream)?,
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
