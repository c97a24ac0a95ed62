//! Expiring idle flows: a tokio task that removes conntrack pairs past
//! their rule's timeouts (which frees their SNAT port) and the relay-flow
//! entries the kernel made for flows the relay never claimed.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use std::os::fd::AsFd;

use aya::maps::{HashMap, IterableMap, MapData};
use forwarder_common::host_nat::{CT_DIR_HOST_IN, CT_DIR_HOST_OUT, host_hold_ns};
use forwarder_common::{
    Addr, CT_DIR_FORWARD, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, CT_STATE_RESET,
    CtKey, CtValue, PROTO_TCP, RELAY_OWNER_KERNEL, RelayFlow,
};

use super::batch::{self, Cursor};
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

fn idle_past(now: u64, last_seen_ns: u64, limit: Duration) -> bool {
    now.saturating_sub(last_seen_ns) > limit.as_nanos() as u64
}

impl RuleTimeouts {
    /// The least the pair led by `lead` may be idle, whatever its other
    /// entry holds: the pair is idle since the later of its two packets,
    /// so while the lead itself has been idle no longer than this, the
    /// pair stays and a pass need not look its other entry up.
    pub fn pair_floor(&self, proto: u8, lead: &CtValue) -> Duration {
        if is_host(lead) {
            return Duration::from_nanos(host_hold_ns(proto));
        }
        let t = self.get(lead.rule_id);
        [
            CT_STATE_NEW,
            CT_STATE_ESTABLISHED,
            CT_STATE_CLOSING,
            CT_STATE_RESET,
        ]
        .into_iter()
        .flat_map(|reverse| {
            [false, true].map(|backend_closed_first| Pair {
                forward: lead.state,
                reverse,
                backend_closed_first,
            })
        })
        .map(|pair| idle_limit(&t, proto, pair))
        .min()
        .unwrap_or_default()
    }
}

/// What a pass does with one conntrack entry it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Stays. `entries`: how many entries of the table it accounts for; a
    /// lead accounts for its pair's other entry too, and an entry a lead
    /// accounts for, for none.
    Keep { entries: u64 },
    /// Goes, with the other entry of its pair if `pair`.
    Expire { pair: bool },
    /// Its pair's other entry (at `CtValue::pair_key`) decides: look it up
    /// and ask again.
    LookUpPair,
}

/// The verdict on the entry `key` at `now`. `pair` is the other entry of
/// its pair: `None` if not looked up yet, `Some(None)` if it is gone.
///
/// A lead (a kernel flow's forward entry, a moved host flow's outgoing
/// one) decides for its pair: both go once idle past their
/// [`idle_limit`], idle since the later of the two timestamps. Another
/// entry goes alone once idle past its own limit, unless a lead still
/// points at it. Moved host flows are held by [`host_hold_ns`].
pub fn verdict(
    key: &CtKey,
    entry: &CtValue,
    pair: Option<Option<&CtValue>>,
    now: u64,
    timeouts: &RuleTimeouts,
) -> Verdict {
    let proto = key.proto;
    if leads_pair(entry) {
        if !idle_past(now, entry.last_seen_ns, timeouts.pair_floor(proto, entry)) {
            return Verdict::Keep { entries: 2 };
        }
        let Some(other) = pair else {
            return Verdict::LookUpPair;
        };
        let last = other.map_or(entry.last_seen_ns, |o| {
            o.last_seen_ns.max(entry.last_seen_ns)
        });
        let limit = timeouts.pair_limit(entry, proto, Pair::of(entry, other));
        return if idle_past(now, last, limit) {
            Verdict::Expire {
                pair: other.is_some(),
            }
        } else {
            Verdict::Keep {
                entries: 1 + u64::from(other.is_some()),
            }
        };
    }
    let limit = timeouts.pair_limit(entry, proto, Pair::of(entry, Some(entry)));
    if !idle_past(now, entry.last_seen_ns, limit) {
        return Verdict::Keep { entries: 0 };
    }
    match pair {
        None => Verdict::LookUpPair,
        Some(Some(lead)) if leads_pair(lead) && lead.pair_key(proto) == *key => {
            Verdict::Keep { entries: 0 }
        }
        Some(_) => Verdict::Expire { pair: false },
    }
}

