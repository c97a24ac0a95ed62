//! What is compared: each contender is one entry in [`ALL`]; its setup puts
//! a forwarding of the same ports into the forwarder namespace.
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};

use super::configs::{self, FORWARDS};
use super::forwarder;
use super::lab::{self, Lab};
use super::procs::{self, Proc};

pub enum Setup {
    /// No forwarder: the client targets the backend, the namespace routes.
    Direct,
    Nftables,
    Nginx,
    Haproxy,
    Socat,
    Forwarder(forwarder::Mode),
}

pub struct Contender {
    /// Its name for `--only`.
    pub name: &'static str,
    /// Its row in the report.
    pub label: &'static str,
    pub setup: Setup,
    /// Why it carries no UDP, if it does not.
    pub no_udp: Option<&'static str>,
    /// Whether the forwarder namespace routes between its links.
    pub ip_forward: bool,
    /// Debian packages it needs besides the traffic tools.
    pub packages: &'static [&'static str],
}

pub const ALL: &[Contender] = &[
    Contender {
        name: "direct",
        label: "direct routing",
        setup: Setup::Direct,
        no_udp: None,
        ip_forward: true,
        packages: &[],
    },
    Contender {
        name: "nftables",
        label: "nftables DNAT",
        setup: Setup::Nftables,
        no_udp: None,
        ip_forward: true,
        packages: &["nftables"],
    },
    Contender {
        name: "nginx",
        label: "nginx stream",
        setup: Setup::Nginx,
        no_udp: None,
        ip_forward: false,
        packages: &["nginx", "libnginx-mod-stream"],
    },
    Contender {
        name: "haproxy",
        label: "HAProxy",
        setup: Setup::Haproxy,
        no_udp: Some("HAProxy has no UDP proxy"),
        ip_forward: false,
        packages: &["haproxy"],
    },
    Contender {
        name: "socat",
        label: "socat",
        setup: Setup::Socat,
        no_udp: None,
        ip_forward: false,
        packages: &["socat"],
    },
    Contender {
        name: "relay",
        label: "forwarder relay-only",
        setup: Setup::Forwarder(forwarder::Mode {
            path: "relay",
            relay_only: true,
            kernel: false,
        }),
        no_udp: None,
        ip_forward: false,
        packages: &[],
    },
    // The kernel path needs a host that routes (bpf_fib_lookup answers only
    // where forwarding is on); the relay under it does not care.
    Contender {
        name: "tc",
        label: "forwarder TC",
        setup: Setup::Forwarder(forwarder::Mode {
            path: "tc",
            relay_only: false,
            kernel: true,
        }),
        no_udp: None,
        ip_forward: true,
        packages: &[],
    },
    Contender {
        name: "xdp",
        label: "forwarder TC+XDP",
        setup: Setup::Forwarder(forwarder::Mode {
            path: "xdp",
            relay_only: false,
            kernel: true,
        }),
        no_udp: None,
        ip_forward: true,
        packages: &[],
    },
];

impl Contender {
    pub fn is_forwarder(&self) -> bool {
        matches!(self.setup, Setup::Forwarder(_))
    }
}

/// A contender forwarding in a lab; its processes stop on drop.
pub struct Running {
    /// Where the client sends its traffic.
    pub target: Ipv4Addr,
    pub procs: Vec<Proc>,
    /// For a row about the kernel path: how to tell the relay stood in.
    pub kernel_watch: Option<forwarder::KernelWatch>,
}

impl Running {
    /// Fails, saying how, if one of its processes has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }
}

pub enum Started {
    Running(Running),
    /// The row cannot be measured in this build or on this machine.
    Unavailable(String),
}

fn ports(udp: bool) -> Vec<u16> {
    FORWARDS
        .iter()
        .filter(|f| f.udp || !udp)
        .map(|f| f.port)
        .collect()
}

/// Starts `c` in `lab`, its files in `dir`, and waits until it listens.
pub fn start(
    c: &Contender,
    lab: &Lab,
    dir: &Path,
    forwarder_bin: Option<&Path>,
) -> Result<Started> {
    let ns = &lab.topo.forwarder;
    let listen = lab.topo.forwarder_addr();
    let backend = lab.topo.backend_addr();
    let write = |name: &str, text: String| -> Result<std::path::PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    };
    let log = |name: &str| dir.join(format!("{name}.log"));
    let arg = |p: &Path| p.display().to_string();
    let procs = match c.setup {
        Setup::Direct => {
            return Ok(Started::Running(Running {
                target: backend,
                procs: Vec::new(),
                kernel_watch: None,
            }));
        }
        Setup::Nftables => {
            let rules = write("nftables.conf", configs::nftables(listen, backend))?;
            let out = procs::run_bounded(
                ns.command("nft").arg("-f").arg(&rules),
                std::time::Duration::from_secs(10),
            )?;
            if !out.status.success() {
                anyhow::bail!(
                    "nft -f failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Vec::new()
        }
        Setup::Nginx => {
            let conf = write("nginx.conf", configs::nginx(dir, listen, backend))?;
            let args = [
                "-c",
                &arg(&conf),
                "-p",
                &arg(dir),
                "-e",
                &arg(&log("nginx-error")),
            ];
            vec![lab::spawn(
                ns,
                "nginx",
                &args.map(String::from),
                &log("nginx"),
            )?]
        }
        Setup::Haproxy => {
            let conf = write("haproxy.cfg", configs::haproxy(listen, backend))?;
            let args = ["-db", "-f", &arg(&conf)].map(String::from);
            vec![lab::spawn(ns, "haproxy", &args, &log("haproxy"))?]
        }
        Setup::Socat => configs::socat(listen, backend)
            .iter()
            .enumerate()
            .map(|(i, args)| lab::spawn(ns, "socat", args, &log(&format!("socat-{i}"))))
            .collect::<Result<_>>()?,
        Setup::Forwarder(ref mode) => {
            let bin = forwarder_bin.context("the forwarder binary was not built")?;
            return forwarder::start(ns, bin, dir, mode, listen, backend);
        }
    };
    let mut running = Running {
        target: listen,
        procs,
        kernel_watch: None,
    };
    let udp = if c.no_udp.is_some() {
        Vec::new()
    } else {
        ports(true)
    };
    lab::wait_listening(&mut running.procs, &ports(false), &udp)?;
    Ok(Started::Running(running))
}
