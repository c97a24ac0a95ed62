//! The programs' per-CPU counters, summed for `forwarder status`.

use std::collections::{BTreeMap, HashMap};
use std::mem::size_of;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use forwarder_common::reasons::{
    Dropped, Fallback, NO_RULE, REASON_COUNTERS_MAP, REASONS_PER_RULE, ReasonCounts, XdpPass,
};
use forwarder_common::{IfaceCounters, RuleCounters};
use serde::Serialize;

use super::interfaces::Interface;
use super::map_batch;
use super::sweeper::{Gauges, SnatUse};
use crate::rules::Listener;

/// What both programs saw on one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InterfaceCounters {
    pub name: String,
    pub ifindex: u32,
    pub xdp_packets: u64,
    pub xdp_bytes: u64,
    pub tc_packets: u64,
    pub tc_bytes: u64,
}

/// What the kernel path did for one rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelRuleCounters {
    pub rule_id: u32,
    pub alias: String,
    pub protocol: &'static str,
    /// Client to backend.
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    /// Backend to client.
    pub packets_rev: u64,
    pub bytes_rev: u64,
    /// Flows the kernel path created.
    pub flows: u64,
    /// Of these packets, those XDP carried (TC carried the rest).
    pub xdp_packets: u64,
    /// New flows left to the relay because a table was full (the
    /// `fallbacks` whose reason `is_full`).
    pub fallback_full: u64,
    /// New flows left to the relay for another reason (the other `fallbacks`).
    pub fallback_other: u64,
    /// Packets of kernel flows dropped (the sum of `drops`).
    pub dropped: u64,
    /// New flows left to the relay, by reason (non-zero ones).
    pub fallbacks: BTreeMap<&'static str, u64>,
    /// Packets XDP left to TC, by reason (non-zero ones).
    pub xdp_passes: BTreeMap<&'static str, u64>,
    /// Packets of kernel flows dropped, by reason (non-zero ones).
    pub drops: BTreeMap<&'static str, u64>,
    /// ICMP errors about kernel flows translated and sent to the other side.
    pub icmp_translated: u64,
    /// ICMP errors sent for kernel flows' packets that could not be
    /// forwarded (TTL expired, DF and too big for the next hop).
    pub icmp_sent: u64,
    /// New flows' first packets (TCP SYN, UDP datagram) the ACL denied:
    /// dropped, or a SYN reset.
    pub acl_denied: u64,
    /// New flows that took the SNAT port of an unanswered UDP flow quiet
    /// for a second, when no port toward the backend was free.
    pub unanswered_taken_over: u64,
}

/// What one rule id counted: its counters and its reasons.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleTotals {
    pub counters: RuleCounters,
    pub reasons: ReasonCounts,
}

impl RuleTotals {
    pub fn add(&mut self, other: &RuleTotals) {
        self.counters.add(&other.counters);
        self.reasons.add(&other.reasons);
    }
}

/// The non-zero counts of `reasons`, by name.
fn non_zero<R: Copy>(
    reasons: &[R],
    name: impl Fn(R) -> &'static str,
    count: impl Fn(R) -> u64,
) -> BTreeMap<&'static str, u64> {
    reasons
        .iter()
        .map(|&r| (name(r), count(r)))
        .filter(|&(_, n)| n != 0)
        .collect()
}

/// XDP's passes of `reasons`, by name (non-zero ones).
fn xdp_passes(reasons: &ReasonCounts) -> BTreeMap<&'static str, u64> {
    non_zero(&XdpPass::ALL, XdpPass::name, |r| reasons.xdp_pass(r))
}

impl KernelRuleCounters {
    fn new(listener: &Listener, sum: &RuleTotals) -> KernelRuleCounters {
        let RuleCounters {
            packets_fwd,
            bytes_fwd,
            packets_rev,
            bytes_rev,
            flows,
            xdp_packets,
            icmp_translated,
            icmp_sent,
            acl_denied,
            unanswered_taken_over,
        } = sum.counters;
        let reasons = &sum.reasons;
        let fallback_full = Fallback::ALL
            .iter()
            .filter(|r| r.is_full())
            .map(|&r| reasons.fallback(r))
            .sum();
        let fallback_other = Fallback::ALL
            .iter()
            .filter(|r| !r.is_full())
            .map(|&r| reasons.fallback(r))
            .sum();
        let dropped = Dropped::ALL.iter().map(|&r| reasons.dropped(r)).sum();
        KernelRuleCounters {
            rule_id: listener.rule_id,
            alias: listener.alias.clone(),
            protocol: listener.protocol.as_str(),
            packets_fwd,
            bytes_fwd,
            packets_rev,
            bytes_rev,
            flows,
            xdp_packets,
            fallback_full,
            fallback_other,
            dropped,
            fallbacks: non_zero(&Fallback::ALL, Fallback::name, |r| reasons.fallback(r)),
            xdp_passes: xdp_passes(reasons),
            drops: non_zero(&Dropped::ALL, Dropped::name, |r| reasons.dropped(r)),
            icmp_translated,
            icmp_sent,
            acl_denied,
            unanswered_taken_over,
        }
    }
}

