//! Integration tests: the daemon's command line and its answers to bad input.
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::{self, Netns, TempConfig, stderr_lines};

/// A rule the kernel path would take (a loopback target would not need it).
/// No traffic is ever sent to its target.
const ONE_RULE: &str =
    "routes:\n  echo:\n    scheme: tcp\n    host: 198.18.9.2\n    port: 17001:17002\n";

/// Bad input ends the daemon at once; this only keeps a regression from hanging.
const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// Asserts a failed run that said exactly one line containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let lines = stderr_lines(out);
    assert!(
        !out.status.success(),
        "expected a failure, got {:?}",
        out.status
    );
    assert_eq!(
        lines.len(),
        1,
        "expected one line, got:\n{}",
        lines.join("\n")
    );
    assert!(
        lines[0].contains(needle),
        "expected `{needle}` in: {}",
        lines[0]
    );
}

#[test]
fn a_missing_config_file_is_one_clear_line() {
    let out = common::output_within(
        Command::new(common::forwarder_bin()).args([
            "run",
            "-c",
            "/nonexistent/forwarder.yaml",
            "--relay-only",
        ]),
        EXIT_LIMIT,
    );
    assert_one_line_error(&out, "/nonexistent/forwarder.yaml");
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unreadable rule file is a config error"
    );
}

#[test]
fn check_exits_2_on_a_missing_file() {
    let out = Command::new(common::forwarder_bin())
        .args(["check", "-c", "/nonexistent/forwarder.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/forwarder.yaml"));
}

#[test]
fn status_without_a_daemon_is_one_clear_line() {
    let out = Command::new(common::forwarder_bin())
        .args(["status", "--control", "/nonexistent/forwarder.sock"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "no forwarder is running");
}

#[test]
fn without_root_the_kernel_path_is_refused_in_one_line() {
    if !common::require_root("without_root_the_kernel_path_is_refused_in_one_line") {
        return;
    }
    let cfg = TempConfig::new("nonroot", ONE_RULE);
    // World-readable, so that `nobody` can read the file and fail on privileges alone.
    run_chmod(&cfg.dir, "755");
    run_chmod(&cfg.path, "644");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(common::forwarder_bin())
    .args(["run", "-c"])
    .arg(&cfg.path)
    .args(["--control", &cfg.control()]);
    let out = common::output_within(&mut cmd, EXIT_LIMIT);
    assert_one_line_error(&out, "needs root");
    assert_eq!(out.status.code(), Some(1));
}

fn run_chmod(path: &std::path::Path, mode: &str) {
    common::run(Command::new("chmod").arg(mode).arg(path));
}

#[test]
fn a_missing_interface_is_one_clear_line() {
    if !common::require_root("a_missing_interface_is_one_clear_line") {
        return;
    }
    let ns = Netns::new("noif");
    let cfg = TempConfig::new("noif", &format!("interfaces: [nosuch0]\n{ONE_RULE}"));
    let mut cmd = ns.command(common::forwarder_bin());
    cmd.args(["run", "-c"])
        .arg(&cfg.path)
        .args(["--control", &cfg.control()]);
    let out = common::output_within(&mut cmd, EXIT_LIMIT);
    assert_one_line_error(&out, "interface `nosuch0` does not exist");
    assert_eq!(out.status.code(), Some(1));
}

/// The shipped example, as `cargo xtask run` uses it.
fn shipped_example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/forwarder.yaml")
}

