//! The relay's bounds that are not a rule's own: how many UDP sessions the
//! host's ephemeral ports allow, and logging a refusal at most once an
//! interval, however many flows are refused.
//!
//! Each relay UDP session holds an ephemeral port of its own (a connected
//! UDP socket takes its port whatever the backend), drawn from the same
//! pool the host's own resolvers and clients use:
//! `net.ipv4.ip_local_port_range` less `ip_local_reserved_ports`, which
//! includes the kernel path's SNAT range. The relay takes at most three
//! quarters of what is free and leaves the rest to the host.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::idle::Millis;
use crate::kernel::PortSet;

/// At most one log line per condition this often.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Linux's default `ip_local_port_range`, when the sysctl cannot be read.
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Says when a condition that may hit every flow is worth a log line: the
/// first hit, then at most once per interval, with the hits held back.
pub struct LogEvery {
    interval_ms: u64,
    /// When the next line may be written (ms on the [`Millis`] clock).
    next: AtomicU64,
    held: AtomicU64,
}

impl LogEvery {
    pub fn new(interval: Duration) -> LogEvery {
        LogEvery {
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            next: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// A hit at `now`: `Some(n)` when it is to be logged, `n` being the
    /// hits held back since the last line; `None` when it is held back.
    pub fn hit(&self, now: Millis) -> Option<u64> {
        let next = self.next.load(Relaxed);
        if now.0 >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now.0.saturating_add(self.interval_ms),
                    Relaxed,
                    Relaxed,
                )
                .is_ok()
        {
            return Some(self.held.swap(0, Relaxed));
        }
        self.held.fetch_add(1, Relaxed);
        None
    }
}

/// The host's ephemeral ports and the relay's share of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EphemeralPorts {
    /// `net.ipv4.ip_local_port_range`.
    pub range: (u16, u16),
    /// Ports of the range not in `ip_local_reserved_ports`.
    pub free: usize,
    /// Left to the host's own sockets (resolvers, health checks).
    pub kept_for_host: usize,
    /// UDP sessions the relay holds at most, over all its rules.
    pub session_limit: usize,
}

impl EphemeralPorts {
    /// The relay's share of `range` less `reserved`: three quarters of the
    /// free ports, rounded down, so the host always keeps a quarter.
    pub fn derive(range: (u16, u16), reserved: &PortSet) -> EphemeralPorts {
        let free = PortSet::range(range.0, range.1).minus(reserved).len();
        let kept_for_host = free.div_ceil(4);
        EphemeralPorts {
            range,
            free,
            kept_for_host,
            session_limit: free - kept_for_host,
        }
    }

    /// From this network namespace's sysctls.
    pub fn of_host() -> io::Result<EphemeralPorts> {
        let range = std::fs::read_to_string(PORT_RANGE)?;
        let range = crate::config::parse_port_range(&range).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{PORT_RANGE}: `{}`", range.trim()),
            )
        })?;
        let reserved = std::fs::read_to_string(crate::kernel::RESERVED_PORTS)?;
        let reserved = PortSet::parse(&reserved)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(EphemeralPorts::derive(range, &reserved))
    }
}

/// What `status` shows of the relay's UDP session bound.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct UdpSessionsStatus {
    pub open: usize,
    #[serde(flatten)]
    pub ports: EphemeralPorts,
}

/// The relay's UDP sessions over every rule, against the limit the
/// ephemeral ports allow.
pub struct UdpBudget {
    open: AtomicUsize,
    ports: Mutex<EphemeralPorts>,
    full: LogEvery,
}

/// One session's place in the budget, given back on drop.
pub struct SessionPort(Arc<UdpBudget>);

impl Drop for SessionPort {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

impl UdpBudget {
    pub fn new(ports: EphemeralPorts) -> Arc<UdpBudget> {
        Arc::new(UdpBudget {
            open: AtomicUsize::new(0),
            ports: Mutex::new(ports),
            full: LogEvery::new(LOG_INTERVAL),
        })
    }

    /// From the host's sysctls; Linux's default range if they cannot be read.
    pub fn of_host() -> (Arc<UdpBudget>, Option<io::Error>) {
        match EphemeralPorts::of_host() {
            Ok(ports) => (UdpBudget::new(ports), None),
            Err(e) => (
                UdpBudget::new(EphemeralPorts::derive(
                    DEFAULT_EPHEMERAL,
                    &PortSet::default(),
                )),
                Some(e),
            ),
        }
    }

