//! Every class of mistake: the message names file, line, column, alias and
//! field, what was found and what is allowed; all mistakes come at once.

use std::fmt::Write;

use super::{TestEnv, data_dir, errors, errors_env, load};

/// (what, file, expected errors: (start of the line, parts it contains)).
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static [&'static str])],
);

const CASES: &[Case] = &[
    (
        "listen port out of range",
        "routes:\n  a:\n    scheme: tcp\n    port: 70000:80\n",
        &[("test.yaml:4:11: alias `a`, field `port`: found `70000:80` (listen port out of range); allowed `listen:target`", &["0–65535"])],
    ),
    (
        "target port out of range, target 0, not a number",
        "routes:
  a: {scheme: tcp, port: 80:65536}
  b: {scheme: tcp, port: 80:0}
  c: {scheme: tcp, port: 'http'}
  d: {scheme: tcp, port: 1:2:3}
  e: {scheme: tcp, port: 1:-2}
",
        &[
            ("test.yaml:2:26: alias `a`, field `port`: found `80:65536` (target port out of range)", &["target 1–65535"]),
            ("test.yaml:3:26: alias `b`, field `port`: found `80:0` (target port 0)", &[]),
            ("test.yaml:4:26: alias `c`, field `port`: found `http` (no service `http` for tcp in /etc/services)", &["or a service name"]),
            ("test.yaml:6:26: alias `e`, field `port`: found `1:-2` (target port is not a number)", &[]),
            ("test.yaml:5:26: alias `d`, field `port`: found `1:2:3`", &[]),
        ],
    ),
    (
        "a service name that is unknown, or unknown or different for one protocol",
        "routes:
  a: {scheme: udp, host: 10.0.0.1, port: 1:nosuch}
  b: {scheme: 'tcp,udp', host: 10.0.0.1, port: 2:split}
  c: {scheme: tcp, host: 10.0.0.1, port: 3:syslog}
",
        &[
            ("test.yaml:2:42: alias `a`, field `port`: found `1:nosuch` (no service `nosuch` for udp in /etc/services)", &[]),
            ("test.yaml:3:48: alias `b`, field `port`: found `2:split` (service `split` is 7000/tcp but 7001/udp)", &[]),
            ("test.yaml:4:42: alias `c`, field `port`: found `3:syslog` (no service `syslog` for tcp in /etc/services)", &[]),
        ],
    ),
    (
        "bad scheme, with a did-you-mean",
        "routes:
  a: {scheme: tpc, port: 1:1}
  b: {scheme: 'tcp,tcp', port: 2:2}
  c: {scheme: 'tcp,http', port: 3:3}
",
        &[
            ("test.yaml:2:15: alias `a`, field `scheme`: found `tpc`; allowed `tcp`, `udp`, or both: `tcp,udp`; did you mean `tcp`?", &[]),
            ("test.yaml:3:20: alias `b`, field `scheme`: found `tcp` twice in `tcp,tcp`", &[]),
            ("test.yaml:4:20: alias `c`, field `scheme`: found `http` in `tcp,http`", &[]),
        ],
    ),
    (
        "bad IP in bind, bad host",
        "routes:
  a: {scheme: tcp, port: 1:1, bind: 10.0.0.300}
  b: {scheme: tcp, port: 2:2, host: 'bad host!'}
  c: {scheme: tcp, port: 3:3, bind: localhost}
",
        &[
            ("test.yaml:2:37: alias `a`, field `bind`: found `10.0.0.300`; allowed an IPv4 or IPv6 address", &[]),
            ("test.yaml:3:37: alias `b`, field `host`: found `bad host!`; allowed an IPv4 or IPv6 address, or a hostname", &[]),
            ("test.yaml:4:37: alias `c`, field `bind`: found `localhost`", &[]),
        ],
    ),
    (
        "bad CIDR in acl",
        "routes:
  a:
    scheme: tcp
    port: 1:1
    acl:
      allow: [10.0.0.0/8, 10.0.0.1/8]
      deny: 300.0.0.0/8
      block: [1.2.3.4]
",
        &[
            ("test.yaml:6:27: alias `a`, field `acl.allow`: found `10.0.0.1/8` (address bits set beyond the prefix)", &["did you mean `10.0.0.0/8`?"]),
            ("test.yaml:7:13: alias `a`, field `acl.deny`: found `300.0.0.0/8`; allowed an address or a CIDR", &[]),
            ("test.yaml:8:7: alias `a`, field `acl.block`: found unknown field `block`; allowed `allow`, `deny`, `action`", &[]),
        ],
    ),
    (
        "acl: a network in both lists, a bad action or default, Godoxy-only fields and matchers",
        "acl:
  allow_local: true
  deny: [tz:Asia/Shanghai]
routes:
  a:
    scheme: tcp
    port: 1:1
    acl:
      allow: [ip:10.0.0.1, cidr:10.6.0.0/16]
      deny: [10.6.0.0/16]
      action: refuse
      default: block
",
        &[
            ("test.yaml:2:3: `acl.allow_local`: found unknown field `allow_local`", &["list local networks in `allow`"]),
            ("test.yaml:3:10: `acl.deny`: found `tz:Asia/Shanghai`", &["need its GeoIP database"]),
            ("test.yaml:10:14: alias `a`, field `acl.deny`: found `10.6.0.0/16` both allowed and denied", &["allowed at test.yaml:9:28"]),
            ("test.yaml:11:15: alias `a`, field `acl.action`: found `refuse`; allowed `drop` (the default) or `reject`", &[]),
            ("test.yaml:12:16: alias `a`, field `acl.default`: found `block`; allowed `allow` or `deny`", &[]),
        ],
    ),
    (
        "unknown fields get a did-you-mean",
        "routes:
  a:
    scheme: tcp
    prot: 1:1
    hots: 10.0.0.1
    colour: red
    idlewatchr: {}
",
        &[
            ("test.yaml:4:5: alias `a`, field `prot`: found unknown field `prot`; allowed `scheme`, `host`, `port`", &["did you mean `port`?"]),
            ("test.yaml:5:5: alias `a`, field `hots`: found unknown field `hots`", &["did you mean `host`?"]),
            ("test.yaml:6:5: alias `a`, field `colour`: found unknown field `colour`; allowed `scheme`, `host`, `port`, `bind`, `backends`, `path`, `timeouts`, `preserve_client_ip`, `acl`, `healthcheck`", &[]),
            // A Godoxy field forwarder does not honour is still suggested.
            ("test.yaml:7:5: alias `a`, field `idlewatchr`: found unknown field `idlewatchr`", &["did you mean `idlewatcher`?"]),
            ("test.yaml:2:3: alias `a`, field `port`: found no `port`", &[]),
        ],
    ),
    (
        "index #N with no such alias",
        "labels:
  proxy.aliases: a, b
  proxy.#3.port: 1:1
  proxy.#0.port: 1:1
  proxy.#x.port: 1:1
  proxy.a.scheme: tcp
  proxy.a.port: 1:1
",
        &[
            ("test.yaml:3:9: `proxy.#3.port`: found index `#3`, but `proxy.aliases` lists 2; allowed `#1` to `#2` (a, b)", &[]),
            ("test.yaml:4:9: `proxy.#0.port`: found `#0` (not an index); allowed `#1` to `#2` (a, b)", &[]),
            ("test.yaml:5:9: `proxy.#x.port`: found `#x` (not an index)", &[]),
        ],
    ),
    (
        "#N without proxy.aliases",
        "labels:\n  proxy.#1.port: 1:1\n",
        &[("test.yaml:2:9: `proxy.#1.port`: found index `#1`, but `proxy.aliases` lists 0; allowed `#N` only with a `proxy.aliases` label", &[])],
    ),
    (
        "a shortcut that conflicts with a full label",
        "labels:
  proxy.aliases: a, b
  proxy.ports: 1000:1, 1001:1
  proxy.schemes: tcp, udp
  proxy.b.port: 2000:1
",
        &[("test.yaml:5:11: alias `b`, field `port`: found `proxy.b.port` setting `port` again", &["already set by `proxy.ports` at test.yaml:3:24"])],
    ),
    (
        "a field set by both #N and the alias's name",
        "labels:
  proxy.aliases: a
  proxy.a.scheme: tcp
  proxy.#1.scheme: udp
  proxy.a.port: 1:1
",
        &[("test.yaml:4:12: alias `a`, field `scheme`: found `proxy.#1.scheme` setting `scheme` again", &["already set by `proxy.a.scheme` at test.yaml:3:11"])],
    ),
    (
        "a shortcut with more items than aliases",
        "labels:\n  proxy.aliases: a\n  proxy.schemes: tcp, udp\n  proxy.a.port: 1:1\n",
        &[("test.yaml:3:23: `proxy.schemes`: found item 2 (`udp`); allowed one item per alias of `proxy.aliases` (1 listed)", &[])],
    ),
    (
        "a shortcut's extra item is not given to an alias that is not listed",
        "labels:\n  proxy.aliases: a\n  proxy.b.port: 2:2\n  proxy.schemes: tcp, udp\n  proxy.a.port: 1:1\n",
        &[("test.yaml:4:23: `proxy.schemes`: found item 2 (`udp`); allowed one item per alias of `proxy.aliases` (1 listed)", &[])],
    ),
    (
        "a list-form label's value is named where it stands",
        "labels:\n  - proxy.aliases=a\n  - proxy.a.port=1:x\n",
        &[("test.yaml:3:18: alias `a`, field `port`: found `1:x` (no service `x` for tcp in /etc/services)", &[])],
    ),
    (
        "a label's value that looks like a mapping but is one quoted text",
        "labels:\n  proxy.a: \"'port: 1:1'\"\n",
        &[("test.yaml:2:12: alias `a`, field `proxy.a`: found `'port: 1:1'`; allowed a mapping of fields (inline YAML), or one label per field: `proxy.<alias>.<field>`", &[])],
    ),
    (
        "a wildcard label that is not a mapping",
        "labels:\n  proxy.*: 5\n  proxy.a.port: 1:1\n",
        &[("test.yaml:2:12: alias `*`, field `proxy.*`: found `5`; allowed a mapping of fields (inline YAML), or one label per field: `proxy.<alias>.<field>`", &[])],
    ),
    (
        "a nested label's part is named where it stands",
        "labels:\n  proxy.a.port: 1:1\n  proxy.a.host: 10.0.0.1\n  proxy.a.healthcheck.intervl: 1s\n",
        &[("test.yaml:4:23: alias `a`, field `healthcheck.intervl`: found unknown field `intervl`", &["did you mean `interval`?"])],
    ),
    (
        "a many-to-one range to port 0 or past 65535",
        "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: '7000-7001:0'}\n  b: {scheme: tcp, host: 10.0.0.1, port: '7002-7003:70000'}\n",
        &[
            ("test.yaml:2:42: alias `a`, field `port`: found `7000-7001:0` (target port 0)", &[]),
            ("test.yaml:3:42: alias `b`, field `port`: found `7002-7003:70000` (target port out of range)", &[]),
        ],
    ),
    (
        "a mistake on the second line of a label's inline YAML",
        "labels:\n  proxy.aliases: a\n  proxy.a: \"port: 1:1\\nhots: 10.0.0.1\"\n",
        &[("test.yaml:4:1: alias `a`, field `hots`: found unknown field `hots`", &["did you mean `host`?"])],
    ),
    (
        "a label that is neither a field nor a mapping",
        "labels:\n  proxy.alias: a,b\n",
        &[("test.yaml:2:16: alias `alias`, field `proxy.alias`: found `a,b`; allowed a mapping of fields", &["did you mean `proxy.aliases`?"])],
    ),
    (
        "two rules claim the same (bind, port, protocol)",
        "routes:
  a: {scheme: 'tcp,udp', host: 10.0.0.1, port: 7878:3478}
labels:
  proxy.b.scheme: udp
  proxy.b.port: 7878:3478
  proxy.b.host: 10.0.0.2
",
        &[("test.yaml:5:17: alias `b`, field `port`: found udp [::]:7878, which alias `a` also claims (udp [::]:7878)", &["alias `a` is at test.yaml:2:48"])],
    ),
    (
        "a specific bind and a wildcard bind on the same port and protocol",
        "routes:
  wild: {scheme: tcp, host: 10.0.0.1, port: 9000:1}
  one: {scheme: tcp, host: 10.0.0.1, port: 9000:1, bind: 127.0.0.1}
  v4: {scheme: udp, host: 10.0.0.1, port: 9001:1, bind: 0.0.0.0}
  v4one: {scheme: udp, host: 10.0.0.1, port: 9001:1, bind: 192.0.2.1}
  six: {scheme: tcp, host: 10.0.0.1, port: 9002:1, bind: '::'}
  sixone: {scheme: tcp, host: 10.0.0.1, port: 9002:1, bind: '2001:db8::1'}
",
        &[
            ("test.yaml:3:44: alias `one`, field `port`: found tcp 127.0.0.1:9000, which alias `wild` also claims (tcp [::]:9000)", &["alias `wild` is at test.yaml:2:45"]),
            ("test.yaml:5:46: alias `v4one`, field `port`: found udp 192.0.2.1:9001, which alias `v4` also claims (udp 0.0.0.0:9001)", &[]),
            ("test.yaml:7:47: alias `sixone`, field `port`: found tcp [2001:db8::1]:9002, which alias `six` also claims (tcp [::]:9002)", &[]),
        ],
    ),
    (
        "a hostname that does not resolve",
        "routes:
  a: {scheme: tcp, host: nowhere.invalid, port: 1:1}
  b: {scheme: tcp, port: 2:2, backends: [backend.test:1, gone.invalid:2]}
",
        &[
            ("test.yaml:2:26: alias `a`, field `host`: found `nowhere.invalid`, which does not resolve (no such host); allowed a hostname that resolves now, or an IP address", &[]),
            ("test.yaml:3:58: alias `b`, field `backends`: found `gone.invalid`, which does not resolve", &[]),
        ],
    ),
    (
        "a route or a healthcheck that is not a mapping; sixteen backends are fine",
        "routes:
  sixteen: {scheme: tcp, port: 5:5, backends: '1.0.0.1,1.0.0.2,1.0.0.3,1.0.0.4,1.0.0.5,1.0.0.6,1.0.0.7,1.0.0.8,1.0.0.9,1.0.0.10,1.0.0.11,1.0.0.12,1.0.0.13,1.0.0.14,1.0.0.15,1.0.0.16'}
  scalar: 5
  hc: {scheme: tcp, host: 10.0.0.1, port: 6:6, healthcheck: 5}
  hr: {scheme: tcp, host: 10.0.0.1, port: 8:8, healthcheck: {retries: 2000}}
",
        &[
            ("test.yaml:3:11: alias `scalar`: found `5`; allowed a mapping of route fields", &[]),
            ("test.yaml:4:61: alias `hc`, field `healthcheck`: found `5`; allowed a mapping of disabled, interval, timeout, fall (or retries), rise, payload, expect", &[]),
            ("test.yaml:5:71: alias `hr`, field `healthcheck.retries`: found `2000`; allowed -1 or 0 (out at the first failure), or 1 to 1000", &[]),
        ],
    ),
    (
        "backends: too many, both host and backends, no port, bad weight",
        "routes:
  many: {scheme: tcp, port: 1:1, backends: '1.0.0.1,1.0.0.2,1.0.0.3,1.0.0.4,1.0.0.5,1.0.0.6,1.0.0.7,1.0.0.8,1.0.0.9,1.0.0.10,1.0.0.11,1.0.0.12,1.0.0.13,1.0.0.14,1.0.0.15,1.0.0.16,1.0.0.17'}
  both: {scheme: tcp, port: 2:2, host: 10.0.0.1, backends: [10.0.0.2]}
  noport: {scheme: tcp, port: '3:', backends: [10.0.0.2]}
  weight: {scheme: tcp, port: 4:4, backends: [10.0.0.2:1 weight=0]}
  zero: {scheme: tcp, port: 7:7, backends: [10.0.0.3:1, 10.0.0.2:0]}
",
        &[
            ("test.yaml:2:44: alias `many`, field `backends`: found 17 backends; allowed at most 16 backends per route", &[]),
            ("test.yaml:3:60: alias `both`, field `backends`: found both `host` and `backends`", &["`host` is at test.yaml:3:40"]),
            ("test.yaml:4:48: alias `noport`, field `backends`: found `10.0.0.2` without a port", &[]),
            ("test.yaml:5:47: alias `weight`, field `backends`: found `10.0.0.2:1 weight=0`", &["weight 1–65535"]),
            ("test.yaml:6:57: alias `zero`, field `backends`: found `10.0.0.2:0` (bad port)", &[]),
        ],
    ),
    (
        "more rules than the kernel tables hold",
        "",
        &[("test.yaml:8194:3: alias `r8192`: found rule number 16386 (one rule per alias and protocol); allowed at most 16384 rules", &[])],
    ),
    (
        "durations and sections",
        "relay: {max_udp_sessions: 0, drain_timeout: soon}
kernel: {conntrack_size: 10, snat_ports: 1000-2000, conntrack: 5}
timeouts: {udp_idle: 0, tcp_closed: 1s}
routes:
  a: {scheme: tcp, port: 1:1, timeouts: {connect: 1.5s}, healthcheck: {interval: 1s, timeout: 2s}}
  b: {scheme: tcp, port: 2:2, healthcheck: {every: 5s}}
",
        &[
            ("test.yaml:1:27: `relay.max_udp_sessions`: found `0`; allowed a whole number from 1 to 16777216", &[]),
            ("test.yaml:1:45: `relay.drain_timeout`: found `soon`; allowed a duration such as `500ms`", &[]),
            ("test.yaml:2:42: `kernel.snat_ports`: found `1000-2000`; allowed `min-max` within 1024–65535", &[]),
            ("test.yaml:2:53: `kernel.conntrack`: found unknown field `conntrack`", &["did you mean `conntrack_size`?"]),
            ("test.yaml:3:22: `timeouts.udp_idle`: found `0`; allowed a duration above zero", &[]),
            ("test.yaml:3:25: `timeouts.tcp_closed`: found unknown field `tcp_closed`", &["did you mean `tcp_close`?"]),
            ("test.yaml:5:51: alias `a`, field `timeouts.connect`: found `1.5s`", &[]),
            ("test.yaml:5:95: alias `a`, field `healthcheck.timeout`: found `2s` (longer than the interval 1s)", &[]),
            ("test.yaml:6:45: alias `b`, field `healthcheck.every`: found unknown field `every`", &[]),
        ],
    ),
    (
        "health checks that cannot tell or cannot work",
        "routes:
  a: {scheme: udp, host: 10.0.0.1, port: 1:1, healthcheck: {interval: 1s}}
  b: {scheme: tcp, host: 10.0.0.1, port: 2:2, healthcheck: {payload: ping}}
  c: {scheme: udp, host: 10.0.0.1, port: 3:3, healthcheck: {expect: pong}}
  d: {scheme: tcp, host: 10.0.0.1, port: 4:4, healthcheck: {fall: 2, retries: 3, rise: 0}}
  e: {scheme: udp, host: 10.0.0.1, port: 5:5, healthcheck: {payload: 'hex:0g'}}
",
        &[
            ("test.yaml:2:60: alias `a`, field `healthcheck`: found a udp health check without `payload`; allowed a `payload` the backend answers", &[]),
            ("test.yaml:3:60: alias `b`, field `healthcheck.payload`: found `payload` on a route without udp", &[]),
            ("test.yaml:4:69: alias `c`, field `healthcheck.expect`: found `expect` without `payload`", &[]),
            ("test.yaml:5:70: alias `d`, field `healthcheck.retries`: found both `fall` and `retries`", &[]),
            ("test.yaml:5:88: alias `d`, field `healthcheck.rise`: found `0`; allowed a whole number from 1 to 1000", &[]),
            ("test.yaml:6:70: alias `e`, field `healthcheck.payload`: found `hex:0g`; allowed a text, or `hex:` and an even number of hex digits", &[]),
        ],
    ),
    (
        "flow-state timeouts",
        "timeouts: {udp_unreplied: 0s}
routes:
  a: {scheme: tcp, port: 1:1, timeouts: {tcp_half_closed: never, tcp_halfclosed: 1m}}
",
        &[
            ("test.yaml:1:27: `timeouts.udp_unreplied`: found `0s`; allowed a duration above zero", &[]),
            ("test.yaml:3:59: alias `a`, field `timeouts.tcp_half_closed`: found `never`; allowed a duration such as `500ms`", &[]),
            ("test.yaml:3:66: alias `a`, field `timeouts.tcp_halfclosed`: found unknown field `tcp_halfclosed`", &["did you mean `tcp_half_closed`?"]),
        ],
    ),
    (
        "paths the targets cannot take",
        "routes:
  a: {scheme: tcp, port: 1:1, path: kernel}
  b: {scheme: udp, host: 10.0.0.1, port: 2:2, path: fast}
  c: {scheme: tcp, host: 10.0.0.1, port: 3:3, path: relay, preserve_client_ip: true}
  d: {scheme: udp, host: 10.0.0.1, port: 4:4, proxy_protocol: v1}
  e: {scheme: tcp, port: 5:5, preserve_client_ip: yes}
  f: {scheme: tcp, host: localhost, port: 6:6, preserve_client_ip: true}
  g: {scheme: tcp, host: 224.0.0.1, port: 7:7}
  h: {scheme: udp, port: 8:8, path: xdp}
",
        &[
            ("test.yaml:2:37: alias `a`, field `path`: found `kernel` with the loopback target 127.0.0.1:1; allowed `auto` or `relay`", &[]),
            ("test.yaml:3:53: alias `b`, field `path`: found `fast`; allowed `auto`, `kernel`, `relay`, `tc` or `xdp`", &[]),
            ("test.yaml:4:80: alias `c`, field `preserve_client_ip`: found `true` with `path: relay`", &[]),
            ("test.yaml:5:63: alias `d`, field `proxy_protocol`: found `v1` on a udp route; allowed `v2`", &[]),
            ("test.yaml:6:51: alias `e`, field `preserve_client_ip`: found `yes`; allowed `true` or `false`", &[]),
            ("test.yaml:7:68: alias `f`, field `preserve_client_ip`: found `true` with the loopback target 127.0.0.1:6", &[]),
            ("test.yaml:8:26: alias `g`, field `host`: found `224.0.0.1` (multicast)", &[]),
            ("test.yaml:9:37: alias `h`, field `path`: found `xdp` with the loopback target 127.0.0.1:8; allowed `auto` or `relay`", &[]),
        ],
    ),
    (
        "sections, interfaces, YAML shapes",
        "interfaces: [eth0, 'a/b', eth0, averyveryverylongname]
rotues: {}
game: {scheme: tcp, port: 1:1}
routes: [a, b]
",
        &[
            ("test.yaml:1:20: `interfaces`: found `a/b`", &[]),
            ("test.yaml:1:27: `interfaces`: found `eth0` twice", &[]),
            ("test.yaml:1:33: `interfaces`: found `averyveryverylongname`", &[]),
            ("test.yaml:2:1: found section `rotues`; allowed the sections interfaces, routes", &["did you mean `routes`?"]),
            ("test.yaml:3:1: found section `game`", &["routes go under `routes:`"]),
            ("test.yaml:4:9: `routes`: found a list; allowed a mapping of alias -> route fields", &[]),
        ],
    ),
    (
        "YAML syntax error",
        "routes:\n  a: {scheme: tcp\n  b: x\n",
        &[("test.yaml:3:4: found invalid YAML (while parsing a flow mapping, did not find expected ',' or '}'); allowed well-formed YAML", &[])],
    ),
    (
        "a duplicate key and a duplicate alias across forms",
        "routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 1:1}
  a: {scheme: tcp, host: 10.0.0.1, port: 2:2}
labels:
  proxy.aliases: a, c, c
  proxy.a.port: 3:3
",
        &[
            ("test.yaml:3:3: found key `a` a second time; allowed each key once per mapping", &["first at test.yaml:2:3"]),
            ("test.yaml:5:24: `proxy.aliases`: found alias `c` listed twice", &["first at test.yaml:5:21"]),
            ("test.yaml:5:18: alias `a`: found alias `a` a second time", &["first at test.yaml:2:3"]),
        ],
    ),
    (
        "include: a missing file, a file with mistakes, a file of the wrong shape",
        "include: [missing.yml, bad-routes.yml, not-a-map.yml]\n",
        &[
            ("test.yaml:1:11: `include`: found `missing.yml`", &["allowed a readable Godoxy route file"]),
            ("{data}/bad-routes.yml:3:11: alias `ok`, field `scheme`: found `tcpp`", &["did you mean `tcp`?"]),
            ("{data}/bad-routes.yml:7:9: alias `also`, field `port`: found `1001:99999` (target port out of range)", &[]),
            ("{data}/not-a-map.yml:1:1: found a list at the top level", &[]),
        ],
    ),
];

