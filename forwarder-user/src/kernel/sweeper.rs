//! Expiring idle flows: a tokio task that removes conntrack pairs past
//! their rule's timeouts (which frees their SNAT port) and the relay-flow
//! entries the kernel made for flows the relay never claimed.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use aya::maps::{HashMap, MapData};
use forwarder_common::host_nat::{CT_DIR_HOST_IN, CT_DIR_HOST_OUT, host_hold_ns};
use forwarder_common::{
    Addr, CT_DIR_FORWARD, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, CT_STATE_RESET,
    CtKey, CtValue, PROTO_TCP, RELAY_OWNER_KERNEL, RelayFlow,
};

use super::snat::ip_of;
use crate::rules::Timeouts;

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into the timespec given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Timeouts by rule id.
#[derive(Clone, Debug, Default)]
pub struct RuleTimeouts(pub Vec<Option<Timeouts>>);

impl RuleTimeouts {
    /// Sets the timeouts of these rules' ids; other ids keep theirs (flows
    /// of removed rules end by their own rule's timeouts).
    pub fn set(&mut self, listeners: &[crate::rules::Listener]) {
        for l in listeners {
            let id = l.rule_id as usize;
            if self.0.len() <= id {
                self.0.resize(id + 1, None);
            }
            self.0[id] = Some(l.timeouts);
        }
    }

    fn get(&self, rule_id: u32) -> Timeouts {
        self.0
            .get(rule_id as usize)
            .copied()
            .flatten()
            .unwrap_or_default()
    }

    /// How long a kernel flow of `rule_id` may be idle (see [`idle_limit`]).
    fn flow(&self, rule_id: u32, proto: u8, pair: Pair) -> Duration {
        idle_limit(&self.get(rule_id), proto, pair)
    }

    /// How long the pair that starts with `entry` may be idle: a host flow
    /// moved off a kernel flow's port keeps its new port as long as the
    /// host's conntrack may keep the flow.
    fn pair_limit(&self, entry: &CtValue, proto: u8, pair: Pair) -> Duration {
        if is_host(entry) {
            Duration::from_nanos(host_hold_ns(proto))
        } else {
            self.flow(entry.rule_id, proto, pair)
        }
    }

    /// How long a relay flow the kernel entered may go unclaimed and idle.
    fn unclaimed(&self, rule_id: u32, proto: u8) -> Duration {
        let t = self.get(rule_id);
        if proto == PROTO_TCP {
            t.connect
        } else {
            t.udp_idle
        }
    }

    /// A sweep period that expires flows soon after their shortest timeout.
    pub fn period(&self) -> Duration {
        let shortest = self
            .0
            .iter()
            .flatten()
            .flat_map(|t| {
                [
                    t.udp_idle,
                    t.udp_unreplied,
                    t.tcp_half_closed,
                    t.tcp_close,
                    t.connect,
                ]
            })
            .min()
            .unwrap_or(Duration::from_secs(10));
        (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// How long a backend holds TIME_WAIT after closing first (Linux's fixed
/// TCP_TIMEWAIT_LEN). The pair, and so its SNAT port, stays at least this
/// long: a new flow on that port would meet the TIME_WAIT, which answers a
/// SYN it cannot tell from an old one with a bare ACK, and the client
/// would retry a second later.
pub const BACKEND_TIME_WAIT: Duration = Duration::from_secs(60);

/// Where a kernel flow is in its life, read from its pair of entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The backend has not answered: no SYN-ACK (TCP), no datagram back (UDP).
    Unanswered,
    Established,
    /// TCP: FIN one way only; the other side may still be sending.
    HalfClosed,
    /// TCP: FIN both ways.
    Closed,
    /// TCP: RST either way. Nobody holds TIME_WAIT.
    Reset,
}

/// The states of a flow's two entries (`CT_STATE_*`), and whether the
/// backend sent the first FIN. A lone entry (its pair gone) is given as both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    pub forward: u8,
    pub reverse: u8,
    pub backend_closed_first: bool,
}

impl Pair {
    /// From the entries as they are in the map; `reverse` may be gone.
    fn of(forward: &CtValue, reverse: Option<&CtValue>) -> Pair {
        let reverse = reverse.unwrap_or(forward);
        Pair {
            forward: forward.state,
            reverse: reverse.state,
            backend_closed_first: reverse.direction != CT_DIR_FORWARD
                && reverse.state == CT_STATE_CLOSING
                && reverse.closed_first != 0,
        }
    }

