//! One direction of a TCP flow through a userspace buffer: the fallback
//! where splice is refused or no pipe can be had.

use std::io;
use std::sync::atomic::AtomicU64;

use tokio::net::TcpStream;

use super::counters::RuleCounters;
use super::gate::Gate;
use super::idle::{IdleClock, Millis};

const BUFFER: usize = 64 * 1024;

/// Sends `pending` first, then copies `src` to `dst` until `src` sends FIN.
/// While the gate is closed it parks only with an empty buffer: every
/// byte it took from `src` has gone to `dst`.
pub async fn copy_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    pending: Vec<u8>,
    moved: &AtomicU64,
    clock: &IdleClock,
    gate: &Gate,
) -> io::Result<()> {
    write_all(dst, &pending, moved, clock).await?;
    let mut buf = pending;
    buf.clear();
    buf.resize(BUFFER, 0);
    loop {
        tokio::select! {
            ready = src.readable() => ready?,
            () = gate.closing() => {
                gate.park().await;
                continue;
            }
        }
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        clock.touch(Millis::now());
        write_all(dst, &buf[..n], moved, clock).await?;
    }
}

async fn write_all(
    dst: &TcpStream,
    data: &[u8],
    moved: &AtomicU64,
    clock: &IdleClock,
) -> io::Result<()> {
    let mut off = 0;
    while off < data.len() {
        dst.writable().await?;
        match dst.try_write(&data[off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                off += n;
                RuleCounters::add(moved, n as u64);
                clock.touch(Millis::now());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
