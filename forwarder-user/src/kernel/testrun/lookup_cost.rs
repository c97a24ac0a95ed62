//! The kernel path's rule lookup at 10 and 10,000 single-port rules, with
//! one range of 16,384 ports, and with that range present beside 10,000
//! rules: new flows spread over every rule each match their own rule and
//! open exactly one flow, and then travel as established flows.
//!
//! `cargo xtask bench --lookup` runs this test with more flows and rounds
//! (`FORWARDER_LOOKUP_COST=FILE`) and reads the nanoseconds per run that
//! the kernel reported, written to FILE as JSON lines. The test asserts the
//! packets, never the time.

use std::os::fd::{AsFd, AsRawFd};

use forwarder_common::{
    BACKEND_F_HEALTHY, Backend, MAX_BACKENDS_PER_RULE, MAX_SNAT_PROBES, PROTO_UDP, RuleKey,
    RuleValue, Settings,
};

use super::fixture::*;
use super::packet::{Spec, view};
use super::*;
use crate::config::range_entries;
use crate::kernel::snat::addr_of;
use crate::kernel::tables::Tables;
use crate::rules::{ListenPorts, Protocol, TargetPorts};

/// Single-port rules listen from here up (below the SNAT ports).
const FIRST_RULE_PORT: u16 = 10_000;
/// Outside every listen port, as the daemon's validation demands.
const SNAT_RANGE: (u16, u16) = (20_000, 39_999);
/// The range rule: issue 14's TURN relay range.
const RANGE_FIRST: u16 = 49_152;
const RANGE_PORTS: u16 = 16_384;
/// Client source ports start here; one per flow.
const FIRST_CLIENT_PORT: u16 = 1_024;

/// One table the flows run through.
#[derive(Clone, Copy, Debug)]
struct Variant {
    name: &'static str,
    /// Single-port UDP rules, ids 0..rules.
    rules: u32,
    /// One range rule (id `rules`) is in the table.
    range: bool,
    /// The flows go to the range's ports rather than the single ports.
    to_range: bool,
    /// The flows go to this many single-port rules, spread over the
    /// table; 0 for every rule.
    aimed: u32,
}

const VARIANTS: [Variant; 5] = [
    Variant {
        name: "10 rules",
        rules: 10,
        range: false,
        to_range: false,
        aimed: 0,
    },
    Variant {
        name: "10,000 rules",
        rules: 10_000,
        range: false,
        to_range: false,
        aimed: 0,
    },
    // The table's size alone: the flows touch as few rules as with 10.
    Variant {
        name: "10,000 rules, flows to 10 of them",
        rules: 10_000,
        range: false,
        to_range: false,
        aimed: 10,
    },
    Variant {
        name: "1 range of 16,384 ports",
        rules: 0,
        range: true,
        to_range: true,
        aimed: 0,
    },
    Variant {
        name: "10,000 rules + the range, to a single port",
        rules: 10_000,
        range: true,
        to_range: false,
        aimed: 0,
    },
];

fn backend() -> Backend {
    // Every rule to one backend ip:port, so that each table fills the
    // SNAT ports alike and only the lookup differs.
    Backend {
        addr: addr_of(BACKEND.into()),
        snat_addr: addr_of(SNAT.into()),
        port: BACKEND_PORT.to_be(),
        weight: 1,
        flags: BACKEND_F_HEALTHY,
    }
}

fn value(rule_id: u32) -> RuleValue {
    RuleValue {
        rule_id,
        flags: 0,
        backend_count: 1,
        total_weight: 1,
    }
}

