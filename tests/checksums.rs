//! Checksums as packets really travel through the kernel path.

use crate::common::harness::{Daemon, counter, forwarding_on, in_netns, kernel_rule, relay_rule};
use crate::common::traffic::{
    BackendServers, tcp_echo_conn, tcp_echo_round, tcp_hash_transfer, udp_echo, udp_socket,
};
use crate::common::turn::{listener_addr, turn_rules};
use crate::common::wire;
use crate::common::{self, Topology};

/// Every veth end without checksum offload, TSO, GSO or GRO: each packet
/// carries a full checksum that the receiving stack verifies in software,
/// so a wrong one is dropped and counted in InCsumErrors.
#[test]
fn checksums_hold_when_every_receiver_verifies_them() {
    if !common::require_root("checksums_hold_when_every_receiver_verifies_them") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    in_netns(&topo.client, || wire::offloads_off(&topo.client_link.b_if));
    in_netns(&topo.backend, || {
        wire::offloads_off(&topo.backend_link.b_if)
    });
    in_netns(&topo.forwarder, || {
        wire::offloads_off(&topo.client_link.a_if);
        wire::offloads_off(&topo.backend_link.a_if);
    });
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "swcsum", &turn_rules(&topo, ""));
    let to = listener_addr(&topo);
    let size: u64 = 32 << 20;
    let (sent, received) = in_netns(&topo.client, || {
        let udp = udp_socket(to);
        // Odd and even lengths, so the padding byte of the sum is covered.
        for len in 1..=64usize {
            udp_echo(&udp, &vec![len as u8; len * 17]);
        }
        // A sender that leaves the UDP checksum zero (SO_NO_CHECK).
        let bare = udp_socket(to);
        let one: i32 = 1;
        // SAFETY: setting an int option on a live socket.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&bare),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&one as *const i32).cast(),
                4,
            )
        };
        assert_eq!(rc, 0);
        for n in 0..20u32 {
            udp_echo(&bare, format!("no checksum {n}").as_bytes());
        }
        let mut c = tcp_echo_conn(to);
        tcp_echo_round(&mut c, b"odd length!");
        tcp_hash_transfer(to, size)
    });
    assert_eq!(sent, received);
    assert_eq!(wire::csum_errors(&topo.backend), (0, 0), "at the backend");
    assert_eq!(wire::csum_errors(&topo.client), (0, 0), "at the client");
    let status = daemon.status();
    assert_eq!(counter(kernel_rule(&status, "turn-tcp", "tcp"), "flows"), 2);
    assert_eq!(counter(kernel_rule(&status, "turn-udp", "udp"), "flows"), 2);
    assert_eq!(counter(relay_rule(&status, "turn-tcp", "tcp"), "flows"), 0);
    assert_eq!(counter(relay_rule(&status, "turn-udp", "udp"), "flows"), 0);
    daemon.stop();
}

/// With the default offloads, local senders leave the L4 checksum to be
/// filled in later (CHECKSUM_PARTIAL: the field holds the pseudo-header
/// sum). The rewrite must keep that sum right; captured at the receivers,
/// every frame's checksum field is checked as what it claims to be.
#[test]
fn checksum_partial_packets_carry_the_right_pseudo_header_sum() {
    if !common::require_root("checksum_partial_packets_carry_the_right_pseudo_header_sum") {
        return;
    }
    let topo = Topology::new();
    forwarding_on(&topo);
    let _servers = BackendServers::start(&topo.backend);
    let daemon = Daemon::start(&topo.forwarder, "partial", &turn_rules(&topo, ""));
    let at_backend = in_netns(&topo.backend, || {
        wire::Capture::open(&topo.backend_link.b_if)
    });
    let at_client = in_netns(&topo.client, || wire::Capture::open(&topo.client_link.b_if));
    let to = listener_addr(&topo);
    let (sent, received) = in_netns(&topo.client, || {
        let udp = udp_socket(to);
        for len in [1usize, 2, 3, 100, 1001, 1400] {
            udp_echo(&udp, &vec![7u8; len]);
        }
        let mut c = tcp_echo_conn(to);
        for n in 0..20u32 {
            tcp_echo_round(&mut c, &vec![n as u8; 3000 + n as usize]);
        }
        tcp_hash_transfer(to, 4 << 20)
    });
    assert_eq!(sent, received);
    let mut partial = 0;
    let mut full = 0;
    for (side, capture) in [("backend", &at_backend), ("client", &at_client)] {
        for frame in capture.drain() {
            match wire::check(&frame) {
                None => {}
                Some(Ok(())) if frame.partial => partial += 1,
                Some(Ok(())) => full += 1,
                Some(Err(why)) => panic!("a frame at the {side}: {why}"),
            }
        }
    }
    assert!(partial > 0, "no CHECKSUM_PARTIAL frame seen ({full} full)");
    assert!(partial + full > 100, "{partial} + {full} frames checked");
    // Both protocols went by the kernel path (so its rewrite made the
    // frames checked above), the relay carried nothing.
    let status = daemon.status();
    assert_eq!(counter(kernel_rule(&status, "turn-tcp", "tcp"), "flows"), 2);
    let udp = kernel_rule(&status, "turn-udp", "udp");
    assert_eq!(counter(udp, "flows"), 1, "{udp}");
    assert_eq!(counter(udp, "packets_fwd"), 6, "{udp}");
    assert_eq!(counter(udp, "packets_rev"), 6, "{udp}");
    for (alias, proto) in [("turn-tcp", "tcp"), ("turn-udp", "udp")] {
        assert_eq!(counter(relay_rule(&status, alias, proto), "flows"), 0);
    }
    daemon.stop();
}
