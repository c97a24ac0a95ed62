//! Integration tests: per-rule and global ACLs, enforced by the kernel path
//! and by the relay, with real traffic from three client addresses in
//! namespaces: 198.18.1.2 (the client's own), .3 and .4 (added to its veth).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::common::eventually;
use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule};
use crate::common::traffic::{BackendServers, tcp_echo_round};
use crate::common::{self, Netns, TempConfig, Topology};

const A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const B: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
const C: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 4);

/// How long a dropped client waits before the test calls it dropped.
const SILENCE: Duration = Duration::from_millis(700);

// kern and relay: the same allow inside a wider deny, one on each path.
// kreject/rreject: reject B (the global drop of C takes the rule's action).
// plain: only the global ACL.
const RULES: &str = "
acl: {deny: [198.18.1.4/32]}
routes:
  kern:
    scheme: tcp,udp
    host: 198.18.2.2
    port: 7101:3478
    acl: {deny: [198.18.1.0/24], allow: [198.18.1.2/32]}
  relay:
    scheme: tcp,udp
    host: 198.18.2.2
    port: 7102:3478
    path: relay
    acl: {deny: [198.18.1.0/24], allow: [198.18.1.2]}
  kreject: {host: 198.18.2.2, port: 7103:3478, acl: {deny: [198.18.1.3/32], action: reject}}
  rreject: {host: 198.18.2.2, port: 7105:3478, path: relay, acl: {deny: [198.18.1.3/32], action: reject}}
  plain: {scheme: 'tcp,udp', host: 198.18.2.2, port: 7104:3478}
";

/// What a TCP connect from `from` to `to` came to.
#[derive(Debug, PartialEq, Eq)]
enum Tcp {
    /// Echoed a round trip.
    Forwarded,
    /// Refused at once (an RST answered the SYN).
    Refused,
    /// No answer at all within `SILENCE`.
    Silent,
    /// Connected, then closed by the forwarder before any byte came back.
    ClosedAtOnce,
}

fn tcp_from(from: impl Into<IpAddr>, to: SocketAddr) -> Tcp {
    let from = from.into();
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    let started = Instant::now();
    match socket.connect_timeout(&to.into(), SILENCE) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "refused, but only after {:?}",
                started.elapsed()
            );
            return Tcp::Refused;
        }
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            return Tcp::Silent;
        }
        // The handshake completed and the relay reset it before connect
        // saw it complete: closed at once, as below.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return Tcp::ClosedAtOnce,
        Err(e) => panic!("connect from {from} to {to}: {e}"),
    }
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The backend's echo mode, then one round.
    if stream.write_all(b"Eping").is_err() {
        return Tcp::ClosedAtOnce;
    }
    let mut back = [0u8; 4];
    match stream.read_exact(&mut back) {
        Ok(()) if &back == b"ping" => Tcp::Forwarded,
        Ok(()) => panic!("wrong echo {back:?} from {to}"),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            Tcp::ClosedAtOnce
        }
        Err(e) => panic!("echo from {from} via {to}: {e}"),
    }
}

/// Whether a datagram from `from` to `to` is echoed (a few tries: the
/// first may wait for neighbour resolution).
fn udp_from(from: impl Into<IpAddr>, to: SocketAddr) -> bool {
    let from = from.into();
    let socket = UdpSocket::bind((from, 0)).unwrap();
    socket.connect(to).unwrap();
    socket.set_read_timeout(Some(SILENCE)).unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        socket.send(b"datagram").unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                assert_eq!(&buf[..n], b"datagram");
                return true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("udp from {from} via {to}: {e}"),
        }
    }
    false
}

