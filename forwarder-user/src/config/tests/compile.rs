//! The pure compile step, on hand-made validated routes.

use std::net::{IpAddr, SocketAddr};

use forwarder_common::{
    ADDR_ANY, BACKEND_F_HEALTHY, MAX_BACKENDS_PER_RULE, PROTO_TCP, PROTO_UDP, RULE_F_ACL,
    RULE_F_ACL_DEFAULT_DENY, RULE_F_ACL_REJECT, RULE_F_PRESERVE_CLIENT_IP, RULE_F_RELAY,
    RULE_F_XDP, addr_ipv4_be,
};

use crate::acl::AclAction;
use crate::config::{Acl, Cidr, Config, ProxyProtocol, Route, addr_of, compile};
use crate::rules::{BackendSpec, KernelSettings, PathMode, Protocol, RelaySettings, Timeouts};

fn route(
    alias: &str,
    protocols: &[Protocol],
    bind: Option<&str>,
    listen: u16,
    backends: &[(&str, u16)],
) -> Route {
    Route {
        alias: alias.into(),
        protocols: protocols.to_vec(),
        bind: bind.map(|b| b.parse().unwrap()),
        listen,
        listen_picked: false,
        ports: crate::rules::ListenPorts::SINGLE,
        backends: backends
            .iter()
            .map(|(a, w)| BackendSpec {
                addr: a.parse().unwrap(),
                weight: *w,
            })
            .collect(),
        timeouts: Timeouts::default(),
        path: PathMode::Auto,
        preserve_client_ip: false,
        healthcheck: None,
        acl: Acl::default(),
        proxy_protocol: ProxyProtocol::Off,
        proxy_protocol_on_udp: true,
        accept_proxy_protocol: Vec::new(),
        max_connections: None,
    }
}

fn config(routes: Vec<Route>) -> Config {
    Config {
        interfaces: None,
        routes,
        relay: RelaySettings::default(),
        kernel: KernelSettings::default(),
        acl: Acl::default(),
    }
}

#[test]
fn one_rule_per_alias_and_protocol_with_sequential_ids() {
    let c = compile(&config(vec![
        route(
            "turn",
            &[Protocol::Tcp, Protocol::Udp],
            None,
            7878,
            &[("10.0.0.5:3478", 1)],
        ),
        route(
            "dns",
            &[Protocol::Udp],
            Some("192.0.2.1"),
            53,
            &[("10.0.0.53:53", 1)],
        ),
    ]));
    let got: Vec<_> = c
        .listeners
        .iter()
        .map(|l| (l.rule_id, l.alias.as_str(), l.protocol, l.bind))
        .collect();
    let any: SocketAddr = "[::]:7878".parse().unwrap();
    assert_eq!(
        got,
        [
            (0, "turn", Protocol::Tcp, any),
            (1, "turn", Protocol::Udp, any),
            (2, "dns", Protocol::Udp, "192.0.2.1:53".parse().unwrap()),
        ]
    );
    let keys: Vec<_> = c
        .kernel
        .rules
        .iter()
        .map(|(k, v)| (k.proto, v.rule_id))
        .collect();
    assert_eq!(keys, [(PROTO_TCP, 0), (PROTO_UDP, 1), (PROTO_UDP, 2)]);
}

