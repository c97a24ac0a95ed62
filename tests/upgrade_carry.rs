//! Integration tests: what an upgrade in place carries besides the
//! running rules' flows: Docker's containers (their rules keep their
//! listeners and flows), the metrics endpoint's socket (no scrape is
//! refused), the backends' health (one that is down stays down), the
//! flows of rules a reload removed (they drain on, also beside a rule
//! that listens where they did), and the kernel flows into flow tables
//! of a new size (also after a crash). The daemons run under `nsenter
//! --net`, as the upgrade tests' do.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::common::docker::DockerEngine;
use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, relay_rule, spawn_in,
};
use std::time::Duration;

use crate::common::traffic::{
    BackendServers, connect, paced_transfer, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket,
};
use crate::common::{self, Netns, Topology, eventually, veth};
use crate::crash::{BpffsAsFound, HOST_BPFFS, assert_nothing_left};
use crate::health::{TcpServer, two_backends};

/// SIGUSR2, then waits until the new image says it runs everything.
fn upgrade(daemon: &Daemon) {
    let pid = daemon.status()["pid"].as_u64();
    daemon.signal(libc::SIGUSR2);
    eventually("the new image is up", || {
        daemon.log_text().contains("upgrade done")
    });
    let log = daemon.log_text();
    assert!(!log.contains("upgrade failed"), "{log}");
    assert!(
        !log.contains("handed-over descriptors"),
        "nothing handed over may be left unclaimed:\n{log}"
    );
    assert_eq!(daemon.status()["pid"].as_u64(), pid, "the same process");
}

/// `forwarder upgrade` for `daemon`, with its output.
fn forwarder_upgrade(daemon: &Daemon) -> std::process::Output {
    common::output_within(
        std::process::Command::new(common::forwarder_bin())
            .arg("upgrade")
            .arg("--control")
            .arg(daemon.control_path()),
        WAIT,
    )
}

fn has_rule(d: &Daemon, alias: &str) -> bool {
    d.status()["rules"]
        .as_array()
        .is_some_and(|r| r.iter().any(|r| r["alias"] == alias))
}

