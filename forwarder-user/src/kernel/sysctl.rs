//! Reserving the SNAT port range from local sockets while the kernel path
//! runs (`net.ipv4.ip_local_reserved_ports`, which also covers IPv6).
//!
//! The sysctl is changed by adding exactly the part of our range that was
//! not reserved yet, and later removing exactly that part, never by
//! restoring a snapshot: ranges others add while we run stay. What we added
//! is recorded in the namespace's state directory before the sysctl is
//! written, so that a daemon that was killed is undone by its successor or
//! by `forwarder cleanup`.
//!
//! The file stays open from start to release, so the value goes back to
//! the network namespace it was taken from whichever thread releases it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};

use crate::state;

pub const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// The state file that lists the ranges a daemon added.
const RECORD: &str = "reserved-ports";

/// A set of ports as the sysctl writes it (`1000-1001,2000`): sorted,
/// disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    /// Parses the sysctl's (or the record's) comma-separated list.
    pub fn parse(text: &str) -> anyhow::Result<PortSet> {
        let mut set = PortSet::default();
        for part in text
            .trim()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let port = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .map_err(|_| anyhow!("`{part}` is not a port or a range of ports"))
            };
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo > hi {
                anyhow::bail!("`{part}` runs from high to low");
            }
            set = set.union(&PortSet(vec![(lo, hi)]));
        }
        Ok(set)
    }

    pub fn range(lo: u16, hi: u16) -> PortSet {
        PortSet(vec![(lo.min(hi), lo.max(hi))])
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many ports the set holds.
    pub fn len(&self) -> usize {
        self.0
            .iter()
            .map(|&(lo, hi)| usize::from(hi) - usize::from(lo) + 1)
            .sum()
    }

    pub fn union(&self, other: &PortSet) -> PortSet {
        let mut all: Vec<(u16, u16)> = self.0.iter().chain(&other.0).copied().collect();
        all.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(all.len());
        for (lo, hi) in all {
            match merged.last_mut() {
                // Overlapping or adjacent: one range.
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        PortSet(merged)
    }

    /// The ports of `self` that are not in `other`.
    pub fn minus(&self, other: &PortSet) -> PortSet {
        let mut out = Vec::new();
        for &(lo, hi) in &self.0 {
            let mut from = u32::from(lo);
            let to = u32::from(hi);
            for &(olo, ohi) in &other.0 {
                let (olo, ohi) = (u32::from(olo), u32::from(ohi));
                if ohi < from || olo > to {
                    continue;
                }
                if olo > from {
                    out.push((from as u16, (olo - 1) as u16));
                }
                from = ohi + 1;
                if from > to {
                    break;
                }
            }
            if from <= to {
                out.push((from as u16, to as u16));
            }
        }
        PortSet(out)
    }
}

impl std::fmt::Display for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, &(lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

/// The reservation; removes exactly what it added on `release` or drop.
pub struct ReservedPorts {
    file: File,
    /// What this daemon (or a killed predecessor) added.
    added: PortSet,
    /// Where `added` is recorded, unless a live daemon owns that record.
    state_dir: Option<PathBuf>,
    released: bool,
}

fn read(file: &File) -> io::Result<String> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = file.read_at(&mut buf, 0)?;
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).trim_end().to_owned())
}

fn current(file: &File) -> anyhow::Result<PortSet> {
    let text = read(file).with_context(|| format!("cannot read {RESERVED_PORTS}"))?;
    PortSet::parse(&text).with_context(|| format!("{RESERVED_PORTS} holds {text:?}"))
}

fn write(file: &File, value: &PortSet) -> anyhow::Result<()> {
    file.write_at(format!("{value}\n").as_bytes(), 0)
        .map_err(|e| {
            anyhow!(
                "cannot write {:?} to {RESERVED_PORTS}: {e}",
                value.to_string()
            )
        })?;
    Ok(())
}

fn open() -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(RESERVED_PORTS)
        .map_err(|e| anyhow!("cannot open {RESERVED_PORTS}: {e}"))
}

/// What a killed daemon recorded in `state_dir` as added by it.
fn recorded(state_dir: &Path) -> anyhow::Result<PortSet> {
    match state::read(state_dir, RECORD)? {
        Some(text) => PortSet::parse(&text)
            .with_context(|| format!("{} holds {text:?}", state_dir.join(RECORD).display())),
        None => Ok(PortSet::default()),
    }
}