#[test]
fn keys_hold_ipv4_mapped_or_ipv6_addresses_and_network_order_ports() {
    let c = compile(&config(vec![
        route("any", &[Protocol::Tcp], None, 0x1234, &[("10.0.0.1:80", 1)]),
        route(
            "v4any",
            &[Protocol::Tcp],
            Some("0.0.0.0"),
            1001,
            &[("10.0.0.1:80", 1)],
        ),
        route(
            "v6any",
            &[Protocol::Tcp],
            Some("::"),
            1002,
            &[("10.0.0.1:80", 1)],
        ),
        route(
            "v4",
            &[Protocol::Tcp],
            Some("192.0.2.1"),
            1003,
            &[("10.0.0.1:80", 1)],
        ),
        route(
            "v6",
            &[Protocol::Udp],
            Some("2001:db8::1"),
            1004,
            &[("[2001:db8::2]:53", 1)],
        ),
    ]));
    let k: Vec<_> = c.kernel.rules.iter().map(|(k, _)| *k).collect();
    assert_eq!(k[0].addr, ADDR_ANY);
    assert_eq!(
        k[0].port.to_ne_bytes(),
        [0x12, 0x34],
        "port in network order"
    );
    assert_eq!(k[1].addr, ADDR_ANY);
    assert_eq!(k[2].addr, ADDR_ANY);
    assert_eq!(
        addr_ipv4_be(&k[3].addr),
        Some(u32::from_ne_bytes([192, 0, 2, 1]))
    );
    let v6 = k[4].addr;
    let bytes: Vec<u8> = v6.iter().flat_map(|w| w.to_ne_bytes()).collect();
    assert_eq!(
        bytes,
        "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
    );
    assert_eq!(addr_ipv4_be(&v6), None);
    assert!(k.iter().all(|k| k._pad == 0));
    assert_eq!(
        c.listeners[1].bind,
        "0.0.0.0:1001".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        c.listeners[2].bind,
        "[::]:1002".parse::<SocketAddr>().unwrap()
    );
}

#[test]
fn backends_sit_at_rule_id_times_max_with_weights() {
    let c = compile(&config(vec![
        route("a", &[Protocol::Tcp], None, 1, &[("10.0.0.1:80", 1)]),
        route(
            "lb",
            &[Protocol::Tcp, Protocol::Udp],
            None,
            2,
            &[("10.0.0.2:8080", 3), ("[2001:db8::3]:81", 2)],
        ),
    ]));
    let m = MAX_BACKENDS_PER_RULE;
    let index: Vec<u32> = c.kernel.backends.iter().map(|(i, _)| *i).collect();
    assert_eq!(index, [0, m, m + 1, 2 * m, 2 * m + 1]);
    let (_, b) = c.kernel.backends[1];
    assert_eq!(b.addr, addr_of("10.0.0.2".parse().unwrap()));
    assert_eq!(b.port, 8080u16.to_be());
    assert_eq!(b.weight, 3);
    assert_eq!(b.flags, BACKEND_F_HEALTHY);
    assert_eq!(b.snat_addr, ADDR_ANY, "the daemon fills it");
    let values: Vec<_> = c
        .kernel
        .rules
        .iter()
        .map(|(_, v)| (v.backend_count, v.total_weight))
        .collect();
    assert_eq!(values, [(1, 1), (2, 5), (2, 5)]);
}

#[test]
fn relay_and_preserve_flags() {
    let mut relay = route("relay", &[Protocol::Tcp], None, 1, &[("10.0.0.1:80", 1)]);
    relay.path = PathMode::Relay;
    let loopback = route(
        "lo",
        &[Protocol::Tcp],
        None,
        2,
        &[("10.0.0.1:80", 1), ("127.0.0.2:80", 1)],
    );
    let mapped_lo = route(
        "lo6",
        &[Protocol::Tcp],
        None,
        3,
        &[("[::ffff:127.0.0.1]:80", 1)],
    );
    let mut keep = route("keep", &[Protocol::Udp], None, 4, &[("10.0.0.1:80", 1)]);
    keep.preserve_client_ip = true;
    keep.path = PathMode::Kernel;
    let plain = route("plain", &[Protocol::Udp], None, 5, &[("[::1]:80", 1)]);
    let c = compile(&config(vec![relay, loopback, mapped_lo, keep, plain]));
    let flags: Vec<u32> = c.kernel.rules.iter().map(|(_, v)| v.flags).collect();
    assert_eq!(
        flags,
        [
            RULE_F_RELAY,
            RULE_F_RELAY,
            RULE_F_RELAY,
            RULE_F_PRESERVE_CLIENT_IP,
            RULE_F_RELAY
        ]
    );
    assert!(c.listeners[3].preserve_client_ip);
    assert_eq!(c.listeners[3].path, PathMode::Kernel);
}

