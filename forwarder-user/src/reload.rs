//! What a reload changes: the difference between the running rule table and
//! a newly loaded one, with rule ids made stable across the two. Pure: the
//! daemon applies the [`Plan`] to the relay and the kernel path.
//!
//! A rule is known across reloads by the socket it listens on (protocol,
//! bind address and port). Unchanged rules keep their rule id, so their
//! kernel flows, counters and timeouts go on as they were. A changed rule
//! gets a fresh id: its new entries are written beside the old ones and the
//! rule key is switched in one map update, so no packet sees half a rule,
//! and the old id stays with its flows until they end. Ids still held by
//! flows of removed or changed rules are never handed out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;

use forwarder_common::{MAX_BACKENDS_PER_RULE, RULE_IDS};
use serde::Serialize;

use crate::config::{format_bytes, format_duration};
use crate::rules::{Compiled, KernelSettings, Listener, Protocol};

/// What identifies a rule across reloads: the socket it listens on, and
/// for a range how many ports (a range of other ports is another rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenKey {
    pub protocol: Protocol,
    pub bind: SocketAddr,
    /// 1 for a single port.
    pub count: u16,
}

impl ListenKey {
    pub fn of(listener: &Listener) -> ListenKey {
        ListenKey {
            protocol: listener.protocol,
            bind: listener.bind,
            count: listener.ports.count,
        }
    }
}

impl std::fmt::Display for ListenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.protocol, self.bind)?;
        if self.count > 1 {
            write!(f, "-{}", self.bind.port().saturating_add(self.count - 1))?;
        }
        Ok(())
    }
}

/// How the rule set moves from the running table to the loaded one.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The loaded table with stable rule ids, and, for the settings that
    /// cannot change in place, the running values.
    pub next: Compiled,
    /// Rules of `next` that are new.
    pub added: Vec<Listener>,
    /// `(running, next)` for rules on the same socket with new contents.
    pub changed: Vec<(Listener, Listener)>,
    /// Running rules that are gone from `next`.
    pub removed: Vec<Listener>,
    /// How many rules stay exactly as they were.
    pub unchanged: usize,
    /// Settings that changed but apply only to a new process.
    pub needs_restart: Vec<String>,
}

/// The answer `forwarder reload` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: usize,
    pub needs_restart: Vec<String>,
}

fn describe(l: &Listener) -> String {
    format!("{} ({})", l.alias, ListenKey::of(l))
}

