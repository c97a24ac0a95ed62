//! A running daemon's conntrack map, reached from outside it (found by
//! the map ids in its /proc fdinfo) and filled with made-up idle flows.
//! Shared by the integration tests and `cargo xtask bench --sweep`.
#![allow(dead_code)]

use aya::maps::{HashMap, Map, MapData};
use forwarder_common::{
    CT_DIR_FORWARD, CT_DIR_REVERSE, CT_STATE_ESTABLISHED, CtKey, CtValue, addr_from_ipv4_be,
};

/// A BPF map `pid` holds open, with the kernel's memlock figure for it.
pub struct DaemonMap {
    pub data: MapData,
    /// Bytes (`memlock:` in the map's fdinfo).
    pub memlock: u64,
    pub max_entries: u32,
}

/// The map called `name` among the BPF maps process `pid` holds open.
pub fn daemon_map(pid: u32, name: &str) -> Result<DaemonMap, String> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut seen = std::collections::HashSet::new();
    for entry in entries.filter_map(Result::ok) {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        let Some(id) = field("map_id:") else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let Ok(data) = MapData::from_id(id as u32) else {
            continue;
        };
        let Ok(info) = data.info() else {
            continue;
        };
        if info.name_as_str() == Some(name) {
            return Ok(DaemonMap {
                memlock: field("memlock:").unwrap_or(0),
                max_entries: info.max_entries(),
                data,
            });
        }
    }
    Err(format!("process {pid} holds no BPF map called {name}"))
}

/// The conntrack map of the daemon `pid`.
pub fn conntrack(pid: u32) -> Result<(HashMap<MapData, CtKey, CtValue>, DaemonMap), String> {
    let found = daemon_map(pid, "CONNTRACK")?;
    let copy = DaemonMap {
        data: MapData::from_id(found.data.info().map_err(|e| e.to_string())?.id())
            .map_err(|e| e.to_string())?,
        memlock: found.memlock,
        max_entries: found.max_entries,
    };
    let map = HashMap::try_from(Map::HashMap(found.data)).map_err(|e| e.to_string())?;
    Ok((map, copy))
}

/// `CLOCK_MONOTONIC` in nanoseconds, the conntrack timestamps' clock.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into the timespec given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The two entries of made-up answered (`proto`: established) flow
/// number `n` (distinct for each `n` below 2^24) of rule `rule_id`: from 10.0.0.0/8 to
/// 198.18.1.1:7878, SNAT from 100.64.0.0/16 to 198.18.2.2:3478. Each
/// entry last saw a packet at the time given.
pub fn flow_pair(
    n: u32,
    proto: u8,
    rule_id: u32,
    last_fwd: u64,
    last_rev: u64,
) -> [(CtKey, CtValue); 2] {
    let v4 = |a: [u8; 4]| addr_from_ipv4_be(u32::from_ne_bytes(a));
    let [_, b, c, d] = n.to_be_bytes();
    let client = v4([10, b, c, d]);
    let listener = v4([198, 18, 1, 1]);
    // 60,000 SNAT ports per address.
    let snat = v4([100, 64, (n / 60_000) as u8, 1]);
    let backend = v4([198, 18, 2, 2]);
    let port = (1024 + n % 60_000) as u16;
    let key = CtKey {
        src: client,
        dst: listener,
        sport: port.to_be(),
        dport: 7878u16.to_be(),
        proto,
        _pad: [0; 3],
    };
    let fwd = CtValue {
        new_src: snat,
        new_dst: backend,
        new_sport: port.to_be(),
        new_dport: 3478u16.to_be(),
        rule_id,
        last_seen_ns: last_fwd,
        direction: CT_DIR_FORWARD,
        state: CT_STATE_ESTABLISHED,
        closed_first: 0,
        _pad: [0; 5],
    };
    let rev = CtValue {
        new_src: listener,
        new_dst: client,
        new_sport: key.dport,
        new_dport: key.sport,
        last_seen_ns: last_rev,
        direction: CT_DIR_REVERSE,
        ..fwd
    };
    [(key, fwd), (fwd.pair_key(proto), rev)]
}