    pub fn phase(&self, proto: u8) -> Phase {
        let (fwd, rev) = (self.forward, self.reverse);
        if proto != PROTO_TCP {
            return if fwd.max(rev) == CT_STATE_NEW {
                Phase::Unanswered
            } else {
                Phase::Established
            };
        }
        let closing = u8::from(fwd == CT_STATE_CLOSING) + u8::from(rev == CT_STATE_CLOSING);
        if fwd == CT_STATE_RESET || rev == CT_STATE_RESET {
            Phase::Reset
        } else if closing == 2 {
            Phase::Closed
        } else if rev == CT_STATE_NEW && fwd != CT_STATE_ESTABLISHED {
            // A client's FIN before any answer does not make the flow live longer.
            Phase::Unanswered
        } else if closing == 1 {
            Phase::HalfClosed
        } else if fwd.max(rev) == CT_STATE_ESTABLISHED {
            Phase::Established
        } else {
            Phase::Unanswered
        }
    }
}

/// How long a kernel flow may go without a packet either way: by its
/// [`Phase`], and [`BACKEND_TIME_WAIT`] at least while the backend, having
/// sent the first FIN, may hold TIME_WAIT (an RST ends that too). An
/// unanswered UDP flow never outlives an answered one.
pub fn idle_limit(t: &Timeouts, proto: u8, pair: Pair) -> Duration {
    let phase = pair.phase(proto);
    let limit = match phase {
        Phase::Unanswered if proto == PROTO_TCP => t.connect,
        Phase::Unanswered => t.udp_unanswered(),
        Phase::Established if proto == PROTO_TCP => t.tcp_established,
        Phase::Established => t.udp_idle,
        Phase::HalfClosed => t.tcp_half_closed,
        Phase::Closed | Phase::Reset => t.tcp_close,
    };
    if pair.backend_closed_first && matches!(phase, Phase::HalfClosed | Phase::Closed) {
        limit.max(BACKEND_TIME_WAIT)
    } else {
        limit
    }
}

/// A host flow's entry (see `forwarder_common::host_nat`).
fn is_host(entry: &CtValue) -> bool {
    matches!(entry.direction, CT_DIR_HOST_OUT | CT_DIR_HOST_IN)
}

/// The entry a pair is read from: a kernel flow's forward entry, or a
/// moved host flow's outgoing one.
fn leads_pair(entry: &CtValue) -> bool {
    matches!(entry.direction, CT_DIR_FORWARD | CT_DIR_HOST_OUT)
}

/// The keys to remove from a conntrack snapshot at `now`: both entries of
/// every pair idle past its [`idle_limit`] (idle since the later of the two
/// timestamps), and reverse entries whose pair is gone. Moved host flows
/// are pairs too, held by [`host_hold_ns`].
pub fn expired_flows(
    entries: &StdHashMap<CtKey, CtValue>,
    now: u64,
    timeouts: &RuleTimeouts,
) -> Vec<CtKey> {
    let mut out = Vec::new();
    let mut paired = std::collections::HashSet::new();
    for (key, fwd) in entries.iter().filter(|(_, v)| leads_pair(v)) {
        let rkey = fwd.pair_key(key.proto);
        let rev = entries.get(&rkey);
        let last = rev.map_or(fwd.last_seen_ns, |r| r.last_seen_ns.max(fwd.last_seen_ns));
        let timeout = timeouts.pair_limit(fwd, key.proto, Pair::of(fwd, rev));
        if rev.is_some() {
            paired.insert(rkey);
        }
        if now.saturating_sub(last) > timeout.as_nanos() as u64 {
            out.push(*key);
            if rev.is_some() {
                out.push(rkey);
            }
        }
    }
    for (key, rev) in entries.iter().filter(|(_, v)| !leads_pair(v)) {
        if paired.contains(key) {
            continue;
        }
        let timeout = timeouts.pair_limit(rev, key.proto, Pair::of(rev, Some(rev)));
        if now.saturating_sub(rev.last_seen_ns) > timeout.as_nanos() as u64 {
            out.push(*key);
        }
    }
    out
}

/// The relay-flow entries the kernel made that the relay never claimed
/// and that went idle.
pub fn expired_relay_flows(
    entries: &[(CtKey, RelayFlow)],
    now: u64,
    timeouts: &RuleTimeouts,
) -> Vec<CtKey> {
    entries
        .iter()
        .filter(|(key, flow)| {
            flow.owner == RELAY_OWNER_KERNEL
                && now.saturating_sub(flow.last_seen_ns)
                    > timeouts.unclaimed(flow.rule_id, key.proto).as_nanos() as u64
        })
        .map(|(key, _)| *key)
        .collect()
}

/// Sizes the sweeper saw last.
#[derive(Debug, Default)]
pub struct Gauges {
    pub conntrack_entries: AtomicU64,
    pub relay_flow_entries: AtomicU64,
    pub expired_flows: AtomicU64,
    /// Flows the conntrack table holds at most (fixed at start).
    pub conntrack_capacity: AtomicU64,
    /// SNAT ports each (source address, backend) pair can hand out.
    pub snat_ports: AtomicU64,
    /// At the last sweep, SNAT ports in use toward the busiest backend:
    /// the pair that runs out first.
    pub snat_busiest: AtomicU64,
    /// At the last sweep, SNAT ports in use per source address and backend.
    pub snat_use: Mutex<Vec<SnatUse>>,
    /// At the last sweep, host flows moved off a kernel flow's SNAT port.
    pub host_flows_moved: AtomicU64,
    /// Passes completed.
    pub passes: AtomicU64,
    /// How long the last pass took, and all passes together (nanoseconds).
    pub last_pass_ns: AtomicU64,
    pub passes_ns: AtomicU64,
    /// The rule ids the entries of the last pass held: a reload hands out
    /// no id a flow still has.
    pub rule_ids: Mutex<HashSet<u32>>,
}

pub struct Sweeper {
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub relay_flows: HashMap<MapData, CtKey, RelayFlow>,
    /// Shared with reloads, which add the timeouts of new rule ids.
    pub timeouts: Arc<RwLock<RuleTimeouts>>,
    /// Upper bound on entries read per pass (the map sizes).
    pub limit: usize,
    pub gauges: Arc<Gauges>,
}

/// SNAT ports in use toward one backend from one source address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct SnatUse {
    pub source: std::net::IpAddr,
    pub backend: std::net::SocketAddr,
    pub protocol: &'static str,
    pub ports: u64,
}