fn table(v: Variant) -> Tables {
    let mut t = Tables {
        settings: Settings {
            snat_port_min: SNAT_RANGE.0,
            snat_port_max: SNAT_RANGE.1,
            snat_probe_limit: u32::from(SNAT_RANGE.1 - SNAT_RANGE.0 + 1).min(MAX_SNAT_PROBES),
            closed_reuse_after_ns: 1_000_000_000,
            closed_reuse_before_ns: 9_000_000_000,
            unanswered_reuse_after_ns: 1_000_000_000,
            unanswered_reuse_before_ns: 29_000_000_000,
        },
        ..Tables::default()
    };
    for id in 0..v.rules {
        let key = RuleKey {
            addr: addr_of(LISTENER.into()),
            port: (FIRST_RULE_PORT + id as u16).to_be(),
            proto: PROTO_UDP,
            _pad: 0,
        };
        t.rules.push((key, value(id)));
        t.backends.push((id * MAX_BACKENDS_PER_RULE, backend()));
    }
    if v.range {
        let id = v.rules;
        t.ranges.extend(range_entries(
            addr_of(LISTENER.into()),
            Protocol::Udp,
            RANGE_FIRST,
            ListenPorts {
                count: RANGE_PORTS,
                target: TargetPorts::Same,
            },
            value(id),
        ));
        t.backends.push((id * MAX_BACKENDS_PER_RULE, backend()));
    }
    t
}

/// Flow `i` of `flows`: its listen port and rule id, spread evenly over
/// the rules (or the range's ports) it is aimed at.
fn target(v: Variant, i: u32, flows: u32) -> (u16, u32) {
    let spread = |n: u32| {
        if n >= flows {
            (u64::from(i) * u64::from(n) / u64::from(flows)) as u32
        } else {
            i % n
        }
    };
    if v.to_range {
        (RANGE_FIRST + spread(u32::from(RANGE_PORTS)) as u16, v.rules)
    } else {
        let id = match v.aimed {
            0 => spread(v.rules),
            n => spread(n) * (v.rules / n),
        };
        (FIRST_RULE_PORT + id as u16, id)
    }
}

/// One run of the TC program on `packet` and the nanoseconds the kernel
/// measured it took (`repeat` 1: a run rewrites the packet it is given,
/// so a repeated run would not see the same frame again).
fn timed_run(k: &Loaded, packet: &[u8]) -> (Run, u32) {
    let fd = k.tc().fd().expect("loaded").as_fd().as_raw_fd();
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestAttr {
        prog_fd: fd as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: the attr points at live buffers of the sizes given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestAttr,
            std::mem::size_of::<TestAttr>(),
        )
    };
    assert_eq!(rc, 0, "test run: {}", std::io::Error::last_os_error());
    out.truncate(attr.data_size_out as usize);
    let run = Run {
        verdict: attr.retval,
        packet: out,
    };
    (run, attr.duration)
}

fn assert_to_backend(run: &Run, what: &str) {
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "{what}");
    let v = view(&run.packet);
    assert_eq!(
        (v.src, v.dst, v.dport),
        (SNAT, BACKEND, BACKEND_PORT),
        "{what}"
    );
}

fn median(mut ns: Vec<u32>) -> u32 {
    ns.sort_unstable();
    ns[ns.len() / 2]
}

/// The median ns of a new flow's first packet and of its second.
struct Cost {
    new_ns: u32,
    established_ns: u32,
}

