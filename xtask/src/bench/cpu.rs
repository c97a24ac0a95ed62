//! Machine-wide CPU time from /proc/stat. Sender, forwarder and receiver
//! share the cores, so the busy time over a run, divided by the packets it
//! carried, shows what each packet cost the whole machine.
use anyhow::{Context, Result, bail};

/// The `cpu` line of /proc/stat, in clock ticks (USER_HZ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal (guest time is inside user).
    pub busy: u64,
    /// busy + idle + iowait.
    pub total: u64,
}

pub fn parse_proc_stat(text: &str) -> Result<CpuTimes> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .context("/proc/stat has no `cpu` line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("/proc/stat: cannot read `{line}`"))?;
    if fields.len() < 8 {
        bail!("/proc/stat: `{line}` has fewer than 8 counters");
    }
    let [user, nice, system, idle, iowait, irq, softirq, steal] =
        <[u64; 8]>::try_from(&fields[..8]).expect("eight fields");
    let busy = user + nice + system + irq + softirq + steal;
    Ok(CpuTimes {
        busy,
        total: busy + idle + iowait,
    })
}

pub fn now() -> Result<CpuTimes> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").context("read /proc/stat")?)
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as u64 } else { 100 }
}

/// Busy CPU time between two samples, in nanoseconds.
pub fn busy_ns(before: CpuTimes, after: CpuTimes, ticks_per_second: u64) -> u64 {
    let ticks = after.busy.saturating_sub(before.busy);
    ticks * 1_000_000_000 / ticks_per_second
}

/// Busy nanoseconds since `before`, per packet.
pub fn ns_per_packet(before: CpuTimes, packets: u64) -> Result<f64> {
    if packets == 0 {
        bail!("no packet arrived");
    }
    let ns = busy_ns(before, now()?, ticks_per_second());
    Ok(ns as f64 / packets as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  4705 356 584 3699176 23060 0 277 0 0 0\n\
        cpu0 1393280 32966 572056 13343292 6130 0 17875 0 0 0\n\
        intr 114930548 113199788 3 0 5 263 0 4 [...]\n";

    #[test]
    fn reads_the_total_cpu_line() {
        let t = parse_proc_stat(STAT).unwrap();
        assert_eq!(t.busy, 4705 + 356 + 584 + 277);
        assert_eq!(t.total, t.busy + 3699176 + 23060);
    }

    #[test]
    fn busy_delta_in_nanoseconds() {
        let before = CpuTimes {
            busy: 1000,
            total: 5000,
        };
        let after = CpuTimes {
            busy: 1250,
            total: 5400,
        };
        // 250 ticks at 100 Hz = 2.5 s.
        assert_eq!(busy_ns(before, after, 100), 2_500_000_000);
        // A counter that went backwards (never should) counts as nothing.
        assert_eq!(busy_ns(after, before, 100), 0);
    }

    #[test]
    fn a_short_or_missing_line_is_an_error() {
        assert!(parse_proc_stat("cpu 1 2 3\n").is_err());
        assert!(parse_proc_stat("intr 1 2\n").is_err());
        assert!(parse_proc_stat("cpu 1 2 x 4 5 6 7 8\n").is_err());
    }
}