    pub fn ports(&self) -> EphemeralPorts {
        *self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new limit (a reload read the sysctls again); sessions over it stay.
    pub fn set_ports(&self, ports: EphemeralPorts) {
        *self.ports.lock().unwrap_or_else(|e| e.into_inner()) = ports;
    }

    /// A place for a new session, unless the limit is reached.
    pub fn take(self: &Arc<Self>) -> Option<SessionPort> {
        let limit = self.ports().session_limit;
        self.open
            .fetch_update(Relaxed, Relaxed, |open| (open < limit).then_some(open + 1))
            .ok()
            .map(|_| SessionPort(self.clone()))
    }

    /// A place for a session the previous image handed over: it exists
    /// already, so it counts even beyond the limit.
    pub fn claim(self: &Arc<Self>) -> SessionPort {
        self.open.fetch_add(1, Relaxed);
        SessionPort(self.clone())
    }

    /// A session refused at the limit: `Some(n)` when to log it (see [`LogEvery`]).
    pub fn refused(&self) -> Option<u64> {
        self.full.hit(Millis::now())
    }

    pub fn status(&self) -> UdpSessionsStatus {
        UdpSessionsStatus {
            open: self.open.load(Relaxed),
            ports: self.ports(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> PortSet {
        PortSet::parse(s).unwrap()
    }

    #[test]
    fn the_relay_takes_three_quarters_of_the_unreserved_range() {
        // Linux's defaults less the kernel path's default SNAT range.
        let p = EphemeralPorts::derive((32768, 60999), &set("40000-59999"));
        assert_eq!(p.free, 28232 - 20000);
        assert_eq!(p.kept_for_host, 2058);
        assert_eq!(p.session_limit, 6174);
        // Reserved ports outside the range change nothing.
        let p = EphemeralPorts::derive((61000, 61099), &set("1000-2000,40000-59999"));
        assert_eq!((p.free, p.kept_for_host, p.session_limit), (100, 25, 75));
        // Partly overlapping, single ports, and a range of one.
        let p = EphemeralPorts::derive((100, 199), &set("50-109,150,199-300"));
        assert_eq!(p.free, 100 - 10 - 1 - 1);
        assert_eq!((p.kept_for_host, p.session_limit), (22, 66));
        let p = EphemeralPorts::derive((500, 500), &PortSet::default());
        assert_eq!((p.free, p.kept_for_host, p.session_limit), (1, 1, 0));
    }

    #[test]
    fn a_fully_reserved_range_leaves_no_session() {
        let p = EphemeralPorts::derive((40000, 50000), &set("30000-60000"));
        assert_eq!((p.free, p.kept_for_host, p.session_limit), (0, 0, 0));
        let budget = UdpBudget::new(p);
        assert!(budget.take().is_none());
    }

    #[test]
    fn the_budget_refuses_at_its_limit_and_gives_places_back() {
        let budget = UdpBudget::new(EphemeralPorts::derive((1000, 1003), &PortSet::default()));
        assert_eq!(budget.ports().session_limit, 3);
        let taken: Vec<_> = (0..3).map(|_| budget.take().expect("room")).collect();
        assert!(budget.take().is_none());
        assert_eq!(budget.status().open, 3);
        drop(taken);
        assert_eq!(budget.status().open, 0);
        let again = budget.take();
        assert!(again.is_some());
        budget.set_ports(EphemeralPorts::derive((1000, 1000), &PortSet::default()));
        assert!(budget.take().is_none(), "a lower limit refuses the next");
    }

    #[test]
    fn log_every_logs_the_first_hit_then_once_an_interval_with_what_it_held() {
        let log = LogEvery::new(Duration::from_secs(10));
        assert_eq!(log.hit(Millis(5_000)), Some(0));
        let held: Vec<_> = (0..49).map(|i| log.hit(Millis(5_000 + i * 100))).collect();
        assert!(held.iter().all(Option::is_none));
        assert_eq!(log.hit(Millis(14_999)), None);
        assert_eq!(log.hit(Millis(15_000)), Some(50));
        assert_eq!(log.hit(Millis(15_001)), None);
        assert_eq!(log.hit(Millis(40_000)), Some(1));
        assert_eq!(log.hit(Millis(40_000)), None);
    }
}
