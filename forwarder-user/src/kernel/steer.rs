//! Socket steering for port ranges, userspace side: loads the `sk_lookup`
//! program into this network namespace with its own `RANGES` trie and
//! `STEER_SOCKETS` map, which the relay fills with one socket per range
//! rule (see `forwarder_common::steer`).
//!
//! It is loaded apart from the kernel path, so that `--relay-only` has it
//! too; of the object's other maps it creates one-entry stand-ins. It is
//! not pinned: the sockets it steers to die with the daemon, so a link
//! that outlived it would steer to nothing (`forwarder cleanup` has
//! nothing of it to remove). Dropping it detaches the program.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use anyhow::{Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, SockMap};
use aya::programs::SkLookup;
use aya::{Ebpf, EbpfLoader};
use forwarder_common::ranges::{
    MAX_RANGE_ENTRIES, RANGE_TARGET_SAME, RANGE_TARGET_SHIFTED, RANGES_MAP, RangeKey, RangeValue,
    prefixes,
};
use forwarder_common::steer::{STEER_PROGRAM, STEER_SOCKETS_MAP};
use forwarder_common::{ADDR_ANY, RuleValue};

use super::EBPF_OBJECT;
use super::load::{check_object, check_privileges};
use crate::config::addr_of;
use crate::rules::{Listener, TargetPorts};

const BPF_MAP_TYPE_PERF_EVENT_ARRAY: u32 = 4;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

type Entry = (u32, RangeKey);

/// The `RANGES` entries of one range rule: its listen range cut into
/// aligned blocks, each naming the rule. Empty for a single-port rule.
pub fn range_entries(l: &Listener) -> Vec<(Entry, RangeValue)> {
    if !l.ports.is_range() {
        return Vec::new();
    }
    let ip = l.bind.ip();
    let addr = if ip.to_canonical().is_unspecified() {
        ADDR_ANY
    } else {
        addr_of(ip)
    };
    let first = l.bind.port();
    let target = match l.ports.target {
        TargetPorts::Shifted => RANGE_TARGET_SHIFTED,
        TargetPorts::Same => RANGE_TARGET_SAME,
    };
    let rule = RuleValue {
        rule_id: l.rule_id,
        ..RuleValue::default()
    };
    prefixes(first, l.ports.last(first))
        .map(|(start, bits)| {
            let key = RangeKey::new(addr, l.protocol.ip_proto(), start);
            (
                (RangeKey::prefix_len(bits), key),
                RangeValue::new(rule, first, target),
            )
        })
        .collect()
}

/// The loaded, attached program and its maps.
pub struct Steering {
    sockets: Mutex<SockMap<MapData>>,
    ranges: Mutex<Ranges>,
    program_id: Option<u32>,
    /// Holds the program and its link: dropped, it detaches.
    _ebpf: Ebpf,
}

struct Ranges {
    trie: LpmTrie<MapData, RangeKey, RangeValue>,
    written: HashSet<Entry>,
}

impl Steering {
    /// Loads the program and attaches it to this thread's network namespace.
    pub fn load() -> Result<Steering> {
        check_object()?;
        check_privileges()?;
        let object = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the eBPF object")?;
        let mut loader = EbpfLoader::new();
        // Only the program's own maps get their size; the kernel path's
        // are created too (one object), as small as they can be.
        for (name, map) in &object.maps {
            let shrink = !name.starts_with('.')
                && name != RANGES_MAP
                && name != STEER_SOCKETS_MAP
                && !matches!(
                    map.map_type(),
                    BPF_MAP_TYPE_PERF_EVENT_ARRAY | BPF_MAP_TYPE_RINGBUF
                );
            if shrink {
                loader.map_max_entries(name, 1);
            }
        }
        loader.map_max_entries(RANGES_MAP, MAX_RANGE_ENTRIES);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the socket-lookup program's maps")?;
        let program: &mut SkLookup = ebpf
            .program_mut(STEER_PROGRAM)
            .context("the eBPF object has no socket-lookup program")?
            .try_into()?;
        program
            .load()
            .context("loading the socket-lookup program")?;
        let netns = std::fs::File::open("/proc/thread-self/ns/net")
            .context("opening this network namespace")?;
        program
            .attach(netns)
            .context("attaching the socket-lookup program to this network namespace")?;
        let program_id = program.info().ok().map(|i| i.id());
        let sockets = SockMap::try_from(
            ebpf.take_map(STEER_SOCKETS_MAP)
                .context("no STEER_SOCKETS map")?,
        )?;
        let trie = LpmTrie::try_from(ebpf.take_map(RANGES_MAP).context("no RANGES map")?)?;
        Ok(Steering {
            sockets: Mutex::new(sockets),
            ranges: Mutex::new(Ranges {
                trie,
                written: HashSet::new(),
            }),
            program_id,
            _ebpf: ebpf,
        })
    }

