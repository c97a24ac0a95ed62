//! The rule maps while the kernel path runs: written whole at start, and
//! changed rule by rule at a reload so that no packet sees half a rule.
//!
//! A rule new to the kernel (added, or changed and so given a fresh id) has
//! its backends, flags, ACL entries and zeroed counters written under its
//! id first; then its key is pointed at it in one map update. Keys of
//! removed rules go first, so that the map never holds more than the larger
//! of the tables. Conntrack entries carry the rewrite they started with, so
//! live flows of changed and removed rules go on untouched.

use std::collections::{HashMap, HashSet};

use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use forwarder_common::ranges::{RANGE_COUNT_MAP, RANGES_MAP, RangeKey, RangeValue};
use forwarder_common::snat::{SNAT_POOL_MAP, SnatPool};
use forwarder_common::{AclKey, Backend, MAX_BACKENDS_PER_RULE, RuleKey, RuleValue, Settings};

use super::counters::{CounterMaps, take_map};
use super::tables::Tables;

pub struct RuleMaps {
    rules: BpfHashMap<MapData, RuleKey, RuleValue>,
    backends: Array<MapData, Backend>,
    settings: Array<MapData, Settings>,
    /// By rule id, for XDP (replies match no rule key).
    flags: Array<MapData, u32>,
    /// (rule, client network) to verdict; not pinned: a new daemon writes
    /// its own whole.
    acl: LpmTrie<MapData, AclKey, u32>,
    /// `kernel.snat_addresses`; rewritten whole at start and reload.
    pool: Array<MapData, SnatPool>,
    /// Blocks of range rules' ports, and how many range rules there are
    /// (0: packets skip the trie).
    ranges: LpmTrie<MapData, RangeKey, RangeValue>,
    range_count: Array<MapData, u32>,
}

/// A `RANGES` key as the map takes it, hashable for the differences.
type TrieKey = (u32, RangeKey);

fn trie_key(k: &TrieKey) -> Key<RangeKey> {
    Key::new(k.0, k.1)
}

