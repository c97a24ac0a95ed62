//! Reading or zeroing a run of a per-CPU array in one `BPF_MAP_*_BATCH`
//! call (Linux 5.6) instead of one per entry: at 10,000 rules a status, or
//! a start, would otherwise make some 300,000 system calls. aya 0.14 has no batch
//! operations; the raw call is `super::batch`'s.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::batch::{BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, BatchAttr, sys_bpf};

/// Entries read per call: bounds the buffer (per-CPU values of 80 bytes
/// on 64 CPUs: 5 MiB).
pub const CHUNK: u32 = 1024;

/// Entries `first..first + count` of the per-CPU array `fd` of `V`s, each
/// as `cpus` values (its CPUs' in order): `out[i * cpus + cpu]`.
/// `V`'s size must be a multiple of 8, as the kernel lays values out.
pub fn read_per_cpu<V: Copy + Default>(
    fd: BorrowedFd,
    first: u32,
    count: u32,
    cpus: usize,
) -> io::Result<Vec<V>> {
    assert_eq!(size_of::<V>() % 8, 0, "per-CPU values are 8-byte aligned");
    let mut out = vec![V::default(); count as usize * cpus];
    let mut keys = vec![0u32; CHUNK.min(count) as usize];
    let mut done = 0u32;
    while done < count {
        let want = CHUNK.min(count - done);
        let mut next: u32 = 0;
        let start = first + done;
        // The kernel resumes after the key `in_batch` points to; none
        // means from the first entry.
        let prev: u32 = start.wrapping_sub(1);
        let mut attr = BatchAttr {
            in_batch: if start == 0 {
                0
            } else {
                (&raw const prev) as u64
            },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: out[done as usize * cpus..].as_mut_ptr() as u64,
            count: want,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // ENOENT: the end of the map, after `attr.count` entries.
        match sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            _ => {}
        }
        if attr.count != want || keys[0] != start || keys[want as usize - 1] != start + want - 1 {
            return Err(io::Error::other(format!(
                "batch lookup of {want} entries from {start} returned {} (keys {}..={})",
                attr.count,
                keys[0],
                keys[want as usize - 1]
            )));
        }
        done += want;
    }
    Ok(out)
}

/// Zeroes entries `first..first + count` of the per-CPU array `fd` whose
/// values are `value_size` bytes (a multiple of 8), on every CPU, with
/// `BPF_MAP_UPDATE_BATCH`.
pub fn zero_per_cpu(
    fd: BorrowedFd,
    first: u32,
    count: u32,
    value_size: usize,
    cpus: usize,
) -> io::Result<()> {
    assert_eq!(value_size % 8, 0, "per-CPU values are 8-byte aligned");
    let zeros = vec![0u64; CHUNK.min(count) as usize * cpus * value_size / 8];
    let mut done = 0u32;
    while done < count {
        let want = CHUNK.min(count - done);
        let keys: Vec<u32> = (first + done..first + done + want).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: zeros.as_ptr() as u64,
            count: want,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count != want {
            return Err(io::Error::other(format!(
                "batch update of {want} entries from {} wrote {}",
                first + done,
                attr.count
            )));
        }
        done += want;
    }
    Ok(())
}

/// Runs of consecutive ids in sorted, deduplicated `ids`: (first, count),
/// none longer than `max`.
pub fn runs(ids: &[u32], max: u32) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &id in ids {
        match out.last_mut() {
            Some((first, count)) if *first + *count == id && *count < max => *count += 1,
            _ => out.push((id, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};

    use aya::maps::{MapData, PerCpuArray, PerCpuValues};

    /// A fresh per-CPU array of `entries` u64s.
    fn per_cpu_array(entries: u32) -> OwnedFd {
        const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
        super::super::batch::tests::create_map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, entries)
    }

    #[test]
    fn batch_reads_give_each_entry_on_each_cpu_and_batch_zeroing_clears_only_its_run() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a BPF map needs root");
            return;
        }
        let cpus = aya::util::nr_cpus().unwrap();
        let entries = 3 * CHUNK + 7;
        let fd = per_cpu_array(entries);
        let data = MapData::from_fd(fd.as_fd().try_clone_to_owned().unwrap()).unwrap();
        let mut array: PerCpuArray<_, u64> =
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).unwrap();
        let value = |i: u32, cpu: usize| u64::from(i) * 1000 + cpu as u64 + 1;
        for i in 0..entries {
            let v: Vec<u64> = (0..cpus).map(|cpu| value(i, cpu)).collect();
            array.set(i, PerCpuValues::try_from(v).unwrap(), 0).unwrap();
        }
        // From the start, across chunks, up to the last entry.
        for (first, count) in [(0, 5), (1, 2 * CHUNK + 3), (CHUNK - 1, 2), (entries - 9, 9)] {
            let got = read_per_cpu::<u64>(fd.as_fd(), first, count, cpus).unwrap();
            assert_eq!(got.len(), count as usize * cpus);
            for i in 0..count {
                for cpu in 0..cpus {
                    assert_eq!(
                        got[i as usize * cpus + cpu],
                        value(first + i, cpu),
                        "entry {} cpu {cpu} of {first}+{count}",
                        first + i
                    );
                }
            }
        }
        let past = read_per_cpu::<u64>(fd.as_fd(), entries - 1, 2, cpus).unwrap_err();
        assert!(past.to_string().contains("returned 1"), "{past}");
        // Zeroing a run across chunks leaves its neighbours as they were.
        let (first, count) = (CHUNK - 3, CHUNK + 5);
        zero_per_cpu(fd.as_fd(), first, count, 8, cpus).unwrap();
        let got = read_per_cpu::<u64>(fd.as_fd(), 0, entries, cpus).unwrap();
        for i in 0..entries {
            for cpu in 0..cpus {
                let want = if (first..first + count).contains(&i) {
                    0
                } else {
                    value(i, cpu)
                };
                assert_eq!(got[i as usize * cpus + cpu], want, "entry {i} cpu {cpu}");
            }
        }
    }

    #[test]
    fn consecutive_ids_make_one_run_up_to_the_limit() {
        assert_eq!(runs(&[], 4), vec![]);
        assert_eq!(runs(&[3], 4), vec![(3, 1)]);
        assert_eq!(runs(&[0, 1, 2, 5, 6, 9], 4), vec![(0, 3), (5, 2), (9, 1)]);
        assert_eq!(runs(&[0, 1, 2, 3, 4, 5], 4), vec![(0, 4), (4, 2)]);
    }
}
