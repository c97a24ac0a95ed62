//! The measures, what figures each yields, and the samples of repeated runs.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Result, bail};

use super::netns::Netns;
use super::{connrate, cpu, iperf, procs, sockperf};

/// What `--measures` picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    Tcp,
    Udp,
    Latency,
    Connect,
}

impl Measure {
    pub const ALL: [Measure; 4] = [
        Measure::Tcp,
        Measure::Udp,
        Measure::Latency,
        Measure::Connect,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Measure::Tcp => "tcp",
            Measure::Udp => "udp",
            Measure::Latency => "latency",
            Measure::Connect => "connect",
        }
    }

    pub fn figures(self) -> &'static [Figure] {
        match self {
            Measure::Tcp => &[Figure::TcpGbps, Figure::TcpCpu],
            Measure::Udp => &[Figure::UdpKpps, Figure::UdpCpu],
            Measure::Latency => &[
                Figure::TcpRttMean,
                Figure::TcpRttP99,
                Figure::UdpRttMean,
                Figure::UdpRttP99,
            ],
            Measure::Connect => &[Figure::ConnPerSec],
        }
    }
}

/// One column of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Figure {
    TcpGbps,
    TcpCpu,
    UdpKpps,
    UdpCpu,
    TcpRttMean,
    TcpRttP99,
    UdpRttMean,
    UdpRttP99,
    ConnPerSec,
    RssMib,
}

/// A TCP segment's payload on a 1500-byte MTU (IPv4, TCP timestamps):
/// the unit of "per packet" for TCP, whatever GSO/GRO batch on the way.
pub const TCP_SEGMENT_BYTES: u64 = 1448;

impl Figure {
    pub fn header(self) -> &'static str {
        match self {
            Figure::TcpGbps => "TCP Gbit/s",
            Figure::TcpCpu => "TCP CPU ns/seg",
            Figure::UdpKpps => "UDP 64 B kpps",
            Figure::UdpCpu => "UDP CPU ns/pkt",
            Figure::TcpRttMean => "TCP RTT µs",
            Figure::TcpRttP99 => "TCP RTT p99 µs",
            Figure::UdpRttMean => "UDP RTT µs",
            Figure::UdpRttP99 => "UDP RTT p99 µs",
            Figure::ConnPerSec => "TCP conn/s",
            Figure::RssMib => "RSS MiB",
        }
    }

    pub fn decimals(self) -> usize {
        match self {
            Figure::TcpGbps => 2,
            Figure::UdpKpps | Figure::TcpRttMean | Figure::UdpRttMean | Figure::RssMib => 1,
            Figure::TcpRttP99 | Figure::UdpRttP99 => 1,
            Figure::TcpCpu | Figure::UdpCpu | Figure::ConnPerSec => 0,
        }
    }
}

/// Why a figure has no number.
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    /// Does not apply to this contender, or cannot run in this build.
    NotApplicable(String),
    Failed(String),
}

