//! The kernel path, userspace side: loading, attaching and feeding the BPF programs.

/// The eBPF object built by `cargo xtask build`, embedded at compile time.
/// Empty when this binary was built without it (relay only).
#[cfg(forwarder_ebpf)]
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder.bpf.o"));
#[cfg(not(forwarder_ebpf))]
pub static EBPF_OBJECT: &[u8] = &[];
