//! Flows the kernel path leaves to the relay: fragments, a full conntrack
//! table, `path: relay`.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;

use crate::common::harness::{
    Daemon, counter, forwarding_on, in_netns, kernel_rule, only, reasons, relay_rule,
};
use crate::common::seccomp::fail_syscall;
use crate::common::traffic::{BackendServers, tcp_echo_conn, tcp_echo_round, udp_echo, udp_socket};
use crate::common::turn::{listener_addr, turn_rules};
use crate::common::{self, Topology};

#[test]
fn fragmented_datagrams_go_to_the_relay_for_the_whole_flow() {
    if !common::require_root("fragmented_datagrams_go_to_the_relay_for_the_whole_flow") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "frag", &turn_rules(&topo, ""));
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        let socket = udp_socket(to);
        // 4,000 bytes over MTU 1500: three fragments each way.
        for n in 0..5u8 {
            udp_echo(&socket, &vec![n; 4000]);
        }
        // Then small datagrams of the same flow stay with the relay.
        for n in 0..5u32 {
            udp_echo(&socket, format!("small {n}").as_bytes());
        }
    });
    let status = daemon.status();
    let k = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(k, "flows"), 0, "the kernel took nothing: {k}");
    assert_eq!(reasons(k, "fallbacks"), only("fragment", 1), "{k}");
    let r = relay_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(r, "flows"), 1, "{r}");
    assert_eq!(counter(r, "bytes_to_backend"), 5 * 4000 + 5 * 7, "{r}");
    assert_eq!(counter(r, "bytes_to_client"), 5 * 4000 + 5 * 7, "{r}");
    // Whole datagrams: the stack reassembled the fragments for the relay.
    assert_eq!(counter(r, "datagrams_to_backend"), 10, "{r}");
    assert_eq!(counter(r, "datagrams_to_client"), 10, "{r}");
    daemon.stop();
}

#[test]
fn a_kernel_flow_that_sends_fragmented_datagrams_later_stays_in_the_kernel() {
    if !common::require_root(
        "a_kernel_flow_that_sends_fragmented_datagrams_later_stays_in_the_kernel",
    ) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "later-frag", &turn_rules(&topo, ""));
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        let socket = udp_socket(to);
        for n in 0..5u32 {
            udp_echo(&socket, format!("small {n}").as_bytes());
        }
        // 4,000 bytes over MTU 1500: three fragments each way, which the
        // echo checks whole.
        for n in 0..5u8 {
            udp_echo(&socket, &vec![n; 4000]);
        }
        udp_echo(&socket, b"small again");
    });
    let status = daemon.status();
    let k = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(k, "flows"), 1, "{k}");
    // Six small datagrams and five of three fragments each, each way.
    assert_eq!(counter(k, "packets_fwd"), 6 + 5 * 3, "{k}");
    assert_eq!(counter(k, "packets_rev"), 6 + 5 * 3, "{k}");
    // Frames as TC sees them: Ethernet + IPv4 (+ UDP in the first
    // fragment) each; "small N" is 7 bytes, "small again" 11.
    let small = |payload: u64| 14 + 20 + 8 + payload;
    let fragmented = 3 * (14 + 20) + 8 + 4000;
    let bytes = 5 * small(7) + 5 * fragmented + small(11);
    assert_eq!(counter(k, "bytes_fwd"), bytes, "{k}");
    assert_eq!(counter(k, "bytes_rev"), bytes, "{k}");
    assert_eq!(reasons(k, "fallbacks"), [], "{k}");
    let r = relay_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(r, "flows"), 0, "the relay took no part of it: {r}");
    daemon.stop();
}

#[test]
fn with_a_tiny_conntrack_table_overflow_flows_still_work_through_the_relay() {
    if !common::require_root(
        "with_a_tiny_conntrack_table_overflow_flows_still_work_through_the_relay",
    ) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // Room for two flows.
    let rules = turn_rules(&topo, "kernel: {conntrack_size: 4}\n");
    let daemon = Daemon::start(&topo.forwarder, "tiny", &rules);
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        // All open at once, each used twice, so none can end early.
        let mut conns: Vec<_> = (0..10).map(|_| tcp_echo_conn(to)).collect();
        for round in 0..2 {
            for (n, c) in conns.iter_mut().enumerate() {
                tcp_echo_round(c, format!("conn {n} round {round}").as_bytes());
            }
        }
        let sockets: Vec<_> = (0..5).map(|_| udp_socket(to)).collect();
        for (n, s) in sockets.iter().enumerate() {
            udp_echo(s, format!("udp {n}").as_bytes());
            udp_echo(s, format!("udp {n} again").as_bytes());
        }
    });
    let status = daemon.status();
    let tcp = kernel_rule(&status, "turn-tcp", "tcp");
    assert_eq!(counter(tcp, "flows"), 2, "{tcp}");
    assert_eq!(
        reasons(tcp, "fallbacks"),
        only("conntrack_full", 8),
        "{tcp}"
    );
    assert_eq!(counter(relay_rule(&status, "turn-tcp", "tcp"), "flows"), 8);
    let udp = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(udp, "flows"), 0, "{udp}");
    assert_eq!(
        reasons(udp, "fallbacks"),
        only("conntrack_full", 5),
        "{udp}"
    );
    assert_eq!(counter(relay_rule(&status, "turn-udp", "udp"), "flows"), 5);
    daemon.stop();
}

