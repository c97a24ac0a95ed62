//! Integration test: Docker discovery against a real Docker Engine. The
//! test's own dockerd and the forwarder run in one namespace (where docker0
//! is); the client is a namespace routed to it. Containers carry Godoxy's
//! labels; traffic reaches them through the kernel path.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::common::docker::DockerEngine;
use crate::common::harness::{Daemon, counter, in_netns, kernel_rule, relay_rule};
use crate::common::traffic::{connect, tcp_echo_round, udp_echo, udp_socket};
use crate::common::{self, Netns, eventually, veth};

const TURN_TCP: u16 = 7878;
const GAME: u16 = 7900;

/// The container `name` as the daemon's status shows it, if it does.
fn discovered(d: &Daemon, name: &str) -> Option<serde_json::Value> {
    d.status()["docker"]["containers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
}

fn has_rule(d: &Daemon, alias: &str) -> bool {
    d.status()["rules"]
        .as_array()
        .is_some_and(|r| r.iter().any(|r| r["alias"] == alias))
}

/// The first backend of the rule `alias`, if it is in the table.
fn backend_of(d: &Daemon, alias: &str) -> Option<String> {
    let rules = d.status()["rules"].as_array()?.clone();
    let rule = rules.iter().find(|r| r["alias"] == alias)?;
    rule["backends"][0].as_str().map(str::to_owned)
}

/// A new TCP connection is refused (nothing listens, no kernel rule).
fn tcp_refused(client: &Netns, to: SocketAddr) -> bool {
    in_netns(client, || {
        match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Err(e) => e.kind() == ErrorKind::ConnectionRefused,
            Ok(_) => false,
        }
    })
}

fn udp_unanswered(socket: &UdpSocket) -> bool {
    let mut buf = [0u8; 64];
    socket.send(b"anyone?").unwrap();
    // No answer, or the port unreachable of a connected socket.
    matches!(socket.recv(&mut buf), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::ConnectionRefused))
}

