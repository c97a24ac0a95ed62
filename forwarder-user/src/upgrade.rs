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

use std::ffi::{CString, OsString};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
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
#[derive(Debug, Serialize, Deserialize, PartialEq)]
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
}

impl Record {
    fn fds(&self) -> Vec<RawFd> {
        let mut fds = self.relay.fds();
        fds.extend(self.steer.iter().flat_map(|s| s.fds()));
        fds.extend(self.control);
        fds.extend(self.requester);
        fds.extend(self.metrics);
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

/// Replaces this process with `exe`, handing over `record`. Returns only
/// if that failed, with the reason; everything is as it was then.
pub fn exec(exe: &Path, record: &Record) -> String {
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
    let argv: Result<Vec<CString>, String> =
        std::env::args_os().map(|a| cstring(a.as_bytes())).collect();
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| k != HANDOVER_ENV)
        .collect();
    env.push((HANDOVER_ENV.into(), memfd.as_raw_fd().to_string().into()));
    let envp: Result<Vec<CString>, String> = env
        .iter()
        .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect();
    let (argv, envp, path) = match (argv, envp, cstring(exe.as_os_str().as_bytes())) {
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
    // SAFETY: NUL-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    let e = std::io::Error::last_os_error();
    unblock_signals();
    for &fd in &handed {
        set_cloexec(fd, true);
    }
    format!("cannot execute {}: {e}", exe.display())
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
            metrics: None,
            health: Vec::new(),
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
        };
        let text = serde_json::to_vec(&record).unwrap();
        let back: Record = serde_json::from_slice(&text).unwrap();
        assert_eq!(back, record);
        let mut fds = back.fds();
        fds.sort();
        assert_eq!(fds, (3..=15).collect::<Vec<_>>());
        // A record of an image before these fields still reads.
        let mut old = serde_json::to_value(&record).unwrap();
        for field in ["containers", "metrics", "health"] {
            old.as_object_mut().unwrap().remove(field);
        }
        let back: Record = serde_json::from_value(old).unwrap();
        assert!(back.containers.is_empty() && back.metrics.is_none() && back.health.is_empty());
    }
}
