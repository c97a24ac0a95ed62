//! One contender's world: a fresh client / forwarder / backend topology with
//! the traffic servers in the backend. Built anew for every contender run,
//! so no rule, sysctl, conntrack entry or TIME_WAIT socket carries over;
//! dropping it stops the servers, then deletes the namespaces (which kills
//! whatever still runs inside).
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::netns::{Netns, Topology};
use super::pin::{self, Side};
use super::procs::{self, Proc};
use super::{connrate, iperf, sockperf};

pub struct Lab {
    // Fields drop in this order: servers first, namespaces last.
    _servers: Vec<Proc>,
    _connect_server: connrate::Server,
    pub topo: Topology,
}

impl Lab {
    /// `ip_forward`: whether the forwarder namespace routes between its links.
    pub fn new(dir: &Path, ip_forward: bool) -> Result<Lab> {
        let topo = Topology::new();
        // For every contender alike, so that the kernel path's XDP
        // redirects arrive as they would on a NIC.
        topo.accept_xdp_redirects();
        topo.forwarder
            .sysctl("net.ipv4.ip_forward", if ip_forward { "1" } else { "0" });
        // Room for the connection test's ports. The forwarder namespace
        // keeps the defaults, as on a fresh host.
        topo.client
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535");
        let backend = topo.backend_addr();
        let ns = &topo.backend;
        let iperf = spawn_server(
            ns,
            "iperf3",
            &iperf::server_args(backend),
            &dir.join("iperf3.log"),
        )?;
        let udp_args = sockperf::server_args(backend, false);
        let sockperf_udp = spawn_server(ns, "sockperf", &udp_args, &dir.join("sockperf-udp.log"))?;
        let tcp_args = sockperf::server_args(backend, true);
        let sockperf_tcp = spawn_server(ns, "sockperf", &tcp_args, &dir.join("sockperf-tcp.log"))?;
        let connect_server = connrate::Server::start(&topo.backend, backend)?;
        let mut servers = vec![iperf, sockperf_udp, sockperf_tcp];
        wait_listening(
            &mut servers,
            &[iperf::PORT, sockperf::PORT],
            &[sockperf::PORT],
        )?;
        Ok(Lab {
            _servers: servers,
            _connect_server: connect_server,
            topo,
        })
    }
}

/// A long-running program in `ns`, its output going to `log`.
pub fn spawn(ns: &Netns, program: &str, args: &[String], log: &Path) -> Result<Proc> {
    let mut cmd = ns.command(program);
    cmd.args(args);
    let name = program.rsplit('/').next().unwrap_or(program);
    Proc::spawn(&mut cmd, name, log)
}

/// A traffic server in the backend, on the backend's CPU.
fn spawn_server(ns: &Netns, program: &str, args: &[String], log: &Path) -> Result<Proc> {
    let mut cmd = pin::command(ns, Side::Backend, program);
    cmd.args(args);
    Proc::spawn(&mut cmd, program, log)
}

/// Ports with a socket in `state` (hex, as in /proc/net/{tcp,udp}: 0A is
/// a TCP listener, 07 an unconnected UDP socket).
pub fn ports_in_state(proc_net: &str, state: &str) -> HashSet<u16> {
    proc_net
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, st) = (fields.get(1)?, fields.get(3)?);
            let port = local.rsplit(':').next()?;
            (*st == state).then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect()
}

/// Waits until TCP listeners and UDP sockets are bound on the given ports
/// in the namespace of `procs` (read through /proc/PID/net, which shows
/// that process's namespace), or fails with the log of one that exited.
pub fn wait_listening(procs: &mut [Proc], tcp: &[u16], udp: &[u16]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        let Some(pid) = procs.first().map(Proc::pid) else {
            return Ok(());
        };
        let read = |file: &str| std::fs::read_to_string(format!("/proc/{pid}/net/{file}"));
        let mut listening = HashSet::new();
        let mut bound = HashSet::new();
        for file in ["tcp", "tcp6"] {
            listening.extend(ports_in_state(&read(file).unwrap_or_default(), "0A"));
        }
        for file in ["udp", "udp6"] {
            bound.extend(ports_in_state(&read(file).unwrap_or_default(), "07"));
        }
        let missing: Vec<String> = (tcp.iter().filter(|p| !listening.contains(p)))
            .map(|p| format!("tcp/{p}"))
            .chain(
                udp.iter()
                    .filter(|p| !bound.contains(p))
                    .map(|p| format!("udp/{p}")),
            )
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing listens on {} after 10 s", missing.join(", "));
        }
        procs::sleep(Duration::from_millis(20))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_listeners_and_unconnected_udp_sockets() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0202A8C6:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
           1: 0202A8C6:1451 0201A8C6:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n\
           2: 0202A8C6:2B67 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0\n";
        assert_eq!(ports_in_state(tcp, "0A"), HashSet::from([5201, 11111]));
        assert_eq!(ports_in_state(tcp, "01"), HashSet::from([5201]));
        let udp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
           5: 00000000000000000000000000000000:2B67 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4 2 0 0\n";
        assert_eq!(ports_in_state(udp6, "07"), HashSet::from([11111]));
        assert!(ports_in_state("", "0A").is_empty());
    }
}
