//! Integration tests: ICMP for kernel flows with real sockets, through the
//! daemon in namespaces. A closed backend port refuses the client's
//! datagrams, and a 1,400-byte hop between the forwarder and the backend
//! (the forwarder's own link, or a router past it) teaches the client's
//! socket the path MTU, as through nftables NAT.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Instant;

use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, relay_rule,
};
use crate::common::traffic::{BackendServers, tcp_hash_transfer, udp_echo, udp_socket};
use crate::common::{self, Netns, Topology, veth};

const LISTEN_PORT: u16 = 7878;
const MTU: i32 = 1400;

/// TCP and UDP on 7878 to `backend`:`port`, on the two interfaces named.
fn rules(interfaces: [&str; 2], backend: Ipv4Addr, port: u16) -> String {
    format!(
        "interfaces: [{a}, {b}]\n\
         relay: {{drain_timeout: 1s}}\n\
         routes:\n\
         \x20 t-tcp: {{scheme: tcp, host: {backend}, port: {LISTEN_PORT}:{port}}}\n\
         \x20 t-udp: {{scheme: udp, host: {backend}, port: {LISTEN_PORT}:{port}}}\n",
        a = interfaces[0],
        b = interfaces[1],
    )
}

/// The counters that prove a rule's flows were the kernel path's: `flows`
/// opened there and none carried by the relay.
fn assert_kernel_only(status: &serde_json::Value, alias: &str, protocol: &str) {
    let k = kernel_rule(status, alias, protocol);
    assert!(counter(k, "flows") >= 1, "{k}");
    assert_eq!(
        counter(k, "fallback_full") + counter(k, "fallback_other"),
        0,
        "{k}"
    );
    let r = relay_rule(status, alias, protocol);
    assert_eq!(counter(r, "flows"), 0, "the relay carried none: {r}");
}

#[test]
fn udp_to_a_closed_backend_port_is_refused_on_the_kernel_path() {
    if !common::require_root("udp_to_a_closed_backend_port_is_refused_on_the_kernel_path") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    // Nothing listens on the backend's 3479: its kernel answers port
    // unreachable.
    let interfaces = [
        topo.client_link.a_if.as_str(),
        topo.backend_link.a_if.as_str(),
    ];
    let yaml = rules(interfaces, topo.backend_addr(), 3479);
    let daemon = Daemon::start(&topo.forwarder, "icmp-refused", &yaml);
    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT));
    in_netns(&topo.client, || {
        let socket = udp_socket(to);
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 64];
        // The first datagram may wait for neighbour resolution: resend
        // until the error comes, which any send or receive may report.
        loop {
            assert!(Instant::now() < deadline, "no ECONNREFUSED in {WAIT:?}");
            let result = socket
                .send(b"anyone there?")
                .and_then(|_| socket.recv(&mut buf));
            match result {
                Ok(n) => panic!("an answer from a closed port: {:?}", &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => panic!("{e}"),
            }
        }
    });
    let status = daemon.status();
    assert_kernel_only(&status, "t-udp", "udp");
    let k = kernel_rule(&status, "t-udp", "udp");
    assert_eq!(counter(k, "flows"), 1, "{k}");
    assert!(counter(k, "icmp_translated") >= 1, "{k}");
    daemon.stop();
}

/// `IP_MTU_DISCOVER` = `IP_PMTUDISC_DO`: DF on, never fragment locally.
fn pmtu_do(socket: &UdpSocket) {
    let value: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: an int option on a live socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IP_MTU_DISCOVER: {}", io::Error::last_os_error());
}

/// The path MTU a connected socket knows (`IP_MTU`).
fn path_mtu(socket: &UdpSocket) -> i32 {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option read into `value`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "IP_MTU: {}", io::Error::last_os_error());
    value
}

/// The listener's second address: TCP goes there, so that what the UDP
/// socket learns (the path MTU of the listener's first address) does not
/// spare TCP its own discovery.
const TCP_ADDR: &str = "198.18.1.3";

/// From the client: a UDP flow on the kernel path, then DF datagrams of
/// 1,450 bytes until the socket has learnt the 1,400-byte path (the next
/// such send then fails with EMSGSIZE); then a TCP bulk transfer of
/// full-sized segments (TSO and GSO off), which must arrive intact.
fn learn_the_path_mtu(client: &Netns, client_if: &str, udp_to: SocketAddr) {
    client.exec("ethtool", &["-K", client_if, "tso", "off", "gso", "off"]);
    let tcp_to = SocketAddr::from((TCP_ADDR.parse::<Ipv4Addr>().unwrap(), LISTEN_PORT));
    in_netns(client, || {
        let socket = udp_socket(udp_to);
        pmtu_do(&socket);
        udp_echo(&socket, b"small first");
        assert_eq!(path_mtu(&socket), 1500);
        let deadline = Instant::now() + WAIT;
        while path_mtu(&socket) == 1500 {
            assert!(Instant::now() < deadline, "no path MTU in {WAIT:?}");
            match socket.send(&[7u8; 1450]) {
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(path_mtu(&socket), MTU);
        let err = socket.send(&[7u8; 1450]).expect_err("too big now");
        assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
        // What fits still goes, and comes back, once the errors the
        // socket holds from earlier sends (EMSGSIZE) are taken.
        let _ = socket.take_error();
        udp_echo(&socket, &[8u8; 1400 - 28]);

        let (sent, got) = tcp_hash_transfer(tcp_to, 16 << 20);
        assert_eq!(sent, got, "the transfer arrived intact");
    });
}

/// The client | forwarder | backend topology with the forwarder's link to
/// the backend at 1,400 bytes (`both_ends`: the backend's end too), the
/// daemon on it, and the backend's servers. TCP may also go to the
/// listener's second address.
fn with_a_1400_byte_link(
    name: &str,
    both_ends: bool,
    f: impl FnOnce(&Topology, SocketAddr),
) -> serde_json::Value {
    let topo = Topology::new();
    forwarding_on(&topo);
    let mtu = MTU.to_string();
    let backend_link = &topo.backend_link;
    topo.forwarder
        .ip(&["link", "set", &backend_link.a_if, "mtu", &mtu]);
    if both_ends {
        topo.backend
            .ip(&["link", "set", &backend_link.b_if, "mtu", &mtu]);
    }
    let _servers = BackendServers::start(&topo.backend);
    let interfaces = [topo.client_link.a_if.as_str(), backend_link.a_if.as_str()];
    let yaml = rules(interfaces, topo.backend_addr(), 3478);
    let second = format!("{TCP_ADDR}/24");
    topo.forwarder
        .ip(&["addr", "add", &second, "dev", &topo.client_link.a_if]);
    let daemon = Daemon::start(&topo.forwarder, name, &yaml);
    f(
        &topo,
        SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT)),
    );
    let status = daemon.status();
    daemon.stop();
    status
}

