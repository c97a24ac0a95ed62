//! Per-rule counters of the relay: atomics added to once per splice or
//! batch, read as a snapshot for the status socket.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use super::gate::CounterValues;
use crate::rules::Protocol;

/// The live counters of one listener.
#[derive(Default)]
pub struct RuleCounters {
    /// TCP connections accepted or UDP sessions created.
    pub flows: AtomicU64,
    pub bytes_to_backend: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// UDP datagrams sent on, each way (a TCP stream has no packets to
    /// count here: the kernel below the sockets segments it).
    pub datagrams_to_backend: AtomicU64,
    pub datagrams_to_client: AtomicU64,
    /// TCP connects to a backend that were refused, unreachable or timed out.
    pub connect_failures: AtomicU64,
    /// UDP datagrams of new clients dropped because the session table was
    /// full or the relay was draining.
    pub sessions_refused: AtomicU64,
    /// TCP connections reset at accept because the rule had
    /// `max_connections` open.
    pub connections_refused: AtomicU64,
    /// TCP connections reset because no byte went either way within
    /// `relay.first_byte_timeout` of their accept.
    pub first_byte_timeouts: AtomicU64,
    /// TCP connections of trusted upstreams (`accept_proxy_protocol`)
    /// closed for want of a valid PROXY header in time.
    pub proxy_headers_refused: AtomicU64,
    /// New flows refused because every backend was down: TCP connections
    /// reset, UDP datagrams of new clients dropped.
    pub no_backend: AtomicU64,
    /// New flows of a `preserve_client_ip` rule that came to the relay,
    /// which cannot keep the client's address: TCP reset, UDP dropped.
    pub client_ip_refused: AtomicU64,
    /// TCP connections (closed at accept) and UDP datagrams of new clients
    /// (dropped) that the rule's ACL denied.
    pub acl_denied: AtomicU64,
    /// Every other I/O error: failed sends, sockets not created, accept
    /// failures. A reset by an endpoint is passed on, not counted.
    pub errors: AtomicU64,
    pub active: AtomicU64,
}

impl RuleCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// The values an upgrade hands over (`active` is counted anew).
    pub fn values(&self) -> CounterValues {
        CounterValues {
            flows: self.flows.load(Relaxed),
            bytes_to_backend: self.bytes_to_backend.load(Relaxed),
            bytes_to_client: self.bytes_to_client.load(Relaxed),
            datagrams_to_backend: self.datagrams_to_backend.load(Relaxed),
            datagrams_to_client: self.datagrams_to_client.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            connections_refused: self.connections_refused.load(Relaxed),
            first_byte_timeouts: self.first_byte_timeouts.load(Relaxed),
            sessions_refused: self.sessions_refused.load(Relaxed),
            proxy_headers_refused: self.proxy_headers_refused.load(Relaxed),
            no_backend: self.no_backend.load(Relaxed),
            client_ip_refused: self.client_ip_refused.load(Relaxed),
            acl_denied: self.acl_denied.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }

    /// Counters that carry on from `v`.
    pub fn carried_on(v: &CounterValues) -> RuleCounters {
        RuleCounters {
            flows: v.flows.into(),
            bytes_to_backend: v.bytes_to_backend.into(),
            bytes_to_client: v.bytes_to_client.into(),
            datagrams_to_backend: v.datagrams_to_backend.into(),
            datagrams_to_client: v.datagrams_to_client.into(),
            connect_failures: v.connect_failures.into(),
            connections_refused: v.connections_refused.into(),
            first_byte_timeouts: v.first_byte_timeouts.into(),
            sessions_refused: v.sessions_refused.into(),
            proxy_headers_refused: v.proxy_headers_refused.into(),
            no_backend: v.no_backend.into(),
            client_ip_refused: v.client_ip_refused.into(),
            acl_denied: v.acl_denied.into(),
            errors: v.errors.into(),
            active: 0.into(),
        }
    }

    pub fn snapshot(&self, rule_id: u32, alias: &str, protocol: Protocol) -> RelayRuleCounters {
        RelayRuleCounters {
            rule_id,
            alias: alias.to_owned(),
            protocol: protocol.as_str(),
            flows: self.flows.load(Relaxed),
            bytes_to_backend: self.bytes_to_backend.load(Relaxed),
            bytes_to_client: self.bytes_to_client.load(Relaxed),
            datagrams_to_backend: self.datagrams_to_backend.load(Relaxed),
            datagrams_to_client: self.datagrams_to_client.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            sessions_refused: self.sessions_refused.load(Relaxed),
            connections_refused: self.connections_refused.load(Relaxed),
            first_byte_timeouts: self.first_byte_timeouts.load(Relaxed),
            proxy_headers_refused: self.proxy_headers_refused.load(Relaxed),
            no_backend: self.no_backend.load(Relaxed),
            client_ip_refused: self.client_ip_refused.load(Relaxed),
            acl_denied: self.acl_denied.load(Relaxed),
            errors: self.errors.load(Relaxed),
            active: self.active.load(Relaxed),
        }
    }
}

/// A snapshot of one listener's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RelayRuleCounters {
    pub rule_id: u32,
    pub alias: String,
    /// `"tcp"` or `"udp"`.
    pub protocol: &'static str,
    /// TCP connections accepted or UDP sessions created, since start.
    pub flows: u64,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    /// UDP datagrams the relay sent on, each way (0 for TCP).
    pub datagrams_to_backend: u64,
    pub datagrams_to_client: u64,
    /// TCP connects to a backend that failed (refused, unreachable, timed out).
    pub connect_failures: u64,
    /// Datagrams of new UDP clients dropped because the session table was
    /// full, the relay's session limit (from the free ephemeral ports) was
    /// reached, or the relay was draining (each such datagram asks for a
    /// session).
    pub sessions_refused: u64,
    /// TCP connections reset at accept: the rule had `max_connections` open.
    pub connections_refused: u64,
    /// TCP connections reset because no byte went either way within
    /// `relay.first_byte_timeout`.
    pub first_byte_timeouts: u64,
    /// Connections of trusted upstreams closed because they did not start
    /// with a valid PROXY header in time.
    pub proxy_headers_refused: u64,
    /// New flows refused because every backend was down (TCP reset, UDP
    /// datagram dropped).
    pub no_backend: u64,
    /// New flows of a `preserve_client_ip` rule refused because they came
    /// to the relay, which would replace the client's address with ours.
    pub client_ip_refused: u64,
    /// TCP connections closed at accept and datagrams of new UDP clients
    /// dropped because the ACL denied the client.
    pub acl_denied: u64,
    /// Other I/O errors (failed sends, sockets not created, accept
    /// failures); a reset by an endpoint is passed on, not counted.
    pub errors: u64,
    /// Flows open now.
    pub active: u64,
}