impl InterfaceCounters {
    fn new(interface: &Interface, sum: &IfaceCounters) -> InterfaceCounters {
        let IfaceCounters {
            xdp_packets,
            xdp_bytes,
            tc_packets,
            tc_bytes,
        } = *sum;
        InterfaceCounters {
            name: interface.name.clone(),
            ifindex: interface.ifindex,
            xdp_packets,
            xdp_bytes,
            tc_packets,
            tc_bytes,
        }
    }
}

/// Counters of the kernel path, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelCounters {
    pub interfaces: Vec<InterfaceCounters>,
    pub rules: Vec<KernelRuleCounters>,
    /// Conntrack entries at the last sweep (two per flow).
    pub conntrack_entries: u64,
    /// Flows in RELAY_FLOWS at the last sweep.
    pub relay_flow_entries: u64,
    /// Kernel flows the sweeper expired so far.
    pub expired_flows: u64,
    /// Flows the conntrack table holds at most.
    pub conntrack_capacity: u64,
    /// SNAT ports each (source address, backend) pair can hand out.
    pub snat_ports: u64,
    /// `kernel.snat_addresses` in force (empty: each backend's route address).
    pub snat_addresses: Vec<String>,
    /// SNAT ports in use toward the busiest backend at the last sweep.
    pub snat_ports_in_use: u64,
    /// SNAT ports in use per source address and backend at the last sweep.
    pub snat_ports_in_use_per_backend: Vec<SnatUse>,
    /// Packets XDP left to TC before it knew their rule, by reason
    /// (non-zero ones): not a kernel flow, or a frame it cannot read.
    pub xdp_passes_without_rule: BTreeMap<&'static str, u64>,
    /// Sweeper passes completed, how long the last one took and all of
    /// them together (nanoseconds).
    pub sweeper_passes: u64,
    pub sweeper_last_pass_ns: u64,
    pub sweeper_passes_ns: u64,
    /// Host flows (its NAT's, its sockets') moved off a kernel flow's SNAT
    /// port, at the last sweep.
    pub host_flows_moved: u64,
}

/// Reads the counter maps.
pub struct CounterMaps {
    pub interfaces: PerCpuHashMap<MapData, u32, IfaceCounters>,
    pub rules: PerCpuArray<MapData, RuleCounters>,
    /// `forwarder_common::reasons`'s slots.
    pub reasons: PerCpuArray<MapData, u64>,
    /// Second descriptors of `rules` and `reasons`, for batch reads.
    rules_fd: OwnedFd,
    reasons_fd: OwnedFd,
    /// Possible CPUs: the per-CPU values of each entry.
    cpus: usize,
}

/// A second descriptor of a per-CPU array.
fn second_fd(map: &aya::maps::Map) -> anyhow::Result<OwnedFd> {
    let aya::maps::Map::PerCpuArray(data) = map else {
        anyhow::bail!("not a per-CPU array: {map:?}");
    };
    Ok(data.fd().as_fd().try_clone_to_owned()?)
}

impl CounterMaps {
    pub fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<CounterMaps> {
        let rules = take_map(ebpf, "RULE_COUNTERS")?;
        let reasons = take_map(ebpf, REASON_COUNTERS_MAP)?;
        Ok(CounterMaps {
            interfaces: PerCpuHashMap::try_from(take_map(ebpf, "IFACE_COUNTERS")?)?,
            rules_fd: second_fd(&rules)?,
            reasons_fd: second_fd(&reasons)?,
            rules: PerCpuArray::try_from(rules)?,
            reasons: PerCpuArray::try_from(reasons)?,
            cpus: aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?,
        })
    }

    /// The counters and reasons of every id in `ids`, summed over CPUs:
    /// runs of consecutive ids are read with one batch call per chunk.
    fn totals(&self, ids: &mut Vec<u32>) -> anyhow::Result<HashMap<u32, RuleTotals>> {
        ids.sort_unstable();
        ids.dedup();
        let mut out = HashMap::with_capacity(ids.len());
        let per_rule = REASONS_PER_RULE as usize;
        for (first, count) in map_batch::runs(ids, map_batch::CHUNK) {
            let counters = map_batch::read_per_cpu::<RuleCounters>(
                self.rules_fd.as_fd(),
                first,
                count,
                self.cpus,
            )?;
            let reasons = map_batch::read_per_cpu::<u64>(
                self.reasons_fd.as_fd(),
                first * REASONS_PER_RULE,
                count * REASONS_PER_RULE,
                self.cpus,
            )?;
            for i in 0..count as usize {
                let mut sum = RuleTotals::default();
                for c in &counters[i * self.cpus..(i + 1) * self.cpus] {
                    sum.counters.add(c);
                }
                for (slot, at) in sum.reasons.0.iter_mut().enumerate() {
                    let from = (i * per_rule + slot) * self.cpus;
                    *at = reasons[from..from + self.cpus].iter().sum();
                }
                out.insert(first + i as u32, sum);
            }
        }
        Ok(out)
    }

