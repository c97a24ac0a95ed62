//! A Docker Engine of the test's own: `dockerd` in a network namespace the
//! test creates (so docker0, its iptables rules and ip_forward live and die
//! there), with its data, sockets and cgroups under names of the test's.
//! Its image is built locally with `docker import`; nothing is pulled.
//! Drop removes the containers and images, stops dockerd and leaves the
//! host as found.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::{ChildGuard, Netns, run};

pub const IMAGE: &str = "fwdt-local/busybox:test";
const START_WAIT: Duration = Duration::from_secs(60);

/// A UDP echo server for the image (busybox's `nc` has no UDP).
const UDP_ECHO: &str = r#"
fn main() {
    let port = std::env::args().nth(1).expect("usage: udp-echo PORT");
    let socket = std::net::UdpSocket::bind(("0.0.0.0", port.parse::<u16>().expect("port")))
        .expect("bind");
    let mut buf = [0u8; 65536];
    loop {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}
"#;

pub struct DockerEngine {
    pub ns: Netns,
    dir: PathBuf,
    cgroup_parent: String,
    dockerd: Option<ChildGuard>,
}

impl DockerEngine {
    /// Starts dockerd and waits until it answers; panics with what to
    /// install if Docker is missing.
    pub fn start() -> DockerEngine {
        for tool in ["dockerd", "docker", "busybox"] {
            assert!(
                which(tool).is_some(),
                "`{tool}` not found: install docker.io and busybox-static (`cargo xtask setup` does)"
            );
        }
        let ns = Netns::new("docker");
        let dir = std::env::temp_dir().join(format!("{}-dockerd", ns.name));
        std::fs::create_dir_all(&dir).unwrap();
        let mut engine = DockerEngine {
            cgroup_parent: format!("{}-cgroup", ns.name),
            ns,
            dir,
            dockerd: None,
        };
        // nsenter, not `ip netns exec`: dockerd needs the host's /sys (cgroups).
        let mut cmd = engine.ns.nsenter("dockerd");
        cmd.arg("--data-root")
            .arg(engine.dir.join("data"))
            .arg("--exec-root")
            .arg(engine.dir.join("exec"))
            .arg("--pidfile")
            .arg(engine.dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", engine.socket().display()))
            // cgroupfs: a cgroup of our name, also where systemd would
            // want a slice.
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .args(["--storage-driver", "vfs", "--cgroup-parent"])
            .arg(&engine.cgroup_parent)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(engine.dir.join("dockerd.log")).unwrap());
        engine.dockerd = Some(ChildGuard::spawn(&mut cmd));
        let deadline = Instant::now() + START_WAIT;
        while !engine.docker(&["info"]).status.success() {
            if let Some(status) = engine.dockerd.as_mut().unwrap().child.try_wait().unwrap() {
                panic!("dockerd exited ({status}):\n{}", engine.log());
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer in {START_WAIT:?}:\n{}",
                engine.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        engine.import_image();
        engine
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// `docker ARGS` against this engine, whatever its outcome.
    pub fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .arg("--host")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .output()
            .expect("run docker")
    }

    /// `docker ARGS`, which must succeed; returns its stdout, trimmed.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs a detached container; returns its id.
    pub fn run(&self, name: &str, labels: &[(&str, &str)], extra: &[&str], cmd: &str) -> String {
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.into()];
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([IMAGE.into(), "sh".into(), "-c".into(), cmd.into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.docker_ok(&args)
    }

    /// The image: a rootfs of static busybox and a static UDP echo.
    fn import_image(&self) {
        let rootfs = self.dir.join("rootfs");
        let bin = rootfs.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(which("busybox").unwrap(), bin.join("busybox")).unwrap();
        for applet in ["sh", "nc", "cat", "sleep"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        let source = self.dir.join("udp-echo.rs");
        std::fs::write(&source, UDP_ECHO).unwrap();
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        run(Command::new(rustc)
            .args([
                "--edition",
                "2021",
                "-O",
                "-C",
                "target-feature=+crt-static",
                "-o",
            ])
            .arg(bin.join("udp-echo"))
            .arg(&source));
        let archive = self.dir.join("rootfs.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&archive)
            .arg("."));
        self.docker_ok(&["import", &archive.display().to_string(), IMAGE]);
    }
}

impl Drop for DockerEngine {
    fn drop(&mut self) {
        let ids = String::from_utf8_lossy(&self.docker(&["ps", "-aq"]).stdout).to_string();
        for id in ids.split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        let _ = self.docker(&["rmi", "-f", IMAGE]);
        if let Some(mut dockerd) = self.dockerd.take() {
            let _ = dockerd.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while dockerd.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // What dockerd may leave mounted under its roots, deepest first.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        remove_cgroups(&self.cgroup_parent);
    }
}

/// The cgroups dockerd made under `parent`, in every hierarchy (empty once
/// the containers are gone).
fn remove_cgroups(parent: &str) {
    let Ok(out) = Command::new("find")
        .args([
            "/sys/fs/cgroup",
            "-maxdepth",
            "3",
            "-type",
            "d",
            "-name",
            parent,
        ])
        .output()
    else {
        return;
    };
    for dir in String::from_utf8_lossy(&out.stdout).lines() {
        let _ = Command::new("find")
            .args([dir, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
            .stderr(Stdio::null())
            .status();
    }
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}