/// The [`verdict`] on the entry `key`, with the other entry of its pair
/// fetched by `look_up` if needed (returned too, if it was).
pub fn judge(
    key: &CtKey,
    entry: &CtValue,
    now: u64,
    timeouts: &RuleTimeouts,
    look_up: impl FnOnce(&CtKey) -> Option<CtValue>,
) -> (Verdict, Option<CtValue>) {
    match verdict(key, entry, None, now, timeouts) {
        Verdict::LookUpPair => {
            let pair = look_up(&entry.pair_key(key.proto));
            (
                verdict(key, entry, Some(pair.as_ref()), now, timeouts),
                pair,
            )
        }
        v => (v, None),
    }
}

/// The keys to remove from a conntrack snapshot at `now` (see [`verdict`]).
#[cfg(test)]
pub fn expired_flows(
    entries: &StdHashMap<CtKey, CtValue>,
    now: u64,
    timeouts: &RuleTimeouts,
) -> Vec<CtKey> {
    let mut out = Vec::new();
    for (key, entry) in entries {
        let (v, _) = judge(key, entry, now, timeouts, |k| entries.get(k).copied());
        if let Verdict::Expire { pair } = v {
            out.push(*key);
            if pair {
                out.push(entry.pair_key(key.proto));
            }
        }
    }
    out
}

/// Whether the relay-flow entry `key` is one the kernel made, the relay
/// never claimed, and that went idle.
pub fn relay_flow_expired(
    key: &CtKey,
    flow: &RelayFlow,
    now: u64,
    timeouts: &RuleTimeouts,
) -> bool {
    flow.owner == RELAY_OWNER_KERNEL
        && idle_past(
            now,
            flow.last_seen_ns,
            timeouts.unclaimed(flow.rule_id, key.proto),
        )
}

/// The relay-flow entries the kernel made that the relay never claimed
/// and that went idle.
#[cfg(test)]
pub fn expired_relay_flows(
    entries: &[(CtKey, RelayFlow)],
    now: u64,
    timeouts: &RuleTimeouts,
) -> Vec<CtKey> {
    entries
        .iter()
        .filter(|(key, flow)| relay_flow_expired(key, flow, now, timeouts))
        .map(|(key, _)| *key)
        .collect()
}

/// Entries a pass reads per second at most, over both maps: what bounds
/// the sweeper's CPU whatever the table's size. A table of more entries
/// takes more than a second per pass (2M entries, a full table of 1M
/// flows: 16 s), and a flow goes at the latest that long after its timeout.
pub const ENTRIES_PER_SECOND: u64 = 131_072;

/// Entries read per system call.
pub const CHUNK: usize = 4096;
/// Entries asked for at least, however little of a tick's budget is left.
const MIN_BATCH: usize = 64;

/// Entries one tick of `period` may read: its share of
/// [`ENTRIES_PER_SECOND`], and at least a chunk.
pub fn tick_budget(period: Duration) -> usize {
    let share = ENTRIES_PER_SECOND as u128 * period.as_millis() / 1000;
    (share as usize).max(CHUNK)
}

/// How long a pass over `entries` entries takes at most, ticks of
/// `period` apart: a flow expires at most this long after its timeout.
pub fn pass_time(entries: u64, period: Duration) -> Duration {
    let ticks = entries.div_ceil(tick_budget(period) as u64).max(1);
    period * ticks as u32
}

/// What one pass counts, published when it ends.
#[derive(Debug, Default)]
pub struct Tally {
    pub conntrack_entries: u64,
    pub relay_flow_entries: u64,
    /// SNAT ports in use per (source address, backend, port, protocol).
    snat: StdHashMap<(Addr, Addr, u16, u8), u64>,
    pub host_flows_moved: u64,
    /// The rule ids of every entry read, those that went included.
    pub rule_ids: HashSet<u32>,
}

