//! The programs run on crafted packets with `BPF_PROG_TEST_RUN` (root).
//!
//! Nothing is attached: the kernel runs the program once on the bytes
//! given and returns its verdict and the packet as it left.

mod acl;
mod closing;
mod fallback;
mod fixture;
mod flow_state;
mod health;
mod hooks;
mod host_nat;
mod icmp;
mod lookup_cost;
mod matching;
mod packet;
mod programs;
mod ranges;
mod refresh;
mod rewrite;
mod snat_pool;
mod unanswered;
mod xdp;

use std::os::fd::{AsFd, AsRawFd};

use aya::Ebpf;
use aya::maps::{HashMap, PerCpuArray, PerCpuHashMap};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use forwarder_common::host_nat::{HOST_PORTS_MAP, HostPortKey};
use forwarder_common::reasons::{REASON_COUNTERS_MAP, ReasonCounts};
use forwarder_common::{CtKey, CtValue, IfaceCounters, RelayFlow, RuleCounters};

use super::attach::{Attached, TC_EGRESS_PROGRAM, TC_PROGRAM, XDP_PROGRAM};
use super::load;
use super::rule_maps::RuleMaps;
pub use super::testns::require_root;

/// TCX "next" (-1): later programs and filters on the hook run.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_PASS: u32 = 2;

/// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`: the skb is CHECKSUM_COMPLETE and the
/// kernel checks after the run that `skb->csum` still matches the bytes.
pub const F_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// The object loaded with both programs in the kernel, nothing attached.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// Taken out of `ebpf` at the first `write_tables`.
    rule_maps: Option<RuleMaps>,
}

/// What a run returned.
#[derive(Debug)]
pub struct Run {
    pub verdict: u32,
    pub packet: Vec<u8>,
}

impl Loaded {
    /// Loaded with every log statement live: the verifier sees the largest
    /// program the daemon can run (with `RUST_LOG=trace`).
    pub fn new(conntrack: u32) -> Loaded {
        Loaded::with_log_level(conntrack, aya_log::Level::Trace as u8)
    }

    pub fn with_log_level(conntrack: u32, log_level: u8) -> Loaded {
        let mut ebpf = load::load(
            load::Sizes {
                conntrack,
                relay_flows: conntrack,
            },
            log_level,
            None,
        )
        .expect("load the eBPF object");
        Attached::load_programs(&mut ebpf).expect("load the programs");
        Loaded {
            ebpf,
            rule_maps: None,
        }
    }

    fn tc(&self) -> &SchedClassifier {
        self.ebpf
            .program(TC_PROGRAM)
            .expect("tc program")
            .try_into()
            .expect("a classifier")
    }

    /// Runs the TC program once on `packet`.
    pub fn run_tc(&self, packet: &[u8]) -> Run {
        let mut out = vec![0u8; packet.len() + 256];
        let result = self
            .tc()
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN of the TC program");
        out.truncate(result.data_size_out as usize);
        Run {
            verdict: result.return_value,
            packet: out,
        }
    }

    /// Runs the TC program with test-run `flags` (aya's options cannot
    /// carry them, so this is the raw `bpf(2)` call). `Err` is the errno.
    pub fn run_tc_flags(&self, packet: &[u8], flags: u32) -> Result<Run, i32> {
        let fd = self.tc().fd().expect("loaded").as_fd().as_raw_fd();
        raw_test_run(fd, packet, flags)
    }

    /// Runs the TC egress program once on `packet`, whose skb has `mark`;
    /// the run and the mark it left.
    pub fn run_tc_egress(&self, packet: &[u8], mark: u32) -> (Run, u32) {
        let egress: &SchedClassifier = self
            .ebpf
            .program(TC_EGRESS_PROGRAM)
            .expect("tc egress program")
            .try_into()
            .expect("a classifier");
        // `struct __sk_buff` up to its mark (len and pkt_type must be 0).
        const MARK_AT: usize = 8;
        let mut ctx_in = [0u8; MARK_AT + 4];
        ctx_in[MARK_AT..].copy_from_slice(&mark.to_ne_bytes());
        // The kernel writes the whole `__sk_buff` back (192 bytes in 6.x).
        let mut ctx_out = [0u8; 256];
        let mut out = vec![0u8; packet.len() + 256];
        let result = egress
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN of the TC egress program");
        out.truncate(result.data_size_out as usize);
        let mark_out =
            u32::from_ne_bytes(ctx_out[MARK_AT..MARK_AT + 4].try_into().expect("4 bytes"));
        (
            Run {
                verdict: result.return_value,
                packet: out,
            },
            mark_out,
        )
    }