#[test]
fn an_upgrade_carries_the_containers_rules_and_their_flows_and_discovery_goes_on() {
    if !common::require_root(
        "an_upgrade_carries_the_containers_rules_and_their_flows_and_discovery_goes_on",
    ) {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let engine = DockerEngine::start();
    let client = Netns::new("ucclient");
    let link = veth(&engine.ns, &client, 62);
    client.ip(&["route", "add", "default", "via", &link.a_addr.to_string()]);
    let fwd = link.a_addr;
    let at = move |port: u16| SocketAddr::from((fwd, port));
    engine.run(
        "echo",
        &[
            ("proxy.aliases", "ck,cr"),
            ("proxy.ck.scheme", "tcp"),
            ("proxy.ck.port", "7910:4000"),
            ("proxy.cr.scheme", "tcp"),
            ("proxy.cr.port", "7911:4000"),
            ("proxy.cr.path", "relay"),
        ],
        &[],
        "exec nc -ll -p 4000 -e cat",
    );
    let yaml = format!(
        "interfaces: [{}, docker0]\ndocker: {{socket: {}}}\n",
        link.a_if,
        engine.socket().display()
    );
    let daemon = Daemon::start_pinning(&engine.ns, "upgrade-docker", &yaml);
    eventually("the echo container's routes", || {
        has_rule(&daemon, "ck") && has_rule(&daemon, "cr")
    });
    // The relay binds before the kernel rule is written: the first flow
    // of a fresh rule may be the relay's, so ck's is made once both are in.
    let mut kernel_flow = in_netns(&client, || connect(at(7910)));
    let mut relay_flow = in_netns(&client, || connect(at(7911)));
    tcp_echo_round(&mut kernel_flow, b"kernel, before");
    tcp_echo_round(&mut relay_flow, b"relay, before");
    let before = daemon.status();
    assert_eq!(
        counter(kernel_rule(&before, "ck", "tcp"), "flows"),
        1,
        "{before}"
    );
    assert_eq!(counter(relay_rule(&before, "ck", "tcp"), "flows"), 0);
    assert_eq!(counter(relay_rule(&before, "cr", "tcp"), "active"), 1);

    upgrade(&daemon);
    let log = daemon.log_text();
    assert!(log.contains("1 tcp pairs, 0 udp sessions"), "{log}");
    // Started with the containers' rules: the relay took over cr's socket.
    assert!(
        log.contains("from the previous image with 1 tcp pairs and 0 udp sessions"),
        "{log}"
    );
    let after = daemon.status();
    assert_eq!(
        after["docker"]["containers"][0]["aliases"],
        serde_json::json!(["ck", "cr"]),
        "{after}"
    );
    // Both flows go on, byte for byte, on the paths they had.
    tcp_echo_round(&mut kernel_flow, b"kernel, after the upgrade");
    tcp_echo_round(&mut relay_flow, b"relay, after the upgrade");
    let after = daemon.status();
    assert_eq!(counter(kernel_rule(&after, "ck", "tcp"), "flows"), 1);
    assert_eq!(counter(relay_rule(&after, "ck", "tcp"), "flows"), 0);
    let cr = relay_rule(&after, "cr", "tcp");
    assert_eq!((counter(cr, "flows"), counter(cr, "active")), (1, 1));
    let sent = (b"relay, before".len() + b"relay, after the upgrade".len()) as u64;
    assert_eq!(counter(cr, "bytes_to_backend"), sent, "{after}");

    // Discovery goes on: Docker listed the same containers (nothing
    // changed), and a new container is forwarded.
    eventually("discovery connected again", || {
        daemon.status()["docker"]["connected"] == true
    });
    engine.run(
        "late",
        &[
            ("proxy.aliases", "late"),
            ("proxy.late.scheme", "tcp"),
            ("proxy.late.port", "7912:4000"),
        ],
        &[],
        "exec nc -ll -p 4000 -e cat",
    );
    eventually("the late container's rule", || has_rule(&daemon, "late"));
    let mut late = in_netns(&client, || connect(at(7912)));
    tcp_echo_round(&mut late, b"a container started after the upgrade");
    tcp_echo_round(&mut relay_flow, b"relay, at the end");
    tcp_echo_round(&mut kernel_flow, b"kernel, at the end");

    // Without `docker:` in the file, the new image would not follow
    // Docker: refused until a reload applies it, and everything runs on.
    std::fs::write(
        daemon.config_path(),
        format!("interfaces: [{}, docker0]\n", link.a_if),
    )
    .unwrap();
    let out = forwarder_upgrade(&daemon);
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("has no `docker:` any more") && said.contains("`forwarder reload` first"),
        "{said}"
    );
    tcp_echo_round(&mut relay_flow, b"relay, after the refusal");
    tcp_echo_round(&mut late, b"late, after the refusal");

    // The reload stops following Docker: the containers' rules are
    // removed, their flows drain, and the upgrade goes through.
    let out = daemon.reload();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let removed = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("removed "))
        .count();
    assert_eq!(removed, 3, "ck, cr and late: {stdout}");
    let status = daemon.status();
    assert!(status["docker"].is_null(), "{status}");
    assert!(
        daemon.log_text().contains("docker: "),
        "{}",
        daemon.log_text()
    );
    assert!(
        in_netns(&client, || TcpStream::connect_timeout(&at(7911), WAIT))
            .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
        "a new connection to a removed container rule"
    );
    tcp_echo_round(&mut relay_flow, b"relay, draining");
    tcp_echo_round(&mut late, b"late, draining");
    tcp_echo_round(&mut kernel_flow, b"kernel, draining");
    // (The log holds the refusal above: not `upgrade`, which reads it.)
    let out = forwarder_upgrade(&daemon);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("upgraded in place"),
        "{said}"
    );
    assert!(!daemon.log_text().contains("handed-over descriptors"));
    tcp_echo_round(&mut relay_flow, b"relay, draining in the new image");
    tcp_echo_round(&mut late, b"late, draining in the new image");
    tcp_echo_round(&mut kernel_flow, b"kernel, draining in the new image");
    assert!(daemon.status()["docker"].is_null());

    // `docker:` back: the next reload follows Docker again from its
    // first listing.
    std::fs::write(daemon.config_path(), &yaml).unwrap();
    let out = daemon.reload();
    assert!(out.status.success(), "{out:?}");
    eventually("the containers' rules again", || {
        has_rule(&daemon, "ck") && has_rule(&daemon, "late")
    });
    let mut again = in_netns(&client, || connect(at(7912)));
    tcp_echo_round(&mut again, b"followed again");
    drop((again, late, relay_flow, kernel_flow));
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
    // The image that started with no rule for the kernel path still took
    // over the pinned one, so the stop removed it.
    let cookie = in_netns(&engine.ns, forwarder::state::netns_cookie).unwrap();
    let pins = std::path::Path::new("/sys/fs/bpf/forwarder").join(format!("netns-{cookie}"));
    assert!(!pins.exists(), "pins left in {}:\n{log}", pins.display());
}