#[test]
fn a_1400_byte_link_behind_the_forwarder_teaches_the_client_its_path_mtu() {
    if !common::require_root(
        "a_1400_byte_link_behind_the_forwarder_teaches_the_client_its_path_mtu",
    ) {
        return;
    }
    let status = with_a_1400_byte_link("icmp-link-mtu", true, |topo, to| {
        learn_the_path_mtu(&topo.client, &topo.client_link.b_if, to);
    });
    assert_kernel_only(&status, "t-udp", "udp");
    assert_kernel_only(&status, "t-tcp", "tcp");
    // The forwarder itself answered the datagram it could not send on.
    let k = kernel_rule(&status, "t-udp", "udp");
    assert!(counter(k, "icmp_sent") >= 1, "{k}");
}

/// A sender with TSO and GSO on (a veth's default) hands the forwarder
/// 64 KiB aggregates; their segments, sized for the backend's 1,500-byte
/// link, do not fit the forwarder's 1,400-byte end of it. The SYN's MSS
/// clamp covers only what the backend sends.
#[test]
fn gso_segments_too_big_for_the_forwarders_link_get_frag_needed() {
    if !common::require_root("gso_segments_too_big_for_the_forwarders_link_get_frag_needed") {
        return;
    }
    let status = with_a_1400_byte_link("icmp-gso", false, |topo, to| {
        in_netns(&topo.client, || {
            let (sent, got) = tcp_hash_transfer(to, 16 << 20);
            assert_eq!(sent, got, "the transfer arrived intact");
        });
    });
    assert_kernel_only(&status, "t-tcp", "tcp");
    let k = kernel_rule(&status, "t-tcp", "tcp");
    assert!(counter(k, "icmp_sent") >= 1, "{k}");
}

#[test]
fn a_1400_byte_hop_past_the_forwarder_teaches_the_client_its_path_mtu() {
    if !common::require_root("a_1400_byte_hop_past_the_forwarder_teaches_the_client_its_path_mtu") {
        return;
    }
    // client | forwarder | router | backend, 1,500 bytes on every link;
    // the router's route to the backend carries 1,400.
    let client = Netns::new("client");
    let forwarder = Netns::new("fwd");
    let router = Netns::new("router");
    let backend = Netns::new("backend");
    let client_link = veth(&forwarder, &client, 1);
    let router_link = veth(&forwarder, &router, 2);
    let backend_link = veth(&router, &backend, 3);
    let via =
        |ns: &Netns, to: &str, gw: Ipv4Addr| ns.ip(&["route", "add", to, "via", &gw.to_string()]);
    via(&client, "default", client_link.a_addr);
    via(&forwarder, "198.18.3.0/24", router_link.b_addr);
    via(&router, "198.18.1.0/24", router_link.a_addr);
    via(&backend, "default", backend_link.a_addr);
    let backend_addr = backend_link.b_addr.to_string();
    router.ip(&[
        "route",
        "add",
        &backend_addr,
        "dev",
        &backend_link.a_if,
        "mtu",
        "lock",
        &MTU.to_string(),
    ]);
    router.sysctl("net.ipv4.ip_forward", "1");
    forwarder.sysctl("net.ipv4.ip_forward", "1");
    let _servers = BackendServers::start(&backend);
    let interfaces = [client_link.a_if.as_str(), router_link.a_if.as_str()];
    let yaml = rules(interfaces, backend_link.b_addr, 3478);
    let second = format!("{TCP_ADDR}/24");
    forwarder.ip(&["addr", "add", &second, "dev", &client_link.a_if]);
    let daemon = Daemon::start(&forwarder, "icmp-hop-mtu", &yaml);
    let to = SocketAddr::from((client_link.a_addr, LISTEN_PORT));
    learn_the_path_mtu(&client, &client_link.b_if, to);

    let status = daemon.status();
    assert_kernel_only(&status, "t-udp", "udp");
    assert_kernel_only(&status, "t-tcp", "tcp");
    // The router's frag-needed reached both clients through the forwarder.
    for protocol in ["udp", "tcp"] {
        let k = kernel_rule(&status, &format!("t-{protocol}"), protocol);
        assert!(counter(k, "icmp_translated") >= 1, "{k}");
    }
    daemon.stop();
}
