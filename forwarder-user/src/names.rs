//! Hostnames of targets: looked up as the system is configured
//! (`/etc/hosts`, then the name servers of `/etc/resolv.conf`), with the
//! TTL of a DNS answer, and when each is due to be looked up again.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_resolver::config::{LookupIpStrategy, ResolveHosts};
use hickory_resolver::proto::op::Query;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{Hosts, TokioResolver};

use crate::rules::{Answer, DnsSettings};

/// Looks `name` up: in `/etc/hosts` (no TTL), else by DNS with the system's
/// resolver settings. Both files are read anew, so edits to them count.
pub async fn lookup(name: &str) -> io::Result<Answer> {
    if let Some(addrs) = from_hosts_file(name) {
        return Ok(Answer { addrs, ttl: None });
    }
    let mut builder = TokioResolver::builder_tokio().map_err(io::Error::other)?;
    let opts = builder.options_mut();
    // /etc/hosts was asked above; nothing cached between lookups, so each
    // one asks the server and sees the TTL it gives.
    opts.use_hosts_file = ResolveHosts::Never;
    opts.cache_size = 0;
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    let resolver: TokioResolver = builder.build().map_err(io::Error::other)?;
    let found = resolver.lookup_ip(name).await.map_err(|e| {
        let why = if e.is_nx_domain() {
            "no such name".to_owned()
        } else if e.is_no_records_found() {
            "no addresses".to_owned()
        } else {
            e.to_string()
        };
        io::Error::new(io::ErrorKind::NotFound, why)
    })?;
    let addrs = pick_addresses(&found.iter().collect::<Vec<_>>());
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no addresses"));
    }
    let ttl = found.as_lookup().answers().iter().map(|r| r.ttl).min();
    Ok(Answer {
        addrs,
        ttl: Some(Duration::from_secs(u64::from(ttl.unwrap_or(0)))),
    })
}

/// [`lookup`] for callers outside a runtime, or on one they must not
/// block: on a thread of its own.
pub fn lookup_blocking(name: &str) -> io::Result<Answer> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(lookup(name))
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn from_hosts_file(name: &str) -> Option<Vec<IpAddr>> {
    let hosts = Hosts::from_system().ok()?;
    let name = Name::from_str(name).ok()?;
    let mut addrs = Vec::new();
    for kind in [RecordType::A, RecordType::AAAA] {
        if let Some(found) = hosts.lookup_static_host(&Query::query(name.clone(), kind)) {
            addrs.extend(found.answers().iter().filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            }));
        }
    }
    let addrs = pick_addresses(&addrs);
    (!addrs.is_empty()).then_some(addrs)
}

/// Every IPv4 address if there is one (the kernel path speaks IPv4 for
/// now), else every address; sorted, so that a server rotating its answers
/// does not look like a change.
pub fn pick_addresses(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let v4 = addrs.iter().any(IpAddr::is_ipv4);
    let mut picked: Vec<IpAddr> = addrs
        .iter()
        .map(|a| a.to_canonical())
        .filter(|a| !v4 || a.is_ipv4())
        .collect();
    picked.sort();
    picked.dedup();
    picked
}

/// How long an answer stands: its TTL within the bounds, or `refresh`
/// for an answer without one.
pub fn keep_for(ttl: Option<Duration>, dns: &DnsSettings) -> Duration {
    match ttl {
        Some(ttl) => ttl.clamp(dns.min_ttl, dns.max_ttl),
        None => dns.refresh,
    }
}

/// After the `failures`-th failed lookup in a row: `min_ttl`, doubled for
/// each failure before, at most `max_ttl`.
pub fn retry_after(failures: u32, dns: &DnsSettings) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    dns.min_ttl
        .saturating_mul(1 << doublings)
        .clamp(dns.min_ttl, dns.max_ttl)
}

/// When each name is looked up next.
#[derive(Debug, Default)]
pub struct Schedule {
    names: BTreeMap<String, Due>,
}

#[derive(Debug)]
struct Due {
    /// The answer this schedule was last set by.
    answer: Answer,
    at: Instant,
    failures: u32,
}

impl Schedule {
    /// Takes the answers in force: a name that is new, or whose answer
    /// changed by other means (a reload), is due when that answer lapses;
    /// names no longer in force are dropped.
    pub fn follow(&mut self, running: &BTreeMap<String, Answer>, dns: &DnsSettings, now: Instant) {
        self.names.retain(|name, _| running.contains_key(name));
        for (name, answer) in running {
            if self.names.get(name).is_none_or(|d| d.answer != *answer) {
                self.answered(name, answer, dns, now);
            }
        }
    }

    /// The earliest time a name is due, if there is any name.
    pub fn next(&self) -> Option<Instant> {
        self.names.values().map(|d| d.at).min()
    }

