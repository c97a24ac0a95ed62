//! Running code in namespaces, the daemon in the forwarder namespace, and
//! reading what the kernel has attached.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType};

use crate::common::{self, ChildGuard, Netns, Topology};

/// Every wait in these tests gives up after this, to fail rather than hang.
pub const WAIT: Duration = Duration::from_secs(20);

fn enter(ns_name: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{ns_name}"))
        .unwrap_or_else(|e| panic!("open namespace {ns_name}: {e}"));
    // SAFETY: setns on this thread only, with a namespace descriptor.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Runs `f` on a thread that lives in `ns`; threads it starts (a tokio
/// runtime's workers) live there too.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&ns.name);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Starts a long-lived thread in `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let name = ns.name.clone();
    std::thread::spawn(move || {
        enter(&name);
        f()
    })
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The kernel path needs IPv4 forwarding on the interfaces it serves
/// (bpf_fib_lookup refuses to route otherwise).
pub fn forwarding_on(topo: &Topology) {
    topo.forwarder.sysctl("net.ipv4.ip_forward", "1");
}

/// What is attached to one interface, as the kernel reports it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub xdp_prog: Option<u32>,
    pub tcx_progs: Vec<u32>,
    pub tc_filters: String,
    pub clsact: bool,
    /// The same on the egress hook.
    pub tcx_egress_progs: Vec<u32>,
    pub tc_egress_filters: String,
}

impl Seen {
    pub fn nothing(&self) -> bool {
        self.xdp_prog.is_none()
            && self.tcx_progs.is_empty()
            && !self.tc_filters.contains("forwarder")
            && !self.clsact
            && self.tcx_egress_progs.is_empty()
            && !self.tc_egress_filters.contains("forwarder")
    }
}

pub fn seen(ns: &Netns, interface: &str) -> Seen {
    let link = ns.exec("ip", &["-d", "-j", "link", "show", "dev", interface]);
    let link: serde_json::Value = serde_json::from_slice(&link.stdout).unwrap();
    let xdp_prog = link[0]["xdp"]["prog"]["id"].as_u64().map(|id| id as u32);
    let tcx = |hook| {
        in_netns(ns, || {
            SchedClassifier::query_tcx(interface, hook)
                .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
                .unwrap_or_default()
        })
    };
    let filters = |hook| {
        String::from_utf8_lossy(
            &ns.exec("tc", &["filter", "show", "dev", interface, hook])
                .stdout,
        )
        .into_owned()
    };
    let (tcx_progs, tcx_egress_progs) = (tcx(TcAttachType::Ingress), tcx(TcAttachType::Egress));
    let (tc_filters, tc_egress_filters) = (filters("ingress"), filters("egress"));
    let qdiscs = ns.exec("tc", &["qdisc", "show", "dev", interface]);
    let clsact = String::from_utf8_lossy(&qdiscs.stdout).contains("clsact");
    Seen {
        xdp_prog,
        tcx_progs,
        tc_filters,
        clsact,
        tcx_egress_progs,
        tc_egress_filters,
    }
}

/// Whether the program `id` is still loaded, asked of the kernel
/// (`BPF_PROG_GET_FD_BY_ID`): ENOENT is "unloaded", any other failure
/// fails the test rather than pass for "unloaded".
pub fn program_loaded(id: u32) -> bool {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    // prog_id, next_id, open_flags of `union bpf_attr`.
    let attr: [u32; 3] = [id, 0, 0];
    // SAFETY: the attr is a live buffer of the size given; a returned
    // descriptor is closed at once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor this call owns.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    let err = std::io::Error::last_os_error();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOENT),
        "cannot ask whether BPF program {id} is loaded: {err}"
    );
    false
}

