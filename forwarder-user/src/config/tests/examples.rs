//! The shipped example, `config/forwarder.yaml`, loads as it is.

use std::path::Path;
use std::sync::Arc;

use super::row;
use crate::config::{env::System, load, load_with, table};

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/forwarder.yaml")
}

#[test]
fn the_shipped_example_compiles_to_its_table() {
    let path = example();
    let text = std::fs::read_to_string(&path).unwrap();
    let (c, warnings) = load_with(
        &text,
        &Arc::from("forwarder.yaml"),
        path.parent().unwrap(),
        &System,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let acl_of = |alias: &str| {
        let l = c.listeners.iter().find(|l| l.alias == alias).unwrap();
        l.acl.as_ref().map(|a| a.compact())
    };
    assert_eq!(
        acl_of("web").as_deref(),
        Some(
            "deny 10.6.6.0/24, deny 192.0.2.0/24, allow 127.0.0.0/8, allow 10.0.0.0/8, \
             else deny (reject)"
        )
    );
    assert_eq!(
        acl_of("dns").as_deref(),
        Some("deny 192.0.2.0/24, else allow (drop)")
    );
    let rows: Vec<String> = c
        .listeners
        .iter()
        .map(row)
        .filter(|r| !r.contains(" echo "))
        .collect();
    assert_eq!(
        rows,
        [
            "0 turn-tcp tcp [::]:7878 -> 127.0.0.1:3478 auto",
            "1 turn-udp udp [::]:7878 -> 127.0.0.1:3478 auto",
            "2 dns tcp 127.0.0.1:5300 -> 127.0.0.1:53 auto",
            "3 dns udp 127.0.0.1:5300 -> 127.0.0.1:53 auto",
            "5 web tcp [::]:8480 -> 127.0.0.1:8081,127.0.0.1:8082*2 relay",
            "6 mail tcp [::]:2525 -> 127.0.0.1:25 auto",
            "7 game tcp [::]:25565 -> 127.0.0.1:25566 auto",
            "8 game udp [::]:25565 -> 127.0.0.1:25566 auto",
            "9 game-q udp [::]:27015 -> 127.0.0.1:27016 auto",
            "10 voice udp [::]:9987 -> 127.0.0.1:9988 auto",
            "11 voice-query tcp [::]:10011 -> 127.0.0.1:10012 auto",
            "12 ssh-jump tcp [::]:2222 -> 127.0.0.1:22 auto",
            "13 syslog udp [::]:5514 -> 127.0.0.1:514 auto",
        ]
    );
    let echo = &c.listeners[4];
    assert_eq!(echo.alias, "echo");
    assert!(echo.listen_picked && echo.bind.port() != 0);
    // Every target is loopback: the example runs anywhere, on the relay.
    assert!(
        c.listeners
            .iter()
            .all(|l| l.backends.iter().all(|b| b.addr.ip().is_loopback()))
    );
    let w: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(
        w[0].contains("alias `ssh-jump`, field `homepage`"),
        "{}",
        w[0]
    );
    assert!(
        w[1].contains("alias `dashboard`, field `scheme`: scheme `http`"),
        "{}",
        w[1]
    );
    let t = table(&c);
    assert!(t.contains(&format!("{} (picked)", echo.bind)), "{t}");
    assert!(t.contains("turn-udp"), "{t}");
    assert!(
        t.contains(
            "relay (proxy_protocol), at most 500 connections, PROXY v2 to backend, PROXY read from \
             127.0.0.2/32"
        ),
        "{t}"
    );
}

#[test]
fn load_reads_the_example_from_its_path() {
    let c = load(&example()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listeners.len(), 14);
    assert_eq!(c.interfaces, None);
}
