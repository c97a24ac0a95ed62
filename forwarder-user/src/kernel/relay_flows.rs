//! The flows the relay owns, mirrored into `RELAY_FLOWS` so that the kernel
//! path leaves them alone for their whole life.
//!
//! [`RelayFlows`] can exist before the kernel path (the relay may start
//! first): it keeps the live flows itself and copies them into the map
//! when the kernel path starts.

use std::collections::HashMap as StdHashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use aya::maps::{HashMap, MapData};
use forwarder_common::{CtKey, RELAY_OWNER_RELAY, RelayFlow};

use super::snat::addr_of;
use crate::rules::{FlowObserver, Protocol};

/// The key of the client to listener direction of a relay flow.
pub fn flow_key(protocol: Protocol, client: SocketAddr, local: SocketAddr) -> CtKey {
    CtKey {
        src: addr_of(client.ip().to_canonical()),
        dst: addr_of(local.ip().to_canonical()),
        sport: client.port().to_be(),
        dport: local.port().to_be(),
        proto: protocol.ip_proto(),
        _pad: [0; 3],
    }
}

type Map = HashMap<MapData, CtKey, RelayFlow>;

#[derive(Default)]
struct State {
    /// Live relay flows and how many relay flows share each key.
    live: StdHashMap<CtKey, u32>,
    map: Option<Map>,
}

/// The relay's live flows; a [`FlowObserver`].
#[derive(Default)]
pub struct RelayFlows {
    state: Mutex<State>,
}

impl RelayFlows {
    pub fn new() -> RelayFlows {
        RelayFlows::default()
    }

    /// Starts mirroring into `map`, with every flow that is live now. The
    /// relay's entries already there belong to a dead daemon's relay (an
    /// adopted map): those flows ended with it.
    pub(super) fn attach(&self, mut map: Map) -> anyhow::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let dead: Vec<CtKey> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, flow)| flow.owner == RELAY_OWNER_RELAY && !state.live.contains_key(key))
            .map(|(key, _)| key)
            .collect();
        for key in &dead {
            let _ = map.remove(key);
        }
        for key in state.live.keys() {
            map.insert(key, entry(), 0)?;
        }
        state.map = Some(map);
        Ok(())
    }

    /// Stops mirroring (the kernel path stopped).
    pub(super) fn detach(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.map = None;
    }

    /// How many flows the relay has now.
    pub fn len(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn entry() -> RelayFlow {
    RelayFlow {
        last_seen_ns: super::sweeper::monotonic_ns(),
        // Relay-owned entries never expire by time; the rule does not matter.
        rule_id: u32::MAX,
        owner: RELAY_OWNER_RELAY,
        _pad: [0; 3],
    }
}

impl FlowObserver for RelayFlows {
    fn relay_flow_started(&self, protocol: Protocol, client: SocketAddr, local: SocketAddr) {
        let key = flow_key(protocol, client, local);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state.live.entry(key).or_insert(0) += 1;
        if let Some(map) = state.map.as_mut()
            && let Err(e) = map.insert(key, entry(), 0)
        {
            // The flow still works; the kernel path may take it over only
            // if it is UDP and a later packet finds room in conntrack.
            tracing::warn!(
                "cannot enter relay flow {protocol} {client} -> {local} in RELAY_FLOWS: {e}"
            );
        }
    }

    fn relay_flow_ended(&self, protocol: Protocol, client: SocketAddr, local: SocketAddr) {
        let key = flow_key(protocol, client, local);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(count) = state.live.get_mut(&key) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        state.live.remove(&key);
        if let Some(map) = state.map.as_mut() {
            let _ = map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_stack_clients_get_the_ipv4_key() {
        let v4 = flow_key(
            Protocol::Udp,
            "198.18.1.2:5000".parse().unwrap(),
            "198.18.1.1:7878".parse().unwrap(),
        );
        let mapped = flow_key(
            Protocol::Udp,
            "[::ffff:198.18.1.2]:5000".parse().unwrap(),
            "[::ffff:198.18.1.1]:7878".parse().unwrap(),
        );
        assert_eq!(v4, mapped);
        assert_eq!(v4.sport, 5000u16.to_be());
        assert_eq!(v4.proto, 17);
    }

    #[test]
    fn flows_are_counted_per_key_until_the_last_ends() {
        let flows = RelayFlows::new();
        let (c, l) = (
            "198.18.1.2:5000".parse().unwrap(),
            "198.18.1.1:7878".parse().unwrap(),
        );
        flows.relay_flow_started(Protocol::Tcp, c, l);
        flows.relay_flow_started(Protocol::Tcp, c, l);
        flows.relay_flow_started(Protocol::Udp, c, l);
        assert_eq!(flows.len(), 2);
        flows.relay_flow_ended(Protocol::Tcp, c, l);
        assert_eq!(flows.len(), 2);
        flows.relay_flow_ended(Protocol::Tcp, c, l);
        flows.relay_flow_ended(Protocol::Udp, c, l);
        // An end without a start is ignored.
        flows.relay_flow_ended(Protocol::Udp, c, l);
        assert!(flows.is_empty());
    }
}