#[test]
fn only_path_xdp_lets_xdp_carry_a_rule() {
    let paths = [
        (PathMode::Auto, 0),
        (PathMode::Kernel, 0),
        (PathMode::Tc, 0),
        (PathMode::Xdp, RULE_F_XDP),
        (PathMode::Relay, RULE_F_RELAY),
    ];
    let routes = paths
        .iter()
        .enumerate()
        .map(|(n, &(path, _))| {
            let mut r = route(
                path.as_str(),
                &[Protocol::Udp],
                None,
                n as u16 + 1,
                &[("10.0.0.1:80", 1)],
            );
            r.path = path;
            r
        })
        .collect();
    let c = compile(&config(routes));
    let flags: Vec<u32> = c.kernel.rules.iter().map(|(_, v)| v.flags).collect();
    let want: Vec<u32> = paths.iter().map(|&(_, f)| f).collect();
    assert_eq!(flags, want);
    assert!(PathMode::Tc.requires_kernel() && PathMode::Xdp.requires_kernel());
    assert!(!PathMode::Auto.requires_kernel() && !PathMode::Relay.requires_kernel());
}

#[test]
fn settings_pass_through_and_compile_is_deterministic() {
    let mut cfg = config(vec![route(
        "a",
        &[Protocol::Tcp],
        None,
        1,
        &[("10.0.0.1:80", 1)],
    )]);
    cfg.interfaces = Some(vec!["eth0".into()]);
    cfg.kernel.snat_ports = (20000, 20999);
    cfg.routes[0].listen_picked = true;
    let a = compile(&cfg);
    assert_eq!(a, compile(&cfg));
    assert_eq!(a.interfaces, cfg.interfaces);
    assert_eq!(a.kernel_settings.snat_ports, (20000, 20999));
    assert!(a.listeners[0].listen_picked);
    let _: IpAddr = a.listeners[0].backends[0].addr.ip();
}

#[test]
fn the_table_shows_every_rule() {
    let mut lb = route(
        "lb",
        &[Protocol::Tcp],
        Some("192.0.2.1"),
        80,
        &[("10.0.0.1:80", 1), ("10.0.0.2:80", 2)],
    );
    lb.preserve_client_ip = true;
    lb.acl = Acl {
        allow: vec![Cidr {
            addr: "10.0.0.0".parse().unwrap(),
            prefix: 8,
        }],
        deny: Vec::new(),
        action: Some(AclAction::Reject),
        default_allow: None,
    };
    let mut picked = route("echo", &[Protocol::Udp], None, 33333, &[("127.0.0.1:7", 1)]);
    picked.listen_picked = true;
    let t = crate::config::table(&compile(&config(vec![lb, picked])));
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(
        lines[0],
        "ID  ALIAS  PROTO  LISTEN                  TARGET                                          PATH                     ACL"
    );
    assert_eq!(
        lines[1],
        "0   lb     tcp    192.0.2.1:80         →  10.0.0.1:80 (weight 1), 10.0.0.2:80 (weight 2)  auto, client ip kept     allow 10.0.0.0/8, else deny (reject)"
    );
    assert_eq!(
        lines[2],
        "1   echo   udp    [::]:33333 (picked)  →  127.0.0.1:7                                     relay (loopback target)  -"
    );
    assert!(t.contains("interfaces: every up, non-loopback interface"));
    assert!(t.contains("kernel: conntrack_size 262144, snat_ports 40000-59999"));
    let empty = crate::config::table(&compile(&config(vec![])));
    assert!(empty.starts_with("(no rules)\n"), "{empty}");
}

