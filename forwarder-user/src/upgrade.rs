//! Upgrading in place (SIGUSR2, `forwarder upgrade`): the daemon
//! re-executes the binary at the path it was started from, with the same
//! pid. The kernel path stays pinned and the new image adopts it; the
//! relay's sockets, pairs and sessions, the control socket and the
//! waiting `forwarder upgrade` client are passed as descriptors, described
//! by a record in an inherited memfd named in [`HANDOVER_ENV`].
//!
//! Every other descriptor is close-on-exec and does not reach the new
//! image. The stop and reload signals stay blocked from just before the
//! exec until the new image has its handlers, so none is lost or taken
//! with its default action (which would end the daemon uncleanly).

use std::ffi::CString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, anyhow};
use serde::{Deserialize, Serialize};

use crate::relay::RelayRecord;

/// Names the descriptor of the handover record in the new image.
pub const HANDOVER_ENV: &str = "FORWARDER_HANDOVER_FD";

/// How long the new binary's `check` may take.
const PREFLIGHT_WAIT: Duration = Duration::from_secs(30);

/// What the old image hands to the new one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// The bound control socket.
    pub control: Option<RawFd>,
    /// The `forwarder upgrade` client waiting for its answer.
    pub requester: Option<RawFd>,
    pub relay: RelayRecord,
    /// The port ranges' socket steering, kept attached through the exec.
    #[serde(default)]
    pub steer: Option<crate::kernel::SteerRecord>,
    /// When the relay was frozen (ms since the Unix epoch), for the
    /// upgrade's duration.
    pub frozen_at_ms: u64,
    /// The version that handed over.
    pub from_version: String,
    /// Docker's last listing, whose routes are in the running rules: the
    /// new image starts with them, not without until Docker answers.
    #[serde(default)]
    pub containers: Vec<crate::config::Container>,
    /// The metrics endpoint's listening socket.
    #[serde(default)]
    pub metrics: Option<RawFd>,
    /// The backends' health, so that one that is down stays down.
    #[serde(default)]
    pub health: Vec<crate::health::HealthRecord>,
    /// The old image ran the kernel path: a new one that cannot start it
    /// gives everything back rather than run on without it.
    #[serde(default)]
    pub kernel_path: bool,
    /// The way back to the old image if the new one fails to start.
    #[serde(default)]
    pub fallback: Option<Fallback>,
    /// Set by a new image that failed to start and gave everything back:
    /// why it failed.
    #[serde(default)]
    pub failed: Option<String>,
}

/// The old image as it was started, to be executed again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Fallback {
    /// An `O_PATH` descriptor of the old image's binary (its inode, not
    /// the path, which names the new binary now).
    pub exe: RawFd,
    /// Its arguments and environment (`K=V`, without [`HANDOVER_ENV`]):
    /// the new binary may have been started with others.
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
}

impl Record {
    fn fds(&self) -> Vec<RawFd> {
        let mut fds = self.relay.fds();
        fds.extend(self.steer.iter().flat_map(|s| s.fds()));
        fds.extend(self.control);
        fds.extend(self.requester);
        fds.extend(self.metrics);
        fds.extend(self.fallback.as_ref().map(|f| f.exe));
        fds
    }

