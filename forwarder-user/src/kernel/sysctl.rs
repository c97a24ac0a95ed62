//! Reserving the SNAT port range from local sockets while the kernel path
//! runs (`net.ipv4.ip_local_reserved_ports`, which also covers IPv6).
//!
//! The file stays open from start to restore, so the value goes back to
//! the network namespace it was taken from whichever thread restores it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

pub const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The reservation; restores the exact previous value on `restore` or drop.
pub struct ReservedPorts {
    file: File,
    original: String,
    restored: bool,
}

fn read(file: &File) -> io::Result<String> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = file.read_at(&mut buf, 0)?;
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).trim_end().to_owned())
}

impl ReservedPorts {
    /// Adds `range` (inclusive) to the reserved ports.
    pub fn reserve(range: (u16, u16)) -> anyhow::Result<ReservedPorts> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(RESERVED_PORTS)
            .map_err(|e| anyhow::anyhow!("cannot open {RESERVED_PORTS}: {e}"))?;
        let original =
            read(&file).map_err(|e| anyhow::anyhow!("cannot read {RESERVED_PORTS}: {e}"))?;
        let ours = format!("{}-{}", range.0, range.1);
        let value = if original.is_empty() {
            ours
        } else {
            format!("{original},{ours}")
        };
        file.write_at(format!("{value}\n").as_bytes(), 0)
            .map_err(|e| anyhow::anyhow!("cannot write {value:?} to {RESERVED_PORTS}: {e}"))?;
        tracing::debug!("reserved ports {value} (was {original:?})");
        Ok(ReservedPorts {
            file,
            original,
            restored: false,
        })
    }

    /// The value before the reservation.
    #[cfg(test)]
    pub fn original(&self) -> &str {
        &self.original
    }

    /// Puts the previous value back.
    pub fn restore(mut self) -> anyhow::Result<()> {
        self.restore_inner()
    }

    fn restore_inner(&mut self) -> anyhow::Result<()> {
        if self.restored {
            return Ok(());
        }
        self.restored = true;
        self.file
            .write_at(format!("{}\n", self.original).as_bytes(), 0)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot restore {RESERVED_PORTS} to {:?}: {e}",
                    self.original
                )
            })?;
        Ok(())
    }
}

impl Drop for ReservedPorts {
    fn drop(&mut self) {
        if let Err(e) = self.restore_inner() {
            tracing::warn!("{e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testns;

    fn current() -> String {
        read(&File::open(RESERVED_PORTS).unwrap()).unwrap()
    }

    #[test]
    fn the_range_is_added_and_the_old_value_comes_back_exactly() {
        if !testns::require_root("the_range_is_added_and_the_old_value_comes_back_exactly") {
            return;
        }
        testns::in_fresh_netns(|| {
            assert_eq!(current(), "");
            let r = ReservedPorts::reserve((40000, 40009)).unwrap();
            assert_eq!(current(), "40000-40009");
            r.restore().unwrap();
            assert_eq!(current(), "");
            std::fs::write(RESERVED_PORTS, "1000-1001,2000\n").unwrap();
            let r = ReservedPorts::reserve((40000, 40009)).unwrap();
            assert_eq!(r.original(), "1000-1001,2000");
            assert_eq!(current(), "1000-1001,2000,40000-40009");
            drop(r);
            assert_eq!(current(), "1000-1001,2000");
        });
    }

    #[test]
    fn restoring_from_another_namespace_restores_the_one_it_came_from() {
        if !testns::require_root("restoring_from_another_namespace_restores_the_one_it_came_from") {
            return;
        }
        let (give, take) = std::sync::mpsc::channel();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let ns = std::thread::spawn(move || {
            testns::in_fresh_netns(move || {
                std::fs::write(RESERVED_PORTS, "1234\n").unwrap();
                give.send(ReservedPorts::reserve((50000, 50001)).unwrap())
                    .unwrap();
                wait.recv().unwrap();
                current()
            })
        });
        let reservation = take.recv().unwrap();
        // Dropped on this thread, which is in another namespace.
        drop(reservation);
        done.send(()).unwrap();
        assert_eq!(ns.join().unwrap(), "1234");
    }
}
