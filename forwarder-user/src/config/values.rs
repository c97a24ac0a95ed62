//! Scalar values: ports, durations, addresses, CIDRs, booleans, lists.
//!
//! Each parser takes a [`Node`] and returns the value or a [`ConfigError`]
//! placed on the node; the caller adds the alias and field.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::errors::{ConfigError, quoted};
use super::services;
use super::yaml::{self, Node, Value};
use crate::rules::{ListenPorts, TargetPorts};

pub const PORT_ALLOWED: &str = "`listen:target` or `target` (listen 0–65535, 0 = picked at start; target 1–65535 or a service name from /etc/services), or a range `first-last:first-last` (same length) or `first-last:target` (1–65535)";
pub const DURATION_ALLOWED: &str =
    "a duration such as `500ms`, `30s`, `2m`, `1h`, `1h30m`, or a whole number of seconds";
pub const BOOL_ALLOWED: &str = "`true` or `false`";
pub const IP_ALLOWED: &str = "an IPv4 or IPv6 address";
pub const HOST_ALLOWED: &str = "an IPv4 or IPv6 address, or a hostname";
pub const CIDR_ALLOWED: &str = "an address or a CIDR such as `10.0.0.0/8` or `2001:db8::/32`";

/// `port: listen:target`, or a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// The first listen port of a range.
    pub listen: u16,
    /// `None` only for `listen:` (the backends name their ports); the
    /// first target port of a range.
    pub target: Option<u16>,
    pub ports: ListenPorts,
}

/// A backend's host as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostSpec {
    Ip(IpAddr),
    Name(String),
}

/// An allow or deny entry: a network and its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// `ip` lies in this network; an IPv4-mapped IPv6 address counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

/// The text of a scalar; anything else is an error naming `allowed`.
pub fn text<'n>(node: &'n Node, allowed: &str) -> Result<&'n str, ConfigError> {
    match &node.value {
        Value::Str(s) => Ok(s),
        _ => Err(ConfigError::new(&node.pos, node.describe(), allowed)),
    }
}

pub fn boolean(node: &Node) -> Result<bool, ConfigError> {
    let t = text(node, BOOL_ALLOWED)?;
    match t.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ConfigError::new(&node.pos, quoted(t), BOOL_ALLOWED)),
    }
}

/// A whole number in `min..=max`.
pub fn integer(node: &Node, min: u64, max: u64) -> Result<u64, ConfigError> {
    let allowed = format!("a whole number from {min} to {max}");
    let t = text(node, &allowed)?.trim();
    let digits = t.replace('_', "");
    match digits.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) && !digits.is_empty() => Ok(n),
        _ => Err(ConfigError::new(&node.pos, quoted(t), allowed)),
    }
}

/// A size in bytes: a whole number, or one with `k` (KiB) or `m` (MiB).
/// It must be a power of two in `min..=max`: the kernel rounds a pipe up
/// to a power of two pages, and a size it would change is refused here
/// rather than silently grown.
pub fn pipe_bytes(node: &Node, min: usize, max: usize) -> Result<usize, ConfigError> {
    let allowed = format!(
        "a power of two from {} to {}, in bytes or with `k` or `m` (e.g. `256k`)",
        format_bytes(min),
        format_bytes(max)
    );
    let t = text(node, &allowed)?.trim();
    let lower = t.to_ascii_lowercase();
    let (digits, unit) = match lower.strip_suffix('k') {
        Some(d) => (d, 1usize << 10),
        None => match lower.strip_suffix('m') {
            Some(d) => (d, 1 << 20),
            None => (lower.as_str(), 1),
        },
    };
    let n = (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse::<usize>().ok())
        .flatten()
        .and_then(|n| n.checked_mul(unit));
    match n {
        Some(n) if (min..=max).contains(&n) && n.is_power_of_two() => Ok(n),
        _ => Err(ConfigError::new(&node.pos, quoted(t), allowed)),
    }
}

/// `256k`, `1m`, or bytes: as [`pipe_bytes`] reads them.
pub fn format_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}m", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{}k", n >> 10)
    } else {
        n.to_string()
    }
}

