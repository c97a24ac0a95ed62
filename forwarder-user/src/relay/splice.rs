//! One direction of a TCP flow with `splice(2)`: socket -> pipe -> socket,
//! the payload never copied through userspace.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::counters::RuleCounters;
use super::gate::Gate;
use super::idle::{IdleClock, Millis};
use super::sys;

/// Below this (an unprivileged user far over `fs.pipe-user-pages-soft` gets
/// pipes of two pages), splice would move a few KiB per call: the buffered
/// copy does better then.
const MIN_PIPE_SIZE: usize = 64 << 10;

pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    size: usize,
}

impl Pipe {
    /// A pipe of `size` bytes (`relay.pipe_size`); the kernel may grant
    /// less (an unprivileged user over `fs.pipe-user-pages-soft` keeps the
    /// default).
    pub fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = sys::pipe()?;
        let size = match sys::set_pipe_size(&write, size) {
            Ok(size) => size,
            Err(_) => sys::pipe_size(&write)?,
        };
        if size < MIN_PIPE_SIZE {
            return Err(io::Error::other(format!(
                "the kernel grants pipes of {size} bytes only (fs.pipe-user-pages-soft)"
            )));
        }
        Ok(Pipe { read, write, size })
    }

    /// A pipe handed over by an upgrade, with the bytes still in it.
    pub fn adopt(read: OwnedFd, write: OwnedFd) -> io::Result<Pipe> {
        let size = sys::pipe_size(&write)?;
        Ok(Pipe { read, write, size })
    }
}

/// How a splice direction ended.
pub enum SpliceEnd {
    /// The source sent FIN; everything before it was delivered.
    Eof,
    /// The kernel refused splice for these sockets. `pending` holds what was
    /// already taken out of the source and not yet delivered.
    Refused { pending: Vec<u8> },
}

/// Errors that mean "splice does not work here", not "the flow failed".
fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// Moves `src`'s bytes to `dst` until `src` sends FIN. Each round fills
/// the empty pipe with one splice (so EAGAIN means the socket is empty, not
/// the pipe full) and then drains it completely into `dst`. Bytes already
/// in the pipe (handed over by an upgrade) go first. While the gate is
/// closed it parks at its awaits: whatever is in flight is in the pipe.
pub async fn splice_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    moved: &AtomicU64,
    clock: &IdleClock,
    gate: &Gate,
) -> io::Result<SpliceEnd> {
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let (pipe_in, pipe_out) = (pipe.write.as_raw_fd(), pipe.read.as_raw_fd());
    let mut left = sys::pipe_bytes(pipe_out)?;
    loop {
        // Only bytes moved count as traffic (the first-byte timeout reads it).
        let draining = left > 0;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || sys::splice(pipe_out, dst_fd, left)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    left -= n;
                    RuleCounters::add(moved, n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tokio::select! {
                    ready = dst.writable() => ready?,
                    () = gate.closing() => gate.park().await,
                },
                Err(e) if is_refusal(&e) => {
                    return Ok(SpliceEnd::Refused {
                        pending: empty_pipe(pipe, left)?,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        if draining {
            clock.touch(Millis::now());
        }
        tokio::select! {
            ready = src.readable() => ready?,
            () = gate.closing() => {
                gate.park().await;
                continue;
            }
        }
        left = match src.try_io(Interest::READABLE, || {
            sys::splice(src_fd, pipe_in, pipe.size)
        }) {
            Ok(0) => return Ok(SpliceEnd::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if is_refusal(&e) => {
                return Ok(SpliceEnd::Refused {
                    pending: Vec::new(),
                });
            }
            Err(e) => return Err(e),
        };
        clock.touch(Millis::now());
    }
}

/// Reads the `left` bytes still in the pipe, for the buffered copy to send.
fn empty_pipe(pipe: &Pipe, left: usize) -> io::Result<Vec<u8>> {
    let mut pending = vec![0; left];
    let mut got = 0;
    while got < left {
        match sys::read(pipe.read.as_raw_fd(), &mut pending[got..])? {
            0 => break,
            n => got += n,
        }
    }
    pending.truncate(got);
    Ok(pending)
}