/// The SNAT ports each (source address, backend, protocol) holds among
/// the forward entries that stay (each such entry is one port), sorted.
fn snat_use(entries: &StdHashMap<CtKey, CtValue>, expired: &[CtKey]) -> Vec<SnatUse> {
    let gone: HashSet<&CtKey> = expired.iter().collect();
    let mut per_pair: StdHashMap<(Addr, Addr, u16, u8), u64> = StdHashMap::new();
    for (key, value) in entries {
        // preserve_client_ip flows keep the client's address: no SNAT port
        // (a moved host flow keeps its address and holds one).
        let preserved = value.direction == CT_DIR_FORWARD && value.new_src == key.src;
        if !leads_pair(value) || preserved || gone.contains(key) {
            continue;
        }
        *per_pair
            .entry((value.new_src, value.new_dst, value.new_dport, key.proto))
            .or_default() += 1;
    }
    let mut out: Vec<SnatUse> = per_pair
        .into_iter()
        .map(|((src, dst, dport, proto), ports)| SnatUse {
            source: ip_of(&src),
            backend: std::net::SocketAddr::new(ip_of(&dst), u16::from_be(dport)),
            protocol: if proto == PROTO_TCP { "tcp" } else { "udp" },
            ports,
        })
        .collect();
    out.sort();
    out
}

/// The moved host flows among the entries that stay (one outgoing entry each).
fn moved_host_flows(entries: &StdHashMap<CtKey, CtValue>, expired: &[CtKey]) -> u64 {
    let gone: HashSet<&CtKey> = expired.iter().collect();
    entries
        .iter()
        .filter(|(key, value)| value.direction == CT_DIR_HOST_OUT && !gone.contains(key))
        .count() as u64
}