/// Digits as a number (saturating, so that long ones are out of range).
fn port_number(part: &str) -> Option<u64> {
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(part.parse().unwrap_or(u64::MAX))
}

/// `first-last` as (first, last), or `None` if `part` has no dash.
fn port_range(part: &str) -> Option<Result<(u16, u16), String>> {
    let (a, b) = part.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    // `-2` is a negative number and `no-such-service` a service name,
    // not ranges.
    port_number(a)?;
    Some(match (port_number(a), port_number(b)) {
        (Some(0), _) | (_, Some(0)) => Err("a range that includes port 0".into()),
        (Some(a), Some(b)) if a <= 65535 && b <= 65535 && a <= b => Ok((a as u16, b as u16)),
        (Some(a), Some(b)) if a <= 65535 && b <= 65535 => {
            Err(format!("range {a}-{b} ends before it starts"))
        }
        (Some(_), Some(_)) => Err("a range past port 65535".into()),
        _ => Err(format!("range `{part}` is not `first-last`")),
    })
}

/// `listen:target`, `target` (listen 0) or `:target`; `listen:` when
/// `empty_target` is allowed. A target written as a service name (`dns`)
/// is looked up with `service`, which says why when it cannot. Ranges:
/// `first-last:first-last` (same length; shifted, or 1:1) and
/// `first-last:target` (many to one).
pub fn port(
    node: &Node,
    empty_target: bool,
    service: &dyn Fn(&str) -> Result<u16, String>,
) -> Result<PortSpec, ConfigError> {
    let t = text(node, PORT_ALLOWED)?.trim();
    let bad = |what: String| ConfigError::new(&node.pos, what, PORT_ALLOWED);
    let (listen, target) = match t.split_once(':') {
        None => ("", t),
        Some((l, r)) => (l.trim(), r.trim()),
    };
    if target.contains(':') {
        return Err(bad(quoted(t)));
    }
    let listen_range = match port_range(listen) {
        Some(Ok(r)) => Some(r),
        Some(Err(why)) => return Err(bad(format!("{} ({why})", quoted(t)))),
        None => None,
    };
    let target_range = match port_range(target) {
        Some(Ok(r)) => Some(r),
        Some(Err(why)) => return Err(bad(format!("{} ({why})", quoted(t)))),
        None => None,
    };
    if let Some((lf, ll)) = listen_range {
        let count = ll - lf + 1;
        let (target, kind) = match target_range {
            Some((tf, tl)) if tl - tf == ll - lf => (tf, TargetPorts::Shifted),
            Some((tf, tl)) => {
                return Err(bad(format!(
                    "{} (listen range of {count} ports, target range of {})",
                    quoted(t),
                    u32::from(tl - tf) + 1
                )));
            }
            None if target.is_empty() => {
                return Err(bad(format!(
                    "{} (a range needs its target written: `first-last:first-last` or `first-last:port`)",
                    quoted(t)
                )));
            }
            None => match port_number(target) {
                Some(p) if (1..=65535).contains(&p) => (p as u16, TargetPorts::Same),
                Some(0) => return Err(bad(format!("{} (target port 0)", quoted(t)))),
                Some(_) => {
                    return Err(bad(format!("{} (target port out of range)", quoted(t))));
                }
                None => {
                    return Err(bad(format!(
                        "{} (a range's target is a port number or a range)",
                        quoted(t)
                    )));
                }
            },
        };
        // One port written as a range is a single-port rule.
        let ports = if count == 1 {
            ListenPorts::SINGLE
        } else {
            ListenPorts {
                count,
                target: kind,
            }
        };
        return Ok(PortSpec {
            listen: lf,
            target: Some(target),
            ports,
        });
    }
    if target_range.is_some() {
        return Err(bad(format!(
            "{} (a target range needs a listen range of the same length)",
            quoted(t)
        )));
    }
    let listen = if listen.is_empty() {
        0
    } else {
        match port_number(listen) {
            Some(p) if p <= 65535 => p as u16,
            Some(_) => return Err(bad(format!("{} (listen port out of range)", quoted(t)))),
            None => {
                return Err(bad(format!("{} (listen port is not a number)", quoted(t))));
            }
        }
    };
    let target = if target.is_empty() && empty_target && t.ends_with(':') {
        None
    } else {
        match port_number(target) {
            Some(0) => return Err(bad(format!("{} (target port 0)", quoted(t)))),
            Some(p) if p <= 65535 => Some(p as u16),
            Some(_) => return Err(bad(format!("{} (target port out of range)", quoted(t)))),
            None if services::looks_like_name(target) => match service(target) {
                Ok(p) => Some(p),
                Err(why) => return Err(bad(format!("{} ({why})", quoted(t)))),
            },
            None => {
                return Err(bad(format!("{} (target port is not a number)", quoted(t))));
            }
        }
    };
    Ok(PortSpec {
        listen,
        target,
        ports: ListenPorts::SINGLE,
    })
}