impl ReservedPorts {
    /// Adds `range` (inclusive) to the reserved ports of this network
    /// namespace, recording what it added in `state_dir` first. Ranges a
    /// killed predecessor recorded there count as ours. `state_dir: None`
    /// leaves the record to the live daemon that owns it.
    pub fn reserve(range: (u16, u16), state_dir: Option<&Path>) -> anyhow::Result<ReservedPorts> {
        let file = open()?;
        let before = current(&file)?;
        let inherited = match state_dir {
            Some(dir) => recorded(dir)?,
            None => PortSet::default(),
        };
        let ours = PortSet::range(range.0, range.1);
        let added = ours.minus(&before).union(&inherited);
        if let Some(dir) = state_dir {
            state::write(dir, RECORD, &format!("{added}\n")).with_context(|| {
                format!("cannot record the reserved ports in {}", dir.display())
            })?;
        }
        let value = before.union(&ours);
        if let Err(e) = write(&file, &value) {
            if let Some(dir) = state_dir {
                let _ = state::remove(dir, RECORD);
            }
            return Err(e);
        }
        tracing::debug!("reserved ports {value} (added {added}; was {before})");
        Ok(ReservedPorts {
            file,
            added,
            state_dir: state_dir.map(Path::to_path_buf),
            released: false,
        })
    }

    /// What this reservation will remove.
    #[cfg(test)]
    pub fn added(&self) -> &PortSet {
        &self.added
    }

    /// Removes what was added, keeping whatever others changed meanwhile.
    pub fn release(mut self) -> anyhow::Result<()> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> anyhow::Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        remove_added(&self.file, &self.added)?;
        if let Some(dir) = &self.state_dir {
            state::remove(dir, RECORD)?;
        }
        Ok(())
    }
}

fn remove_added(file: &File, added: &PortSet) -> anyhow::Result<()> {
    let now = current(file)?;
    write(file, &now.minus(added))
}

/// For `forwarder cleanup`: removes the ranges a dead daemon recorded in
/// `state_dir` from this namespace's reserved ports. Returns what it removed.
pub fn release_recorded(state_dir: &Path) -> anyhow::Result<PortSet> {
    let added = recorded(state_dir)?;
    if !added.is_empty() {
        remove_added(&open()?, &added)?;
    }
    state::remove(state_dir, RECORD)?;
    Ok(added)
}

