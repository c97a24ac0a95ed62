//! The kernel path, userspace side: loading, attaching and feeding the BPF programs.
//!
//! [`KernelPath::start`] loads the embedded object, fills the rule tables
//! (with the source address toward each backend), reserves the SNAT ports,
//! attaches the TC program (and XDP, where a rule asks for it), and runs
//! the log reader and the conntrack sweeper; [`KernelPath::stop`] (or
//! dropping it) undoes all of it.
//! Start and stop must run in the same network namespace (the daemon's).

mod attach;
mod batch;
mod counters;
mod interfaces;
mod links;
mod load;
mod log;
mod map_batch;
mod netlink;
mod pins;
mod qdisc;
mod relay_flows;
mod resize;
mod rule_maps;
mod snat;
mod steer;
pub mod sweeper;
mod sysctl;
mod tables;

mod xdp_egress;
mod xdp_features;

use std::collections::{HashMap as StdHashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use aya::maps::{DevMapHash, HashMap, MapData};
use forwarder_common::{CtKey, CtValue, RULE_F_RELAY, RULE_F_XDP, RuleCounters};
use tokio::task::JoinHandle;

pub use attach::{TC_PROGRAM, TcAttach, XDP_PROGRAM};
pub use counters::{InterfaceCounters, KernelCounters, KernelRuleCounters};
pub use interfaces::{Interface, NoSuchInterface};
pub use load::NEED_ROOT;
pub use relay_flows::RelayFlows;
pub use steer::{SteerRecord, Steering};
pub use sweeper::SnatUse;
pub use sysctl::{PortSet, RESERVED_PORTS};

use crate::reload::Plan;
use crate::rules::{Compiled, FlowObserver, Listener};
use attach::Attached;
use counters::{CounterMaps, RuleTotals};
use rule_maps::RuleMaps;
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
        .values()
        .any(|v| v.flags & RULE_F_XDP != 0 && v.flags & RULE_F_RELAY == 0)
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
    /// Where the reserved ports are recorded; `None`: this network
    /// namespace's directory under [`crate::state::STATE_ROOT`].
    pub state_dir: Option<std::path::PathBuf>,
    /// Pin the maps and links in bpffs, so that the kernel path outlives
    /// a crash and the next daemon adopts it (the daemon does; tests that
    /// share the host's mount namespace leave bpffs alone).
    pub pin: bool,
    /// This process is the exec'd successor of the daemon whose pid is
    /// recorded (an upgrade in place): its pins are adopted, not refused.
    pub successor: bool,
}

/// The running kernel path. Dropping it detaches everything (best effort);
/// [`KernelPath::stop`] does the same and reports failures.
pub struct KernelPath {
    rule_set: Mutex<RuleSet>,
    interfaces: Vec<Interface>,
    with_xdp: bool,
    gauges: Arc<Gauges>,
    timeouts: Arc<RwLock<RuleTimeouts>>,
    relay_flows: Arc<RelayFlows>,
    tasks: Vec<JoinHandle<()>>,
    /// Dropped after the tasks are aborted, then the ports are released.
    attached: Option<Attached>,
    reserved: Option<ReservedPorts>,
    /// Where the pid and the reserved ports are recorded.
    state_dir: Option<std::path::PathBuf>,
    /// Where the maps and links are pinned, if they are.
    pin_dir: Option<std::path::PathBuf>,
}

/// The state file naming the daemon that runs the kernel path here.
const PID: &str = "pid";

/// What `forwarder cleanup` removes of a daemon that died in this network
/// namespace, one line each; refuses while that daemon lives.
/// Whether a kernel path is pinned in this network namespace (a previous
/// daemon's, dead or handing over): its programs forward until one adopts it.
pub fn pinned_here() -> bool {
    crate::state::netns_cookie().is_ok_and(|cookie| pins::dir(cookie).exists())
}

pub fn cleanup_leftovers(state_dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    if let Some(pid) = crate::state::live_pid(state_dir) {
        anyhow::bail!(
            "the forwarder with pid {pid} is still running here (see {}); stop it first",
            state_dir.join(PID).display()
        );
    }
    let mut done = Vec::new();
    let ports = sysctl::release_recorded(state_dir)?;
    if !ports.is_empty() {
        done.push(format!("removed ports {ports} from {RESERVED_PORTS}"));
    }
    done.extend(steer::remove_leftover_pins());
    let pinned = pins::dir(crate::state::netns_cookie()?);
    done.extend(pins::remove_all(&pinned)?);
    crate::state::remove(state_dir, PID)?;
    Ok(done)
}

