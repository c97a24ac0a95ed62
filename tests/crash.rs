//! Integration tests: a daemon killed mid-transfer (SIGKILL, as a crash or
//! an OOM kill), the next daemon adopting its kernel path, and `forwarder
//! cleanup`. The daemons run under `nsenter --net` so that their bpffs
//! pins live in the host's mount namespace, as on a real host.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::common::eventually;
use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, reserved_ports, seen, spawn_in,
};
use crate::common::traffic::{BackendServers, paced_transfer, udp_echo, udp_socket};
use crate::common::{self, Topology};

const BPFFS: &str = "/sys/fs/bpf";
const PINS: &str = "/sys/fs/bpf/forwarder";

/// These tests share the host's bpffs: one at a time, and bpffs is left
/// mounted or not as it was found.
pub static HOST_BPFFS: Mutex<()> = Mutex::new(());

pub struct BpffsAsFound {
    was_mounted: bool,
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.contains(" bpf "))
}

impl BpffsAsFound {
    pub fn new() -> BpffsAsFound {
        BpffsAsFound {
            was_mounted: bpffs_mounted(),
        }
    }
}

impl Drop for BpffsAsFound {
    fn drop(&mut self) {
        // Only an empty bpffs: another test process on this machine may
        // have pins of its own there now. The kernel's own `*.debug`
        // iterators come with every mount.
        let empty = std::fs::read_dir(BPFFS).is_ok_and(|d| {
            d.filter_map(Result::ok)
                .all(|e| e.file_name().to_string_lossy().ends_with(".debug"))
        });
        if !self.was_mounted && bpffs_mounted() && empty {
            let _ = Command::new("umount").arg(BPFFS).status();
        }
    }
}

const RULES: &str = "
routes:
  bulk: {scheme: tcp, host: 198.18.2.2, port: 7001:3478}
  dgram: {scheme: udp, host: 198.18.2.2, port: 7002:3478}
";

/// Nothing of ours is left on `topo`'s forwarder: no program on its
/// interfaces, no pin for its namespace.
pub fn assert_nothing_left(topo: &Topology) {
    for interface in [&topo.client_link.a_if, &topo.backend_link.a_if] {
        let on = seen(&topo.forwarder, interface);
        assert!(on.nothing(), "{interface}: {on:?}");
    }
    let pins: Vec<_> = std::fs::read_dir(PINS)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    let cookie = in_netns(&topo.forwarder, forwarder::state::netns_cookie).unwrap();
    let ours = Path::new(PINS).join(format!("netns-{cookie}"));
    assert!(!pins.contains(&ours), "pins left in {}", ours.display());
    let state = forwarder::state::dir_of(cookie);
    assert!(!state.exists(), "state left in {}", state.display());
}

#[test]
fn sigkill_mid_transfer_and_the_next_daemon_adopts_the_kernel_flows() {
    if !common::require_root("sigkill_mid_transfer_and_the_next_daemon_adopts_the_kernel_flows") {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // Someone else's reservation, which must be exactly what is left.
    topo.forwarder
        .sysctl("net.ipv4.ip_local_reserved_ports", "1000,2000-2001");
    let fwd = topo.forwarder_addr();
    let at = move |port: u16| SocketAddr::from((fwd, port));
    let mut first = Daemon::start_pinning(&topo.forwarder, "crash-first", RULES);

    const SIZE: u64 = 256 << 20;
    let progress = Arc::new(AtomicU64::new(0));
    let transfer = {
        let progress = progress.clone();
        spawn_in(&topo.client, move || {
            paced_transfer(at(7001), SIZE, progress)
        })
    };
    let dgram = in_netns(&topo.client, || udp_socket(at(7002)));
    udp_echo(&dgram, b"before the crash");
    eventually("a quarter of the transfer sent", || {
        progress.load(Ordering::Relaxed) >= SIZE / 4
    });
    first.kill();
    // Nobody runs: the pinned programs carry the flows on.
    let at_kill = progress.load(Ordering::Relaxed);
    eventually("the transfer goes on without a daemon", || {
        progress.load(Ordering::Relaxed) > at_kill + (16 << 20)
    });
    udp_echo(&dgram, b"no daemon");
    assert_eq!(
        reserved_ports(&topo.forwarder),
        "1000,2000-2001,40000-59999",
        "the killed daemon's reservation is still there"
    );

    let second = Daemon::start_pinning(&topo.forwarder, "crash-second", RULES);
    assert!(
        second
            .log_text()
            .contains("adopted the kernel path of a previous daemon"),
        "{}",
        second.log_text()
    );
    let Ok((sent, got)) = transfer.join() else {
        panic!(
            "the transfer failed\n--- first daemon:\n{}\n--- second daemon:\n{}",
            first.log_text(),
            second.log_text()
        );
    };
    assert_eq!(
        sent, got,
        "the 256 MiB transfer arrived intact across the crash"
    );
    udp_echo(&dgram, b"after the restart");
    let status = second.status();
    // One flow each, opened before the crash, counted on.
    assert_eq!(
        counter(kernel_rule(&status, "bulk", "tcp"), "flows"),
        1,
        "{status}"
    );
    assert_eq!(
        counter(kernel_rule(&status, "dgram", "udp"), "flows"),
        1,
        "{status}"
    );
    second.stop();
    assert_eq!(reserved_ports(&topo.forwarder), "1000,2000-2001");
    assert_nothing_left(&topo);
}

/// `forwarder cleanup` in the forwarder's namespace, with its output.
fn cleanup(topo: &Topology, daemon: &Daemon) -> std::process::Output {
    common::output_within(
        topo.forwarder
            .nsenter(common::forwarder_bin())
            .arg("cleanup")
            .arg("--control")
            .arg(daemon.control_path()),
        WAIT,
    )
}

#[test]
fn cleanup_after_sigkill_leaves_nothing_and_refuses_while_the_daemon_runs() {
    if !common::require_root(
        "cleanup_after_sigkill_leaves_nothing_and_refuses_while_the_daemon_runs",
    ) {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    topo.forwarder
        .sysctl("net.ipv4.ip_local_reserved_ports", "1000");
    let mut daemon = Daemon::start_pinning(&topo.forwarder, "cleanup", RULES);
    let pid = daemon.status()["pid"].as_u64().unwrap();

    let out = cleanup(&topo, &daemon);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("pid {pid}")), "{stderr}");
    assert!(daemon.status()["pid"] == pid, "the daemon runs on");

    let control = daemon.control_path().to_path_buf();
    daemon.kill();
    assert!(control.exists(), "the killed daemon left its socket");
    let out = cleanup(&topo, &daemon);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for what in [
        "removed ports 40000-59999",
        "detached the pinned link",
        "removed the pinned map",
        "removed the stale control socket",
    ] {
        assert!(stdout.contains(what), "no `{what}` in:\n{stdout}");
    }
    assert_eq!(reserved_ports(&topo.forwarder), "1000");
    assert!(!control.exists());
    assert_nothing_left(&topo);
    // Once more: nothing to do.
    let out = cleanup(&topo, &daemon);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "nothing to clean up"
    );
}
