//! The results document and its file in bench-results/.
use std::fmt::Write;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use super::measure::Figure;
use super::report::{self, Row};
use crate::{cmd, workspace_root};

const EXPLANATION: &str = "
## What the figures are

- Each contender runs in fresh namespaces: client 198.18.1.2 - forwarder
  198.18.1.1 | 198.18.2.1 - backend 198.18.2.2, veth links with GRO on and
  checksum offload off at the client's and backend's ends (so XDP redirects
  arrive and checksums come complete, as from a NIC). The
  client's tools run on the first CPU, the backend's on the last, as on two
  machines; proxies and the daemon run where the scheduler puts them.
- Every figure is the median over `--repeat` runs; the ratio in brackets is to
  direct routing's figure (for time and memory, lower is better).
- TCP Gbit/s: one iperf3 stream for the run's seconds, as the receiver counted.
- UDP 64 B kpps: iperf3 `-u -l 64 -b 0`; datagrams the receiver got per second
  (sent minus lost).
- CPU ns/seg, ns/pkt: busy time of the whole machine (/proc/stat: user, nice,
  system, irq, softirq, steal) over the iperf3 run, divided by the UDP datagrams
  received, or for TCP by the bytes received over 1448 (one 1500-byte-MTU
  segment). Sender, forwarder and receiver share the cores, so this is what
  forwarding one packet cost in total; other load on the machine adds to it.
- RTT: sockperf ping-pong, 64-byte messages, one in flight, round-trip times.
- TCP conn/s: connections opened from the client, answered by the backend with
  one byte and closed; each counted once the client read the byte and the
  close. Two client threads, bounded by `--connections` and the run's seconds.
- RSS MiB: the peak of the summed VmRSS of every process in the forwarder
  namespace (the daemon, nginx's master and workers, HAProxy, socat and its
  forks), sampled every 200 ms while the contender ran.
";

/// The whole report: machine, table, targets, what the figures mean.
pub fn document(rows: &[Row], figures: &[Figure], options: &str, load: &str) -> String {
    let baseline = rows.iter().find(|r| r.name == "direct");
    let mut text = format!("# forwarder bench\n\n{}\n", machine(options, load));
    text.push_str(&report::table(rows, figures, baseline));
    let _ = write!(
        text,
        "\n## Targets\n\n{}{EXPLANATION}",
        report::targets(rows)
    );
    text
}

/// Machine, load and options, so that two reports can be compared.
fn machine(options: &str, load: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let commit = cmd::output(
        Command::new("git")
            .current_dir(workspace_root())
            .args(["describe", "--always", "--dirty"]),
    )
    .unwrap_or_default();
    format!(
        "- machine: {cpu}, {cores} cores, kernel {}\n- commit: {}\n\
         - load average before: {load}\n- {options}\n",
        kernel.trim(),
        commit.trim(),
    )
}

/// Writes `text` to bench-results/<UTC time>.md.
pub fn write(text: &str) -> Result<PathBuf> {
    let dir = workspace_root().join("bench-results");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = dir.join(format!("{}.md", timestamp(now)));
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// `2024-05-01T12-00-00Z` for a time in seconds since the epoch (UTC).
pub fn timestamp(epoch_secs: u64) -> String {
    let days = (epoch_secs / 86_400) as i64;
    let secs = epoch_secs % 86_400;
    // Howard Hinnant's days-to-civil: 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}-{:02}-{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00-00-00Z");
        assert_eq!(timestamp(951_782_400), "2000-02-29T00-00-00Z");
        assert_eq!(timestamp(1_714_564_800 + 3661), "2024-05-01T13-01-01Z");
    }
}
