//! Both programs count and pass traffic they have no rule for.

use std::net::Ipv4Addr;

use super::packet::{Spec, TCP_ACK};
use super::*;

const LO: u32 = 1;

#[test]
fn tc_and_xdp_count_and_pass_unmatched_packets_unchanged() {
    if !require_root("tc_and_xdp_count_and_pass_unmatched_packets_unchanged") {
        return;
    }
    // Logging off: the verifier sees the smallest program.
    let loaded = Loaded::with_log_level(1024, 0);
    let packet = Spec::tcp(
        (Ipv4Addr::new(192, 0, 2, 1), 1234),
        (Ipv4Addr::new(192, 0, 2, 2), 80),
        TCP_ACK,
    )
    .build();
    let runs = 3;
    for _ in 0..runs {
        let tc = loaded.run_tc(&packet);
        assert_eq!(tc.verdict, TC_ACT_UNSPEC);
        assert_eq!(tc.packet, packet, "TC left the packet as it was");
        let xdp = loaded.run_xdp(&packet);
        assert_eq!(xdp.verdict, XDP_PASS);
        assert_eq!(xdp.packet, packet, "XDP left the packet as it was");
    }
    // The kernel checks skb->csum after a CHECKSUM_COMPLETE run.
    let complete = loaded
        .run_tc_flags(&packet, F_CHECKSUM_COMPLETE)
        .expect("a CHECKSUM_COMPLETE run");
    assert_eq!(
        (complete.verdict, &complete.packet),
        (TC_ACT_UNSPEC, &packet)
    );
    // Test runs see the namespace's loopback as the interface.
    let c = loaded.iface_counters(LO);
    assert_eq!(c.tc_packets, runs + 1);
    assert_eq!(c.xdp_packets, runs);
    assert_eq!(c.tc_bytes, (runs + 1) * packet.len() as u64);
    assert_eq!(c.xdp_bytes, runs * packet.len() as u64);
}

#[test]
fn garbage_and_truncated_frames_pass_unchanged() {
    if !require_root("garbage_and_truncated_frames_pass_unchanged") {
        return;
    }
    let loaded = Loaded::new(1024);
    let full = Spec::udp(
        (Ipv4Addr::new(192, 0, 2, 1), 1234),
        (Ipv4Addr::new(192, 0, 2, 2), 53),
    )
    .build();
    // Every truncation of a valid frame after the IPv4 header (test runs
    // refuse shorter IPv4 frames), headers that lie, and no IPv4 at all.
    let mut frames: Vec<Vec<u8>> = (34..full.len()).map(|n| full[..n].to_vec()).collect();
    for (at, byte) in [(14, 0x44), (14, 0x65), (14, 0x4f), (16, 0xff), (16, 0x00)] {
        let mut bad = full.clone();
        bad[at] = byte; // ihl 4, version 6, ihl 15, total length lies
        frames.push(bad);
    }
    frames.push(vec![0xff; 60]);
    let mut arp = full.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    frames.push(arp);
    for frame in frames {
        let tc = loaded.run_tc(&frame);
        assert_eq!(tc.verdict, TC_ACT_UNSPEC, "frame of {} bytes", frame.len());
        assert_eq!(tc.packet, frame);
        let xdp = loaded.run_xdp(&frame);
        assert_eq!(xdp.verdict, XDP_PASS);
        assert_eq!(xdp.packet, frame);
    }
}

/// What the verifier walks for each program, as the daemon loads it with
/// logging off and with every log statement live. Choosing the SNAT pairs
/// per probe once took the TC program from 208k to 468k instructions and
/// 1.5 s to load, which held up an upgrade's new image; the bounds stand
/// between, well under the kernel's limit of a million.
#[test]
fn every_program_stays_well_within_the_verifiers_budget() {
    use crate::kernel::attach::{TC_EGRESS_PROGRAM, TC_PROGRAM, XDP_PROGRAM};
    if !require_root("every_program_stays_well_within_the_verifiers_budget") {
        return;
    }
    // (name, bound with logging off, bound with every log statement live)
    let bounds = [
        (TC_PROGRAM, 260_000, 430_000),
        (TC_EGRESS_PROGRAM, 60_000, 60_000),
        (XDP_PROGRAM, 10_000, 15_000),
    ];
    for (level, trace) in [(0, false), (aya_log::Level::Trace as u8, true)] {
        let loaded = Loaded::with_log_level(1024, level);
        for (name, off, live) in bounds {
            let bound = if trace { live } else { off };
            let info = loaded
                .ebpf
                .program(name)
                .expect("the program")
                .info()
                .expect("its info");
            let walked = info
                .verified_instruction_count()
                .expect("the kernel reports verified instructions");
            eprintln!("{name} at log level {level}: {walked} verified instructions");
            assert!(
                walked <= bound,
                "{name} at log level {level}: {walked} verified instructions, more than {bound}"
            );
        }
    }
}
