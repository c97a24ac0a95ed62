//! Embeds the eBPF object so that `forwarder` is a single file to install.
//!
//! `cargo xtask build` builds the object first and passes its path in
//! `FORWARDER_EBPF_OBJ`. Without it the default path is tried; when there is
//! no object at all the daemon is built relay-only and says so at start.
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(forwarder_ebpf)");
    println!("cargo::rerun-if-env-changed=FORWARDER_EBPF_OBJ");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = std::env::var_os("FORWARDER_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/forwarder"));
    println!("cargo::rerun-if-changed={}", object.display());
    if object.is_file() {
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("forwarder.bpf.o");
        std::fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
        println!("cargo::rustc-cfg=forwarder_ebpf");
    } else {
        println!(
            "cargo::warning=no eBPF object at {}: building relay-only (run `cargo xtask build`)",
            object.display()
        );
    }
}
