//! What every flow of a listener shares, and the guard that accounts for a
//! flow's life (active count, the kernel path's observer) even when its
//! task is aborted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tracing::{debug, warn};

use super::backend::{Alarm, BackendPicker};
use super::counters::RuleCounters;
use super::gate::FlowAddrs;
use super::limits::{LOG_INTERVAL, LogEvery};
use super::sys::canonical;
use crate::acl::RuleAcl;
use crate::health::RuleHealth;
use crate::rules::{FlowObserver, ListenPorts, Listener, Protocol, ProxySettings, Timeouts};

/// One listener's rule, as its flows need it.
pub struct RuleCtx {
    pub rule_id: u32,
    pub alias: String,
    pub protocol: Protocol,
    pub backends: BackendPicker,
    /// The listen port, or range of ports from `first_port`.
    pub ports: ListenPorts,
    pub first_port: u16,
    pub timeouts: Timeouts,
    pub proxy: ProxySettings,
    /// Trusted upstreams' connections are being refused for their headers.
    pub proxy_headers_failing: Alarm,
    /// The backend must see the client's address: the relay, which
    /// connects from ours, refuses the rule's flows rather than hide it.
    pub preserve_client_ip: bool,
    /// Said once that such a flow was refused.
    client_ip_said: Alarm,
    pub acl: Option<RuleAcl>,
    /// Open TCP connections the listener holds at most.
    pub max_connections: usize,
    /// Says now and then that connections are refused at `max_connections`.
    pub over_limit_log: LogEvery,
    /// Shared with the rule's successors after a reload changes it.
    pub counters: Arc<RuleCounters>,
    pub observer: Arc<dyn FlowObserver>,
}

impl RuleCtx {
    pub fn new(
        listener: &Listener,
        observer: Arc<dyn FlowObserver>,
        health: Arc<RuleHealth>,
    ) -> RuleCtx {
        RuleCtx {
            rule_id: listener.rule_id,
            alias: listener.alias.clone(),
            protocol: listener.protocol,
            backends: BackendPicker::new(&listener.backends, health),
            ports: listener.ports,
            first_port: listener.bind.port(),
            timeouts: listener.timeouts,
            proxy: listener.proxy.clone(),
            proxy_headers_failing: Alarm::default(),
            preserve_client_ip: listener.preserve_client_ip,
            client_ip_said: Alarm::default(),
            acl: listener.acl.clone(),
            max_connections: listener.connection_limit() as usize,
            over_limit_log: LogEvery::new(LOG_INTERVAL),
            counters: Arc::default(),
            observer,
        }
    }

    /// The rule `listener`, which replaces `self` on the same socket: new
    /// flows follow it, the counters carry on.
    pub fn succeed(&self, listener: &Listener, health: Arc<RuleHealth>) -> RuleCtx {
        RuleCtx {
            counters: self.counters.clone(),
            ..RuleCtx::new(listener, self.observer.clone(), health)
        }
    }

    /// Whether the ACL lets `client` open a flow; a denied one is counted.
    pub fn admits(&self, client: SocketAddr) -> bool {
        let allowed = self.acl.as_ref().is_none_or(|a| a.allows(client.ip()));
        if !allowed {
            RuleCounters::add(&self.counters.acl_denied, 1);
            debug!(alias = %self.alias, client = %canonical(client), "denied by the acl");
        }
        allowed
    }

    /// A backend picked for a flow to local `port`: for a port range, the
    /// backend's port that `port` maps to.
    pub fn pick_for(&self, port: u16) -> Option<(usize, SocketAddr)> {
        let (index, mut backend) = self.backends.pick()?;
        if self.ports.is_range() {
            backend.set_port(
                self.ports
                    .target_port(self.first_port, port, backend.port()),
            );
        }
        Some((index, backend))
    }

    pub fn error(&self) {
        RuleCounters::add(&self.counters.errors, 1);
    }

    /// A peer that must open its connections with a PROXY header.
    pub fn trusts_proxy_header_from(&self, peer: SocketAddr) -> bool {
        self.proxy.accept_from.iter().any(|c| c.contains(peer.ip()))
    }

    /// Whether a new flow must be refused because the backend would see
    /// the relay's address instead of the client's; counts and says so.
    pub fn refuses_client_ip(&self) -> bool {
        if !self.preserve_client_ip {
            return false;
        }
        RuleCounters::add(&self.counters.client_ip_refused, 1);
        if self.client_ip_said.raise() {
            warn!(
                alias = %self.alias,
                "a flow of this preserve_client_ip rule came to the relay (IP options, a \
                 fragment, a full table, no route); the relay would hide the client's address, \
                 so it is refused (counted in client_ip_refused)"
            );
        }
        true
    }
}

/// Lives as long as one flow: counts it and tells the observer when it
/// starts and ends. Addresses are canonical (IPv4 clients of a dual-stack
/// socket as IPv4).
pub struct FlowGuard {
    rule: Arc<RuleCtx>,
    /// The client as the rule sees it: the source a trusted upstream's
    /// PROXY header carries, else the socket's peer. Logs, the header sent
    /// to the backend and the ACL take this one.
    pub client: SocketAddr,
    /// Where that client connected to: the header's destination, else `local`.
    pub destination: SocketAddr,
    /// The socket's own ends, which the kernel path knows the flow by.
    peer: SocketAddr,
    local: SocketAddr,
}

impl FlowGuard {
    pub fn start(rule: &Arc<RuleCtx>, client: SocketAddr, local: SocketAddr) -> FlowGuard {
        let (client, local) = (canonical(client), canonical(local));
        RuleCounters::add(&rule.counters.flows, 1);
        RuleCounters::add(&rule.counters.active, 1);
        rule.observer
            .relay_flow_started(rule.protocol, client, local);
        debug!(alias = %rule.alias, protocol = %rule.protocol, %client, %local, "flow started");
        FlowGuard {
            rule: rule.clone(),
            client,
            destination: local,
            peer: client,
            local,
        }
    }

    /// A flow the previous image handed over: counted as active again
    /// (not as a new flow), and told to this image's observer.
    pub fn resume(rule: &Arc<RuleCtx>, addrs: FlowAddrs) -> FlowGuard {
        RuleCounters::add(&rule.counters.active, 1);
        rule.observer
            .relay_flow_started(rule.protocol, addrs.peer, addrs.local);
        FlowGuard {
            rule: rule.clone(),
            client: addrs.client,
            destination: addrs.destination,
            peer: addrs.peer,
            local: addrs.local,
        }
    }

    pub fn addrs(&self) -> FlowAddrs {
        FlowAddrs {
            peer: self.peer,
            local: self.local,
            client: self.client,
            destination: self.destination,
        }
    }

    /// A trusted upstream's PROXY header named the flow's real client.
    pub fn proxied(&mut self, client: SocketAddr, destination: SocketAddr) {
        (self.client, self.destination) = (canonical(client), canonical(destination));
        debug!(
            alias = %self.rule.alias, client = %self.client, upstream = %self.peer,
            "PROXY header: client is {} (via {})", self.client, self.peer
        );
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        let rule = &self.rule;
        rule.counters.active.fetch_sub(1, Relaxed);
        rule.observer
            .relay_flow_ended(rule.protocol, self.peer, self.local);
        debug!(alias = %rule.alias, protocol = %rule.protocol, client = %self.client, "flow ended");
    }
}