impl Tally {
    /// A conntrack entry read, and what the pass did with it (`Keep` or
    /// `Expire`).
    pub fn conntrack(&mut self, key: &CtKey, value: &CtValue, verdict: Verdict) {
        self.rule_ids.insert(value.rule_id);
        let Verdict::Keep { entries } = verdict else {
            return;
        };
        self.conntrack_entries += entries;
        if !leads_pair(value) {
            return;
        }
        if value.direction == CT_DIR_HOST_OUT {
            self.host_flows_moved += 1;
        }
        // preserve_client_ip flows keep the client's address: no SNAT port
        // (a moved host flow keeps its address and holds one).
        if value.direction == CT_DIR_FORWARD && value.new_src == key.src {
            return;
        }
        *self
            .snat
            .entry((value.new_src, value.new_dst, value.new_dport, key.proto))
            .or_default() += 1;
    }

    /// A relay-flow entry read, and whether it went.
    pub fn relay_flow(&mut self, flow: &RelayFlow, expired: bool) {
        self.rule_ids.insert(flow.rule_id);
        self.relay_flow_entries += u64::from(!expired);
    }

    /// The SNAT ports each (source address, backend, protocol) holds among
    /// the forward entries that stay (each such entry is one port), sorted.
    pub fn snat_use(&self) -> Vec<SnatUse> {
        let mut out: Vec<SnatUse> = self
            .snat
            .iter()
            .map(|(&(src, dst, dport, proto), &ports)| SnatUse {
                source: ip_of(&src),
                backend: std::net::SocketAddr::new(ip_of(&dst), u16::from_be(dport)),
                protocol: if proto == PROTO_TCP { "tcp" } else { "udp" },
                ports,
            })
            .collect();
        out.sort();
        out
    }
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
    /// At the last pass, SNAT ports in use toward the busiest backend:
    /// the pair that runs out first.
    pub snat_busiest: AtomicU64,
    /// At the last pass, SNAT ports in use per source address and backend.
    pub snat_use: Mutex<Vec<SnatUse>>,
    /// At the last pass, host flows moved off a kernel flow's SNAT port.
    pub host_flows_moved: AtomicU64,
    /// Passes completed (each over both maps, in as many ticks as it takes).
    pub passes: AtomicU64,
    /// The sweeper's time in the last pass, and in all ticks together
    /// (nanoseconds).
    pub last_pass_ns: AtomicU64,
    pub passes_ns: AtomicU64,
    /// The rule ids the entries of the last pass held: a reload hands out
    /// no id a flow still has.
    pub rule_ids: Mutex<HashSet<u32>>,
}

/// SNAT ports in use toward one backend from one source address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct SnatUse {
    pub source: std::net::IpAddr,
    pub backend: std::net::SocketAddr,
    pub protocol: &'static str,
    pub ports: u64,
}

/// Where a pass is: in the conntrack map, then in the relay-flow map.
#[derive(Clone, Copy, Debug)]
enum Walk {
    Conntrack(Cursor),
    RelayFlows(Cursor),
}

/// Removes idle flows a bounded slice at a time: each tick reads at most
/// [`tick_budget`] entries in batches from where the last one stopped, so
/// the cost per second does not grow with the table; no copy of the table
/// is kept.
pub struct Sweeper {
    conntrack: HashMap<MapData, CtKey, CtValue>,
    relay_flows: HashMap<MapData, CtKey, RelayFlow>,
    /// Shared with reloads, which add the timeouts of new rule ids.
    timeouts: Arc<RwLock<RuleTimeouts>>,
    gauges: Arc<Gauges>,
    walk: Walk,
    tally: Tally,
    /// Time spent in the pass so far.
    pass_ns: u64,
    keys: Vec<CtKey>,
    values: Vec<CtValue>,
    relay_values: Vec<RelayFlow>,
}

/// An entry the tick found expired, as it read it.
struct Doomed {
    key: CtKey,
    seen: CtValue,
}

impl Sweeper {
    pub fn new(
        conntrack: HashMap<MapData, CtKey, CtValue>,
        relay_flows: HashMap<MapData, CtKey, RelayFlow>,
        timeouts: Arc<RwLock<RuleTimeouts>>,
        gauges: Arc<Gauges>,
    ) -> Sweeper {
        Sweeper {
            conntrack,
            relay_flows,
            timeouts,
            gauges,
            walk: Walk::Conntrack(None),
            tally: Tally::default(),
            pass_ns: 0,
            keys: Vec::new(),
            values: Vec::new(),
            relay_values: Vec::new(),
        }
    }

