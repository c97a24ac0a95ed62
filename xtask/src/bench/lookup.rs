//! `cargo xtask bench --lookup`: what the kernel path's rule lookup costs a
//! packet with 10 rules and with 10,000, in one run.
//!
//! First, per packet, with `BPF_PROG_TEST_RUN`: the unit test
//! `kernel::testrun::lookup_cost` loads the real TC program, fills the rule
//! maps with each table and runs new UDP flows spread over every rule, then
//! one more packet of each; the kernel reports each run's nanoseconds.
//! Then, as issue 14 words it, the UDP packet rate through the kernel path
//! in namespaces: the daemon with 10 and with 10,000 rules, 2,048 flows
//! spread over the rules, each round of both tables in fresh namespaces.
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::datagrams::spawn_in;
use super::forwarder::{kernel_path_off, query, relay_flows};
use super::lab::Lab;
use super::netns::Netns;
use super::pin::{self, Side};
use super::procs::{self, Proc};
use super::{scale, stats};
use crate::build;

/// The rule tables of the packet-rate runs.
const SIZES: [u32; 2] = [10, 10_000];
/// Sockets of the sender; each sends to [`PER_SOCKET`] rule ports.
const SOCKETS: usize = 512;
const PER_SOCKET: usize = 4;
/// Flows of every packet-rate run, whatever the table.
const FLOWS: usize = SOCKETS * PER_SOCKET;
/// Datagram payload, as iperf3's `-l 64` in the other UDP figures.
const PAYLOAD: usize = 64;
/// New flows of each test-run table and round.
const TEST_RUN_FLOWS: u32 = 4_000;
const TEST_NAME: &str = "kernel::testrun::lookup_cost::\
    new_flows_spread_over_ten_thousand_rules_or_a_range_each_find_their_rule";

/// One table's figures in one round of the test runs.
#[derive(Debug, PartialEq)]
struct Cost {
    table: String,
    new_ns: f64,
    established_ns: f64,
}

fn parse_costs(text: &str) -> Result<Vec<Cost>> {
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).with_context(|| format!("`{line}`"))?;
            let num = |k: &str| {
                v[k].as_f64()
                    .with_context(|| format!("no `{k}` in `{line}`"))
            };
            Ok(Cost {
                table: v["table"].as_str().context("no table")?.to_string(),
                new_ns: num("new_ns")?,
                established_ns: num("established_ns")?,
            })
        })
        .collect()
}

/// Runs the unit test with the bench's flows and rounds; its figures.
fn test_runs(dir: &Path, rounds: u32) -> Result<Vec<Cost>> {
    let object = build::ebpf_object()?;
    let out = dir.join("lookup-cost.jsonl");
    let _ = std::fs::remove_file(&out);
    let mut cmd = build::cargo_with_object(&object);
    cmd.args(["test", "--package", "forwarder-user", "--lib", "--"])
        .args([TEST_NAME, "--exact"])
        .env("FORWARDER_LOOKUP_COST", &out)
        .env("FORWARDER_LOOKUP_FLOWS", TEST_RUN_FLOWS.to_string())
        .env("FORWARDER_LOOKUP_ROUNDS", rounds.to_string());
    crate::cmd::run(&mut cmd)?;
    let text = std::fs::read_to_string(&out)
        .with_context(|| format!("the test wrote no figures to {}", out.display()))?;
    parse_costs(&text)
}

/// The listen ports of the flows: `FLOWS` (socket, port) pairs, each
/// socket's [`PER_SOCKET`] ports spread evenly over the table's UDP rules.
fn destinations(ports: &[u16]) -> Vec<[u16; PER_SOCKET]> {
    let n = ports.len();
    (0..SOCKETS)
        .map(|s| {
            std::array::from_fn(|j| {
                let i = s * PER_SOCKET + j;
                if n >= FLOWS {
                    ports[i * n / FLOWS]
                } else {
                    ports[i % n]
                }
            })
        })
        .collect()
}

