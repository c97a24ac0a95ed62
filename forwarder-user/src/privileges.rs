//! After set-up the daemon keeps only the capabilities it still uses, on
//! every thread.
//!
//! The bounding set stays at what a start needs (see [`needed_for_start`])
//! and no_new_privs stays off: upgrade in place execs the daemon, and as
//! root the new image's permitted set is the bounding set.
//!
//! Capabilities and the bounding set belong to each thread,
//! and the runtime's threads exist before set-up ends. So the thread that
//! drops signals every other one to drop too (as glibc does for setuid),
//! and checks each in /proc until none keeps more. Threads made later
//! inherit the dropped set from the thread that makes them.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

pub const CAP_SETPCAP: u32 = 8;
pub const CAP_NET_BIND_SERVICE: u32 = 10;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYS_RESOURCE: u32 = 24;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The capabilities a running daemon still uses, as a mask:
/// - `CAP_NET_BIND_SERVICE`: a reload may add a rule on a port below 1024;
/// - `CAP_NET_ADMIN`: detaching the programs and the tc qdisc at stop,
///   `SO_RCVBUFFORCE` on the UDP listeners a reload adds;
/// - `CAP_SYS_RESOURCE`: the relay's 1 MiB pipes past the per-user pipe
///   limits;
/// - `CAP_BPF` (kernel path only): map access by descriptor on kernels
///   that deny it otherwise while unprivileged BPF is off (before 6.5).
///
/// Loading programs, mounting bpffs (`CAP_SYS_ADMIN`, `CAP_PERFMON`) and
/// raising limits happen at set-up only.
pub fn needed_after_setup(kernel_path: bool) -> u64 {
    let mut caps = vec![CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_SYS_RESOURCE];
    if kernel_path {
        caps.push(CAP_BPF);
    }
    mask(&caps)
}

/// The capabilities a start (set-up) needs, either path, as a mask: what
/// [`needed_after_setup`] keeps, plus loading programs and mounting bpffs
/// (`CAP_SYS_ADMIN`, `CAP_PERFMON`, `CAP_BPF`). The bounding set keeps
/// these so that the image an upgrade execs can set up again.
pub fn needed_for_start() -> u64 {
    needed_after_setup(true) | mask(&[CAP_SYS_ADMIN, CAP_PERFMON])
}

pub fn mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1 << c)
}

/// The names of the capabilities in `mask` (those this daemon names).
pub fn names(mask: u64) -> Vec<&'static str> {
    [
        (CAP_SETPCAP, "CAP_SETPCAP"),
        (CAP_NET_BIND_SERVICE, "CAP_NET_BIND_SERVICE"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_SYS_RESOURCE, "CAP_SYS_RESOURCE"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_BPF, "CAP_BPF"),
    ]
    .into_iter()
    .filter(|(c, _)| mask & 1 << c != 0)
    .map(|(_, name)| name)
    .collect()
}

/// What one thread's /proc status says about its privileges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCaps {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

impl ThreadCaps {
    /// Parses the `Cap*:` and `NoNewPrivs:` lines of /proc/.../status.
    pub fn parse(status: &str) -> Option<ThreadCaps> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let hex = |name: &str| u64::from_str_radix(field(name)?, 16).ok();
        Some(ThreadCaps {
            effective: hex("CapEff")?,
            permitted: hex("CapPrm")?,
            inheritable: hex("CapInh")?,
            bounding: hex("CapBnd")?,
            ambient: hex("CapAmb").unwrap_or(0),
            no_new_privs: field("NoNewPrivs")? == "1",
        })
    }

    /// Whether the thread holds nothing outside `keep` and, if the bounding
    /// set could be dropped, bounds nothing outside `bound`.
    pub fn within(&self, keep: u64, bound: u64, bounding_dropped: bool) -> bool {
        let sets = self.effective | self.permitted | self.inheritable | self.ambient;
        sets & !keep == 0 && (!bounding_dropped || self.bounding & !bound == 0)
    }
}

static KEEP: AtomicU64 = AtomicU64::new(0);
static BOUND: AtomicU64 = AtomicU64::new(0);
static LAST_CAP: AtomicU32 = AtomicU32::new(0);
static DROP_BOUNDING: AtomicBool = AtomicBool::new(false);
static FAILED: AtomicBool = AtomicBool::new(false);

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// This thread's capability sets (`capget`), the two 32-bit words joined.
fn this_thread() -> Result<[CapData; 2], i32> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: the header and two data words capget's version 3 writes.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(errno());
    }
    Ok(data)
}

