//! Forcing links of our programs off an interface.
//!
//! Closing a link's descriptor detaches it only when no other reference
//! exists; a process forked at that moment (before its exec closes the
//! inherited descriptor) keeps it attached a little longer. `BPF_LINK_DETACH`
//! detaches at once, whoever still holds the link.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::loaded_links;

const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `enum bpf_attach_type`'s `BPF_SK_LOOKUP`.
const BPF_SK_LOOKUP: u32 = 36;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

#[repr(C)]
#[derive(Default)]
struct Attr {
    first: u32,
    second: u32,
    third: u32,
    _pad: [u32; 5],
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: the attr is a live, zero-padded bpf_attr prefix of the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Puts `program` in place of the program of the link pinned at `path`
/// (`BPF_LINK_UPDATE`): one step, so no packet finds the hook empty or
/// goes through both. Returns the link, still pinned.
pub fn replace_program(path: &Path, program: BorrowedFd<'_>) -> anyhow::Result<PinnedLink> {
    let link = FdLink::from(PinnedLink::from_pin(path)?);
    let id = link.info()?.id();
    drop(link);
    let mut get = Attr {
        first: id,
        ..Attr::default()
    };
    let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut get)?;
    // SAFETY: a descriptor the kernel just gave us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    update_link(fd.as_fd(), program)?;
    Ok(PinnedLink::from_pin(path)?)
}

/// Puts `program` in place of the program of `link` (`BPF_LINK_UPDATE`),
/// in one step.
pub fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut update = Attr {
        first: link.as_raw_fd() as u32,
        second: program.as_raw_fd() as u32,
        ..Attr::default()
    };
    bpf(BPF_LINK_UPDATE, &mut update).map(drop)
}

/// Attaches the `sk_lookup` `program` to the network namespace `netns`
/// (`BPF_LINK_CREATE`); the link is ours as a plain descriptor, so that
/// an upgrade can hand it to the next image (aya keeps its own private).
pub fn create_sk_lookup_link(
    program: BorrowedFd<'_>,
    netns: BorrowedFd<'_>,
) -> io::Result<OwnedFd> {
    let mut create = Attr {
        first: program.as_raw_fd() as u32,
        second: netns.as_raw_fd() as u32,
        third: BPF_SK_LOOKUP,
        ..Attr::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut create)?;
    // SAFETY: a descriptor the kernel just gave us, close-on-exec as
    // every bpf(2) descriptor is.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches every link of the programs `program_ids`; returns how many.
pub fn detach_links_of(program_ids: &[u32]) -> io::Result<usize> {
    let mut detached = 0;
    for info in loaded_links().filter_map(Result::ok) {
        if !program_ids.contains(&info.program_id()) {
            continue;
        }
        let mut get = Attr {
            first: info.id(),
            ..Attr::default()
        };
        let fd = match bpf(BPF_LINK_GET_FD_BY_ID, &mut get) {
            Ok(fd) => fd,
            // Gone meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: a descriptor the kernel just gave us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut detach = Attr {
            first: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
            ..Attr::default()
        };
        match bpf(BPF_LINK_DETACH, &mut detach) {
            Ok(_) => detached += 1,
            // Already detached (ENOLINK), or a link type without detach.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLINK | libc::EOPNOTSUPP)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(detached)
}