impl RuleMaps {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<RuleMaps> {
        Ok(RuleMaps {
            rules: BpfHashMap::try_from(take_map(ebpf, "RULES")?)?,
            backends: Array::try_from(take_map(ebpf, "BACKENDS")?)?,
            settings: Array::try_from(take_map(ebpf, "SETTINGS")?)?,
            flags: Array::try_from(take_map(ebpf, "RULE_FLAGS")?)?,
            acl: LpmTrie::try_from(take_map(ebpf, "ACL")?)?,
            pool: Array::try_from(take_map(ebpf, SNAT_POOL_MAP)?)?,
            ranges: LpmTrie::try_from(take_map(ebpf, RANGES_MAP)?)?,
            range_count: Array::try_from(take_map(ebpf, RANGE_COUNT_MAP)?)?,
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
        // Before any backend flagged for it points new flows at it.
        self.pool.set(0, tables.pool, 0)?;
        let wanted: HashSet<TrieKey> = tables
            .ranges
            .iter()
            .map(|e| (e.prefix_len, e.key))
            .collect();
        let stale: Vec<Key<RangeKey>> = self
            .ranges
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for key in &stale {
            self.ranges.remove(key)?;
        }
        let by_id = ById::of(tables);
        let ids: HashSet<u32> = tables.values().map(|v| v.rule_id).collect();
        for &id in &ids {
            self.write_entries(&by_id, id)?;
        }
        self.write_acl(tables, &ids)?;
        self.settings.set(0, tables.settings, 0)?;
        for (key, value) in &tables.rules {
            self.rules.insert(key, value, 0)?;
        }
        self.range_count.set(0, tables.range_rules(), 0)?;
        for e in &tables.ranges {
            self.ranges
                .insert(&Key::new(e.prefix_len, e.key), e.value, 0)?;
        }
        Ok(())
    }

    /// One rule's backends and flags, before any key points at it (its
    /// ACL is `write_acl`'s).
    fn write_entries(&mut self, tables: &ById<'_>, rule_id: u32) -> anyhow::Result<()> {
        for (index, backend) in tables.backends.get(&rule_id).into_iter().flatten() {
            self.backends.set(*index, *backend, 0)?;
        }
        if let Some(flags) = tables.flags.get(&rule_id) {
            self.flags.set(rule_id, flags, 0)?;
        }
        Ok(())
    }

    /// Writes the ACL entries of the rules `ids` of `tables`, first
    /// removing what the trie holds for them (an id handed out again may
    /// hold an earlier rule's). One pass over the trie.
    fn write_acl(&mut self, tables: &Tables, ids: &HashSet<u32>) -> anyhow::Result<()> {
        let ids_be: HashSet<u32> = ids.iter().map(|id| id.to_be()).collect();
        let stale: Vec<Key<AclKey>> = self
            .acl
            .keys()
            .filter_map(Result::ok)
            .filter(|k| ids_be.contains(&k.data().rule_id_be))
            .collect();
        for key in &stale {
            self.acl.remove(key)?;
        }
        for (prefix_len, data, verdict) in &tables.acl {
            if ids_be.contains(&data.rule_id_be) {
                self.acl.insert(&Key::new(*prefix_len, *data), verdict, 0)?;
            }
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
        for e in &tables.ranges {
            if e.value.rule.rule_id == rule_id {
                self.ranges
                    .insert(&Key::new(e.prefix_len, e.key), e.value, 0)?;
            }
        }
        Ok(())
    }

    /// Removes the ACL entries of rules `tables` no longer has: after the
    /// keys moved, nothing looks them up.
    fn drop_stale_acl(&mut self, tables: &Tables) -> anyhow::Result<()> {
        let live: HashSet<u32> = tables.values().map(|v| v.rule_id.to_be()).collect();
        let stale: Vec<Key<AclKey>> = self
            .acl
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&k.data().rule_id_be))
            .collect();
        for key in &stale {
            self.acl.remove(key)?;
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
        counters: &mut CounterMaps,
    ) -> anyhow::Result<()> {
        // The new pool first: new flows take it at once (a packet reading
        // it mid-write skips a torn slot), and flows keep the address they
        // have.
        self.pool.set(0, next.pool, 0)?;
        let by_id = ById::of(next);
        counters.zero_all(&fresh.iter().copied().collect::<Vec<_>>())?;
        for &id in fresh {
            self.write_entries(&by_id, id)?;
        }
        self.write_acl(next, fresh)?;
        self.settings.set(0, next.settings, 0)?;
        // Removed keys first: the map never holds more than the larger table.
        let kept: HashSet<&RuleKey> = next.rules.iter().map(|(k, _)| k).collect();
        for (key, _) in &running.rules {
            if !kept.contains(key) {
                self.rules.remove(key)?;
            }
        }
        // Routes may have changed for kept rules too: a changed value is
        // one map update either way, and backends changed in place (a
        // route's address, the pool's flag) are rewritten too, whether the
        // rule is keyed by port or by range. `written`: ids done already.
        let old_backends: HashMap<u32, &Backend> =
            running.backends.iter().map(|(i, b)| (*i, b)).collect();
        let mut written: HashSet<u32> = fresh.clone();
        for id in next
            .backends
            .iter()
            .filter(|(i, b)| old_backends.get(i) != Some(&b))
            .map(|(i, _)| i / MAX_BACKENDS_PER_RULE)
        {
            if written.insert(id) {
                self.write_entries(&by_id, id)?;
            }
        }
        for (key, value) in &next.rules {
            let id = value.rule_id;
            if fresh.contains(&id) || self.rules.get(key, 0).ok() != Some(*value) {
                if written.insert(id) {
                    self.write_entries(&by_id, id)?;
                }
                self.rules.insert(key, value, 0)?;
            }
        }
        self.apply_ranges(running, next, &mut written, &by_id)?;
        self.drop_stale_acl(next)
    }

    /// The `RANGES` part of [`RuleMaps::apply`]. New and changed blocks go
    /// in first, then blocks of no rule go: a port two versions both cover
    /// (a range moved or grown) always finds one of them. `written`: rule
    /// ids whose backends and flags are in place already.
    fn apply_ranges(
        &mut self,
        running: &Tables,
        next: &Tables,
        written: &mut HashSet<u32>,
        by_id: &ById<'_>,
    ) -> anyhow::Result<()> {
        let old: HashMap<TrieKey, RangeValue> = running
            .ranges
            .iter()
            .map(|e| ((e.prefix_len, e.key), e.value))
            .collect();
        let count = next.range_rules();
        if count > 0 {
            self.range_count
                .set(0, count.max(running.range_rules()), 0)?;
        }
        for e in &next.ranges {
            let id = e.value.rule.rule_id;
            if old.get(&(e.prefix_len, e.key)) != Some(&e.value) {
                if written.insert(id) {
                    self.write_entries(by_id, id)?;
                }
                self.ranges
                    .insert(&Key::new(e.prefix_len, e.key), e.value, 0)?;
            }
        }
        let kept: HashSet<TrieKey> = next.ranges.iter().map(|e| (e.prefix_len, e.key)).collect();
        for key in old.keys().filter(|k| !kept.contains(k)) {
            self.ranges.remove(&trie_key(key))?;
        }
        self.range_count.set(0, count, 0)?;
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
        let flags = tables.values().map(|v| (v.rule_id, v.flags)).collect();
        ById { backends, flags }
    }
}
