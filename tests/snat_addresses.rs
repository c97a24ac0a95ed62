//! `kernel.snat_addresses` with a running daemon: the backend sees new
//! flows from the pool; a reload moves new flows to the new pool while
//! flows keep their address; an address the host does not own stops a
//! start and a reload (the running rules stay); a pool the backend's
//! route cannot use leaves it its route's address, with a warning.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, spawn_in};
use crate::common::traffic::{udp_echo, udp_socket};
use crate::common::{self, Topology, require_root};

const LISTEN_PORT: u16 = 7200;
const BACKEND_PORT: u16 = 3992;

/// The backend: echoes, and notes from which address each payload came.
struct Backend {
    from: Arc<Mutex<HashMap<Vec<u8>, Ipv4Addr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    fn start(topo: &Topology) -> Backend {
        let socket = in_netns(&topo.backend, || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            s
        });
        let from = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, st) = (from.clone(), stop.clone());
        let thread = spawn_in(&topo.backend, move || {
            let mut buf = [0u8; 256];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let SocketAddr::V4(peer) = peer else {
                    unreachable!()
                };
                f.lock().unwrap().insert(buf[..n].to_vec(), *peer.ip());
                socket.send_to(&buf[..n], peer).unwrap();
            }
        });
        Backend {
            from,
            stop,
            thread: Some(thread),
        }
    }

    /// The address `msg` came from.
    fn source_of(&self, msg: &[u8]) -> Ipv4Addr {
        *self
            .from
            .lock()
            .unwrap()
            .get(msg)
            .unwrap_or_else(|| panic!("{} never reached the backend", String::from_utf8_lossy(msg)))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rules(topo: &Topology, pool: &str) -> String {
    format!(
        "interfaces: [{}, {}]\nkernel: {{snat_addresses: [{pool}]}}\nroutes:\n  \
         echo: {{scheme: udp, host: {}, port: {LISTEN_PORT}:{BACKEND_PORT}, path: kernel}}\n",
        topo.client_link.a_if,
        topo.backend_link.a_if,
        topo.backend_addr(),
    )
}

fn addr(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn a_reload_moves_new_flows_to_the_new_snat_addresses_and_refuses_ones_the_host_lacks() {
    if !require_root(
        "a_reload_moves_new_flows_to_the_new_snat_addresses_and_refuses_ones_the_host_lacks",
    ) {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    for a in ["198.18.2.10/24", "198.18.2.11/24"] {
        topo.forwarder
            .ip(&["addr", "add", a, "dev", &topo.backend_link.a_if]);
    }
    // An address of the client side: the backend's route cannot use it.
    topo.forwarder.ip(&[
        "addr",
        "add",
        "198.18.1.10/24",
        "dev",
        &topo.client_link.a_if,
    ]);
    let backend = Backend::start(&topo);
    let daemon = Daemon::start(&topo.forwarder, "snat-addrs", &rules(&topo, "198.18.2.10"));
    let to = SocketAddr::from((topo.forwarder_addr(), LISTEN_PORT));
    let first = in_netns(&topo.client, || udp_socket(to));
    in_netns(&topo.client, || udp_echo(&first, b"first"));
    assert_eq!(backend.source_of(b"first"), addr("198.18.2.10"));

    // A new pool: new flows take it, the running flow keeps its address.
    std::fs::write(daemon.config_path(), rules(&topo, "198.18.2.11")).unwrap();
    let out = daemon.reload();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = in_netns(&topo.client, || {
        udp_echo(&first, b"first again");
        let s = udp_socket(to);
        udp_echo(&s, b"second");
        s
    });
    assert_eq!(backend.source_of(b"first again"), addr("198.18.2.10"));
    assert_eq!(backend.source_of(b"second"), addr("198.18.2.11"));
    assert_eq!(
        daemon.status()["kernel"]["snat_addresses"],
        serde_json::json!(["198.18.2.11"])
    );

    // An address this host lacks: the reload fails and changes nothing.
    std::fs::write(daemon.config_path(), rules(&topo, "198.18.2.99")).unwrap();
    let out = daemon.reload();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("kernel.snat_addresses: 198.18.2.99 is not an address of this host"),
        "{stderr}"
    );
    in_netns(&topo.client, || udp_echo(&udp_socket(to), b"third"));
    assert_eq!(backend.source_of(b"third"), addr("198.18.2.11"));

    // A pool on another interface than the backend's route: the backend
    // keeps its route's address, and the log says why.
    std::fs::write(daemon.config_path(), rules(&topo, "198.18.1.10")).unwrap();
    let out = daemon.reload();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    in_netns(&topo.client, || {
        udp_echo(&udp_socket(to), b"fourth");
        udp_echo(&second, b"second again");
    });
    assert_eq!(backend.source_of(b"fourth"), topo.backend_link.a_addr);
    assert_eq!(backend.source_of(b"second again"), addr("198.18.2.11"));
    let log = daemon.log_text();
    assert!(
        log.contains(&format!(
            "backend {} is reached through {}, which does not have 198.18.1.10",
            topo.backend_addr(),
            topo.backend_link.a_if
        )),
        "{log}"
    );
    let status = daemon.status();
    let k = kernel_rule(&status, "echo", "udp");
    assert_eq!(counter(k, "flows"), 4, "{k}");
    assert_eq!(
        counter(k, "fallback_full") + counter(k, "fallback_other"),
        0,
        "{k}"
    );
    daemon.stop();
}

#[test]
fn a_start_with_a_snat_address_the_host_lacks_fails_with_one_clear_error() {
    if !require_root("a_start_with_a_snat_address_the_host_lacks_fails_with_one_clear_error") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let dir = std::env::temp_dir().join(format!("fwd-snat-lacks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("forwarder.yaml");
    std::fs::write(&file, rules(&topo, "198.18.2.10, 198.18.2.99")).unwrap();
    let mut cmd = topo.forwarder.command(common::forwarder_bin());
    cmd.args(["run", "-c"])
        .arg(&file)
        .arg("--control")
        .arg(dir.join("control.sock"));
    let out = common::output_within(&mut cmd, Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "kernel.snat_addresses: 198.18.2.10, 198.18.2.99 are not addresses of this host"
        ),
        "{stderr}"
    );
}
