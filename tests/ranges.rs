//! Port-range rules through the daemon: a 1:1 range of 16,384 ports,
//! a shifted one and a many-to-one one, TCP and UDP, on the kernel path
//! (the relay's steered sockets take none of it), through a reload and a
//! crash; and `check` and a start without BPF refusing what cannot be, with places.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Output};

use crate::common::harness::{Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule};

use crate::common::port_servers::{PortServers, tcp_port_of, udp_port_of};
use crate::common::{self, TempConfig, Topology, stderr_lines};
use crate::crash::{BpffsAsFound, HOST_BPFFS, assert_nothing_left};

/// What the backend said to one datagram sent to `to`: its port, checked
/// to come back from `to` itself.
fn udp_port_from(to: SocketAddr, msg: &[u8]) -> u16 {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let (port, from) = udp_port_of(&socket, to, msg);
    assert_eq!(from, to, "the answer comes from the listen port");
    port
}

#[test]
fn one_to_one_shifted_and_many_to_one_ranges_on_the_kernel_path() {
    if !common::require_root("one_to_one_shifted_and_many_to_one_ranges_on_the_kernel_path") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    // First, middle and last of each range; 7000 is the many-to-one target.
    let media = [49152u16, 57344, 65535];
    let shifted = [(30000u16, 31000u16), (30500, 31500), (30999, 31999)];
    let many = [40000u16, 40050, 40099];
    let mut backend_ports: Vec<u16> = media.to_vec();
    backend_ports.extend(shifted.iter().map(|(_, b)| *b));
    backend_ports.push(7000);
    let _servers = PortServers::start(&topo.backend, &backend_ports);
    let yaml = format!(
        "interfaces: [{a}, {b}]\n\
         relay: {{drain_timeout: 1s}}\n\
         kernel: {{snat_ports: 10000-19999}}\n\
         routes:\n\
         \x20 media: {{scheme: 'tcp,udp', host: {backend}, port: 49152-65535:49152-65535}}\n\
         \x20 shifted: {{scheme: 'tcp,udp', host: {backend}, port: 30000-30999:31000-31999}}\n\
         \x20 many: {{scheme: 'tcp,udp', host: {backend}, port: 40000-40099:7000}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        backend = topo.backend_addr(),
    );
    let daemon = Daemon::start(&topo.forwarder, "ranges", &yaml);
    let fwd = topo.forwarder_addr();
    let expect: Vec<(&str, u16, u16)> = media
        .iter()
        .map(|&p| ("media", p, p))
        .chain(shifted.iter().map(|&(l, b)| ("shifted", l, b)))
        .chain(many.iter().map(|&l| ("many", l, 7000)))
        .collect();
    in_netns(&topo.client, || {
        for &(alias, listen, backend) in &expect {
            let to = SocketAddr::from((fwd, listen));
            assert_eq!(tcp_port_of(to), backend, "{alias} tcp {listen}");
            assert_eq!(
                udp_port_from(to, format!("to {listen}").as_bytes()),
                backend,
                "{alias} udp {listen}"
            );
        }
    });
    let status = daemon.status();
    for alias in ["media", "shifted", "many"] {
        for proto in ["tcp", "udp"] {
            let k = kernel_rule(&status, alias, proto);
            assert_eq!(counter(k, "flows"), 3, "{alias} {proto}: {k}");
        }
        let u = kernel_rule(&status, alias, "udp");
        assert_eq!(counter(u, "packets_fwd"), 3, "{u}");
        assert_eq!(counter(u, "packets_rev"), 3, "{u}");
    }
    let rule = status["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["alias"] == "media"))
        .expect("media in the status");
    assert_eq!(rule["bind"], "[::]:49152-65535", "{rule}");
    // The relay listens on each range (one steered socket per protocol)
    // but the kernel path carried all of it.
    for alias in ["media", "shifted", "many"] {
        for proto in ["tcp", "udp"] {
            let r = common::harness::relay_rule(&status, alias, proto);
            assert_eq!(counter(r, "flows"), 0, "{alias} {proto}: {r}");
        }
    }
    // One past the end: nobody listens there, the stack refuses.
    in_netns(&topo.client, || {
        let past = SocketAddr::from((fwd, 30000 + 1000));
        assert!(std::net::TcpStream::connect_timeout(&past, WAIT).is_err());
    });
    // A reload: `shifted` loses its upper half (a removed rule and a new
    // one), `many` goes; `media` stays as it was.
    let reloaded = yaml
        .replace("30000-30999:31000-31999", "30000-30499:31000-31499")
        .lines()
        .filter(|l| !l.contains("many:"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(daemon.config_path(), reloaded + "\n").unwrap();
    let out = daemon.reload();
    assert!(out.status.success(), "{out:?}");
    in_netns(&topo.client, || {
        for (listen, backend) in [(30000u16, 31000u16), (65535, 65535)] {
            let to = SocketAddr::from((fwd, listen));
            assert_eq!(tcp_port_of(to), backend, "after reload, {listen}");
        }
        for gone in [30999u16, 40050] {
            let to = SocketAddr::from((fwd, gone));
            assert!(
                std::net::TcpStream::connect_timeout(&to, WAIT).is_err(),
                "{gone} after reload"
            );
        }
    });
    let status = daemon.status();
    let k = kernel_rule(&status, "shifted", "tcp");
    assert_eq!(counter(k, "flows"), 1, "the new rule's own: {k}");
    let k = kernel_rule(&status, "media", "tcp");
    assert_eq!(counter(k, "flows"), 4, "kept with its counters: {k}");
    daemon.stop();
}

fn check(cfg: &TempConfig) -> Output {
    Command::new(common::forwarder_bin())
        .args(["check", "-c"])
        .arg(&cfg.path)
        .output()
        .unwrap()
}

#[test]
fn check_refuses_overlapping_and_mismatched_ranges_naming_both_rules() {
    let yaml = "kernel: {snat_ports: 10000-19999}
routes:
  media: {scheme: udp, host: 10.0.0.5, port: 30000-30999:30000-30999}
  single: {scheme: udp, host: 10.0.0.6, port: 30500:53}
  short: {scheme: tcp, host: 10.0.0.6, port: 20000-20999:21000-21099}
  snat: {scheme: tcp, host: 10.0.0.6, port: 19000-20000:7000}
labels:
  proxy.aliases: lab
  proxy.lab.scheme: udp
  proxy.lab.host: 10.0.0.7
  proxy.lab.port: 30990-31010:30990-31010
";
    let cfg = TempConfig::new("ranges", yaml);
    let out = check(&cfg);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let file = cfg.path.display().to_string();
    let lines = stderr_lines(&out);
    let want = [
        format!(
            "{file}:4:47: alias `single`, field `port`: found udp [::]:30500, which alias `media` also claims (udp [::]:30000-30999); allowed one rule per (bind, port, protocol), ranges included; a wildcard bind covers every address of its family; alias `media` is at {file}:3:46"
        ),
        format!(
            "{file}:5:46: alias `short`, field `port`: found `20000-20999:21000-21099` (listen range of 1000 ports, target range of 100)"
        ),
        format!(
            "{file}:6:45: alias `snat`, field `port`: found listen range 19000-20000 overlaps the SNAT range"
        ),
        format!(
            "{file}:11:19: alias `lab`, field `port`: found udp [::]:30990-31010, which alias `media` also claims (udp [::]:30000-30999)"
        ),
    ];
    for w in &want {
        assert!(
            lines.iter().any(|l| l.starts_with(w.as_str())),
            "no line starting `{w}` in {lines:#?}"
        );
    }
    assert_eq!(lines.len(), want.len(), "{lines:#?}");
}

#[test]
fn relay_only_without_bpf_refuses_a_range_rule_in_one_line() {
    // The relay serves a range through the sk_lookup program: where BPF
    // is refused (or without root), a range rule cannot start.
    let yaml = "kernel: {snat_ports: 10000-19999}
routes:
  media: {scheme: udp, host: 10.0.0.5, port: 30000-30999:30000-30999}
";
    let cfg = TempConfig::new("ranges-relay-only", yaml);
    let mut run = Command::new(common::forwarder_bin());
    run.args(["run", "--relay-only", "-c"])
        .arg(&cfg.path)
        .args(["--control", &cfg.control()]);
    // SAFETY: pre_exec runs in the child before exec; it only installs a filter.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut run, || {
            common::seccomp::fail_syscall(libc::SYS_bpf, libc::ENOSYS)
        })
    };
    let out = common::output_within(&mut run, WAIT);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = stderr_lines(&out);
    let file = cfg.path.display().to_string();
    assert_eq!(lines.len(), 1, "{out:?}");
    assert!(
        lines[0].starts_with(&format!(
            "forwarder: rule `media` in {file} is a port range (udp [::]:30000-30999), which the relay serves"
        )),
        "{out:?}"
    );
    assert!(!std::path::Path::new(&cfg.control()).exists());
}

