//! Building the eBPF object and the daemon that embeds it.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use crate::{cmd, workspace_root};

/// Debian's rustc-web: it ships the `core` source that `-Z build-std` needs.
const EBPF_RUSTC: &str = "/usr/bin/rustc";
pub const EBPF_TARGET: &str = "bpfel-unknown-none";

/// Builds forwarder-ebpf and returns the object's path.
pub fn ebpf_object() -> Result<PathBuf> {
    let root = workspace_root();
    // Its own target dir: another compiler, so it must not share fingerprints.
    let target_dir = root.join("target/ebpf");
    cmd::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--package", "forwarder-ebpf", "--release"])
            .args(["--target", EBPF_TARGET, "-Z", "build-std=core"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTC", EBPF_RUSTC)
            .env("RUSTC_BOOTSTRAP", "1")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("RUSTFLAGS"),
    )?;
    let object = target_dir.join(EBPF_TARGET).join("release/forwarder");
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but left no object at {}",
            object.display()
        );
    }
    Ok(object)
}

/// A `cargo` command in the workspace that embeds `object` in the daemon.
pub fn cargo_with_object(object: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env("FORWARDER_EBPF_OBJ", object);
    cmd
}

/// Builds the eBPF object and the release daemon; returns the daemon's path.
pub fn daemon() -> Result<PathBuf> {
    let object = ebpf_object()?;
    let mut cmd = cargo_with_object(&object);
    cmd.args([
        "build",
        "--release",
        "--package",
        "forwarder-user",
        "--bin",
        "forwarder",
    ]);
    cmd::run(&mut cmd)?;
    Ok(workspace_root().join("target/release/forwarder"))
}

/// Replaces xtask with the daemon, so that signals reach it directly.
pub fn exec_daemon(bin: &Path, config: &Path, args: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("-c").arg(config).args(args);
    let not_root = cmd::output(Command::new("id").arg("-u")).is_none_or(|s| s.trim() != "0");
    if not_root {
        let mut sudo = Command::new("sudo");
        sudo.arg(bin).arg("run").arg("-c").arg(config).args(args);
        cmd = sudo;
    }
    eprintln!("xtask: {}", cmd::describe(&cmd));
    let err = cmd.exec();
    bail!("cannot start {}: {err}", bin.display())
}
