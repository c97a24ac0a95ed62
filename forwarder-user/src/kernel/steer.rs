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
use forwarder_common::ranges::{MAX_RANGE_ENTRIES, RANGES_MAP, RangeKey, RangeValue};
use forwarder_common::steer::{STEER_PROGRAM, STEER_SOCKETS_MAP};

use super::EBPF_OBJECT;
use super::load::{check_object, check_privileges};
use crate::rules::RangeEntry;

const BPF_MAP_TYPE_PERF_EVENT_ARRAY: u32 = 4;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

type Entry = (u32, RangeKey);

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

    /// Makes the trie hold exactly `entries` (the compiled table's, one
    /// definition with the kernel path's): new and changed entries first
    /// (a changed rule's blocks point at its new id in one write each),
    /// then the stale ones go.
    pub fn set_ranges(&self, entries: &[RangeEntry]) -> Result<()> {
        let mut ranges = lock(&self.ranges);
        let mut next = HashSet::new();
        for e in entries {
            ranges
                .trie
                .insert(&Key::new(e.prefix_len, e.key), e.value, 0)
                .with_context(|| {
                    format!(
                        "writing rule {}'s port range for the relay",
                        e.value.rule.rule_id
                    )
                })?;
            next.insert((e.prefix_len, e.key));
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