/// One scrape of `addr` in a new connection: the status code, or the error.
fn scrape(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, WAIT)?;
    s.set_read_timeout(Some(WAIT))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {text:?}")))?;
    Ok((code, text))
}

/// The value of the sample line that starts with `series` in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

const METRICS_RULES: &str = "
metrics: {listen: 127.0.0.1:9109}
routes:
  rbulk: {scheme: tcp, host: 198.18.2.2, port: 7003:3478, path: relay}
";

#[test]
fn scrapes_across_an_upgrade_are_never_refused_and_the_counters_carry_on() {
    if !common::require_root(
        "scrapes_across_an_upgrade_are_never_refused_and_the_counters_carry_on",
    ) {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start_pinning(&topo.forwarder, "upgrade-metrics", METRICS_RULES);
    let to = SocketAddr::from((topo.forwarder_addr(), 7003));
    for round in 0..3 {
        let mut s = in_netns(&topo.client, || tcp_echo_conn(to));
        tcp_echo_round(&mut s, format!("flow {round}").as_bytes());
    }
    const FLOWS: &str =
        r#"forwarder_flows_opened_total{alias="rbulk",protocol="tcp",path="relay"}"#;
    let endpoint = SocketAddr::from(([127, 0, 0, 1], 9109));
    let (code, text) = in_netns(&topo.forwarder, || scrape(endpoint)).unwrap();
    assert_eq!(code, 200, "{text}");
    assert_eq!(sample(&text, FLOWS), Some(3.0), "{text}");

    // Scrapes back to back in the daemon's namespace, across the upgrade.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let scraper = {
        let (stop, ok, refused) = (stop.clone(), ok.clone(), refused.clone());
        spawn_in(&topo.forwarder, move || {
            let mut failed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match scrape(endpoint) {
                    Ok((200, text)) if sample(&text, FLOWS) == Some(3.0) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((code, text)) => failed.push(format!("{code}: {text}")),
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            failed
        })
    };
    eventually("scrapes before the upgrade", || {
        ok.load(Ordering::Relaxed) >= 20
    });
    upgrade(&daemon);
    let at_upgrade = ok.load(Ordering::Relaxed);
    eventually("scrapes after the upgrade", || {
        ok.load(Ordering::Relaxed) >= at_upgrade + 20
    });
    stop.store(true, Ordering::Relaxed);
    let failed = scraper.join().unwrap();
    eprintln!(
        "scrapes: {at_upgrade} before the upgrade, {} in all",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(refused.load(Ordering::Relaxed), 0, "scrapes refused");
    assert!(failed.is_empty(), "failed scrapes: {failed:?}");
    // The relay counters carry on: one more flow counts as the fourth.
    let mut s = in_netns(&topo.client, || tcp_echo_conn(to));
    tcp_echo_round(&mut s, b"after the upgrade");
    let (_, text) = in_netns(&topo.forwarder, || scrape(endpoint)).unwrap();
    assert_eq!(sample(&text, FLOWS), Some(4.0), "{text}");
    drop(s);
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

/// Which backend answered each of `n` new TCP connections to `port`
/// (the health tests' servers send their name, `A` or `B`).
fn answered_by(topo: &Topology, port: u16, n: usize) -> Vec<u8> {
    let to = SocketAddr::from((topo.forwarder_addr(), port));
    in_netns(&topo.client, || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&to, WAIT).expect("connect");
                s.set_read_timeout(Some(WAIT)).unwrap();
                let mut who = Vec::new();
                s.read_to_end(&mut who).expect("read the backend's name");
                assert_eq!(who.len(), 1, "{who:?}");
                who[0]
            })
            .collect()
    })
}

