//! The compiled rule table: what the relay and the kernel path consume.
//!
//! `config` turns a rule file into a [`Compiled`]; nothing else builds one.
//! It is plain data so that both paths, `check` and the tests share it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use forwarder_common::ranges::{RangeKey, RangeValue};
use forwarder_common::{AclKey, Backend, RuleKey, RuleValue};

use crate::acl::RuleAcl;

use crate::config::Cidr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as in the kernel maps.
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => forwarder_common::PROTO_TCP,
            Protocol::Udp => forwarder_common::PROTO_UDP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which path carries a rule's flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PathMode {
    /// The kernel path where it can, the relay for the rest.
    #[default]
    Auto,
    /// Same as auto, but a failure to load BPF is an error, not a fallback.
    Kernel,
    /// The relay only.
    Relay,
    /// Like `kernel`, with TC alone carrying the rule's flows.
    Tc,
    /// Like `kernel`, with the XDP accelerator carrying the established
    /// flows' packets (TC the rest).
    Xdp,
}

impl PathMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PathMode::Auto => "auto",
            PathMode::Kernel => "kernel",
            PathMode::Relay => "relay",
            PathMode::Tc => "tc",
            PathMode::Xdp => "xdp",
        }
    }

    /// The rule needs the kernel path: a failure to load BPF is an error.
    pub fn requires_kernel(self) -> bool {
        matches!(self, PathMode::Kernel | PathMode::Tc | PathMode::Xdp)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A UDP session with no datagram either way for this long ends.
    pub udp_idle: Duration,
    /// A UDP flow (kernel or relay) the backend has not answered yet ends
    /// after this long without a datagram; once answered, `udp_idle` applies.
    pub udp_unreplied: Duration,
    /// An established TCP flow with no traffic for this long ends.
    pub tcp_established: Duration,
    /// A TCP flow (kernel or relay) that saw FIN one way only ends after
    /// this long without traffic.
    pub tcp_half_closed: Duration,
    /// A kernel TCP flow that saw FIN both ways, or RST, is forgotten after
    /// this long.
    pub tcp_close: Duration,
    /// How long the relay waits for a backend's TCP handshake.
    pub connect: Duration,
}

impl Timeouts {
    /// How long a UDP flow the backend never answered may be idle: never
    /// longer than an answered one.
    pub fn udp_unanswered(&self) -> Duration {
        self.udp_unreplied.min(self.udp_idle)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            udp_idle: Duration::from_secs(120),
            // Linux's nf_conntrack_udp_timeout: one spoofed datagram must
            // not hold a flow and its SNAT port for the whole udp_idle.
            udp_unreplied: Duration::from_secs(30),
            tcp_established: Duration::from_secs(7200),
            // Linux's nf_conntrack_tcp_timeout_fin_wait, the longest it
            // keeps a flow after the first FIN (CLOSE_WAIT is 60 s): a
            // half-closed flow lives at least as long as through nftables.
            tcp_half_closed: Duration::from_secs(120),
            tcp_close: Duration::from_secs(10),
            connect: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    /// 1..=65535; a rule with one backend has weight 1.
    pub weight: u16,
}

/// How a rule's backends are checked: every `interval`, a check that has
/// no answer within `timeout` fails; `fall` failures in a row take a
/// backend out, `rise` passes in a row bring it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSpec {
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
    pub probe: Probe,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The backend accepts a TCP connection.
    TcpConnect,
    /// The backend answers `payload` with a datagram that starts with `expect`.
    Udp { payload: Vec<u8>, expect: Vec<u8> },
}

/// One listening socket of the relay: one alias on one protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    /// Index into per-rule tables on both paths; below `RULE_IDS`.
    pub rule_id: u32,
    pub alias: String,
    pub protocol: Protocol,
    /// The address to listen on. `[::]` means every address, IPv4 and IPv6.
    /// The port is never 0: ports picked at start are already filled in.
    pub bind: SocketAddr,
    /// The rule asked for listen port 0 and `bind`'s port was picked at load.
    pub listen_picked: bool,
    /// `bind.port()` alone, or a range of ports starting there.
    pub ports: ListenPorts,
    pub backends: Vec<BackendSpec>,
    pub timeouts: Timeouts,
    pub path: PathMode,
    /// DNAT only on the kernel path; the relay cannot keep the client's address.
    pub preserve_client_ip: bool,
    /// PROXY protocol headers sent and accepted; only the relay speaks it.
    pub proxy: ProxySettings,
    /// `None`: every backend takes flows, always.
    pub health: Option<HealthSpec>,
    /// The rule's own ACL with the global one; `None`: every client.
    pub acl: Option<RuleAcl>,
    /// TCP connections the relay holds open at once for this rule; `None`:
    /// not set, [`DEFAULT_MAX_CONNECTIONS`]. Set, it makes the rule
    /// relay-only (the kernel path does not count connections).
    pub max_connections: Option<u32>,
}