#[test]
fn godoxy_acl_items_the_global_acl_and_its_default_compile_to_flags_and_entries() {
    let c = crate::config::load_str(
        "acl: {default: deny, allow: [cidr:10.0.0.0/8]}
routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 1001:80, acl: {deny: [ip:10.0.0.5], action: reject}}
  b: {scheme: udp, host: 10.0.0.1, port: 1002:80}
",
        "t.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let acl = |n: usize| c.listeners[n].acl.as_ref().unwrap().compact();
    assert_eq!(
        acl(0),
        "deny 10.0.0.5/32, allow 10.0.0.0/8, else deny (reject)"
    );
    assert_eq!(acl(1), "allow 10.0.0.0/8, else deny (drop)");
    let flags = |n: usize| c.kernel.rules[n].1.flags;
    let acl_flags = RULE_F_ACL | RULE_F_ACL_DEFAULT_DENY;
    assert_eq!(
        flags(0) & (acl_flags | RULE_F_ACL_REJECT),
        acl_flags | RULE_F_ACL_REJECT
    );
    assert_eq!(flags(1) & (acl_flags | RULE_F_ACL_REJECT), acl_flags);
    assert_eq!(c.kernel.acl.len(), 3, "two for a, one for b");
    // No ACL anywhere: no flag, no entry.
    let plain = crate::config::load_str(
        "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1001:80}\n",
        "t.yaml",
    )
    .unwrap();
    assert_eq!(plain.kernel.rules[0].1.flags & RULE_F_ACL, 0);
    assert!(plain.kernel.acl.is_empty() && plain.listeners[0].acl.is_none());
}

#[test]
fn too_many_acl_entries_over_all_rules_are_an_error() {
    let networks: Vec<String> = (0..=forwarder_common::MAX_ACL_ENTRIES / 2)
        .map(|n| format!("10.{}.{}.0/24", n / 256 % 256, n % 256))
        .collect();
    // Duplicates are fine for counting; the global list is copied into each rule.
    let text = format!(
        "acl: {{deny: [{}]}}\nroutes:\n  a: {{scheme: tcp, host: 10.0.0.1, port: 1001:80}}\n",
        networks.join(", ")
    );
    let e = crate::config::load_str(&text, "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("field `acl`") && e.contains("ACL entries over all rules"),
        "{e}"
    );
}

#[test]
fn a_routes_own_acl_entries_count_once_per_protocol_up_to_the_limit_exactly() {
    let limit = (forwarder_common::MAX_ACL_ENTRIES / 2) as usize;
    // A tcp,udp route whose allow and deny lists fill the limit together.
    let file = |deny_extra: usize| {
        let half = limit / 4;
        let net = |first: usize, n: usize| -> Vec<String> {
            (n * 1000..n * 1000 + first)
                .map(|i| format!("10.{}.{}.0/24", i / 256 % 256, i % 256))
                .collect()
        };
        let allow = net(half, 0);
        let deny: Vec<String> = (0..half + deny_extra)
            .map(|i| format!("11.{}.{}.0/24", i / 256 % 256, i % 256))
            .collect();
        format!(
            "routes:\n  a: {{scheme: 'tcp,udp', host: 10.0.0.1, port: 1001:80, acl: {{allow: [{}], deny: [{}]}}}}\n",
            allow.join(", "),
            deny.join(", ")
        )
    };
    let fits = crate::config::load_str(&file(0), "t.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fits.kernel.acl.len(), limit);
    let e = crate::config::load_str(&file(1), "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("found ACL entry number {}", limit + 2)),
        "{e}"
    );
}

#[test]
fn every_error_is_listed_by_iterating_the_errors() {
    let errors = crate::config::load_str(
        "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 70000:80}\n  b: {scheme: udp, port: 1:2, hots: x}\n",
        "t.yaml",
    )
    .unwrap_err();
    let listed: Vec<String> = (&errors).into_iter().map(ToString::to_string).collect();
    assert_eq!(listed.len(), errors.len());
    assert!(listed.len() >= 2, "{listed:?}");
    assert!(!errors.is_empty() && crate::config::Errors::default().is_empty());
    assert_eq!(listed.join("\n"), errors.to_string());
}

#[test]
fn an_ipv4_network_in_the_mapped_form_meets_its_twin_in_the_other_list() {
    let e = crate::config::load_str(
        "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1001:80, acl: {allow: [10.0.0.0/8], deny: ['::ffff:10.0.0.0/104']}}\n",
        "t.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`10.0.0.0/8` both allowed and denied"), "{e}");
}
