//! The kernel path, userspace side: loading, attaching and feeding the BPF programs.
//!
//! [`KernelPath::start`] loads the embedded object, fills the rule tables
//! (with the source address toward each backend), reserves the SNAT ports,
//! attaches the TC program (and XDP, where a rule asks for it), and runs
//! the log reader and the conntrack sweeper; [`KernelPath::stop`] (or
//! dropping it) undoes all of it.
//! Start and stop must run in the same network namespace (the daemon's).

mod attach;
mod counters;
mod interfaces;
mod links;
mod load;
mod log;
mod netlink;
mod qdisc;
mod relay_flows;
mod snat;
mod sweeper;
mod sysctl;
mod tables;
mod xdp;
mod xdp_egress;
mod xdp_features;

use std::sync::Arc;

use aya::maps::{DevMapHash, HashMap, MapData};
use forwarder_common::{RULE_F_RELAY, RULE_F_XDP};
use tokio::task::JoinHandle;

pub use attach::{TC_PROGRAM, TcAttach, XDP_PROGRAM};
pub use counters::{InterfaceCounters, KernelCounters, KernelRuleCounters};
pub use interfaces::{Interface, NoSuchInterface};
pub use load::NEED_ROOT;
pub use relay_flows::RelayFlows;
pub use sysctl::RESERVED_PORTS;

use crate::rules::{Compiled, FlowObserver, Listener};
use attach::Attached;
use counters::CounterMaps;
use sweeper::{Gauges, RuleTimeouts, Sweeper};
use sysctl::ReservedPorts;

/// The eBPF object built by `cargo xtask build`, embedded at compile time.
/// Empty when this binary was built without it (relay only).
#[cfg(forwarder_ebpf)]
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder.bpf.o"));
#[cfg(not(forwarder_ebpf))]
pub static EBPF_OBJECT: &[u8] = &[];

/// XDP is attached only when a rule the kernel path takes asks for it:
/// on veth an XDP program makes every frame take the slower NAPI path, and
/// an interface has room for one XDP program, which may be someone else's.
fn wants_xdp(tables: &tables::Tables) -> bool {
    tables
        .rules
        .iter()
        .any(|(_, v)| v.flags & RULE_F_XDP != 0 && v.flags & RULE_F_RELAY == 0)
}

/// Choices beyond the rule table.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// The rule file, named in errors about its `interfaces:`.
    pub config_file: Option<String>,
    /// How TC is attached; `Auto` unless testing the netlink way.
    pub tc_attach: TcAttach,
    /// The relay's flows when the relay started first (it was given this
    /// as its observer); `None` makes a new, empty table.
    pub relay_flows: Option<Arc<RelayFlows>>,
}

/// The running kernel path. Dropping it detaches everything (best effort);
/// [`KernelPath::stop`] does the same and reports failures.
pub struct KernelPath {
    counters: CounterMaps,
    interfaces: Vec<Interface>,
    listeners: Vec<Listener>,
    gauges: Arc<Gauges>,
    relay_flows: Arc<RelayFlows>,
    tasks: Vec<JoinHandle<()>>,
    /// Dropped after the tasks are aborted, then the ports are released.
    attached: Option<Attached>,
    reserved: Option<ReservedPorts>,
}

impl KernelPath {
    /// Loads EBPF_OBJECT, fills RULES/BACKENDS/SETTINGS from
    /// `compiled.kernel` (+ snat addresses), sizes the conntrack map from
    /// `compiled.kernel_settings`, reserves the SNAT ports, attaches TC
    /// ingress (and XDP if a rule wants it) to the interfaces, and spawns
    /// the logger and the sweeper on the current tokio runtime. On any
    /// error nothing stays attached or changed.
    pub async fn start(compiled: &Compiled) -> anyhow::Result<KernelPath> {
        Self::start_with(compiled, &StartOptions::default()).await
    }

