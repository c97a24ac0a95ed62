//! After set-up, every thread of the running daemon keeps only the
//! capabilities it still uses (effective, permitted) and bounds only what a
//! start needs, so that an upgrade's exec can set up again; a reload that
//! binds a privileged port, an upgrade in place and a clean stop still work.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, relay_rule, reserved_ports,
};
use crate::common::traffic::{BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket};
use crate::common::turn::{assert_nothing_left, listener_addr, our_programs, turn_rules};
use crate::common::{Topology, eventually, forwarder_bin, output_within, reload, require_root};
use crate::crash::{self, BpffsAsFound, HOST_BPFFS};

/// CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_SYS_RESOURCE (24)
/// and CAP_BPF (39), as /proc prints a mask.
const KEPT: u64 = 1 << 10 | 1 << 12 | 1 << 24 | 1 << 39;

/// What a start needs, the bounding set's: [`KEPT`], CAP_SYS_ADMIN (21)
/// and CAP_PERFMON (38).
const START: u64 = KEPT | 1 << 21 | 1 << 38;

/// A port below 1024: binding it takes CAP_NET_BIND_SERVICE.
const LOW_PORT: u16 = 81;

/// (thread id, field, value) of every capability field of every thread
/// of `pid`, and NoNewPrivs.
fn thread_privileges(pid: u64) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = task.unwrap().file_name().to_string_lossy().into_owned();
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            continue;
        };
        for line in status.lines() {
            let Some((field, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            let value = match field {
                "CapInh" | "CapPrm" | "CapEff" | "CapBnd" | "CapAmb" => {
                    u64::from_str_radix(value, 16).unwrap()
                }
                "NoNewPrivs" => value.parse().unwrap(),
                _ => continue,
            };
            out.push((tid.clone(), field.to_owned(), value));
        }
    }
    out
}

/// The capabilities systemd gives the daemon: `CapabilityBoundingSet` of
/// dist/forwarder.service, as a mask.
fn unit_capabilities() -> u64 {
    let unit = include_str!("../dist/forwarder.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit");
    line.split_whitespace()
        .map(|name| match name {
            "CAP_SETPCAP" => 8,
            "CAP_NET_BIND_SERVICE" => 10,
            "CAP_NET_ADMIN" => 12,
            "CAP_NET_RAW" => 13,
            "CAP_SYS_ADMIN" => 21,
            "CAP_SYS_RESOURCE" => 24,
            "CAP_PERFMON" => 38,
            "CAP_BPF" => 39,
            other => panic!("a capability this test does not know: {other}"),
        })
        .fold(0, |mask, cap: u32| mask | 1 << cap)
}

/// The test's own bounding set: this host's root may lack some
/// capabilities, and the daemon starts with the test's set.
fn own_bounding() -> u64 {
    let own = thread_privileges(u64::from(std::process::id()));
    let (_, _, bounding) = own.iter().find(|(_, f, _)| f == "CapBnd").unwrap();
    *bounding
}

/// Every thread holds exactly `kept` (effective, permitted) and bounds
/// exactly `bound`, less what the daemon was never given (`started_with`
/// and the test's own bounding set), holds nothing inheritable or ambient,
/// and has no no_new_privs (which would keep an upgrade's exec from
/// regaining the bounding set). Returns how many threads there are.
fn assert_dropped(pid: u64, kept: u64, bound: u64, started_with: u64) -> usize {
    let given = own_bounding() & started_with;
    let (kept, bound) = (kept & given, bound & given);
    assert_ne!(kept & 1 << 12, 0, "the test runs with CAP_NET_ADMIN");
    let fields = thread_privileges(pid);
    let mut threads: Vec<&str> = fields.iter().map(|(t, _, _)| t.as_str()).collect();
    threads.dedup();
    for (tid, field, value) in &fields {
        let want = match field.as_str() {
            "CapPrm" | "CapEff" => kept,
            "CapBnd" => bound,
            _ => 0,
        };
        assert_eq!(*value, want, "thread {tid} of {pid}: {field} {value:#x}");
    }
    assert_eq!(fields.len(), threads.len() * 6, "{fields:?}");
    threads.len()
}

