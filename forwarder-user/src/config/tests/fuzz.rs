//! Random and mutated rule files never panic: every input gives a table or
//! errors, and every error has a place.

use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, RngSeed};

use super::{TestEnv, load_env};

/// No files, no real sockets, DNS from the table: fast and deterministic.
fn env() -> TestEnv {
    TestEnv {
        real_probe: false,
        no_files: true,
        range: Some((30000, 30100)),
        ..TestEnv::default()
    }
}

/// A fixed seed, so that every run (CI's too) tries the same cases and a
/// failure is reproducible, not an intermittent red; `PROPTEST_RNG_SEED=n`
/// tries others. A failing case is saved under
/// forwarder-user/proptest-regressions/ (commit it) and tried first from
/// then on, whatever the seed.
fn fuzz_config() -> ProptestConfig {
    let default = ProptestConfig::default();
    let rng_seed = match std::env::var_os("PROPTEST_RNG_SEED") {
        Some(_) => default.rng_seed,
        None => RngSeed::Fixed(0x666f_7277_6172_6465),
    };
    ProptestConfig {
        cases: 300,
        rng_seed,
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..default
    }
}

fn check(text: &str) {
    match load_env(text, &env()) {
        Ok((c, _)) => {
            let _ = crate::config::table(&c);
            assert!(c.listeners.iter().all(|l| l.bind.port() != 0));
        }
        Err(e) => {
            assert!(!e.is_empty());
            for err in &e {
                assert!(err.pos.line >= 1 && err.pos.col >= 1, "{err}");
            }
            let _ = e.to_string();
        }
    }
}

const SEED: &str = "routes:
  turn-tcp:
    scheme: tcp
    host: 10.0.0.5
    port: 7878:3478
  x-t: &t {scheme: udp, host: backend.test}
  lb:
    <<: *t
    port: '9000:'
    backends: [10.0.0.1:80 weight=2, '[2001:db8::1]:81', {host: dual.test, port: 82}]
    timeouts: {udp_idle: 30s, connect: 500ms}
    acl: {allow: [10.0.0.0/8], deny: 10.6.0.0/16}
    healthcheck: {interval: 5s, timeout: 1s, retries: 2}
labels:
  proxy.aliases: game,game-q
  proxy.game.scheme: tcp,udp
  proxy.game.port: 25565:25565
  proxy.*.host: 10.0.0.6
  proxy.#2.scheme: udp
  proxy.#2.port: 27015
  proxy.schemes: ', udp'
  proxy.game.timeouts: |
    udp_idle: 1m
relay: {max_udp_sessions: 10, drain_timeout: 1s}
kernel: {conntrack_size: 1024, snat_ports: 40000-59999}
interfaces: [eth0]
";

/// Pieces that YAML and our fields care about.
const PIECES: &[&str] = &[
    "\n",
    "  ",
    ":",
    ": ",
    "- ",
    ",",
    "#",
    "&a ",
    "*a",
    "<<: ",
    "{",
    "}",
    "[",
    "]",
    "'",
    "\"",
    "|",
    ">",
    "!",
    "?",
    "%",
    "@",
    "`",
    "\t",
    "~",
    "---\n",
    "...",
    "proxy.",
    "proxy.aliases: ",
    "proxy.#1.",
    "proxy.*.",
    "proxy.$2.",
    "routes:\n",
    "labels:\n",
    "include: ",
    "scheme: ",
    "tcp,udp",
    "udp",
    "port: ",
    "65535:0",
    "0:1",
    "99999",
    "host: ",
    "bind: ",
    "::",
    "0.0.0.0",
    "backends: ",
    "weight=",
    "path: ",
    "kernel",
    "timeouts: ",
    "1h30m",
    "acl: ",
    "/33",
    "tls_termination: ",
    "idlewatcher: ",
    "agent: ",
    ":domain",
    ":dns",
    "proxy.idle_timeout: ",
    "proxy.tls_terminations: ",
    "é",
    "\u{0}",
    "\u{feff}",
    "💥",
    "x-",
    "null",
    "true",
];

fn mutation() -> impl Strategy<Value = (u8, usize, usize, usize)> {
    (0u8..4, any::<usize>(), any::<usize>(), 0..PIECES.len())
}

/// Applies edits to the seed at char boundaries.
fn mutate(seed: &str, edits: &[(u8, usize, usize, usize)]) -> String {
    let mut s: Vec<char> = seed.chars().collect();
    for &(op, a, b, piece) in edits {
        let len = s.len().max(1);
        let (i, j) = (a % len, b % len);
        let (lo, hi) = (i.min(j), i.max(j).min(s.len()));
        match op {
            0 => {
                s.drain(lo..hi.min(lo + 40));
            }
            1 => {
                let p: Vec<char> = PIECES[piece].chars().collect();
                let at = lo.min(s.len());
                s.splice(at..at, p);
            }
            2 => {
                let chunk: Vec<char> = s[lo..hi.min(lo + 60)].to_vec();
                let at = j.min(s.len());
                s.splice(at..at, chunk);
            }
            _ => {
                if let Some(c) = s.get_mut(lo) {
                    *c = PIECES[piece].chars().next().unwrap_or(' ');
                }
            }
        }
    }
    s.into_iter().collect()
}

proptest! {
    #![proptest_config(fuzz_config())]

    #[test]
    fn mutated_rule_files_never_panic(edits in proptest::collection::vec(mutation(), 1..12)) {
        check(&mutate(SEED, &edits));
    }

    #[test]
    fn random_pieces_never_panic(parts in proptest::collection::vec(0..PIECES.len(), 0..80)) {
        let text: String = parts.iter().map(|i| PIECES[*i]).collect();
        check(&text);
    }

    #[test]
    fn random_text_never_panics(text in "\\PC{0,300}") {
        check(&text);
    }

    #[test]
    fn random_labels_never_panic(
        labels in proptest::collection::vec(
            ("proxy\\.(aliases|schemes|ports|hosts|agents|exclude|network|idle_timeout|\\*|#[0-9]|\\$[0-3]|[a-c])(\\.(scheme|port|host|bind|timeouts|udp_idle|backends|acl|tls_termination|homepage|x))*",
             "[a-c0-9:,. #|{}\\[\\]-]{0,24}"),
            0..12,
        )
    ) {
        let mut text = String::from("labels:\n");
        for (k, v) in &labels {
            text.push_str(&format!("  {k:?}: {v:?}\n"));
        }
        check(&text);
    }
}