/// The rules the programs run with, which reloads change.
struct RuleSet {
    maps: RuleMaps,
    counters: CounterMaps,
    tables: tables::Tables,
    listeners: Vec<Listener>,
    /// Ids of rules no longer running whose flows may live on, with the
    /// sweeper's pass count when they were retired.
    retired: StdHashMap<u32, u64>,
    /// The earlier ids of a running rule that a reload changed: their
    /// counters add to its own.
    predecessors: StdHashMap<u32, Vec<u32>>,
    /// What earlier ids counted before they were handed out again.
    folded: StdHashMap<u32, RuleTotals>,
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
        let settings = &compiled.kernel_settings;
        if settings.snat_ports.0 == 0 || settings.snat_ports.1 < settings.snat_ports.0 {
            anyhow::bail!(
                "kernel.snat_ports {}-{} is not a range of ports (1-65535, low to high)",
                settings.snat_ports.0,
                settings.snat_ports.1
            );
        }
        let tables = tables::prepare(compiled, &interfaces)?;
        let with_xdp = wants_xdp(&tables);
        let conntrack_size = settings.conntrack_size.max(2);
        let sizes = load::Sizes {
            conntrack: conntrack_size,
            relay_flows: relay_flows_size(compiled),
        };
        let cookie = crate::state::netns_cookie()?;
        let state_dir = match &options.state_dir {
            Some(dir) => dir.clone(),
            None => crate::state::dir_of(cookie),
        };
        // A live owner of the records and pins (only ever this process:
        // tests start two kernel paths in one namespace) keeps them.
        let owner = crate::state::live_pid(&state_dir)
            .filter(|&pid| !(options.successor && pid == std::process::id() as i32));
        if let Some(pid) = owner
            && pid != std::process::id() as i32
        {
            anyhow::bail!(
                "another forwarder (pid {pid}) runs the kernel path in this network namespace"
            );
        }
        let (pin_dir, resized) = match options.pin && owner.is_none() {
            true => {
                let (dir, resized) = prepare_pins(cookie, sizes)?;
                (Some(dir), resized)
            }
            false => (None, Vec::new()),
        };
        let adopted = !resized.is_empty()
            || pin_dir
                .as_deref()
                .is_some_and(|dir| pins::map_path(dir, "CONNTRACK").exists());
        let mut ebpf = match load::load(sizes, log::ebpf_log_level(), pin_dir.as_deref()) {
            Ok(ebpf) => ebpf,
            Err(e) => {
                resized.into_iter().for_each(resize::Resized::undo);
                forget_fresh_pins(pin_dir.as_deref(), adopted);
                return Err(e);
            }
        };
        let relay_flows = options.relay_flows.clone().unwrap_or_default();
        let gauges = Arc::new(Gauges::default());
        // The map holds two entries per flow (forward and reverse).
        gauges
            .conntrack_capacity
            .store(u64::from(conntrack_size) / 2, Ordering::Relaxed);
        let snat_ports = u64::from(settings.snat_ports.1) - u64::from(settings.snat_ports.0) + 1;
        gauges.snat_ports.store(snat_ports, Ordering::Relaxed);
        let timeouts = Arc::new(RwLock::new(rule_timeouts(&compiled.listeners)));
        let mut tasks = Vec::new();
        let result = (|| {
            tasks.push(log::spawn(&mut ebpf)?);
            // Before the new programs run: they find the flows they carry.
            for table in &resized {
                table.carry()?;
            }
            let mut maps = RuleMaps::take(&mut ebpf)?;
            maps.write(&tables)?;
            if adopted {
                use std::os::fd::AsFd;
                let entries = match ebpf.map("CONNTRACK") {
                    Some(aya::maps::Map::HashMap(data)) => {
                        batch::count::<CtKey, CtValue>(data.fd().as_fd())?
                    }
                    _ => 0,
                };
                tracing::info!(
                    "adopted the kernel path of a previous daemon: its {} flows go on",
                    entries / 2
                );
            }
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
            let record = owner.is_none().then_some(state_dir.as_path());
            let reserved = ReservedPorts::reserve(settings.snat_ports, record)?;
            relay_flows.attach(relay_map)?;
            let attached = Attached::attach(
                ebpf,
                &interfaces,
                options.tc_attach,
                with_xdp,
                pin_dir.clone(),
            )?;
            // Again now that the old programs are out of their links: the
            // flows they opened or moved since the first copy.
            let carried = resized
                .iter()
                .map(resize::Resized::carry)
                .collect::<anyhow::Result<Vec<_>>>()?;
            let sweeper = Sweeper::new(conntrack, sweeper_view, timeouts.clone(), gauges.clone());
            anyhow::Ok((maps, counters, reserved, attached, sweeper, egress, carried))
        })();
        let (maps, counters, reserved, attached, sweeper, egress, carried) = match result {
            Ok(parts) => parts,
            Err(e) => {
                relay_flows.detach();
                for task in &tasks {
                    task.abort();
                }
                resized.into_iter().for_each(resize::Resized::undo);
                forget_fresh_pins(pin_dir.as_deref(), adopted);
                return Err(e);
            }
        };
        for (table, copied) in resized.into_iter().zip(carried) {
            table.finish(copied);
        }
        if let Err(e) = crate::state::write(&state_dir, PID, &format!("{}\n", std::process::id())) {
            // Only `forwarder cleanup`'s guard against a live daemon needs it.
            tracing::warn!("cannot record the pid in {}: {e}", state_dir.display());
        }
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
            "kernel path attached to {}{}: {} rules ({} relay only, {} port ranges), SNAT ports \
             {}-{}, conntrack {} entries (a pass over them all takes up to {:?})",
            names.join(", "),
            if with_xdp { " (TC and XDP)" } else { " (TC)" },
            tables.rule_count(),
            relay_rules,
            tables.range_rules(),
            settings.snat_ports.0,
            settings.snat_ports.1,
            conntrack_size,
            sweeper::pass_time(u64::from(conntrack_size), timeouts_period(&timeouts)),
        );
        Ok(KernelPath {
            rule_set: Mutex::new(RuleSet {
                maps,
                counters,
                tables,
                listeners: compiled.listeners.clone(),
                retired: StdHashMap::new(),
                predecessors: StdHashMap::new(),
                folded: StdHashMap::new(),
            }),
            interfaces,
            with_xdp,
            gauges,
            timeouts,
            relay_flows,
            tasks,
            attached: Some(attached),
            reserved: Some(reserved),
            state_dir: Some(state_dir),
            pin_dir,
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

    /// Per-interface and per-rule counters, summed over CPUs; a rule a
    /// reload changed counts what its earlier versions counted too.
    pub fn counters(&self) -> anyhow::Result<KernelCounters> {
        let set = self.rule_set();
        let earlier = |id: u32| {
            let ids = set.predecessors.get(&id).cloned().unwrap_or_default();
            (ids, set.folded.get(&id).copied().unwrap_or_default())
        };
        let mut counters =
            set.counters
                .read(&self.interfaces, &set.listeners, &earlier, &self.gauges)?;
        let pool = &set.tables.pool;
        counters.snat_addresses = pool.addrs[..pool.count as usize]
            .iter()
            .map(|a| std::net::Ipv4Addr::from(a.to_ne_bytes()).to_string())
            .collect();
        Ok(counters)
    }

    fn rule_set(&self) -> std::sync::MutexGuard<'_, RuleSet> {
        // Each reload step leaves the set whole or is redone by the next reload.
        self.rule_set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a flow of a rule no longer running may still hold `rule_id`:
    /// until a sweeper pass that began after the rule was retired finds
    /// no entry with it.
    pub fn holds(&self, rule_id: u32) -> bool {
        let set = self.rule_set();
        let Some(&retired_at) = set.retired.get(&rule_id) else {
            return false;
        };
        // The pass that ends next may have begun before the retirement.
        if self.gauges.passes.load(Ordering::Acquire) < retired_at + 2 {
            return true;
        }
        self.gauges
            .rule_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&rule_id)
    }

    /// The first half of a reload: the kernel tables of `plan.next` (routes
    /// to the backends looked up), or why this kernel path cannot run them.
    pub fn prepare(&self, plan: &Plan) -> anyhow::Result<tables::Tables> {
        let next = tables::prepare(&plan.next, &self.interfaces)?;
        if wants_xdp(&next) && !self.with_xdp {
            let alias = plan
                .next
                .listeners
                .iter()
                .find(|l| l.path == crate::rules::PathMode::Xdp)
                .map_or_else(String::new, |l| format!(" (`{}`)", l.alias));
            anyhow::bail!(
                "a rule with `path: xdp`{alias} needs the XDP program, which this daemon did not \
                 attach at start (no rule asked for it then); restart the daemon to add it"
            );
        }
        Ok(next)
    }

    /// The second half of a reload: the maps move to `next` (see
    /// `rule_maps`), the sweeper learns the new rules' timeouts, and the
    /// ids of removed and changed rules stay with their flows.
    pub fn apply(&self, plan: &Plan, mut next: tables::Tables) -> anyhow::Result<()> {
        let passes = self.gauges.passes.load(Ordering::Acquire);
        let mut guard = self.rule_set();
        let set = &mut *guard;
        let fresh: HashSet<u32> = plan
            .added
            .iter()
            .chain(plan.changed.iter().map(|(_, new)| new))
            .map(|l| l.rule_id)
            .collect();
        // Unchanged rules keep their backends' health (fresh ones start healthy).
        next.keep_health(&set.tables, |id| !fresh.contains(&id));
        for &id in &fresh {
            set.retired.remove(&id);
            // An earlier id of a running rule, handed out again: keep its counts.
            let heir = set
                .predecessors
                .iter()
                .find(|(_, ids)| ids.contains(&id))
                .map(|(heir, _)| *heir);
            if let Some(heir) = heir {
                let counted = set.counters.rule(id)?;
                set.folded.entry(heir).or_default().add(&counted);
                if let Some(ids) = set.predecessors.get_mut(&heir) {
                    ids.retain(|&i| i != id);
                }
            }
        }
        for (old, new) in &plan.changed {
            let mut ids = set.predecessors.remove(&old.rule_id).unwrap_or_default();
            ids.push(old.rule_id);
            set.predecessors.insert(new.rule_id, ids);
            if let Some(folded) = set.folded.remove(&old.rule_id) {
                set.folded.insert(new.rule_id, folded);
            }
            set.retired.insert(old.rule_id, passes);
        }
        for old in &plan.removed {
            set.retired.insert(old.rule_id, passes);
            set.predecessors.remove(&old.rule_id);
            set.folded.remove(&old.rule_id);
        }
        self.timeouts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set(&plan.next.listeners);
        set.maps
            .apply(&set.tables, &next, &fresh, &mut set.counters)?;
        set.tables = next;
        set.listeners = plan.next.listeners.clone();
        Ok(())
    }

    /// Rule `rule_id`'s backends are healthy or not as `healthy` says (in
    /// order): new flows pick only healthy ones, and none when all are
    /// down (they go to the relay, which refuses them). Ignored for a rule
    /// no longer running (its checks were about to stop).
    pub fn set_backend_health(&self, rule_id: u32, healthy: &[bool]) -> anyhow::Result<()> {
        let mut guard = self.rule_set();
        let set = &mut *guard;
        if !set.listeners.iter().any(|l| l.rule_id == rule_id) {
            return Ok(());
        }
        set.tables.set_health(rule_id, healthy);
        set.maps.write_health(&set.tables, rule_id)
    }

    /// Detaches everything, unloads the programs and removes the SNAT
    /// ports from ip_local_reserved_ports.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_tasks();
        self.relay_flows.detach();
        let detached = match self.attached.take() {
            Some(attached) => attached.detach(),
            None => Ok(()),
        };
        let restored = match self.reserved.take() {
            Some(reserved) => reserved.release(),
            None => Ok(()),
        };
        self.forget_pid();
        let unpinned = self.unpin();
        detached?;
        unpinned?;
        restored?;
        tracing::info!("kernel path detached");
        Ok(())
    }

    /// Removes the pinned maps (the links went with `attached`).
    fn unpin(&mut self) -> anyhow::Result<()> {
        if let Some(dir) = self.pin_dir.take() {
            pins::remove_all(&dir)
                .map_err(|e| anyhow::anyhow!("cannot remove the pins in {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    fn forget_pid(&self) {
        if let Some(dir) = &self.state_dir {
            let _ = crate::state::remove(dir, PID);
        }
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
        if std::thread::panicking() && self.pin_dir.is_some() {
            // A panic ending the daemon is a crash: the pinned programs go
            // on forwarding, and the records stay for the next daemon.
            std::mem::forget(self.attached.take());
            std::mem::forget(self.reserved.take());
            return;
        }
        // `attached` and then `reserved` undo themselves in their Drop.
        self.attached.take();
        self.reserved.take();
        self.forget_pid();
        if let Err(e) = self.unpin() {
            tracing::warn!("{e:#}");
        }
    }
}

/// Makes the pin directory ready for `sizes`. Flow tables pinned at
/// another size are set aside for their flows to be carried over (see
/// `resize`); pins a dead daemon left with another layout cannot be
/// adopted: they are removed, and with them its flows, with a warning.
fn prepare_pins(
    cookie: u64,
    sizes: load::Sizes,
) -> anyhow::Result<(std::path::PathBuf, Vec<resize::Resized>)> {
    pins::ensure_bpffs().map_err(|e| anyhow::anyhow!("cannot mount bpffs at /sys/fs/bpf: {e}"))?;
    let dir = pins::dir(cookie);
    use forwarder_common::reasons::{REASON_COUNTERS_MAP, REASON_SLOTS};
    use forwarder_common::{Backend, MAX_BACKENDS_PER_RULE, RULE_IDS, RelayFlow};
    use std::mem::size_of;
    // A start that stopped while it carried flows over left the old table
    // aside: it still holds them, the new one at most a moment's worth.
    for name in resize::RESIZABLE {
        let aside = pins::set_aside_path(&dir, name);
        if aside.exists() {
            let path = pins::map_path(&dir, name);
            let _ = std::fs::remove_file(&path);
            std::fs::rename(&aside, &path).map_err(|e| {
                anyhow::anyhow!(
                    "cannot put {} back as {}: {e}",
                    aside.display(),
                    path.display()
                )
            })?;
        }
    }
    let want = [
        ("CONNTRACK", sizes.conntrack, size_of::<CtValue>()),
        ("RELAY_FLOWS", sizes.relay_flows, size_of::<RelayFlow>()),
        (
            "BACKENDS",
            RULE_IDS * MAX_BACKENDS_PER_RULE,
            size_of::<Backend>(),
        ),
        ("RULE_COUNTERS", RULE_IDS, size_of::<RuleCounters>()),
        (REASON_COUNTERS_MAP, REASON_SLOTS, size_of::<u64>()),
        ("RULE_FLAGS", RULE_IDS, size_of::<u32>()),
        (
            forwarder_common::ranges::RANGES_MAP,
            forwarder_common::ranges::MAX_RANGE_ENTRIES,
            size_of::<forwarder_common::ranges::RangeValue>(),
        ),
    ];
    let mut resizing = Vec::new();
    for (name, entries, value_size) in want {
        let path = pins::map_path(&dir, name);
        if !path.exists() {
            continue;
        }
        let found = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map(|i| (i.max_entries(), i.value_size() as usize));
        match found {
            Ok(fits) if fits == (entries, value_size) => {}
            Ok((was, size)) if size == value_size && resize::RESIZABLE.contains(&name) => {
                resizing.push((name, was, entries));
            }
            found => {
                tracing::warn!(
                    "the previous daemon's {name} ({found:?}) does not fit this one ({entries} \
                     entries of {value_size} bytes): its flows are dropped, not adopted"
                );
                pins::remove_all(&dir)?;
                resizing.clear();
                break;
            }
        }
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let mut resized = Vec::new();
    for (name, was, now) in resizing {
        match resize::Resized::set_aside(&dir, name, was, now) {
            Ok(r) => resized.push(r),
            Err(e) => {
                resized.into_iter().for_each(resize::Resized::undo);
                return Err(e);
            }
        }
    }
    Ok((dir, resized))
}

/// After a failed start: pins this start made go, a dead daemon's stay.
fn forget_fresh_pins(pin_dir: Option<&std::path::Path>, adopted: bool) {
    if let Some(dir) = pin_dir
        && !adopted
        && let Err(e) = pins::remove_all(dir)
    {
        tracing::warn!("cannot remove the pins in {}: {e}", dir.display());
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

fn timeouts_period(timeouts: &RwLock<RuleTimeouts>) -> std::time::Duration {
    timeouts.read().unwrap_or_else(|e| e.into_inner()).period()
}

fn rule_timeouts(listeners: &[Listener]) -> RuleTimeouts {
    let mut timeouts = RuleTimeouts::default();
    timeouts.set(listeners);
    timeouts
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
