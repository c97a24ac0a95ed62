//! Resident memory of everything running in the forwarder's namespace
//! (the daemon, or nginx's master and workers, HAProxy, socat and its
//! forks), sampled while a contender runs; the report keeps the peak.
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

const EVERY: Duration = Duration::from_millis(200);

/// `VmRSS:   12345 kB` from /proc/PID/status, in kB.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The network namespace's inode: what /proc/PID/ns/net of its processes
/// points to.
fn netns_inode(name: &str) -> Result<u64> {
    let path = format!("/run/netns/{name}");
    Ok(std::fs::metadata(&path)
        .with_context(|| format!("stat {path}"))?
        .ino())
}

/// Sum of VmRSS (kB) over the processes in the namespace with inode `ino`.
fn rss_in_netns(ino: u64) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let inside = std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ino);
        if inside && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            total += parse_vm_rss(&status).unwrap_or(0);
        }
    }
    total
}

/// Samples until dropped or [`RssSampler::peak_kib`] is called.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl RssSampler {
    pub fn start(netns: &str) -> Result<RssSampler> {
        let ino = netns_inode(netns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss_in_netns(ino));
                std::thread::sleep(EVERY);
            }
            peak.max(rss_in_netns(ino))
        });
        Ok(RssSampler {
            stop,
            thread: Some(thread),
        })
    }

    /// The peak sum seen, in KiB; 0 if nothing ran there.
    pub fn peak_kib(mut self) -> u64 {
        self.finish()
    }

    fn finish(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tnginx\nVmPeak:\t  12000 kB\nVmHWM:\t    9000 kB\nVmRSS:\t    8512 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(status), Some(8512));
        // Kernel threads have no VmRSS line.
        assert_eq!(parse_vm_rss("Name:\tkthreadd\nThreads:\t1\n"), None);
    }

    #[test]
    fn this_process_is_found_in_its_own_namespace() {
        let ino = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert!(rss_in_netns(ino) > 0);
    }
}