    /// The host's source ports the egress program noted, and when.
    pub fn host_ports(&self) -> Vec<(HostPortKey, u64)> {
        let map: HashMap<_, HostPortKey, u64> =
            HashMap::try_from(self.ebpf.map(HOST_PORTS_MAP).expect("map")).expect("lru hash");
        map.iter().map(|r| r.expect("entry")).collect()
    }

    /// Runs the XDP program once on `packet`.
    pub fn run_xdp(&self, packet: &[u8]) -> Run {
        let xdp: &Xdp = self
            .ebpf
            .program(XDP_PROGRAM)
            .expect("xdp program")
            .try_into()
            .expect("an xdp program");
        let mut out = vec![0u8; packet.len() + 256];
        let result = xdp
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN of the XDP program");
        out.truncate(result.data_size_out as usize);
        Run {
            verdict: result.return_value,
            packet: out,
        }
    }

    /// Writes rule tables into the maps.
    pub fn write_tables(&mut self, tables: &super::tables::Tables) {
        let maps = match &mut self.rule_maps {
            Some(maps) => maps,
            None => self
                .rule_maps
                .insert(RuleMaps::take(&mut self.ebpf).expect("the rule maps")),
        };
        maps.write(tables).expect("write the tables");
    }

    /// A health change of `rule_id` in `tables`, written as the daemon
    /// writes it (after [`Loaded::write_tables`]).
    pub fn write_health(&mut self, tables: &super::tables::Tables, rule_id: u32) {
        let maps = self.rule_maps.as_mut().expect("tables written first");
        maps.write_health(tables, rule_id)
            .expect("write the health change");
    }

    pub fn conntrack(&self) -> Vec<(CtKey, CtValue)> {
        let map: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map("CONNTRACK").expect("map")).expect("hash");
        map.iter().map(|r| r.expect("entry")).collect()
    }

    pub fn relay_flows(&self) -> Vec<(CtKey, RelayFlow)> {
        let map: HashMap<_, CtKey, RelayFlow> =
            HashMap::try_from(self.ebpf.map("RELAY_FLOWS").expect("map")).expect("hash");
        map.iter().map(|r| r.expect("entry")).collect()
    }

    /// The counters of `rule_id`, summed over CPUs.
    pub fn rule_counters(&self, rule_id: u32) -> RuleCounters {
        let map: PerCpuArray<_, RuleCounters> =
            PerCpuArray::try_from(self.ebpf.map("RULE_COUNTERS").expect("map")).expect("array");
        let mut sum = RuleCounters::default();
        for c in map.get(&rule_id, 0).expect("rule counters").iter() {
            sum.add(c);
        }
        sum
    }

    /// The reasons counted in `rule_id`'s row (or `NO_RULE`'s), summed over CPUs.
    pub fn reasons(&self, rule_id: u32) -> ReasonCounts {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(REASON_COUNTERS_MAP).expect("map")).expect("array");
        let mut sum = ReasonCounts::default();
        for (at, slot) in sum.0.iter_mut().zip(ReasonCounts::slots(rule_id)) {
            *at = map.get(&slot, 0).expect("reason counters").iter().sum();
        }
        sum
    }

    /// Asserts that `rule_id`'s row counted exactly `expected`: each
    /// `(slot, n)` at a reason's slot in rule 0's row (as
    /// `Fallback::Fragment.slot(0)`), every other reason zero.
    pub fn assert_reasons(&self, rule_id: u32, expected: &[(u32, u64)]) {
        let mut want = ReasonCounts::default();
        for &(slot, n) in expected {
            want.0[slot as usize] = n;
        }
        assert_eq!(self.reasons(rule_id), want, "reasons of rule {rule_id}");
    }

    /// The interface counters of `ifindex`, summed over CPUs.
    pub fn iface_counters(&self, ifindex: u32) -> IfaceCounters {
        let map: PerCpuHashMap<_, u32, IfaceCounters> =
            PerCpuHashMap::try_from(self.ebpf.map("IFACE_COUNTERS").expect("map"))
                .expect("per-cpu hash");
        let mut sum = IfaceCounters::default();
        if let Ok(per_cpu) = map.get(&ifindex, 0) {
            for c in per_cpu.iter() {
                sum.add(c);
            }
        }
        sum
    }
}

#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

fn raw_test_run(prog_fd: i32, packet: &[u8], flags: u32) -> Result<Run, i32> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestAttr {
        prog_fd: prog_fd as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        flags,
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
    if rc != 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    out.truncate(attr.data_size_out as usize);
    Ok(Run {
        verdict: attr.retval,
        packet: out,
    })
}
