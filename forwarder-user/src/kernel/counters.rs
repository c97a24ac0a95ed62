//! The programs' per-CPU counters, summed for `forwarder status`.

use std::sync::atomic::Ordering;

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use forwarder_common::{IfaceCounters, RuleCounters};
use serde::Serialize;

use super::interfaces::Interface;
use super::sweeper::Gauges;
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
    /// New flows left to the relay because a table was full.
    pub fallback_full: u64,
    /// New flows left to the relay for another reason (fragments, IP
    /// options, no route, no usable backend).
    pub fallback_other: u64,
    /// Packets of kernel flows dropped (no route any more, too big without
    /// DF, TTL or MTU where no ICMP error could be sent).
    pub dropped: u64,
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

impl KernelRuleCounters {
    fn new(listener: &Listener, sum: &RuleCounters) -> KernelRuleCounters {
        let RuleCounters {
            packets_fwd,
            bytes_fwd,
            packets_rev,
            bytes_rev,
            flows,
            xdp_packets,
            fallback_full,
            fallback_other,
            dropped,
            icmp_translated,
            icmp_sent,
            acl_denied,
            unanswered_taken_over,
        } = *sum;
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
    /// SNAT ports in use toward the busiest backend at the last sweep.
    pub snat_ports_in_use: u64,
}

/// Reads the counter maps.
pub struct CounterMaps {
    pub interfaces: PerCpuHashMap<MapData, u32, IfaceCounters>,
    pub rules: PerCpuArray<MapData, RuleCounters>,
}

impl CounterMaps {
    pub fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<CounterMaps> {
        Ok(CounterMaps {
            interfaces: PerCpuHashMap::try_from(take_map(ebpf, "IFACE_COUNTERS")?)?,
            rules: PerCpuArray::try_from(take_map(ebpf, "RULE_COUNTERS")?)?,
        })
    }

    /// One rule id's counters, summed over CPUs.
    pub fn rule(&self, rule_id: u32) -> anyhow::Result<RuleCounters> {
        let mut sum = RuleCounters::default();
        for c in self.rules.get(&rule_id, 0)?.iter() {
            sum.add(c);
        }
        Ok(sum)
    }

    /// `earlier(id)`: the rule's earlier ids still in the table, and what
    /// earlier ids handed out again had counted.
    pub fn read(
        &self,
        interfaces: &[Interface],
        listeners: &[Listener],
        earlier: &dyn Fn(u32) -> (Vec<u32>, RuleCounters),
        gauges: &Gauges,
    ) -> anyhow::Result<KernelCounters> {
        let mut out = KernelCounters {
            conntrack_entries: gauges.conntrack_entries.load(Ordering::Relaxed),
            relay_flow_entries: gauges.relay_flow_entries.load(Ordering::Relaxed),
            expired_flows: gauges.expired_flows.load(Ordering::Relaxed),
            conntrack_capacity: gauges.conntrack_capacity.load(Ordering::Relaxed),
            snat_ports: gauges.snat_ports.load(Ordering::Relaxed),
            snat_ports_in_use: gauges.snat_busiest.load(Ordering::Relaxed),
            ..KernelCounters::default()
        };
        for l in listeners {
            let (ids, mut sum) = earlier(l.rule_id);
            for id in ids.into_iter().chain([l.rule_id]) {
                sum.add(&self.rule(id)?);
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
