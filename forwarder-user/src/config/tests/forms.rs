//! Every way of writing a route gives the rules it should.

use std::time::Duration;

use super::{TestEnv, load, load_env, rows, warnings};
use crate::rules::PathMode;

/// (what, file, rules as `id alias proto bind -> targets path`).
const FORMS: &[(&str, &str, &[&str])] = &[
    (
        "route map: the TURN pair",
        "routes:
  turn-tcp:
    scheme: tcp
    host: 10.0.0.5
    port: 7878:3478
  turn-udp:
    scheme: udp
    host: 10.0.0.5
    port: 7878:3478
",
        &[
            "0 turn-tcp tcp [::]:7878 -> 10.0.0.5:3478 auto",
            "1 turn-udp udp [::]:7878 -> 10.0.0.5:3478 auto",
        ],
    ),
    (
        "route map: tcp,udp makes two rules of one alias, in the order written",
        "routes:
  game: {scheme: 'tcp,udp', host: 10.0.0.6, port: 25565:25565}
  voice: {scheme: 'udp, tcp', host: 10.0.0.6, port: 9987:9987}
",
        &[
            "0 game tcp [::]:25565 -> 10.0.0.6:25565 auto",
            "1 game udp [::]:25565 -> 10.0.0.6:25565 auto",
            "2 voice udp [::]:9987 -> 10.0.0.6:9987 auto",
            "3 voice tcp [::]:9987 -> 10.0.0.6:9987 auto",
        ],
    ),
    (
        "route map: scheme as a YAML list",
        "routes:\n  a: {scheme: [udp, tcp], host: 10.0.0.1, port: 5000:5001}\n",
        &[
            "0 a udp [::]:5000 -> 10.0.0.1:5001 auto",
            "1 a tcp [::]:5000 -> 10.0.0.1:5001 auto",
        ],
    ),
    (
        "route map: host defaults to 127.0.0.1 (a loopback target: relay)",
        "routes:\n  a: {scheme: tcp, port: 2000:3000}\n",
        &["0 a tcp [::]:2000 -> 127.0.0.1:3000 auto"],
    ),
    (
        "route map: `:target` and a numeric port are Godoxy forms too",
        "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1:2}\n  picked: {scheme: udp, host: 10.0.0.1, port: '0:53'}\n",
        &["0 a tcp [::]:1 -> 10.0.0.1:2 auto"],
    ),
    (
        "route map: a target port named by service, looked up per protocol",
        "routes:
  dns: {scheme: 'tcp,udp', host: 10.0.0.1, port: 5300:domain}
  logs: {scheme: udp, host: 10.0.0.1, port: 5514:syslog}
  old-godoxy: {scheme: udp, host: 10.0.0.1, port: 2223:dns}
",
        &[
            "0 dns tcp [::]:5300 -> 10.0.0.1:53 auto",
            "1 dns udp [::]:5300 -> 10.0.0.1:53 auto",
            "2 logs udp [::]:5514 -> 10.0.0.1:514 auto",
            "3 old-godoxy udp [::]:2223 -> 10.0.0.1:53 auto",
        ],
    ),
    (
        "route map: bind forms",
        "routes:
  any: {scheme: tcp, host: 10.0.0.1, port: 1000:80}
  v4any: {scheme: tcp, host: 10.0.0.1, port: 1001:80, bind: 0.0.0.0}
  v4: {scheme: tcp, host: 10.0.0.1, port: 1002:80, bind: 192.0.2.1}
  v6: {scheme: udp, host: '2001:db8::1', port: 1003:80, bind: '2001:db8::2'}
  v6b: {scheme: udp, host: '[2001:db8::1]', port: 1004:80, bind: '[::1]'}
",
        &[
            "0 any tcp [::]:1000 -> 10.0.0.1:80 auto",
            "1 v4any tcp 0.0.0.0:1001 -> 10.0.0.1:80 auto",
            "2 v4 tcp 192.0.2.1:1002 -> 10.0.0.1:80 auto",
            "3 v6 udp [2001:db8::2]:1003 -> [2001:db8::1]:80 auto",
            "4 v6b udp [::1]:1004 -> [2001:db8::1]:80 auto",
        ],
    ),
    (
        "route map: hostnames resolve at load (IPv4 first)",
        "routes:
  a: {scheme: tcp, host: backend.test, port: 1000:80}
  b: {scheme: tcp, host: Dual.Test, port: 1001:80}
",
        &[
            "0 a tcp [::]:1000 -> 10.0.0.9:80 auto",
            "1 b tcp [::]:1001 -> 10.0.0.10:80 auto",
        ],
    ),
    (
        "route map: backends with weights, default port, mapping form, path",
        "routes:
  lb:
    scheme: tcp
    port: 8080:80
    backends:
      - 10.0.0.1
      - 10.0.0.2:8080 weight=3
      - '[2001:db8::3]:81'
      - {host: backend.test, port: 82, weight: 2}
    path: kernel
  lb2:
    scheme: udp
    port: '9000:'
    backends: 10.0.0.4:53, 10.0.0.5:53 weight=2
    path: relay
",
        &[
            "0 lb tcp [::]:8080 -> 10.0.0.1:80,10.0.0.2:8080*3,[2001:db8::3]:81,10.0.0.9:82*2 kernel",
            "1 lb2 udp [::]:9000 -> 10.0.0.4:53,10.0.0.5:53*2 relay",
        ],
    ),
    (
        "route map: the kernel path pinned to TC or to XDP, any case",
        "routes:
  pinned-tc: {scheme: tcp, host: 10.0.0.5, port: 7878:3478, path: tc}
  pinned-xdp: {scheme: udp, host: 10.0.0.5, port: 7878:3478, path: XDP}
",
        &[
            "0 pinned-tc tcp [::]:7878 -> 10.0.0.5:3478 tc",
            "1 pinned-xdp udp [::]:7878 -> 10.0.0.5:3478 xdp",
        ],
    ),
    (
        "route map: Godoxy templates (x-) and YAML merge keys",
        "routes:
  x-common: &common
    scheme: udp
    host: 10.0.0.3
  a:
    <<: *common
    port: 3000:3000
  b:
    <<: *common
    host: 10.0.0.4
    port: 3001:3001
",
        &[
            "0 a udp [::]:3000 -> 10.0.0.3:3000 auto",
            "1 b udp [::]:3001 -> 10.0.0.4:3001 auto",
        ],
    ),
    (
        "route map: no scheme but a listen port is tcp, as in Godoxy",
        "routes:\n  ssh: {host: 10.0.0.2, port: 2222:22}\n",
        &["0 ssh tcp [::]:2222 -> 10.0.0.2:22 auto"],
    ),
    (
        "labels: the issue's example (full labels and #N)",
        "labels:
  proxy.aliases: game,game-q
  proxy.game.scheme: tcp,udp
  proxy.game.port: 25565:25565
  proxy.game.host: 10.0.0.6
  proxy.#2.scheme: udp
  proxy.#2.port: 27015:27015
  proxy.#2.host: 10.0.0.6
",
        &[
            "0 game tcp [::]:25565 -> 10.0.0.6:25565 auto",
            "1 game udp [::]:25565 -> 10.0.0.6:25565 auto",
            "2 game-q udp [::]:27015 -> 10.0.0.6:27015 auto",
        ],
    ),
    (
        "labels: the TURN pair as Godoxy labels",
        "labels:
  proxy.aliases: turn-tcp,turn-udp
  proxy.turn-tcp.scheme: tcp
  proxy.turn-udp.scheme: udp
  proxy.turn-tcp.port: 7878:3478
  proxy.turn-udp.port: 7878:3478
  proxy.*.host: 10.0.0.5
",
        &[
            "0 turn-tcp tcp [::]:7878 -> 10.0.0.5:3478 auto",
            "1 turn-udp udp [::]:7878 -> 10.0.0.5:3478 auto",
        ],
    ),
    (
        "labels: blank-separated aliases, $N, and an alias's own label beats *",
        "labels:
  proxy.aliases: a b  c
  proxy.*.scheme: udp
  proxy.*.host: 10.0.0.1
  proxy.$1.port: 1000:1000
  proxy.b.port: 1001:1001
  proxy.#3.port: 1002:1002
  proxy.c.scheme: tcp
  proxy.c.host: 10.0.0.2
",
        &[
            "0 a udp [::]:1000 -> 10.0.0.1:1000 auto",
            "1 b udp [::]:1001 -> 10.0.0.1:1001 auto",
            "2 c tcp [::]:1002 -> 10.0.0.2:1002 auto",
        ],
    ),
    (
        "labels: shortcuts by index; an empty item leaves an alias to its own labels",
        "labels:
  proxy.aliases: a, b, c
  proxy.schemes: udp, tcp, udp
  proxy.ports: 2000:53, , 2002:53
  proxy.b.port: 2001:22
  proxy.*.host: 10.0.0.1
",
        &[
            "0 a udp [::]:2000 -> 10.0.0.1:53 auto",
            "1 b tcp [::]:2001 -> 10.0.0.1:22 auto",
            "2 c udp [::]:2002 -> 10.0.0.1:53 auto",
        ],
    ),
    (
        "labels: an alias not in proxy.aliases makes its own route",
        "labels:
  proxy.extra.scheme: tcp
  proxy.extra.port: 3000:3000
  proxy.extra.host: 10.0.0.1
",
        &["0 extra tcp [::]:3000 -> 10.0.0.1:3000 auto"],
    ),
    (
        "labels: an alias with dots is matched whole",
        "labels:
  proxy.aliases: app.example.com
  proxy.app.example.com.scheme: tcp
  proxy.app.example.com.port: 3001:80
  proxy.app.example.com.host: 10.0.0.1
",
        &["0 app.example.com tcp [::]:3001 -> 10.0.0.1:80 auto"],
    ),
    (
        "labels: inline YAML for an alias, and for a nested field",
        "labels:
  proxy.aliases: app
  proxy.app: |
    scheme: tcp
    host: 10.0.0.1
    port: 3002:80
  proxy.app.timeouts: '{connect: 2s}'
  proxy.app.timeouts.tcp_close: 3s
",
        &["0 app tcp [::]:3002 -> 10.0.0.1:80 auto"],
    ),
    (
        "labels: inline YAML for every alias (`proxy.*: |`)",
        "labels:
  proxy.aliases: p, q
  proxy.*: |
    scheme: udp
    host: 10.0.0.1
  proxy.p.port: 3100:1
  proxy.q.port: 3101:1
  proxy.q.scheme: tcp
",
        &[
            "0 p udp [::]:3100 -> 10.0.0.1:1 auto",
            "1 q tcp [::]:3101 -> 10.0.0.1:1 auto",
        ],
    ),
    (
        "labels: Docker's list form (key=value)",
        "labels:
  - proxy.aliases=dns
  - proxy.dns.scheme=tcp,udp
  - proxy.dns.port=5353:53
  - proxy.dns.host=10.0.0.53
",
        &[
            "0 dns tcp [::]:5353 -> 10.0.0.53:53 auto",
            "1 dns udp [::]:5353 -> 10.0.0.53:53 auto",
        ],
    ),
    (
        "labels: several containers, each with its own #N",
        "labels:
  - proxy.aliases: a
    proxy.#1.scheme: tcp
    proxy.#1.port: 4000:1
    proxy.#1.host: 10.0.0.1
  - proxy.aliases: b
    proxy.#1.scheme: udp
    proxy.#1.port: 4001:1
    proxy.#1.host: 10.0.0.2
  - other.label: x
    proxy.exclude: true
    proxy.aliases: gone
",
        &[
            "0 a tcp [::]:4000 -> 10.0.0.1:1 auto",
            "1 b udp [::]:4001 -> 10.0.0.2:1 auto",
        ],
    ),
    (
        "include: a Godoxy route file, relative to the including file",
        "include: routes.yml\n",
        &[
            "0 minecraft-bedrock udp [::]:19132 -> 10.0.0.7:19132 auto",
            "1 rcon tcp [::]:25575 -> 10.0.0.7:25575 auto",
        ],
    ),
    (
        "all three forms: rule ids follow the file's order",
        "include: [routes.yml]
labels:
  proxy.aliases: l
  proxy.l.scheme: udp
  proxy.l.port: 6000:6000
  proxy.l.host: 10.0.0.1
routes:
  r: {scheme: tcp, host: 10.0.0.1, port: 6001:6001}
",
        &[
            "0 minecraft-bedrock udp [::]:19132 -> 10.0.0.7:19132 auto",
            "1 rcon tcp [::]:25575 -> 10.0.0.7:25575 auto",
            "2 l udp [::]:6000 -> 10.0.0.1:6000 auto",
            "3 r tcp [::]:6001 -> 10.0.0.1:6001 auto",
        ],
    ),
    (
        "same port, different protocols or binds: no conflict",
        "routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 7000:1}
  b: {scheme: udp, host: 10.0.0.1, port: 7000:1}
  c: {scheme: tcp, host: 10.0.0.1, port: 7001:1, bind: 127.0.0.1}
  d: {scheme: tcp, host: 10.0.0.1, port: 7001:1, bind: 127.0.0.2}
  e: {scheme: tcp, host: 10.0.0.1, port: 7002:1, bind: 0.0.0.0}
  f: {scheme: tcp, host: 10.0.0.1, port: 7002:1, bind: '::1'}
",
        &[
            "0 a tcp [::]:7000 -> 10.0.0.1:1 auto",
            "1 b udp [::]:7000 -> 10.0.0.1:1 auto",
            "2 c tcp 127.0.0.1:7001 -> 10.0.0.1:1 auto",
            "3 d tcp 127.0.0.2:7001 -> 10.0.0.1:1 auto",
            "4 e tcp 0.0.0.0:7002 -> 10.0.0.1:1 auto",
            "5 f tcp [::1]:7002 -> 10.0.0.1:1 auto",
        ],
    ),
    (
        "an empty file and empty sections are valid and have no rules",
        "routes:\nlabels:\n# nothing\n",
        &[],
    ),
];

