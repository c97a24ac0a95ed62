//! Integration tests: upgrading a running daemon in place (SIGUSR2,
//! `forwarder upgrade`) while kernel and relay flows run, in namespaces.
//! The daemons run under `nsenter --net` (host mount namespace) as the
//! crash tests' do, and share their bpffs lock.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::common::eventually;
use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, relay_rule, reserved_ports,
    spawn_in,
};
use crate::common::seccomp::fail_syscall;
use crate::common::traffic::{
    BackendServers, paced_transfer, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket,
};
use crate::common::turn::{listener_addr, turn_rules_on};
use crate::common::{self, Netns, Topology};
use crate::crash::{BpffsAsFound, HOST_BPFFS, assert_nothing_left};
use crate::reload::udp_stream;

const RULES: &str = "
routes:
  bulk: {scheme: tcp, host: 198.18.2.2, port: 7001:3478}
  dgram: {scheme: udp, host: 198.18.2.2, port: 7002:3478}
  rbulk: {scheme: tcp, host: 198.18.2.2, port: 7003:3478, path: relay}
  rdgram: {scheme: udp, host: 198.18.2.2, port: 7004:3478, path: relay}
";

/// The descriptors of `pid` that are BPF maps: a leak across the exec
/// would hold the old image's next to the new image's.
fn bpf_map_fds(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("bpf-map"))
        })
        .count()
}

