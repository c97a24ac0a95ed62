//! New TCP connections per second, end to end: each connection is opened
//! from the client, answered by the backend with one byte and closed by it;
//! the client reads that byte and the close, then closes too. Through a
//! proxy that counts both of the proxy's connections. Bounded by a count
//! and by time.
//!
//! Both ends are threads of xtask that enter a namespace with setns(2):
//! the network namespace is per thread, so nothing else moves.
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::netns::Netns;
use super::pin::{self, Side};
use super::procs;

pub const PORT: u16 = 5300;
const CLIENT_THREADS: usize = 2;
const SERVER_THREADS: usize = 2;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Moves the calling thread into `ns`.
fn enter(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("open {path}"))?;
    // SAFETY: a valid namespace fd; only this thread changes namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts on `addr` in the backend, sends one byte, closes.
pub struct Server {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &Netns, addr: Ipv4Addr) -> Result<Server> {
        let name = ns.name.clone();
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            enter(&name)?;
            // The socket stays in the namespace it was made in.
            TcpListener::bind((addr, PORT)).with_context(|| format!("bind {addr}:{PORT}"))
        })
        .join()
        .expect("bind thread")?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..SERVER_THREADS)
            .map(|_| {
                let (listener, stop) = (listener.clone(), stop.clone());
                std::thread::spawn(move || {
                    let _ = pin::this_thread(Side::Backend);
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((mut conn, _)) = listener.accept() {
                            let _ = conn.write_all(b"x");
                        }
                    }
                })
            })
            .collect();
        Ok(Server {
            listener,
            stop,
            threads,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // On Linux, shutdown() on a listening socket wakes every accept().
        // SAFETY: the fd is alive as long as `listener`.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn one_connection(target: SocketAddr) -> std::io::Result<()> {
    let mut conn = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 8];
    let mut got = 0;
    loop {
        match conn.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    if got != 1 {
        return Err(std::io::Error::other(format!(
            "expected 1 byte then close, got {got}"
        )));
    }
    Ok(())
}

/// Connections per second from `ns` to `target`, at most `max` of them or
/// for `limit`, whichever comes first.
pub fn run(ns: &Netns, target: Ipv4Addr, max: u64, limit: Duration) -> Result<f64> {
    let addr = SocketAddr::from((target, PORT));
    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let begin = Instant::now();
    let workers: Vec<JoinHandle<Result<()>>> = (0..CLIENT_THREADS)
        .map(|_| {
            let (name, started, done) = (ns.name.clone(), started.clone(), done.clone());
            std::thread::spawn(move || {
                enter(&name)?;
                pin::this_thread(Side::Client)?;
                while begin.elapsed() < limit
                    && procs::check_interrupted().is_ok()
                    && started.fetch_add(1, Ordering::Relaxed) < max
                {
                    one_connection(addr).with_context(|| {
                        format!("connection {} to {addr}", done.load(Ordering::Relaxed) + 1)
                    })?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let mut first_error = None;
    for w in workers {
        if let Err(e) = w.join().expect("connection thread") {
            first_error.get_or_insert(e);
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    procs::check_interrupted()?;
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}