    /// One tick: reads at most `budget` entries on from where the last
    /// tick stopped and removes what expired; ends the pass (publishing
    /// its gauges) if it reaches the end of both maps. Returns how many
    /// flows expired.
    pub fn tick(&mut self, budget: usize) -> usize {
        let started = std::time::Instant::now();
        let timeouts = self.timeouts();
        let now = monotonic_ns();
        let mut left = budget;
        let mut flows = 0;
        let mut ended = false;
        while left > 0 {
            // A batch ends at a bucket's end, and fails if even the next
            // bucket does not fit: never ask for fewer than a few buckets'.
            let max = left.clamp(MIN_BATCH, CHUNK);
            let read = match self.walk {
                Walk::Conntrack(cursor) => self.conntrack_chunk(cursor, max, now, &timeouts),
                Walk::RelayFlows(cursor) => self.relay_chunk(cursor, max, now, &timeouts),
            };
            let (n, next, expired) = match read {
                Ok(r) => r,
                Err(e) => {
                    // Tried again from the same place next tick.
                    tracing::warn!("conntrack sweep: {e}");
                    break;
                }
            };
            flows += expired;
            left = left.saturating_sub(n.max(1));
            self.walk = match (self.walk, next) {
                (Walk::Conntrack(_), Some(c)) => Walk::Conntrack(Some(c)),
                (Walk::Conntrack(_), None) => Walk::RelayFlows(None),
                (Walk::RelayFlows(_), Some(c)) => Walk::RelayFlows(Some(c)),
                (Walk::RelayFlows(_), None) => {
                    ended = true;
                    Walk::Conntrack(None)
                }
            };
            if ended {
                break;
            }
        }
        let took = started.elapsed().as_nanos() as u64;
        self.pass_ns += took;
        if ended {
            self.end_pass();
        }
        let g = &self.gauges;
        g.expired_flows.fetch_add(flows as u64, Ordering::Relaxed);
        g.passes_ns.fetch_add(took, Ordering::Relaxed);
        flows
    }

    /// Publishes the pass's tally.
    fn end_pass(&mut self) {
        let tally = std::mem::take(&mut self.tally);
        let g = &self.gauges;
        g.conntrack_entries
            .store(tally.conntrack_entries, Ordering::Relaxed);
        g.relay_flow_entries
            .store(tally.relay_flow_entries, Ordering::Relaxed);
        let snat = tally.snat_use();
        let busiest = snat.iter().map(|u| u.ports).max().unwrap_or(0);
        g.snat_busiest.store(busiest, Ordering::Relaxed);
        *g.snat_use.lock().unwrap_or_else(|e| e.into_inner()) = snat;
        g.host_flows_moved
            .store(tally.host_flows_moved, Ordering::Relaxed);
        *g.rule_ids.lock().unwrap_or_else(|e| e.into_inner()) = tally.rule_ids;
        g.last_pass_ns
            .store(std::mem::take(&mut self.pass_ns), Ordering::Relaxed);
        g.passes.fetch_add(1, Ordering::Release);
    }

    /// Reads and judges one batch of conntrack entries, removes what
    /// expired; returns (entries read, where to go on, flows expired).
    fn conntrack_chunk(
        &mut self,
        cursor: Cursor,
        max: usize,
        now: u64,
        timeouts: &RuleTimeouts,
    ) -> std::io::Result<(usize, Cursor, usize)> {
        let fd = self.conntrack.map().fd().as_fd();
        let next = batch::lookup(fd, cursor, max, &mut self.keys, &mut self.values)?;
        let mut doomed: Vec<Doomed> = Vec::new();
        for (key, value) in self.keys.iter().zip(&self.values) {
            let conntrack = &self.conntrack;
            let (v, pair) = judge(key, value, now, timeouts, |k| conntrack.get(k, 0).ok());
            if let Verdict::Expire { pair: with_pair } = v {
                doomed.push(Doomed {
                    key: *key,
                    seen: *value,
                });
                if let (true, Some(seen)) = (with_pair, pair) {
                    let key = value.pair_key(key.proto);
                    doomed.push(Doomed { key, seen });
                }
            }
            self.tally.conntrack(key, value, v);
        }
        let n = self.keys.len();
        let flows = self.remove(&doomed)?;
        Ok((n, next, flows))
    }