#[test]
fn check_prints_the_shipped_examples_table_and_its_warnings() {
    let out = Command::new(common::forwarder_bin())
        .args(["check", "-c"])
        .arg(shipped_example())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let rows: Vec<&str> = stdout.lines().collect();
    assert!(
        rows[0].starts_with("ID") && rows[0].contains("ALIAS"),
        "{stdout}"
    );
    // The TURN pair: one port, both protocols, one rule each.
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        let row = rows
            .iter()
            .find(|r| r.split_whitespace().nth(1) == Some(alias))
            .unwrap_or_else(|| panic!("no row for {alias}:\n{stdout}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[2], proto, "{row}");
        assert!(cells[3].ends_with(":7878"), "{row}");
        assert_eq!(cells[5], "127.0.0.1:3478", "{row}");
    }
    for alias in [
        "dns", "echo", "web", "game", "game-q", "voice", "ssh-jump", "syslog",
    ] {
        assert!(
            rows.iter()
                .any(|r| r.split_whitespace().nth(1) == Some(alias)),
            "no row for {alias}:\n{stdout}"
        );
    }
    // The included Godoxy file's web-UI field and web route are named, with
    // their place, and are no rules.
    let warnings: Vec<&str> = stderr.lines().collect();
    for (needle, what) in [
        ("homepage", "an ignored Godoxy field"),
        ("dashboard", "a web route"),
    ] {
        assert!(
            warnings.iter().any(|w| w.contains("WARN")
                && w.contains("godoxy-routes.yml:")
                && w.contains(needle)),
            "no warning for {what} (`{needle}`):\n{stderr}"
        );
    }
    assert!(!stdout.contains("dashboard"), "{stdout}");
}

#[test]
fn a_partly_invalid_file_is_refused_whole_by_check_and_run() {
    // One good rule between two bad ones.
    let yaml = "routes:\n  \
                bad-scheme:\n    scheme: sctp\n    port: 17011:17012\n  \
                good:\n    scheme: tcp\n    port: 17013:17014\n  \
                bad-port:\n    scheme: udp\n    port: 17015:70000\n";
    let cfg = TempConfig::new("invalid", yaml);
    // The good rule's port is held while the daemon runs: a daemon that
    // bound it before refusing the file would say so in a third line.
    let held = std::net::TcpListener::bind(("0.0.0.0", 17013)).expect("port 17013 free");
    let check = Command::new(common::forwarder_bin())
        .args(["check", "-c"])
        .arg(&cfg.path)
        .output()
        .unwrap();
    let mut run = Command::new(common::forwarder_bin());
    run.args(["run", "--relay-only", "-c"])
        .arg(&cfg.path)
        .args(["--control", &cfg.control()]);
    let run = common::output_within(&mut run, EXIT_LIMIT);
    let file = cfg.path.display().to_string();
    for (out, what) in [(&check, "check"), (&run, "run")] {
        assert_eq!(out.status.code(), Some(2), "{what}: {out:?}");
        let lines = stderr_lines(out);
        assert_eq!(
            lines.len(),
            2,
            "{what}: both errors, nothing else:\n{lines:#?}"
        );
        assert!(
            lines[0].contains(&format!("{file}:3:")) && lines[0].contains("bad-scheme"),
            "{what}: {}",
            lines[0]
        );
        assert!(
            lines[0].contains("sctp") && lines[0].contains("tcp"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains(&format!("{file}:10:")) && lines[1].contains("bad-port"),
            "{what}: {}",
            lines[1]
        );
        assert!(lines[1].contains("70000"), "{}", lines[1]);
    }
    assert!(
        check.stdout.is_empty(),
        "check printed a table for an invalid file"
    );
    // Nothing started: no control socket, and no bind was tried (the two
    // lines above are the file's errors only).
    assert!(!std::path::Path::new(&cfg.control()).exists());
    drop(held);
}

/// A TCP listener and a UDP socket on one port of 127.0.0.1, outside the
/// default SNAT range, where rules may not listen.
fn bound_on_both_protocols() -> (std::net::TcpListener, std::net::UdpSocket, u16) {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if (40000..=59999).contains(&port) {
            continue;
        }
        if let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            return (tcp, udp, port);
        }
    }
}

/// A free port on 127.0.0.1 for TCP and UDP both (for a moment), outside
/// the default SNAT range.
fn free_port_both_protocols() -> u16 {
    bound_on_both_protocols().2
}