impl Plan {
    pub fn summary(&self) -> Summary {
        Summary {
            added: self.added.iter().map(describe).collect(),
            changed: self.changed.iter().map(|(_, new)| describe(new)).collect(),
            removed: self.removed.iter().map(describe).collect(),
            unchanged: self.unchanged,
            needs_restart: self.needs_restart.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Everything of a listener but its id.
fn same_rule(a: &Listener, b: &Listener) -> bool {
    Listener {
        rule_id: 0,
        ..a.clone()
    } == Listener {
        rule_id: 0,
        ..b.clone()
    }
}

/// Plans the move from `running` to `loaded`. `held(id)` says whether a
/// flow of a rule no longer running still holds `id`.
pub fn plan(
    running: &Compiled,
    loaded: Compiled,
    held: &dyn Fn(u32) -> bool,
) -> Result<Plan, String> {
    let loaded = keep_picked_ports(running, loaded);
    let old: HashMap<ListenKey, &Listener> = running
        .listeners
        .iter()
        .map(|l| (ListenKey::of(l), l))
        .collect();
    let mut taken: HashSet<u32> = HashSet::new();
    let mut ids: BTreeMap<u32, u32> = BTreeMap::new();
    let mut added = Vec::new();
    let mut changed = Vec::new();
    let mut unchanged = 0;
    // Unchanged rules first: they keep their ids.
    for l in &loaded.listeners {
        if let Some(o) = old.get(&ListenKey::of(l))
            && same_rule(o, l)
        {
            ids.insert(l.rule_id, o.rule_id);
            taken.insert(o.rule_id);
            unchanged += 1;
        }
    }
    // An id is free when no running rule has it and no flow holds it.
    let running_ids: HashSet<u32> = running.listeners.iter().map(|l| l.rule_id).collect();
    let mut free = (0..RULE_IDS).filter(|id| !running_ids.contains(id) && !held(*id));
    for l in &loaded.listeners {
        if ids.contains_key(&l.rule_id) {
            continue;
        }
        let Some(id) = free.find(|id| !taken.contains(id)) else {
            return Err(format!(
                "no free rule id for `{}`: {} rule ids are in use by running rules and by \
                 flows of removed or changed ones; reload again once those flows have ended",
                l.alias, RULE_IDS
            ));
        };
        taken.insert(id);
        ids.insert(l.rule_id, id);
    }
    let next = renumber(loaded, &ids);
    let new_keys: HashSet<ListenKey> = next.listeners.iter().map(ListenKey::of).collect();
    for l in &next.listeners {
        match old.get(&ListenKey::of(l)) {
            Some(o) if o.rule_id == l.rule_id => {}
            Some(o) => changed.push(((*o).clone(), l.clone())),
            None => added.push(l.clone()),
        }
    }
    let removed = running
        .listeners
        .iter()
        .filter(|l| !new_keys.contains(&ListenKey::of(l)))
        .cloned()
        .collect();
    let (next, needs_restart) = keep_fixed_settings(running, next);
    Ok(Plan {
        next,
        added,
        changed,
        removed,
        unchanged,
        needs_restart,
    })
}

/// A rule whose listen port was picked at start keeps the port it got, so
/// that reloading an unchanged file does not move it.
fn keep_picked_ports(running: &Compiled, mut loaded: Compiled) -> Compiled {
    for l in loaded.listeners.iter_mut().filter(|l| l.listen_picked) {
        let Some(o) = running.listeners.iter().find(|o| {
            o.listen_picked
                && o.alias == l.alias
                && o.protocol == l.protocol
                && o.bind.ip() == l.bind.ip()
        }) else {
            continue;
        };
        let port = o.bind.port();
        l.bind.set_port(port);
        for (key, value) in loaded.kernel.rules.iter_mut() {
            if value.rule_id == l.rule_id {
                key.port = port.to_be();
            }
        }
    }
    loaded
}

/// Settings that only a new process can change keep their running values;
/// each difference is named.
fn keep_fixed_settings(running: &Compiled, mut next: Compiled) -> (Compiled, Vec<String>) {
    let mut needs = Vec::new();
    if next.interfaces != running.interfaces {
        needs.push(format!(
            "interfaces: {:?} -> {:?}",
            running.interfaces, next.interfaces
        ));
        next.interfaces = running.interfaces.clone();
    }
    let (old, new) = (&running.kernel_settings, &next.kernel_settings);
    if old.conntrack_size != new.conntrack_size {
        needs.push(format!(
            "kernel.conntrack_size: {} -> {} (`forwarder upgrade` carries the flows over)",
            old.conntrack_size, new.conntrack_size
        ));
    }
    if old.snat_ports != new.snat_ports {
        needs.push(format!(
            "kernel.snat_ports: {}-{} -> {}-{}",
            old.snat_ports.0, old.snat_ports.1, new.snat_ports.0, new.snat_ports.1
        ));
    }
    // The SNAT addresses apply to new flows at once (flows keep theirs).
    next.kernel_settings = KernelSettings {
        snat_addresses: new.snat_addresses.clone(),
        ..old.clone()
    };
    if running.relay.max_udp_sessions != next.relay.max_udp_sessions {
        needs.push(format!(
            "relay.max_udp_sessions: {} -> {} (`forwarder upgrade` carries the flows over)",
            running.relay.max_udp_sessions, next.relay.max_udp_sessions
        ));
        next.relay.max_udp_sessions = running.relay.max_udp_sessions;
    }
    // Every listener and flow took these at start.
    if running.relay.first_byte_timeout != next.relay.first_byte_timeout {
        needs.push(format!(
            "relay.first_byte_timeout: {} -> {}",
            format_duration(running.relay.first_byte_timeout),
            format_duration(next.relay.first_byte_timeout)
        ));
        next.relay.first_byte_timeout = running.relay.first_byte_timeout;
    }
    if running.relay.pipe_size != next.relay.pipe_size {
        needs.push(format!(
            "relay.pipe_size: {} -> {}",
            format_bytes(running.relay.pipe_size),
            format_bytes(next.relay.pipe_size)
        ));
        next.relay.pipe_size = running.relay.pipe_size;
    }
    (next, needs)
}

/// `compiled` with every rule id `from` replaced by `ids[from]`.
fn renumber(mut compiled: Compiled, ids: &BTreeMap<u32, u32>) -> Compiled {
    let map = |id: u32| ids.get(&id).copied().unwrap_or(id);
    for l in &mut compiled.listeners {
        l.rule_id = map(l.rule_id);
    }
    for (_, value) in &mut compiled.kernel.rules {
        value.rule_id = map(value.rule_id);
    }
    for e in &mut compiled.kernel.ranges {
        e.value.rule.rule_id = map(e.value.rule.rule_id);
    }
    for (index, _) in &mut compiled.kernel.backends {
        let (rule, n) = (
            *index / MAX_BACKENDS_PER_RULE,
            *index % MAX_BACKENDS_PER_RULE,
        );
        *index = map(rule) * MAX_BACKENDS_PER_RULE + n;
    }
    for (_, key, _) in &mut compiled.kernel.acl {
        key.rule_id_be = map(u32::from_be(key.rule_id_be)).to_be();
    }
    compiled
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::collections::BTreeSet;

    fn load(text: &str) -> Compiled {
        config::load_str(text, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn none_held(_: u32) -> bool {
        false
    }

    const BASE: &str = "
routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 1001:80}
  b: {scheme: udp, host: 10.0.0.2, port: 1002:80}
  c: {scheme: tcp, host: 10.0.0.3, port: 1003:80}
";

    #[test]
    fn the_same_file_changes_nothing() {
        let running = load(BASE);
        let plan = plan(&running, load(BASE), &none_held).unwrap();
        assert!(plan.is_empty());
        assert_eq!(plan.unchanged, 3);
        assert_eq!(plan.next, running);
    }

    #[test]
    fn added_removed_and_changed_rules_are_told_apart() {
        let running = load(BASE);
        let next = "
routes:
  new: {scheme: udp, host: 10.0.0.9, port: 1009:90}
  c: {scheme: tcp, host: 10.0.0.33, port: 1003:80}
  a: {scheme: tcp, host: 10.0.0.1, port: 1001:80}
";
        let plan = plan(&running, load(next), &none_held).unwrap();
        let s = plan.summary();
        assert_eq!(s.added, ["new (udp [::]:1009)"]);
        assert_eq!(s.changed, ["c (tcp [::]:1003)"]);
        assert_eq!(s.removed, ["b (udp [::]:1002)"]);
        assert_eq!(s.unchanged, 1);
        let id = |alias: &str| {
            plan.next
                .listeners
                .iter()
                .find(|l| l.alias == alias)
                .unwrap()
                .rule_id
        };
        // `a` keeps 0; `b` (1) and `c` (2) still have flows; fresh ids are 3 and 4.
        assert_eq!(id("a"), 0);
        let mut fresh = [id("new"), id("c")];
        fresh.sort();
        assert_eq!(fresh, [3, 4]);
        // The kernel table follows the ids: keys, values and backend slots.
        for (key, value) in &plan.next.kernel.rules {
            let l = plan
                .next
                .listeners
                .iter()
                .find(|l| l.rule_id == value.rule_id)
                .unwrap();
            assert_eq!(u16::from_be(key.port), l.bind.port());
        }
        let mut slots: Vec<u32> = plan.next.kernel.backends.iter().map(|(i, _)| *i).collect();
        slots.sort();
        assert_eq!(
            slots,
            [0, 3 * MAX_BACKENDS_PER_RULE, 4 * MAX_BACKENDS_PER_RULE]
        );
    }

    #[test]
    fn a_changed_acl_changes_the_rule_and_its_entries_follow_the_new_id() {
        let running = load(BASE);
        let next = "
acl: {deny: [192.0.2.0/24]}
routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 1001:80, acl: {allow: [10.0.0.0/8]}}
  b: {scheme: udp, host: 10.0.0.2, port: 1002:80}
  c: {scheme: tcp, host: 10.0.0.3, port: 1003:80}
";
        let plan = plan(&running, load(next), &none_held).unwrap();
        // The global acl changes every rule.
        assert_eq!(plan.summary().changed.len(), 3);
        let a = plan.next.listeners.iter().find(|l| l.alias == "a").unwrap();
        assert_eq!(a.rule_id, 3);
        let ids: HashSet<u32> = plan
            .next
            .kernel
            .acl
            .iter()
            .map(|(_, key, _)| u32::from_be(key.rule_id_be))
            .collect();
        let live: HashSet<u32> = plan.next.listeners.iter().map(|l| l.rule_id).collect();
        assert_eq!(ids, live, "every entry under its rule's new id");
        let of_a = plan
            .next
            .kernel
            .acl
            .iter()
            .filter(|(_, key, _)| u32::from_be(key.rule_id_be) == a.rule_id)
            .count();
        assert_eq!(of_a, 2, "its own entry and the global one");
    }

    #[test]
    fn ids_held_by_flows_are_not_handed_out() {
        let running = load("routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1001:80}\n");
        let next = "routes:\n  a: {scheme: tcp, host: 10.0.0.2, port: 1001:80}\n";
        let plan = plan(&running, load(next), &|id| id == 1 || id == 2).unwrap();
        assert_eq!(plan.next.listeners[0].rule_id, 3);
        let all_held = plan_err(&running, next);
        assert!(all_held.contains("no free rule id for `a`"), "{all_held}");
    }

    fn plan_err(running: &Compiled, next: &str) -> String {
        super::plan(running, load(next), &|_| true).unwrap_err()
    }

    #[test]
    fn settings_a_process_fixes_at_start_are_named_and_kept() {
        let running = load(BASE);
        let next = format!(
            "{BASE}kernel: {{conntrack_size: 1024, snat_ports: 30000-30999}}\n\
             relay: {{max_udp_sessions: 10, drain_timeout: 3s, first_byte_timeout: 5s, pipe_size: 64k}}\n"
        );
        let plan = plan(&running, load(&next), &none_held).unwrap();
        assert!(plan.is_empty());
        assert_eq!(
            plan.needs_restart,
            [
                "kernel.conntrack_size: 262144 -> 1024 (`forwarder upgrade` carries the flows over)",
                "kernel.snat_ports: 40000-59999 -> 30000-30999",
                "relay.max_udp_sessions: 65536 -> 10 (`forwarder upgrade` carries the flows over)",
                "relay.first_byte_timeout: 30s -> 5s",
                "relay.pipe_size: 256k -> 64k",
            ]
        );
        assert_eq!(plan.next.kernel_settings, running.kernel_settings);

        // The SNAT addresses apply to new flows: no restart.
        let next = format!("{BASE}kernel: {{snat_addresses: 10.9.0.8/30}}\n");
        let pooled = super::plan(&running, load(&next), &none_held).unwrap();
        assert!(
            pooled.needs_restart.is_empty(),
            "{:?}",
            pooled.needs_restart
        );
        assert_eq!(pooled.next.kernel_settings.snat_addresses.len(), 4);
        assert_eq!(pooled.next.kernel_settings.snat_ports, (40000, 59999));
        assert_eq!(plan.next.relay.max_udp_sessions, 65536);
        assert_eq!(plan.next.relay.first_byte_timeout.as_secs(), 30);
        assert_eq!(plan.next.relay.pipe_size, 256 << 10);
        // What applies in place does.
        assert_eq!(plan.next.relay.drain_timeout.as_secs(), 3);
    }

    #[test]
    fn a_picked_listen_port_stays_across_reloads() {
        let text = "routes:\n  p: {scheme: udp, host: 10.0.0.1, port: 80}\n";
        let running = load(text);
        let port = running.listeners[0].bind.port();
        let mut loaded = load(text);
        // Another pick at load would give another port.
        loaded.listeners[0]
            .bind
            .set_port(port.wrapping_add(1).max(1));
        loaded.kernel.rules[0].0.port = port.wrapping_add(1).max(1).to_be();
        let plan = plan(&running, loaded, &none_held).unwrap();
        assert!(plan.is_empty(), "{:?}", plan.summary());
        assert_eq!(plan.next.listeners[0].bind.port(), port);
        assert_eq!(u16::from_be(plan.next.kernel.rules[0].0.port), port);
    }

    #[test]
    fn a_range_of_other_ports_is_a_removed_rule_and_a_new_one() {
        let file = |media: &str, many: &str| {
            format!(
                "kernel: {{snat_ports: 10000-19999}}
routes:
  media: {{scheme: udp, host: 10.0.0.1, port: {media}}}
  many: {{scheme: tcp, host: 10.0.0.2, port: {many}}}
  same: {{scheme: tcp, host: 10.0.0.3, port: 9000-9099:9000-9099}}
"
            )
        };
        let running = load(&file("20000-20999:30000-30999", "5000-5099:7000"));
        // media: one port more; many: another target form, same ports.
        let loaded = load(&file("20000-21000:30000-31000", "5000-5099:7000-7099"));
        let plan = plan(&running, loaded, &none_held).unwrap();
        let s = plan.summary();
        assert_eq!(s.added, ["media (udp [::]:20000-21000)"]);
        assert_eq!(s.removed, ["media (udp [::]:20000-20999)"]);
        assert_eq!(s.changed, ["many (tcp [::]:5000-5099)"]);
        assert_eq!(s.unchanged, 1);
        // The trie entries follow the ids: `same` keeps 2, the others are fresh.
        let ids_of = |port: u16| -> BTreeSet<u32> {
            plan.next
                .kernel
                .ranges
                .iter()
                .filter(|e| e.value.first_port == port)
                .map(|e| e.value.rule.rule_id)
                .collect()
        };
        assert_eq!(ids_of(9000), BTreeSet::from([2]));
        let fresh: BTreeSet<u32> = ids_of(20000).union(&ids_of(5000)).copied().collect();
        assert_eq!(fresh, BTreeSet::from([3, 4]));
        for l in &plan.next.listeners {
            assert!(
                plan.next
                    .kernel
                    .ranges
                    .iter()
                    .any(|e| e.value.rule.rule_id == l.rule_id
                        && e.value.first_port == l.bind.port()),
                "{l:?}"
            );
        }
    }
}