fn too_many_rules() -> String {
    let mut text = String::from("routes:\n");
    for i in 0..8193 {
        let _ = writeln!(
            text,
            "  r{i}: {{scheme: 'tcp,udp', host: 10.0.0.1, port: {}:1}}",
            1000 + i
        );
    }
    text
}

#[test]
fn every_error_class_names_its_place() {
    let data = data_dir().display().to_string();
    let mut failures = Vec::new();
    for (what, text, want) in CASES {
        let text = if what.starts_with("more rules") {
            too_many_rules()
        } else {
            text.to_string()
        };
        let got = errors(&text);
        for (prefix, parts) in *want {
            let prefix = prefix.replace("{data}", &data);
            match got.iter().find(|l| l.starts_with(&prefix)) {
                None => failures.push(format!(
                    "{what}: no error starting `{prefix}` in:\n{}",
                    got.join("\n")
                )),
                Some(line) => {
                    for part in *parts {
                        if !line.contains(part) {
                            failures.push(format!("{what}: `{line}` lacks `{part}`"));
                        }
                    }
                }
            }
        }
        if got.len() != want.len() {
            failures.push(format!(
                "{what}: {} errors, not {}:\n{}",
                got.len(),
                want.len(),
                got.join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_listen_port_inside_the_snat_range_is_refused() {
    let got = errors(
        "kernel:
  snat_ports: 30000-31000
routes:
  a: {scheme: tcp, host: 10.0.0.1, port: 30500:1}
  b: {scheme: tcp, host: 10.0.0.1, port: 45000:1}
",
    );
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].starts_with("test.yaml:4:42: alias `a`, field `port`: found listen port 30500 inside the SNAT range; allowed a listen port outside `kernel.snat_ports`"),
        "{}",
        got[0]
    );
    assert!(
        got[0].ends_with("`kernel.snat_ports` at test.yaml:2:15 is 30000-31000"),
        "{}",
        got[0]
    );
    let got = errors("routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 45000:1}\n");
    assert!(
        got[0].ends_with("`kernel.snat_ports` is 40000-59999 by default"),
        "{}",
        got[0]
    );
}

#[test]
fn snat_ports_are_an_ordered_range_within_1024_to_65535() {
    let base = "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1:1}\n";
    for bad in ["2000-1500", "2000-70000", "1000-2000", "2000"] {
        let got = errors(&format!("kernel: {{snat_ports: {bad}}}\n{base}"));
        assert_eq!(got.len(), 1, "{bad}: {got:#?}");
        let want = format!("`kernel.snat_ports`: found `{bad}`");
        assert!(got[0].contains(&want), "{}", got[0]);
    }
    let (c, _) = load(&format!("kernel: {{snat_ports: 30000-30000}}\n{base}")).unwrap();
    assert_eq!(c.kernel_settings.snat_ports, (30000, 30000));
}

#[test]
fn interface_names_linux_would_refuse_are_refused() {
    let base = "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 1:1}\n";
    for bad in [
        "'eth 0'",
        "\"a\\tb\"",
        "\"a\\x01b\"",
        "'.'",
        "'..'",
        "'x:1'",
        "abcdefghijklmnop",
    ] {
        let got = errors(&format!("interfaces: [{bad}]\n{base}"));
        assert_eq!(got.len(), 1, "{bad}: {got:#?}");
        assert!(got[0].contains("`interfaces`: found"), "{}", got[0]);
    }
    // 15 bytes, IFNAMSIZ - 1: the longest Linux takes.
    let (c, _) = load(&format!("interfaces: [abcdefghijklmno]\n{base}")).unwrap();
    assert_eq!(c.interfaces, Some(vec!["abcdefghijklmno".to_owned()]));
}

#[test]
fn all_errors_of_a_file_come_at_once_in_line_order() {
    let got = errors(
        "routes:
  a: {scheme: tcp, port: 99999:1, host: gone.invalid}
  b: {scheme: ucp, port: 1:1}
  c: {scheme: tcp, port: 3:3, bind: nope}
  d: {scheme: tcp, port: 4:4, host: nowhere.invalid}
",
    );
    let places: Vec<&str> = got.iter().map(|l| l.split(": ").next().unwrap()).collect();
    // The hostname of a route that is wrong anyway is still looked up.
    assert_eq!(
        places,
        [
            "test.yaml:2:26",
            "test.yaml:2:41",
            "test.yaml:3:15",
            "test.yaml:4:37",
            "test.yaml:5:37"
        ]
    );
}

#[test]
fn no_free_port_to_pick_is_an_error() {
    let env = TestEnv {
        real_probe: false,
        range: Some((30000, 30001)),
        busy: [30000, 30001].into_iter().collect(),
        ..TestEnv::default()
    };
    let got = errors_env(
        "routes:\n  a: {scheme: tcp, host: 10.0.0.1, port: 80}\n",
        &env,
    );
    assert_eq!(
        got,
        [
            "test.yaml:2:42: alias `a`, field `port`: found listen port 0 (no free port in the ephemeral range 30000–30001 outside kernel.snat_ports); allowed a free port to pick, or an explicit listen port"
        ]
    );
}

#[test]
fn a_missing_rule_file_is_one_error() {
    let e = crate::config::load(std::path::Path::new("/nonexistent/forwarder.yaml")).unwrap_err();
    assert_eq!(e.len(), 1);
    assert!(
        e.to_string()
            .starts_with("/nonexistent/forwarder.yaml:1:1: found a file that cannot be read"),
        "{e}"
    );
}

#[test]
fn preserve_client_ip_on_a_relay_rule_is_refused() {
    let e = errors(
        "routes:\n  p:\n    scheme: udp\n    host: 10.0.0.9\n    port: 7000:53\n    path: relay\n    preserve_client_ip: true\n",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("test.yaml:7:"), "{}", e[0]);
    assert!(e[0].contains("preserve_client_ip"), "{}", e[0]);
    assert!(e[0].contains("`true` with `path: relay`"), "{}", e[0]);
}