    /// The names due at `now`.
    pub fn due(&self, now: Instant) -> Vec<String> {
        (self.names.iter())
            .filter(|(_, d)| d.at <= now)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// `name` was answered with `answer` at `now`.
    pub fn answered(&mut self, name: &str, answer: &Answer, dns: &DnsSettings, now: Instant) {
        self.names.insert(
            name.to_owned(),
            Due {
                answer: answer.clone(),
                at: now + keep_for(answer.ttl, dns),
                failures: 0,
            },
        );
    }

    /// A lookup of `name` failed at `now`; returns how long until the next
    /// (`None` for a name not followed).
    pub fn failed(&mut self, name: &str, dns: &DnsSettings, now: Instant) -> Option<Duration> {
        let due = self.names.get_mut(name)?;
        due.failures = due.failures.saturating_add(1);
        let wait = retry_after(due.failures, dns);
        due.at = now + wait;
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn dns(refresh: u64, min_ttl: u64, max_ttl: u64) -> DnsSettings {
        DnsSettings {
            refresh: secs(refresh),
            min_ttl: secs(min_ttl),
            max_ttl: secs(max_ttl),
        }
    }

    fn answer(last: u8, ttl: Option<u64>) -> Answer {
        Answer {
            addrs: vec![IpAddr::from([10, 0, 0, last])],
            ttl: ttl.map(secs),
        }
    }

    #[test]
    fn a_ttl_is_held_within_the_bounds() {
        let d = dns(30, 5, 300);
        assert_eq!(keep_for(Some(secs(60)), &d), secs(60));
        assert_eq!(keep_for(Some(secs(1)), &d), secs(5));
        assert_eq!(keep_for(Some(Duration::ZERO), &d), secs(5));
        assert_eq!(keep_for(Some(secs(3600)), &d), secs(300));
        assert_eq!(keep_for(Some(secs(5)), &d), secs(5));
        assert_eq!(keep_for(Some(secs(300)), &d), secs(300));
    }

    #[test]
    fn an_answer_without_ttl_stands_for_refresh_whatever_the_bounds() {
        assert_eq!(keep_for(None, &dns(30, 5, 10)), secs(30));
        assert_eq!(keep_for(None, &dns(1, 5, 10)), secs(1));
    }

    #[test]
    fn failures_back_off_from_min_ttl_doubling_up_to_max_ttl() {
        let d = dns(30, 5, 60);
        let waits: Vec<u64> = (1..=6).map(|n| retry_after(n, &d).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        assert_eq!(retry_after(u32::MAX, &d), secs(60));
        assert_eq!(retry_after(0, &d), secs(5));
        assert_eq!(retry_after(3, &dns(30, 7, 7)), secs(7));
    }

    #[test]
    fn sorted_ipv4_first_without_duplicates() {
        let v4: IpAddr = "10.0.0.2".parse().unwrap();
        let v4b: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(pick_addresses(&[v6, v4, mapped, v4b]), [v4b, v4]);
        assert_eq!(pick_addresses(&[v6, v6]), [v6]);
        assert!(pick_addresses(&[]).is_empty());
    }

    #[test]
    fn names_fall_due_when_their_answers_lapse() {
        let d = dns(30, 5, 300);
        let t0 = Instant::now();
        let mut s = Schedule::default();
        let running = BTreeMap::from([
            ("a.test".to_owned(), answer(1, Some(60))),
            ("b.test".to_owned(), answer(2, None)),
        ]);
        s.follow(&running, &d, t0);
        assert_eq!(s.next(), Some(t0 + secs(30)));
        assert!(s.due(t0 + secs(29)).is_empty());
        assert_eq!(s.due(t0 + secs(30)), ["b.test"]);
        assert_eq!(s.due(t0 + secs(60)), ["a.test", "b.test"]);

        // A lookup with a new TTL sets the next time; the same answers in
        // force again do not set it back.
        s.answered("a.test", &answer(1, Some(10)), &d, t0 + secs(60));
        let running = BTreeMap::from([
            ("a.test".to_owned(), answer(1, Some(10))),
            ("b.test".to_owned(), answer(2, None)),
        ]);
        s.answered("b.test", &answer(2, None), &d, t0 + secs(60));
        s.follow(&running, &d, t0 + secs(61));
        assert_eq!(s.next(), Some(t0 + secs(70)));

        // A reload brought another answer: due from then on; a name left
        // out is dropped.
        let reloaded = BTreeMap::from([("a.test".to_owned(), answer(9, Some(100)))]);
        s.follow(&reloaded, &d, t0 + secs(65));
        assert_eq!(s.next(), Some(t0 + secs(165)));
        assert_eq!(s.due(t0 + secs(1000)), ["a.test"]);
    }

    #[test]
    fn a_failing_name_backs_off_and_a_good_answer_resets_it() {
        let d = dns(30, 5, 12);
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.follow(
            &BTreeMap::from([("a.test".to_owned(), answer(1, Some(60)))]),
            &d,
            t0,
        );
        assert_eq!(s.failed("a.test", &d, t0), Some(secs(5)));
        assert_eq!(s.next(), Some(t0 + secs(5)));
        assert_eq!(s.failed("a.test", &d, t0 + secs(5)), Some(secs(10)));
        assert_eq!(s.failed("a.test", &d, t0 + secs(15)), Some(secs(12)));
        assert_eq!(s.next(), Some(t0 + secs(27)));
        s.answered("a.test", &answer(1, Some(1)), &d, t0 + secs(27));
        assert_eq!(s.next(), Some(t0 + secs(32)));
        assert_eq!(s.failed("a.test", &d, t0 + secs(32)), Some(secs(5)));
        assert_eq!(s.failed("unknown.test", &d, t0), None);
    }
}
