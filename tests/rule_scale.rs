//! 10,000 rules: `check` and `run` load them, rules spread over the table
//! forward on the kernel path, `status` reports the daemon's descriptors
//! and memory; more than the kernel tables hold, or more sockets than the
//! open files limit allows, is a clear error.
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule};
use crate::common::traffic::{BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket};
use crate::common::{self, Netns, TempConfig, Topology, stderr_lines};

const FIRST_PORT: u16 = 20_000;

/// `aliases` `tcp,udp` aliases (two rules each) on consecutive ports from
/// [`FIRST_PORT`], all to the backend's echo servers.
fn many_rules(interfaces: &[&str], backend: &str, aliases: u16) -> String {
    let mut yaml = String::new();
    if !interfaces.is_empty() {
        yaml.push_str(&format!("interfaces: [{}]\n", interfaces.join(", ")));
    }
    yaml.push_str("relay: {drain_timeout: 1s}\nroutes:\n");
    for i in 0..aliases {
        yaml.push_str(&format!(
            "  r{i}: {{scheme: \"tcp,udp\", host: {backend}, port: {}:3478}}\n",
            FIRST_PORT + i
        ));
    }
    yaml
}

#[test]
fn ten_thousand_rules_load_forward_on_the_kernel_path_and_status_reports_fds_and_rss() {
    if !common::require_root(
        "ten_thousand_rules_load_forward_on_the_kernel_path_and_status_reports_fds_and_rss",
    ) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let yaml = many_rules(
        &[&topo.client_link.a_if, &topo.backend_link.a_if],
        &topo.backend_addr().to_string(),
        5000,
    );
    let cfg = TempConfig::new("rule-scale-check", &yaml);
    let out = Command::new(common::forwarder_bin())
        .args(["check", "-c"])
        .arg(&cfg.path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let daemon = Daemon::start(&topo.forwarder, "rule-scale", &yaml);
    // First, middle and last rules of the table, both protocols.
    let picked = [0u16, 2500, 4999];
    in_netns(&topo.client, || {
        for &i in &picked {
            let to = SocketAddr::from((topo.forwarder_addr(), FIRST_PORT + i));
            let mut c = tcp_echo_conn(to);
            tcp_echo_round(&mut c, format!("tcp to r{i}").as_bytes());
            udp_echo(&udp_socket(to), format!("udp to r{i}").as_bytes());
        }
    });
    let status = daemon.status();
    assert_eq!(status["rules"].as_array().map(Vec::len), Some(10_000));
    for &i in &picked {
        let alias = format!("r{i}");
        for proto in ["tcp", "udp"] {
            let k = kernel_rule(&status, &alias, proto);
            assert_eq!(counter(k, "flows"), 1, "{alias}/{proto}: {k}");
            assert_eq!(
                counter(k, "fallback_full") + counter(k, "fallback_other"),
                0,
                "{k}"
            );
            let r = relay_rule(&status, &alias, proto);
            assert_eq!(
                counter(r, "flows"),
                0,
                "the relay carried {alias}/{proto}: {r}"
            );
        }
    }
    // A rule nobody sent to counted nothing (the counters are per rule).
    assert_eq!(counter(kernel_rule(&status, "r1", "udp"), "flows"), 0);
    let process = &status["process"];
    let fds = process["open_fds"].as_u64().expect("open_fds");
    let max_fds = process["max_fds"].as_u64().expect("max_fds");
    let rss = process["rss_bytes"].as_u64().expect("rss_bytes");
    assert!(fds >= 10_000, "one socket per rule: {process}");
    assert!(max_fds >= fds, "{process}");
    assert!(rss > 0, "{process}");
    let pid = status["pid"].as_u64().unwrap();
    let counted = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    assert!(
        counted.abs_diff(fds) < 16,
        "/proc says {counted} descriptors, status {fds}"
    );
    drop(daemon);
}

#[test]
fn check_refuses_more_rules_than_the_kernel_tables_hold_naming_the_limit() {
    let cfg = TempConfig::new("rule-scale-over", &many_rules(&[], "10.0.0.1", 8193));
    let out = Command::new(common::forwarder_bin())
        .args(["check", "-c"])
        .arg(&cfg.path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let errors = stderr_lines(&out);
    assert!(
        errors.iter().any(|l| l.contains(
            "alias `r8192`: found rule number 16386 (one rule per alias and protocol); \
             allowed at most 16384 rules, the size of the kernel tables"
        )),
        "{errors:?}"
    );
}

#[test]
fn a_hard_open_files_limit_below_the_listeners_needs_is_a_start_error_naming_the_numbers() {
    if !common::require_root(
        "a_hard_open_files_limit_below_the_listeners_needs_is_a_start_error_naming_the_numbers",
    ) {
        return;
    }
    let ns = Netns::new("nofile");
    let cfg = TempConfig::new("rule-scale-nofile", &many_rules(&[], "127.0.0.1", 500));
    let mut cmd = ns.command(common::forwarder_bin());
    cmd.args(["run", "--relay-only", "-c"])
        .arg(&cfg.path)
        .arg("--control")
        .arg(cfg.control());
    // SAFETY: only setrlimit between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1500,
                rlim_max: 1500,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let out = common::output_within(&mut cmd, std::time::Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(
            "1000 listening sockets and 1024 descriptors for the daemon itself need 2024, \
             the hard RLIMIT_NOFILE is 1500"
        ),
        "{text}"
    );
}
