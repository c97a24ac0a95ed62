//! The kernel path, userspace side: loading, attaching and feeding the BPF programs.
