//! Filling RULES, BACKENDS, SETTINGS and ACL from the compiled rule table.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use forwarder_common::{
    AclKey, BACKEND_F_HEALTHY, Backend, MAX_BACKENDS_PER_RULE, MAX_SNAT_PROBES, RULE_F_RELAY,
    RuleKey, RuleValue, Settings,
    snat::{BACKEND_F_SNAT_POOL, SnatPool},
};

use super::interfaces::{self, Interface};
use super::netlink;
use super::snat::{self, Egress};
use crate::rules::{Compiled, KernelSettings, Protocol, RangeEntry, Timeouts};

/// The kernel's tables, snat addresses filled in.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub rules: Vec<(RuleKey, RuleValue)>,
    pub backends: Vec<(u32, Backend)>,
    pub settings: Settings,
    /// `ACL` trie entries: (key prefix length, key data, verdict).
    pub acl: Vec<(u32, AclKey, u32)>,
    /// `kernel.snat_addresses`, for backends flagged `BACKEND_F_SNAT_POOL`.
    pub pool: SnatPool,
    /// `RANGES` trie entries: a range rule's value once per block.
    pub ranges: Vec<RangeEntry>,
}

impl Tables {
    /// Every rule's value: single ports' and each range block's.
    pub fn values(&self) -> impl Iterator<Item = &RuleValue> {
        let ranges = self.ranges.iter().map(|e| &e.value.rule);
        self.rules.iter().map(|(_, v)| v).chain(ranges)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut RuleValue> {
        let ranges = self.ranges.iter_mut().map(|e| &mut e.value.rule);
        self.rules.iter_mut().map(|(_, v)| v).chain(ranges)
    }

    /// How many range rules there are (each has several blocks).
    pub fn range_rules(&self) -> u32 {
        let ids: HashSet<u32> = self.ranges.iter().map(|e| e.value.rule.rule_id).collect();
        ids.len() as u32
    }

    /// How many rules there are, a range counting once.
    pub fn rule_count(&self) -> usize {
        self.rules.len() + self.range_rules() as usize
    }

    /// Sets the healthy flag of rule `rule_id`'s backends (in order) and its
    /// total weight to the sum of the healthy ones' weights.
    pub fn set_health(&mut self, rule_id: u32, healthy: &[bool]) {
        let mut total = 0u32;
        for (index, backend) in &mut self.backends {
            if *index / MAX_BACKENDS_PER_RULE != rule_id {
                continue;
            }
            let up = healthy
                .get((*index % MAX_BACKENDS_PER_RULE) as usize)
                .copied()
                .unwrap_or(true);
            if up {
                backend.flags |= BACKEND_F_HEALTHY;
                total += u32::from(backend.weight);
            } else {
                backend.flags &= !BACKEND_F_HEALTHY;
            }
        }
        for value in self.values_mut() {
            if value.rule_id == rule_id {
                value.total_weight = total;
            }
        }
    }

    /// Takes over the health of `from`'s backends for the rules `kept`
    /// says (same id, same backends), in one pass over each table: a
    /// reload of thousands of rules must not look up each one.
    pub fn keep_health(&mut self, from: &Tables, kept: impl Fn(u32) -> bool) {
        let down: HashSet<u32> = from
            .backends
            .iter()
            .filter(|(index, b)| {
                b.flags & BACKEND_F_HEALTHY == 0 && kept(index / MAX_BACKENDS_PER_RULE)
            })
            .map(|(index, _)| *index)
            .collect();
        if down.is_empty() {
            return;
        }
        let affected: HashSet<u32> = down.iter().map(|i| i / MAX_BACKENDS_PER_RULE).collect();
        let mut totals: HashMap<u32, u32> = HashMap::new();
        for (index, backend) in &mut self.backends {
            let rule_id = *index / MAX_BACKENDS_PER_RULE;
            if !affected.contains(&rule_id) {
                continue;
            }
            let total = totals.entry(rule_id).or_default();
            if down.contains(index) {
                backend.flags &= !BACKEND_F_HEALTHY;
            } else {
                backend.flags |= BACKEND_F_HEALTHY;
                *total += u32::from(backend.weight);
            }
        }
        for value in self.values_mut() {
            if let Some(&total) = totals.get(&value.rule_id) {
                value.total_weight = total;
            }
        }
    }

    /// The healthy flags of rule `rule_id`'s backends, in order.
    #[cfg(test)]
    pub fn health(&self, rule_id: u32) -> Vec<bool> {
        let mut of_rule: Vec<(u32, bool)> = self
            .backends
            .iter()
            .filter(|(index, _)| index / MAX_BACKENDS_PER_RULE == rule_id)
            .map(|(index, b)| (*index, b.flags & BACKEND_F_HEALTHY != 0))
            .collect();
        of_rule.sort_unstable();
        of_rule.into_iter().map(|(_, up)| up).collect()
    }
}

/// A closed flow's SNAT port may go to a new flow after this much quiet
/// (Linux reuses a TIME_WAIT port for a new connection after 1 s too).
pub const CLOSED_REUSE_AFTER: Duration = Duration::from_secs(1);

/// An unanswered UDP flow's SNAT port may go to a new flow, when no port
/// is free, after this much quiet: a backend that answers at all answers
/// sooner, and a flood of one-datagram flows cannot hold the range longer.
pub const UNANSWERED_REUSE_AFTER: Duration = Duration::from_secs(1);

/// The kernel stops reusing a flow's port this long before the sweeper
/// may remove it, so that the two never act on one pair.
pub const SWEEPER_GUARD: Duration = Duration::from_secs(1);

/// The shortest timeouts of the rules that decide when ports are reused.
#[derive(Clone, Copy, Debug)]
pub struct Shortest {
    /// The least `tcp_close` of any TCP rule.
    pub tcp_close: Duration,
    /// The least unanswered timeout (`udp_unreplied`, at most `udp_idle`)
    /// of any UDP rule.
    pub udp_unanswered: Duration,
}

impl Default for Shortest {
    fn default() -> Shortest {
        let t = Timeouts::default();
        Shortest {
            tcp_close: t.tcp_close,
            udp_unanswered: t.udp_unanswered(),
        }
    }
}

/// The reuse window `[after, sweeper's timeout - guard)`, or none (0, 0)
/// when that is empty.
fn reuse_window(after: Duration, timeout: Duration) -> (u64, u64) {
    let before = timeout.saturating_sub(SWEEPER_GUARD);
    if before > after {
        (after.as_nanos() as u64, before.as_nanos() as u64)
    } else {
        (0, 0)
    }
}

/// Settings for the SNAT range `ports` (inclusive), with port reuse of
/// closed TCP and unanswered UDP flows up to the sweeper's turn.
pub fn settings(kernel: &KernelSettings, shortest: Shortest) -> Settings {
    let (min, max) = kernel.snat_ports;
    // (address, port) pairs: with a pool, probes spread over its addresses.
    let addrs = kernel.snat_addresses.len().max(1) as u32;
    let span = (u32::from(max.saturating_sub(min)) + 1) * addrs;
    let (closed_after, closed_before) = reuse_window(CLOSED_REUSE_AFTER, shortest.tcp_close);
    let (unanswered_after, unanswered_before) =
        reuse_window(UNANSWERED_REUSE_AFTER, shortest.udp_unanswered);
    Settings {
        snat_port_min: min,
        snat_port_max: max,
        snat_probe_limit: span.min(MAX_SNAT_PROBES),
        closed_reuse_after_ns: closed_after,
        closed_reuse_before_ns: closed_before,
        unanswered_reuse_after_ns: unanswered_after,
        unanswered_reuse_before_ns: unanswered_before,
    }
}

/// The shortest timeouts of the compiled rules (defaults where a protocol
/// has no rule).
fn shortest(compiled: &Compiled) -> Shortest {
    let of = |protocol: Protocol, pick: fn(&Timeouts) -> Duration| {
        compiled
            .listeners
            .iter()
            .filter(|l| l.protocol == protocol)
            .map(|l| pick(&l.timeouts))
            .min()
    };
    let default = Shortest::default();
    Shortest {
        tcp_close: of(Protocol::Tcp, |t| t.tcp_close).unwrap_or(default.tcp_close),
        udp_unanswered: of(Protocol::Udp, Timeouts::udp_unanswered)
            .unwrap_or(default.udp_unanswered),
    }
}

/// Looks up the route to every backend: fills `snat_addr`, and makes a
/// rule relay-only when a backend is on this host, is not IPv4 (the kernel
/// path is IPv4 for now), has no route, or is reached through an interface
/// not in `served` (its replies would arrive where no program restores
/// them). A backend whose route leaves by the interface every
/// `kernel.snat_addresses` address is on takes the pool; any other keeps
/// its route's address, with a warning. An address this host does not
/// own is an error.
pub fn prepare(compiled: &Compiled, served: &[Interface]) -> anyhow::Result<Tables> {
    let pool_addrs = &compiled.kernel_settings.snat_addresses;
    let owned = match pool_addrs.is_empty() {
        true => HashMap::new(),
        false => snat::local_ipv4().map_err(|e| {
            anyhow::anyhow!("kernel.snat_addresses: listing this host's addresses: {e}")
        })?,
    };
    let missing = snat::not_owned(pool_addrs, &owned);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
        anyhow::bail!(
            "kernel.snat_addresses: {} of this host (in this network namespace); add it to \
             the interface toward the backends (`ip addr add {}/32 dev IFACE`) or remove it \
             from the list",
            match list.len() {
                1 => format!("{} is not an address", list[0]),
                _ => format!("{} are not addresses", list.join(", ")),
            },
            missing[0]
        );
    }
    let mut pooled_oifs: HashMap<IpAddr, bool> = HashMap::new();
    let mut relay_only: HashSet<u32> = HashSet::new();
    let mut backends = Vec::with_capacity(compiled.kernel.backends.len());
    // The route depends on the address alone; thousands of rules often
    // share a few backends.
    let mut routes: HashMap<IpAddr, Result<Egress, String>> = HashMap::new();
    let mut oifs: HashMap<IpAddr, Option<String>> = HashMap::new();
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
                if !pool_addrs.is_empty()
                    && *pooled_oifs
                        .entry(ip)
                        .or_insert_with(|| takes_pool(ip, local, pool_addrs, &owned))
                {
                    backend.flags |= BACKEND_F_SNAT_POOL;
                }
                if let Some(out) = unserved_egress(ip, served, &mut oifs) {
                    tracing::warn!(
                        "backend {addr} is reached through {out}, which the kernel path does not \
                         serve (see `interfaces:`): its rule is carried by the relay"
                    );
                    relay_only.insert(rule_id);
                }
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
    let ranges = compiled
        .kernel
        .ranges
        .iter()
        .map(|&(mut e)| {
            if relay_only.contains(&e.value.rule.rule_id) {
                e.value.rule.flags |= RULE_F_RELAY;
            }
            e
        })
        .collect();
    let pool = SnatPool::of(
        &pool_addrs
            .iter()
            .map(|a| u32::from_ne_bytes(a.octets()))
            .collect::<Vec<u32>>(),
    );
    Ok(Tables {
        rules,
        backends,
        settings: settings(&compiled.kernel_settings, shortest(compiled)),
        acl: compiled.kernel.acl.clone(),
        ranges,
        pool,
    })
}