/// `500ms`, `30s`, `2m`, `1h`, combinations (`1h30m`), or plain seconds.
pub fn duration(node: &Node, allow_zero: bool) -> Result<Duration, ConfigError> {
    let t = text(node, DURATION_ALLOWED)?.trim();
    let bad = || ConfigError::new(&node.pos, quoted(t), DURATION_ALLOWED);
    let d = parse_duration(t).ok_or_else(bad)?;
    if d.is_zero() && !allow_zero {
        return Err(ConfigError::new(
            &node.pos,
            quoted(t),
            "a duration above zero",
        ));
    }
    Ok(d)
}

const MAX_DURATION_MS: u64 = 366 * 24 * 3600 * 1000;

fn parse_duration(t: &str) -> Option<Duration> {
    if t.is_empty() {
        return None;
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = t.parse().ok()?;
        let ms = secs.checked_mul(1000)?;
        return (ms <= MAX_DURATION_MS).then(|| Duration::from_millis(ms));
    }
    let mut total: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        // No digits fail to parse; too many overflow below.
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(n.checked_mul(unit_ms)?)?;
    }
    (total <= MAX_DURATION_MS).then(|| Duration::from_millis(total))
}

/// Formats a duration the way it is written in rule files.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// An IP address; IPv6 may be written in brackets.
pub fn parse_ip(t: &str) -> Option<IpAddr> {
    let t = t.trim();
    let inner = t
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(t);
    match inner.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) if inner == t => Some(IpAddr::V4(v4)),
        Ok(IpAddr::V6(v6)) => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

pub fn ip(node: &Node) -> Result<IpAddr, ConfigError> {
    let t = text(node, IP_ALLOWED)?;
    parse_ip(t).ok_or_else(|| ConfigError::new(&node.pos, quoted(t), IP_ALLOWED))
}

fn valid_hostname(t: &str) -> bool {
    let t = t.strip_suffix('.').unwrap_or(t);
    !t.is_empty()
        && t.len() <= 253
        && t.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // All-numeric dotted names are mistyped addresses, not hostnames.
        && !t.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

pub fn parse_host(t: &str) -> Option<HostSpec> {
    let t = t.trim();
    if let Some(ip) = parse_ip(t) {
        return Some(HostSpec::Ip(ip));
    }
    valid_hostname(t).then(|| HostSpec::Name(t.to_ascii_lowercase()))
}

pub fn host(node: &Node) -> Result<HostSpec, ConfigError> {
    let t = text(node, HOST_ALLOWED)?;
    parse_host(t).ok_or_else(|| ConfigError::new(&node.pos, quoted(t), HOST_ALLOWED))
}

/// `addr` or `addr/prefix`, with no host bits set beyond the prefix.
pub fn cidr(node: &Node) -> Result<Cidr, ConfigError> {
    let t = text(node, CIDR_ALLOWED)?.trim();
    let bad = |what: String| ConfigError::new(&node.pos, what, CIDR_ALLOWED);
    let (addr, prefix) = match t.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (t, None),
    };
    let Some(addr) = parse_ip(addr) else {
        return Err(bad(quoted(t)));
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max => p,
            _ => {
                return Err(bad(format!(
                    "{} (prefix length above {max} or not a number)",
                    quoted(t)
                )));
            }
        },
    };
    let network = mask(addr, prefix);
    if network != addr {
        return Err(ConfigError::new(
            &node.pos,
            format!("{} (address bits set beyond the prefix)", quoted(t)),
            CIDR_ALLOWED,
        )
        .hint(format!("did you mean `{network}/{prefix}`?")));
    }
    Ok(Cidr { addr, prefix })
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// The items of a list written as a YAML list or as one text value with
/// commas (and, with `spaces`, blanks) between items.
pub fn list(node: &Node, spaces: bool, allowed: &str) -> Result<Vec<Node>, ConfigError> {
    match &node.value {
        Value::Null => Ok(Vec::new()),
        Value::Seq(items) => {
            for item in items {
                if item.as_str().is_none() {
                    return Err(ConfigError::new(&item.pos, item.describe(), allowed));
                }
            }
            Ok(items.clone())
        }
        Value::Str(s) => Ok(split(node, s, spaces)),
        Value::Map(_) => Err(ConfigError::new(&node.pos, node.describe(), allowed)),
    }
}