#[test]
fn a_killed_daemons_pinned_ranges_go_on_and_the_next_daemon_adopts_them() {
    if !common::require_root("a_killed_daemons_pinned_ranges_go_on_and_the_next_daemon_adopts_them")
    {
        return;
    }
    let _one_at_a_time = HOST_BPFFS.lock().unwrap_or_else(|e| e.into_inner());
    let _bpffs = BpffsAsFound::new();
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = PortServers::start(&topo.backend, &[31000, 31999]);
    let yaml = format!(
        "kernel: {{snat_ports: 10000-19999}}\n\
         routes:\n\
         \x20 shifted: {{scheme: 'tcp,udp', host: {backend}, port: 30000-30999:31000-31999}}\n",
        backend = topo.backend_addr(),
    );
    let fwd = topo.forwarder_addr();
    let (first_port, last_port) = (
        SocketAddr::from((fwd, 30000)),
        SocketAddr::from((fwd, 30999)),
    );
    let mut first = Daemon::start_pinning(&topo.forwarder, "ranges-pin-first", &yaml);
    let dgram = in_netns(&topo.client, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.connect(last_port).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    });
    let echo = |msg: &str| {
        dgram.send(msg.as_bytes()).unwrap();
        let mut buf = [0u8; 1500];
        let n = dgram
            .recv(&mut buf)
            .expect("an answer from the listen port");
        let want = [&31999u16.to_be_bytes()[..], msg.as_bytes()].concat();
        assert_eq!(&buf[..n], &want[..], "port 31999 and the datagram");
    };
    echo("before the kill");
    // The trie and its count are pinned with the rules, for the next daemon.
    let cookie = in_netns(&topo.forwarder, forwarder::state::netns_cookie).unwrap();
    let pins = std::path::Path::new("/sys/fs/bpf/forwarder").join(format!("netns-{cookie}"));
    for map in ["RANGES", "RANGE_COUNT"] {
        assert!(
            pins.join(map).exists(),
            "{map} pinned in {}",
            pins.display()
        );
    }
    first.kill();
    // Nobody runs: the pinned program and trie carry the flow on, and
    // open new ones.
    echo("no daemon");
    in_netns(&topo.client, || {
        assert_eq!(tcp_port_of(first_port), 31000, "no daemon");
    });
    let second = Daemon::start_pinning(&topo.forwarder, "ranges-pin-second", &yaml);
    assert!(
        second
            .log_text()
            .contains("adopted the kernel path of a previous daemon"),
        "{}",
        second.log_text()
    );
    echo("after the restart");
    in_netns(&topo.client, || {
        assert_eq!(tcp_port_of(first_port), 31000, "after the restart");
    });
    let status = second.status();
    let k = kernel_rule(&status, "shifted", "udp");
    assert_eq!(counter(k, "flows"), 1, "{k}");
    assert_eq!(counter(k, "packets_fwd"), 3, "{k}");
    let k = kernel_rule(&status, "shifted", "tcp");
    assert_eq!(counter(k, "flows"), 2, "one while no daemon ran: {k}");
    // The adopted trie is the one the programs read: a reload that takes
    // the upper half away shows there.
    let shrunk = yaml.replace("30000-30999:31000-31999", "30000-30499:31000-31499");
    std::fs::write(second.config_path(), shrunk).unwrap();
    let out = second.reload();
    assert!(out.status.success(), "{out:?}");
    in_netns(&topo.client, || {
        assert_eq!(tcp_port_of(first_port), 31000, "after the reload");
        assert!(
            std::net::TcpStream::connect_timeout(&last_port, WAIT).is_err(),
            "30999 is no rule's after the reload"
        );
    });
    second.stop();
    assert_nothing_left(&topo);
}