/// Kernel-path counters summed over the status's rules: (flows, packets_fwd).
fn kernel_totals(status: &Value) -> Result<(u64, u64)> {
    let rules = status["kernel"]["rules"]
        .as_array()
        .context("the status has no kernel.rules")?;
    let sum = |k: &str| -> Result<u64> {
        rules
            .iter()
            .map(|r| {
                r[k].as_u64()
                    .with_context(|| format!("a kernel rule without `{k}`"))
            })
            .sum()
    };
    Ok((sum("flows")?, sum("packets_fwd")?))
}

fn pin_to(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: a zeroed cpu_set_t is a valid empty set; this thread only.
    unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Sends from every socket to each of its ports with one `sendmmsg`, in
/// turn, `rounds` times or until `until`; returns the datagrams sent.
fn flood(
    sockets: &[UdpSocket],
    to: &[[SocketAddr; PER_SOCKET]],
    rounds: Option<u64>,
    until: Instant,
) -> u64 {
    let payload = [0x5au8; PAYLOAD];
    let addrs: Vec<[libc::sockaddr_in; PER_SOCKET]> = to
        .iter()
        .map(|ports| {
            ports.map(|a| {
                let SocketAddr::V4(a) = a else {
                    unreachable!("IPv4 only")
                };
                // SAFETY: sockaddr_in is plain data.
                let mut sa: libc::sockaddr_in = unsafe { zeroed() };
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_port = a.port().to_be();
                sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                sa
            })
        })
        .collect();
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: PAYLOAD,
    };
    let mut sent = 0u64;
    let mut round = 0u64;
    while rounds.is_none_or(|r| round < r) && Instant::now() < until {
        for (socket, addrs) in sockets.iter().zip(&addrs) {
            // SAFETY: mmsghdr is plain data; every pointer below is live
            // for the call.
            let mut msgs: [libc::mmsghdr; PER_SOCKET] = unsafe { zeroed() };
            for (m, a) in msgs.iter_mut().zip(addrs) {
                m.msg_hdr.msg_name = a as *const _ as *mut libc::c_void;
                m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
                m.msg_hdr.msg_iov = &mut iov;
                m.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: see above.
            let n = unsafe {
                libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), PER_SOCKET as u32, 0)
            };
            sent += n.max(0) as u64;
        }
        round += 1;
    }
    sent
}

/// One table in fresh namespaces: (forwarded kpps, sent kpps).
fn rate(bin: &Path, dir: &Path, total: u32, seconds: u64) -> Result<(f64, f64)> {
    let lab = Lab::new(dir, true)?;
    let topo = &lab.topo;
    let config = dir.join(format!("lookup-{total}.yaml"));
    let socket = dir.join(format!("lookup-{total}.sock"));
    let _ = std::fs::remove_file(&socket);
    std::fs::write(&config, scale::rules(topo.backend_addr(), total))?;
    let mut cmd = topo.forwarder.command(&bin.display().to_string());
    cmd.arg("run")
        .arg("-c")
        .arg(&config)
        .arg("--control")
        .arg(&socket);
    let mut daemon = Proc::spawn(
        &mut cmd,
        "forwarder",
        &dir.join(format!("lookup-{total}.log")),
    )?;
    let started = Instant::now();
    let status = loop {
        daemon.check_alive()?;
        if let Ok(status) = query(&socket) {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the daemon did not answer in 120 s");
        }
        procs::sleep(Duration::from_millis(20))?;
    };
    if let Some(off) = kernel_path_off(&status) {
        bail!("{total} rules: {off}");
    }
    let listen = topo.forwarder_addr();
    let to: Vec<[SocketAddr; PER_SOCKET]> = destinations(&scale::udp_filler_ports(total))
        .into_iter()
        .map(|ports| ports.map(|p| SocketAddr::from((listen, p))))
        .collect();
    let relayed = relay_flows(&status)?;
    let (flows_before, _) = kernel_totals(&status)?;
    let sender = Sender::start(&topo.client)?;
    // One datagram per flow, paced: every flow opens on the kernel path.
    sender.send(to.clone(), Some(1), Duration::from_secs(30))?;
    procs::sleep(Duration::from_millis(300))?;
    let status = query(&socket)?;
    let (flows, fwd_before) = kernel_totals(&status)?;
    if flows - flows_before != FLOWS as u64 || relay_flows(&status)? != relayed {
        bail!(
            "{total} rules: {} of {FLOWS} flows opened on the kernel path, the relay took {}",
            flows - flows_before,
            relay_flows(&status)? - relayed
        );
    }
    let window = Duration::from_secs(seconds);
    let sent = sender.send(to, None, window)?;
    // Let the queues drain before the counters are read.
    procs::sleep(Duration::from_millis(300))?;
    let status = query(&socket)?;
    let (flows_after, fwd_after) = kernel_totals(&status)?;
    if flows_after != flows || relay_flows(&status)? != relayed {
        bail!("{total} rules: a flow opened during the flood");
    }
    daemon.check_alive()?;
    let secs = window.as_secs_f64();
    Ok((
        (fwd_after - fwd_before) as f64 / secs / 1000.0,
        sent as f64 / secs / 1000.0,
    ))
}