#[test]
fn docker_labels_route_through_the_kernel_path_and_follow_the_containers() {
    if !common::require_root(
        "docker_labels_route_through_the_kernel_path_and_follow_the_containers",
    ) {
        return;
    }
    let engine = DockerEngine::start();
    let client = Netns::new("dclient");
    let link = veth(&engine.ns, &client, 61);
    client.ip(&["route", "add", "default", "via", &link.a_addr.to_string()]);
    let fwd = link.a_addr;
    let at = move |port: u16| SocketAddr::from((fwd, port));

    // Godoxy's TURN example: TCP and UDP on one port; the UDP alias has no
    // scheme and gets udp because the container exposes 3478 as UDP only.
    engine.run(
        "turn",
        &[
            ("proxy.aliases", "turn-tcp,turn-udp"),
            ("proxy.turn-tcp.scheme", "tcp"),
            ("proxy.turn-tcp.port", "7878:3478"),
            ("proxy.turn-udp.port", "7878:3478"),
        ],
        &["--expose", "3478/udp"],
        "udp-echo 3478 & exec nc -ll -p 3478 -e cat",
    );
    let yaml = format!(
        "interfaces: [{}, docker0]\ndocker: {{socket: {}}}\n",
        link.a_if,
        engine.socket().display()
    );
    let daemon = Daemon::start(&engine.ns, "docker", &yaml);
    eventually("the turn container's routes", || {
        has_rule(&daemon, "turn-tcp") && has_rule(&daemon, "turn-udp")
    });
    let turn = discovered(&daemon, "turn").expect("turn in status");
    assert_eq!(
        turn["aliases"],
        serde_json::json!(["turn-tcp", "turn-udp"]),
        "{turn}"
    );
    assert_eq!(daemon.status()["docker"]["connected"], true);

    let mut stream = in_netns(&client, || connect(at(TURN_TCP)));
    tcp_echo_round(&mut stream, b"turn over tcp");
    let dgram = in_netns(&client, || udp_socket(at(TURN_TCP)));
    udp_echo(&dgram, b"turn over udp");
    let status = daemon.status();
    assert_eq!(
        counter(kernel_rule(&status, "turn-tcp", "tcp"), "flows"),
        1,
        "{status}"
    );
    assert_eq!(
        counter(kernel_rule(&status, "turn-udp", "udp"), "flows"),
        1,
        "{status}"
    );
    drop(stream);
    let turn_before = backend_of(&daemon, "turn-tcp").unwrap();

    // Stopped: its rules go, and new flows are refused.
    engine.docker_ok(&["stop", "-t", "1", "turn"]);
    eventually("the turn rules removed", || !has_rule(&daemon, "turn-tcp"));
    assert!(
        tcp_refused(&client, at(TURN_TCP)),
        "a new TCP flow to the stopped container"
    );
    let fresh = in_netns(&client, || udp_socket(at(TURN_TCP)));
    assert!(
        udp_unanswered(&fresh),
        "a new UDP flow to the stopped container"
    );

    // Another container, other labels: forwarded soon after it starts, with
    // no restart of the daemon.
    let started = Instant::now();
    engine.run(
        "game",
        &[
            ("proxy.aliases", "game"),
            ("proxy.game.scheme", "tcp"),
            ("proxy.game.port", "7900:4000"),
        ],
        &[],
        "exec nc -ll -p 4000 -e cat",
    );
    let mut game = loop {
        if let Ok(s) = in_netns(&client, || {
            TcpStream::connect_timeout(&at(GAME), Duration::from_secs(1))
        }) {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "game not forwarded:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    game.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp_echo_round(&mut game, b"a new container");
    eprintln!("docker run to the first forwarded connection: {took:?}");
    // `docker run` itself takes most of it; the daemon's part is a debounce
    // of at most 0.6 s and a reload. Busy shared cores get 3x.
    assert!(
        took < Duration::from_secs(3),
        "forwarded only after {took:?}"
    );

    // Bad labels: that container is skipped with its name and label; the
    // others are not touched.
    engine.run(
        "broken",
        &[
            ("proxy.aliases", "bad"),
            ("proxy.bad.scheme", "tcp"),
            ("proxy.bad.port", "70000:4000"),
        ],
        &[],
        "exec sleep 600",
    );
    eventually("the broken container reported", || {
        discovered(&daemon, "broken").is_some_and(|c| !c["errors"].as_array().unwrap().is_empty())
    });
    let broken = discovered(&daemon, "broken").unwrap();
    let errors = broken["errors"].to_string();
    assert!(
        errors.contains("docker container `broken`, label `proxy.bad.port`"),
        "{errors}"
    );
    assert!(!has_rule(&daemon, "bad"));
    let log = daemon.log_text();
    assert!(
        log.contains("container `broken` skipped") && log.contains("proxy.bad.port"),
        "{log}"
    );
    tcp_echo_round(&mut game, b"still here");
    // A reload binds the relay's listener before it writes the kernel rule,
    // so that no SYN is refused: the first connection, made in a loop while
    // the rule appeared, may have come in between and be the relay's.
    let before = daemon.status();
    let kernel_before = counter(kernel_rule(&before, "game", "tcp"), "flows");
    assert_eq!(
        kernel_before + counter(relay_rule(&before, "game", "tcp"), "flows"),
        1,
        "{before}"
    );
    let mut again = in_netns(&client, || connect(at(GAME)));
    tcp_echo_round(&mut again, b"and new flows too");
    let status = daemon.status();
    assert_eq!(
        counter(kernel_rule(&status, "game", "tcp"), "flows"),
        kernel_before + 1,
        "{status}"
    );

    // `check --docker` shows what the daemon found.
    let check = std::process::Command::new(common::forwarder_bin())
        .args(["check", "--docker", "-c"])
        .arg(daemon.config_path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{out}{err}");
    assert!(out.contains("docker container `game`: game"), "{out}");
    assert!(out.contains("docker container `broken`: skipped"), "{out}");
    assert!(
        err.contains("docker container `broken`, label `proxy.bad.port`"),
        "{err}"
    );

    // The stopped container comes back at another address (the new ones
    // took its old one): new flows go to where it is now.
    engine.docker_ok(&["start", "turn"]);
    let now = engine.docker_ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "turn"]);
    let now = format!("{now}:3478");
    assert_ne!(now, turn_before, "turn came back at its old address");
    eventually("turn-tcp follows the new address", || {
        backend_of(&daemon, "turn-tcp") == Some(now.clone())
    });
    let mut back = in_netns(&client, || connect(at(TURN_TCP)));
    tcp_echo_round(&mut back, b"turn at its new address");
    udp_echo(&in_netns(&client, || udp_socket(at(TURN_TCP))), b"udp too");
}

#[test]
fn docker_unreachable_the_file_rules_run_and_status_says_so() {
    if !common::require_root("docker_unreachable_the_file_rules_run_and_status_says_so") {
        return;
    }
    let ns = Netns::new("nodocker");
    let missing = std::env::temp_dir().join(format!("{}-no-docker.sock", ns.name));
    let yaml = format!(
        "docker: {{socket: {}}}\nroutes:\n  local: {{scheme: tcp, host: 127.0.0.1, port: 7001:7002}}\n",
        missing.display()
    );
    in_netns(&ns, || {
        let listener = std::net::TcpListener::bind("127.0.0.1:7002").unwrap();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut r = s.try_clone().unwrap();
                std::thread::spawn(move || std::io::copy(&mut r, &mut s));
            }
        });
    });
    let daemon = Daemon::start(&ns, "nodocker", &yaml);
    eventually("status names the failure and a retry", || {
        let d = &daemon.status()["docker"];
        d["connected"] == false
            && d["error"]
                .as_str()
                .is_some_and(|e| e.contains(&*missing.to_string_lossy()))
            && d["retry_in_ms"].as_u64().is_some()
    });
    let mut s = in_netns(&ns, || connect(SocketAddr::from(([127, 0, 0, 1], 7001))));
    tcp_echo_round(&mut s, b"the file's rule runs");
    // It keeps trying, backing off.
    let first = daemon.status()["docker"]["retry_in_ms"].as_u64().unwrap();
    eventually("a longer retry", || {
        daemon.status()["docker"]["retry_in_ms"].as_u64().unwrap() > first
    });
}
