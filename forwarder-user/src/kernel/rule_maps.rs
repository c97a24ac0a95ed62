//! The rule maps while the kernel path runs: written whole at start, and
//! changed rule by rule at a reload so that no packet sees half a rule.
//!
//! A rule new to the kernel (added, or changed and so given a fresh id) has
//! its backends, flags and zeroed counters written under its id first; then
//! its key is pointed at it in one map update. Keys of removed rules go
//! first, so that the map never holds more than the larger of the tables. Conntrack entries carry the rewrite they started with, so live
//! flows of changed and removed rules go on untouched.

use std::collections::{HashMap, HashSet};

use aya::Ebpf;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use forwarder_common::{
    Backend, MAX_BACKENDS_PER_RULE, RuleCounters, RuleKey, RuleValue, Settings,
};

use super::counters::take_map;
use super::tables::Tables;

pub struct RuleMaps {
    rules: BpfHashMap<MapData, RuleKey, RuleValue>,
    backends: Array<MapData, Backend>,
    settings: Array<MapData, Settings>,
    /// By rule id, for XDP (replies match no rule key).
    flags: Array<MapData, u32>,
}

impl RuleMaps {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<RuleMaps> {
        Ok(RuleMaps {
            rules: BpfHashMap::try_from(take_map(ebpf, "RULES")?)?,
            backends: Array::try_from(take_map(ebpf, "BACKENDS")?)?,
            settings: Array::try_from(take_map(ebpf, "SETTINGS")?)?,
            flags: Array::try_from(take_map(ebpf, "RULE_FLAGS")?)?,
        })
    }

    /// Writes the whole table at start. Maps adopted from a dead daemon
    /// may hold rules this table lacks: those keys go.
    pub fn write(&mut self, tables: &Tables) -> anyhow::Result<()> {
        let wanted: HashSet<&RuleKey> = tables.rules.iter().map(|(k, _)| k).collect();
        let stale: Vec<RuleKey> = self
            .rules
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in &stale {
            self.rules.remove(key)?;
        }
        let by_id = ById::of(tables);
        for (_, value) in &tables.rules {
            self.write_entries(&by_id, value.rule_id)?;
        }
        self.settings.set(0, tables.settings, 0)?;
        for (key, value) in &tables.rules {
            self.rules.insert(key, value, 0)?;
        }
        Ok(())
    }

    /// One rule's backends and flags, before any key points at it.
    fn write_entries(&mut self, tables: &ById<'_>, rule_id: u32) -> anyhow::Result<()> {
        for (index, backend) in tables.backends.get(&rule_id).into_iter().flatten() {
            self.backends.set(*index, *backend, 0)?;
        }
        if let Some(flags) = tables.flags.get(&rule_id) {
            self.flags.set(rule_id, flags, 0)?;
        }
        Ok(())
    }

    /// A health change of rule `rule_id` (already in `tables`): its
    /// backends' flags first, then each of its keys with the new total
    /// weight in one map update. A packet between the two picks only among
    /// backends flagged healthy either way (the kernel skips the others).
    pub fn write_health(&mut self, tables: &Tables, rule_id: u32) -> anyhow::Result<()> {
        for (index, backend) in &tables.backends {
            if index / MAX_BACKENDS_PER_RULE == rule_id {
                self.backends.set(*index, backend, 0)?;
            }
        }
        for (key, value) in &tables.rules {
            if value.rule_id == rule_id {
                self.rules.insert(key, value, 0)?;
            }
        }
        Ok(())
    }

    /// Moves the maps from `running` to `next`. `fresh` are the rule ids
    /// new to the kernel; their counters are zeroed in `counters` first.
    pub fn apply(
        &mut self,
        running: &Tables,
        next: &Tables,
        fresh: &HashSet<u32>,
        counters: &mut PerCpuArray<MapData, RuleCounters>,
    ) -> anyhow::Result<()> {
        let by_id = ById::of(next);
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        for &id in fresh {
            let zero = PerCpuValues::try_from(vec![RuleCounters::default(); cpus])?;
            counters.set(id, zero, 0)?;
            self.write_entries(&by_id, id)?;
        }
        self.settings.set(0, next.settings, 0)?;
        // Removed keys first: the map never holds more than the larger table.
        let kept: HashSet<&RuleKey> = next.rules.iter().map(|(k, _)| k).collect();
        for (key, _) in &running.rules {
            if !kept.contains(key) {
                self.rules.remove(key)?;
            }
        }
        // Routes may have changed for kept rules too: a changed value is
        // one map update either way.
        for (key, value) in &next.rules {
            if fresh.contains(&value.rule_id) || self.rules.get(key, 0).ok() != Some(*value) {
                if !fresh.contains(&value.rule_id) {
                    self.write_entries(&by_id, value.rule_id)?;
                }
                self.rules.insert(key, value, 0)?;
            }
        }
        Ok(())
    }
}

/// A table's entries by rule id: thousands of rules are written in one go.
struct ById<'a> {
    backends: HashMap<u32, Vec<(u32, &'a Backend)>>,
    flags: HashMap<u32, u32>,
}

impl<'a> ById<'a> {
    fn of(tables: &'a Tables) -> ById<'a> {
        let mut backends: HashMap<u32, Vec<(u32, &Backend)>> = HashMap::new();
        for (index, backend) in &tables.backends {
            backends
                .entry(index / MAX_BACKENDS_PER_RULE)
                .or_default()
                .push((*index, backend));
        }
        let flags = tables
            .rules
            .iter()
            .map(|(_, v)| (v.rule_id, v.flags))
            .collect();
        ById { backends, flags }
    }
}