/// A rule's listen ports: `bind.port()` alone, or the range starting there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenPorts {
    /// How many ports from `bind.port()`; 1 for a single-port rule.
    pub count: u16,
    pub target: TargetPorts,
}

/// How listen port `bind.port() + i` maps to a backend's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetPorts {
    /// The backend's port + i (single ports, 1:1 and shifted ranges).
    Shifted,
    /// Every listen port goes to the backend's port (many to one).
    Same,
}

impl ListenPorts {
    pub const SINGLE: ListenPorts = ListenPorts {
        count: 1,
        target: TargetPorts::Shifted,
    };

    pub fn is_range(&self) -> bool {
        self.count > 1
    }

    /// The last listen port, given the first. Config validation keeps
    /// `first + count - 1` within 65535; saturating so a bad table cannot panic.
    pub fn last(&self, first: u16) -> u16 {
        first.saturating_add(self.count.max(1) - 1)
    }

    /// The backend port for listen `port` (which is within the range from
    /// `first`), for a backend on `backend_port`.
    pub fn target_port(&self, first: u16, port: u16, backend_port: u16) -> u16 {
        match self.target {
            TargetPorts::Same => backend_port,
            // Wrapping: validation rejects a target range past 65535.
            TargetPorts::Shifted => backend_port.wrapping_add(port.wrapping_sub(first)),
        }
    }
}

/// The relay's open TCP connections per rule when `max_connections` is left out.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;

impl Listener {
    /// The relay's limit of open TCP connections for this rule.
    pub fn connection_limit(&self) -> u32 {
        self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS)
    }

    /// `bind`, or for a range `bind` and its last port (`[::]:5000-5099`).
    pub fn listen_text(&self) -> String {
        if self.ports.is_range() {
            format!("{}-{}", self.bind, self.ports.last(self.bind.port()))
        } else {
            self.bind.to_string()
        }
    }

    /// Why the rule cannot run without the kernel path, if it cannot.
    pub fn needs_kernel(&self) -> Option<String> {
        if self.path.requires_kernel() {
            Some(format!("`path: {}`", self.path.as_str()))
        } else if self.preserve_client_ip {
            Some("`preserve_client_ip: true` (the relay cannot keep the client's address)".into())
        } else {
            None
        }
    }
}

/// The PROXY protocol header a rule sends its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProxyProtocol {
    #[default]
    Off,
    /// Text, TCP only.
    V1,
    /// Binary: before the first byte of a TCP stream, on every UDP datagram.
    V2,
}

impl ProxyProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::Off => "off",
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }
}

/// A rule's PROXY protocol settings. A rule with any of them is compiled
/// relay-only: the kernel path can neither insert nor read a header.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxySettings {
    /// The header sent to the backend.
    pub send: ProxyProtocol,
    /// TCP peers in these networks (trusted load balancers) must start
    /// with a PROXY header; the client it carries is the flow's client.
    pub accept_from: Vec<Cidr>,
}

impl ProxySettings {
    /// The kernel path cannot carry this rule's flows.
    pub fn needs_relay(&self) -> bool {
        self.send != ProxyProtocol::Off || !self.accept_from.is_empty()
    }
}

/// Daemon-wide settings of the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelaySettings {
    /// UDP sessions a listener holds at most; new clients beyond are refused.
    pub max_udp_sessions: usize,
    /// How long live flows may finish after SIGTERM before they are closed.
    pub drain_timeout: Duration,
    /// A TCP connection that carried no byte either way this long after
    /// it was accepted is reset.
    pub first_byte_timeout: Duration,
    /// Bytes of each splice pipe (one per direction of a TCP connection):
    /// what a slow reader can make the relay hold per direction.
    pub pipe_size: usize,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            max_udp_sessions: 65536,
            drain_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(30),
            pipe_size: 256 << 10,
        }
    }
}

/// Daemon-wide settings of the kernel path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSettings {
    /// Entries of the conntrack map (each flow takes two).
    pub conntrack_size: u32,
    /// SNAT source ports, inclusive, reserved from local sockets while running.
    pub snat_ports: (u16, u16),
    /// SNAT source addresses new flows spread over (`kernel.snat_addresses`);
    /// empty: each backend's route address.
    pub snat_addresses: Vec<std::net::Ipv4Addr>,
}

impl Default for KernelSettings {
    fn default() -> Self {
        KernelSettings {
            conntrack_size: 262_144,
            snat_ports: (40000, 59999),
            snat_addresses: Vec::new(),
        }
    }
}