#[test]
fn every_form_gives_its_rules() {
    for (what, text, want) in FORMS {
        let got = rows(text);
        // Picked ports differ from run to run.
        let got: Vec<String> = got
            .into_iter()
            .filter(|r| !r.contains(" picked "))
            .collect();
        assert_eq!(got, *want, "{what}");
    }
}

#[test]
fn a_single_number_port_picks_a_free_ephemeral_port_per_protocol() {
    let text = "routes:
  echo: {scheme: 'tcp,udp', host: 10.0.0.1, port: 7007}
  fixed: {scheme: tcp, host: 10.0.0.1, port: 7008:1}
";
    let (c, _) = load(text).unwrap();
    let (lo, hi) = crate::config::env::Env::ephemeral_range(&super::System);
    let echo: Vec<_> = c.listeners.iter().filter(|l| l.alias == "echo").collect();
    assert_eq!(echo.len(), 2);
    let port = echo[0].bind.port();
    assert_eq!(
        echo[1].bind.port(),
        port,
        "both protocols share the picked port"
    );
    assert!(echo.iter().all(|l| l.listen_picked));
    assert!((lo..=hi).contains(&port), "{port} outside {lo}-{hi}");
    assert!(
        !(40000..=59999).contains(&port),
        "{port} inside the SNAT range"
    );
    assert_eq!(echo[0].backends[0].addr.port(), 7007);
    assert!(
        !c.listeners
            .iter()
            .find(|l| l.alias == "fixed")
            .unwrap()
            .listen_picked
    );
    let table = crate::config::table(&c);
    assert!(table.contains(&format!("[::]:{port} (picked)")), "{table}");
    // The kernel key carries the picked port too.
    assert!(c.kernel.rules.iter().any(|(k, _)| k.port == port.to_be()));
}

