//! `cargo xtask setup`: install what a fresh machine lacks, say what, and
//! stay quiet when everything is there.
//!
//! The eBPF target needs a compiler with the `core` source for
//! `-Z build-std`. Rustup's toolchains here have no rust-src, so Debian's
//! `rustc-web` + `rust-web-src` build the eBPF crate, and bpf-linker is
//! built against the rustup toolchain's own libLLVM.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Debian packages and why we need them.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "the compiler for the eBPF target"),
    ("cargo-web", "rustc-web's cargo"),
    ("rust-web-src", "the core library source for -Z build-std"),
    ("iproute2", "network namespaces for the tests"),
    ("iperf3", "the tests' dual-protocol client"),
    ("ethtool", "the tests' veth offload settings for XDP"),
    ("bpftool", "the tests' check that nothing stays attached"),
    (
        "nftables",
        "the host-NAT tests' masquerading container namespace",
    ),
    (
        "docker.io",
        "the Docker Engine the Docker discovery test starts",
    ),
    (
        "busybox-static",
        "the test's container image, built with `docker import`",
    ),
    (
        "python3-prometheus-client",
        "the metrics test's parser of what the endpoint serves",
    ),
];

pub const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    install_apt_packages()?;
    install_bpf_linker()?;
    Ok(())
}

fn is_root() -> bool {
    cmd::output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn apt_installed(package: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", package]))
        .is_some_and(|s| s.starts_with("ii"))
}

fn install_apt_packages() -> Result<()> {
    let missing: Vec<_> = APT_PACKAGES
        .iter()
        .filter(|(p, _)| !apt_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (package, why) in &missing {
        eprintln!("setup: installing {package} ({why})");
    }
    if !is_root() {
        bail!(
            "setup needs root to install Debian packages: {}",
            missing
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing.iter().map(|(p, _)| *p))
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        })
}

/// The bpf-linker cargo would use, if it runs.
fn bpf_linker_works() -> bool {
    cmd::output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn install_bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let (libllvm, major) = rustup_libllvm()?;
    eprintln!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against {} (about 2 minutes)",
        libllvm.display()
    );
    // bpf-linker links `libLLVM.so` from LLVM_PREFIX/lib and keeps that
    // folder as its runpath, so the links live beside cargo's binaries.
    let prefix = cargo_home().join("forwarder-llvm-prefix");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("create {}", lib.display()))?;
    let soname = libllvm.file_name().expect("a file name").to_owned();
    for name in [Path::new("libLLVM.so"), Path::new(&soname)] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("link {}", link.display()))?;
    }
    cmd::run(
        Command::new("cargo")
            .args(["install", "--force", "--locked", "bpf-linker", "--version"])
            .arg(BPF_LINKER_VERSION)
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but does not run: is {} on PATH?",
            cargo_home().join("bin").display()
        );
    }
    Ok(())
}

/// The rustup toolchain's libLLVM and its major version.
fn rustup_libllvm() -> Result<(PathBuf, String)> {
    let sysroot = cmd::output(Command::new("rustc").args(["--print", "sysroot"]))
        .context("cannot ask rustc for its sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("read {}", lib.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        // e.g. libLLVM.so.22.1-rust-1.95.0-stable
        if let Some(version) = name.strip_prefix("libLLVM.so.")
            && let Some(major) = version.split('.').next()
            && major.chars().all(|c| c.is_ascii_digit())
        {
            return Ok((path.clone(), major.to_string()));
        }
    }
    bail!(
        "no libLLVM.so.* in {}: cannot build bpf-linker",
        lib.display()
    )
}
