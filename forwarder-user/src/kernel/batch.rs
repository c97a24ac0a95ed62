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