/// Splits a text value into item nodes placed where each item starts.
pub fn split(node: &Node, s: &str, spaces: bool) -> Vec<Node> {
    let is_sep = |c: char| c == ',' || (spaces && c.is_whitespace());
    let mut out = Vec::new();
    let mut start: Option<(usize, usize)> = None; // (char offset, byte offset)
    for (chars, (byte, c)) in s.char_indices().enumerate() {
        if is_sep(c) {
            if let Some((co, bo)) = start.take() {
                push_item(&mut out, node, &s[bo..byte], co);
            }
        } else if start.is_none() {
            start = Some((chars, byte));
        }
    }
    if let Some((co, bo)) = start {
        push_item(&mut out, node, &s[bo..], co);
    }
    out
}

fn push_item(out: &mut Vec<Node>, node: &Node, item: &str, offset: usize) {
    let trimmed = item.trim_end();
    if !trimmed.is_empty() {
        out.push(Node::str(node.pos_at(offset), trimmed));
    }
}

/// A mapping, or Godoxy's inline YAML: a text value holding a mapping.
pub fn mapping<'n>(node: &'n Node, allowed: &str) -> Result<Cow<'n, Node>, Vec<ConfigError>> {
    match &node.value {
        Value::Map(_) => Ok(Cow::Borrowed(node)),
        Value::Null => Ok(Cow::Owned(Node::map(node.pos.clone(), Vec::new()))),
        Value::Str(s) if looks_like_mapping(s) => {
            let inner = yaml::parse_inline(node)?;
            match inner.value {
                Value::Map(_) => Ok(Cow::Owned(inner)),
                Value::Null => Ok(Cow::Owned(Node::map(node.pos.clone(), Vec::new()))),
                _ => Err(vec![ConfigError::new(&node.pos, node.describe(), allowed)]),
            }
        }
        _ => Err(vec![ConfigError::new(&node.pos, node.describe(), allowed)]),
    }
}