#[test]
fn picking_skips_busy_and_claimed_ports() {
    let mut env = TestEnv {
        real_probe: false,
        range: Some((30000, 30003)),
        ..TestEnv::default()
    };
    env.busy.insert(30000);
    let text = "routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 30001:1}
  b: {scheme: tcp, host: 10.0.0.1, port: 1}
  c: {scheme: tcp, host: 10.0.0.1, port: 1}
";
    let (c, _) = load_env(text, &env).unwrap();
    let mut picked: Vec<u16> = c.listeners[1..].iter().map(|l| l.bind.port()).collect();
    picked.sort();
    assert_eq!(picked, [30002, 30003]);
}

#[test]
fn defaults_and_settings_reach_the_compiled_table() {
    let text = "interfaces: eth0, eth1
relay: {max_udp_sessions: 100, drain_timeout: 1m}
kernel: {conntrack_size: 1024, snat_ports: 20000-29999}
timeouts: {udp_idle: 30s, udp_unreplied: 10s, tcp_established: 1h30m, connect: 500ms}
routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 1000:1}
  b:
    scheme: udp
    host: 10.0.0.1
    port: 1001:1
    timeouts: {udp_idle: 5, tcp_close: 2m, tcp_half_closed: 5m}
    preserve_client_ip: true
    # Until enforced, only the forms that ask for nothing load (acl,
    # proxy_protocol); a disabled healthcheck checks nothing.
    healthcheck: {disabled: true, interval: 10s, timeout: 2s, retries: -1, path: /ping}
    acl: {allow: [], deny: }
    proxy_protocol: 'off'