    /// Every descriptor the record names, to renumber them; the same as
    /// [`Record::fds`].
    fn fds_mut(&mut self) -> Vec<&mut RawFd> {
        let relay = &mut self.relay;
        let mut fds: Vec<&mut RawFd> = relay.listeners.iter_mut().map(|l| &mut l.fd).collect();
        for p in &mut relay.tcp {
            fds.extend([&mut p.client_fd, &mut p.backend_fd]);
            for (r, w) in [&mut p.up_pipe, &mut p.down_pipe].into_iter().flatten() {
                fds.extend([r, w]);
            }
        }
        for s in &mut relay.udp {
            fds.push(&mut s.upstream_fd);
            fds.extend(s.toward_client_fd.as_mut());
        }
        if let Some(s) = &mut self.steer {
            fds.extend([&mut s.link, &mut s.sockets, &mut s.ranges]);
        }
        fds.extend(self.control.as_mut());
        fds.extend(self.requester.as_mut());
        fds.extend(self.metrics.as_mut());
        fds.extend(self.fallback.as_mut().map(|f| &mut f.exe));
        fds
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The signals the daemon handles; blocked across the exec.
const SIGNALS: [libc::c_int; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGUSR2,
];

fn set_blocked(block: bool) {
    // SAFETY: a sigset on the stack, filled before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Blocks the daemon's signals on the calling thread (and the threads it
/// starts after this): called before the runtime starts, so that only the
/// thread that unblocks them later ever takes them.
pub fn block_signals() {
    set_blocked(true);
}

/// The daemon's handlers are installed: signals (pending ones included)
/// reach them on this thread.
pub fn unblock_signals() {
    set_blocked(false);
}

static START_PATH: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Remembers the path this binary was started from, as it was named
/// (`argv[0]`, made absolute, or found on `PATH`): a symlink there that
/// is moved to a new version is followed at the upgrade, not resolved now.
pub fn remember_start_path() {
    START_PATH.get_or_init(|| {
        let argv0 = std::env::args_os().next()?;
        let cwd = std::env::current_dir().ok();
        start_path_of(&argv0, cwd.as_deref(), std::env::var_os("PATH").as_deref())
            .or_else(|| std::env::current_exe().ok())
    });
}

fn start_path_of(
    argv0: &std::ffi::OsStr,
    cwd: Option<&Path>,
    path_var: Option<&std::ffi::OsStr>,
) -> Option<PathBuf> {
    let named = Path::new(argv0);
    if argv0.as_bytes().contains(&b'/') {
        return Some(match named.is_absolute() {
            true => named.to_path_buf(),
            false => cwd?.join(named),
        });
    }
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    std::env::split_paths(path_var?)
        .map(|dir| dir.join(named))
        .find(|candidate| executable(candidate))
}

fn start_path() -> Result<PathBuf, String> {
    START_PATH
        .get()
        .cloned()
        .flatten()
        .ok_or_else(|| "the path this daemon was started from is unknown".to_owned())
}

/// Runs `<binary> check -c <config>` and says why if it fails: a binary
/// that cannot validate the running rule file must not replace us.
pub fn preflight(config: &Path) -> Result<PathBuf, String> {
    let exe = start_path()?;
    let mut child = std::process::Command::new(&exe)
        .arg("check")
        .arg("-c")
        .arg(config)
        .env_remove(HANDOVER_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the new binary {}: {e}", exe.display()))?;
    let deadline = std::time::Instant::now() + PREFLIGHT_WAIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{} check -c {}` did not finish within {PREFLIGHT_WAIT:?}",
                    exe.display(),
                    config.display()
                ));
            }
            Err(e) => return Err(format!("waiting for {}: {e}", exe.display())),
        }
    };
    if status.success() {
        return Ok(exe);
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let said = stderr.trim();
    Err(format!(
        "the new binary failed `{} check -c {}` ({status}){}{}",
        exe.display(),
        config.display(),
        if said.is_empty() { "" } else { ": " },
        said
    ))
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on a descriptor we hold; a closed one only fails.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if on {
                flags | libc::FD_CLOEXEC
            } else {
                flags & !libc::FD_CLOEXEC
            };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}

fn cstring(s: &[u8]) -> Result<CString, String> {
    CString::new(s).map_err(|_| "an argument holds a NUL byte".to_owned())
}

/// What to execute: the new binary by path, or the old one by descriptor.
enum Target<'a> {
    Path(&'a Path),
    Fd(RawFd),
}

/// Replaces this process with `exe`, handing over `record` and the way
/// back to this image. Returns only if that failed, with the reason;
/// everything is as it was then.
pub fn exec(exe: &Path, record: &Record) -> String {
    // O_PATH: this binary's inode, to execute it again even when the
    // path names another file now.
    // SAFETY: a valid NUL-terminated path.
    let own = unsafe { libc::open(c"/proc/self/exe".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if own < 0 {
        return format!(
            "cannot open this binary (/proc/self/exe) to keep a way back: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: just opened, owned here; closed if the exec fails.
    let own = unsafe { OwnedFd::from_raw_fd(own) };
    let argv: Vec<Vec<u8>> = std::env::args_os().map(|a| a.into_vec()).collect();
    let env: Vec<Vec<u8>> = std::env::vars_os()
        .filter(|(k, _)| k != HANDOVER_ENV)
        .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
        .collect();
    let mut record = record.clone();
    record.fallback = Some(Fallback {
        exe: own.as_raw_fd(),
        argv: argv.clone(),
        env: env.clone(),
    });
    exec_image(Target::Path(exe), &argv, &env, &record)
}

fn exec_image(target: Target, argv: &[Vec<u8>], env: &[Vec<u8>], record: &Record) -> String {
    let text = match serde_json::to_vec(record) {
        Ok(text) => text,
        Err(e) => return format!("cannot write the handover record: {e}"),
    };
    let name = c"forwarder-handover";
    // SAFETY: a valid name; no MFD_CLOEXEC: the new image inherits it.
    let memfd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if memfd < 0 {
        return format!(
            "cannot create the handover memfd: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: just created, owned here.
    let mut memfd = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(memfd) });
    if let Err(e) = memfd.write_all(&text).and_then(|()| memfd.rewind()) {
        return format!("cannot write the handover memfd: {e}");
    }
    let argv: Result<Vec<CString>, String> = argv.iter().map(|a| cstring(a)).collect();
    let handover = format!("{HANDOVER_ENV}={}", memfd.as_raw_fd()).into_bytes();
    let envp: Result<Vec<CString>, String> = env
        .iter()
        .chain(std::iter::once(&handover))
        .map(|e| cstring(e))
        .collect();
    let (what, path) = match target {
        Target::Path(exe) => (exe.display().to_string(), Some(exe.as_os_str().as_bytes())),
        Target::Fd(_) => ("the previous binary".to_owned(), None),
    };
    let (argv, envp, path) = match (argv, envp, path.map(cstring).transpose()) {
        (Ok(a), Ok(e), Ok(p)) => (a, e, p),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e,
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());

    let handed = record.fds();
    for &fd in &handed {
        set_cloexec(fd, false);
    }
    block_signals();
    match (&target, &path) {
        // SAFETY: NUL-terminated arrays of valid C strings that outlive the call.
        (Target::Path(_), Some(path)) => unsafe {
            libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
        },
        // SAFETY: as above; an empty path with AT_EMPTY_PATH runs the file of `fd`.
        (Target::Fd(fd), _) => unsafe {
            libc::syscall(
                libc::SYS_execveat,
                *fd,
                c"".as_ptr(),
                argv_ptrs.as_ptr(),
                envp_ptrs.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
        },
        (Target::Path(_), None) => unreachable!("a path target has its C string"),
    }
    let e = std::io::Error::last_os_error();
    unblock_signals();
    for &fd in &handed {
        set_cloexec(fd, true);
    }
    format!("cannot execute {what}: {e}")
}

/// The way back, held by a new image from reading the record until its
/// start is done: every handed-over descriptor duplicated (so that what
/// the start closes or takes stays open) and the record renumbered onto
/// the duplicates.
struct Armed {
    record: Record,
    reserve: Vec<OwnedFd>,
    /// The thread that runs the start: a panic there is a failed start.
    thread: std::thread::ThreadId,
}

static ARMED: std::sync::Mutex<Option<Armed>> = std::sync::Mutex::new(None);

/// Duplicates `fd` (close-on-exec) into the reserve; returns its number.
fn reserve_fd(fd: RawFd, reserve: &mut Vec<OwnedFd>) -> std::io::Result<RawFd> {
    // SAFETY: dups a descriptor the record names; fails if it is not open.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just made, owned by the reserve.
    reserve.push(unsafe { OwnedFd::from_raw_fd(dup) });
    Ok(dup)
}

/// Keeps the way back to the old image for this start, if the record has
/// one. A record from an image that gave everything back has none (and
/// says `failed`): an old image whose own start fails does not go back
/// to the new binary, nor start itself again.
pub fn arm(record: &Record) -> Result<bool, String> {
    if record.fallback.is_none() || record.failed.is_some() {
        return Ok(false);
    }
    let mut copy = record.clone();
    let mut reserve = Vec::new();
    let mut renumbered = std::collections::HashMap::new();
    for fd in copy.fds_mut() {
        let dup = match renumbered.get(fd) {
            Some(&dup) => dup,
            None => {
                let dup = reserve_fd(*fd, &mut reserve)
                    .map_err(|e| format!("cannot keep descriptor {fd} of the record: {e}"))?;
                renumbered.insert(*fd, dup);
                dup
            }
        };
        // This image's own copy is close-on-exec like any other.
        set_cloexec(*fd, true);
        *fd = dup;
    }
    if let Some(f) = &record.fallback {
        // Nothing else here owns the original: the reserve's copy is the one.
        // SAFETY: named by the record for this purpose alone, duplicated above.
        drop(unsafe { OwnedFd::from_raw_fd(f.exe) });
    }
    *ARMED.lock().unwrap_or_else(|e| e.into_inner()) = Some(Armed {
        record: copy,
        reserve,
        thread: std::thread::current().id(),
    });
    install_panic_hook();
    Ok(true)
}

/// Whether a failed start goes back to the old image.
pub fn armed() -> bool {
    ARMED.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// The start is done: the way back closes.
pub fn disarm() {
    ARMED.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// The relay of this image, frozen again after it resumed: its record
/// (its flows as they are now, nothing held in userspace, new flows
/// included) replaces the one read at start.
pub fn relay_frozen(relay: RelayRecord) -> Result<(), String> {
    let mut guard = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    let armed = guard.as_mut().ok_or("no way back is kept")?;
    let mut renumbered = std::collections::HashMap::new();
    for fd in relay.fds() {
        if let std::collections::hash_map::Entry::Vacant(e) = renumbered.entry(fd) {
            let dup = reserve_fd(fd, &mut armed.reserve)
                .map_err(|e| format!("cannot keep relay descriptor {fd}: {e}"))?;
            e.insert(dup);
        }
    }
    let count = relay.fds().len();
    let mut record = Record {
        relay,
        ..armed.record.clone()
    };
    // The relay's descriptors come first in `fds_mut`.
    for fd in record.fds_mut().into_iter().take(count) {
        *fd = renumbered[&*fd];
    }
    armed.record.relay = record.relay;
    Ok(())
}

/// Gives everything back to the old image: executes it, with the same
/// pid, on the record it handed over (renumbered onto the reserve),
/// saying why this start failed. Returns only if that is not possible.
pub fn give_back(why: &str) -> String {
    let Some(armed) = ARMED.try_lock().ok().and_then(|mut a| a.take()) else {
        return "no way back is kept".to_owned();
    };
    let mut record = armed.record;
    let Some(fallback) = record.fallback.take() else {
        return "no way back is kept".to_owned();
    };
    record.failed = Some(why.to_owned());
    let reason = exec_image(
        Target::Fd(fallback.exe),
        &fallback.argv,
        &fallback.env,
        &record,
    );
    drop(armed.reserve);
    reason
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let here = std::thread::current().id();
            let starting = ARMED
                .try_lock()
                .ok()
                .is_some_and(|a| a.as_ref().is_some_and(|a| a.thread == here));
            if starting {
                let why = format!("it panicked: {info}");
                tracing::error!("the new image failed to start ({why}); giving everything back to the previous binary");
                let failed = give_back(&why);
                tracing::error!("cannot go back to the previous binary: {failed}");
            }
        }));
    });
}

/// The record the previous image handed over, if this image is an upgrade.
pub fn inherited() -> anyhow::Result<Option<Record>> {
    let Some(fd) = std::env::var_os(HANDOVER_ENV) else {
        return Ok(None);
    };
    let fd: RawFd = fd
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|&fd| fd > 2)
        .ok_or_else(|| anyhow!("{HANDOVER_ENV}={fd:?} is not a descriptor"))?;
    // SAFETY: F_GETFD only inspects it.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        anyhow::bail!("{HANDOVER_ENV}={fd}: no such open descriptor");
    }
    // SAFETY: open (checked), and named to this image alone.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut text = Vec::new();
    file.read_to_end(&mut text)
        .with_context(|| format!("read the handover record ({HANDOVER_ENV}={fd})"))?;
    let record = serde_json::from_slice(&text).context("the handover record is not valid")?;
    Ok(Some(record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn the_start_path_is_argv0_as_named() {
        let os = |s: &str| OsString::from(s);
        assert_eq!(
            start_path_of(&os("/usr/local/bin/forwarder"), None, None),
            Some(PathBuf::from("/usr/local/bin/forwarder"))
        );
        assert_eq!(
            start_path_of(&os("bin/forwarder"), Some(Path::new("/opt")), None),
            Some(PathBuf::from("/opt/bin/forwarder"))
        );
        let dir = std::env::temp_dir().join(format!("forwarder-path-test-{}", std::process::id()));
        let (empty, full) = (dir.join("empty"), dir.join("full"));
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::create_dir_all(&full).unwrap();
        let bin = full.join("forwarder");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        let path = std::env::join_paths([&empty, &full]).unwrap();
        assert_eq!(
            start_path_of(&os("forwarder"), None, Some(&path)),
            None,
            "not executable"
        );
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert_eq!(
            start_path_of(&os("forwarder"), None, Some(&path)),
            Some(bin)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn cloexec(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only inspects it.
        unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    #[test]
    fn a_failed_exec_leaves_everything_as_it_was() {
        let (read, _write) = std::io::pipe().unwrap();
        let fd = read.as_raw_fd();
        assert!(cloexec(fd));
        let record = Record {
            control: Some(fd),
            requester: None,
            relay: RelayRecord::default(),
            steer: None,
            frozen_at_ms: 0,
            from_version: "test".into(),
            containers: Vec::new(),
            kernel_path: false,
            metrics: None,
            health: Vec::new(),
            fallback: None,
            failed: None,
        };
        let why = exec(Path::new("/nonexistent/forwarder"), &record);
        assert!(
            why.starts_with("cannot execute /nonexistent/forwarder: No such file"),
            "{why}"
        );
        assert!(cloexec(fd), "close-on-exec again");
        // SAFETY: reads this thread's mask into a zeroed set.
        let blocked = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
            libc::sigismember(&set, libc::SIGTERM) == 1
        };
        assert!(!blocked, "the signals are unblocked again");
    }

    #[test]
    fn the_record_round_trips_and_names_every_descriptor() {
        use crate::relay::gate::*;
        let addr: std::net::SocketAddr = "127.0.0.1:7".parse().unwrap();
        let addrs = FlowAddrs {
            peer: addr,
            local: addr,
            client: addr,
            destination: addr,
        };
        let record = Record {
            control: Some(3),
            requester: Some(4),
            relay: RelayRecord {
                listeners: vec![ListenerRecord {
                    protocol: "tcp".into(),
                    bind: addr,
                    fd: 5,
                    counters: CounterValues {
                        bytes_to_backend: 9,
                        ..CounterValues::default()
                    },
                }],
                tcp: vec![TcpPairRecord {
                    bind: addr,
                    client_fd: 6,
                    backend_fd: 7,
                    up_pipe: Some((8, 9)),
                    down_pipe: None,
                    up_done: true,
                    down_done: false,
                    addrs,
                    idle_ms: 12,
                    retiring: true,
                }],
                udp: vec![UdpSessionRecord {
                    bind: addr,
                    upstream_fd: 10,
                    toward_client_fd: Some(14),
                    port: 7,
                    client: addr,
                    source: Some(SourceRecord::V4 {
                        addr: [1, 2, 3, 4].into(),
                        spec_dst: [1, 2, 3, 4].into(),
                    }),
                    backend: 1,
                    answered: true,
                    header: vec![1, 2],
                    addrs,
                    idle_ms: 3,
                }],
                retiring: vec![RetiringRecord {
                    alias: "gone".into(),
                    protocol: "udp".into(),
                    bind: addr,
                    port_count: 1000,
                    many_to_one: true,
                    backends: vec![(addr, 2)],
                    timeouts_ms: [1, 2, 3, 4, 5, 6],
                    counters: CounterValues::default(),
                }],
            },
            steer: Some(crate::kernel::SteerRecord {
                link: 11,
                sockets: 12,
                ranges: 13,
            }),
            frozen_at_ms: 1,
            from_version: "x".into(),
            containers: vec![crate::config::Container {
                id: "c0ffee".into(),
                name: "turn".into(),
                labels: [("proxy.aliases".to_owned(), "turn".to_owned())].into(),
                networks: [("bridge".to_owned(), [172, 17, 0, 2].into())].into(),
                udp_only_ports: vec![3478],
            }],
            metrics: Some(15),
            health: vec![crate::health::HealthRecord {
                alias: "turn".into(),
                protocol: "tcp".into(),
                backend: addr,
                healthy: false,
                passes: 0,
                failures: 3,
                last_change_ms: Some(5),
                last_failure: Some("connect: refused".into()),
            }],
            kernel_path: true,
            fallback: Some(Fallback {
                exe: 16,
                argv: vec![b"forwarder".to_vec(), b"run".to_vec()],
                env: vec![b"RUST_LOG=info".to_vec()],
            }),
            failed: Some("it panicked".into()),
        };
        let text = serde_json::to_vec(&record).unwrap();
        let back: Record = serde_json::from_slice(&text).unwrap();
        assert_eq!(back, record);
        let mut fds = back.fds();
        fds.sort();
        assert_eq!(fds, (3..=16).collect::<Vec<_>>());
        let mut copy = back.clone();
        let renumbered: Vec<RawFd> = copy.fds_mut().into_iter().map(|fd| *fd).collect();
        assert_eq!(
            renumbered,
            back.fds(),
            "fds_mut names the same, in the same order"
        );
        // A record of an image before these fields still reads.
        let mut old = serde_json::to_value(&record).unwrap();
        for field in [
            "containers",
            "metrics",
            "health",
            "kernel_path",
            "fallback",
            "failed",
        ] {
            old.as_object_mut().unwrap().remove(field);
        }
        let back: Record = serde_json::from_value(old).unwrap();
        assert!(back.containers.is_empty() && back.metrics.is_none() && back.health.is_empty());
        assert!(back.fallback.is_none() && back.failed.is_none());
        // Without a word of its kernel path, a new image that cannot start
        // one runs on without it, as before.
        assert!(!back.kernel_path);
    }

    fn same_file(a: RawFd, b: RawFd) -> bool {
        // SAFETY: fstat into zeroed structs.
        unsafe {
            let (mut x, mut y): (libc::stat, libc::stat) = (std::mem::zeroed(), std::mem::zeroed());
            libc::fstat(a, &mut x) == 0
                && libc::fstat(b, &mut y) == 0
                && (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)
        }
    }

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only inspects it.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn the_way_back_holds_a_duplicate_of_every_descriptor_until_disarmed() {
        let (control, metrics) = std::io::pipe().unwrap();
        let (listener, _w) = std::io::pipe().unwrap();
        // SAFETY: a valid path.
        let exe = unsafe { libc::open(c"/proc/self/exe".as_ptr(), libc::O_PATH) };
        assert!(exe >= 0);
        let mut relay = RelayRecord::default();
        relay.listeners.push(crate::relay::gate::ListenerRecord {
            protocol: "tcp".into(),
            bind: "127.0.0.1:7".parse().unwrap(),
            fd: listener.as_raw_fd(),
            counters: Default::default(),
        });
        let record = Record {
            control: Some(control.as_raw_fd()),
            requester: None,
            relay,
            steer: None,
            frozen_at_ms: 0,
            from_version: "test".into(),
            containers: Vec::new(),
            kernel_path: false,
            metrics: Some(metrics.as_raw_fd()),
            health: Vec::new(),
            fallback: Some(Fallback {
                exe,
                argv: Vec::new(),
                env: Vec::new(),
            }),
            failed: None,
        };
        for fd in record.fds() {
            set_cloexec(fd, false); // as the exec left them
        }
        assert!(arm(&record).unwrap());
        assert!(armed());
        let kept = ARMED.lock().unwrap().as_ref().unwrap().record.clone();
        let dups = kept.fds();
        assert_eq!(dups.len(), 4);
        for (&was, &dup) in record.fds().iter().zip(&dups) {
            assert_ne!(was, dup);
            assert!(cloexec(dup), "the reserve is close-on-exec");
            if Some(was) == record.fallback.as_ref().map(|f| f.exe) {
                assert!(
                    !is_open(was),
                    "the original of the binary's descriptor is closed"
                );
            } else {
                assert!(same_file(was, dup) && cloexec(was));
            }
        }
        // The relay frozen again: its record replaces the one read at start.
        let (again, _w2) = std::io::pipe().unwrap();
        let mut relay = kept.relay.clone();
        relay.listeners[0].fd = again.as_raw_fd();
        relay_frozen(relay).unwrap();
        let now = ARMED.lock().unwrap().as_ref().unwrap().record.clone();
        let fd = now.relay.listeners[0].fd;
        assert!(fd != again.as_raw_fd() && same_file(fd, again.as_raw_fd()));
        assert_eq!(now.control, kept.control);
        disarm();
        assert!(!armed());
        for dup in dups.into_iter().chain([fd]) {
            assert!(!is_open(dup), "descriptor {dup} closed with the way back");
        }
        // A record that says a start failed has no way back.
        let back = Record {
            failed: Some("x".into()),
            fallback: None,
            ..record
        };
        assert!(!arm(&back).unwrap());
    }
}
