//! After set-up, every thread of the running daemon keeps only the
//! capabilities it still uses, in every set; a reload that binds a
//! privileged port and a clean stop still work.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use crate::common::harness::{
    Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule, reserved_ports,
};
use crate::common::traffic::{BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket};
use crate::common::turn::{assert_nothing_left, listener_addr, our_programs, turn_rules};
use crate::common::{Topology, reload, require_root};

/// CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_SYS_RESOURCE (24)
/// and CAP_BPF (39), as /proc prints a mask.
const KEPT: u64 = 1 << 10 | 1 << 12 | 1 << 24 | 1 << 39;

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

/// What the daemon may keep: [`KEPT`], less what it never had (this host's
/// root may lack some; the daemon starts with the test's own set).
fn kept_here() -> u64 {
    let own = thread_privileges(u64::from(std::process::id()));
    let (_, _, bounding) = own.iter().find(|(_, f, _)| f == "CapBnd").unwrap();
    KEPT & bounding
}

/// Every thread holds exactly what it may keep (effective, permitted,
/// bounding), nothing inheritable or ambient, and has no_new_privs.
/// Returns how many threads there are.
fn assert_dropped(pid: u64, started_with: u64) -> usize {
    let kept = kept_here() & started_with;
    assert_ne!(kept & 1 << 12, 0, "the test runs with CAP_NET_ADMIN");
    let fields = thread_privileges(pid);
    let mut threads: Vec<&str> = fields.iter().map(|(t, _, _)| t.as_str()).collect();
    threads.dedup();
    for (tid, field, value) in &fields {
        let want = match field.as_str() {
            "CapPrm" | "CapEff" | "CapBnd" => kept,
            "CapInh" | "CapAmb" => 0,
            _ => 1,
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
    let threads = assert_dropped(pid, u64::MAX);
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
    assert_dropped(pid, u64::MAX);

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
        unit & KEPT,
        KEPT,
        "the unit lets the daemon keep what it needs"
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
    assert_dropped(pid, unit);
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
    assert_dropped(pid, !(1 << 39));
    in_netns(&topo.client, || {
        udp_echo(&udp_socket(listener_addr(&topo)), b"through the relay");
    });
    let r = relay_rule(&daemon.status(), "turn-udp", "udp").clone();
    assert_eq!(counter(&r, "flows"), 1, "{r}");
    daemon.stop();
}
