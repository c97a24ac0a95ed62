//! `cargo xtask demo`, run whole (with this build's forwarder and a short
//! traffic time): what it explains, its exit code, and that it leaves
//! nothing behind, also when interrupted.
//!
//! It runs the xtask binary `cargo xtask test` has just built.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;

fn xtask() -> std::path::PathBuf {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xtask");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo xtask test`, which builds it",
        bin.display()
    );
    bin
}

fn demo(seconds: u64) -> Command {
    let mut cmd = Command::new(xtask());
    cmd.args(["demo", "--seconds", &seconds.to_string(), "--forwarder"])
        .arg(common::forwarder_bin());
    cmd
}

/// What a demo with process id `pid` could have left: its namespaces
/// (named `fwdt-PID-…`) and its directory.
fn assert_nothing_left_by(pid: u32) {
    let out = common::run(Command::new("ip").args(["netns", "list"]));
    let prefix = format!("fwdt-{pid}-");
    let namespaces = String::from_utf8_lossy(&out.stdout);
    assert!(!namespaces.contains(&prefix), "left behind:\n{namespaces}");
    let dir = std::env::temp_dir().join(format!("forwarder-bench-{pid}"));
    assert!(!dir.exists(), "left behind: {}", dir.display());
}

#[test]
fn the_demo_explains_which_path_carried_what_and_leaves_nothing() {
    if !common::require_root("the_demo_explains_which_path_carried_what_and_leaves_nothing") {
        return;
    }
    let child = demo(3)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the demo");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || tx.send(child.wait_with_output()));
    // Traffic 3 s, start and stop a few more; a hang fails the test.
    let Ok(out) = rx.recv_timeout(Duration::from_secs(60)) else {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
        let _ = waiter.join();
        panic!("the demo still runs after 60 s");
    };
    let out = out.expect("the demo's output");
    let text = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{errors}");
    for expected in [
        // The live status, with both rules.
        "forwarder pid",
        "turn-tcp  tcp  [::]:7878 -> 198.18.2.2:3478  path auto",
        "turn-udp  udp  [::]:7878 -> 198.18.2.2:3478  path auto",
        // The explanation.
        "turn-tcp (tcp): 1 connection by the kernel path",
        "turn-udp (udp): 1 flow by the kernel path",
        "turn-udp (udp): 1 flow left to the relay (reason fragment): the first datagram came in fragments",
        "turn-udp (udp): 1 flow by the relay",
        "went by the kernel path",
        "removed the demo's namespaces, processes and files",
    ] {
        // Long lines are wrapped: compare the words.
        let words = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            words(&text).contains(&words(expected)),
            "no `{expected}` in:\n{text}\n{errors}"
        );
    }
    assert_nothing_left_by(pid);
}

#[test]
fn an_interrupted_demo_removes_what_it_made() {
    if !common::require_root("an_interrupted_demo_removes_what_it_made") {
        return;
    }
    let mut child = demo(20)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the demo");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let started = Instant::now();
    let mut line = String::new();
    // Interrupted while the traffic runs: every part is up.
    while !line.contains("of traffic") {
        line.clear();
        let n = stdout.read_line(&mut line).unwrap();
        assert!(n > 0, "the demo ended before its traffic");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no traffic in 60 s"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let interrupted = Instant::now();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut errors = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut errors).unwrap();
    // The daemon's stop (SIGTERM, then SIGKILL after 3 s) bounds it.
    assert!(
        interrupted.elapsed() < Duration::from_secs(15),
        "took {:?} to stop",
        interrupted.elapsed()
    );
    assert!(!status.success(), "an interrupted demo fails: {rest}");
    assert!(errors.contains("interrupted"), "{errors}");
    assert!(rest.contains("removed the demo's namespaces"), "{rest}");
    assert_nothing_left_by(pid);
}
