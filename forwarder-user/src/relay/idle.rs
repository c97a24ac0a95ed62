//! Idle-timeout bookkeeping: a flow stamps the time of its last traffic
//! (either direction) into an atomic; a timer compares it with the timeout.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Milliseconds since the first use in this process: small, monotonic, atomic-friendly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub u64);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Millis {
    pub fn now() -> Millis {
        Millis(epoch().elapsed().as_millis() as u64)
    }

    /// As an `Instant`, capped at a day from now (timers re-check anyway).
    pub fn instant(self) -> Instant {
        let cap = Instant::now() + Duration::from_secs(86_400);
        epoch()
            .checked_add(Duration::from_millis(self.0))
            .map_or(cap, |t| t.min(cap))
    }
}

/// When a flow last carried traffic.
pub struct IdleClock {
    last: AtomicU64,
    /// Some traffic was seen since the clock started.
    carried: AtomicBool,
}

impl IdleClock {
    pub fn new(now: Millis) -> IdleClock {
        IdleClock {
            last: AtomicU64::new(now.0),
            carried: AtomicBool::new(false),
        }
    }

    /// Traffic seen at `now`. Stores only when the millisecond changed, so a
    /// busy flow does not write the shared line on every call.
    pub fn touch(&self, now: Millis) {
        if !self.carried.load(Relaxed) {
            self.carried.store(true, Relaxed);
        }
        if self.last.load(Relaxed) < now.0 {
            self.last.store(now.0, Relaxed);
        }
    }

    /// Whether any traffic was seen since the clock started.
    pub fn carried(&self) -> bool {
        self.carried.load(Relaxed)
    }

    pub fn last(&self) -> Millis {
        Millis(self.last.load(Relaxed))
    }

    /// The moment the flow becomes idle unless it sees traffic before.
    pub fn deadline(&self, timeout: Duration) -> Millis {
        let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        Millis(self.last().0.saturating_add(timeout))
    }

    /// True when nothing passed for `timeout` up to `now`.
    pub fn is_idle(&self, now: Millis, timeout: Duration) -> bool {
        now >= self.deadline(timeout)
    }

    /// Resolves once the flow has been idle for `timeout`.
    pub async fn expired(&self, timeout: Duration) {
        loop {
            let deadline = self.deadline(timeout);
            tokio::time::sleep_until(deadline.instant().into()).await;
            if self.is_idle(Millis::now(), timeout) {
                return;
            }
        }
    }
}

/// How often a UDP listener looks for idle sessions: a quarter of the
/// timeout (so a session ends at most 25% late), between 10 ms and 1 s.
pub fn sweep_interval(udp_idle: Duration) -> Duration {
    (udp_idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(300);

    #[test]
    fn traffic_in_time_keeps_a_flow_alive() {
        let clock = IdleClock::new(Millis(1000));
        assert!(!clock.is_idle(Millis(1299), T));
        clock.touch(Millis(1200));
        assert!(!clock.is_idle(Millis(1450), T));
        assert_eq!(clock.deadline(T), Millis(1500));
        assert!(clock.is_idle(Millis(1500), T));
    }

    #[test]
    fn touch_never_moves_back() {
        let clock = IdleClock::new(Millis(1000));
        assert!(!clock.carried());
        clock.touch(Millis(900));
        assert!(clock.carried(), "traffic in the first millisecond counts");
        assert_eq!(clock.last(), Millis(1000));
        clock.touch(Millis(1001));
        assert_eq!(clock.last(), Millis(1001));
    }

    #[test]
    fn huge_timeouts_do_not_overflow() {
        let clock = IdleClock::new(Millis(5));
        assert!(!clock.is_idle(Millis(u64::MAX - 1), Duration::MAX));
    }

    #[test]
    fn an_instant_is_the_millisecond_capped_at_a_day_from_now() {
        let day = Duration::from_secs(86_400);
        let before = Instant::now();
        let far = Millis(u64::MAX).instant();
        assert!(
            far >= before + day && far <= Instant::now() + day,
            "{:?} from now",
            far - before
        );
        let now = Millis::now();
        let at = now.instant();
        let after = Instant::now();
        // Millis truncate: at most a millisecond before the reading.
        assert!(at <= after, "{:?} ahead", at - after);
        assert!(
            after - at < Duration::from_secs(5),
            "{:?} behind",
            after - at
        );
        assert_eq!(
            Millis(now.0 + 250).instant() - at,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn sweep_interval_bounds() {
        assert_eq!(
            sweep_interval(Duration::from_secs(120)),
            Duration::from_secs(1)
        );
        assert_eq!(sweep_interval(T), Duration::from_millis(75));
        assert_eq!(
            sweep_interval(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
    }

    #[tokio::test]
    async fn expired_waits_for_the_last_touch() {
        // Touches 100 ms apart against a 600 ms timeout: a stalled core
        // may delay a touch by half a second before the flow goes idle.
        let timeout = Duration::from_millis(600);
        let clock = IdleClock::new(Millis::now());
        let toucher = async {
            let mut last = Instant::now();
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                last = Instant::now();
                clock.touch(Millis::now());
            }
            last
        };
        let expired = async {
            clock.expired(timeout).await;
            Instant::now()
        };
        let (last_touch, expired_at) = tokio::join!(toucher, expired);
        // Millis truncate: the deadline may be up to 1 ms early.
        let quiet = expired_at + Duration::from_millis(1) - last_touch;
        assert!(
            quiet >= timeout && quiet <= timeout + Duration::from_secs(1),
            "expired {quiet:?} after the last touch"
        );
    }
}