/// `flows` new flows through `v`'s table in a fresh program and namespace,
/// then one more packet of each; asserts where each went.
fn measure(v: Variant, flows: u32) -> Cost {
    with_router(4 * flows, table(v), |k| {
        let frames: Vec<(Vec<u8>, u32)> = (0..flows)
            .map(|i| {
                let (port, id) = target(v, i, flows);
                let src = (CLIENT, FIRST_CLIENT_PORT + i as u16);
                (Spec::udp(src, (LISTENER, port)).build(), id)
            })
            .collect();
        let mut per_rule = std::collections::HashMap::<u32, u64>::new();
        let mut new = Vec::with_capacity(frames.len());
        for (n, (frame, id)) in frames.iter().enumerate() {
            let (run, ns) = timed_run(k, frame);
            assert_to_backend(&run, &format!("{}: new flow {n}", v.name));
            *per_rule.entry(*id).or_default() += 1;
            new.push(ns);
        }
        let mut established = Vec::with_capacity(frames.len());
        for (n, (frame, _)) in frames.iter().enumerate() {
            let (run, ns) = timed_run(k, frame);
            assert_to_backend(&run, &format!("{}: established flow {n}", v.name));
            established.push(ns);
        }
        // Exactly one flow (two entries) per frame, on the rule aimed at.
        assert_eq!(k.conntrack().len(), 2 * flows as usize, "{}", v.name);
        // The first, middle and last rule aimed at counted their own.
        let mut hit: Vec<u32> = per_rule.keys().copied().collect();
        hit.sort_unstable();
        for id in [hit[0], hit[hit.len() / 2], hit[hit.len() - 1]] {
            let want = per_rule[&id];
            let got = k.rule_counters(id);
            assert_eq!(
                (got.flows, got.packets_fwd),
                (want, 2 * want),
                "{} rule {id}",
                v.name
            );
        }
        assert!(k.relay_flows().is_empty());
        Cost {
            new_ns: median(new),
            established_ns: median(established),
        }
    })
}

/// Flows of each run and rounds over every table: small in the suite,
/// as the bench asks when it runs this test.
fn scale() -> (u32, u32, Option<String>) {
    let out = std::env::var("FORWARDER_LOOKUP_COST").ok();
    let num = |name: &str, default: u32| {
        std::env::var(name)
            .ok()
            .map(|s| s.parse::<u32>().expect(name))
            .unwrap_or(default)
    };
    let flows = num("FORWARDER_LOOKUP_FLOWS", 200);
    assert!((1..=10_000).contains(&flows), "1 to 10,000 flows");
    let rounds = num("FORWARDER_LOOKUP_ROUNDS", 1);
    assert!(rounds >= 1, "at least 1 round");
    (flows, rounds, out)
}

#[test]
fn new_flows_spread_over_ten_thousand_rules_or_a_range_each_find_their_rule() {
    if !require_root("new_flows_spread_over_ten_thousand_rules_or_a_range_each_find_their_rule") {
        return;
    }
    let (flows, rounds, out) = scale();
    let mut lines = String::new();
    // Rounds interleave the tables, so that a busy spell of a shared
    // machine falls on all of them.
    for round in 1..=rounds {
        for v in VARIANTS {
            let cost = measure(v, flows);
            lines.push_str(&format!(
                "{{\"table\":\"{}\",\"round\":{round},\"flows\":{flows},\
                 \"new_ns\":{},\"established_ns\":{}}}\n",
                v.name, cost.new_ns, cost.established_ns
            ));
        }
    }
    if let Some(path) = out {
        std::fs::write(&path, lines).expect("write the figures");
    }
}

#[test]
fn flows_spread_evenly_over_the_rules_aimed_at() {
    let few = VARIANTS[0];
    let many = VARIANTS[1];
    let aimed = VARIANTS[2];
    assert_eq!(target(aimed, 0, 200), (10_000, 0));
    assert_eq!(target(aimed, 13, 200), (13_000, 3_000));
    assert_eq!(target(aimed, 199, 200), (19_000, 9_000));
    let range = VARIANTS[3];
    assert_eq!(target(few, 0, 200), (10_000, 0));
    assert_eq!(target(few, 13, 200), (10_003, 3));
    assert_eq!(target(many, 0, 200), (10_000, 0));
    assert_eq!(target(many, 199, 200), (19_950, 9_950));
    assert_eq!(target(range, 199, 200), (65_454, 0));
    let t = table(VARIANTS[4]);
    assert_eq!(t.rules.len(), 10_000);
    assert_eq!(
        t.values().filter(|r| r.rule_id == 10_000).count(),
        t.ranges.len()
    );
}