/// Whether the flows toward backend `ip` (whose route leaves from `local`)
/// may leave from every pool address: all are on the route's interface.
/// Warns once per backend address when not.
fn takes_pool(
    ip: IpAddr,
    local: IpAddr,
    pool: &[std::net::Ipv4Addr],
    owned: &HashMap<std::net::Ipv4Addr, u32>,
) -> bool {
    let IpAddr::V4(v4) = ip else { return false };
    let oif = match netlink::route_oif(v4) {
        Ok(Some(oif)) => oif,
        _ => {
            tracing::warn!(
                "kernel.snat_addresses: no interface toward backend {ip}: its flows leave from \
                 {local}, its route's address"
            );
            return false;
        }
    };
    let off = snat::off_route(pool, owned, oif);
    if off.is_empty() {
        return true;
    }
    let off: Vec<String> = off.iter().map(ToString::to_string).collect();
    let name = interfaces::name_of(oif).unwrap_or_else(|| format!("interface {oif}"));
    tracing::warn!(
        "kernel.snat_addresses: backend {ip} is reached through {name}, which does not have {}: \
         its flows leave from {local}, its route's address",
        off.join(", ")
    );
    false
}

/// The name of the interface toward `ip` if the kernel path does not serve
/// it (an unknown route counts as served: the FIB decides per packet).
fn unserved_egress(
    ip: IpAddr,
    served: &[Interface],
    cache: &mut HashMap<IpAddr, Option<String>>,
) -> Option<String> {
    cache
        .entry(ip)
        .or_insert_with(|| {
            let IpAddr::V4(v4) = ip else { return None };
            let oif = netlink::route_oif(v4).ok()??;
            if served.iter().any(|i| i.ifindex == oif) {
                return None;
            }
            Some(interfaces::name_of(oif).unwrap_or_else(|| format!("interface {oif}")))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_sets_flags_and_the_total_of_healthy_weights() {
        let backend = |weight| Backend {
            weight,
            flags: BACKEND_F_HEALTHY,
            ..Backend::default()
        };
        let rule = |id, port: u16| {
            (
                RuleKey {
                    port,
                    ..RuleKey::default()
                },
                RuleValue {
                    rule_id: id,
                    backend_count: 3,
                    total_weight: 6,
                    ..RuleValue::default()
                },
            )
        };
        let m = MAX_BACKENDS_PER_RULE;
        let mut t = Tables {
            rules: vec![rule(1, 1), rule(1, 2), rule(2, 3)],
            backends: vec![
                (m + 2, backend(3)),
                (m, backend(1)),
                (m + 1, backend(2)),
                (2 * m, backend(6)),
            ],
            settings: Settings::default(),
            acl: Vec::new(),
            pool: SnatPool::default(),
            ranges: Vec::new(),
        };
        t.set_health(1, &[true, false, true]);
        assert_eq!(t.health(1), [true, false, true]);
        assert_eq!(t.health(2), [true]);
        let totals: Vec<u32> = t.rules.iter().map(|(_, v)| v.total_weight).collect();
        assert_eq!(totals, [4, 4, 6]);
        t.set_health(1, &[false, false, false]);
        assert_eq!(t.rules[0].1.total_weight, 0);
        t.set_health(1, &[true, true, true]);
        assert_eq!(t.rules[1].1.total_weight, 6);

        // A reload: rule 1 kept, rule 2 new under an id the old table had down.
        let mut running = t.clone();
        running.set_health(1, &[true, false, false]);
        running.set_health(2, &[false]);
        t.keep_health(&running, |id| id == 1);
        assert_eq!(t.health(1), [true, false, false]);
        assert_eq!(t.health(2), [true]);
        let totals: Vec<u32> = t.rules.iter().map(|(_, v)| v.total_weight).collect();
        assert_eq!(totals, [1, 1, 6]);
    }

    #[test]
    fn the_probe_limit_is_bounded_by_the_range_and_the_kernel() {
        let s = settings(
            &KernelSettings {
                conntrack_size: 8,
                snat_ports: (40000, 40003),
                snat_addresses: Vec::new(),
            },
            Shortest::default(),
        );
        assert_eq!(
            (s.snat_port_min, s.snat_port_max, s.snat_probe_limit),
            (40000, 40003, 4)
        );
        let s = settings(&KernelSettings::default(), Shortest::default());
        assert_eq!(s.snat_probe_limit, MAX_SNAT_PROBES);
        // A pool multiplies the pairs a probe may try.
        let s = settings(
            &KernelSettings {
                conntrack_size: 8,
                snat_ports: (40000, 40003),
                snat_addresses: vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
            },
            Shortest::default(),
        );
        assert_eq!(s.snat_probe_limit, 8);
    }

    #[test]
    fn closed_ports_are_reused_between_a_second_of_quiet_and_the_sweepers_turn() {
        let kernel = KernelSettings::default();
        let with_close = |tcp_close| Shortest {
            tcp_close,
            ..Shortest::default()
        };
        let s = settings(&kernel, with_close(Duration::from_secs(10)));
        assert_eq!(s.closed_reuse_after_ns, 1_000_000_000);
        assert_eq!(s.closed_reuse_before_ns, 9_000_000_000);
        // No window left: no reuse at all.
        for close in [
            Duration::from_secs(2),
            Duration::from_millis(500),
            Duration::ZERO,
        ] {
            let s = settings(&kernel, with_close(close));
            assert_eq!((s.closed_reuse_after_ns, s.closed_reuse_before_ns), (0, 0));
        }
    }

    #[test]
    fn unanswered_ports_are_reused_between_a_second_of_quiet_and_the_sweepers_turn() {
        let kernel = KernelSettings::default();
        let with_unanswered = |udp_unanswered| Shortest {
            udp_unanswered,
            ..Shortest::default()
        };
        let s = settings(&kernel, Shortest::default());
        assert_eq!(
            (s.unanswered_reuse_after_ns, s.unanswered_reuse_before_ns),
            (1_000_000_000, 29_000_000_000)
        );
        // Independent of the TCP window.
        assert_eq!(s.closed_reuse_before_ns, 9_000_000_000);
        let s = settings(&kernel, with_unanswered(Duration::from_millis(2500)));
        assert_eq!(s.unanswered_reuse_before_ns, 1_500_000_000);
        for unanswered in [Duration::from_secs(2), Duration::from_secs(1)] {
            let s = settings(&kernel, with_unanswered(unanswered));
            assert_eq!(
                (s.unanswered_reuse_after_ns, s.unanswered_reuse_before_ns),
                (0, 0)
            );
        }
    }

    #[test]
    fn the_shortest_unanswered_timeout_counts_udp_rules_only() {
        use crate::rules::{Listener, PathMode};
        let mut compiled = Compiled::default();
        let listener = |protocol, udp_unreplied: u64, udp_idle: u64| Listener {
            rule_id: 0,
            alias: "r".into(),
            protocol,
            bind: "127.0.0.1:7878".parse().unwrap(),
            listen_picked: false,
            ports: crate::rules::ListenPorts::SINGLE,
            backends: Vec::new(),
            timeouts: Timeouts {
                udp_unreplied: Duration::from_secs(udp_unreplied),
                udp_idle: Duration::from_secs(udp_idle),
                ..Timeouts::default()
            },
            path: PathMode::Auto,
            preserve_client_ip: false,
            proxy: Default::default(),
            health: None,
            acl: None,
            max_connections: None,
        };
        assert_eq!(
            shortest(&compiled).udp_unanswered,
            Duration::from_secs(30),
            "no UDP rule: the default"
        );
        compiled.listeners = vec![
            listener(Protocol::Tcp, 2, 2),
            listener(Protocol::Udp, 20, 60),
            listener(Protocol::Udp, 30, 10),
        ];
        // The TCP rule's is not a UDP flow's; the last rule's udp_idle caps its unreplied.
        assert_eq!(shortest(&compiled).udp_unanswered, Duration::from_secs(10));
    }
}
