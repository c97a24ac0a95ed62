//! iperf3 through the relay across network namespaces (root).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use forwarder::relay::{Relay, RelayRuleCounters};
use forwarder::rules::{Listener, Protocol, RelaySettings, Timeouts};

use crate::common::relay::{Recorder, TEST_LIMIT, WAIT, any6, listener};
use crate::common::{self};

/// Runs a relay inside `ns` on its own thread until `stop` is sent.
fn relay_in_namespace(
    ns: &common::Netns,
    listeners: Vec<Listener>,
) -> (
    std::thread::JoinHandle<Vec<RelayRuleCounters>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let path = format!("/run/netns/{}", ns.name);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // Only this thread moves; its sockets are made inside the namespace.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let relay = Relay::start(
                &listeners,
                RelaySettings::default(),
                Arc::new(Recorder::default()),
            )
            .await
            .unwrap();
            ready_tx.send(()).unwrap();
            let _ = tokio::time::timeout(TEST_LIMIT, stop_rx).await;
            let counters = relay.counters();
            relay.shutdown(Duration::ZERO).await;
            counters
        })
    });
    ready_rx
        .recv_timeout(WAIT)
        .expect("relay started in the namespace");
    (thread, stop_tx)
}

fn iperf3_json(out: std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 ({}) printed no JSON ({e}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn iperf3_tcp_and_udp_through_one_forwarded_port() {
    if !common::require_root("iperf3_tcp_and_udp_through_one_forwarded_port") {
        return;
    }
    let topo = common::Topology::new();
    let backend = SocketAddr::from((topo.backend_addr(), 5201));
    let port = 7000;
    let listeners = vec![
        listener(
            0,
            Protocol::Tcp,
            any6(port),
            &[(backend, 1)],
            Timeouts::default(),
        ),
        listener(
            1,
            Protocol::Udp,
            any6(port),
            &[(backend, 1)],
            Timeouts::default(),
        ),
    ];
    let _server = topo.backend.spawn("iperf3", &["-s", "-p", "5201"]);
    let (relay, stop) = relay_in_namespace(&topo.forwarder, listeners);
    let front = topo.forwarder_addr().to_string();
    let port = port.to_string();
    // The server needs a moment to listen: until then the relay resets the
    // client, which iperf3 3.12 reports in its JSON (with exit status 0).
    let run = |extra: &[&str]| {
        let mut args = vec!["-c", &front, "-p", &port, "-t", "2", "-J"];
        args.extend_from_slice(extra);
        let mut attempt = 0;
        loop {
            let out = topo.client.command("iperf3").args(&args).output().unwrap();
            let json = iperf3_json(out);
            if json.get("error").is_none() {
                return json;
            }
            attempt += 1;
            assert!(attempt < 30, "iperf3 {extra:?}: {}", json["error"]);
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let tcp = run(&[]);
    let tcp_bytes = tcp["end"]["sum_received"]["bytes"].as_u64().unwrap();
    assert!(tcp_bytes > 0, "iperf3 tcp moved nothing");
    let udp = run(&["-u", "-b", "200M", "-l", "1400"]);
    let sum = &udp["end"]["sum"];
    let packets = sum["packets"].as_u64().unwrap();
    let lost = sum["lost_packets"].as_u64().unwrap();
    assert!(packets > 0 && lost < packets, "iperf3 udp: {sum}");
    eprintln!(
        "iperf3 through the relay: tcp {:.2} Gbit/s, udp {:.0} pps ({lost} of {packets} lost)",
        tcp["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap()
            / 1e9,
        packets as f64 / sum["seconds"].as_f64().unwrap()
    );
    stop.send(()).unwrap();
    let counters = relay.join().unwrap();
    let (t, u) = (&counters[0], &counters[1]);
    assert!(t.flows >= 2, "control and data connection: {t:?}");
    assert!(t.bytes_to_backend >= tcp_bytes, "{t:?}");
    assert!(
        u.flows >= 1 && u.bytes_to_backend > 0 && u.bytes_to_client > 0,
        "{u:?}"
    );
}
