//! The daemon's own footprint: its open descriptors and resident memory
//! (for `forwarder status` and the metrics), and the open files limit its
//! sockets need.

use std::io;

use serde::Serialize;

/// Descriptors a daemon needs beside its listening sockets: BPF maps and
/// programs, the control socket, netlink, the runtime, a few flows.
pub const BASE_DESCRIPTORS: u64 = 1024;

/// What `forwarder status` says about the daemon process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// Entries of /proc/self/fd.
    pub open_fds: u64,
    /// VmRSS of /proc/self/status, in bytes.
    pub rss_bytes: u64,
    /// The soft RLIMIT_NOFILE.
    pub max_fds: u64,
}

impl Footprint {
    pub fn now() -> io::Result<Footprint> {
        let open_fds = std::fs::read_dir("/proc/self/fd")?.count() as u64;
        let status = std::fs::read_to_string("/proc/self/status")?;
        let rss_bytes = vm_rss_bytes(&status)
            .ok_or_else(|| io::Error::other("/proc/self/status has no VmRSS line"))?;
        let (max_fds, _) = nofile_limit()?;
        Ok(Footprint {
            open_fds,
            rss_bytes,
            max_fds,
        })
    }
}

/// Gives the allocator's free memory back to the system. A status or a
/// scrape of 10,000 rules allocates tens of MiB for a moment; glibc keeps
/// freed memory of its thread arenas resident otherwise.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `VmRSS:   12345 kB` of a /proc/PID/status, in bytes.
pub fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    (words.next()? == "kB").then_some(n * 1024)
}

/// The soft and hard RLIMIT_NOFILE.
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Descriptors `listening` sockets need, with the daemon's own.
pub fn descriptors_needed(listening: usize) -> u64 {
    listening as u64 + BASE_DESCRIPTORS
}

/// The soft limit to set for `need` descriptors under `hard`: the hard
/// limit itself (relay flows take descriptors too), or why it cannot be.
pub fn soft_limit_for(need: u64, listening: usize, hard: u64) -> Result<u64, String> {
    if hard < need {
        return Err(format!(
            "the open files limit is too low: {listening} listening sockets and {BASE_DESCRIPTORS} \
             descriptors for the daemon itself need {need}, the hard RLIMIT_NOFILE is {hard} \
             (raise it: `ulimit -Hn {need}`, or LimitNOFILE={need} in a systemd unit)"
        ));
    }
    Ok(hard)
}

/// Raises the soft limit for `listening` sockets (to the hard limit, as
/// relay flows need descriptors too); returns the new soft limit.
pub fn raise_nofile_limit(listening: usize) -> anyhow::Result<u64> {
    let (soft, hard) = nofile_limit()?;
    let want = soft_limit_for(descriptors_needed(listening), listening, hard)
        .map_err(anyhow::Error::msg)?;
    if soft < want {
        let lim = libc::rlimit {
            rlim_cur: want,
            rlim_max: hard,
        };
        // SAFETY: a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            anyhow::bail!(
                "cannot raise the open files limit from {soft} to {want}: {}",
                io::Error::last_os_error()
            );
        }
    }
    Ok(want.max(soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tforwarder\nVmHWM:\t    9000 kB\nVmRSS:\t    8512 kB\nThreads:\t3\n";
        assert_eq!(vm_rss_bytes(status), Some(8512 * 1024));
        assert_eq!(vm_rss_bytes("Name:\tkthreadd\n"), None);
        assert_eq!(vm_rss_bytes("VmRSS:\t 12 MB\n"), None);
    }

    #[test]
    fn the_soft_limit_is_the_hard_one_when_it_is_enough() {
        let need = descriptors_needed(10_000);
        assert_eq!(need, 10_000 + BASE_DESCRIPTORS);
        assert_eq!(soft_limit_for(need, 10_000, need), Ok(need));
        assert_eq!(soft_limit_for(need, 10_000, 1 << 20), Ok(1 << 20));
    }

    #[test]
    fn a_hard_limit_too_low_is_an_error_naming_the_numbers() {
        let need = descriptors_needed(10_000);
        let e = soft_limit_for(need, 10_000, need - 1).unwrap_err();
        assert!(e.contains("10000 listening sockets"), "{e}");
        assert!(e.contains(&format!("need {need}")), "{e}");
        assert!(
            e.contains(&format!("hard RLIMIT_NOFILE is {}", need - 1)),
            "{e}"
        );
    }

    #[test]
    fn this_process_has_descriptors_and_memory() {
        let f = Footprint::now().unwrap();
        assert!(f.open_fds >= 3, "{f:?}");
        assert!(f.rss_bytes > 0, "{f:?}");
        assert!(f.max_fds >= f.open_fds, "{f:?}");
    }
}