";
    let (c, w) = load(text).unwrap();
    assert_eq!(
        c.interfaces,
        Some(vec!["eth0".to_owned(), "eth1".to_owned()])
    );
    assert_eq!(c.relay.max_udp_sessions, 100);
    assert_eq!(c.relay.drain_timeout, Duration::from_secs(60));
    assert_eq!(c.kernel_settings.conntrack_size, 1024);
    assert_eq!(c.kernel_settings.snat_ports, (20000, 29999));
    let a = &c.listeners[0].timeouts;
    assert_eq!(a.udp_idle, Duration::from_secs(30));
    assert_eq!(a.tcp_established, Duration::from_secs(5400));
    assert_eq!(a.tcp_close, Duration::from_secs(10));
    assert_eq!(a.connect, Duration::from_millis(500));
    assert_eq!(a.udp_unreplied, Duration::from_secs(10));
    assert_eq!(a.tcp_half_closed, Duration::from_secs(120));
    let b = &c.listeners[1];
    assert_eq!(b.timeouts.udp_unreplied, Duration::from_secs(10));
    assert_eq!(b.timeouts.tcp_half_closed, Duration::from_secs(300));
    assert_eq!(b.timeouts.udp_idle, Duration::from_secs(5));
    assert_eq!(b.timeouts.tcp_close, Duration::from_secs(120));
    assert_eq!(b.timeouts.connect, Duration::from_millis(500));
    assert!(b.preserve_client_ip);
    assert_eq!(b.path, PathMode::Auto);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].to_string().contains("healthcheck.path"), "{}", w[0]);
}

