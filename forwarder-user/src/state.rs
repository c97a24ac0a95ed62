//! What a daemon records on the host so that a successor, or `forwarder
//! cleanup`, can undo exactly what it changed even if it was killed: one
//! directory per network namespace under `/run/forwarder`, named by the
//! namespace's cookie (unique for the whole boot, unlike its inode).
//!
//! Files in it: `pid` (the daemon's), `reserved-ports` (the port ranges
//! this daemon added to `ip_local_reserved_ports`).

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub const STATE_ROOT: &str = "/run/forwarder";

/// `SO_NETNS_COOKIE` (Linux 5.14); libc 0.2 does not name it on every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace.
pub fn netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| {
        // A namespace whose loopback is down still has sockets.
        std::net::UdpSocket::bind("0.0.0.0:0")
    })?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and a u64-sized buffer.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// This network namespace's state directory (not created).
pub fn dir() -> io::Result<PathBuf> {
    Ok(dir_of(netns_cookie()?))
}

/// The state directory of the network namespace with this cookie.
pub fn dir_of(netns_cookie: u64) -> PathBuf {
    Path::new(STATE_ROOT).join(format!("netns-{netns_cookie}"))
}

/// Writes `name` in the state directory atomically (write, then rename).
pub fn write(dir: &Path, name: &str, contents: &str) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, dir.join(name))
}

/// The contents of `name`, or `None` if there is no such file.
pub fn read(dir: &Path, name: &str) -> io::Result<Option<String>> {
    match std::fs::read_to_string(dir.join(name)) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes `name`, and the directory once it is empty.
pub fn remove(dir: &Path, name: &str) -> io::Result<()> {
    match std::fs::remove_file(dir.join(name)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Fails while other files remain, which is what we want.
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// The pid recorded in `dir`, if that process is alive.
pub fn live_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = read(dir, "pid").ok()??.trim().parse().ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    alive.then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_read_and_removed_with_their_directory() {
        let dir = std::env::temp_dir().join(format!("forwarder-state-test-{}", std::process::id()));
        assert_eq!(read(&dir, "x").unwrap(), None);
        write(&dir, "x", "1-2\n").unwrap();
        write(&dir, "x", "3-4\n").unwrap();
        assert_eq!(read(&dir, "x").unwrap().as_deref(), Some("3-4\n"));
        write(&dir, "pid", &format!("{}\n", std::process::id())).unwrap();
        assert_eq!(live_pid(&dir), Some(std::process::id() as i32));
        remove(&dir, "x").unwrap();
        assert!(dir.exists(), "pid is still there");
        write(&dir, "pid", "2147483646\n").unwrap();
        assert_eq!(live_pid(&dir), None, "no such process");
        remove(&dir, "pid").unwrap();
        assert!(!dir.exists());
        remove(&dir, "pid").unwrap();
    }

    #[test]
    fn the_cookie_names_this_namespace() {
        let a = netns_cookie().unwrap();
        assert_eq!(a, netns_cookie().unwrap());
        assert_ne!(a, 0);
    }
}
