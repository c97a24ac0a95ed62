//! Pinned flow tables a start wants at another size: `kernel.conntrack_size`
//! changed since the pins were made, or the relay's bound moved with the UDP
//! rules. Their flows are carried into the new tables instead of dropped.
//!
//! The pinned table is renamed aside (`NAME-previous`), so that the loader
//! creates and pins a table of the new size under `NAME`. Its entries are
//! copied in before the new programs replace the old ones in their links,
//! and once more right after, for the flows the old programs opened or
//! moved meanwhile; then the old table is unpinned.
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::MapData;
use forwarder_common::{CtKey, CtValue, RELAY_OWNER_KERNEL, RelayFlow};

use super::batch::{self, Copied};
use super::pins;

/// The tables whose size is a setting; every other map has a size fixed by
/// the build, so a mismatch there is another layout.
pub const RESIZABLE: &[&str] = &["CONNTRACK", "RELAY_FLOWS"];

/// A pinned table set aside for one of another size.
#[derive(Debug)]
pub struct Resized {
    name: &'static str,
    dir: PathBuf,
    was_entries: u32,
    now_entries: u32,
}

impl Resized {
    /// Renames `name`'s pin in `dir` aside, for a table of `now_entries`.
    pub fn set_aside(
        dir: &Path,
        name: &'static str,
        was_entries: u32,
        now_entries: u32,
    ) -> anyhow::Result<Resized> {
        let from = pins::map_path(dir, name);
        let to = pins::set_aside_path(dir, name);
        std::fs::rename(&from, &to).map_err(|e| {
            anyhow::anyhow!(
                "cannot set {} aside as {}: {e}",
                from.display(),
                to.display()
            )
        })?;
        Ok(Resized {
            name,
            dir: dir.to_path_buf(),
            was_entries,
            now_entries,
        })
    }

    /// Copies the set-aside table's entries into the one pinned now.
    pub fn carry(&self) -> anyhow::Result<Copied> {
        let open = |path: PathBuf| {
            MapData::from_pin(&path)
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))
        };
        let from = open(pins::set_aside_path(&self.dir, self.name))?;
        let to = open(pins::map_path(&self.dir, self.name))?;
        let (from, to) = (from.fd().as_fd(), to.fd().as_fd());
        let copied = match self.name {
            // The relay writes its own flows in; the kernel's marks (flows
            // it gave the relay for good) are carried.
            "RELAY_FLOWS" => {
                batch::copy::<CtKey, RelayFlow>(from, to, |flow| flow.owner == RELAY_OWNER_KERNEL)
            }
            _ => batch::copy::<CtKey, CtValue>(from, to, |_| true),
        };
        copied.map_err(|e| anyhow::anyhow!("cannot copy {}'s entries: {e}", self.name))
    }

    /// The new table is in force: the old one goes once nothing holds it.
    pub fn finish(self, copied: Copied) {
        let now_entries = self.now_entries;
        let path = pins::set_aside_path(&self.dir, self.name);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
        if copied.left_out > 0 {
            tracing::warn!(
                "{} went from {} to {now_entries} entries; {} entries carried over, {} had no \
                 room: their flows are dropped",
                self.name,
                self.was_entries,
                copied.entries,
                copied.left_out
            );
        } else {
            tracing::info!(
                "{} went from {} to {now_entries} entries; {} entries carried over",
                self.name,
                self.was_entries,
                copied.entries
            );
        }
    }

    /// A start that failed puts the old table back under its name.
    pub fn undo(self) {
        let current = pins::map_path(&self.dir, self.name);
        let previous = pins::set_aside_path(&self.dir, self.name);
        let _ = std::fs::remove_file(&current);
        if let Err(e) = std::fs::rename(&previous, &current) {
            tracing::warn!(
                "cannot put {} back as {}: {e}",
                previous.display(),
                current.display()
            );
        }
    }
}
