//! `preserve_client_ip: true` end to end: the backend sees the client's
//! own address (DNAT only) and its replies, routed back through the
//! forwarder, reach the client; without it the backend sees the
//! forwarder's.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};

use crate::common::harness::{
    Daemon, WAIT, counter, forwarding_on, in_netns, kernel_rule, relay_rule, spawn_in,
};
use crate::common::{self, Topology};

const PORT: u16 = 4000;

/// In the backend: answers each of `n` TCP connections and `n` datagrams
/// on [`PORT`] with the address they came from.
fn who_is_asking(topo: &Topology, n: usize) -> [std::thread::JoinHandle<()>; 2] {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let tcp_ready = ready_tx.clone();
    let tcp = spawn_in(&topo.backend, move || {
        let tcp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap();
        tcp_ready.send(()).unwrap();
        for _ in 0..n {
            let (mut conn, from) = tcp.accept().unwrap();
            conn.write_all(from.ip().to_string().as_bytes()).unwrap();
        }
    });
    let udp = spawn_in(&topo.backend, move || {
        let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap();
        udp.set_read_timeout(Some(WAIT)).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..n {
            let (_, from) = udp.recv_from(&mut buf).unwrap();
            udp.send_to(from.ip().to_string().as_bytes(), from).unwrap();
        }
    });
    for _ in 0..2 {
        ready_rx.recv_timeout(WAIT).expect("backend up");
    }
    [tcp, udp]
}

/// What the backend says about who asked, over TCP and over UDP.
fn ask(to: SocketAddr) -> (String, String) {
    let mut tcp = TcpStream::connect_timeout(&to, WAIT).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut over_tcp = String::new();
    tcp.read_to_string(&mut over_tcp).unwrap();
    let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    udp.connect(to).unwrap();
    udp.set_read_timeout(Some(WAIT)).unwrap();
    udp.send(b"who am I?").unwrap();
    let mut buf = [0u8; 64];
    let n = udp.recv(&mut buf).unwrap();
    (over_tcp, String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn preserve_client_ip_shows_the_backend_the_clients_address() {
    if !common::require_root("preserve_client_ip_shows_the_backend_the_clients_address") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let server = who_is_asking(&topo, 2);
    let yaml = format!(
        "interfaces: [{a}, {b}]\n\
         routes:\n\
         \x20 kept: {{scheme: 'tcp,udp', host: {backend}, port: 7880:{PORT}, preserve_client_ip: true}}\n\
         \x20 snat: {{scheme: 'tcp,udp', host: {backend}, port: 7881:{PORT}}}\n",
        a = topo.client_link.a_if,
        b = topo.backend_link.a_if,
        backend = topo.backend_addr(),
    );
    let daemon = Daemon::start(&topo.forwarder, "preserve", &yaml);
    let listener = topo.forwarder_addr();
    let (kept, snat) = in_netns(&topo.client, || {
        (
            ask(SocketAddr::from((listener, 7880))),
            ask(SocketAddr::from((listener, 7881))),
        )
    });
    let client = topo.client_link.b_addr.to_string();
    let forwarder = topo.backend_link.a_addr.to_string();
    assert_eq!(kept, (client.clone(), client), "preserve_client_ip");
    assert_eq!(snat, (forwarder.clone(), forwarder), "SNAT");
    let status = daemon.status();
    for alias in ["kept", "snat"] {
        for proto in ["tcp", "udp"] {
            let k = kernel_rule(&status, alias, proto);
            assert_eq!(counter(k, "flows"), 1, "{k}");
            assert_eq!(counter(relay_rule(&status, alias, proto), "flows"), 0);
        }
    }
    for s in server {
        s.join().unwrap();
    }
    daemon.stop();
}
