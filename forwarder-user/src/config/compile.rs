//! Validated routes to what both paths consume: the relay's listeners and
//! the kernel's map entries. Pure: no files, no DNS, no sockets.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use forwarder_common::{
    ADDR_ANY, Addr, BACKEND_F_HEALTHY, Backend, MAX_BACKENDS_PER_RULE, RULE_F_ACL,
    RULE_F_ACL_DEFAULT_DENY, RULE_F_ACL_REJECT, RULE_F_PRESERVE_CLIENT_IP, RULE_F_RELAY,
    RULE_F_XDP, RuleKey, RuleValue, addr_from_ipv4_be,
    ranges::{RANGE_TARGET_SAME, RANGE_TARGET_SHIFTED, RangeKey, RangeValue, prefixes},
};

use super::acl::Acl;
use super::fields::{HealthCheck, ProxyProtocol};
use super::validate::is_loopback;
use super::values::Cidr;
use crate::acl::{AclAction, RuleAcl};
use crate::rules::{
    BackendSpec, Compiled, HealthSpec, KernelSettings, KernelTable, ListenPorts, Listener,
    PathMode, Probe, Protocol, ProxySettings, RangeEntry, RelaySettings, TargetPorts, Timeouts,
};

/// A whole validated rule file, hosts resolved and listen ports fixed.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub interfaces: Option<Vec<String>>,
    pub routes: Vec<Route>,
    pub relay: RelaySettings,
    pub kernel: KernelSettings,
    /// The global `acl:`, combined with each route's own.
    pub acl: Acl,
}

/// One validated route (alias); `protocols` makes one rule each.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub alias: String,
    /// In the order written; at least one, no repeats.
    pub protocols: Vec<Protocol>,
    /// `None`: every address, IPv4 and IPv6 (`[::]`).
    pub bind: Option<IpAddr>,
    /// Never 0 when compiled. The first port of a range.
    pub listen: u16,
    pub ports: ListenPorts,
    /// The listen port was picked at load.
    pub listen_picked: bool,
    /// 1 to `MAX_BACKENDS_PER_RULE`.
    pub backends: Vec<BackendSpec>,
    pub timeouts: Timeouts,
    pub path: PathMode,
    pub preserve_client_ip: bool,
    /// `None` when left out or disabled.
    pub healthcheck: Option<HealthCheck>,
    /// Not enforced yet: a load refuses any value but an empty one, so it
    /// is always empty here and nothing compiles it.
    pub acl: Acl,
    pub proxy_protocol: ProxyProtocol,
    /// False: `proxy_protocol` applies to the tcp rule only (Godoxy's
    /// `relay_proxy_protocol_header`).
    pub proxy_protocol_on_udp: bool,
    /// Trusted upstreams whose PROXY headers are read (tcp only).
    pub accept_proxy_protocol: Vec<Cidr>,
    /// The relay's open connections of the tcp rule; set, that rule is
    /// relay-only.
    pub max_connections: Option<u32>,
}

impl Route {
    /// The PROXY protocol settings of the route's rule for `protocol`.
    pub fn proxy(&self, protocol: Protocol) -> ProxySettings {
        let on_udp = protocol == Protocol::Tcp || self.proxy_protocol_on_udp;
        ProxySettings {
            send: if on_udp {
                self.proxy_protocol
            } else {
                ProxyProtocol::Off
            },
            accept_from: self.accept_proxy_protocol.clone(),
        }
    }
}

