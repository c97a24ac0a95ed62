//! Unit-test helpers: root checks and throwaway network namespaces.

/// The integration tests' root check (and skip bookkeeping), shared.
#[path = "../../../tests/common/netns.rs"]
mod shared;

/// True when the test may load BPF and create namespaces; otherwise says
/// why it is skipped (and fails under `CI=true`).
pub fn require_root(test: &str) -> bool {
    if !shared::require_root(test) {
        return false;
    }
    assert!(
        !super::EBPF_OBJECT.is_empty(),
        "{test}: this build has no eBPF object; build it first (cargo xtask build)"
    );
    true
}

/// Runs `f` on a new thread in a new, empty network namespace (loopback
/// up) that disappears with the thread. Commands spawned from `f` run in
/// that namespace too.
pub fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare affects this thread only.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            ip(&["link", "set", "lo", "up"]);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Runs `ip ARGS` in the calling thread's namespace; fails the test on error.
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
