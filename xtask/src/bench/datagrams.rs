//! What the bench's UDP figures share: threads in a namespace, big socket
//! buffers, batched send and receive (one syscall per batch, so that the
//! bench's own threads are not what drops datagrams on two cores), and an
//! echo server that counts what reached it.
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::netns::Netns;

/// Datagrams per `recvmmsg` / `sendmmsg`.
pub const BATCH: usize = 64;
/// Bytes of one datagram's buffer: the bench sends small ones.
const SIZE: usize = 64;

/// Runs `f` on a thread in `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<Result<T>> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        // SAFETY: setns on this thread only, with a namespace descriptor.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        Ok(f())
    })
}

/// 64 MiB each way, past `rmem_max` (root): about 0.6 s of a 100k/s
/// stream of small datagrams, so that a reload or an upgrade taking both
/// cores for a moment does not overflow the bench's own sockets.
pub fn big_buffers(socket: &UdpSocket) {
    let size: libc::c_int = 64 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: a valid socket and an int option.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// Runs this thread at a real-time priority (root), ahead of the daemon
/// under test, so that what the bench counts as lost is the forwarder's
/// and not its own threads waiting for a core. They block in `recvmmsg`
/// between batches, so they never hold a core for long.
pub fn ahead_of_the_daemon() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: this thread only, with a valid parameter.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
}

/// Buffers for one batch of datagrams, received or sent.
pub struct Batch {
    bufs: Box<[[u8; SIZE]; BATCH]>,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_in; BATCH],
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            bufs: Box::new([[0; SIZE]; BATCH]),
            lens: [0; BATCH],
            // SAFETY: sockaddr_in is plain data.
            addrs: unsafe { zeroed() },
        }
    }
}

impl Batch {
    /// Receives up to [`BATCH`] datagrams (blocking for the first, up to
    /// the socket's read timeout); returns how many, 0 on a timeout.
    pub fn recv(&mut self, socket: &UdpSocket) -> usize {
        let mut iovs = self.iovs(BATCH, |_| SIZE);
        // SAFETY: mmsghdr is plain data.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for ((m, iov), addr) in msgs.iter_mut().zip(&mut iovs).zip(&mut self.addrs) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (addr as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
        }
        // SAFETY: every pointer in `msgs` is live for the call.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let n = n.max(0) as usize;
        for (len, m) in self.lens.iter_mut().zip(&msgs[..n]) {
            *len = m.msg_len as usize;
        }
        n
    }

    /// The `i`th datagram received.
    pub fn get(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    /// Sets the `i`th datagram to send.
    pub fn set(&mut self, i: usize, payload: &[u8]) {
        self.bufs[i][..payload.len()].copy_from_slice(payload);
        self.lens[i] = payload.len();
    }

    /// Sends the first `n` datagrams, each back to the address it came
    /// from (`to_senders`) or on the connected socket; returns how many
    /// went.
    pub fn send(&mut self, socket: &UdpSocket, n: usize, to_senders: bool) -> usize {
        let lens = self.lens;
        let mut iovs = self.iovs(n, |i| lens[i]);
        // SAFETY: mmsghdr is plain data.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for ((m, iov), addr) in msgs.iter_mut().zip(&mut iovs).zip(&mut self.addrs) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            if to_senders {
                m.msg_hdr.msg_name = (addr as *mut libc::sockaddr_in).cast();
                m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            }
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: every pointer in `msgs` is live for the call.
            let r = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    msgs[sent..].as_mut_ptr(),
                    (n - sent) as u32,
                    0,
                )
            };
            if r <= 0 {
                break;
            }
            sent += r as usize;
        }
        sent
    }

    fn iovs(&mut self, n: usize, len: impl Fn(usize) -> usize) -> Vec<libc::iovec> {
        self.bufs
            .iter_mut()
            .take(n)
            .enumerate()
            .map(|(i, b)| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: len(i),
            })
            .collect()
    }
}

/// A UDP echo server on `port` in `ns` until `stop`; `reached` counts the
/// datagrams that reached it.
pub fn echo_server(
    ns: &Netns,
    port: u16,
    stop: Arc<AtomicBool>,
    reached: Arc<AtomicU64>,
) -> JoinHandle<Result<Result<()>>> {
    spawn_in(ns, move || -> Result<()> {
        ahead_of_the_daemon();
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
        big_buffers(&s);
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut batch = Batch::default();
        while !stop.load(Ordering::Relaxed) {
            let n = batch.recv(&s);
            reached.fetch_add(n as u64, Ordering::Relaxed);
            batch.send(&s, n, true);
        }
        Ok(())
    })
}

/// `Udp: … RcvbufErrors` of `/proc/net/snmp` in `ns`: datagrams a full
/// socket buffer dropped there.
pub fn rcvbuf_errors(ns: &Netns) -> Result<u64> {
    let snmp = spawn_in(ns, || std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .join()
        .map_err(|_| anyhow::anyhow!("the snmp thread panicked"))???;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        bail!("no Udp lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .context("no RcvbufErrors in /proc/net/snmp")?
        .1
        .parse()
        .context("RcvbufErrors")
}
