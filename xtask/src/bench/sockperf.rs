//! sockperf ping-pong: one request in flight at a time, 64-byte messages,
//! round-trip times (`--full-rtt`), mean and 99th percentile.
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::netns::Netns;
use super::pin::{self, Side};
use super::procs;

pub const PORT: u16 = 11111;
const MESSAGE_BYTES: &str = "64";

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latency {
    pub mean_us: f64,
    pub p99_us: f64,
}

/// Drops terminal colour sequences (`ESC [ ... m`), which sockperf prints
/// even into a pipe.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The number right after `marker` on the first line containing it.
fn number_after(text: &str, marker: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains(marker))?;
    let rest = &line[line.find(marker)? + marker.len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok()
}

pub fn parse(output: &str) -> Result<Latency> {
    let text = strip_ansi(output);
    let mean_us = number_after(&text, "avg-rtt=")
        .or_else(|| number_after(&text, "avg-latency="))
        .with_context(|| format!("sockperf printed no average: {}", last_lines(&text)))?;
    let p99_us = number_after(&text, "percentile 99.000 =")
        .with_context(|| format!("sockperf printed no 99th percentile: {}", last_lines(&text)))?;
    Ok(Latency { mean_us, p99_us })
}

fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// `sockperf server` on `addr`; one for UDP, one for TCP (same port).
pub fn server_args(addr: Ipv4Addr, tcp: bool) -> Vec<String> {
    let mut args: Vec<String> = ["server", "-i", &addr.to_string(), "-p", &PORT.to_string()]
        .map(String::from)
        .to_vec();
    if tcp {
        args.push("--tcp".into());
    }
    args
}

pub fn ping_pong(ns: &Netns, target: Ipv4Addr, tcp: bool, seconds: u64) -> Result<Latency> {
    let mut cmd = pin::command(ns, Side::Client, "sockperf");
    cmd.args([
        "ping-pong",
        "-i",
        &target.to_string(),
        "-p",
        &PORT.to_string(),
    ])
    .args([
        "-t",
        &seconds.to_string(),
        "-m",
        MESSAGE_BYTES,
        "--full-rtt",
    ]);
    if tcp {
        cmd.arg("--tcp");
    }
    let out = procs::run_bounded(&mut cmd, Duration::from_secs(seconds + 20))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "sockperf failed ({}): {}",
            out.status,
            last_lines(&strip_ansi(&text))
        );
    }
    parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "sockperf: [Total Run] RunTime=1.001 sec; Warm up time=400 msec; SentMessages=22594; ReceivedMessages=22593\n\
        sockperf: \x1b[2;35m====> avg-rtt=39.354 (std-dev=38.624)\x1b[0m\n\
        sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0\n\
        sockperf: ---> <MAX> observation = 1578.855\n\
        sockperf: ---> percentile 99.999 = 1298.397\n\
        sockperf: ---> percentile 99.000 =   98.682\n\
        sockperf: ---> percentile 90.000 =   45.591\n";

    #[test]
    fn reads_mean_and_p99_through_colour_codes() {
        assert_eq!(
            parse(OUTPUT).unwrap(),
            Latency {
                mean_us: 39.354,
                p99_us: 98.682
            }
        );
    }

    #[test]
    fn half_round_trip_output_is_read_too() {
        let text = OUTPUT.replace("avg-rtt", "avg-latency");
        assert_eq!(parse(&text).unwrap().mean_us, 39.354);
    }

    #[test]
    fn missing_figures_are_errors_that_show_the_output() {
        let err = parse("sockperf: ERROR: connection refused\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("connection refused"), "{err}");
        let no_p99 = OUTPUT.replace("99.000", "98.000");
        assert!(parse(&no_p99).is_err());
    }

    #[test]
    fn strips_colour_sequences_only() {
        assert_eq!(strip_ansi("a\x1b[2;35mb\x1b[0mc=1.5"), "abc=1.5");
    }
}
