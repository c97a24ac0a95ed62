//! Socket steering for port ranges, userspace side: loads the `sk_lookup`
//! program into this network namespace with its own `RANGES` trie and
//! `STEER_SOCKETS` map, which the relay fills with one socket per range
//! rule (see `forwarder_common::steer`).
//!
//! It is loaded apart from the kernel path, so that `--relay-only` has it
//! too; of the object's other maps it creates one-entry stand-ins. It is
//! not pinned: the sockets it steers to die with the daemon, so a link
//! that outlived it would steer to nothing. Dropping it detaches the
//! program.
//!
//! An upgrade in place hands the link, the sockmap and the trie over as
//! descriptors in the record (no pin): the link stays attached through the
//! exec, steering to the handed-over sockets, so a range port never finds
//! the hook empty; a crash at any point leaves nothing behind, as the
//! kernel drops all three with the last descriptor. The new image loads
//! its own program against the same maps (pinned for the few
//! milliseconds of that load, as aya adopts maps only by pin) and puts it
//! on the link with `BPF_LINK_UPDATE`.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{IterableMap, Map, MapData, SockMap};
use aya::programs::SkLookup;
use aya::{Ebpf, EbpfLoader};
use forwarder_common::ranges::{MAX_RANGE_ENTRIES, RANGES_MAP, RangeKey, RangeValue};
use forwarder_common::steer::{STEER_PROGRAM, STEER_SOCKETS_MAP, STEER_SOCKETS_SIZE};
use serde::{Deserialize, Serialize};

use super::EBPF_OBJECT;
use super::load::{check_object, check_privileges};
use super::{links, pins};
use crate::rules::RangeEntry;

const BPF_MAP_TYPE_PERF_EVENT_ARRAY: u32 = 4;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

type Entry = (u32, RangeKey);

/// The steering's descriptors in an upgrade's handover record.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SteerRecord {
    pub link: RawFd,
    pub sockets: RawFd,
    pub ranges: RawFd,
}

impl SteerRecord {
    pub fn fds(&self) -> [RawFd; 3] {
        [self.link, self.sockets, self.ranges]
    }
}

/// The loaded, attached program and its maps.
pub struct Steering {
    sockets: Mutex<SockMap<MapData>>,
    ranges: Mutex<Ranges>,
    program_id: Option<u32>,
    /// The maps' descriptors, for an upgrade's record.
    map_fds: (RawFd, RawFd),
    /// Attaches the program to this namespace: closed (by every holder),
    /// it detaches.
    link: OwnedFd,
    /// Holds the program.
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
        remove_leftover_pins();
        let object = parse()?;
        let mut ebpf = loader(&object, None)
            .load(EBPF_OBJECT)
            .context("loading the socket-lookup program's maps")?;
        let program = load_program(&mut ebpf)?;
        let netns = std::fs::File::open("/proc/thread-self/ns/net")
            .context("opening this network namespace")?;
        let link = links::create_sk_lookup_link(program.as_fd(), netns.as_fd())
            .context("attaching the socket-lookup program to this network namespace")?;
        Steering::with(ebpf, link, HashSet::new())
    }

    /// Takes over the steering an upgrade handed over: the link stays
    /// attached throughout, and this image's program replaces the old
    /// one on it, reading the same maps.
    pub fn adopt(record: SteerRecord) -> Result<Steering> {
        let own = |fd| crate::relay::gate::own_fd(fd).context("the steering handed over");
        let (link, sockets, ranges) =
            (own(record.link)?, own(record.sockets)?, own(record.ranges)?);
        check_object()?;
        check_privileges()?;
        let sockets = MapData::from_fd(sockets).context("the handed-over STEER_SOCKETS")?;
        let ranges = MapData::from_fd(ranges).context("the handed-over RANGES")?;
        fits(&sockets, STEER_SOCKETS_MAP, 4, STEER_SOCKETS_SIZE)?;
        fits(
            &ranges,
            RANGES_MAP,
            (4 + size_of::<RangeKey>()) as u32,
            MAX_RANGE_ENTRIES,
        )?;
        let object = parse()?;
        let dir = transient_dir()?;
        let loaded = (|| {
            pins::ensure_bpffs().context("mounting bpffs")?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            sockets
                .pin(dir.join(STEER_SOCKETS_MAP))
                .with_context(|| format!("pinning STEER_SOCKETS in {}", dir.display()))?;
            ranges
                .pin(dir.join(RANGES_MAP))
                .with_context(|| format!("pinning RANGES in {}", dir.display()))?;
            loader(&object, Some(&dir))
                .load(EBPF_OBJECT)
                .context("loading the socket-lookup program on the handed-over maps")
        })();
        // Unpinned at once: the descriptors hold the maps.
        remove_transient(&dir);
        let mut ebpf = loaded?;
        let program = load_program(&mut ebpf)?;
        links::update_link(link.as_fd(), program.as_fd())
            .context("putting this image's socket-lookup program on the handed-over link")?;
        let trie: LpmTrie<MapData, RangeKey, RangeValue> = LpmTrie::try_from(Map::LpmTrie(ranges))?;
        // What the trie holds now, so that the next write removes what is stale.
        let written = trie
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        drop(trie);
        Steering::with(ebpf, link, written)
    }

    fn with(mut ebpf: Ebpf, link: OwnedFd, written: HashSet<Entry>) -> Result<Steering> {
        let program: &SkLookup = ebpf
            .program(STEER_PROGRAM)
            .context("the eBPF object has no socket-lookup program")?
            .try_into()?;
        let program_id = program.info().ok().map(|i| i.id());
        let sockets = SockMap::try_from(
            ebpf.take_map(STEER_SOCKETS_MAP)
                .context("no STEER_SOCKETS map")?,
        )?;
        let trie: LpmTrie<MapData, RangeKey, RangeValue> =
            LpmTrie::try_from(ebpf.take_map(RANGES_MAP).context("no RANGES map")?)?;
        let map_fds = (
            sockets.fd().as_fd().as_raw_fd(),
            IterableMap::map(&trie).fd().as_fd().as_raw_fd(),
        );
        Ok(Steering {
            sockets: Mutex::new(sockets),
            ranges: Mutex::new(Ranges { trie, written }),
            program_id,
            map_fds,
            link,
            _ebpf: ebpf,
        })
    }

    /// The descriptors an upgrade hands over; they stay this image's
    /// until the exec.
    pub fn record(&self) -> SteerRecord {
        SteerRecord {
            link: self.link.as_raw_fd(),
            sockets: self.map_fds.0,
            ranges: self.map_fds.1,
        }
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

/// The object with its maps: only the program's own get their size; the
/// kernel path's are created too (one object), as small as they can be.
/// With `pinned`, the program's two maps are the ones pinned there.
fn loader<'a>(object: &'a aya_obj::Object, pinned: Option<&Path>) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
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
    if let Some(dir) = pinned {
        loader.map_pin_path(RANGES_MAP, dir.join(RANGES_MAP));
        loader.map_pin_path(STEER_SOCKETS_MAP, dir.join(STEER_SOCKETS_MAP));
    }
    loader
}

