//! Filling RULES, BACKENDS, SETTINGS and ACL from the compiled rule table.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use forwarder_common::{
    AclKey, Backend, MAX_BACKENDS_PER_RULE, MAX_SNAT_PROBES, RULE_F_RELAY, RuleKey, RuleValue,
    Settings,
};

use super::snat::{self, Egress};
use crate::rules::{Compiled, KernelSettings, Protocol, Timeouts};

/// The kernel's tables, snat addresses filled in.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub rules: Vec<(RuleKey, RuleValue)>,
    pub backends: Vec<(u32, Backend)>,
    pub settings: Settings,
    /// `ACL` trie entries: (key prefix length, key data, verdict).
    pub acl: Vec<(u32, AclKey, u32)>,
}

/// A closed flow's SNAT port may go to a new flow after this much quiet
/// (Linux reuses a TIME_WAIT port for a new connection after 1 s too).
pub const CLOSED_REUSE_AFTER: Duration = Duration::from_secs(1);

/// The kernel stops reusing a closed flow's port this long before the
/// sweeper may remove it, so that the two never act on one pair.
pub const SWEEPER_GUARD: Duration = Duration::from_secs(1);

/// Settings for the SNAT range `ports` (inclusive), with port reuse of
/// closed flows up to `shortest_tcp_close` (the least `tcp_close` of any rule).
pub fn settings(kernel: &KernelSettings, shortest_tcp_close: Duration) -> Settings {
    let (min, max) = kernel.snat_ports;
    let span = u32::from(max.saturating_sub(min)) + 1;
    let reuse_before = shortest_tcp_close.saturating_sub(SWEEPER_GUARD);
    let (after, before) = if reuse_before > CLOSED_REUSE_AFTER {
        (CLOSED_REUSE_AFTER, reuse_before)
    } else {
        (Duration::ZERO, Duration::ZERO)
    };
    Settings {
        snat_port_min: min,
        snat_port_max: max,
        snat_probe_limit: span.min(MAX_SNAT_PROBES),
        closed_reuse_after_ns: after.as_nanos() as u64,
        closed_reuse_before_ns: before.as_nanos() as u64,
    }
}

/// The least `tcp_close` of the TCP rules (the default where there is none).
fn shortest_tcp_close(compiled: &Compiled) -> Duration {
    compiled
        .listeners
        .iter()
        .filter(|l| l.protocol == Protocol::Tcp)
        .map(|l| l.timeouts.tcp_close)
        .min()
        .unwrap_or(Timeouts::default().tcp_close)
}

/// Looks up the route to every backend: fills `snat_addr`, and makes a
/// rule relay-only when a backend is on this host, is not IPv4 (the kernel
/// path is IPv4 for now) or has no route.
pub fn prepare(compiled: &Compiled) -> Tables {
    let mut relay_only: HashSet<u32> = HashSet::new();
    let mut backends = Vec::with_capacity(compiled.kernel.backends.len());
    // The route depends on the address alone; thousands of rules often
    // share a few backends.
    let mut routes: HashMap<IpAddr, Result<Egress, String>> = HashMap::new();
    for &(index, mut backend) in &compiled.kernel.backends {
        let rule_id = index / MAX_BACKENDS_PER_RULE;
        let ip = snat::ip_of(&backend.addr);
        let addr = SocketAddr::new(ip, u16::from_be(backend.port));
        let route = routes
            .entry(ip)
            .or_insert_with(|| snat::egress(addr).map_err(|e| e.to_string()));
        match route.clone() {
            Ok(Egress::From(local)) if ip.is_ipv4() && local.is_ipv4() => {
                backend.snat_addr = snat::addr_of(local);
            }
            Ok(Egress::From(_)) => {
                relay_only.insert(rule_id);
            }
            Ok(Egress::Local) => {
                tracing::info!("backend {addr} is this host: its rule is carried by the relay");
                relay_only.insert(rule_id);
            }
            Err(e) => {
                tracing::warn!(
                    "no route to backend {addr} ({e}): its rule is carried by the relay"
                );
                relay_only.insert(rule_id);
            }
        }
        backends.push((index, backend));
    }
    let rules = compiled
        .kernel
        .rules
        .iter()
        .map(|&(key, mut value)| {
            if relay_only.contains(&value.rule_id) {
                value.flags |= RULE_F_RELAY;
            }
            (key, value)
        })
        .collect();
    Tables {
        rules,
        backends,
        settings: settings(&compiled.kernel_settings, shortest_tcp_close(compiled)),
        acl: compiled.kernel.acl.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_limit_is_bounded_by_the_range_and_the_kernel() {
        let close = Timeouts::default().tcp_close;
        let s = settings(
            &KernelSettings {
                conntrack_size: 8,
                snat_ports: (40000, 40003),
            },
            close,
        );
        assert_eq!(
            (s.snat_port_min, s.snat_port_max, s.snat_probe_limit),
            (40000, 40003, 4)
        );
        let s = settings(&KernelSettings::default(), close);
        assert_eq!(s.snat_probe_limit, MAX_SNAT_PROBES);
    }

    #[test]
    fn closed_ports_are_reused_between_a_second_of_quiet_and_the_sweepers_turn() {
        let kernel = KernelSettings::default();
        let s = settings(&kernel, Duration::from_secs(10));
        assert_eq!(s.closed_reuse_after_ns, 1_000_000_000);
        assert_eq!(s.closed_reuse_before_ns, 9_000_000_000);
        // No window left: no reuse at all.
        for close in [
            Duration::from_secs(2),
            Duration::from_millis(500),
            Duration::ZERO,
        ] {
            let s = settings(&kernel, close);
            assert_eq!((s.closed_reuse_after_ns, s.closed_reuse_before_ns), (0, 0));
        }
    }
}
