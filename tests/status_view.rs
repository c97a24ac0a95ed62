//! `forwarder status` for people, against a daemon with live traffic:
//! the one-shot table, `--watch` in a pseudo-terminal (`script`), and
//! `--watch` into a pipe.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::harness::{Daemon, WAIT, forwarding_on, spawn_in};
use crate::common::traffic::BackendServers;
use crate::common::{self, Topology, output_within};

const LISTEN_PORT: u16 = 7878;

fn turn_rules(topo: &Topology) -> String {
    format!(
        "relay: {{drain_timeout: 1s}}\n\
         routes:\n\
         \x20 turn-tcp: {{scheme: tcp, host: {b}, port: {LISTEN_PORT}:3478}}\n\
         \x20 turn-udp: {{scheme: udp, host: {b}, port: {LISTEN_PORT}:3478}}\n",
        b = topo.backend_addr()
    )
}

/// A UDP stream from the client (echoed by the backend) until dropped.
struct Stream {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(topo: &Topology) -> Stream {
        let to = SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = spawn_in(&topo.client, move || {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            socket.connect(to).unwrap();
            socket.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                let _ = socket.send(&[7u8; 1000]);
                while socket.recv(&mut buf).is_ok() {}
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Stream {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A daemon on the TURN rules with a UDP stream through it. Fields drop
/// in order: the stream ends before the daemon, the namespaces go last.
struct Lab {
    stream: Stream,
    daemon: Daemon,
    _servers: BackendServers,
    topo: Topology,
}

impl Lab {
    fn start(name: &str) -> Lab {
        let topo = Topology::new();
        forwarding_on(&topo);
        let servers = BackendServers::start(&topo.backend);
        let daemon = Daemon::start(&topo.forwarder, name, &turn_rules(&topo));
        Lab {
            stream: Stream::start(&topo),
            daemon,
            _servers: servers,
            topo,
        }
    }
}

/// The kernel row under the rule line of `alias`.
fn kernel_row<'a>(screen: &'a str, alias: &str) -> &'a str {
    let mut lines = screen.lines().skip_while(|l| !l.starts_with(alias));
    let rule = lines
        .next()
        .unwrap_or_else(|| panic!("no {alias} row:\n{screen}"));
    assert!(rule.contains("path auto"), "{rule}");
    lines
        .next()
        .filter(|l| l.trim_start().starts_with("kernel"))
        .unwrap_or_else(|| panic!("no kernel row under {alias}:\n{screen}"))
}

/// The row's columns: path, flows, active, packets, pkt/s, bytes (two
/// words), bytes/s (two words).
fn columns(row: &str) -> Vec<&str> {
    row.split_whitespace().collect()
}

#[test]
fn human_status_shows_rules_paths_and_rates_while_traffic_runs() {
    if !common::require_root("human_status_shows_rules_paths_and_rates_while_traffic_runs") {
        return;
    }
    let lab = Lab::start("status-human");
    let (daemon, topo) = (lab.daemon, &lab.topo);
    // The totals come from the sweeper's last pass.
    let deadline = std::time::Instant::now() + WAIT;
    while daemon.status()["kernel"]["conntrack_entries"].as_u64() < Some(2) {
        assert!(
            std::time::Instant::now() < deadline,
            "no conntrack entry in {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = output_within(
        Command::new(common::forwarder_bin())
            .arg("status")
            .arg("--control")
            .arg(daemon.control_path()),
        Duration::from_secs(10),
    );
    drop(lab.stream);
    let screen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{screen}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(screen.contains("kernel path on"), "{screen}");
    assert!(screen.contains("(daemon clock)"), "{screen}");
    let backend = format!("[::]:{LISTEN_PORT} -> {}:3478", topo.backend_addr());
    for alias in ["turn-tcp  tcp  ", "turn-udp  udp  "] {
        let line = screen.lines().find(|l| l.starts_with(alias));
        let line = line.unwrap_or_else(|| panic!("no `{alias}` line:\n{screen}"));
        assert!(line.contains(&backend), "{line}");
    }
    let udp = columns(kernel_row(&screen, "turn-udp"));
    assert_eq!(udp[1], "1", "one kernel flow: {udp:?}\n{screen}");
    // About 500 datagrams a second each way over the sample.
    assert!(
        udp[4].ends_with("/s") && udp[4] != "0/s",
        "{udp:?}\n{screen}"
    );
    assert!(udp[8] == "KiB/s" || udp[8] == "MiB/s", "{udp:?}\n{screen}");
    assert!(screen.contains("conntrack   1 of 131k flows"), "{screen}");
    assert!(screen.contains("SNAT ports  1 of 20.0k in use"), "{screen}");
    for line in screen.lines() {
        assert!(line.chars().count() <= 100, "wider than 100: {line}");
    }
    daemon.stop();
}

/// The kernel packets of turn-udp on each screen of a `--watch` output.
fn packets_per_screen(output: &str, separator: &str) -> Vec<String> {
    output
        .split(separator)
        .filter(|screen| screen.contains("turn-udp"))
        .map(|screen| columns(kernel_row(screen, "turn-udp"))[3].to_owned())
        .collect()
}

#[test]
fn watch_refreshes_in_place_on_a_terminal_and_in_blocks_into_a_pipe() {
    if !common::require_root("watch_refreshes_in_place_on_a_terminal_and_in_blocks_into_a_pipe") {
        return;
    }
    let lab = Lab::start("status-watch");
    let daemon = lab.daemon;
    let watch = format!(
        "{} status --watch 0.5 --control {}",
        common::forwarder_bin(),
        daemon.control_path().display()
    );

    // A pseudo-terminal: each screen starts at home (ESC [ H).
    let tty = run_for(
        Command::new("script").args(["-qfc", &watch, "/dev/null"]),
        Duration::from_millis(2600),
    );
    let packets = packets_per_screen(&tty, "\x1b[H");
    assert!(packets.len() >= 3, "screens: {packets:?}\n{tty:?}");
    assert!(
        packets.windows(2).all(|w| w[0] != w[1]),
        "the counters move between refreshes: {packets:?}"
    );

    // A pipe: no escapes, one block after the other.
    let piped = run_for(
        Command::new("sh").args(["-c", &watch]),
        Duration::from_millis(1800),
    );
    assert!(!piped.contains('\x1b'), "{piped:?}");
    let blocks = packets_per_screen(&piped, "forwarder pid");
    assert!(blocks.len() >= 2, "blocks: {blocks:?}\n{piped}");
    assert!(blocks.windows(2).all(|w| w[0] != w[1]), "{blocks:?}");
    daemon.stop();
}

/// Runs `cmd` for `time`, then SIGTERM to it (and to what it started), and
/// returns what it wrote.
fn run_for(cmd: &mut Command, time: Duration) -> String {
    use std::os::unix::process::CommandExt;
    let child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let group = child.id() as i32;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(time);
        // SAFETY: signals the process group this test started.
        unsafe { libc::kill(-group, libc::SIGTERM) };
    });
    let out = child.wait_with_output().unwrap();
    killer.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(!errors.contains("forwarder:"), "{errors}\n{text}");
    text
}