#[test]
fn a_relay_rule_is_carried_by_the_relay_only() {
    if !common::require_root("a_relay_rule_is_carried_by_the_relay_only") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let yaml = format!(
        "interfaces: [{a}, {b}]\n\
         relay: {{drain_timeout: 1s}}\n\
         routes:\n\
         \x20 kernel: {{scheme: udp, host: {backend}, port: 7878:3478}}\n\
         \x20 relayed: {{scheme: 'tcp,udp', host: {backend}, port: 7879:3478, path: relay}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        backend = topo.backend_addr(),
    );
    let daemon = Daemon::start(&topo.forwarder, "relayrule", &yaml);
    let relayed = SocketAddr::from((topo.forwarder_addr(), 7879));
    in_netns(&topo.client, || {
        let mut c = tcp_echo_conn(relayed);
        tcp_echo_round(&mut c, b"through the relay");
        udp_echo(&udp_socket(relayed), b"through the relay too");
        udp_echo(&udp_socket(listener_addr(&topo)), b"through the kernel");
    });
    let status = daemon.status();
    for proto in ["tcp", "udp"] {
        let k = kernel_rule(&status, "relayed", proto);
        for c in ["flows", "packets_fwd"] {
            assert_eq!(counter(k, c), 0, "{c}: {k}");
        }
        assert_eq!(reasons(k, "fallbacks"), [], "{k}");
        assert_eq!(counter(relay_rule(&status, "relayed", proto), "flows"), 1);
    }
    assert_eq!(counter(kernel_rule(&status, "kernel", "udp"), "flows"), 1);
    assert_eq!(counter(relay_rule(&status, "kernel", "udp"), "flows"), 0);
    daemon.stop();
}

#[test]
fn with_ipv4_forwarding_off_the_daemon_warns_and_the_relay_carries_every_flow() {
    if !common::require_root(
        "with_ipv4_forwarding_off_the_daemon_warns_and_the_relay_carries_every_flow",
    ) {
        return;
    }
    let topo = Topology::new();
    for key in ["net.ipv4.ip_forward", "net.ipv4.conf.all.forwarding"] {
        topo.forwarder.sysctl(key, "0");
    }
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "noforward", &turn_rules(&topo, ""));
    let log = daemon.log_text();
    let interface = &topo.client_link.a_if;
    assert!(
        log.contains(&format!("IPv4 forwarding is off on {interface}")),
        "warned at start:\n{log}"
    );
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"through the relay");
        udp_echo(&udp_socket(to), b"through the relay too");
    });
    let status = daemon.status();
    for proto in ["tcp", "udp"] {
        let alias = format!("turn-{proto}");
        let k = kernel_rule(&status, &alias, proto);
        assert_eq!(counter(k, "flows"), 0, "{k}");
        assert_eq!(reasons(k, "fallbacks"), only("forwarding_off", 1), "{k}");
        assert_eq!(counter(relay_rule(&status, &alias, proto), "flows"), 1);
    }
    let log = daemon.stop();
    assert_eq!(
        log.matches(&format!("IPv4 forwarding is off on {interface}"))
            .count(),
        1,
        "said once:\n{log}"
    );
}

#[test]
fn a_backend_on_one_of_the_hosts_own_addresses_goes_to_the_relay() {
    if !common::require_root("a_backend_on_one_of_the_hosts_own_addresses_goes_to_the_relay") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    // The backend runs on the forwarder itself, reached by its address on
    // the backend link: neither loopback nor the listener's address.
    let _servers = BackendServers::start(&topo.forwarder);
    let own = topo.backend_link.a_addr;
    let yaml = format!(
        "interfaces: [{a}, {b}]\n\
         routes:\n\
         \x20 local-tcp: {{scheme: tcp, host: {own}, port: 7878:3478}}\n\
         \x20 local-udp: {{scheme: udp, host: {own}, port: 7878:3478}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
    );
    let daemon = Daemon::start(&topo.forwarder, "ownaddr", &yaml);
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"to this host");
        udp_echo(&udp_socket(to), b"to this host too");
    });
    let status = daemon.status();
    for (alias, proto) in [("local-tcp", "tcp"), ("local-udp", "udp")] {
        let k = kernel_rule(&status, alias, proto);
        assert_eq!(counter(k, "flows"), 0, "{k}");
        // Known when the rules were loaded, not found out packet by packet.
        assert_eq!(reasons(k, "fallbacks"), [], "{k}");
        assert_eq!(counter(relay_rule(&status, alias, proto), "flows"), 1);
    }
    daemon.stop();
}

#[test]
fn where_bpf_cannot_load_the_daemon_says_so_once_and_the_relay_carries_every_flow() {
    if !common::require_root(
        "where_bpf_cannot_load_the_daemon_says_so_once_and_the_relay_carries_every_flow",
    ) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    // bpf(2) fails as on a kernel built without it.
    let daemon = Daemon::start_with(
        &topo.forwarder,
        "nobpf",
        &turn_rules(&topo, ""),
        "info",
        |cmd| {
            // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
            unsafe { cmd.pre_exec(|| fail_syscall(libc::SYS_bpf, libc::ENOSYS)) };
        },
    );
    let to = listener_addr(&topo);
    in_netns(&topo.client, || {
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"through the relay");
        udp_echo(&udp_socket(to), b"through the relay too");
    });
    let status = daemon.status();
    assert_eq!(status["kernel_path"], false, "{status}");
    for proto in ["tcp", "udp"] {
        let r = relay_rule(&status, &format!("turn-{proto}"), proto);
        assert_eq!(counter(r, "flows"), 1, "{r}");
    }
    let log = daemon.stop();
    let said = log
        .lines()
        .filter(|l| l.contains("the kernel path cannot start"))
        .count();
    assert_eq!(said, 1, "said once:\n{log}");
    assert!(!log.contains("ERROR"), "{log}");
}