fn errno() -> i32 {
    // SAFETY: this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Drops this thread's bounding set to `BOUND` (while `CAP_SETPCAP`
/// allows), clears the ambient set, then drops effective, permitted and
/// inheritable to `KEEP`. Only system calls: it runs in a signal handler.
fn drop_this_thread() -> Result<(), i32> {
    let keep = KEEP.load(Ordering::Relaxed);
    let bound = BOUND.load(Ordering::Relaxed);
    if DROP_BOUNDING.load(Ordering::Relaxed) {
        for cap in 0..=LAST_CAP.load(Ordering::Relaxed) {
            let bit = cap as libc::c_ulong;
            // A thread signalled again (its first drop was slow to show)
            // has no CAP_SETPCAP left, and nothing left to drop.
            // SAFETY: prctl with integer arguments.
            let held = unsafe { libc::prctl(libc::PR_CAPBSET_READ, bit, 0, 0, 0) } == 1;
            // SAFETY: as above.
            if bound & 1 << cap == 0
                && held
                && unsafe { libc::prctl(libc::PR_CAPBSET_DROP, bit, 0, 0, 0) } != 0
            {
                return Err(errno());
            }
        }
    }
    // SAFETY: as above. Fails only on kernels without ambient sets (< 4.3).
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut data = this_thread()?;
    for (word, d) in data.iter_mut().enumerate() {
        let kept = (keep >> (32 * word)) as u32;
        d.effective &= kept;
        d.permitted &= kept;
        d.inheritable &= kept;
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: the header and two data words capset's version 3 reads.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(errno());
    }
    Ok(())
}

extern "C" fn on_drop_signal(_: libc::c_int) {
    let saved = errno();
    if drop_this_thread().is_err() {
        FAILED.store(true, Ordering::Relaxed);
    }
    // SAFETY: restores this thread's errno for the code the signal interrupted.
    unsafe { *libc::__errno_location() = saved };
}

/// The signal that asks a thread to drop (one the daemon uses for nothing else).
fn drop_signal() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

/// How long the other threads get to drop.
const DROP_WAIT: Duration = Duration::from_secs(5);

/// Drops every thread of the process to the capabilities in `keep`, which
/// must be a subset of what this thread holds, and its bounding set to
/// `bound`. The bounding set needs `CAP_SETPCAP` to drop; without it, it
/// stays as it is (an image that has already dropped it has nothing left
/// to drop).
pub fn drop_to(keep: u64, bound: u64) -> anyhow::Result<()> {
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("read /proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .context("parse /proc/sys/kernel/cap_last_cap")?;
    let mine =
        this_thread().map_err(|e| anyhow!("capget: {}", std::io::Error::from_raw_os_error(e)))?;
    let setpcap = mine[0].effective & 1 << CAP_SETPCAP != 0;
    let last_cap = last_cap.min(63);
    // SAFETY: prctl with integer arguments.
    let bounding = (0..=last_cap)
        .filter(|&cap| unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) } == 1)
        .fold(0u64, |m, cap| m | 1 << cap);
    let to_drop = bounding & !bound != 0;
    if to_drop && !setpcap {
        tracing::warn!(
            "started without CAP_SETPCAP: the bounding set stays as it is ({bounding:#x}), so \
             an exec could regain all of it"
        );
    }
    KEEP.store(keep, Ordering::Relaxed);
    BOUND.store(bound, Ordering::Relaxed);
    LAST_CAP.store(last_cap, Ordering::Relaxed);
    DROP_BOUNDING.store(to_drop && setpcap, Ordering::Relaxed);
    FAILED.store(false, Ordering::Relaxed);
    // SAFETY: installs a handler that makes system calls only.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_drop_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(drop_signal(), &action, std::ptr::null_mut()) != 0 {
            bail!("sigaction: {}", std::io::Error::last_os_error());
        }
    }
    drop_this_thread().map_err(|e| {
        anyhow!(
            "dropping capabilities: {}",
            std::io::Error::from_raw_os_error(e)
        )
    })?;
    // SAFETY: system calls without arguments.
    let pid = unsafe { libc::getpid() };
    let deadline = Instant::now() + DROP_WAIT;
    for round in 0.. {
        let pending = privileged_threads(keep, bound, setpcap || !to_drop)?;
        if pending.is_empty() {
            return Ok(());
        }
        if FAILED.load(Ordering::Relaxed) {
            bail!("a thread could not drop its capabilities");
        }
        if Instant::now() > deadline {
            bail!("threads {pending:?} kept their capabilities after {DROP_WAIT:?}");
        }
        // Again every 50 ms: a busy thread may take a while to run its
        // handler, and a thread may have started meanwhile.
        if round % 25 == 0 {
            for tid in pending {
                // SAFETY: signals a thread of this process; a thread gone
                // meanwhile (ESRCH) is no longer privileged.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, drop_signal()) };
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    unreachable!("the loop returns")
}

/// The threads of this process that hold more than `keep` (or, if it could
/// be dropped, bound more than `bound`).
fn privileged_threads(keep: u64, bound: u64, bounding_dropped: bool) -> anyhow::Result<Vec<i32>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").context("read /proc/self/task")? {
        let Some(tid) = entry?.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ended meanwhile has no status.
        let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
            continue;
        };
        let caps = ThreadCaps::parse(&status)
            .ok_or_else(|| anyhow!("no capabilities in /proc/self/task/{tid}/status"))?;
        if !caps.within(keep, bound, bounding_dropped) {
            out.push(tid);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tforwarder\nNoNewPrivs:\t0\nCapInh:\t0000000000000000\n\
        CapPrm:\t0000008001001400\nCapEff:\t0000008001001400\nCapBnd:\t000000c001201400\n\
        CapAmb:\t0000000000000000\nSeccomp:\t0\n";

    #[test]
    fn the_kernel_path_keeps_bpf_the_relay_only_daemon_does_not() {
        assert_eq!(needed_after_setup(true), 0x0000_0080_0100_1400);
        assert_eq!(
            names(needed_after_setup(true)),
            [
                "CAP_NET_BIND_SERVICE",
                "CAP_NET_ADMIN",
                "CAP_SYS_RESOURCE",
                "CAP_BPF"
            ]
        );
        assert_eq!(needed_after_setup(false), 0x0000_0000_0100_1400);
    }

    #[test]
    fn a_start_needs_the_runtime_set_and_what_loading_programs_takes() {
        assert_eq!(needed_for_start(), 0x0000_00c0_0120_1400);
        assert_eq!(
            names(needed_for_start()),
            [
                "CAP_NET_BIND_SERVICE",
                "CAP_NET_ADMIN",
                "CAP_SYS_ADMIN",
                "CAP_SYS_RESOURCE",
                "CAP_PERFMON",
                "CAP_BPF"
            ]
        );
    }

    #[test]
    fn a_thread_is_within_only_with_every_set_kept_and_the_start_set_bounding() {
        let keep = needed_after_setup(true);
        let bound = needed_for_start();
        let caps = ThreadCaps::parse(STATUS).unwrap();
        assert_eq!(caps.bounding, bound);
        assert!(
            !caps.no_new_privs,
            "an upgrade's exec must regain the start set"
        );
        assert!(caps.within(keep, bound, true));
        assert!(
            !caps.within(needed_after_setup(false), bound, true),
            "CAP_BPF kept"
        );
        assert!(
            !caps.within(keep, keep, true),
            "the bounding set exceeds keep"
        );
        let full = ThreadCaps {
            bounding: 0x1ff_ffff_ffff,
            ..caps
        };
        assert!(!full.within(keep, bound, true));
        assert!(
            full.within(keep, bound, false),
            "a bounding set it cannot drop"
        );
        for more in [
            ThreadCaps {
                effective: keep | 1 << CAP_SYS_ADMIN,
                ..caps
            },
            ThreadCaps {
                permitted: keep | 1 << CAP_SYS_ADMIN,
                ..caps
            },
            ThreadCaps {
                inheritable: 1,
                ..caps
            },
            ThreadCaps { ambient: 1, ..caps },
        ] {
            assert!(!more.within(keep, bound, true), "{more:?}");
        }
        assert_eq!(ThreadCaps::parse("Name:\tx\n"), None);
    }

    #[test]
    fn a_thread_told_twice_drops_once_and_is_done() {
        let setpcap = this_thread().unwrap()[0].effective & 1 << CAP_SETPCAP != 0;
        if !setpcap {
            eprintln!("skipped: needs CAP_SETPCAP (root)");
            return;
        }
        let keep = needed_after_setup(true);
        let bound = needed_for_start();
        KEEP.store(keep, Ordering::Relaxed);
        BOUND.store(bound, Ordering::Relaxed);
        LAST_CAP.store(40, Ordering::Relaxed);
        DROP_BOUNDING.store(true, Ordering::Relaxed);
        // On a thread of its own: capabilities are per thread.
        std::thread::spawn(move || {
            assert_eq!(drop_this_thread(), Ok(()));
            assert_eq!(drop_this_thread(), Ok(()), "the second time");
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let caps = ThreadCaps::parse(&status).unwrap();
            assert!(caps.within(keep, bound, true), "{caps:?}");
            assert_eq!(caps.effective & 1 << CAP_SYS_ADMIN, 0);
            assert_ne!(caps.bounding & 1 << CAP_SYS_ADMIN, 0, "a start needs it");
            assert!(!caps.no_new_privs);
        })
        .join()
        .unwrap();
    }
}