    /// Steers the rule's ports to `socket` (a listening TCP socket or an
    /// unconnected UDP one).
    pub fn set_socket(&self, rule_id: u32, socket: &impl AsRawFd) -> Result<()> {
        lock(&self.sockets)
            .set(rule_id, socket, 0)
            .with_context(|| format!("steering rule {rule_id} to its socket"))
    }

    /// The rule's ports are steered nowhere (a closed socket leaves the map by itself).
    pub fn clear_socket(&self, rule_id: u32) {
        let _ = lock(&self.sockets).clear_index(&rule_id);
    }

    /// Makes the trie hold exactly the range rules of `listeners`: new and
    /// changed entries first (a changed rule's blocks point at its new id
    /// in one write each), then the stale ones go.
    pub fn set_ranges(&self, listeners: &[Listener]) -> Result<()> {
        let mut ranges = lock(&self.ranges);
        let mut next = HashSet::new();
        for l in listeners {
            for ((len, key), value) in range_entries(l) {
                ranges
                    .trie
                    .insert(&Key::new(len, key), value, 0)
                    .with_context(|| {
                        format!("{}: writing its port range for the relay", l.alias)
                    })?;
                next.insert((len, key));
            }
        }
        let stale: Vec<Entry> = ranges.written.difference(&next).copied().collect();
        for (len, key) in stale {
            let _ = ranges.trie.remove(&Key::new(len, key));
        }
        ranges.written = next;
        Ok(())
    }

    /// The program's id, as `bpftool prog` shows it.
    pub fn program_id(&self) -> Option<u32> {
        self.program_id
    }

    /// Detaches the program at once, whoever else holds its link.
    pub fn stop(self) {
        if let Some(id) = self.program_id {
            let _ = super::links::detach_links_of(&[id]);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{ListenPorts, PathMode, Protocol, Timeouts};

    fn rule(bind: &str, count: u16, target: TargetPorts) -> Listener {
        Listener {
            rule_id: 7,
            alias: "media".into(),
            protocol: Protocol::Udp,
            bind: bind.parse().unwrap(),
            listen_picked: false,
            ports: ListenPorts { count, target },
            backends: Vec::new(),
            timeouts: Timeouts::default(),
            path: PathMode::Auto,
            preserve_client_ip: false,
            proxy: Default::default(),
            health: None,
            acl: None,
            max_connections: None,
        }
    }

    #[test]
    fn a_single_port_rule_has_no_range_entry() {
        assert!(range_entries(&rule("0.0.0.0:5000", 1, TargetPorts::Shifted)).is_empty());
    }

    #[test]
    fn an_aligned_range_is_one_wildcard_entry_naming_the_rule() {
        let entries = range_entries(&rule("[::]:49152", 16384, TargetPorts::Shifted));
        assert_eq!(entries.len(), 1);
        let ((len, key), value) = entries[0];
        assert_eq!(len, RangeKey::prefix_len(14));
        assert_eq!(key, RangeKey::new(ADDR_ANY, 17, 49152));
        assert_eq!(value.rule.rule_id, 7);
        assert_eq!(value.first_port, 49152);
        assert_eq!(value.target, RANGE_TARGET_SHIFTED);
    }

    #[test]
    fn a_bound_range_keys_its_address_and_covers_exactly_its_ports() {
        let l = rule("10.0.0.1:5000", 100, TargetPorts::Same);
        let entries = range_entries(&l);
        let ip = "10.0.0.1".parse().unwrap();
        let mut covered = 0u32;
        for ((len, key), value) in &entries {
            assert_eq!(key.addr, addr_of(ip));
            assert_eq!(value.target, RANGE_TARGET_SAME);
            covered += 1 << (RangeKey::LOOKUP_PREFIX_LEN - len);
        }
        assert_eq!(covered, 100);
        assert_eq!(entries[0].0.1.port, 5000u16.to_be_bytes());
    }
}