fn backend_state(daemon: &Daemon, alias: &str, index: usize) -> String {
    let status = daemon.status();
    let rules = status["rules"].as_array().unwrap();
    let rule = rules.iter().find(|r| r["alias"] == alias).unwrap();
    rule["health"][index]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_backend_down_before_an_upgrade_takes_no_flow_after_it() {
    if !common::require_root("a_backend_down_before_an_upgrade_takes_no_flow_after_it") {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let (topo, a, b) = two_backends();
    let _b = TcpServer::start(&topo.backend, b, b'B');
    // A slow check: a fresh state would take three checks (3 s) to find
    // A down, so every flow right after the upgrade shows which it had.
    let yaml = format!(
        "routes:
  hck: {{scheme: tcp, port: 7300:3478, backends: [{a}, {b}], path: tc, healthcheck: {{interval: 1s, timeout: 300ms, fall: 3, rise: 2}}}}
  hcr: {{scheme: tcp, port: 7301:3478, backends: [{a}, {b}], path: relay, healthcheck: {{interval: 1s, timeout: 300ms, fall: 3, rise: 2}}}}
"
    );
    let daemon = Daemon::start_pinning(&topo.forwarder, "upgrade-health", &yaml);
    // A has no server: its checks fail until it is out.
    eventually("A down on both rules", || {
        backend_state(&daemon, "hck", 0) == "down" && backend_state(&daemon, "hcr", 0) == "down"
    });
    assert_eq!(answered_by(&topo, 7300, 10), vec![b'B'; 10]);

    upgrade(&daemon);
    assert_eq!(backend_state(&daemon, "hck", 0), "down");
    assert_eq!(backend_state(&daemon, "hcr", 0), "down");
    assert_eq!(backend_state(&daemon, "hck", 1), "up");
    // Every new flow goes to B, on both paths (A would refuse it).
    assert_eq!(answered_by(&topo, 7300, 20), vec![b'B'; 20]);
    assert_eq!(answered_by(&topo, 7301, 20), vec![b'B'; 20]);
    let status = daemon.status();
    assert_eq!(counter(relay_rule(&status, "hcr", "tcp"), "flows"), 20);
    assert_eq!(
        counter(relay_rule(&status, "hcr", "tcp"), "connect_failures"),
        0
    );
    assert_eq!(counter(kernel_rule(&status, "hck", "tcp"), "flows"), 30);
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

const DRAINING_RULES: &str = "
timeouts: {udp_idle: 3s, udp_unreplied: 3s}
routes:
  keep: {scheme: tcp, host: 198.18.2.2, port: 7003:3478, path: relay}
  gone: {scheme: tcp, host: 198.18.2.2, port: 7005:3478, path: relay}
  goneu: {scheme: udp, host: 198.18.2.2, port: 7006:3478, path: relay}
";

/// No answer to a new client's datagram within a second.
fn unanswered(socket: &std::net::UdpSocket) -> bool {
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    socket.send(b"anyone?").unwrap();
    let mut buf = [0u8; 64];
    matches!(socket.recv(&mut buf), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::ConnectionRefused))
}

#[test]
fn flows_of_a_rule_removed_by_a_reload_drain_on_in_the_new_image() {
    if !common::require_root("flows_of_a_rule_removed_by_a_reload_drain_on_in_the_new_image") {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start_pinning(&topo.forwarder, "upgrade-draining", DRAINING_RULES);
    let fwd = topo.forwarder_addr();
    let at = move |port: u16| SocketAddr::from((fwd, port));
    let mut pair = in_netns(&topo.client, || tcp_echo_conn(at(7005)));
    tcp_echo_round(&mut pair, b"before the reload");
    let session = in_netns(&topo.client, || udp_socket(at(7006)));
    udp_echo(&session, b"before the reload");

    // Reloaded away: both take no new flows, their flows drain.
    let keep_only: String = DRAINING_RULES
        .lines()
        .filter(|l| !l.contains("gone"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(daemon.config_path(), keep_only).unwrap();
    let out = daemon.reload();
    assert!(out.status.success(), "{out:?}");
    tcp_echo_round(&mut pair, b"draining");
    udp_echo(&session, b"draining");

    upgrade(&daemon);
    let log = daemon.log_text();
    for (protocol, pairs, sessions) in [("tcp", 1, 0), ("udp", 0, 1)] {
        let said = format!(
            "relay: {protocol} [::]:{} was removed by a reload; its {pairs} tcp pairs and {sessions} udp sessions drain here",
            if protocol == "tcp" { 7005 } else { 7006 }
        );
        assert!(log.contains(&said), "{said}:\n{log}");
    }
    // They go on, byte for byte, and still take no new flows.
    tcp_echo_round(&mut pair, b"draining in the new image");
    // Its idle time starts no earlier than this send.
    let last_datagram = std::time::Instant::now();
    udp_echo(&session, b"draining in the new image");
    assert!(
        in_netns(&topo.client, || TcpStream::connect_timeout(&at(7005), WAIT))
            .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
        "a new connection to the removed rule"
    );
    let stranger = in_netns(&topo.client, || udp_socket(at(7006)));
    assert!(unanswered(&stranger), "a new client of the removed rule");

    // They end as they would have: the session at udp_idle (3 s) after
    // its last datagram, the pair when the client closes it.
    let took = common::expires_in_time(
        "the drained udp session",
        last_datagram,
        Duration::from_secs(3),
        || daemon.status()["relay_udp_sessions"]["open"].as_u64() == Some(0),
    );
    eprintln!("the handed-over session of the removed rule ended after {took:?}");
    assert!(unanswered(&session), "the expired session is gone");
    pair.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    pair.read_to_end(&mut rest)
        .expect("the backend's FIN, passed on");
    assert!(rest.is_empty(), "{rest:?}");
    // The kept rule was never touched.
    let mut kept = in_netns(&topo.client, || tcp_echo_conn(at(7003)));
    tcp_echo_round(&mut kept, b"the kept rule");
    drop(kept);
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn a_removed_rules_pair_drains_on_beside_the_rule_that_listens_where_it_did() {
    if !common::require_root(
        "a_removed_rules_pair_drains_on_beside_the_rule_that_listens_where_it_did",
    ) {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start_pinning(&topo.forwarder, "upgrade-shared", DRAINING_RULES);
    let to = SocketAddr::from((topo.forwarder_addr(), 7005));
    let mut pair = in_netns(&topo.client, || tcp_echo_conn(to));
    tcp_echo_round(&mut pair, b"before the reloads");
    // `gone` is removed, then another rule listens on its address.
    let without = DRAINING_RULES.replace(
        "  gone: {scheme: tcp, host: 198.18.2.2, port: 7005:3478, path: relay}\n",
        "",
    );
    std::fs::write(daemon.config_path(), &without).unwrap();
    assert!(daemon.reload().status.success());
    let again = format!(
        "{without}  back: {{scheme: tcp, host: 198.18.2.2, port: 7005:3478, path: relay}}\n"
    );
    std::fs::write(daemon.config_path(), again).unwrap();
    assert!(daemon.reload().status.success());
    let mut back = in_netns(&topo.client, || tcp_echo_conn(to));
    tcp_echo_round(&mut back, b"the new rule");

    upgrade(&daemon);
    let log = daemon.log_text();
    assert!(
        log.contains(
            "relay: tcp [::]:7005 was removed by a reload; its 1 tcp pairs and 0 udp sessions \
             drain here"
        ),
        "{log}"
    );
    // Each pair goes on, with its own rule.
    tcp_echo_round(&mut pair, b"after the upgrade");
    tcp_echo_round(&mut back, b"after the upgrade");
    let status = daemon.status();
    assert_eq!(
        counter(relay_rule(&status, "back", "tcp"), "active"),
        1,
        "only its own pair: {status}"
    );
    // The removed rule's pair ends when its client closes it; the running
    // rule takes new connections.
    pair.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    pair.read_to_end(&mut rest)
        .expect("the backend's FIN, passed on");
    assert!(rest.is_empty(), "{rest:?}");
    let mut another = in_netns(&topo.client, || tcp_echo_conn(to));
    tcp_echo_round(&mut another, b"a new connection");
    let status = daemon.status();
    assert_eq!(counter(relay_rule(&status, "back", "tcp"), "flows"), 2);
    assert_eq!(counter(relay_rule(&status, "back", "tcp"), "active"), 2);
    drop((pair, back, another));
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

const SIZED_RULES: &str = "
routes:
  bulk: {scheme: tcp, host: 198.18.2.2, port: 7001:3478}
  dgram: {scheme: udp, host: 198.18.2.2, port: 7002:3478}
";

/// The rule file with flow tables of `conntrack_size` entries, and a relay
/// bound that sizes RELAY_FLOWS at `max_udp_sessions` (one UDP rule).
fn sized(conntrack_size: u32, max_udp_sessions: u32) -> String {
    format!(
        "kernel: {{conntrack_size: {conntrack_size}}}\n\
         relay: {{max_udp_sessions: {max_udp_sessions}}}\n{SIZED_RULES}"
    )
}

/// Flow tables set aside while their entries move must all be gone.
fn tables_set_aside() -> Vec<String> {
    let Ok(dirs) = std::fs::read_dir("/sys/fs/bpf/forwarder") else {
        return Vec::new();
    };
    dirs.filter_map(Result::ok)
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with("-previous"))
        .collect()
}

enum Event {
    Upgrade,
    Crash,
}

/// Kernel flows running through `event` after which the daemon wants its
/// flow tables at another size: a 64 MiB TCP transfer and 40 UDP flows
/// go on in the flows they had (one lost conntrack entry would reset the
/// transfer or count a new UDP flow).
fn flows_carried_into_tables_of_a_new_size(name: &str, event: Event) {
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let fwd = topo.forwarder_addr();
    let at = move |port: u16| SocketAddr::from((fwd, port));
    let mut first = Daemon::start_pinning(&topo.forwarder, name, &sized(4096, 70_000));

    const SIZE: u64 = 64 << 20;
    let progress = Arc::new(AtomicU64::new(0));
    let transfer = {
        let progress = progress.clone();
        spawn_in(&topo.client, move || {
            paced_transfer(at(7001), SIZE, progress)
        })
    };
    const CLIENTS: u64 = 40;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let s = in_netns(&topo.client, || udp_socket(at(7002)));
            udp_echo(&s, b"before");
            s
        })
        .collect();
    let dgram_flows = |d: &Daemon| counter(kernel_rule(&d.status(), "dgram", "udp"), "flows");
    assert_eq!(dgram_flows(&first), CLIENTS);
    eventually("a quarter of the transfer sent", || {
        progress.load(Ordering::Relaxed) >= SIZE / 4
    });

    let second = match event {
        Event::Upgrade => {
            std::fs::write(first.config_path(), sized(8192, 80_000)).unwrap();
            let out = first.reload();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains(
                    "needs a restart: kernel.conntrack_size: 4096 -> 8192 (`forwarder upgrade` \
                     carries the flows over)"
                ),
                "{stdout}"
            );
            upgrade(&first);
            None
        }
        Event::Crash => {
            first.kill();
            Some(Daemon::start_pinning(
                &topo.forwarder,
                name,
                &sized(8192, 80_000),
            ))
        }
    };
    let daemon = second.as_ref().unwrap_or(&first);
    let log = daemon.log_text();
    assert!(
        log.contains("CONNTRACK went from 4096 to 8192 entries;")
            && log.contains("RELAY_FLOWS went from 70000 to 80000 entries;"),
        "{log}"
    );
    assert!(!log.contains("does not fit"), "{log}");
    assert_eq!(
        daemon.status()["kernel"]["conntrack_capacity"].as_u64(),
        Some(4096),
        "8,192 entries, two per flow"
    );
    assert_eq!(tables_set_aside(), Vec::<String>::new());
    for s in &clients {
        udp_echo(s, b"after");
    }
    assert_eq!(
        dgram_flows(daemon),
        CLIENTS,
        "every datagram went on in its flow"
    );
    let Ok((sent, got)) = transfer.join() else {
        panic!("the transfer failed:\n{}", daemon.log_text());
    };
    assert_eq!(sent, got, "the 64 MiB transfer arrived intact");
    assert_eq!(
        counter(kernel_rule(&daemon.status(), "bulk", "tcp"), "flows"),
        1
    );
    drop(clients);
    let log = match second {
        Some(second) => second.stop(),
        None => first.stop(),
    };
    assert!(!log.contains("ERROR"), "{log}");
    assert_nothing_left(&topo);
}

#[test]
fn an_upgrade_carries_the_kernel_flows_into_flow_tables_of_a_new_size() {
    if !common::require_root("an_upgrade_carries_the_kernel_flows_into_flow_tables_of_a_new_size") {
        return;
    }
    flows_carried_into_tables_of_a_new_size("upgrade-resize", Event::Upgrade);
}

#[test]
fn a_start_after_a_crash_carries_the_kernel_flows_into_flow_tables_of_a_new_size() {
    if !common::require_root(
        "a_start_after_a_crash_carries_the_kernel_flows_into_flow_tables_of_a_new_size",
    ) {
        return;
    }
    flows_carried_into_tables_of_a_new_size("crash-resize", Event::Crash);
}