impl Note {
    pub fn text(&self) -> String {
        match self {
            Note::NotApplicable(why) => format!("n/a ({why})"),
            Note::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// Every run's value of every figure of one contender.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub values: BTreeMap<Figure, Vec<f64>>,
    /// The first reason a figure had no number, if it had none some time.
    pub notes: BTreeMap<Figure, Note>,
}

impl Samples {
    pub fn record(&mut self, figure: Figure, outcome: Result<f64, Note>) {
        match outcome {
            Ok(v) => self.values.entry(figure).or_default().push(v),
            Err(note) => {
                self.notes.entry(figure).or_insert(note);
            }
        }
    }

    pub fn note_all(&mut self, figures: &[Figure], note: &Note) {
        for f in figures {
            self.record(*f, Err(note.clone()));
        }
    }
}

/// Where and how long the traffic runs.
pub struct Traffic<'a> {
    pub client: &'a Netns,
    pub target: Ipv4Addr,
    pub seconds: u64,
    pub max_connections: u64,
    /// Why the contender carries no UDP, if it does not.
    pub no_udp: Option<&'static str>,
}

/// Runs one measure. Failures become notes; only an interruption is an error.
pub fn run(m: Measure, t: &Traffic) -> Result<Vec<(Figure, Result<f64, Note>)>> {
    let na = |why: &str| Err(Note::NotApplicable(why.to_string()));
    let mut out = Vec::new();
    match m {
        Measure::Tcp => {
            let before = cpu::now()?;
            let r = iperf::tcp(t.client, t.target, t.seconds);
            let gbps = failed(r.as_ref().map(|r| r.bits_per_second / 1e9))?;
            let cpu = match &r {
                Ok(r) => per_packet(before, r.bytes / TCP_SEGMENT_BYTES),
                Err(_) => gbps.clone(),
            };
            out.push((Figure::TcpGbps, gbps));
            out.push((Figure::TcpCpu, cpu));
        }
        Measure::Udp => {
            if let Some(why) = t.no_udp {
                return Ok(vec![(Figure::UdpKpps, na(why)), (Figure::UdpCpu, na(why))]);
            }
            let before = cpu::now()?;
            let r = iperf::udp(t.client, t.target, t.seconds);
            let kpps = failed(r.as_ref().map(|r| r.per_second() / 1e3))?;
            let cpu = match &r {
                Ok(r) => per_packet(before, r.received),
                Err(_) => kpps.clone(),
            };
            out.push((Figure::UdpKpps, kpps));
            out.push((Figure::UdpCpu, cpu));
        }
        Measure::Latency => {
            let tcp = sockperf::ping_pong(t.client, t.target, true, t.seconds);
            out.push((Figure::TcpRttMean, failed(tcp.as_ref().map(|l| l.mean_us))?));
            out.push((Figure::TcpRttP99, failed(tcp.as_ref().map(|l| l.p99_us))?));
            if let Some(why) = t.no_udp {
                out.push((Figure::UdpRttMean, na(why)));
                out.push((Figure::UdpRttP99, na(why)));
            } else {
                let udp = sockperf::ping_pong(t.client, t.target, false, t.seconds);
                out.push((Figure::UdpRttMean, failed(udp.as_ref().map(|l| l.mean_us))?));
                out.push((Figure::UdpRttP99, failed(udp.as_ref().map(|l| l.p99_us))?));
            }
        }
        Measure::Connect => {
            let limit = Duration::from_secs(t.seconds);
            let rate = connrate::run(t.client, t.target, t.max_connections, limit);
            out.push((Figure::ConnPerSec, failed(rate.as_ref().map(|r| *r))?));
        }
    }
    Ok(out)
}

/// A measure's error as a note, unless it was Ctrl-C.
fn failed(r: Result<f64, &anyhow::Error>) -> Result<Result<f64, Note>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => {
            procs::check_interrupted()?;
            Ok(Err(Note::Failed(format!("{e:#}"))))
        }
    }
}

/// Busy CPU nanoseconds since `before`, per packet carried.
fn per_packet(before: cpu::CpuTimes, packets: u64) -> Result<f64, Note> {
    cpu::ns_per_packet(before, packets).map_err(|e| Note::Failed(format!("{e:#}")))
}

/// Picks measures by name; all when `names` is empty.
pub fn select(names: &[String]) -> Result<Vec<Measure>> {
    if names.is_empty() {
        return Ok(Measure::ALL.to_vec());
    }
    let mut picked = Vec::new();
    for name in names {
        let Some(m) = Measure::ALL.into_iter().find(|m| m.name() == name.trim()) else {
            let allowed: Vec<_> = Measure::ALL.iter().map(|m| m.name()).collect();
            bail!(
                "--measures: unknown measure `{name}`; allowed: {}",
                allowed.join(", ")
            );
        };
        if !picked.contains(&m) {
            picked.push(m);
        }
    }
    // Keep the report's column order whatever order they were named in.
    picked.sort_by_key(|m| Measure::ALL.iter().position(|a| a == m));
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_keep_values_and_the_first_note() {
        let mut s = Samples::default();
        s.record(Figure::TcpGbps, Ok(9.0));
        s.record(Figure::TcpGbps, Err(Note::Failed("one".into())));
        s.record(Figure::TcpGbps, Ok(8.0));
        s.record(Figure::TcpGbps, Err(Note::Failed("two".into())));
        assert_eq!(s.values[&Figure::TcpGbps], vec![9.0, 8.0]);
        assert_eq!(s.notes[&Figure::TcpGbps], Note::Failed("one".into()));
    }

    #[test]
    fn measures_by_name_in_report_order() {
        let picked = select(&["connect".into(), "tcp".into(), "tcp".into()]).unwrap();
        assert_eq!(picked, vec![Measure::Tcp, Measure::Connect]);
        assert_eq!(select(&[]).unwrap(), Measure::ALL.to_vec());
        let err = select(&["pps".into()]).unwrap_err().to_string();
        assert!(
            err.contains("`pps`") && err.contains("tcp, udp, latency, connect"),
            "{err}"
        );
    }
}