pub fn reserved_ports(ns: &Netns) -> String {
    let out = ns.exec("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `forwarder run` in the forwarder namespace, on a rule file of its own.
pub struct Daemon {
    child: Option<ChildGuard>,
    /// The namespace it runs in, for `forwarder cleanup` after a kill.
    netns: String,
    dir: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon and waits until it answers `status`.
    pub fn start(ns: &Netns, name: &str, yaml: &str) -> Daemon {
        Daemon::start_logging(ns, name, yaml, "info")
    }

    /// [`Daemon::start`] with `RUST_LOG=rust_log`.
    pub fn start_logging(ns: &Netns, name: &str, yaml: &str, rust_log: &str) -> Daemon {
        Daemon::start_with(ns, name, yaml, rust_log, |_| {})
    }

    /// [`Daemon::start_logging`], with `tweak` applied to the command last
    /// (more arguments, a `pre_exec`).
    pub fn start_with(
        ns: &Netns,
        name: &str,
        yaml: &str,
        rust_log: &str,
        tweak: impl FnOnce(&mut Command),
    ) -> Daemon {
        let cmd = ns.command(common::forwarder_bin());
        Daemon::start_in(ns, cmd, name, yaml, rust_log, tweak)
    }

    /// [`Daemon::start_with`] with the binary at `bin` (which an upgrade
    /// test replaces).
    pub fn start_from_with(
        ns: &Netns,
        name: &str,
        yaml: &str,
        bin: &std::path::Path,
        rust_log: &str,
        tweak: impl FnOnce(&mut Command),
    ) -> Daemon {
        let cmd = ns.command(bin.to_str().expect("a UTF-8 path"));
        Daemon::start_in(ns, cmd, name, yaml, rust_log, tweak)
    }

    /// [`Daemon::start`] in the host's mount namespace, where its bpffs
    /// pins outlive it (crash and adoption tests).
    pub fn start_pinning(ns: &Netns, name: &str, yaml: &str) -> Daemon {
        let cmd = ns.nsenter(common::forwarder_bin());
        Daemon::start_in(ns, cmd, name, yaml, "info", |_| {})
    }

    /// [`Daemon::start_pinning`] with the binary at `bin` (which an
    /// upgrade test replaces).
    pub fn start_pinning_from(ns: &Netns, name: &str, yaml: &str, bin: &std::path::Path) -> Daemon {
        let cmd = ns.nsenter(bin.to_str().expect("a UTF-8 path"));
        Daemon::start_in(ns, cmd, name, yaml, "info", |_| {})
    }

    /// The daemon's directory, removed on drop.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    fn start_in(
        ns: &Netns,
        mut cmd: Command,
        name: &str,
        yaml: &str,
        rust_log: &str,
        tweak: impl FnOnce(&mut Command),
    ) -> Daemon {
        let dir = std::env::temp_dir().join(format!("fwdt-{}-kp-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("forwarder.yaml");
        std::fs::write(&config, yaml).unwrap();
        let control = dir.join("control.sock");
        let log = dir.join("daemon.log");
        cmd.arg("run")
            .arg("-c")
            .arg(&config)
            .arg("--control")
            .arg(&control)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        tweak(&mut cmd);
        let mut daemon = Daemon {
            child: Some(ChildGuard::spawn(&mut cmd)),
            netns: ns.name.clone(),
            dir,
            control,
            log,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if daemon.query().is_some() {
                return daemon;
            }
            if let Some(status) = daemon.child.as_mut().unwrap().child.try_wait().unwrap() {
                panic!("the daemon exited ({status}):\n{}", daemon.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer in {WAIT:?}:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn query(&self) -> Option<serde_json::Value> {
        let out = Command::new(common::forwarder_bin())
            .args(["status", "--json", "--control"])
            .arg(&self.control)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The status document (`forwarder status --json`).
    pub fn status(&self) -> serde_json::Value {
        self.query()
            .unwrap_or_else(|| panic!("no status:\n{}", self.log_text()))
    }

    /// `forwarder reload --control PATH`, within [`WAIT`].
    pub fn reload(&self) -> std::process::Output {
        common::output_within(
            Command::new(common::forwarder_bin())
                .arg("reload")
                .arg("--control")
                .arg(&self.control),
            WAIT,
        )
    }

    /// The daemon's rule file, to rewrite before a reload.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("forwarder.yaml")
    }

    pub fn control_path(&self) -> &std::path::Path {
        &self.control
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        self.child
            .as_ref()
            .expect("running")
            .signal(sig)
            .expect("signal the daemon");
    }

    /// The daemon's process id (`ip netns exec` runs it in its own place).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash; returns its log. What it leaves stays (until
    /// drop, which runs `forwarder cleanup`).
    pub fn kill(&mut self) -> String {
        let guard = self.child.as_mut().expect("running");
        guard.signal(libc::SIGKILL).unwrap();
        let _ = guard.child.wait();
        self.log_text()
    }

    /// SIGTERM, and the daemon must exit cleanly; returns its log.
    pub fn stop(self) -> String {
        self.signal(libc::SIGTERM);
        self.wait_for_exit()
    }

    /// Waits for the daemon to exit, which it must do cleanly within
    /// [`WAIT`]; returns its log.
    pub fn wait_for_exit(mut self) -> String {
        let mut guard = self.child.take().unwrap();
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = guard.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop in {WAIT:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log_text();
        assert!(status.success(), "the daemon failed ({status}):\n{log}");
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let killed = self.child.is_some();
        drop(self.child.take());
        if killed {
            // Killed, not stopped: what it left on the host goes, as an
            // operator's `forwarder cleanup` would take it.
            let _ = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.netns))
                .arg(common::forwarder_bin())
                .arg("cleanup")
                .arg("--control")
                .arg(&self.control)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The kernel counters of the rule `alias`/`protocol` in a status document.
pub fn kernel_rule<'a>(
    status: &'a serde_json::Value,
    alias: &str,
    protocol: &str,
) -> &'a serde_json::Value {
    find_rule(&status["kernel"]["rules"], alias, protocol)
}

/// The relay counters of the rule `alias`/`protocol` in a status document.
pub fn relay_rule<'a>(
    status: &'a serde_json::Value,
    alias: &str,
    protocol: &str,
) -> &'a serde_json::Value {
    find_rule(&status["relay"], alias, protocol)
}

fn find_rule<'a>(
    rules: &'a serde_json::Value,
    alias: &str,
    protocol: &str,
) -> &'a serde_json::Value {
    rules
        .as_array()
        .and_then(|rules| {
            rules
                .iter()
                .find(|r| r["alias"] == alias && r["protocol"] == protocol)
        })
        .unwrap_or_else(|| panic!("no rule {alias}/{protocol} in {rules}"))
}

pub fn counter(rule: &serde_json::Value, name: &str) -> u64 {
    rule[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {rule}"))
}

/// A rule's non-zero reasons of one kind in a status document
/// (`fallbacks`, `drops` or `xdp_passes`), as `name=count` pairs.
pub fn reasons(rule: &serde_json::Value, kind: &str) -> Vec<(String, u64)> {
    let map = rule[kind]
        .as_object()
        .unwrap_or_else(|| panic!("no reasons {kind} in {rule}"));
    map.iter()
        .map(|(name, n)| (name.clone(), n.as_u64().expect("a count")))
        .collect()
}

/// `[(name, n)]` as [`reasons`] gives it, for comparing.
pub fn only(name: &str, n: u64) -> Vec<(String, u64)> {
    vec![(name.to_owned(), n)]
}

/// The interface counters of `name` in a status document.
pub fn interface<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["kernel"]["interfaces"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no interface {name} in {status}"))
}