#[test]
fn relay_only_daemon_forwards_a_turn_pair_and_stops_on_sigint() {
    use std::io::{Read, Write};
    // The backends: a TCP echo and a UDP echo on one port, like a TURN server.
    // Held from the pick on: tests running beside this one bind ports too.
    let (tcp_backend, udp_backend, target) = bound_on_both_protocols();
    std::thread::spawn(move || {
        for mut conn in tcp_backend.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    let _ = conn.write_all(&buf[..n]);
                }
            });
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp_backend.recv_from(&mut buf) {
            let _ = udp_backend.send_to(&buf[..n], from);
        }
    });
    // Godoxy's own labels for it, unchanged.
    let listen = free_port_both_protocols();
    let yaml = format!(
        "labels:\n  \
         proxy.aliases: turn-tcp,turn-udp\n  \
         proxy.turn-tcp.scheme: tcp\n  \
         proxy.turn-udp.scheme: udp\n  \
         proxy.turn-tcp.port: {listen}:{target}\n  \
         proxy.turn-udp.port: {listen}:{target}\n  \
         proxy.*.bind: 127.0.0.1\n\
         relay: {{drain_timeout: 1s}}\n"
    );
    let cfg = TempConfig::new("relayonly", &yaml);
    let log = cfg.dir.join("daemon.log");
    let mut cmd = Command::new(common::forwarder_bin());
    cmd.args(["run", "--relay-only", "-c"])
        .arg(&cfg.path)
        .args(["--control", &cfg.control()])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut daemon = common::ChildGuard::spawn(&mut cmd);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let status = || {
        let out = Command::new(common::forwarder_bin())
            .args(["status", "--json", "--control", &cfg.control()])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    };
    let deadline = std::time::Instant::now() + EXIT_LIMIT;
    while status().is_none() {
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "the daemon exited:\n{}",
            log_text()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no status:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", listen)).unwrap();
    tcp.set_read_timeout(Some(EXIT_LIMIT)).unwrap();
    tcp.write_all(b"over tcp").unwrap();
    let mut echoed = [0u8; 8];
    tcp.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"over tcp");
    drop(tcp);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(EXIT_LIMIT)).unwrap();
    udp.send_to(b"over udp!", ("127.0.0.1", listen)).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = udp.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from.port()), (&b"over udp!"[..], listen));

    let doc = status().expect("status");
    assert_eq!(doc["kernel_path"], false, "{doc}");
    let relay = doc["relay"].as_array().unwrap();
    for (alias, proto, bytes) in [("turn-tcp", "tcp", 8), ("turn-udp", "udp", 9)] {
        let rule = relay
            .iter()
            .find(|r| r["alias"] == alias && r["protocol"] == proto)
            .unwrap_or_else(|| panic!("no {alias} in {doc}"));
        assert_eq!(rule["flows"], 1, "{rule}");
        assert_eq!(rule["bytes_to_backend"], bytes, "{rule}");
    }

    // SIGHUP does not end it (no reload yet): it keeps forwarding.
    daemon.signal(libc::SIGHUP).unwrap();
    let deadline = std::time::Instant::now() + EXIT_LIMIT;
    while !log_text().contains("SIGHUP") {
        assert!(
            std::time::Instant::now() < deadline,
            "no SIGHUP line:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "SIGHUP ended it"
    );
    udp.send_to(b"after hup", ("127.0.0.1", listen)).unwrap();
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"after hup");

    daemon.signal(libc::SIGINT).unwrap();
    let deadline = std::time::Instant::now() + EXIT_LIMIT;
    let exit = loop {
        if let Some(exit) = daemon.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stop:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = log_text();
    assert!(exit.success(), "{exit}:\n{log}");
    // One line per rule at start, and the stop.
    for proto in ["tcp", "udp"] {
        let line = format!("relay: {proto} 127.0.0.1:{listen} -> 127.0.0.1:{target}");
        assert_eq!(log.matches(&line).count(), 1, "`{line}` once in:\n{log}");
    }
    assert!(log.contains("SIGINT") && log.contains("stopped"), "{log}");
    assert!(
        !std::path::Path::new(&cfg.control()).exists(),
        "the control socket is removed at stop"
    );
}
