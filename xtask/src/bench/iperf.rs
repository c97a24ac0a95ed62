//! iperf3: one TCP stream for throughput, 64-byte UDP datagrams as fast as
//! the sender can for packet rate. Figures come from the receiver's side.
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::netns::Netns;
use super::pin::{self, Side};
use super::procs;

pub const PORT: u16 = 5201;
pub const UDP_PAYLOAD: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TcpResult {
    pub bits_per_second: f64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UdpResult {
    /// Datagrams the receiver got (sent minus lost).
    pub received: u64,
    pub seconds: f64,
}

impl UdpResult {
    pub fn per_second(&self) -> f64 {
        self.received as f64 / self.seconds
    }
}

fn document(json: &str) -> Result<Value> {
    let doc: Value = serde_json::from_str(json).context("iperf3 printed no JSON")?;
    if let Some(err) = doc.get("error").and_then(Value::as_str) {
        bail!("iperf3: {err}");
    }
    Ok(doc)
}

fn number(v: &Value, key: &str) -> Result<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .with_context(|| format!("iperf3 JSON: no number `{key}` in the receiver's summary"))
}

pub fn parse_tcp(json: &str) -> Result<TcpResult> {
    let doc = document(json)?;
    let sum = &doc["end"]["sum_received"];
    Ok(TcpResult {
        bits_per_second: number(sum, "bits_per_second")?,
        bytes: number(sum, "bytes")? as u64,
    })
}

/// The receiver counts the highest sequence number it saw as `packets` and
/// the gaps as `lost_packets`; what arrived is the difference.
pub fn parse_udp(json: &str) -> Result<UdpResult> {
    let doc = document(json)?;
    let sum = &doc["end"]["sum_received"];
    let packets = number(sum, "packets")? as u64;
    let lost = number(sum, "lost_packets")? as u64;
    let seconds = number(sum, "seconds")?;
    if seconds <= 0.0 {
        bail!("iperf3 JSON: the receiver's summary covers no time");
    }
    Ok(UdpResult {
        received: packets.saturating_sub(lost),
        seconds,
    })
}

/// `iperf3 -s` bound to `addr`, one test at a time.
pub fn server_args(addr: Ipv4Addr) -> Vec<String> {
    ["-s", "-B", &addr.to_string(), "-p", &PORT.to_string()]
        .map(String::from)
        .to_vec()
}

fn client(ns: &Netns, target: Ipv4Addr, seconds: u64, extra: &[&str]) -> Result<String> {
    let mut cmd = pin::command(ns, Side::Client, "iperf3");
    cmd.args(["-c", &target.to_string(), "-p", &PORT.to_string()])
        .args([
            "-t",
            &seconds.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
        ])
        .args(extra);
    let out = procs::run_bounded(&mut cmd, Duration::from_secs(seconds + 20))?;
    // On failure iperf3 still prints JSON with an `error`, which says more.
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() && serde_json::from_str::<Value>(&stdout).is_err() {
        bail!(
            "iperf3 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

pub fn tcp(ns: &Netns, target: Ipv4Addr, seconds: u64) -> Result<TcpResult> {
    parse_tcp(&client(ns, target, seconds, &[])?)
}

pub fn udp(ns: &Netns, target: Ipv4Addr, seconds: u64) -> Result<UdpResult> {
    let len = UDP_PAYLOAD.to_string();
    parse_udp(&client(
        ns,
        target,
        seconds,
        &["-u", "-l", &len, "-b", "0"],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Trimmed from iperf3 3.12 -J output.
    const TCP: &str = r#"{"start":{},"intervals":[],"end":{
        "sum_sent":{"start":0,"end":5.0,"seconds":5.0,"bytes":6000000000,"bits_per_second":9.6e9,"retransmits":3,"sender":true},
        "sum_received":{"start":0,"end":5.0,"seconds":5.0,"bytes":5990000000,"bits_per_second":9.584e9,"sender":true}}}"#;

    const UDP: &str = r#"{"start":{},"intervals":[],"end":{
        "sum":{"start":0,"end":1.00004,"seconds":1.00004,"bytes":37754240,"bits_per_second":302031201.7,"jitter_ms":0.0017,"lost_packets":15902,"packets":589910,"lost_percent":2.69,"sender":true},
        "sum_sent":{"start":0,"end":1.00004,"seconds":1.00004,"bytes":37754240,"bits_per_second":302031201.7,"jitter_ms":0.0017,"lost_packets":15902,"packets":589910,"lost_percent":2.69,"sender":true},
        "sum_received":{"start":0,"end":1.00004,"seconds":1.00004,"bytes":36735616,"bits_per_second":293873173.0,"jitter_ms":0.0017,"lost_packets":15902,"packets":589896,"lost_percent":2.69,"sender":false}}}"#;

    #[test]
    fn tcp_reads_the_receiver() {
        let r = parse_tcp(TCP).unwrap();
        assert_eq!(r.bits_per_second, 9.584e9);
        assert_eq!(r.bytes, 5_990_000_000);
    }

    #[test]
    fn udp_counts_what_arrived() {
        let r = parse_udp(UDP).unwrap();
        // 589896 - 15902 = 573994 = 36735616 bytes / 64.
        assert_eq!(r.received, 573_994);
        assert_eq!(r.received * UDP_PAYLOAD, 36_735_616);
        assert!((r.per_second() - 573_971.0).abs() < 1.0);
    }

    #[test]
    fn iperf3_errors_are_reported() {
        let err =
            parse_tcp(r#"{"start":{},"error":"unable to connect to server: Connection refused"}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("Connection refused"), "{err}");
        assert!(parse_udp("iperf3: error").is_err());
        assert!(parse_udp(r#"{"end":{"sum_received":{"packets":1}}}"#).is_err());
    }
}