impl Sweeper {
    /// One pass; returns how many flows expired.
    pub fn sweep(&mut self) -> usize {
        let started = std::time::Instant::now();
        let timeouts = self.timeouts();
        let now = monotonic_ns();
        let keys: Vec<CtKey> = self
            .conntrack
            .keys()
            .take(self.limit)
            .filter_map(Result::ok)
            .collect();
        let entries: StdHashMap<CtKey, CtValue> = keys
            .into_iter()
            .filter_map(|k| self.conntrack.get(&k, 0).ok().map(|v| (k, v)))
            .collect();
        let expired = expired_flows(&entries, now, &timeouts);
        let mut flows = 0;
        for key in &expired {
            let Some(seen) = entries.get(key) else {
                continue;
            };
            // A packet since the snapshot keeps the flow; its pair stays too
            // because the next pass sees both again.
            if let Ok(current) = self.conntrack.get(key, 0)
                && current.last_seen_ns != seen.last_seen_ns
            {
                continue;
            }
            if self.conntrack.remove(key).is_ok() && seen.direction == CT_DIR_FORWARD {
                flows += 1;
            }
        }
        let relay: Vec<(CtKey, RelayFlow)> = self
            .relay_flows
            .iter()
            .take(self.limit)
            .filter_map(Result::ok)
            .collect();
        for key in expired_relay_flows(&relay, now, &timeouts) {
            let _ = self.relay_flows.remove(&key);
        }
        let g = &self.gauges;
        g.conntrack_entries.store(
            entries.len().saturating_sub(expired.len()) as u64,
            Ordering::Relaxed,
        );
        g.relay_flow_entries
            .store(relay.len() as u64, Ordering::Relaxed);
        g.expired_flows.fetch_add(flows as u64, Ordering::Relaxed);
        let snat = snat_use(&entries, &expired);
        let busiest = snat.iter().map(|u| u.ports).max().unwrap_or(0);
        g.snat_busiest.store(busiest, Ordering::Relaxed);
        *g.snat_use.lock().unwrap_or_else(|e| e.into_inner()) = snat;
        g.host_flows_moved
            .store(moved_host_flows(&entries, &expired), Ordering::Relaxed);
        let ids = entries
            .values()
            .map(|v| v.rule_id)
            .chain(relay.iter().map(|(_, f)| f.rule_id))
            .collect();
        *g.rule_ids.lock().unwrap_or_else(|e| e.into_inner()) = ids;
        let took = started.elapsed().as_nanos() as u64;
        g.last_pass_ns.store(took, Ordering::Relaxed);
        g.passes_ns.fetch_add(took, Ordering::Relaxed);
        g.passes.fetch_add(1, Ordering::Release);
        flows
    }

