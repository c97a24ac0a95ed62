//! Integration tests: `forwarder check` on rule files with fields
//! forwarder refuses or enforces, and with service names in ports (the real binary).
use std::process::{Command, Output};

use crate::common::{self, TempConfig, stderr_lines};

fn check(cfg: &TempConfig) -> Output {
    Command::new(common::forwarder_bin())
        .args(["check", "-c"])
        .arg(&cfg.path)
        .output()
        .unwrap()
}

#[test]
fn check_loads_the_fields_that_were_checked_before_they_were_enforced() {
    // No traffic is sent; each of these was once refused as not enforced.
    let yaml = "routes:
  guarded:
    scheme: tcp
    host: 127.0.0.1
    port: 17021:17022
    healthcheck: {interval: 5s}
    acl: {allow: [10.0.0.0/8]}
    proxy_protocol: v2
";
    let cfg = TempConfig::new("enforced", yaml);
    let out = check(&cfg);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("allow 10.0.0.0/8, else deny (drop)"),
        "{table}"
    );
}

#[test]
fn check_refuses_tls_termination_naming_the_field() {
    let yaml = "routes:
  mqtt:
    scheme: tcp
    host: 127.0.0.1
    port: 18883:1883
    tls_termination: true
";
    let cfg = TempConfig::new("tls-termination", yaml);
    let out = check(&cfg);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let file = cfg.path.display().to_string();
    assert!(
        lines[0].starts_with(&format!("{file}:6:5: alias `mqtt`, field `tls_termination`: found `true` (Godoxy's `tls_termination`)"))
            && lines[0].contains("forwarder does not terminate TLS"),
        "{}",
        lines[0]
    );
}

#[test]
fn check_prints_the_number_of_a_service_name() {
    let services = std::fs::read_to_string("/etc/services").unwrap_or_default();
    assert!(
        services
            .lines()
            .any(|l| l.starts_with("domain") && l.contains("53/udp")),
        "this test wants /etc/services with `domain 53/udp` (Debian's netbase)"
    );
    let yaml = "routes:
  dns: {scheme: 'tcp,udp', host: 127.0.0.1, port: 17053:domain}
  old-godoxy: {scheme: udp, host: 127.0.0.1, port: 17054:dns}
";
    let cfg = TempConfig::new("service-name", yaml);
    let out = check(&cfg);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let targets: Vec<(&str, &str)> = stdout
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            (cells[1], cells[5])
        })
        .collect();
    assert_eq!(
        targets,
        [
            ("dns", "127.0.0.1:53"),
            ("dns", "127.0.0.1:53"),
            ("old-godoxy", "127.0.0.1:53")
        ],
        "{stdout}"
    );

    let cfg = TempConfig::new(
        "service-unknown",
        "routes:\n  x: {scheme: udp, host: 127.0.0.1, port: 17055:no-such-service}\n",
    );
    let out = check(&cfg);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("field `port`: found `17055:no-such-service` (no service `no-such-service` for udp in /etc/services)"),
        "{}",
        lines[0]
    );
}