    /// Removes the doomed entries that saw no packet since they were read
    /// (a packet keeps the flow; its pair stays too, as the next pass sees
    /// both again); forward entries first. Returns the flows removed.
    fn remove(&mut self, doomed: &[Doomed]) -> std::io::Result<usize> {
        let mut forward = Vec::new();
        let mut rest = Vec::new();
        for d in doomed {
            match self.conntrack.get(&d.key, 0) {
                Ok(current) if current.last_seen_ns != d.seen.last_seen_ns => {
                    // Counted as it stays.
                    self.tally
                        .conntrack(&d.key, &d.seen, Verdict::Keep { entries: 1 });
                }
                Ok(_) if d.seen.direction == CT_DIR_FORWARD => forward.push(d.key),
                Ok(_) => rest.push(d.key),
                Err(_) => {}
            }
        }
        let fd = self.conntrack.map().fd().as_fd();
        let flows = batch::delete(fd, &forward)?;
        batch::delete(fd, &rest)?;
        Ok(flows)
    }

    /// Reads one batch of relay-flow entries and removes the unclaimed
    /// idle ones; returns (entries read, where to go on, 0).
    fn relay_chunk(
        &mut self,
        cursor: Cursor,
        max: usize,
        now: u64,
        timeouts: &RuleTimeouts,
    ) -> std::io::Result<(usize, Cursor, usize)> {
        let fd = self.relay_flows.map().fd().as_fd();
        let next = batch::lookup(fd, cursor, max, &mut self.keys, &mut self.relay_values)?;
        let mut doomed = Vec::new();
        for (key, flow) in self.keys.iter().zip(&self.relay_values) {
            let expired = relay_flow_expired(key, flow, now, timeouts);
            if expired {
                doomed.push(*key);
            }
            self.tally.relay_flow(flow, expired);
        }
        batch::delete(fd, &doomed)?;
        Ok((self.keys.len(), next, 0))
    }