#[test]
fn sigusr2_mid_transfer_hands_every_flow_to_the_new_image() {
    if !common::require_root("sigusr2_mid_transfer_hands_every_flow_to_the_new_image") {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    topo.forwarder
        .sysctl("net.ipv4.ip_local_reserved_ports", "1000");
    let fwd = topo.forwarder_addr();
    let at = move |port: u16| SocketAddr::from((fwd, port));
    let daemon = Daemon::start_pinning(&topo.forwarder, "upgrade-usr2", RULES);
    let pid = daemon.status()["pid"].as_u64().unwrap();

    const SIZE: u64 = 256 << 20;
    let transfer = |port: u16| {
        let progress = Arc::new(AtomicU64::new(0));
        let seen = progress.clone();
        let thread = spawn_in(&topo.client, move || {
            paced_transfer(at(port), SIZE, progress)
        });
        (thread, seen)
    };
    let (kernel_tcp, kernel_progress) = transfer(7001);
    let (relay_tcp, relay_progress) = transfer(7003);
    let stop_udp = Arc::new(AtomicBool::new(false));
    let stream = |port: u16| {
        let socket = in_netns(&topo.client, || udp_socket(at(port)));
        udp_echo(&socket, b"warm up");
        let stop = stop_udp.clone();
        std::thread::spawn(move || udp_stream(socket, stop))
    };
    let (kernel_udp, relay_udp) = (stream(7002), stream(7004));
    eventually("a quarter of both transfers sent", || {
        kernel_progress.load(Ordering::Relaxed) >= SIZE / 4
            && relay_progress.load(Ordering::Relaxed) >= SIZE / 4
    });
    let before = daemon.status();
    let maps_before = bpf_map_fds(pid);
    assert!(maps_before > 0);

    daemon.signal(libc::SIGUSR2);
    eventually("the new image is up", || {
        daemon.log_text().contains("upgrade done")
    });
    let log = daemon.log_text();
    assert!(
        log.contains("adopted the kernel path of a previous daemon"),
        "{log}"
    );
    assert!(log.contains("1 tcp pairs, 1 udp sessions"), "{log}");
    // The pinned TC links got the new program in one step (link update).
    assert!(log.contains("its link runs our program now"), "{log}");
    assert!(
        kernel_progress.load(Ordering::Relaxed) < SIZE
            && relay_progress.load(Ordering::Relaxed) < SIZE,
        "a transfer ended before the upgrade"
    );
    let after = daemon.status();
    assert_eq!(after["pid"].as_u64(), Some(pid), "the same process");
    assert_eq!(bpf_map_fds(pid), maps_before, "no map descriptor leaked");
    // The counters carry on.
    for (alias, protocol, name) in [
        ("rbulk", "tcp", "bytes_to_backend"),
        ("rdgram", "udp", "datagrams_to_backend"),
    ] {
        let (was, now) = (
            counter(relay_rule(&before, alias, protocol), name),
            counter(relay_rule(&after, alias, protocol), name),
        );
        assert!(was > 0 && now >= was, "{alias} {name}: {was} then {now}");
        assert_eq!(
            counter(relay_rule(&after, alias, protocol), "active"),
            1,
            "{after}"
        );
    }
    for (alias, protocol) in [("bulk", "tcp"), ("dgram", "udp")] {
        assert_eq!(
            counter(kernel_rule(&after, alias, protocol), "flows"),
            1,
            "{after}"
        );
    }

    // The new image's kernel path knows the handed-over relay flows.
    eventually("the relay pair and session in RELAY_FLOWS", || {
        daemon.status()["kernel"]["relay_flow_entries"].as_u64() == Some(2)
    });

    // New flows after the upgrade are forwarded, on both paths.
    for port in [7001, 7003] {
        let mut conn = in_netns(&topo.client, || tcp_echo_conn(at(port)));
        tcp_echo_round(&mut conn, b"after the upgrade");
    }
    for port in [7002, 7004] {
        let socket = in_netns(&topo.client, || udp_socket(at(port)));
        udp_echo(&socket, b"a new client");
    }

    for (name, thread) in [("kernel", kernel_tcp), ("relay", relay_tcp)] {
        let (sent, got) = thread
            .join()
            .unwrap_or_else(|_| panic!("the {name} transfer failed:\n{}", daemon.log_text()));
        assert_eq!(sent, got, "the {name} 256 MiB transfer arrived intact");
    }
    stop_udp.store(true, Ordering::Relaxed);
    for (name, thread) in [("kernel", kernel_udp), ("relay", relay_udp)] {
        let (sent, answered) = thread.join().unwrap();
        assert_eq!(sent, answered, "every {name} datagram came back");
        assert!(sent > 100, "the {name} stream ran ({sent} datagrams)");
    }
    let status = daemon.status();
    assert_eq!(
        counter(relay_rule(&status, "rbulk", "tcp"), "bytes_to_backend"),
        1 + 8 + SIZE + 1 + "after the upgrade".len() as u64,
        "every relay byte counted once, across the upgrade: {status}"
    );

    let control = daemon.control_path().to_path_buf();
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
    assert!(!control.exists(), "the control socket is removed");
    assert_eq!(reserved_ports(&topo.forwarder), "1000");
    assert_nothing_left(&topo);
}

/// `forwarder upgrade` for `daemon`, with its output.
fn upgrade(daemon: &Daemon) -> std::process::Output {
    common::output_within(
        std::process::Command::new(common::forwarder_bin())
            .arg("upgrade")
            .arg("--control")
            .arg(daemon.control_path()),
        WAIT,
    )
}

/// This build, copied into a directory of its own so that a test can put
/// another binary in its place while a daemon runs from it. The directory,
/// and whatever the test put beside the binary, go with the fixture.
struct ReplaceableBinary {
    dir: PathBuf,
    path: PathBuf,
}

impl ReplaceableBinary {
    fn new(name: &str) -> ReplaceableBinary {
        let dir = std::env::temp_dir().join(format!("fwdt-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("forwarder");
        let copy = ReplaceableBinary { dir, path };
        copy.restore();
        copy
    }

    /// Puts this build back in its place.
    fn restore(&self) {
        replace(&self.path, &std::fs::read(common::forwarder_bin()).unwrap());
    }

    /// A file beside the binary.
    fn beside(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl std::ops::Deref for ReplaceableBinary {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for ReplaceableBinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Puts `contents` at `path` as a new file (the running binary's inode stays).
fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    // A child another test's thread forked while the file was open for
    // writing holds it so until that child execs: running it fails with
    // ETXTBSY ("Text file busy") meanwhile.
    let deadline = std::time::Instant::now() + WAIT;
    while std::process::Command::new(path)
        .arg("--help")
        .output()
        .is_err_and(|e| e.raw_os_error() == Some(libc::ETXTBSY))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{} stays busy",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn forwarder_upgrade_refuses_a_broken_binary_and_takes_a_good_one() {
    if !common::require_root("forwarder_upgrade_refuses_a_broken_binary_and_takes_a_good_one") {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let fwd = topo.forwarder_addr();
    let at = move |port: u16| SocketAddr::from((fwd, port));
    let bin = ReplaceableBinary::new("upgrade-bin");
    let daemon = Daemon::start_pinning_from(&topo.forwarder, "upgrade-cli", RULES, &bin);
    let pid = daemon.status()["pid"].as_u64().unwrap();
    let kernel_udp = in_netns(&topo.client, || udp_socket(at(7002)));
    let relay_udp = in_netns(&topo.client, || udp_socket(at(7004)));
    let mut relay_tcp = in_netns(&topo.client, || tcp_echo_conn(at(7003)));
    udp_echo(&kernel_udp, b"before");
    udp_echo(&relay_udp, b"before");
    tcp_echo_round(&mut relay_tcp, b"before");

    replace(
        &bin,
        b"#!/bin/sh\necho 'this build is broken' >&2\nexit 1\n",
    );
    let out = upgrade(&daemon);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("this build is broken"), "{stderr}");
    assert!(stderr.contains("runs on"), "{stderr}");
    assert_eq!(daemon.status()["pid"].as_u64(), Some(pid));
    udp_echo(&kernel_udp, b"after the refusal");
    udp_echo(&relay_udp, b"after the refusal");
    tcp_echo_round(&mut relay_tcp, b"after the refusal");

    bin.restore();
    let out = upgrade(&daemon);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    assert!(
        stdout.contains(&format!("upgraded in place: pid {pid}")),
        "{stdout}"
    );
    udp_echo(&kernel_udp, b"after the upgrade");
    udp_echo(&relay_udp, b"after the upgrade");
    tcp_echo_round(&mut relay_tcp, b"after the upgrade");
    let status = daemon.status();
    assert_eq!(status["pid"].as_u64(), Some(pid));
    assert_eq!(
        counter(relay_rule(&status, "rdgram", "udp"), "flows"),
        1,
        "one session, carried on across the upgrade: {status}"
    );
    drop(relay_tcp);
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
    assert_nothing_left(&topo);
}

#[test]
fn an_upgrade_gives_the_pinned_xdp_and_tc_links_the_new_programs_in_one_step() {
    if !common::require_root(
        "an_upgrade_gives_the_pinned_xdp_and_tc_links_the_new_programs_in_one_step",
    ) {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    topo.accept_xdp_redirects();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start_pinning(
        &topo.forwarder,
        "upgrade-xdp",
        &turn_rules_on(&topo, "", "xdp"),
    );
    let to = listener_addr(&topo);
    let udp = in_netns(&topo.client, || udp_socket(to));
    let mut tcp = in_netns(&topo.client, || tcp_echo_conn(to));
    let xdp_packets = |daemon: &Daemon| {
        let status = daemon.status();
        counter(kernel_rule(&status, "turn-udp", "udp"), "xdp_packets")
    };
    for i in 0..100u32 {
        udp_echo(&udp, &i.to_be_bytes());
    }
    tcp_echo_round(&mut tcp, b"before");
    let before = xdp_packets(&daemon);
    assert!(before > 0, "XDP carries the flow");

    daemon.signal(libc::SIGUSR2);
    eventually("the new image is up", || {
        daemon.log_text().contains("upgrade done")
    });
    let log = daemon.log_text();
    for hook in ["XDP", "TC"] {
        assert!(
            log.contains(&format!(
                "took over the {hook} hook of the previous daemon: its link runs our program now"
            )),
            "{hook}: {log}"
        );
    }
    for i in 100..200u32 {
        udp_echo(&udp, &i.to_be_bytes());
    }
    tcp_echo_round(&mut tcp, b"after");
    let after = xdp_packets(&daemon);
    assert!(
        after >= before + 100,
        "XDP carries it on, counted on: {before} then {after}"
    );
    drop(tcp);
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
    assert_nothing_left(&topo);
}

/// One `H` transfer (as the backend servers take it: `H`, a length, the
/// bytes; answered with their SHA-256), read slower than the client sends:
/// the relay's writes to it wait often, with bytes in the buffer.
fn slow_hashing_backend(ns: &Netns, port: u16) -> std::thread::JoinHandle<()> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    let (ready, up) = std::sync::mpsc::channel();
    let thread = spawn_in(ns, move || {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        ready.send(()).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).unwrap();
        let mut left = u64::from_be_bytes(head[1..].try_into().unwrap());
        let mut hash = Sha256::new();
        const CHUNK: usize = 64 << 10;
        let mut buf = vec![0u8; CHUNK];
        while left > 0 {
            let n = conn.read(&mut buf[..CHUNK.min(left as usize)]).unwrap();
            assert!(n > 0, "the stream ended {left} bytes early");
            hash.update(&buf[..n]);
            left -= n as u64;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        conn.write_all(&hash.finalize()).unwrap();
    });
    up.recv_timeout(WAIT).expect("the backend listens");
    thread
}

#[test]
fn where_splice_is_refused_the_buffered_copy_is_handed_over_with_nothing_held() {
    if !common::require_root(
        "where_splice_is_refused_the_buffered_copy_is_handed_over_with_nothing_held",
    ) {
        return;
    }
    let ns = Netns::new("upg-buf");
    let backend = slow_hashing_backend(&ns, 3479);
    let yaml = "routes:\n  bulk: {scheme: tcp, bind: 127.0.0.1, port: 7878:3479}\n";
    // The filter goes through the exec with the process: both images copy
    // through a buffer.
    let daemon = Daemon::start_with(
        &ns,
        "upgrade-nosplice",
        yaml,
        "info,forwarder=debug",
        |cmd| {
            cmd.arg("--relay-only");
            // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
            unsafe { cmd.pre_exec(|| fail_syscall(libc::SYS_splice, libc::EINVAL)) };
        },
    );
    let pid = daemon.status()["pid"].as_u64();
    const SIZE: u64 = 128 << 20;
    let progress = Arc::new(AtomicU64::new(0));
    let transfer = {
        let progress = progress.clone();
        let to = SocketAddr::from(([127, 0, 0, 1], 7878));
        spawn_in(&ns, move || paced_transfer(to, SIZE, progress))
    };
    eventually("a quarter of the transfer sent", || {
        progress.load(Ordering::Relaxed) >= SIZE / 4
    });
    daemon.signal(libc::SIGUSR2);
    eventually("the new image is up", || {
        daemon.log_text().contains("upgrade done")
    });
    assert!(
        progress.load(Ordering::Relaxed) < SIZE,
        "the transfer ended before the upgrade"
    );
    let (sent, received) = transfer.join().expect("the transfer");
    assert_eq!(sent, received, "SHA-256 of the 128 MiB at the backend");
    backend.join().unwrap();
    assert_eq!(daemon.status()["pid"].as_u64(), pid);
    let log = daemon.stop();
    let after = log
        .split("upgraded in place from")
        .nth(1)
        .unwrap_or_else(|| panic!("no upgrade:\n{log}"));
    assert!(after.contains("1 tcp pairs"), "{log}");
    assert!(
        after.contains("splice refused for this flow; copying through a buffer"),
        "the new image copied through a buffer too:\n{log}"
    );
}

/// A "new binary" that passes `check` but whose `run` fails for real: it
/// runs this build on a rule file naming an interface that does not
/// exist, so its kernel path cannot start, after its relay has resumed.
fn failing_binary(path: &Path, broken_config: &Path) {
    let script = format!(
        "#!/bin/sh\n\
         real='{real}'\n\
         if [ \"$1\" = run ]; then\n\
           prev=\n\
           for a; do shift; [ \"$prev\" = -c ] && a='{broken}'; set -- \"$@\" \"$a\"; prev=\"$a\"; done\n\
         fi\n\
         exec \"$real\" \"$@\"\n",
        real = common::forwarder_bin(),
        broken = broken_config.display(),
    );
    replace(path, script.as_bytes());
}

#[test]
fn a_new_binary_that_fails_to_start_gives_everything_back_mid_transfer() {
    if !common::require_root("a_new_binary_that_fails_to_start_gives_everything_back_mid_transfer")
    {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let fwd = topo.forwarder_addr();
    let at = move |port: u16| SocketAddr::from((fwd, port));
    let bin = ReplaceableBinary::new("fallback-bin");
    let daemon = Daemon::start_pinning_from(&topo.forwarder, "upgrade-fallback", RULES, &bin);
    let pid = daemon.status()["pid"].as_u64().unwrap();
    let broken = bin.beside("broken.yaml");
    std::fs::write(&broken, format!("interfaces: [fwdt-nosuch0]\n{RULES}")).unwrap();

    const SIZE: u64 = 256 << 20;
    let transfer = |port: u16| {
        let progress = Arc::new(AtomicU64::new(0));
        let seen = progress.clone();
        let thread = spawn_in(&topo.client, move || {
            paced_transfer(at(port), SIZE, progress)
        });
        (thread, seen)
    };
    let (kernel_tcp, kernel_progress) = transfer(7001);
    let (relay_tcp, relay_progress) = transfer(7003);
    let stop_udp = Arc::new(AtomicBool::new(false));
    let relay_udp = {
        let socket = in_netns(&topo.client, || udp_socket(at(7004)));
        udp_echo(&socket, b"warm up");
        let stop = stop_udp.clone();
        std::thread::spawn(move || udp_stream(socket, stop))
    };
    eventually("a quarter of both transfers sent", || {
        kernel_progress.load(Ordering::Relaxed) >= SIZE / 4
            && relay_progress.load(Ordering::Relaxed) >= SIZE / 4
    });

    failing_binary(&bin, &broken);
    let out = upgrade(&daemon);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = daemon.log_text();
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{log}");
    assert!(
        stderr.contains("the daemon runs on unchanged: the new binary failed to start:")
            && stderr.contains("fwdt-nosuch0"),
        "{stderr}"
    );
    assert!(
        kernel_progress.load(Ordering::Relaxed) < SIZE
            && relay_progress.load(Ordering::Relaxed) < SIZE,
        "a transfer ended before the failed upgrade"
    );
    assert_eq!(
        daemon.status()["pid"].as_u64(),
        Some(pid),
        "the same process"
    );
    // The new image's relay had resumed (the kernel path starts after
    // it): it froze again and handed back its flows as they were then.
    assert!(log.contains("relay carries on"), "{log}");
    assert!(
        log.contains("giving everything back to the previous binary"),
        "{log}"
    );
    assert_eq!(
        log.matches("upgraded in place from").count(),
        2,
        "the new image, then the old one again: {log}"
    );
    assert!(log.contains("1 tcp pairs, 1 udp sessions"), "{log}");
    assert!(!log.contains("upgrade done"), "{log}");
    let status = daemon.status();
    assert_eq!(
        counter(relay_rule(&status, "rbulk", "tcp"), "active"),
        1,
        "{status}"
    );
    assert_eq!(
        counter(kernel_rule(&status, "bulk", "tcp"), "flows"),
        1,
        "{status}"
    );

    // New flows are forwarded, on both paths.
    for port in [7001, 7003] {
        let mut conn = in_netns(&topo.client, || tcp_echo_conn(at(port)));
        tcp_echo_round(&mut conn, b"after the fallback");
    }
    for port in [7002, 7004] {
        let socket = in_netns(&topo.client, || udp_socket(at(port)));
        udp_echo(&socket, b"a new client");
    }
    for (name, thread) in [("kernel", kernel_tcp), ("relay", relay_tcp)] {
        let (sent, got) = thread
            .join()
            .unwrap_or_else(|_| panic!("the {name} transfer failed:\n{}", daemon.log_text()));
        assert_eq!(sent, got, "the {name} 256 MiB transfer arrived intact");
    }
    stop_udp.store(true, Ordering::Relaxed);
    let (sent, answered) = relay_udp.join().unwrap();
    assert_eq!(sent, answered, "every relay datagram came back in order");
    assert!(sent > 100, "the relay stream ran ({sent} datagrams)");
    let status = daemon.status();
    assert_eq!(
        counter(relay_rule(&status, "rbulk", "tcp"), "bytes_to_backend"),
        1 + 8 + SIZE + 1 + "after the fallback".len() as u64,
        "every relay byte counted once, through both execs: {status}"
    );

    // A good binary afterwards upgrades as usual.
    bin.restore();
    let out = upgrade(&daemon);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    assert!(
        stdout.contains(&format!("upgraded in place: pid {pid}")),
        "{stdout}"
    );
    for port in [7001, 7003] {
        let mut conn = in_netns(&topo.client, || tcp_echo_conn(at(port)));
        tcp_echo_round(&mut conn, b"after the upgrade");
    }
    let log = daemon.stop();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("giving everything back to the previous binary"),
        "{log}"
    );
    assert_nothing_left(&topo);
}

#[test]
fn a_failed_start_freezes_the_buffered_copy_again_and_gives_it_back_with_nothing_lost() {
    if !common::require_root(
        "a_failed_start_freezes_the_buffered_copy_again_and_gives_it_back_with_nothing_lost",
    ) {
        return;
    }
    let ns = Netns::new("upg-fbk");
    let backend = slow_hashing_backend(&ns, 3479);
    let routes = "routes:\n  bulk: {scheme: tcp, bind: 127.0.0.1, port: 7878:3479}\n";
    let bin = ReplaceableBinary::new("fallback-buf");
    // The old image has no kernel path (a local backend); the new one is
    // made to start one (`docker:`) on an interface that does not exist:
    // it fails after its relay resumed and copied bytes again.
    let broken = bin.beside("broken.yaml");
    let docker = bin.beside("no-docker.sock");
    std::fs::write(
        &broken,
        format!(
            "interfaces: [fwdt-nosuch0]\ndocker: {{socket: {}}}\n{routes}",
            docker.display()
        ),
    )
    .unwrap();
    // Splice fails in both images (the filter goes through every exec).
    let daemon = Daemon::start_from_with(
        &ns,
        "upgrade-fallback-buf",
        routes,
        &bin,
        "info,forwarder=debug",
        |cmd| {
            // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
            unsafe { cmd.pre_exec(|| fail_syscall(libc::SYS_splice, libc::EINVAL)) };
        },
    );
    let pid = daemon.status()["pid"].as_u64();
    const SIZE: u64 = 128 << 20;
    let progress = Arc::new(AtomicU64::new(0));
    let transfer = {
        let progress = progress.clone();
        let to = SocketAddr::from(([127, 0, 0, 1], 7878));
        spawn_in(&ns, move || paced_transfer(to, SIZE, progress))
    };
    eventually("a quarter of the transfer sent", || {
        progress.load(Ordering::Relaxed) >= SIZE / 4
    });
    failing_binary(&bin, &broken);
    let out = upgrade(&daemon);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stderr}\n{}",
        daemon.log_text()
    );
    assert!(
        stderr.contains("the new binary failed to start:"),
        "{stderr}"
    );
    assert!(
        progress.load(Ordering::Relaxed) < SIZE,
        "the transfer ended before the failed upgrade"
    );
    let (sent, received) = transfer
        .join()
        .unwrap_or_else(|_| panic!("the transfer failed:\n{}", daemon.log_text()));
    assert_eq!(sent, received, "SHA-256 of the 128 MiB at the backend");
    backend.join().unwrap();
    assert_eq!(daemon.status()["pid"].as_u64(), pid);
    let log = daemon.stop();
    assert!(
        log.contains("giving everything back to the previous binary"),
        "{log}"
    );
    assert!(
        !log.contains("the relay cannot freeze again"),
        "the relay froze again: {log}"
    );
    // The old image, started again (the second record read), copies the
    // pair through a buffer too.
    let again = log
        .split("upgraded in place from")
        .nth(2)
        .unwrap_or_else(|| panic!("the old image did not take the record back:\n{log}"));
    assert!(
        again.contains("1 tcp pairs")
            && again.contains("splice refused for this flow; copying through a buffer"),
        "{log}"
    );
}

#[test]
fn a_new_binary_whose_kernel_path_cannot_start_gives_everything_back() {
    if !common::require_root("a_new_binary_whose_kernel_path_cannot_start_gives_everything_back") {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let fwd = topo.forwarder_addr();
    let at = move |port: u16| SocketAddr::from((fwd, port));
    let bin = ReplaceableBinary::new("nokernel-bin");
    let daemon = Daemon::start_pinning_from(&topo.forwarder, "upgrade-nokernel", RULES, &bin);
    let pid = daemon.status()["pid"].as_u64().unwrap();
    // Passes `check`, but a start cannot take an address this host lacks
    // for SNAT: the kernel path fails where the relay alone would run.
    let broken = bin.beside("broken.yaml");
    std::fs::write(
        &broken,
        format!("kernel: {{snat_addresses: [198.51.100.77]}}\n{RULES}"),
    )
    .unwrap();

    const SIZE: u64 = 64 << 20;
    let progress = Arc::new(AtomicU64::new(0));
    let transfer = {
        let progress = progress.clone();
        spawn_in(&topo.client, move || {
            paced_transfer(at(7001), SIZE, progress)
        })
    };
    let dgram = in_netns(&topo.client, || udp_socket(at(7002)));
    udp_echo(&dgram, b"before");
    eventually("a quarter of the transfer sent", || {
        progress.load(Ordering::Relaxed) >= SIZE / 4
    });

    failing_binary(&bin, &broken);
    let out = upgrade(&daemon);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = daemon.log_text();
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{log}");
    assert!(
        stderr.contains("the new binary failed to start: cannot start the kernel path, which the running daemon has")
            && stderr.contains("198.51.100.77"),
        "{stderr}"
    );
    assert!(
        !log.contains("the relay carries every flow"),
        "the new image did not run on without its kernel path: {log}"
    );
    assert_eq!(daemon.status()["pid"].as_u64(), Some(pid));
    let status = daemon.status();
    assert!(
        status["kernel"].is_object(),
        "the kernel path runs: {status}"
    );
    udp_echo(&dgram, b"after");
    let Ok((sent, got)) = transfer.join() else {
        panic!("the transfer failed:\n{}", daemon.log_text());
    };
    assert_eq!(sent, got, "the 64 MiB transfer arrived intact");
    let status = daemon.status();
    for (alias, protocol) in [("bulk", "tcp"), ("dgram", "udp")] {
        assert_eq!(
            counter(kernel_rule(&status, alias, protocol), "flows"),
            1,
            "{status}"
        );
    }
    let log = daemon.stop();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("giving everything back to the previous binary"),
        "{log}"
    );
    assert_nothing_left(&topo);
}
