//! Batched reads and deletes of a BPF hash map (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_DELETE_BATCH`, Linux 5.6), which aya 0.14 does not wrap: one
//! system call moves thousands of entries, where get-next-key and lookup
//! take two per entry.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::Pod;

pub(super) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub(super) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
pub(super) struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

pub(super) fn sys_bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr.batch` whose pointers the caller
    // made point at buffers of `count` elements (or NULL).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Where a walk over a hash map resumes: a bucket index, kept by the
/// kernel's hash map between calls. Entries added or removed meanwhile do
/// not upset it (get-next-key starts over when its key is gone).
pub type Cursor = Option<u32>;

/// Reads at most `max` entries of the hash map `fd` from `cursor` on
/// (`None`: the first bucket) into `keys` and `values`, replacing their
/// contents. Returns the cursor to go on from, `None` once the walk has
/// reached the end of the map (the entries read are still valid then).
/// A batch ends at a bucket's end, so no entry is read twice or skipped.
pub fn lookup<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    cursor: Cursor,
    max: usize,
    keys: &mut Vec<K>,
    values: &mut Vec<V>,
) -> io::Result<Cursor> {
    keys.clear();
    values.clear();
    keys.reserve(max);
    values.reserve(max);
    let mut in_batch = cursor.unwrap_or(0);
    let mut out_batch: u32 = 0;
    let mut attr = BatchAttr {
        in_batch: match cursor {
            Some(_) => (&raw mut in_batch) as u64,
            None => 0,
        },
        out_batch: (&raw mut out_batch) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: max.min(u32::MAX as usize) as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    let end = match sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
        Err(e) => return Err(e),
    };
    let n = (attr.count as usize).min(max);
    // SAFETY: the kernel wrote `n` keys and values, and `K`, `V` are Pod.
    unsafe {
        keys.set_len(n);
        values.set_len(n);
    }
    Ok(if end { None } else { Some(out_batch) })
}

/// Deletes `keys` from the hash map `fd`; a key already gone (the kernel
/// path or a racing pass removed it) is skipped. Returns how many went.
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, mut keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    while !keys.is_empty() {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            count: keys.len().min(u32::MAX as usize) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // The kernel deletes in order and stops at the first failure;
        // `count` says how many went before it.
        let done = (attr.count as usize).min(keys.len());
        deleted += done;
        match result {
            Ok(()) if done == 0 => break,
            Ok(()) => keys = &keys[done..],
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                keys = &keys[(done + 1).min(keys.len())..]
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Entries in the hash map `fd`, counted in batches.
pub fn count<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<usize> {
    const CHUNK: usize = 4096;
    let (mut keys, mut values) = (Vec::<K>::new(), Vec::<V>::new());
    let mut cursor = None;
    let mut n = 0;
    loop {
        cursor = lookup(fd, cursor, CHUNK, &mut keys, &mut values)?;
        n += keys.len();
        if cursor.is_none() {
            return Ok(n);
        }
    }
}

/// Writes `keys` with `values` into the hash map `fd`, each replacing an
/// entry with its key. The kernel stops at the first failure: a full map
/// ends the write early. Returns how many were written.
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<usize> {
    assert_eq!(keys.len(), values.len(), "a value for every key");
    let mut written = 0;
    while written < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[written..].as_ptr() as u64,
            values: values[written..].as_ptr() as u64,
            count: (keys.len() - written).min(u32::MAX as usize) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        let done = (attr.count as usize).min(keys.len() - written);
        written += done;
        match result {
            Ok(()) if done == 0 => break,
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// What [`copy`] moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub entries: usize,
    /// Entries the destination had no room for.
    pub left_out: usize,
}

/// Copies the entries of the hash map `from` whose value `keep`s into the
/// hash map `to` (same key and value types), replacing entries with the
/// same key.
pub fn copy<K: Pod, V: Pod>(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    keep: impl Fn(&V) -> bool,
) -> io::Result<Copied> {
    const CHUNK: usize = 4096;
    let (mut keys, mut values) = (Vec::<K>::new(), Vec::<V>::new());
    let mut cursor = None;
    let mut copied = Copied::default();
    loop {
        cursor = lookup(from, cursor, CHUNK, &mut keys, &mut values)?;
        let mut kept = 0;
        for i in 0..keys.len() {
            if keep(&values[i]) {
                keys.swap(kept, i);
                values.swap(kept, i);
                kept += 1;
            }
        }
        keys.truncate(kept);
        values.truncate(kept);
        let written = if copied.left_out == 0 {
            update(to, &keys, &values)?
        } else {
            0
        };
        copied.entries += written;
        copied.left_out += keys.len() - written;
        if cursor.is_none() {
            return Ok(copied);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// A fresh map (BPF_MAP_CREATE); root only.
    pub fn create_map(map_type: u32, key_size: u32, value_size: u32, entries: u32) -> OwnedFd {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let mut attr = CreateAttr {
            map_type,
            key_size,
            value_size,
            max_entries: entries,
            map_flags: 0,
        };
        // SAFETY: a valid attr for BPF_MAP_CREATE (0).
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0,
                &raw mut attr,
                size_of::<CreateAttr>() as u32,
            )
        };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        // SAFETY: a new descriptor this test owns.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    fn hash_map(entries: u32) -> OwnedFd {
        const BPF_MAP_TYPE_HASH: u32 = 1;
        create_map(BPF_MAP_TYPE_HASH, 8, 8, entries)
    }

    fn entries(fd: BorrowedFd<'_>) -> std::collections::BTreeMap<u64, u64> {
        let (mut keys, mut values) = (Vec::<u64>::new(), Vec::<u64>::new());
        let mut all = std::collections::BTreeMap::new();
        let mut cursor = None;
        loop {
            cursor = lookup(fd, cursor, 1000, &mut keys, &mut values).unwrap();
            all.extend(keys.iter().copied().zip(values.iter().copied()));
            if cursor.is_none() {
                return all;
            }
        }
    }

    #[test]
    fn a_copy_carries_every_entry_into_a_bigger_map_and_what_fits_into_a_smaller_one() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a BPF map needs root");
            return;
        }
        const N: u64 = 10_000;
        let from = hash_map(N as u32);
        let keys: Vec<u64> = (0..N).map(|i| i * 7919 + 1).collect();
        let values: Vec<u64> = keys.iter().map(|k| k ^ 0xfeed).collect();
        assert_eq!(update(from.as_fd(), &keys, &values).unwrap(), N as usize);
        let want = entries(from.as_fd());
        assert_eq!(want.len(), N as usize);

        // Bigger, with one key already there under another value.
        let bigger = hash_map(2 * N as u32);
        update(bigger.as_fd(), &[keys[5]], &[0u64]).unwrap();
        update(bigger.as_fd(), &[u64::MAX], &[3u64]).unwrap();
        let copied = copy::<u64, u64>(from.as_fd(), bigger.as_fd(), |_| true).unwrap();
        assert_eq!(
            copied,
            Copied {
                entries: N as usize,
                left_out: 0
            }
        );
        let mut got = entries(bigger.as_fd());
        assert_eq!(got.remove(&u64::MAX), Some(3), "its own entry stays");
        assert_eq!(got, want, "every entry, the old value replaced");

        // Smaller: what fits, the rest counted.
        let smaller = hash_map(6_000);
        let copied = copy::<u64, u64>(from.as_fd(), smaller.as_fd(), |_| true).unwrap();
        assert_eq!(
            copied,
            Copied {
                entries: 6_000,
                left_out: N as usize - 6_000
            }
        );
        let got = entries(smaller.as_fd());
        assert_eq!(got.len(), 6_000);
        assert!(got.iter().all(|(k, v)| want.get(k) == Some(v)));

        // Only what `keep` picks.
        let odd = hash_map(N as u32);
        let copied = copy::<u64, u64>(from.as_fd(), odd.as_fd(), |v| v % 2 == 1).unwrap();
        let got = entries(odd.as_fd());
        assert_eq!(copied.entries, got.len());
        assert_eq!(
            got,
            want.iter()
                .filter(|(_, v)| *v % 2 == 1)
                .map(|(k, v)| (*k, *v))
                .collect()
        );
        assert!(got.len() > 1000 && got.len() < 9000, "{}", got.len());
    }
}