    fn timeouts(&self) -> RuleTimeouts {
        self.timeouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ticks every `period` on the current runtime until aborted.
    pub fn spawn(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut took = Duration::ZERO;
            loop {
                // A reload may bring shorter timeouts.
                let period = self.timeouts().period();
                // Ticks start a period apart, so a pass keeps its pace,
                // but a slow tick (many flows expiring) leaves a pause.
                tokio::time::sleep(period.saturating_sub(took).max(period / 4)).await;
                let started = std::time::Instant::now();
                // The map syscalls block.
                self = match tokio::task::spawn_blocking(move || {
                    let n = self.tick(tick_budget(period));
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
                took = started.elapsed();
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
        let t = pass(&udp_pairs, now);
        let used = t.snat_use();
        assert_eq!(used.len(), 1, "{used:?}");
        assert_eq!(used[0].ports, 3);
        assert_eq!((t.host_flows_moved, t.conntrack_entries), (3, 6));
        let mut one_gone = udp_pairs.clone();
        one_gone.extend(host_pair(PROTO_UDP, 2, now - 181 * S, now - 181 * S));
        let t = pass(&one_gone, now);
        assert_eq!((t.host_flows_moved, t.conntrack_entries), (2, 4));
        assert_eq!(t.snat_use()[0].ports, 2);
    }

    /// What a pass over `entries` at `now` counts.
    fn pass(entries: &StdHashMap<CtKey, CtValue>, now: u64) -> Tally {
        let mut tally = Tally::default();
        for (key, value) in entries {
            let (v, _) = judge(key, value, now, &timeouts(), |k| entries.get(k).copied());
            tally.conntrack(key, value, v);
        }
        tally
    }

    #[test]
    fn snat_use_counts_ports_of_the_busiest_backend_that_stay() {
        let now = 1000 * S;
        let est = (CT_STATE_ESTABLISHED, CT_STATE_ESTABLISHED);
        let mut entries: StdHashMap<CtKey, CtValue> = StdHashMap::new();
        for sport in 1..=3 {
            entries.extend(pair(PROTO_UDP, sport, now, now, est));
        }
        entries.extend(pair(PROTO_TCP, 9, now, now, est));
        // A flow that keeps the client's address holds no SNAT port.
        let mut preserved = pair(PROTO_UDP, 20, now, now, est);
        preserved[0].1.new_src = preserved[0].0.src;
        entries.extend(preserved);
        let ports = |use_: Vec<SnatUse>| -> Vec<(&'static str, u64)> {
            use_.into_iter().map(|u| (u.protocol, u.ports)).collect()
        };
        let t = pass(&entries, now);
        assert_eq!(ports(t.snat_use()), [("tcp", 1), ("udp", 3)]);
        assert_eq!((t.conntrack_entries, t.host_flows_moved), (10, 0));
        // Idle past udp_idle: its port is free.
        entries.extend(pair(PROTO_UDP, 1, now - 31 * S, now - 31 * S, est));
        let t = pass(&entries, now);
        assert_eq!(ports(t.snat_use()), [("tcp", 1), ("udp", 2)]);
        assert_eq!(t.conntrack_entries, 8);
        assert!(Tally::default().snat_use().is_empty());
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
    fn the_floor_is_the_least_limit_any_other_entry_gives_the_pair() {
        let t = timeouts();
        let lead = |proto: u8, state: u8| {
            let mut p = pair(proto, 1, 0, 0, (state, CT_STATE_NEW))[0].1;
            p.state = state;
            p
        };
        let (n, e, c, r) = (
            CT_STATE_NEW,
            CT_STATE_ESTABLISHED,
            CT_STATE_CLOSING,
            CT_STATE_RESET,
        );
        // (proto, lead state, floor in s): the connect timeout before an
        // answer, tcp_close once reset or closing both ways, the
        // unanswered UDP limit.
        for (proto, state, want) in [
            (PROTO_TCP, n, 3),
            (PROTO_TCP, e, 5),
            (PROTO_TCP, c, 3),
            (PROTO_TCP, r, 5),
            (PROTO_UDP, n, 10),
            (PROTO_UDP, e, 30),
        ] {
            let floor = t.pair_floor(proto, &lead(proto, state));
            assert_eq!(
                floor,
                Duration::from_secs(want),
                "proto {proto} state {state}"
            );
            for reverse in [n, e, c, r] {
                for backend_closed_first in [false, true] {
                    let p = Pair {
                        forward: state,
                        reverse,
                        backend_closed_first,
                    };
                    assert!(idle_limit(&t.get(0), proto, p) >= floor, "{p:?}");
                }
            }
        }
        let host = host_pair(PROTO_UDP, 1, 0, 0)[0].1;
        assert_eq!(
            t.pair_floor(PROTO_UDP, &host),
            Duration::from_nanos(host_hold_ns(PROTO_UDP))
        );
    }

    #[test]
    fn a_lead_idle_within_its_floor_stays_without_a_look_at_its_pair() {
        let now = 1000 * S;
        let est = (CT_STATE_NEW, CT_STATE_ESTABLISHED);
        let t = timeouts();
        // UDP lead in state NEW: floor 10 s.
        let [(fk, fwd), (rk, rev)] = pair(PROTO_UDP, 1, now - 10 * S, now - 10 * S, est)[..] else {
            unreachable!()
        };
        assert_eq!(
            verdict(&fk, &fwd, None, now, &t),
            Verdict::Keep { entries: 2 }
        );
        assert_eq!(verdict(&fk, &fwd, None, now + 1, &t), Verdict::LookUpPair);
        // Answered: stays 30 s, with its pair or alone.
        assert_eq!(
            verdict(&fk, &fwd, Some(Some(&rev)), now + 1, &t),
            Verdict::Keep { entries: 2 }
        );
        assert_eq!(
            verdict(&fk, &fwd, Some(None), now + 1, &t),
            Verdict::Expire { pair: false }
        );
        let later = now + 20 * S + 1;
        assert_eq!(
            verdict(&fk, &fwd, Some(Some(&rev)), later, &t),
            Verdict::Expire { pair: true }
        );
        // Alone and unanswered it has 10 s; a recent answer keeps it.
        let mut fresh_rev = rev;
        fresh_rev.last_seen_ns = now;
        assert_eq!(
            verdict(&fk, &fwd, Some(Some(&fresh_rev)), later, &t),
            Verdict::Keep { entries: 2 }
        );
        // Its reverse entry: its own limit first (30 s once answered),
        // then the lead decides while it points back.
        assert_eq!(
            verdict(&rk, &rev, None, now + 20 * S, &t),
            Verdict::Keep { entries: 0 }
        );
        assert_eq!(verdict(&rk, &rev, None, later, &t), Verdict::LookUpPair);
        assert_eq!(
            verdict(&rk, &rev, Some(Some(&fwd)), later, &t),
            Verdict::Keep { entries: 0 }
        );
        assert_eq!(
            verdict(&rk, &rev, Some(None), later, &t),
            Verdict::Expire { pair: false }
        );
        // A lead at its key that points elsewhere (the client started a
        // flow over on another port), or another reverse entry: alone.
        let mut moved = fwd;
        moved.new_sport = 40999u16.to_be();
        assert_eq!(
            verdict(&rk, &rev, Some(Some(&moved)), later, &t),
            Verdict::Expire { pair: false }
        );
        assert_eq!(
            verdict(&rk, &rev, Some(Some(&rev)), later, &t),
            Verdict::Expire { pair: false }
        );
        // An established TCP lead alone: its floor is tcp_close (5 s), its
        // own limit tcp_established (600 s); it stays, one entry.
        let [(tk, tcp), _] = pair(
            PROTO_TCP,
            2,
            now - 6 * S,
            now - 6 * S,
            (CT_STATE_ESTABLISHED, CT_STATE_ESTABLISHED),
        )[..] else {
            unreachable!()
        };
        assert_eq!(verdict(&tk, &tcp, None, now, &t), Verdict::LookUpPair);
        assert_eq!(
            verdict(&tk, &tcp, Some(None), now, &t),
            Verdict::Keep { entries: 1 }
        );
        // judge looks the pair up only when asked to.
        let (v, seen) = judge(&fk, &fwd, now, &t, |_| panic!("looked up"));
        assert_eq!((v, seen), (Verdict::Keep { entries: 2 }, None));
        let (v, seen) = judge(&fk, &fwd, later, &t, |k| (*k == rk).then_some(rev));
        assert_eq!((v, seen), (Verdict::Expire { pair: true }, Some(rev)));
    }

    #[test]
    fn a_pass_counts_the_rule_ids_of_every_entry_and_the_relay_entries_that_stay() {
        let mut tally = Tally::default();
        let [(k, mut v), _] = pair(PROTO_UDP, 1, 0, 0, (1, 1))[..] else {
            unreachable!()
        };
        v.rule_id = 7;
        tally.conntrack(&k, &v, Verdict::Expire { pair: true });
        v.rule_id = 8;
        tally.conntrack(&k, &v, Verdict::Keep { entries: 2 });
        let flow = |rule_id| RelayFlow {
            last_seen_ns: 0,
            rule_id,
            owner: RELAY_OWNER_KERNEL,
            _pad: [0; 3],
        };
        tally.relay_flow(&flow(9), true);
        tally.relay_flow(&flow(10), false);
        tally.relay_flow(&flow(10), false);
        let mut ids: Vec<u32> = tally.rule_ids.iter().copied().collect();
        ids.sort();
        assert_eq!(ids, [7, 8, 9, 10]);
        assert_eq!((tally.conntrack_entries, tally.relay_flow_entries), (2, 2));
    }

    #[test]
    fn a_tick_reads_its_share_of_the_rate_and_a_pass_takes_the_ticks_it_needs() {
        let ms = Duration::from_millis;
        assert_eq!(tick_budget(ms(1000)), ENTRIES_PER_SECOND as usize);
        assert_eq!(tick_budget(ms(750)), 98_304);
        assert_eq!(tick_budget(ms(5000)), 655_360);
        // Never less than one chunk.
        assert_eq!(tick_budget(ms(10)), CHUNK);
        assert_eq!(tick_budget(ms(32)), CHUNK + 98);
        // A small table in one tick; 1M flows (2M entries) in 16 s.
        assert_eq!(pass_time(0, ms(100)), ms(100));
        assert_eq!(pass_time(13_107, ms(100)), ms(100));
        assert_eq!(pass_time(13_108, ms(100)), ms(200));
        assert_eq!(pass_time(2_097_152, ms(1000)), ms(16_000));
        assert_eq!(pass_time(2_097_153, ms(1000)), ms(17_000));
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