#[test]
fn godoxy_fields_and_http_routes_are_skipped_with_warnings() {
    let w = warnings(
        "routes:
  web:
    scheme: https
    host: 10.0.0.1
    port: 443
    some_new_godoxy_field: x   # web routes are skipped unread
  site:
    host: 10.0.0.1
    port: 80
  ssh:
    scheme: tcp
    host: 10.0.0.1
    port: 2222:22
    homepage: {name: SSH}
    middlewares: {cidr_whitelist: {allow: [10.0.0.0/8]}}
labels:
  proxy.aliases: x
  proxy.x.scheme: fileserver
  proxy.network: frontend
  com.docker.compose.project: demo
",
    );
    let want = [
        "test.yaml:3:13: alias `web`, field `scheme`: scheme `https` is Godoxy's web proxy",
        "test.yaml:7:3: alias `site`, field `scheme`: no `scheme` and no listen port",
        "test.yaml:14:5: alias `ssh`, field `homepage`: a Godoxy field that does not apply",
        "test.yaml:15:5: alias `ssh`, field `middlewares`: a Godoxy field",
        "test.yaml:19:3: `proxy.network`: a Godoxy container setting",
        "test.yaml:20:3: `com.docker.compose.project`: not a `proxy.` label",
        "test.yaml:18:19: alias `x`, field `scheme`: scheme `fileserver`",
    ];
    assert_eq!(w.len(), want.len(), "{w:#?}");
    for prefix in want {
        assert!(
            w.iter().any(|l| l.starts_with(prefix)),
            "no warning `{prefix}` in {w:#?}"
        );
    }
}

#[test]
fn rule_key_and_listener_bind_of_each_bind_form() {
    use forwarder_common::ADDR_ANY;
    let (c, _) = load(
        "routes:
  any: {scheme: tcp, host: 10.0.0.1, port: 1000:80}
  v4any: {scheme: tcp, host: 10.0.0.1, port: 1001:80, bind: 0.0.0.0}
  v4: {scheme: tcp, host: 10.0.0.1, port: 1002:80, bind: 192.0.2.1}
",
    )
    .unwrap();
    let keys: Vec<_> = c.kernel.rules.iter().map(|(k, _)| k.addr).collect();
    assert_eq!(keys[0], ADDR_ANY);
    assert_eq!(keys[1], ADDR_ANY);
    assert_eq!(
        keys[2],
        crate::config::addr_of("192.0.2.1".parse().unwrap())
    );
    assert!(c.listeners[0].bind.is_ipv6() && c.listeners[0].bind.ip().is_unspecified());
    assert!(c.listeners[1].bind.is_ipv4() && c.listeners[1].bind.ip().is_unspecified());
}