/// The rule table of `config`. Rule ids run from 0 in file order, one per
/// (alias, protocol). Validation guarantees what this relies on: fewer than
/// `MAX_RULES` rules, 1 to `MAX_BACKENDS_PER_RULE` backends, listen ports
/// not 0, and no two rules with the same kernel key.
pub fn compile(config: &Config) -> Compiled {
    let mut listeners = Vec::new();
    let mut kernel = KernelTable::default();
    let mut rule_id: u32 = 0;
    for route in &config.routes {
        debug_assert!(
            route.listen != 0,
            "listen port of `{}` not picked",
            route.alias
        );
        debug_assert!(route.backends.len() <= MAX_BACKENDS_PER_RULE as usize);
        let relay_only = route.path == PathMode::Relay
            || route.backends.iter().any(|b| is_loopback(b.addr.ip()));
        let mut route_flags = 0;
        if route.preserve_client_ip {
            route_flags |= RULE_F_PRESERVE_CLIENT_IP;
        }
        if route.path == PathMode::Xdp {
            route_flags |= RULE_F_XDP;
        }
        let acl = RuleAcl::combine(&route.acl, &config.acl);
        if let Some(acl) = &acl {
            route_flags |= RULE_F_ACL;
            if !acl.default_allow {
                route_flags |= RULE_F_ACL_DEFAULT_DENY;
            }
            if acl.action == AclAction::Reject {
                route_flags |= RULE_F_ACL_REJECT;
            }
        }
        for &protocol in &route.protocols {
            let proxy = route.proxy(protocol);
            let mut flags = route_flags;
            let max_connections = route.max_connections.filter(|_| protocol == Protocol::Tcp);
            if relay_only || proxy.needs_relay() || max_connections.is_some() {
                flags |= RULE_F_RELAY;
            }
            let bind = SocketAddr::new(
                route.bind.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                route.listen,
            );
            let value = RuleValue {
                rule_id,
                flags,
                backend_count: route.backends.len() as u32,
                total_weight: route.backends.iter().map(|b| u32::from(b.weight)).sum(),
            };
            if route.ports.is_range() {
                kernel.ranges.extend(range_entries(
                    key_addr(route.bind),
                    protocol,
                    route.listen,
                    route.ports,
                    value,
                ));
            } else {
                kernel.rules.push((
                    RuleKey {
                        addr: key_addr(route.bind),
                        port: route.listen.to_be(),
                        proto: protocol.ip_proto(),
                        _pad: 0,
                    },
                    value,
                ));
            }
            for (n, b) in route.backends.iter().enumerate() {
                kernel.backends.push((
                    rule_id * MAX_BACKENDS_PER_RULE + n as u32,
                    Backend {
                        addr: addr_of(b.addr.ip()),
                        snat_addr: ADDR_ANY,
                        port: b.addr.port().to_be(),
                        weight: b.weight,
                        flags: BACKEND_F_HEALTHY,
                    },
                ));
            }
            if let Some(acl) = &acl {
                kernel.acl.extend(acl.kernel_entries(rule_id));
            }
            listeners.push(Listener {
                rule_id,
                alias: route.alias.clone(),
                protocol,
                bind,
                listen_picked: route.listen_picked,
                ports: route.ports,
                backends: route.backends.clone(),
                timeouts: route.timeouts,
                path: route.path,
                preserve_client_ip: route.preserve_client_ip,
                proxy,
                health: route.healthcheck.as_ref().map(|h| health_spec(h, protocol)),
                acl: acl.clone(),
                max_connections,
            });
            rule_id += 1;
        }
    }
    Compiled {
        interfaces: config.interfaces.clone(),
        listeners,
        kernel,
        relay: config.relay,
        kernel_settings: config.kernel.clone(),
        ..Compiled::default()
    }
}

/// The check of one protocol's rule: a tcp rule connects, a udp rule
/// sends the payload (validation made sure a udp route has one).
fn health_spec(h: &HealthCheck, protocol: Protocol) -> HealthSpec {
    let probe = match protocol {
        Protocol::Tcp => Probe::TcpConnect,
        Protocol::Udp => Probe::Udp {
            payload: h.payload.clone().unwrap_or_default(),
            expect: h.expect.clone().unwrap_or_default(),
        },
    };
    HealthSpec {
        interval: h.interval,
        timeout: h.timeout,
        fall: h.fall,
        rise: h.rise,
        probe,
    }
}

/// The `RANGES` trie entries of a range rule: one per aligned block.
pub fn range_entries(
    addr: Addr,
    protocol: Protocol,
    first: u16,
    ports: ListenPorts,
    rule: RuleValue,
) -> impl Iterator<Item = RangeEntry> {
    let target = match ports.target {
        TargetPorts::Shifted => RANGE_TARGET_SHIFTED,
        TargetPorts::Same => RANGE_TARGET_SAME,
    };
    let value = RangeValue::new(rule, first, target);
    prefixes(first, ports.last(first)).map(move |(start, bits)| RangeEntry {
        prefix_len: RangeKey::prefix_len(bits),
        key: RangeKey::new(addr, protocol.ip_proto(), start),
        value,
    })
}

/// The kernel key's address: any unspecified bind is the wildcard.
fn key_addr(bind: Option<IpAddr>) -> Addr {
    match bind {
        None => ADDR_ANY,
        Some(ip) if ip.to_canonical().is_unspecified() => ADDR_ANY,
        Some(ip) => addr_of(ip),
    }
}

/// An address as the maps hold it: IPv6 words in network byte order, IPv4
/// mapped.
pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => addr_from_ipv4_be(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [word(0), word(4), word(8), word(12)]
        }
    }
}