    /// One rule id's counters and reasons, summed over CPUs.
    pub fn rule(&self, rule_id: u32) -> anyhow::Result<RuleTotals> {
        let mut sum = RuleTotals::default();
        for c in self.rules.get(&rule_id, 0)?.iter() {
            sum.counters.add(c);
        }
        sum.reasons = self.reasons(rule_id)?;
        Ok(sum)
    }

    /// One row of reasons (a rule id's, or `NO_RULE`'s), summed over CPUs.
    fn reasons(&self, rule_id: u32) -> anyhow::Result<ReasonCounts> {
        let mut sum = ReasonCounts::default();
        for (at, slot) in sum.0.iter_mut().zip(ReasonCounts::slots(rule_id)) {
            *at = self.reasons.get(&slot, 0)?.iter().sum();
        }
        Ok(sum)
    }

    /// Zeroes what the rule ids `ids` counted, before they are handed out:
    /// one batch update per run of consecutive ids and map.
    pub fn zero_all(&mut self, ids: &[u32]) -> anyhow::Result<()> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        for (first, count) in map_batch::runs(&ids, map_batch::CHUNK) {
            map_batch::zero_per_cpu(
                self.rules_fd.as_fd(),
                first,
                count,
                size_of::<RuleCounters>(),
                self.cpus,
            )?;
            map_batch::zero_per_cpu(
                self.reasons_fd.as_fd(),
                first * REASONS_PER_RULE,
                count * REASONS_PER_RULE,
                size_of::<u64>(),
                self.cpus,
            )?;
        }
        Ok(())
    }

    /// `earlier(id)`: the rule's earlier ids still in the table, and what
    /// earlier ids handed out again had counted.
    pub fn read(
        &self,
        interfaces: &[Interface],
        listeners: &[Listener],
        earlier: &dyn Fn(u32) -> (Vec<u32>, RuleTotals),
        gauges: &Gauges,
    ) -> anyhow::Result<KernelCounters> {
        let mut out = KernelCounters {
            conntrack_entries: gauges.conntrack_entries.load(Ordering::Relaxed),
            relay_flow_entries: gauges.relay_flow_entries.load(Ordering::Relaxed),
            expired_flows: gauges.expired_flows.load(Ordering::Relaxed),
            conntrack_capacity: gauges.conntrack_capacity.load(Ordering::Relaxed),
            snat_ports: gauges.snat_ports.load(Ordering::Relaxed),
            snat_ports_in_use: gauges.snat_busiest.load(Ordering::Relaxed),
            snat_ports_in_use_per_backend: gauges
                .snat_use
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            xdp_passes_without_rule: xdp_passes(&self.reasons(NO_RULE)?),
            sweeper_passes: gauges.passes.load(Ordering::Acquire),
            sweeper_last_pass_ns: gauges.last_pass_ns.load(Ordering::Relaxed),
            sweeper_passes_ns: gauges.passes_ns.load(Ordering::Relaxed),
            host_flows_moved: gauges.host_flows_moved.load(Ordering::Relaxed),
            ..KernelCounters::default()
        };
        let rows: Vec<(Vec<u32>, RuleTotals)> = listeners
            .iter()
            .map(|l| {
                let (mut ids, sum) = earlier(l.rule_id);
                ids.push(l.rule_id);
                (ids, sum)
            })
            .collect();
        let mut ids: Vec<u32> = rows
            .iter()
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect();
        let totals = self.totals(&mut ids)?;
        for (l, (ids, mut sum)) in listeners.iter().zip(rows) {
            for id in ids {
                sum.add(&totals[&id]);
            }
            out.rules.push(KernelRuleCounters::new(l, &sum));
        }
        for interface in interfaces {
            let mut sum = IfaceCounters::default();
            match self.interfaces.get(&interface.ifindex, 0) {
                Ok(per_cpu) => {
                    for c in per_cpu.iter() {
                        sum.add(c);
                    }
                }
                // No packet yet on this interface.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
            out.interfaces.push(InterfaceCounters::new(interface, &sum));
        }
        Ok(out)
    }
}

pub fn take_map(ebpf: &mut aya::Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow::anyhow!("the eBPF object has no map `{name}`"))
}
