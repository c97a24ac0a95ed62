//! Loading the embedded eBPF object: preconditions, map sizes, log level.

use std::path::{Path, PathBuf};

use aya::{Ebpf, EbpfLoader};

use super::{EBPF_OBJECT, pins};

pub const NEED_ROOT: &str =
    "forwarder needs root (CAP_BPF and CAP_NET_ADMIN) to load the kernel path";

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Map sizes chosen at start.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Entries of `CONNTRACK` (two per flow).
    pub conntrack: u32,
    /// Entries of `RELAY_FLOWS`.
    pub relay_flows: u32,
}

/// The effective capabilities of this process (`CapEff` of /proc/self/status).
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Fails with [`NEED_ROOT`] unless this process may load BPF and attach
/// it to interfaces.
pub fn check_privileges() -> anyhow::Result<()> {
    let caps = effective_capabilities().unwrap_or(0);
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN) {
        Ok(())
    } else {
        anyhow::bail!(NEED_ROOT)
    }
}

/// Fails when this binary carries no eBPF object.
pub fn check_object() -> anyhow::Result<()> {
    if EBPF_OBJECT.is_empty() {
        anyhow::bail!(
            "this forwarder was built without its eBPF object, so it has no kernel path \
             (build it with `cargo xtask build`, or run the relay only)"
        );
    }
    Ok(())
}

/// Parses the object and creates its maps (programs are loaded later).
/// `log_level` is the most verbose aya-log level the programs emit.
pub fn load(sizes: Sizes, log_level: u8, pin_dir: Option<&Path>) -> anyhow::Result<Ebpf> {
    check_object()?;
    check_privileges()?;
    let level = log_level;
    let paths: Vec<(&str, PathBuf)> = pin_dir
        .map(|dir| {
            pins::MAPS
                .iter()
                .map(|name| (*name, pins::map_path(dir, name)))
                .collect()
        })
        .unwrap_or_default();
    let mut loader = EbpfLoader::new();
    // A map pinned there already is adopted with its contents.
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .map_max_entries("CONNTRACK", sizes.conntrack)
        .map_max_entries("RELAY_FLOWS", sizes.relay_flows)
        .override_global("AYA_LOG_LEVEL", &level, true)
        .load(EBPF_OBJECT)
        .map_err(|e| {
            if is_permission_error(&e) {
                anyhow::anyhow!("{NEED_ROOT}: {e}")
            } else {
                anyhow::anyhow!("cannot load the eBPF object: {e}")
            }
        })
}

fn is_permission_error(e: &aya::EbpfError) -> bool {
    let text = e.to_string();
    text.contains("Operation not permitted") || text.contains("Permission denied")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_proc() {
        let caps = effective_capabilities().expect("CapEff in /proc/self/status");
        // SAFETY: plain getter.
        if unsafe { libc::geteuid() } == 0 {
            assert!(check_privileges().is_ok(), "root with caps {caps:#x}");
        } else {
            assert_eq!(check_privileges().unwrap_err().to_string(), NEED_ROOT);
        }
    }
}
