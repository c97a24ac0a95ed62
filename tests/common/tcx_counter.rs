//! Another eBPF tool on the same hook: a TCX ingress program that counts
//! the packets it sees and passes each on (TCX "next"). Loaded from raw
//! instructions with bpf(2), so the tests need no second object file.
//! Everything goes when the value drops (the link is not pinned).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;

#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

#[repr(C)]
struct MapLookup {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    /// 0: after every program already attached.
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// One `struct bpf_insn`.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let regs = (src << 4) | dst;
    (code as u64)
        | ((regs as u64) << 8)
        | (((off as u16) as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: `attr` is a live, fully initialised attribute struct of its size.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as i32)
}

fn owned(fd: i32) -> OwnedFd {
    // SAFETY: a descriptor bpf(2) just returned to us alone.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

pub struct TcxCounter {
    map: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl TcxCounter {
    /// Attaches after every TCX ingress program already on `ifindex` (of
    /// the calling thread's namespace).
    pub fn attach(ifindex: u32) -> io::Result<TcxCounter> {
        let map = owned(sys_bpf(
            BPF_MAP_CREATE,
            &mut MapCreate {
                map_type: BPF_MAP_TYPE_ARRAY,
                key_size: 4,
                value_size: 8,
                max_entries: 1,
            },
        )?);
        let map_fd = map.as_raw_fd();
        // r1 = map; *(u32 *)(r10 - 4) = 0; r2 = r10 - 4;
        // r0 = bpf_map_lookup_elem(r1, r2); if r0: atomic *(u64 *)r0 += 1;
        // return -1 (TCX_NEXT).
        let program = [
            insn(0x18, 1, 1, 0, map_fd),
            0,
            insn(0x62, 10, 0, -4, 0),
            insn(0xbf, 2, 10, 0, 0),
            insn(0x07, 2, 0, 0, -4),
            insn(0x85, 0, 0, 0, 1),
            insn(0x15, 0, 0, 2, 0),
            insn(0xb7, 1, 0, 0, 1),
            insn(0xdb, 0, 1, 0, 0),
            insn(0xb7, 0, 0, 0, -1),
            insn(0x95, 0, 0, 0, 0),
        ];
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..11].copy_from_slice(b"test_count\0");
        let prog = owned(sys_bpf(
            BPF_PROG_LOAD,
            &mut ProgLoad {
                prog_type: BPF_PROG_TYPE_SCHED_CLS,
                insn_cnt: program.len() as u32,
                insns: program.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: 0,
                log_size: 0,
                log_buf: 0,
                kern_version: 0,
                prog_flags: 0,
                prog_name: name,
                prog_ifindex: 0,
                expected_attach_type: BPF_TCX_INGRESS,
            },
        )?);
        let link = owned(sys_bpf(
            BPF_LINK_CREATE,
            &mut LinkCreate {
                prog_fd: prog.as_raw_fd() as u32,
                target_ifindex: ifindex,
                attach_type: BPF_TCX_INGRESS,
                flags: 0,
                relative_fd: 0,
                _pad: 0,
                expected_revision: 0,
            },
        )?);
        Ok(TcxCounter {
            map,
            _prog: prog,
            _link: link,
        })
    }

    /// Packets the program has seen.
    pub fn count(&self) -> u64 {
        let key = 0u32;
        let mut value = 0u64;
        sys_bpf(
            BPF_MAP_LOOKUP_ELEM,
            &mut MapLookup {
                map_fd: self.map.as_raw_fd() as u32,
                _pad: 0,
                key: &key as *const u32 as u64,
                value: &mut value as *mut u64 as u64,
                flags: 0,
            },
        )
        .expect("read the counter");
        value
    }
}
