//! The bench's tools: installed with apt when missing, saying what and why.
use std::process::Command;

use anyhow::{Result, bail};

use crate::cmd;

/// Debian packages and what the bench uses them for.
pub const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "the network namespaces"),
    (
        "ethtool",
        "GRO on the veth ends, so that XDP redirects arrive",
    ),
    ("iperf3", "TCP throughput and UDP packet rate"),
    ("sockperf", "request/response latency"),
    ("nftables", "the nftables DNAT contender"),
    ("nginx", "the nginx stream contender"),
    ("libnginx-mod-stream", "nginx's stream module"),
    ("haproxy", "the HAProxy contender"),
    ("socat", "the socat contender"),
];

fn installed(package: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", package]))
        .is_some_and(|s| s.starts_with("ii"))
}

/// Installs those of `wanted` that are missing.
pub fn ensure(wanted: &[&str]) -> Result<()> {
    let missing: Vec<&str> = wanted.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for package in &missing {
        let why = PACKAGES
            .iter()
            .find(|(p, _)| p == package)
            .map_or("", |(_, why)| why);
        eprintln!("bench: installing {package} ({why})");
    }
    cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(["-o", "Dpkg::Use-Pty=0"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still: Vec<&str> = missing.into_iter().filter(|p| !installed(p)).collect();
    if !still.is_empty() {
        bail!("apt-get did not install {}", still.join(" "));
    }
    Ok(())
}