#[test]
fn every_thread_keeps_only_the_capabilities_the_running_daemon_needs() {
    if !require_root("every_thread_keeps_only_the_capabilities_the_running_daemon_needs") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let reserved_before = reserved_ports(&topo.forwarder);
    let yaml = turn_rules(&topo, "");
    let daemon = Daemon::start(&topo.forwarder, "capabilities", &yaml);
    let programs = our_programs(&topo, false);
    let pid = daemon.status()["pid"].as_u64().expect("the daemon's pid");
    // The runtime's workers exist from the start: more than one thread.
    let threads = assert_dropped(pid, KEPT, START, u64::MAX);
    assert!(threads >= 3, "{threads} threads");

    // A reload adds rules on a privileged port, on both paths' sockets.
    let low = format!(
        "{yaml}  low: {{scheme: \"tcp,udp\", host: {}, port: {LOW_PORT}:3478}}\n",
        topo.backend_addr()
    );
    std::fs::write(daemon.config_path(), low).unwrap();
    let out = reload(daemon.control_path(), Duration::from_secs(10));
    assert!(
        out.status.success(),
        "reload: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    let to_low = SocketAddr::from((topo.forwarder_addr(), LOW_PORT));
    in_netns(&topo.client, || {
        udp_echo(&udp_socket(listener_addr(&topo)), b"through 7878");
        udp_echo(&udp_socket(to_low), b"through 81");
        tcp_echo_round(&mut tcp_echo_conn(to_low), b"through 81");
    });
    let status = daemon.status();
    for (alias, protocol) in [("turn-udp", "udp"), ("low", "udp"), ("low", "tcp")] {
        let k = kernel_rule(&status, alias, protocol);
        assert_eq!(counter(k, "flows"), 1, "{alias}/{protocol}: {k}");
    }
    // Threads started since (the blocking pool) hold no more either.
    assert_dropped(pid, KEPT, START, u64::MAX);

    // A clean stop still detaches, unpins and restores the reserved ports.
    daemon.stop();
    assert_nothing_left(&topo, &programs, &reserved_before);
}

#[test]
fn the_units_capabilities_are_enough_to_set_up_and_run_the_kernel_path() {
    if !require_root("the_units_capabilities_are_enough_to_set_up_and_run_the_kernel_path") {
        return;
    }
    let unit = unit_capabilities();
    assert_eq!(
        unit & START,
        START,
        "the unit gives the daemon what a start needs"
    );
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let reserved_before = reserved_ports(&topo.forwarder);
    // As systemd starts it: root, with the unit's bounding set, which is
    // all root gets at exec.
    let daemon = Daemon::start_with(
        &topo.forwarder,
        "unit-capabilities",
        &turn_rules(&topo, ""),
        "info",
        move |cmd| {
            // SAFETY: only prctl between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    for cap in 0..64u64 {
                        if unit & 1 << cap == 0 {
                            // Past the kernel's last capability: EINVAL, nothing to drop.
                            libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
                        }
                    }
                    Ok(())
                })
            };
        },
    );
    let programs = our_programs(&topo, false);
    let status = daemon.status();
    assert_eq!(status["kernel_path"], true, "{status}");
    let pid = status["pid"].as_u64().expect("the daemon's pid");
    assert_dropped(pid, KEPT, START, unit);
    in_netns(&topo.client, || {
        udp_echo(&udp_socket(listener_addr(&topo)), b"through the kernel");
    });
    let k = kernel_rule(&daemon.status(), "turn-udp", "udp").clone();
    assert_eq!(counter(&k, "flows"), 1, "{k}");
    daemon.stop();
    assert_nothing_left(&topo, &programs, &reserved_before);
}

#[test]
fn a_relay_only_daemon_keeps_no_cap_bpf() {
    if !require_root("a_relay_only_daemon_keeps_no_cap_bpf") {
        return;
    }
    let topo = Topology::new();
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start_with(
        &topo.forwarder,
        "capabilities-relay-only",
        &turn_rules(&topo, ""),
        "info",
        |cmd| {
            cmd.arg("--relay-only");
        },
    );
    let status = daemon.status();
    assert_eq!(status["kernel_path"], false, "{status}");
    let pid = status["pid"].as_u64().expect("the daemon's pid");
    assert_dropped(pid, KEPT & !(1 << 39), START, u64::MAX);
    in_netns(&topo.client, || {
        udp_echo(&udp_socket(listener_addr(&topo)), b"through the relay");
    });
    let r = relay_rule(&daemon.status(), "turn-udp", "udp").clone();
    assert_eq!(counter(&r, "flows"), 1, "{r}");
    daemon.stop();
}

#[test]
fn the_image_an_upgrade_execs_sets_up_again_and_drops_again() {
    if !require_root("the_image_an_upgrade_execs_sets_up_again_and_drops_again") {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let backend = topo.backend_addr();
    let rules = format!(
        "routes:\n  \
         kdgram: {{scheme: udp, host: {backend}, port: 7102:3478}}\n  \
         rbulk: {{scheme: tcp, host: {backend}, port: 7103:3478, path: relay}}\n"
    );
    // As an upgrade needs it: under nsenter, pinning on the host's bpffs.
    let daemon = Daemon::start_pinning(&topo.forwarder, "capabilities-upgrade", &rules);
    let pid = daemon.status()["pid"].as_u64().expect("the daemon's pid");
    assert_dropped(pid, KEPT, START, u64::MAX);
    let at = |port: u16| SocketAddr::from((topo.forwarder_addr(), port));
    let kernel_udp = in_netns(&topo.client, || udp_socket(at(7102)));
    let mut relay_tcp = in_netns(&topo.client, || tcp_echo_conn(at(7103)));
    udp_echo(&kernel_udp, b"before");
    tcp_echo_round(&mut relay_tcp, b"before");

    let out = output_within(
        std::process::Command::new(forwarder_bin())
            .arg("upgrade")
            .arg("--control")
            .arg(daemon.control_path()),
        WAIT,
    );
    assert!(
        out.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    // The new image logs this once it has set up and dropped.
    eventually("the new image is up", || {
        daemon.log_text().contains("upgrade done")
    });
    assert_eq!(
        daemon.status()["pid"].as_u64(),
        Some(pid),
        "the same process"
    );
    assert_dropped(pid, KEPT, START, u64::MAX);
    udp_echo(&kernel_udp, b"after the upgrade");
    tcp_echo_round(&mut relay_tcp, b"after the upgrade");
    let in_kernel = kernel_rule(&daemon.status(), "kdgram", "udp").clone();
    assert_eq!(counter(&in_kernel, "flows"), 1, "{in_kernel}");
    drop(relay_tcp);
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
    crash::assert_nothing_left(&topo);
}
