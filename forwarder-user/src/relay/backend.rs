//! Which backend a new flow goes to, and whether a backend's failure was
//! already reported.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::health::RuleHealth;
use crate::rules::BackendSpec;

/// Picks healthy backends by weight: over every `total weight` flows each
/// backend gets exactly its weight, spread out rather than in runs (a
/// stride that is coprime with the total walks all positions in a
/// scattered order). While some are down, the same walk runs over the
/// weights of the healthy ones.
pub struct BackendPicker {
    backends: Vec<SocketAddr>,
    weights: Vec<u64>,
    /// `ends[i]`: the sum of the weights of backends `0..=i`.
    ends: Vec<u64>,
    total: u64,
    stride: u64,
    next: AtomicU64,
    /// One per backend: set while it fails, so a failure is logged once.
    down: Vec<Alarm>,
    health: Arc<RuleHealth>,
}

impl BackendPicker {
    /// The backends and weights it was made from.
    pub fn specs(&self) -> Vec<BackendSpec> {
        (self.backends.iter().zip(&self.weights))
            .map(|(&addr, &w)| BackendSpec {
                addr,
                weight: u16::try_from(w).unwrap_or(u16::MAX),
            })
            .collect()
    }

    /// `specs` must not be empty; a weight of 0 counts as 1. `health` is
    /// the state of the same backends, in the same order.
    pub fn new(specs: &[BackendSpec], health: Arc<RuleHealth>) -> BackendPicker {
        assert!(!specs.is_empty(), "a listener needs a backend");
        let mut ends = Vec::with_capacity(specs.len());
        let mut total = 0u64;
        for s in specs {
            total += u64::from(s.weight.max(1));
            ends.push(total);
        }
        BackendPicker {
            backends: specs.iter().map(|s| s.addr).collect(),
            weights: specs.iter().map(|s| u64::from(s.weight.max(1))).collect(),
            ends,
            total,
            stride: coprime_stride(total),
            next: AtomicU64::new(0),
            down: specs.iter().map(|_| Alarm::default()).collect(),
            health,
        }
    }

    /// The backend for a new flow: `(index, address)`; `None` when every
    /// backend is down.
    pub fn pick(&self) -> Option<(usize, SocketAddr)> {
        let healthy = self.health.healthy_flags();
        if self.backends.len() == 1 {
            return healthy[0].then_some((0, self.backends[0]));
        }
        let n = self.next.fetch_add(1, Relaxed);
        if healthy.iter().all(|&h| h) {
            let pos = n % self.total * self.stride % self.total;
            let i = self.ends.partition_point(|&end| end <= pos);
            return Some((i, self.backends[i]));
        }
        let total: u64 = (self.weights.iter().zip(&healthy))
            .filter(|(_, h)| **h)
            .map(|(w, _)| w)
            .sum();
        if total == 0 {
            return None;
        }
        let mut pos = n % total * coprime_stride(total) % total;
        for (i, (&w, &h)) in self.weights.iter().zip(&healthy).enumerate() {
            if !h {
                continue;
            }
            if pos < w {
                return Some((i, self.backends[i]));
            }
            pos -= w;
        }
        None
    }

    /// The health of the backends, which failed connects feed.
    pub fn health(&self) -> &RuleHealth {
        &self.health
    }

    /// The alarm that says backend `index` is failing.
    pub fn down(&self, index: usize) -> &Alarm {
        &self.down[index]
    }

    /// `a, b (weight 3)`: for logs.
    pub fn describe(specs: &[BackendSpec]) -> String {
        let list: Vec<String> = specs
            .iter()
            .map(|s| {
                if specs.len() > 1 {
                    format!("{} (weight {})", s.addr, s.weight)
                } else {
                    s.addr.to_string()
                }
            })
            .collect();
        list.join(", ")
    }
}