/// Whether a text value is inline YAML for a mapping rather than a scalar.
pub fn looks_like_mapping(s: &str) -> bool {
    let t = s.trim_start();
    t.starts_with('{') || t.contains(": ") || t.contains(":\n") || t.trim_end().ends_with(':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::errors::Pos;
    use std::sync::Arc;

    fn n(s: &str) -> Node {
        Node::str(Pos::new(&Arc::from("t"), 1, 1), s)
    }

    #[test]
    fn byte_sizes_are_written_as_they_are_read() {
        for (bytes, text) in [
            (0, "0"),
            (512, "512"),
            (1024, "1k"),
            (1536, "1536"),
            (65536, "64k"),
            (1 << 20, "1m"),
            ((1 << 20) + 1024, "1025k"),
            (3 << 20, "3m"),
        ] {
            assert_eq!(format_bytes(bytes), text, "{bytes}");
        }
        let read = |s: &str| pipe_bytes(&n(s), 4096, 1 << 20).ok();
        assert_eq!(read("64k"), Some(65536));
        assert_eq!(read(" 1M "), Some(1 << 20));
        assert_eq!(read("8192"), Some(8192));
        // Digits only: no sign, no blank inside, not a power of two, in range.
        for wrong in ["+64k", "-4096", "64 k", "", "k", "48k", "2k", "2m"] {
            assert_eq!(read(wrong), None, "{wrong:?}");
        }
    }

    #[test]
    fn inline_yaml_that_holds_only_a_comment_is_an_empty_mapping() {
        let entries = |text: &str| {
            let node = n(text);
            mapping(&node, "a mapping").map(|m| m.entries().map(<[_]>::len))
        };
        assert_eq!(entries("# later: maybe").unwrap(), Some(0));
        assert_eq!(entries("{a: 1}").unwrap(), Some(1));
        assert!(entries("[a: 1]").is_err());
    }

    #[test]
    fn ports() {
        let none = |name: &str| Err(format!("no service `{name}`"));
        let p = |s| port(&n(s), false, &none);
        assert_eq!(
            p("7878:3478").unwrap(),
            PortSpec {
                listen: 7878,
                target: Some(3478),
                ports: ListenPorts::SINGLE,
            }
        );
        assert_eq!(p("3478").unwrap().listen, 0);
        assert_eq!(p(":53").unwrap().target, Some(53));
        assert_eq!(p("0:1").unwrap().listen, 0);
        assert!(
            p("70000:1")
                .unwrap_err()
                .found
                .contains("listen port out of range")
        );
        assert!(p("1:0").unwrap_err().found.contains("target port 0"));
        assert!(p("a:1").unwrap_err().found.contains("not a number"));
        assert!(p("1:2:3").is_err());
        assert!(p("-1:2").is_err());
        assert!(p("80:").is_err());
        assert_eq!(port(&n("80:"), true, &none).unwrap().target, None);
        let dns = |name: &str| match name {
            "dns" => Ok(53),
            _ => Err(format!("no service `{name}`")),
        };
        assert_eq!(port(&n("2223:dns"), false, &dns).unwrap().target, Some(53));
        assert_eq!(
            port(&n("2223:dnz"), false, &dns).unwrap_err().found,
            "`2223:dnz` (no service `dnz`)"
        );
        // A listen port is never a name.
        assert!(port(&n("dns:53"), false, &dns).is_err());
    }

    #[test]
    fn port_ranges() {
        let none = |name: &str| Err(format!("no service `{name}`"));
        let p = |s| port(&n(s), true, &none);
        let range = |count, target| ListenPorts { count, target };
        assert_eq!(
            p("49152-65535:49152-65535").unwrap(),
            PortSpec {
                listen: 49152,
                target: Some(49152),
                ports: range(16384, TargetPorts::Shifted),
            }
        );
        assert_eq!(
            p("20000-20999:30000-30999").unwrap(),
            PortSpec {
                listen: 20000,
                target: Some(30000),
                ports: range(1000, TargetPorts::Shifted),
            }
        );
        assert_eq!(
            p(" 5000 - 5099 : 7000 ").unwrap(),
            PortSpec {
                listen: 5000,
                target: Some(7000),
                ports: range(100, TargetPorts::Same),
            }
        );
        // One port written as a range is a single port.
        assert_eq!(p("5000-5000:7000").unwrap().ports, ListenPorts::SINGLE);
        let err = |s| p(s).unwrap_err().found;
        assert_eq!(
            err("20000-20999:30000-30099"),
            "`20000-20999:30000-30099` (listen range of 1000 ports, target range of 100)"
        );
        assert!(err("80:7000-7099").contains("a target range needs a listen range"));
        assert!(err("7000-7099").contains("a target range needs a listen range"));
        assert!(err("0-99:1000-1099").contains("includes port 0"));
        assert!(err("100-199:0-99").contains("includes port 0"));
        assert!(err("6000-5000:7000").contains("ends before it starts"));
        assert!(err("65000-70000:65000").contains("past port 65535"));
        assert!(err("5000-5099:").contains("needs its target written"));
        assert!(err("5000-5099:dns").contains("port number or a range"));
        assert!(err("5000-:7000").contains("not `first-last`"));
        assert!(err("5000-5099:7000:1").starts_with("`5000-5099:7000:1`"));
        // A service name with a dash is a name.
        let svc = |name: &str| match name {
            "my-svc" => Ok(53),
            _ => Err(format!("no service `{name}`")),
        };
        assert_eq!(
            port(&n("17055:my-svc"), false, &svc).unwrap().target,
            Some(53)
        );
    }

    #[test]
    fn durations() {
        let d = |s| parse_duration(s);
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("30s"), Some(Duration::from_secs(30)));
        assert_eq!(d("2m"), Some(Duration::from_secs(120)));
        assert_eq!(d("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(d("45"), Some(Duration::from_secs(45)));
        assert_eq!(d("1.5s"), None);
        assert_eq!(d("5 s"), None);
        assert_eq!(d("10y"), None);
        assert_eq!(d("99999999999999h"), None);
        assert_eq!(d("99999999999999999999999ms"), None);
        assert_eq!(d("s"), None);
        assert_eq!(d("5sm"), None);
        // A leap year at most, however it is written.
        assert_eq!(d("8784h"), Some(Duration::from_secs(366 * 24 * 3600)));
        assert_eq!(d("8783h60m"), Some(Duration::from_secs(366 * 24 * 3600)));
        assert_eq!(d("8784h1ms"), None);
        assert_eq!(d("31622400"), Some(Duration::from_secs(31_622_400)));
        assert_eq!(d("31622401"), None);
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn inline_mappings_are_told_from_scalars() {
        for yes in ["{port: 1}", "port: 1", "port:", "a:\n  b: 1", "  {"] {
            assert!(looks_like_mapping(yes), "{yes:?}");
        }
        for no in ["1:2", "tcp", "http://x", ""] {
            assert!(!looks_like_mapping(no), "{no:?}");
        }
        let pos = Pos::new(&Arc::from("t"), 1, 1);
        let null = Node {
            value: Value::Null,
            ..n("x")
        };
        let empty = mapping(&null, "a mapping").unwrap();
        assert_eq!(empty.entries().map(<[_]>::len), Some(0));
        let text = n("{port: 1:1}");
        let inline = mapping(&text, "a mapping").unwrap();
        assert_eq!(inline.entries().map(<[_]>::len), Some(1));
        // A scalar that is no inline mapping is refused as it stands, not
        // parsed as YAML.
        let e = mapping(&n("[1,"), "a mapping").unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].pos, pos);
        assert_eq!(e[0].allowed, "a mapping");
    }

    #[test]
    fn hosts_and_addresses() {
        assert_eq!(
            parse_host("10.0.0.5"),
            Some(HostSpec::Ip("10.0.0.5".parse().unwrap()))
        );
        assert_eq!(
            parse_host("[::1]"),
            Some(HostSpec::Ip("::1".parse().unwrap()))
        );
        assert_eq!(
            parse_host("Game.Example"),
            Some(HostSpec::Name("game.example".into()))
        );
        assert_eq!(parse_host("10.0.0.256"), None);
        assert_eq!(parse_host("bad host"), None);
        assert_eq!(
            parse_host("my_host.example"),
            Some(HostSpec::Name("my_host.example".into()))
        );
        assert_eq!(parse_host("-x.example"), None);
        assert_eq!(parse_ip("[10.0.0.1]"), None);
    }

    #[test]
    fn cidrs() {
        let c = |s| cidr(&n(s));
        assert_eq!(c("10.0.0.0/8").unwrap().prefix, 8);
        assert_eq!(c("192.0.2.7").unwrap().prefix, 32);
        assert_eq!(c("2001:db8::/32").unwrap().prefix, 32);
        let e = c("10.0.0.1/8").unwrap_err();
        assert_eq!(e.hint.as_deref(), Some("did you mean `10.0.0.0/8`?"));
        assert!(c("10.0.0.0/33").is_err());
        assert!(c("10.0.0.0/x").is_err());
        assert!(c("nope/8").is_err());
    }

    #[test]
    fn lists_split_on_commas_and_blanks_with_places() {
        let items = list(&n("a, b  c"), true, "").unwrap();
        let got: Vec<_> = items
            .iter()
            .map(|i| (i.as_str().unwrap(), i.pos.col))
            .collect();
        assert_eq!(got, [("a", 1), ("b", 4), ("c", 7)]);
        let items = list(&n("x:1 weight=2, y:2"), false, "").unwrap();
        assert_eq!(items[0].as_str(), Some("x:1 weight=2"));
    }
}