/// The client's sockets, bound once so that every round reuses the flows.
struct Sender {
    sockets: Vec<UdpSocket>,
}

impl Sender {
    fn start(client: &Netns) -> Result<Sender> {
        let sockets = spawn_in(client, || -> Result<Vec<UdpSocket>> {
            (0..SOCKETS)
                .map(|_| Ok(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?))
                .collect()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the socket thread panicked"))???;
        Ok(Sender { sockets })
    }

    /// Sends as [`flood`] on the client's CPU; `Some(1)` paces one round.
    fn send(
        &self,
        to: Vec<[SocketAddr; PER_SOCKET]>,
        rounds: Option<u64>,
        limit: Duration,
    ) -> Result<u64> {
        let sockets: Vec<UdpSocket> = self
            .sockets
            .iter()
            .map(UdpSocket::try_clone)
            .collect::<std::io::Result<_>>()?;
        let worker = std::thread::spawn(move || {
            pin_to(pin::cpu(Side::Client));
            let until = Instant::now() + limit;
            if rounds == Some(1) {
                // Paced, socket by socket, so that no first packet is lost.
                let mut sent = 0;
                for (s, to) in sockets.iter().zip(&to) {
                    sent += flood(
                        std::slice::from_ref(s),
                        std::slice::from_ref(to),
                        Some(1),
                        until,
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
                return sent;
            }
            flood(&sockets, &to, rounds, until)
        });
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))
    }
}

/// `n` with a comma every three digits, as the README writes counts.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn spread(values: &[f64]) -> String {
    let Some(median) = stats::median(values) else {
        return "-".into();
    };
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.len() == 1 {
        return format!("{median:.0}");
    }
    format!("{median:.0} ({min:.0}–{max:.0})")
}

pub fn run(bin: &Path, dir: &Path, seconds: u64, repeat: u32) -> Result<String> {
    eprintln!("bench: lookup, {repeat} round(s) of BPF_PROG_TEST_RUN");
    let costs = test_runs(dir, repeat)?;
    let mut rates: Vec<Vec<(f64, f64)>> = SIZES.iter().map(|_| Vec::new()).collect();
    for round in 1..=repeat {
        for (i, &total) in SIZES.iter().enumerate() {
            eprintln!("bench: [{round}/{repeat}] lookup, UDP rate with {total} rules");
            let r = rate(bin, dir, total, seconds)?;
            eprintln!("  {:.0} kpps forwarded, {:.0} kpps sent", r.0, r.1);
            rates[i].push(r);
        }
    }
    Ok(document(&costs, &rates, seconds, repeat))
}

fn document(costs: &[Cost], rates: &[Vec<(f64, f64)>], seconds: u64, repeat: u32) -> String {
    let mut tables: Vec<&str> = Vec::new();
    for c in costs {
        if !tables.contains(&c.table.as_str()) {
            tables.push(&c.table);
        }
    }
    let mut per_packet = String::from(
        "| table | new flow, ns/packet | established flow, ns/packet |\n|---|---:|---:|\n",
    );
    for t in &tables {
        let of = |f: &dyn Fn(&Cost) -> f64| -> Vec<f64> {
            costs.iter().filter(|c| c.table == *t).map(f).collect()
        };
        per_packet.push_str(&format!(
            "| {t} | {} | {} |\n",
            spread(&of(&|c| c.new_ns)),
            spread(&of(&|c| c.established_ns))
        ));
    }
    let mut rate_table =
        String::from("| rules | forwarded kpps, kernel path | sent kpps |\n|---:|---:|---:|\n");
    for (total, runs) in SIZES.iter().zip(rates) {
        let fwd: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let sent: Vec<f64> = runs.iter().map(|r| r.1).collect();
        rate_table.push_str(&format!(
            "| {} | {} | {} |\n",
            grouped(u64::from(*total)),
            spread(&fwd),
            spread(&sent)
        ));
    }
    let (test_flows, flows) = (grouped(TEST_RUN_FLOWS.into()), grouped(FLOWS as u64));
    format!(
        "## Rule lookup\n\n\
         Per packet, `BPF_PROG_TEST_RUN` of the TC ingress program (each run once, as the \
         kernel timed it): {test_flows} new UDP flows spread evenly over the table's \
         rules (or the range's ports), then one more packet of each; every table to one \
         backend ip:port, so that each fills the SNAT ports alike. The median of the \
         packets of a round; the median of {repeat} round(s), (min–max) of the rounds.\n\n\
         {per_packet}\n\
         UDP through the kernel path in namespaces: the daemon with the `--scale` tables, \
         {flows} flows ({SOCKETS} client sockets × {PER_SOCKET} rule ports, spread evenly \
         over the table's UDP rules) opened one by one, then {PAYLOAD}-byte datagrams from \
         them all as fast as one sender thread goes (`sendmmsg`) for {seconds} s. Forwarded: \
         the kernel rules' `packets_fwd` over the window. A run where a flow opened during \
         the flood or on the relay fails. The veth hands each datagram over within the \
         sender's own system call, so the sender paces at the whole path's cost per packet \
         and the sent and forwarded rates agree. The median of {repeat} run(s) in fresh \
         namespaces, (min–max).\n\n\
         {rate_table}\n\
         \"10,000 rules, flows to 10 of them\" has the big table with the small one's \
         working set: its difference from \"10 rules\" is the table's size alone; that of \
         \"10,000 rules\" from it is what flows over many rules pay for their rules' entries \
         (key, counters, backend) out of the caches. Established flows match conntrack \
         before any rule, so they pay the table only through those caches.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flows_are_distinct_and_spread_over_every_rule() {
        let few: Vec<u16> = (20_000..20_004).collect();
        let d = destinations(&few);
        assert_eq!(d.len(), SOCKETS);
        assert_eq!(d[0], [20_000, 20_001, 20_002, 20_003]);
        assert_eq!(d[SOCKETS - 1], [20_000, 20_001, 20_002, 20_003]);
        let pairs: std::collections::HashSet<_> = (d.iter().enumerate())
            .flat_map(|(s, ports)| ports.iter().map(move |p| (s, *p)))
            .collect();
        assert_eq!(pairs.len(), FLOWS);
        let many: Vec<u16> = (20_000..24_999).collect();
        let flat: Vec<u16> = destinations(&many).into_iter().flatten().collect();
        let distinct: std::collections::HashSet<_> = flat.iter().collect();
        assert_eq!(distinct.len(), FLOWS);
        assert_eq!((flat[0], flat[FLOWS - 1]), (20_000, 24_996));
    }

    #[test]
    fn the_figures_of_each_table_come_together() {
        let text = "{\"table\":\"10 rules\",\"round\":1,\"flows\":4,\"new_ns\":900,\"established_ns\":400}\n\
                    {\"table\":\"10 rules\",\"round\":2,\"flows\":4,\"new_ns\":1000,\"established_ns\":420}\n";
        let costs = parse_costs(text).unwrap();
        assert_eq!(costs.len(), 2);
        assert_eq!(costs[1].new_ns, 1000.0);
        let doc = document(&costs, &[vec![(100.0, 120.0)], vec![]], 5, 2);
        assert!(
            doc.contains("| 10 rules | 950 (900–1000) | 410 (400–420) |"),
            "{doc}"
        );
        assert!(doc.contains("| 10 | 100 | 120 |"), "{doc}");
        assert_eq!(
            [1, 999, 1_000, 10_000, 1_234_567].map(grouped),
            ["1", "999", "1,000", "10,000", "1,234,567"]
        );
        assert!(parse_costs("{\"table\":\"x\"}").is_err());
    }
}