fn parse() -> Result<aya_obj::Object> {
    aya_obj::Object::parse(EBPF_OBJECT).context("parsing the eBPF object")
}

/// Loads the program into the kernel (not attached); its descriptor.
fn load_program(ebpf: &mut Ebpf) -> Result<std::os::fd::BorrowedFd<'_>> {
    let program: &mut SkLookup = ebpf
        .program_mut(STEER_PROGRAM)
        .context("the eBPF object has no socket-lookup program")?
        .try_into()?;
    program
        .load()
        .context("loading the socket-lookup program")?;
    Ok(program.fd()?.as_fd())
}

/// A handed-over map this image's program can read as its own.
fn fits(map: &MapData, name: &str, key_size: u32, max_entries: u32) -> Result<()> {
    let info = map.info()?;
    if info.key_size() != key_size || info.max_entries() != max_entries {
        bail!(
            "the handed-over {name} has {}-byte keys and {} entries, this image's {key_size} and \
             {max_entries}",
            info.key_size(),
            info.max_entries()
        );
    }
    Ok(())
}

/// Where an upgrade pins the handed-over maps while it loads the program.
fn transient_dir() -> Result<PathBuf> {
    // No dot: bpffs refuses names with one.
    let dir = pins::dir(crate::state::netns_cookie()?);
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push("-steer-upgrade");
    Ok(dir.with_file_name(name))
}

/// Removes the maps an upgrade that crashed while loading the program
/// left pinned (there is never a link); says what it removed.
pub fn remove_leftover_pins() -> Option<String> {
    let dir = transient_dir().ok()?;
    dir.exists().then(|| {
        remove_transient(&dir);
        format!("removed the steering maps pinned at {}", dir.display())
    })
}

/// Removes the transient pins, and their parent once no namespace has a
/// directory there (as a clean stop of the kernel path does).
fn remove_transient(dir: &Path) {
    if std::fs::remove_dir_all(dir).is_ok()
        && let Some(parent) = dir.parent()
    {
        let _ = std::fs::remove_dir(parent);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upgrade_pins_go_beside_the_pin_dir_with_no_dot_in_the_name() {
        let dir = transient_dir().unwrap();
        let pins = pins::dir(crate::state::netns_cookie().unwrap());
        assert_eq!(dir.parent(), pins.parent());
        let name = dir.file_name().unwrap().to_str().unwrap();
        // bpffs refuses a name with a dot (EPERM).
        assert!(!name.contains('.'), "{name}");
        let pin_name = pins.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("{pin_name}-steer-upgrade"));
    }
}
