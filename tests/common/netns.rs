//! Network namespaces, veth links and processes that are always cleaned up.
//! Shared by the integration tests and `cargo xtask bench`.
//!
//! Everything here is removed by `Drop`, so a failing or panicking test
//! leaves nothing behind. Names start with `fwdt-` and carry the test
//! process id, so leftovers of a killed run are found and removed too.
#![allow(dead_code)]

use std::io;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

const PREFIX: &str = "fwdt-";

/// True when the test may touch namespaces and BPF. Without root the test
/// is skipped with a reason, except under `CI=true`, where that fails.
pub fn require_root(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        remove_stale_namespaces();
        return true;
    }
    skip(test, "root (network namespaces and BPF)")
}

/// True when `tool` (what `cargo xtask setup` installs, and for what) is
/// present; otherwise the test is skipped with that reason, except under
/// `CI=true`, where that fails.
pub fn require_tool(test: &str, tool: &str, present: bool) -> bool {
    present || skip(test, &format!("{tool} (`cargo xtask setup` installs it)"))
}

/// Skips `test`, which needs what it lacks, or fails it under `CI=true`.
fn skip(test: &str, needs: &str) -> bool {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs {needs}, and CI=true forbids skipping it");
    }
    eprintln!("SKIPPED {test}: needs {needs}");
    record_skip(test);
    false
}

/// Tells `cargo xtask test` of a skipped test, which libtest would count
/// as passed: one line per test in the file `FORWARDER_TEST_SKIPS` names.
fn record_skip(test: &str) {
    use std::io::Write;
    let Some(path) = std::env::var_os("FORWARDER_TEST_SKIPS") else {
        return;
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path);
    if let Ok(mut file) = file {
        let _ = writeln!(file, "{test}");
    }
}

/// Runs a command and fails the test, with its output, if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

/// Namespaces of earlier runs whose process is gone, and what still runs
/// in them.
fn remove_stale_namespaces() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
            let alive = pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
            if !alive {
                kill_all_inside(name);
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    });
}

/// A network namespace, deleted on drop, with `lo` up.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Netns {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PREFIX}{}-{}-{role}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// A command in this network namespace that keeps the host's mount
    /// namespace (`ip netns exec` gives it a private one, where bpffs pins
    /// vanish with the process).
    pub fn nsenter(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs a command inside and fails the test if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        run(self.command(program).args(args))
    }

    /// Starts a process inside; it is killed when the guard drops.
    pub fn spawn(&self, program: &str, args: &[&str]) -> ChildGuard {
        ChildGuard::spawn(self.command(program).args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")]);
    }
}

/// SIGKILL to every process in the namespace `name`.
fn kill_all_inside(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs inside, so nothing outlives the test.
        kill_all_inside(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A child process, killed and reaped on drop.
pub struct ChildGuard {
    pub child: Child,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        ChildGuard { child }
    }

    /// Sends a signal, e.g. `libc::SIGTERM`.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        if unsafe { libc::kill(self.child.id() as i32, sig) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A veth pair between two namespaces, each end with an address in a /24.
pub struct Link {
    pub a_if: String,
    pub b_if: String,
    pub a_addr: Ipv4Addr,
    pub b_addr: Ipv4Addr,
}

/// Connects `a` and `b` with a veth pair in 198.18.`net`.0/24 (RFC 2544's
/// benchmarking range; it exists only inside these namespaces). `a` gets
/// .1, `b` gets .2.
pub fn veth(a: &Netns, b: &Netns, net: u8) -> Link {
    let a_if = format!("veth{net}a");
    let b_if = format!("veth{net}b");
    let a_addr = Ipv4Addr::new(198, 18, net, 1);
    let b_addr = Ipv4Addr::new(198, 18, net, 2);
    a.ip(&[
        "link", "add", &a_if, "type", "veth", "peer", "name", &b_if, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", &format!("{a_addr}/24"), "dev", &a_if]);
    b.ip(&["addr", "add", &format!("{b_addr}/24"), "dev", &b_if]);
    a.ip(&["link", "set", &a_if, "up"]);
    b.ip(&["link", "set", &b_if, "up"]);
    Link {
        a_if,
        b_if,
        a_addr,
        b_addr,
    }
}

/// client <-> forwarder <-> backend, the topology of the tests and the bench.
/// client 198.18.1.2, forwarder 198.18.1.1 / 198.18.2.1, backend 198.18.2.2.
/// The client and the backend route everything through the forwarder,
/// which forwards between them (as a router would) only if told to.
pub struct Topology {
    pub client: Netns,
    pub forwarder: Netns,
    pub backend: Netns,
    pub client_link: Link,
    pub backend_link: Link,
}

impl Topology {
    pub fn new() -> Topology {
        let client = Netns::new("client");
        let forwarder = Netns::new("fwd");
        let backend = Netns::new("backend");
        let client_link = veth(&forwarder, &client, 1);
        let backend_link = veth(&forwarder, &backend, 2);
        client.ip(&[
            "route",
            "add",
            "default",
            "via",
            &client_link.a_addr.to_string(),
        ]);
        backend.ip(&[
            "route",
            "add",
            "default",
            "via",
            &backend_link.a_addr.to_string(),
        ]);
        Topology {
            client,
            forwarder,
            backend,
            client_link,
            backend_link,
        }
    }

    /// GRO on at the client's and the backend's ends of the links. On veth
    /// that also turns NAPI on, without which frames an XDP program in the
    /// forwarder redirects into a link are dropped (unless the far end has
    /// an XDP program of its own). A NIC needs no such step. Needs ethtool.
    ///
    /// Also checksum offload off there, so that the forwarder gets complete
    /// checksums, as from a NIC: XDP leaves frames with only the
    /// pseudo-header sum (CHECKSUM_PARTIAL) to TC.
    pub fn accept_xdp_redirects(&self) {
        let client_if = self.client_link.b_if.as_str();
        let backend_if = self.backend_link.b_if.as_str();
        for (ns, i) in [(&self.client, client_if), (&self.backend, backend_if)] {
            ns.exec("ethtool", &["-K", i, "gro", "on"]);
            ns.exec("ethtool", &["-K", i, "tx", "off"]);
        }
    }

    /// The forwarder's address as the client sees it.
    pub fn forwarder_addr(&self) -> Ipv4Addr {
        self.client_link.a_addr
    }

    pub fn backend_addr(&self) -> Ipv4Addr {
        self.backend_link.b_addr
    }
}

/// Runs `cmd` to completion, killing it and failing the test if it takes
/// longer than `limit` (say, a daemon that should have exited but serves on).
pub fn output_within(cmd: &mut Command, limit: std::time::Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("collect the output of {cmd:?}: {e}")),
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = waiter.join();
            panic!("{cmd:?} still runs after {limit:?}");
        }
    }
}