/// Entries for the kernel maps, in the layouts of `forwarder-common`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelTable {
    pub rules: Vec<(RuleKey, RuleValue)>,
    /// `(index into BACKENDS, entry)`; `snat_addr` is left zero for the
    /// daemon to fill from the routing table.
    pub backends: Vec<(u32, Backend)>,
    /// `ACL` trie entries: (key prefix length, key data, verdict).
    pub acl: Vec<(u32, AclKey, u32)>,
    /// `RANGES` trie entries of the range rules (which have no `rules` entry).
    pub ranges: Vec<RangeEntry>,
}

/// One `RANGES` trie entry: a block of a range rule's ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeEntry {
    pub prefix_len: u32,
    pub key: RangeKey,
    pub value: RangeValue,
}

impl KernelTable {
    /// Every rule's value: single ports' and each range block's.
    pub fn values(&self) -> impl Iterator<Item = &RuleValue> {
        let ranges = self.ranges.iter().map(|e| &e.value.rule);
        self.rules.iter().map(|(_, v)| v).chain(ranges)
    }
}

/// How the hostnames of targets are followed; new flows follow each answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// How long an answer without a TTL (from /etc/hosts) is kept.
    pub refresh: Duration,
    /// The bounds a DNS answer's TTL is held within; a failed lookup is
    /// tried again after `min_ttl`, then twice as long each time, at most
    /// `max_ttl`.
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            refresh: Duration::from_secs(30),
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
        }
    }
}

/// What a hostname resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Its IPv4 addresses if it has any, else its IPv6 ones; sorted.
    pub addrs: Vec<IpAddr>,
    /// How long DNS said the answer may be kept; `None` for /etc/hosts.
    pub ttl: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    /// Where the kernel path attaches; `None` means every up, non-loopback interface.
    pub interfaces: Option<Vec<String>>,
    pub listeners: Vec<Listener>,
    pub kernel: KernelTable,
    pub relay: RelaySettings,
    pub kernel_settings: KernelSettings,
    pub dns: DnsSettings,
    /// The hostnames the targets were given as, with their answers.
    pub hostnames: BTreeMap<String, Answer>,
    /// The Prometheus endpoint (`metrics:`); off when `None`.
    pub metrics: Option<MetricsSettings>,
}

/// `metrics:`: where `GET /metrics` is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
}

/// Told of the flows the relay owns, so that the kernel path leaves them
/// alone for their whole life (a flow never switches paths mid-stream).
/// `client` is the peer's address, `local` the address and port it sent to.
pub trait FlowObserver: Send + Sync {
    fn relay_flow_started(&self, protocol: Protocol, client: SocketAddr, local: SocketAddr);
    fn relay_flow_ended(&self, protocol: Protocol, client: SocketAddr, local: SocketAddr);
}

/// The observer when there is no kernel path.
pub struct NoKernelPath;

impl FlowObserver for NoKernelPath {
    fn relay_flow_started(&self, _: Protocol, _: SocketAddr, _: SocketAddr) {}
    fn relay_flow_ended(&self, _: Protocol, _: SocketAddr, _: SocketAddr) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_port_is_not_a_range_and_maps_to_the_backend_port() {
        let p = ListenPorts::SINGLE;
        assert!(!p.is_range());
        assert_eq!(p.last(7878), 7878);
        assert_eq!(p.target_port(7878, 7878, 3478), 3478);
    }

    #[test]
    fn shifted_range_maps_each_port_by_its_offset() {
        let p = ListenPorts {
            count: 1000,
            target: TargetPorts::Shifted,
        };
        assert!(p.is_range());
        assert_eq!(p.last(20000), 20999);
        assert_eq!(p.target_port(20000, 20000, 30000), 30000);
        assert_eq!(p.target_port(20000, 20500, 30000), 30500);
        assert_eq!(p.target_port(20000, 20999, 30000), 30999);
        // 1:1 is a shift by zero.
        let full = ListenPorts {
            count: 16384,
            target: TargetPorts::Shifted,
        };
        assert_eq!(full.last(49152), 65535);
        assert_eq!(full.target_port(49152, 65535, 49152), 65535);
        assert_eq!(full.target_port(49152, 57344, 49152), 57344);
    }

    #[test]
    fn many_to_one_maps_every_port_to_the_backend_port() {
        let p = ListenPorts {
            count: 100,
            target: TargetPorts::Same,
        };
        assert_eq!(p.last(5000), 5099);
        for port in [5000, 5050, 5099] {
            assert_eq!(p.target_port(5000, port, 7000), 7000);
        }
    }
}
