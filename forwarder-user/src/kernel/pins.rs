//! Pinning the kernel path in bpffs so that it outlives the daemon: after a
//! crash (SIGKILL, panic, OOM kill) the attached programs keep forwarding
//! the established flows with their maps, and the next daemon adopts both.
//!
//! One directory per network namespace, `/sys/fs/bpf/forwarder/netns-COOKIE`:
//! the maps by name, and one link per hook (`tc-IFINDEX`, `tc-egress-IFINDEX`,
//! `xdp-IFINDEX`).
//! A clean stop removes all of it; `forwarder cleanup` removes what a dead
//! daemon left.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The maps whose contents must outlive the daemon: the flows, the rules
/// they point into, and the counters.
pub const MAPS: &[&str] = &[
    "CONNTRACK",
    "RELAY_FLOWS",
    "FRAGMENTS",
    "RULES",
    "BACKENDS",
    "SETTINGS",
    "RULE_FLAGS",
    "RULE_COUNTERS",
    forwarder_common::reasons::REASON_COUNTERS_MAP,
    "IFACE_COUNTERS",
    "XDP_EGRESS",
    forwarder_common::host_nat::HOST_PORTS_MAP,
    forwarder_common::ranges::RANGES_MAP,
    forwarder_common::ranges::RANGE_COUNT_MAP,
];

/// This network namespace's pin directory (not created).
pub fn dir(netns_cookie: u64) -> PathBuf {
    Path::new(BPFFS)
        .join("forwarder")
        .join(format!("netns-{netns_cookie}"))
}

fn is_bpffs(path: &str) -> bool {
    let Ok(c) = CString::new(path) else {
        return false;
    };
    // SAFETY: a valid path and a zeroed statfs to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Mounts bpffs at /sys/fs/bpf unless it is there, as Cilium does (a
/// systemd host mounts it already).
pub fn ensure_bpffs() -> io::Result<()> {
    if is_bpffs(BPFFS) {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS)?;
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src, target, fstype, data) = (c("bpf"), c(BPFFS), c("bpf"), c("mode=0700"));
    // SAFETY: valid C strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}

pub fn map_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Where a flow table pinned at another size waits while its entries
/// move to the new one (see `resize`).
pub fn set_aside_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}-previous"))
}

pub fn link_path(dir: &Path, hook: &str, ifindex: u32) -> PathBuf {
    dir.join(format!("{hook}-{ifindex}"))
}

/// Pins `link` at `path`, replacing a stale pin there.
pub fn pin_link(link: FdLink, path: &Path) -> anyhow::Result<PinnedLink> {
    link.pin(path)
        .map_err(|e| anyhow::anyhow!("cannot pin a link at {}: {e}", path.display()))
}

/// Detaches the link pinned at `path`, if any: once unpinned and closed
/// nothing holds it.
pub fn detach_pinned(path: &Path) -> io::Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    match PinnedLink::from_pin(path) {
        Ok(link) => drop(link.unpin()?),
        // Not a link (a leftover of another layout): just remove it.
        Err(_) => std::fs::remove_file(path)?,
    }
    Ok(true)
}

/// The pinned links in `dir` (a dead daemon's, at start).
pub fn links_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut links: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("tc-") || n.starts_with("xdp-"))
        })
        .collect();
    links.sort();
    links
}

/// Removes the directory with every pin in it: links are detached, maps
/// go once no program or descriptor holds them. Returns what it removed.
pub fn remove_all(dir: &Path) -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for link in links_in(dir) {
        if detach_pinned(&link)? {
            removed.push(format!("detached the pinned link {}", link.display()));
        }
    }
    for name in MAPS {
        for path in [map_path(dir, name), set_aside_path(dir, name)] {
            if path.exists() {
                std::fs::remove_file(&path)?;
                removed.push(format!("removed the pinned map {}", path.display()));
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The parent goes too once no namespace has a directory there.
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(removed)
}