impl Drop for ReservedPorts {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::warn!("{e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testns;

    fn set(s: &str) -> PortSet {
        PortSet::parse(s).unwrap()
    }

    #[test]
    fn port_sets_parse_merge_and_print_as_the_sysctl_does() {
        assert_eq!(set("").to_string(), "");
        assert_eq!(set("2000,1000-1001").to_string(), "1000-1001,2000");
        assert_eq!(set("5-9,1-4").to_string(), "1-9", "adjacent ranges join");
        assert_eq!(set("1-10, 3-4 ,12").to_string(), "1-10,12");
        assert_eq!(set("0-65535").to_string(), "0-65535");
        for bad in ["x", "1-", "9-1", "70000", "1-2-3"] {
            assert!(PortSet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn len_counts_every_port_once() {
        assert_eq!(set("").len(), 0);
        assert_eq!(set("7").len(), 1);
        assert_eq!(set("1000-1009,2000,0-0").len(), 12);
        assert_eq!(set("1-65535").len(), 65535);
    }

    #[test]
    fn minus_removes_exactly_the_given_ports() {
        let cases = [
            ("40000-59999", "40000-59999", ""),
            ("1000,40000-59999", "40000-59999", "1000"),
            ("40000-59999", "45000-45010", "40000-44999,45011-59999"),
            ("40000-40010", "39000-40005", "40006-40010"),
            ("40000-40010", "40005-41000", "40000-40004"),
            ("1-3,5-7,9", "2-6", "1,7,9"),
            ("0-65535", "0", "1-65535"),
            ("0-65535", "65535", "0-65534"),
            ("10-20", "30-40", "10-20"),
            ("", "1-2", ""),
        ];
        for (a, b, want) in cases {
            assert_eq!(set(a).minus(&set(b)).to_string(), want, "{a} - {b}");
        }
    }

    #[test]
    fn only_the_unreserved_part_of_our_range_counts_as_added() {
        let before = set("1000,45000-45009");
        let ours = PortSet::range(40000, 59999);
        let added = ours.minus(&before);
        assert_eq!(added.to_string(), "40000-44999,45010-59999");
        // Released after someone else added 50000 meanwhile: theirs goes
        // too (it lies inside our range), 45000-45009 and 1000 stay.
        let after = before.union(&ours).union(&set("50000,60000"));
        assert_eq!(after.minus(&added).to_string(), "1000,45000-45009,60000");
    }

    fn sysctl() -> String {
        read(&File::open(RESERVED_PORTS).unwrap()).unwrap()
    }

    fn state_dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("forwarder-sysctl-{}-{name}", std::process::id()))
    }

    #[test]
    fn our_range_is_added_and_removed_and_others_changes_stay() {
        if !testns::require_root("our_range_is_added_and_removed_and_others_changes_stay") {
            return;
        }
        let dir = state_dir("add");
        testns::in_fresh_netns(|| {
            assert_eq!(sysctl(), "");
            let r = ReservedPorts::reserve((40000, 40009), Some(&dir)).unwrap();
            assert_eq!(sysctl(), "40000-40009");
            assert_eq!(
                std::fs::read_to_string(dir.join(RECORD)).unwrap(),
                "40000-40009\n"
            );
            r.release().unwrap();
            assert_eq!(sysctl(), "");
            assert!(!dir.exists(), "the record goes with the reservation");

            std::fs::write(RESERVED_PORTS, "1000-1001,2000,40005\n").unwrap();
            let r = ReservedPorts::reserve((40000, 40009), Some(&dir)).unwrap();
            assert_eq!(r.added().to_string(), "40000-40004,40006-40009");
            assert_eq!(sysctl(), "1000-1001,2000,40000-40009");
            // Someone else reserves a port while we run.
            std::fs::write(RESERVED_PORTS, "1000-1001,2000,3000,40000-40009\n").unwrap();
            drop(r);
            assert_eq!(sysctl(), "1000-1001,2000,3000,40005");
        });
    }

    #[test]
    fn a_killed_daemons_record_is_undone_by_the_next_one_or_by_cleanup() {
        if !testns::require_root("a_killed_daemons_record_is_undone_by_the_next_one_or_by_cleanup")
        {
            return;
        }
        let dir = state_dir("killed");
        testns::in_fresh_netns(|| {
            std::fs::write(RESERVED_PORTS, "2000\n").unwrap();
            let killed = ReservedPorts::reserve((40000, 40009), Some(&dir)).unwrap();
            // SIGKILL: no release, the record stays.
            std::mem::forget(killed);
            assert_eq!(sysctl(), "2000,40000-40009");
            // The next daemon sees our whole range reserved, yet takes it as its own.
            let next = ReservedPorts::reserve((40000, 40009), Some(&dir)).unwrap();
            assert_eq!(next.added().to_string(), "40000-40009");
            next.release().unwrap();
            assert_eq!(sysctl(), "2000", "exactly as before the first start");

            let killed = ReservedPorts::reserve((50000, 50001), Some(&dir)).unwrap();
            std::mem::forget(killed);
            assert_eq!(release_recorded(&dir).unwrap().to_string(), "50000-50001");
            assert_eq!(sysctl(), "2000");
            assert!(!dir.exists());
            assert!(release_recorded(&dir).unwrap().is_empty(), "nothing twice");
        });
    }

    #[test]
    fn releasing_from_another_namespace_releases_the_one_it_came_from() {
        if !testns::require_root("releasing_from_another_namespace_releases_the_one_it_came_from") {
            return;
        }
        let dir = state_dir("other");
        let (give, take) = std::sync::mpsc::channel();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let ns_dir = dir.clone();
        let ns = std::thread::spawn(move || {
            testns::in_fresh_netns(move || {
                std::fs::write(RESERVED_PORTS, "1234\n").unwrap();
                give.send(ReservedPorts::reserve((50000, 50001), Some(&ns_dir)).unwrap())
                    .unwrap();
                wait.recv().unwrap();
                sysctl()
            })
        });
        let reservation = take.recv().unwrap();
        // Dropped on this thread, which is in another namespace.
        drop(reservation);
        done.send(()).unwrap();
        assert_eq!(ns.join().unwrap(), "1234");
    }
}