#[test]
fn a_port_held_on_ipv6_only_is_not_picked_for_the_wildcard() {
    // Only a host without IPv6 falls back to the IPv4 wildcard; a port in
    // use on IPv6 is in use.
    let env = TestEnv {
        real_probe: false,
        range: Some((30000, 30001)),
        busy_v6: [30000].into_iter().collect(),
        ..TestEnv::default()
    };
    for _ in 0..10 {
        let (c, _) = load_env(
            "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 80}\n",
            &env,
        )
        .unwrap();
        assert_eq!(c.listeners[0].bind.port(), 30001);
    }
}

#[test]
fn every_port_of_the_range_is_tried_from_wherever_picking_starts() {
    // Each load starts at a random port of the range; only one is free.
    let env = TestEnv {
        real_probe: false,
        range: Some((30000, 30007)),
        busy: [30000, 30001, 30002, 30004, 30005, 30006, 30007]
            .into_iter()
            .collect(),
        ..TestEnv::default()
    };
    for _ in 0..32 {
        let (c, _) = load_env(
            "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 80}\n",
            &env,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listeners[0].bind.port(), 30003);
    }
}

#[test]
fn a_port_is_not_picked_on_a_bind_address_the_host_lacks() {
    let env = TestEnv {
        range: Some((30000, 30001)),
        ..TestEnv::default()
    };
    let e = super::errors_env(
        "routes:\n  a: {scheme: tcp, bind: 192.0.2.55, host: 10.0.0.1, port: 80}\n",
        &env,
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("listen port 0 (the bind address 192.0.2.55 is not on this host)"),
        "{}",
        e[0]
    );
}

#[test]
fn on_a_host_without_ipv6_a_port_is_picked_on_the_ipv4_wildcard() {
    let env = TestEnv {
        real_probe: false,
        no_ipv6: true,
        range: Some((30000, 30003)),
        ..TestEnv::default()
    };
    let (c, _) = load_env(
        "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 80}\n",
        &env,
    )
    .unwrap();
    assert_eq!(c.listeners.len(), 1);
    assert!((30000..=30003).contains(&c.listeners[0].bind.port()));
    assert!(c.listeners[0].listen_picked);
}

#[test]
fn an_alias_label_with_no_value_sets_nothing_and_one_with_a_scalar_is_an_error() {
    let with = |value: &str| {
        format!("labels:\n  proxy.aliases: t\n  proxy.t:{value}\n  proxy.t.port: 7000:7001\n")
    };
    let empty = rows(&with(""));
    assert_eq!(empty, ["0 t tcp [::]:7000 -> 127.0.0.1:7001 auto"]);
    assert_eq!(rows(&with(" ~")), empty);
    let e = load(&with(" 5")).unwrap_err().to_string();
    assert!(
        e.contains("field `proxy.t`: found `5`; allowed a mapping of fields"),
        "{e}"
    );
}

#[test]
fn every_path_word_is_taken_in_any_case() {
    for (word, mode) in [
        ("AUTO", PathMode::Auto),
        ("kernel", PathMode::Kernel),
        (" Relay ", PathMode::Relay),
        ("tc", PathMode::Tc),
        ("xdp", PathMode::Xdp),
    ] {
        let got = rows(&format!(
            "routes:\n  a: {{scheme: tcp, host: 10.0.0.1, port: 1001:80, path: '{word}'}}\n"
        ));
        assert_eq!(
            got,
            [format!(
                "0 a tcp [::]:1001 -> 10.0.0.1:80 {}",
                mode.as_str()
            )],
            "path: {word}"
        );
    }
}

#[test]
fn a_shortcut_written_as_a_yaml_list_gives_one_item_per_alias_and_null_skips_one() {
    let got = rows(
        "labels:
  proxy.aliases: a, b
  proxy.ports: [1000:1, ~]
  proxy.schemes: [tcp, udp]
  proxy.a.host: 10.0.0.1
  proxy.b.host: 10.0.0.2
  proxy.b.port: 2000:2
",
    );
    assert_eq!(
        got,
        [
            "0 a tcp [::]:1000 -> 10.0.0.1:1 auto",
            "1 b udp [::]:2000 -> 10.0.0.2:2 auto"
        ]
    );
}

#[test]
fn an_empty_file_or_one_of_comments_has_no_rules_and_no_errors() {
    for text in ["", "\n", "# nothing yet\n", "---\n"] {
        assert!(rows(text).is_empty(), "{text:?}");
    }
}