#[test]
fn acls_allow_and_deny_by_client_address_on_both_paths() {
    if !common::require_root("acls_allow_and_deny_by_client_address_on_both_paths") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    for extra in [B, C] {
        topo.client.ip(&[
            "addr",
            "add",
            &format!("{extra}/24"),
            "dev",
            &topo.client_link.b_if,
        ]);
    }
    let _servers = BackendServers::start(&topo.backend);
    let fwd = topo.forwarder_addr();
    let at = move |port: u16| SocketAddr::from((fwd, port));
    let daemon = Daemon::start(&topo.forwarder, "acl", RULES);

    let outcomes = in_netns(&topo.client, || {
        let mut seen = Vec::new();
        for (rule, port) in [("kern", 7101), ("relay", 7102)] {
            for from in [A, B, C] {
                seen.push((rule, "tcp", from, format!("{:?}", tcp_from(from, at(port)))));
                seen.push((rule, "udp", from, format!("{:?}", udp_from(from, at(port)))));
            }
        }
        for (rule, port) in [("kreject", 7103), ("rreject", 7105), ("plain", 7104)] {
            for from in [A, B, C] {
                seen.push((rule, "tcp", from, format!("{:?}", tcp_from(from, at(port)))));
            }
        }
        for from in [A, B, C] {
            seen.push((
                "plain",
                "udp",
                from,
                format!("{:?}", udp_from(from, at(7104))),
            ));
        }
        seen
    });
    let got = |rule: &str, proto: &str, from: Ipv4Addr| {
        outcomes
            .iter()
            .find(|o| (o.0, o.1, o.2) == (rule, proto, from))
            .map(|o| o.3.as_str())
            .unwrap()
    };
    let fwd_tcp = "Forwarded";
    let expected = [
        // An allow inside a wider deny, then the deny, then the global deny.
        ("kern", "tcp", A, fwd_tcp),
        ("kern", "tcp", B, "Silent"),
        ("kern", "tcp", C, "Silent"),
        ("kern", "udp", A, "true"),
        ("kern", "udp", B, "false"),
        ("kern", "udp", C, "false"),
        // The relay completes the handshake before it sees the client:
        // drop closes the connection before a byte is forwarded.
        ("relay", "tcp", A, fwd_tcp),
        ("relay", "tcp", B, "ClosedAtOnce"),
        ("relay", "tcp", C, "ClosedAtOnce"),
        ("relay", "udp", A, "true"),
        ("relay", "udp", B, "false"),
        ("relay", "udp", C, "false"),
        // The kernel answers a rejected SYN with an RST; the relay resets.
        ("kreject", "tcp", A, fwd_tcp),
        ("kreject", "tcp", B, "Refused"),
        ("kreject", "tcp", C, "Refused"),
        ("rreject", "tcp", A, fwd_tcp),
        ("rreject", "tcp", B, "ClosedAtOnce"),
        ("rreject", "tcp", C, "ClosedAtOnce"),
        // The global ACL alone: a deny list, so the rest is allowed.
        ("plain", "tcp", A, fwd_tcp),
        ("plain", "tcp", B, fwd_tcp),
        ("plain", "tcp", C, "Silent"),
        ("plain", "udp", A, "true"),
        ("plain", "udp", B, "true"),
        ("plain", "udp", C, "false"),
    ];
    for (rule, proto, from, want) in expected {
        assert_eq!(got(rule, proto, from), want, "{rule}/{proto} from {from}");
    }

    // Each path counts what it denied; nothing denied reached the other.
    let status = daemon.status();
    for (rule, proto, kernel_flows, kernel_denied, relay_flows, relay_denied) in [
        ("kern", "udp", 1, 2, 0, 0),
        ("relay", "tcp", 0, 0, 1, 2),
        ("relay", "udp", 0, 0, 1, 2),
        ("kreject", "tcp", 1, 2, 0, 0),
        ("rreject", "tcp", 0, 0, 1, 2),
        ("plain", "tcp", 2, 1, 0, 0),
    ] {
        let k = kernel_rule(&status, rule, proto);
        let r = relay_rule(&status, rule, proto);
        assert_eq!(counter(k, "flows"), kernel_flows, "{rule}/{proto}: {k}");
        assert_eq!(counter(r, "flows"), relay_flows, "{rule}/{proto}: {r}");
        // A dropped SYN may be sent again within SILENCE, and a dropped
        // datagram up to three times: at least one each.
        assert!(
            counter(k, "acl_denied") >= kernel_denied,
            "{rule}/{proto}: {k}"
        );
        assert!(
            counter(r, "acl_denied") >= relay_denied,
            "{rule}/{proto}: {r}"
        );
        if kernel_denied == 0 {
            assert_eq!(counter(k, "acl_denied"), 0, "{rule}/{proto}: {k}");
        }
        if relay_denied == 0 {
            assert_eq!(counter(r, "acl_denied"), 0, "{rule}/{proto}: {r}");
        }
    }
    let k = kernel_rule(&status, "kern", "tcp");
    assert_eq!(counter(k, "flows"), 1, "{k}");
    assert!(counter(k, "acl_denied") >= 2, "{k}");
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

const RELOAD_BEFORE: &str = "
routes:
  kern: {host: 198.18.2.2, port: 7201:3478, acl: {deny: [198.18.1.3/32], action: reject}}
";

const RELOAD_AFTER: &str = "
routes:
  kern: {host: 198.18.2.2, port: 7201:3478, acl: {deny: [198.18.1.2/32], action: reject}}
";

#[test]
fn a_reload_applies_a_changed_acl_to_new_flows_only() {
    if !common::require_root("a_reload_applies_a_changed_acl_to_new_flows_only") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    topo.client.ip(&[
        "addr",
        "add",
        &format!("{B}/24"),
        "dev",
        &topo.client_link.b_if,
    ]);
    let _servers = BackendServers::start(&topo.backend);
    let to = SocketAddr::from((topo.forwarder_addr(), 7201));
    let daemon = Daemon::start(&topo.forwarder, "acl-reload", RELOAD_BEFORE);

    let mut live = in_netns(&topo.client, || {
        assert_eq!(tcp_from(B, to), Tcp::Refused);
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.bind(&SocketAddr::from((A, 0)).into()).unwrap();
        socket.connect(&to.into()).unwrap();
        let mut stream: TcpStream = socket.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(b"E").unwrap();
        tcp_echo_round(&mut stream, b"before");
        stream
    });
    std::fs::write(daemon.config_path(), RELOAD_AFTER).unwrap();
    daemon.signal(libc::SIGHUP);
    eventually("the reload is logged", || {
        daemon
            .log_text()
            .contains("reload: 0 added, 1 changed, 0 removed, 0 unchanged")
    });
    // A's open flow goes on; its new ones are refused, B's now pass.
    tcp_echo_round(&mut live, b"after");
    in_netns(&topo.client, || {
        assert_eq!(tcp_from(A, to), Tcp::Refused);
        assert_eq!(tcp_from(B, to), Tcp::Forwarded);
    });
    tcp_echo_round(&mut live, b"still");
    drop(live);
    let status = daemon.status();
    let k = kernel_rule(&status, "kern", "tcp");
    assert_eq!(
        (counter(k, "flows"), counter(k, "acl_denied")),
        (2, 2),
        "{k}"
    );
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn check_prints_each_rules_acl() {
    let cfg = TempConfig::new("acl-check", RULES);
    let out = std::process::Command::new(common::forwarder_bin())
        .args(["check", "-c"])
        .arg(&cfg.path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    let acl_of = |alias: &str, proto: &str| {
        table
            .lines()
            .find(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                cells.get(1) == Some(&alias) && cells.get(2) == Some(&proto)
            })
            .and_then(|l| {
                l.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .last()
            })
            .unwrap_or_else(|| panic!("no row {alias}/{proto} in:\n{table}"))
            .to_owned()
    };
    assert!(table.lines().next().unwrap().ends_with("ACL"), "{table}");
    assert_eq!(
        acl_of("kern", "udp"),
        "allow 198.18.1.2/32, deny 198.18.1.4/32, deny 198.18.1.0/24, else deny (drop)"
    );
    assert_eq!(
        acl_of("kreject", "tcp"),
        "deny 198.18.1.3/32, deny 198.18.1.4/32, else allow (reject)"
    );
    assert_eq!(
        acl_of("plain", "tcp"),
        "deny 198.18.1.4/32, else allow (drop)"
    );
}

// Relay only (loopback targets): IPv6 entries match IPv6 clients, and
// not IPv4 ones on the same dual-stack socket.
const RULES_V6: &str = "
routes:
  deny6: {scheme: 'tcp,udp', host: 127.0.0.1, port: 7301:3478, acl: {deny: ['::1']}}
  allow6: {scheme: 'tcp,udp', host: 127.0.0.1, port: 7302:3478, acl: {allow: ['::1/128']}}
";

#[test]
fn the_relay_checks_ipv6_clients_against_ipv6_entries() {
    if !common::require_root("the_relay_checks_ipv6_clients_against_ipv6_entries") {
        return;
    }
    let ns = Netns::new("acl6");
    let _servers = BackendServers::start(&ns);
    let daemon = Daemon::start(&ns, "acl6", RULES_V6);
    let (v4, v6) = (Ipv4Addr::LOCALHOST, Ipv6Addr::LOCALHOST);
    let seen = in_netns(&ns, || {
        let at4 = |port: u16| SocketAddr::from((v4, port));
        let at6 = |port: u16| SocketAddr::from((v6, port));
        [
            (tcp_from(v6, at6(7301)), udp_from(v6, at6(7301))),
            (tcp_from(v4, at4(7301)), udp_from(v4, at4(7301))),
            (tcp_from(v6, at6(7302)), udp_from(v6, at6(7302))),
            (tcp_from(v4, at4(7302)), udp_from(v4, at4(7302))),
        ]
    });
    assert_eq!(
        seen,
        [
            (Tcp::ClosedAtOnce, false), // ::1 denied
            (Tcp::Forwarded, true),     // an IPv6 deny list lets IPv4 through
            (Tcp::Forwarded, true),     // ::1 allowed
            (Tcp::ClosedAtOnce, false), // an allow list denies the rest, IPv4 too
        ]
    );
    let status = daemon.status();
    for rule in ["deny6", "allow6"] {
        let tcp = relay_rule(&status, rule, "tcp");
        assert_eq!(
            (counter(tcp, "flows"), counter(tcp, "acl_denied")),
            (1, 1),
            "{tcp}"
        );
        let udp = relay_rule(&status, rule, "udp");
        assert_eq!(counter(udp, "flows"), 1, "{udp}");
        assert!(counter(udp, "acl_denied") >= 1, "{udp}");
    }
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
}