    fn timeouts(&self) -> RuleTimeouts {
        self.timeouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sweeps every `period` on the current runtime until aborted.
    pub fn spawn(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                // A reload may bring shorter timeouts.
                tokio::time::sleep(self.timeouts().period()).await;
                // The map syscalls block; a pass over a full table takes a while.
                self = match tokio::task::spawn_blocking(move || {
                    let n = self.sweep();
                    if n > 0 {
                        tracing::debug!("kernel path: {n} idle flows expired");
                    }
                    self
                })
                .await
                {
                    Ok(sweeper) => sweeper,
                    Err(_) => return,
                };
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forwarder_common::{CT_DIR_REVERSE, CT_STATE_ESTABLISHED, PROTO_UDP, addr_from_ipv4_be};

    const S: u64 = 1_000_000_000;

    fn timeouts() -> RuleTimeouts {
        RuleTimeouts(vec![Some(Timeouts {
            udp_idle: Duration::from_secs(30),
            udp_unreplied: Duration::from_secs(10),
            tcp_established: Duration::from_secs(600),
            tcp_half_closed: Duration::from_secs(100),
            tcp_close: Duration::from_secs(5),
            connect: Duration::from_secs(3),
        })])
    }

    fn pair(
        proto: u8,
        sport: u16,
        last_fwd: u64,
        last_rev: u64,
        states: (u8, u8),
    ) -> Vec<(CtKey, CtValue)> {
        let client = addr_from_ipv4_be(u32::from_ne_bytes([198, 18, 1, 2]));
        let listener = addr_from_ipv4_be(u32::from_ne_bytes([198, 18, 1, 1]));
        let snat = addr_from_ipv4_be(u32::from_ne_bytes([198, 18, 2, 1]));
        let backend = addr_from_ipv4_be(u32::from_ne_bytes([198, 18, 2, 2]));
        let key = CtKey {
            src: client,
            dst: listener,
            sport: sport.to_be(),
            dport: 7878u16.to_be(),
            proto,
            _pad: [0; 3],
        };
        let fwd = CtValue {
            new_src: snat,
            new_dst: backend,
            new_sport: (40000 + sport).to_be(),
            new_dport: 3478u16.to_be(),
            rule_id: 0,
            last_seen_ns: last_fwd,
            direction: CT_DIR_FORWARD,
            state: states.0,
            closed_first: 0,
            _pad: [0; 5],
        };
        let rkey = fwd.pair_key(key.proto);
        let rev = CtValue {
            new_src: listener,
            new_dst: client,
            new_sport: key.dport,
            new_dport: key.sport,
            last_seen_ns: last_rev,
            direction: CT_DIR_REVERSE,
            state: states.1,
            ..fwd
        };
        vec![(key, fwd), (rkey, rev)]
    }

    fn sorted(mut v: Vec<CtKey>) -> Vec<(u16, u16)> {
        let mut out: Vec<(u16, u16)> = v.drain(..).map(|k| (k.sport, k.dport)).collect();
        out.sort();
        out
    }

    /// A host flow from our SNAT address's port 40000 + `port` moved to
    /// 50000 + `port`: its outgoing and its incoming entry.
    fn host_pair(proto: u8, port: u16, last_out: u64, last_in: u64) -> Vec<(CtKey, CtValue)> {
        let snat = addr_from_ipv4_be(u32::from_ne_bytes([198, 18, 2, 1]));
        let backend = addr_from_ipv4_be(u32::from_ne_bytes([198, 18, 2, 2]));
        let out_key = CtKey {
            src: snat,
            dst: backend,
            sport: (40000 + port).to_be(),
            dport: 3478u16.to_be(),
            proto,
            _pad: [0; 3],
        };
        let out = CtValue {
            new_src: snat,
            new_dst: backend,
            new_sport: (50000 + port).to_be(),
            new_dport: 3478u16.to_be(),
            rule_id: forwarder_common::host_nat::HOST_RULE_ID,
            last_seen_ns: last_out,
            direction: CT_DIR_HOST_OUT,
            state: CT_STATE_NEW,
            closed_first: 0,
            _pad: [0; 5],
        };
        let in_key = out.pair_key(proto);
        let back = CtValue {
            new_src: backend,
            new_dst: snat,
            new_sport: out_key.dport,
            new_dport: out_key.sport,
            last_seen_ns: last_in,
            direction: CT_DIR_HOST_IN,
            ..out
        };
        vec![(out_key, out), (in_key, back)]
    }

    #[test]
    fn a_moved_host_flow_keeps_its_port_as_long_as_the_hosts_conntrack_may_keep_the_flow() {
        let now = 10 * 24 * 3600 * S;
        let mut entries: StdHashMap<CtKey, CtValue> = StdHashMap::new();
        // UDP: 179 s idle stays, 181 s goes (both entries); a recent
        // answer alone keeps the pair (the port is its incoming key).
        entries.extend(host_pair(PROTO_UDP, 1, now - 179 * S, now - 179 * S));
        let udp_dead = host_pair(PROTO_UDP, 2, now - 181 * S, now - 181 * S);
        entries.extend(udp_dead.clone());
        entries.extend(host_pair(PROTO_UDP, 3, now - 181 * S, now - S));
        // TCP: a day idle stays, six go.
        entries.extend(host_pair(
            PROTO_TCP,
            4,
            now - 24 * 3600 * S,
            now - 24 * 3600 * S,
        ));
        let tcp_dead = host_pair(
            PROTO_TCP,
            5,
            now - 6 * 24 * 3600 * S,
            now - 6 * 24 * 3600 * S,
        );
        entries.extend(tcp_dead.clone());
        // An incoming entry alone, idle past the hold: goes.
        let lone = host_pair(PROTO_UDP, 6, 0, now - 181 * S)[1];
        entries.insert(lone.0, lone.1);
        let mut want: Vec<CtKey> = udp_dead.iter().chain(&tcp_dead).map(|(k, _)| *k).collect();
        want.push(lone.0);
        assert_eq!(
            sorted(expired_flows(&entries, now, &timeouts())),
            sorted(want)
        );
        // Each moved flow holds one of our ports toward its backend.
        let udp_pairs: StdHashMap<CtKey, CtValue> = (1..=3)
            .flat_map(|p| host_pair(PROTO_UDP, p, now, now))
            .collect();
        let used = snat_use(&udp_pairs, &[]);
        assert_eq!(used.len(), 1, "{used:?}");
        assert_eq!(used[0].ports, 3);
        assert_eq!(moved_host_flows(&udp_pairs, &[]), 3);
        let gone: Vec<CtKey> = host_pair(PROTO_UDP, 2, now, now)
            .iter()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(moved_host_flows(&udp_pairs, &gone), 2);
    }

    #[test]
    fn snat_use_counts_ports_of_the_busiest_backend_that_stay() {
        let est = (CT_STATE_ESTABLISHED, CT_STATE_ESTABLISHED);
        let mut entries: StdHashMap<CtKey, CtValue> = StdHashMap::new();
        for sport in 1..=3 {
            entries.extend(pair(PROTO_UDP, sport, 0, 0, est));
        }
        entries.extend(pair(PROTO_TCP, 9, 0, 0, est));
        // A flow that keeps the client's address holds no SNAT port.
        let mut preserved = pair(PROTO_UDP, 20, 0, 0, est);
        preserved[0].1.new_src = preserved[0].0.src;
        entries.extend(preserved);
        let ports = |use_: Vec<SnatUse>| -> Vec<(&'static str, u64)> {
            use_.into_iter().map(|u| (u.protocol, u.ports)).collect()
        };
        assert_eq!(ports(snat_use(&entries, &[])), [("tcp", 1), ("udp", 3)]);
        let expired = pair(PROTO_UDP, 1, 0, 0, est)
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>();
        assert_eq!(
            ports(snat_use(&entries, &expired)),
            [("tcp", 1), ("udp", 2)]
        );
        assert!(snat_use(&StdHashMap::new(), &[]).is_empty());
    }

    #[test]
    fn a_pair_lives_as_long_as_its_busier_side_and_its_further_state() {
        let now = 1000 * S;
        let est = (CT_STATE_NEW, CT_STATE_ESTABLISHED);
        let mut entries: StdHashMap<CtKey, CtValue> = StdHashMap::new();
        // UDP idle 31 s one way but 1 s the other: alive.
        entries.extend(pair(PROTO_UDP, 1, now - 31 * S, now - S, (1, 1)));
        // UDP idle 31 s both ways: expired, both entries.
        let udp_dead = pair(PROTO_UDP, 2, now - 31 * S, now - 31 * S, (1, 1));
        entries.extend(udp_dead.clone());
        // TCP never answered for 4 s (connect 3 s): expired.
        let syn_dead = pair(
            PROTO_TCP,
            3,
            now - 4 * S,
            now - 4 * S,
            (CT_STATE_NEW, CT_STATE_NEW),
        );
        entries.extend(syn_dead.clone());
        // TCP established, idle 4 s: alive.
        entries.extend(pair(PROTO_TCP, 4, now - 4 * S, now - 4 * S, est));
        // TCP closed (FIN seen both ways) idle 6 s: expired.
        let closed = pair(
            PROTO_TCP,
            5,
            now - 6 * S,
            now - 6 * S,
            (CT_STATE_CLOSING, CT_STATE_CLOSING),
        );
        entries.extend(closed.clone());
        // A reverse entry whose forward entry is gone, idle 31 s: expired.
        let orphan = pair(PROTO_UDP, 6, now - 31 * S, now - 31 * S, (1, 1))[1];
        entries.insert(orphan.0, orphan.1);
        let expired = expired_flows(&entries, now, &timeouts());
        let mut want: Vec<CtKey> = udp_dead
            .iter()
            .chain(&syn_dead)
            .chain(&closed)
            .map(|(k, _)| *k)
            .collect();
        want.push(orphan.0);
        assert_eq!(sorted(expired), sorted(want));
    }

    #[test]
    fn a_pair_the_backend_closed_first_keeps_its_port_through_time_wait() {
        let now = 1000 * S;
        let closing = (CT_STATE_CLOSING, CT_STATE_CLOSING);
        let backend_first = |sport: u16, idle: u64| {
            let mut p = pair(PROTO_TCP, sport, now - idle * S, now - idle * S, closing);
            p[1].1.closed_first = 1;
            p
        };
        let mut entries: StdHashMap<CtKey, CtValue> = StdHashMap::new();
        // Past tcp_close (5 s), within the backend's TIME_WAIT: kept.
        entries.extend(backend_first(1, 30));
        // Past the TIME_WAIT too: expired, both entries.
        let old = backend_first(2, 61);
        entries.extend(old.clone());
        // The client closed first: tcp_close alone applies.
        let mut client_first = pair(PROTO_TCP, 3, now - 6 * S, now - 6 * S, closing);
        client_first[0].1.closed_first = 1;
        entries.extend(client_first.clone());
        // A reverse entry alone, the backend's close first, idle 30 s: kept.
        let orphan = backend_first(4, 30)[1];
        entries.insert(orphan.0, orphan.1);
        let expired = expired_flows(&entries, now, &timeouts());
        let want: Vec<CtKey> = old.iter().chain(&client_first).map(|(k, _)| *k).collect();
        assert_eq!(sorted(expired), sorted(want));
    }

    #[test]
    fn the_phase_follows_both_entries_states() {
        use Phase::*;
        let (n, e, c, r) = (
            CT_STATE_NEW,
            CT_STATE_ESTABLISHED,
            CT_STATE_CLOSING,
            CT_STATE_RESET,
        );
        let phase = |proto, forward, reverse| {
            Pair {
                forward,
                reverse,
                backend_closed_first: false,
            }
            .phase(proto)
        };
        for (fwd, rev, want) in [(n, n, Unanswered), (n, e, Established), (e, e, Established)] {
            assert_eq!(phase(PROTO_UDP, fwd, rev), want, "udp {fwd} {rev}");
        }
        let tcp = [
            (n, n, Unanswered),
            (n, e, Established),
            (e, e, Established),
            (c, e, HalfClosed),
            (n, c, HalfClosed),
            (e, c, HalfClosed),
            // The client closed before the backend ever answered.
            (c, n, Unanswered),
            (c, c, Closed),
            (r, n, Reset),
            (r, e, Reset),
            (r, c, Reset),
            (n, r, Reset),
            (c, r, Reset),
            (r, r, Reset),
        ];
        for (fwd, rev, want) in tcp {
            assert_eq!(phase(PROTO_TCP, fwd, rev), want, "tcp {fwd} {rev}");
        }
    }

    /// Each phase's limit, exactly: a pair idle for it stays, one idle a
    /// nanosecond longer goes (both entries).
    #[test]
    fn each_phase_expires_exactly_past_its_limit() {
        let (n, e, c, r) = (
            CT_STATE_NEW,
            CT_STATE_ESTABLISHED,
            CT_STATE_CLOSING,
            CT_STATE_RESET,
        );
        // (what, proto, states, backend closed first, limit in s)
        let cases = [
            (
                "udp unanswered: udp_unreplied",
                PROTO_UDP,
                (n, n),
                false,
                10,
            ),
            ("udp answered: udp_idle", PROTO_UDP, (n, e), false, 30),
            (
                "tcp before the SYN-ACK: connect",
                PROTO_TCP,
                (n, n),
                false,
                3,
            ),
            (
                "tcp client FIN, no answer: connect",
                PROTO_TCP,
                (c, n),
                false,
                3,
            ),
            ("tcp established", PROTO_TCP, (n, e), false, 600),
            ("tcp client half-closed", PROTO_TCP, (c, e), false, 100),
            ("tcp backend half-closed", PROTO_TCP, (e, c), true, 100),
            (
                "tcp closed, client first: tcp_close",
                PROTO_TCP,
                (c, c),
                false,
                5,
            ),
            (
                "tcp closed, backend first: TIME_WAIT",
                PROTO_TCP,
                (c, c),
                true,
                60,
            ),
            (
                "tcp reset by the backend: tcp_close",
                PROTO_TCP,
                (n, r),
                false,
                5,
            ),
            (
                "tcp reset by the client: tcp_close",
                PROTO_TCP,
                (r, e),
                false,
                5,
            ),
            (
                "tcp reset after the backend's FIN",
                PROTO_TCP,
                (r, c),
                true,
                5,
            ),
        ];
        let now = 100_000 * S;
        for (what, proto, states, backend_first, limit) in cases {
            let mut entries: StdHashMap<CtKey, CtValue> = StdHashMap::new();
            let idle_for = |sport: u16, idle: u64| {
                let mut p = pair(proto, sport, now - idle, now - idle, states);
                p[1].1.closed_first = u8::from(backend_first);
                p[0].1.closed_first = u8::from(!backend_first && states.0 >= c);
                p
            };
            entries.extend(idle_for(1, limit * S));
            let past = idle_for(2, limit * S + 1);
            entries.extend(past.clone());
            let expired = expired_flows(&entries, now, &timeouts());
            let want: Vec<CtKey> = past.iter().map(|(k, _)| *k).collect();
            assert_eq!(sorted(expired), sorted(want), "{what}");
        }
    }

    #[test]
    fn an_unanswered_udp_flow_never_outlives_an_answered_one() {
        let t = Timeouts {
            udp_idle: Duration::from_secs(5),
            udp_unreplied: Duration::from_secs(30),
            ..Timeouts::default()
        };
        let unanswered = Pair {
            forward: CT_STATE_NEW,
            reverse: CT_STATE_NEW,
            backend_closed_first: false,
        };
        assert_eq!(
            idle_limit(&t, PROTO_UDP, unanswered),
            Duration::from_secs(5)
        );
        let d = Timeouts::default();
        assert_eq!(
            (d.udp_unreplied, d.tcp_half_closed),
            (Duration::from_secs(30), Duration::from_secs(120))
        );
    }

    #[test]
    fn a_half_closed_pair_the_backend_closed_keeps_its_port_through_time_wait() {
        let t = Timeouts {
            tcp_half_closed: Duration::from_secs(20),
            ..Timeouts::default()
        };
        let pair = |backend_closed_first| Pair {
            forward: CT_STATE_ESTABLISHED,
            reverse: CT_STATE_CLOSING,
            backend_closed_first,
        };
        assert_eq!(
            idle_limit(&t, PROTO_TCP, pair(false)),
            Duration::from_secs(20)
        );
        assert_eq!(idle_limit(&t, PROTO_TCP, pair(true)), BACKEND_TIME_WAIT);
    }

    #[test]
    fn only_unclaimed_idle_relay_entries_expire() {
        let now = 10_000 * S;
        let key = |port: u16, proto: u8| CtKey {
            sport: port.to_be(),
            proto,
            ..CtKey::default()
        };
        let flow = |owner: u8, idle: u64| RelayFlow {
            last_seen_ns: now - idle * S,
            rule_id: 0,
            owner,
            _pad: [0; 3],
        };
        let entries = vec![
            (key(1, PROTO_UDP), flow(RELAY_OWNER_KERNEL, 31)),
            (key(2, PROTO_UDP), flow(RELAY_OWNER_KERNEL, 29)),
            (key(3, PROTO_TCP), flow(RELAY_OWNER_KERNEL, 4)),
            (
                key(4, PROTO_UDP),
                flow(forwarder_common::RELAY_OWNER_RELAY, 3000),
            ),
        ];
        let expired = expired_relay_flows(&entries, now, &timeouts());
        assert_eq!(sorted(expired), vec![(1u16.to_be(), 0), (3u16.to_be(), 0)]);
    }

    #[test]
    fn idle_exactly_the_timeout_is_kept_and_a_nanosecond_more_expires() {
        let now = 1000 * S;
        let idle = 30 * S; // udp_idle
        for (extra, gone) in [(0, false), (1, true)] {
            let last = now - idle - extra;
            let mut entries: StdHashMap<CtKey, CtValue> = StdHashMap::new();
            entries.extend(pair(PROTO_UDP, 1, last, last, (1, 1)));
            let orphan = pair(PROTO_UDP, 2, last, last, (1, 1))[1];
            entries.insert(orphan.0, orphan.1);
            let expired = expired_flows(&entries, now, &timeouts());
            assert_eq!(
                expired.len(),
                if gone { 3 } else { 0 },
                "idle {extra} ns past"
            );

            let relay = [(
                CtKey {
                    proto: PROTO_UDP,
                    ..CtKey::default()
                },
                RelayFlow {
                    last_seen_ns: last,
                    rule_id: 0,
                    owner: RELAY_OWNER_KERNEL,
                    _pad: [0; 3],
                },
            )];
            let expired = expired_relay_flows(&relay, now, &timeouts());
            assert_eq!(
                expired.len(),
                usize::from(gone),
                "unclaimed {extra} ns past"
            );
        }
    }

    #[test]
    fn set_replaces_the_given_rules_timeouts_and_keeps_the_others() {
        let with_connect = |rule_id: u32, secs: u64| crate::rules::Listener {
            rule_id,
            alias: format!("r{rule_id}"),
            protocol: crate::rules::Protocol::Tcp,
            bind: "127.0.0.1:7878".parse().unwrap(),
            listen_picked: false,
            ports: crate::rules::ListenPorts::SINGLE,
            backends: Vec::new(),
            timeouts: Timeouts {
                connect: Duration::from_secs(secs),
                ..Timeouts::default()
            },
            path: crate::rules::PathMode::Auto,
            preserve_client_ip: false,
            proxy: Default::default(),
            health: None,
            acl: None,
            max_connections: None,
        };
        let connect = |t: &RuleTimeouts| -> Vec<Option<u64>> {
            t.0.iter().map(|t| t.map(|t| t.connect.as_secs())).collect()
        };
        let mut t = RuleTimeouts::default();
        t.set(&[with_connect(0, 3), with_connect(2, 7)]);
        assert_eq!(connect(&t), [Some(3), None, Some(7)]);
        // A reload that changes rule 2 only: rule 0's flows keep theirs.
        t.set(&[with_connect(2, 9)]);
        assert_eq!(connect(&t), [Some(3), None, Some(9)]);
    }

    #[test]
    fn the_period_follows_the_shortest_timeout() {
        assert_eq!(timeouts().period(), Duration::from_millis(750));
        assert_eq!(
            RuleTimeouts::default().period(),
            Duration::from_millis(2500)
        );
    }
}