/// About 0.618 of `total` (spreads best), moved up to the next value coprime with it.
fn coprime_stride(total: u64) -> u64 {
    if total <= 2 {
        return 1;
    }
    let mut s = (total * 618 / 1000).max(1);
    while gcd(s, total) != 1 {
        s += 1;
    }
    s
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A condition reported once when it starts and once when it ends, however
/// often it is hit in between (a backend down, a session table full).
#[derive(Default)]
pub struct Alarm(AtomicBool);

impl Alarm {
    /// True when the condition was not raised before: log it now.
    pub fn raise(&self) -> bool {
        !self.0.swap(true, Relaxed)
    }

    /// True when the condition was raised: log that it ended.
    pub fn clear(&self) -> bool {
        // A load first keeps the common case (never raised) a plain read.
        self.0.load(Relaxed) && self.0.swap(false, Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{HealthBook, Source};
    use crate::rules::{HealthSpec, Listener, PathMode, Probe, Protocol, Timeouts};
    use std::time::Duration;

    fn specs(weights: &[u16]) -> Vec<BackendSpec> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| BackendSpec {
                addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                weight,
            })
            .collect()
    }

    fn make_picker(weights: &[u16]) -> BackendPicker {
        let l = listener(weights);
        BackendPicker::new(&l.backends, HealthBook::default().rule(&l))
    }

    fn listener(weights: &[u16]) -> Listener {
        Listener {
            rule_id: 0,
            alias: "unit".into(),
            protocol: Protocol::Tcp,
            bind: "127.0.0.1:1".parse().unwrap(),
            listen_picked: false,
            ports: crate::rules::ListenPorts::SINGLE,
            backends: specs(weights),
            timeouts: Timeouts::default(),
            path: PathMode::Auto,
            preserve_client_ip: false,
            proxy: Default::default(),
            acl: None,
            max_connections: None,
            health: Some(HealthSpec {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                fall: 1,
                rise: 1,
                probe: Probe::TcpConnect,
            }),
        }
    }

    fn counts(picker: &BackendPicker, picks: usize, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for _ in 0..picks {
            c[picker.pick().unwrap().0] += 1;
        }
        c
    }

    fn set(picker: &BackendPicker, index: usize, up: bool) {
        let outcome = if up { Ok(()) } else { Err("test".into()) };
        picker.health().record(index, outcome, Source::Check);
    }

    #[test]
    fn only_healthy_backends_are_picked_by_weight() {
        let picker = make_picker(&[5, 2, 1]);
        set(&picker, 0, false);
        assert_eq!(counts(&picker, 9, 3), [0, 6, 3]);
        set(&picker, 2, false);
        assert_eq!(counts(&picker, 4, 3), [0, 4, 0]);
        set(&picker, 1, false);
        assert_eq!(picker.pick(), None);
        set(&picker, 0, true);
        assert_eq!(counts(&picker, 5, 3), [5, 0, 0]);
        let single = make_picker(&[1]);
        set(&single, 0, false);
        assert_eq!(single.pick(), None);
    }

    #[test]
    fn with_some_down_the_walk_over_the_healthy_is_spread_too() {
        // Backend 0 down: 3 + 1 of weight, walked with stride 3.
        let picker = make_picker(&[1, 3, 1]);
        set(&picker, 0, false);
        let seq: Vec<usize> = (0..8).map(|_| picker.pick().unwrap().0).collect();
        assert_eq!(seq, [1, 2, 1, 1, 1, 2, 1, 1]);
    }

    #[test]
    fn every_cycle_gives_each_backend_its_weight() {
        for weights in [
            &[1u16, 1][..],
            &[3, 1],
            &[5, 2, 1],
            &[1, 100],
            &[7, 7, 7, 7],
        ] {
            let picker = make_picker(weights);
            let total: usize = weights.iter().map(|&w| w as usize).sum();
            let got = counts(&picker, total * 3, weights.len());
            let want: Vec<usize> = weights.iter().map(|&w| w as usize * 3).collect();
            assert_eq!(got, want, "weights {weights:?}");
        }
    }

    #[test]
    fn picks_are_spread_not_in_runs() {
        let picker = make_picker(&[3, 1]);
        let seq: Vec<usize> = (0..4).map(|_| picker.pick().unwrap().0).collect();
        // Backend 1 is not last in a run of three 0s then a 1 every time:
        // within the first cycle it shows up before position 3.
        assert!(seq[..3].contains(&1), "{seq:?}");
        let picker = make_picker(&[1, 1]);
        let seq: Vec<usize> = (0..4).map(|_| picker.pick().unwrap().0).collect();
        assert_eq!(seq, [0, 1, 0, 1]);
    }

    #[test]
    fn single_backend_and_zero_weight() {
        let picker = make_picker(&[9]);
        assert!((0..5).all(|_| picker.pick().unwrap().0 == 0));
        let picker = make_picker(&[0, 1]);
        assert_eq!(counts(&picker, 4, 2), [2, 2]);
    }

    #[test]
    fn stride_is_coprime() {
        for total in 1..500 {
            assert_eq!(gcd(coprime_stride(total), total), 1, "total {total}");
        }
    }

    #[test]
    fn describe_gives_weights_only_among_several() {
        assert_eq!(BackendPicker::describe(&specs(&[3])), "127.0.0.1:1000");
        assert_eq!(
            BackendPicker::describe(&specs(&[3, 1])),
            "127.0.0.1:1000 (weight 3), 127.0.0.1:1001 (weight 1)"
        );
    }

    #[test]
    fn each_backend_has_its_own_alarm() {
        let picker = make_picker(&[1, 1]);
        assert!(picker.down(1).raise());
        assert!(!picker.down(1).raise(), "raised already");
        assert!(picker.down(0).raise(), "backend 0's alarm is its own");
    }

    #[test]
    fn alarm_reports_start_and_end_once() {
        let alarm = Alarm::default();
        assert!(!alarm.clear());
        assert!(alarm.raise());
        assert!(!alarm.raise());
        assert!(!alarm.raise());
        assert!(alarm.clear());
        assert!(!alarm.clear());
        assert!(alarm.raise());
    }
}