    /// [`KernelPath::start`] with [`StartOptions`].
    pub async fn start_with(
        compiled: &Compiled,
        options: &StartOptions,
    ) -> anyhow::Result<KernelPath> {
        load::check_object()?;
        load::check_privileges()?;
        let interfaces = interfaces::resolve(
            compiled.interfaces.as_deref(),
            options.config_file.as_deref(),
        )?;
        if interfaces.is_empty() {
            anyhow::bail!(
                "no interface to attach the kernel path to: none is up apart from loopback \
                 (name them in `interfaces:`)"
            );
        }
        let settings = compiled.kernel_settings;
        if settings.snat_ports.0 == 0 || settings.snat_ports.1 < settings.snat_ports.0 {
            anyhow::bail!(
                "kernel.snat_ports {}-{} is not a range of ports (1-65535, low to high)",
                settings.snat_ports.0,
                settings.snat_ports.1
            );
        }
        let tables = tables::prepare(compiled);
        let with_xdp = wants_xdp(&tables);
        let conntrack_size = settings.conntrack_size.max(2);
        let sizes = load::Sizes {
            conntrack: conntrack_size,
            relay_flows: relay_flows_size(compiled),
        };
        let mut ebpf = load::load(sizes, log::ebpf_log_level())?;
        let relay_flows = options.relay_flows.clone().unwrap_or_default();
        let gauges = Arc::new(Gauges::default());
        let mut tasks = Vec::new();
        let result = (|| {
            tasks.push(log::spawn(&mut ebpf)?);
            tables::write(&mut ebpf, &tables)?;
            xdp::write_rule_flags(&mut ebpf, &tables.rules)?;
            let egress = if with_xdp {
                let map = DevMapHash::try_from(counters::take_map(&mut ebpf, "XDP_EGRESS")?)?;
                Some(xdp_egress::Egress::start(map, &interfaces)?)
            } else {
                None
            };
            let counters = CounterMaps::take(&mut ebpf)?;
            let conntrack = HashMap::try_from(counters::take_map(&mut ebpf, "CONNTRACK")?)?;
            let relay_map = counters::take_map(&mut ebpf, "RELAY_FLOWS")?;
            let sweeper_view = HashMap::try_from(duplicate(&relay_map)?)?;
            let relay_map = HashMap::try_from(relay_map)?;
            Attached::load_programs(&mut ebpf)?;
            // Ports first: no flow may get a port a local socket holds.
            let reserved = ReservedPorts::reserve(settings.snat_ports)?;
            relay_flows.attach(relay_map)?;
            let attached = Attached::attach(ebpf, &interfaces, options.tc_attach, with_xdp)?;
            let sweeper = Sweeper {
                conntrack,
                relay_flows: sweeper_view,
                timeouts: rule_timeouts(&compiled.listeners),
                limit: conntrack_size as usize * 2,
                gauges: gauges.clone(),
            };
            anyhow::Ok((counters, reserved, attached, sweeper, egress))
        })();
        let (counters, reserved, attached, sweeper, egress) = match result {
            Ok(parts) => parts,
            Err(e) => {
                relay_flows.detach();
                for task in &tasks {
                    task.abort();
                }
                return Err(e);
            }
        };
        tasks.push(sweeper.spawn());
        tasks.extend(egress.and_then(xdp_egress::Egress::spawn));
        warn_if_not_forwarding(&interfaces);
        let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
        let relay_rules = tables
            .rules
            .iter()
            .filter(|(_, v)| v.flags & RULE_F_RELAY != 0)
            .count();
        tracing::info!(
            "kernel path attached to {}{}: {} rules ({} relay only), SNAT ports {}-{}, conntrack {}",
            names.join(", "),
            if with_xdp { " (TC and XDP)" } else { " (TC)" },
            tables.rules.len(),
            relay_rules,
            settings.snat_ports.0,
            settings.snat_ports.1,
            conntrack_size
        );
        Ok(KernelPath {
            counters,
            interfaces,
            listeners: compiled.listeners.clone(),
            gauges,
            relay_flows,
            tasks,
            attached: Some(attached),
            reserved: Some(reserved),
        })
    }

    /// The observer the relay tells of its flows.
    pub fn observer(&self) -> Arc<dyn FlowObserver> {
        self.relay_flows.clone()
    }

    /// The interfaces the programs are attached to.
    pub fn interfaces(&self) -> &[Interface] {
        &self.interfaces
    }

    /// Per-interface and per-rule counters, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<KernelCounters> {
        self.counters
            .read(&self.interfaces, &self.listeners, &self.gauges)
    }

    /// Detaches everything, unloads the programs and restores
    /// ip_local_reserved_ports.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_tasks();
        self.relay_flows.detach();
        let detached = match self.attached.take() {
            Some(attached) => attached.detach(),
            None => Ok(()),
        };
        let restored = match self.reserved.take() {
            Some(reserved) => reserved.restore(),
            None => Ok(()),
        };
        detached?;
        restored?;
        tracing::info!("kernel path detached");
        Ok(())
    }

    fn stop_tasks(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for KernelPath {
    fn drop(&mut self) {
        self.stop_tasks();
        self.relay_flows.detach();
        // `attached` and then `reserved` undo themselves in their Drop.
        self.attached.take();
        self.reserved.take();
    }
}

/// Room for every flow the relay may carry: its UDP session bound, and at
/// least as many as the kernel's own table (the relay takes its overflow).
/// The map allocates per entry, so the size costs nothing until used.
fn relay_flows_size(compiled: &Compiled) -> u32 {
    const FLOOR: u32 = 65_536;
    const CEILING: u32 = 1 << 24;
    let udp_listeners = compiled
        .listeners
        .iter()
        .filter(|l| l.protocol == crate::rules::Protocol::Udp)
        .count();
    let udp = compiled
        .relay
        .max_udp_sessions
        .saturating_mul(udp_listeners);
    let want = (udp as u64)
        .max(u64::from(compiled.kernel_settings.conntrack_size))
        .max(u64::from(FLOOR));
    want.min(u64::from(CEILING)) as u32
}

/// bpf_fib_lookup refuses to route packets that arrived on an interface
/// without IPv4 forwarding; new flows there would all go to the relay.
fn warn_if_not_forwarding(interfaces: &[Interface]) {
    for i in interfaces {
        let path = format!("/proc/sys/net/ipv4/conf/{}/forwarding", i.name);
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
            tracing::warn!(
                "IPv4 forwarding is off on {} (net.ipv4.conf.{}.forwarding = 0): the kernel \
                 path cannot route flows arriving there, the relay carries them; \
                 set net.ipv4.ip_forward=1 to use the kernel path",
                i.name,
                i.name
            );
        }
    }
}

fn rule_timeouts(listeners: &[Listener]) -> RuleTimeouts {
    let mut by_id = Vec::new();
    for l in listeners {
        let id = l.rule_id as usize;
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some(l.timeouts);
    }
    RuleTimeouts(by_id)
}

/// A second handle on a hash map (its own descriptor).
fn duplicate(map: &aya::maps::Map) -> anyhow::Result<aya::maps::Map> {
    use std::os::fd::AsFd;
    let aya::maps::Map::HashMap(data) = map else {
        anyhow::bail!("not a hash map: {map:?}");
    };
    let fd = data.fd().as_fd().try_clone_to_owned()?;
    Ok(aya::maps::Map::HashMap(MapData::from_fd(fd)?))
}

#[cfg(test)]
mod testns;
#[cfg(test)]
mod testrun;
