//! The programs' per-CPU counters, summed for `forwarder status`.

use aya::maps::{MapData, PerCpuHashMap};
use forwarder_common::IfaceCounters;
use serde::Serialize;

use super::interfaces::Interface;

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

/// Counters of the kernel path, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelCounters {
    pub interfaces: Vec<InterfaceCounters>,
}

/// Reads the counter maps.
pub struct CounterMaps {
    pub interfaces: PerCpuHashMap<MapData, u32, IfaceCounters>,
}

impl CounterMaps {
    pub fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<CounterMaps> {
        Ok(CounterMaps {
            interfaces: PerCpuHashMap::try_from(take_map(ebpf, "IFACE_COUNTERS")?)?,
        })
    }

    pub fn read(&self, interfaces: &[Interface]) -> anyhow::Result<KernelCounters> {
        let mut out = KernelCounters::default();
        for interface in interfaces {
            let mut sum = InterfaceCounters {
                name: interface.name.clone(),
                ifindex: interface.ifindex,
                ..Default::default()
            };
            match self.interfaces.get(&interface.ifindex, 0) {
                Ok(per_cpu) => {
                    for c in per_cpu.iter() {
                        sum.xdp_packets += c.xdp_packets;
                        sum.xdp_bytes += c.xdp_bytes;
                        sum.tc_packets += c.tc_packets;
                        sum.tc_bytes += c.tc_bytes;
                    }
                }
                // No packet yet on this interface.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
            out.interfaces.push(sum);
        }
        Ok(out)
    }
}

pub fn take_map(ebpf: &mut aya::Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow::anyhow!("the eBPF object has no map `{name}`"))
}
