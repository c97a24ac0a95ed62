//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2):
//! encoding the header the relay sends a backend, and parsing strictly the
//! header a trusted upstream sends the relay. Pure functions; the relay
//! does the I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The twelve bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most this long, CRLF included (the spec's limit).
pub const V1_MAX: usize = 107;
/// A v2 header is 16 bytes and its address block; we take at most this
/// much in all, TLVs included, so that a peer cannot make us buffer 64 KiB.
pub const V2_MAX: usize = 4096;
/// The most a header may take on the wire, either version.
pub const HEADER_MAX: usize = V2_MAX;
/// A trusted upstream sends its header at once; one that does not within
/// this long is closed.
pub const PROXY_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Stream,
    Datagram,
}

/// What a received header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The original client and the address it connected to; `None` for a
    /// header that carries no addresses (v2 LOCAL, v1 UNKNOWN, an address
    /// family other than IPv4/IPv6): the connection's own addresses stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// Bytes the header took; the stream's payload starts after them.
    pub len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The bytes start with neither signature.
    NotProxy,
    /// A header, but not one the spec allows; says what is wrong.
    Invalid(&'static str),
    /// Longer than [`V1_MAX`] or [`V2_MAX`].
    TooLong,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::NotProxy => f.write_str("no PROXY protocol header"),
            ParseError::Invalid(why) => write!(f, "invalid PROXY protocol header: {why}"),
            ParseError::TooLong => {
                write!(f, "PROXY protocol header longer than {HEADER_MAX} bytes")
            }
        }
    }
}

/// The header that tells a backend of `source`, who connected to
/// `destination`. Addresses of different families are both sent as IPv6
/// (IPv4-mapped), as a header has one family.
pub fn encode(
    version: Version,
    transport: Transport,
    source: SocketAddr,
    destination: SocketAddr,
) -> Vec<u8> {
    let (src, dst) = one_family(source, destination);
    match version {
        Version::V1 => encode_v1(src, dst),
        Version::V2 => encode_v2(transport, src, dst),
    }
}

fn one_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (ca, cb) = (a.ip().to_canonical(), b.ip().to_canonical());
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    if ca.is_ipv4() == cb.is_ipv4() {
        (SocketAddr::new(ca, a.port()), SocketAddr::new(cb, b.port()))
    } else {
        (
            SocketAddr::new(IpAddr::V6(v6(ca)), a.port()),
            SocketAddr::new(IpAddr::V6(v6(cb)), b.port()),
        )
    }
}

/// v1 is TCP only: `PROXY TCP4 src dst sport dport\r\n`.
fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

fn encode_v2(transport: Transport, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY
    let family: u8 = if src.is_ipv4() { 0x10 } else { 0x20 };
    let proto: u8 = match transport {
        Transport::Stream => 0x1,
        Transport::Datagram => 0x2,
    };
    out.push(family | proto);
    let len: u16 = if src.is_ipv4() { 12 } else { 36 };
    out.extend_from_slice(&len.to_be_bytes());
    for ip in [src.ip(), dst.ip()] {
        match ip {
            IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// Parses the header at the start of a stream. `Ok(None)`: what is there
/// is a valid beginning, more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<Received>, ParseError> {
    const V1_PREFIX: &[u8] = b"PROXY ";
    if buf.is_empty() {
        return Ok(None);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(ParseError::NotProxy);
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Option<Received>, ParseError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ParseError::TooLong);
        }
        // A lone CR or LF inside the line can never become valid.
        if buf[..buf.len().saturating_sub(1)].contains(&b'\r') || buf.contains(&b'\n') {
            return Err(ParseError::Invalid("v1: CR or LF inside the line"));
        }
        return Ok(None);
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(ParseError::TooLong);
    }
    let line =
        std::str::from_utf8(&buf[..end]).map_err(|_| ParseError::Invalid("v1: not ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        // UNKNOWN: the rest of the line is to be ignored.
        ["PROXY", "UNKNOWN", ..] => Ok(Some(Received {
            addresses: None,
            len,
        })),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v4 = *family == "TCP4";
            let ip = |s: &str| -> Result<IpAddr, ParseError> {
                let ip = if v4 {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| ParseError::Invalid("v1: address not of the family"))
            };
            let source = SocketAddr::new(ip(src)?, v1_port(sport)?);
            let destination = SocketAddr::new(ip(dst)?, v1_port(dport)?);
            Ok(Some(Received {
                addresses: Some((source, destination)),
                len,
            }))
        }
        ["PROXY", "TCP4" | "TCP6", ..] => Err(ParseError::Invalid(
            "v1: not `PROXY TCP4|TCP6 src dst sport dport`",
        )),
        _ => Err(ParseError::Invalid(
            "v1: protocol not TCP4, TCP6 or UNKNOWN",
        )),
    }
}

/// 0 to 65535 in decimal, no sign, no leading zero.
fn v1_port(s: &str) -> Result<u16, ParseError> {
    let bad = ParseError::Invalid("v1: port not 0-65535 without leading zeroes");
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return Err(bad);
    }
    s.parse().map_err(|_| bad)
}

fn parse_v2(buf: &[u8]) -> Result<Option<Received>, ParseError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, fam, declared) = (buf[12], buf[13], u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::Invalid("v2: version not 2"));
    }
    let local = match ver_cmd & 0xf {
        0 => true,
        1 => false,
        _ => return Err(ParseError::Invalid("v2: command neither LOCAL nor PROXY")),
    };
    let len = 16 + usize::from(declared);
    if len > V2_MAX {
        return Err(ParseError::TooLong);
    }
    let (family, transport) = (fam >> 4, fam & 0xf);
    if family > 3 || transport > 2 {
        return Err(ParseError::Invalid(
            "v2: unknown address family or transport",
        ));
    }
    let need = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if usize::from(declared) < need {
        return Err(ParseError::Invalid("v2: length shorter than the addresses"));
    }
    if buf.len() < len {
        return Ok(None);
    }
    // LOCAL (the upstream's own health check) and families without an
    // IP address keep the connection's addresses; the block is skipped.
    if local || !matches!(family, 1 | 2) {
        return Ok(Some(Received {
            addresses: None,
            len,
        }));
    }
    if transport != 1 {
        return Err(ParseError::Invalid("v2: not a stream (TCP) header"));
    }
    let block = &buf[16..len];
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    let (source, destination) = if family == 1 {
        let ip = |at: usize| {
            IpAddr::V4(Ipv4Addr::new(
                block[at],
                block[at + 1],
                block[at + 2],
                block[at + 3],
            ))
        };
        (
            SocketAddr::new(ip(0), port(8)),
            SocketAddr::new(ip(4), port(10)),
        )
    } else {
        let ip = |at: usize| {
            let octets: [u8; 16] = block[at..at + 16].try_into().expect("16 bytes");
            IpAddr::V6(Ipv6Addr::from(octets))
        };
        (
            SocketAddr::new(ip(0), port(32)),
            SocketAddr::new(ip(16), port(34)),
        )
    };
    Ok(Some(Received {
        addresses: Some((source, destination)),
        len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A stream header from `src` to `dst`, written as text.
    fn stream(version: Version, src: &str, dst: &str) -> Vec<u8> {
        encode(version, Transport::Stream, sa(src), sa(dst))
    }

    fn whole(buf: &[u8]) -> Received {
        parse(buf).unwrap().unwrap()
    }

    // The spec's examples of v1 (section 2.1): the longest TCP4, TCP6 and
    // UNKNOWN lines, and the shortest.
    #[test]
    fn v1_spec_examples() {
        let tcp4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(
            whole(tcp4),
            Received {
                addresses: Some((sa("255.255.255.255:65535"), sa("255.255.255.255:65535"))),
                len: tcp4.len()
            }
        );
        let tcp6 = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert!(matches!(parse(tcp6), Err(ParseError::Invalid(_))));
        let max6 = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(max6.len(), 104);
        assert_eq!(whole(max6.as_bytes()).len, 104);
        let unknown_long = "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(unknown_long.len(), V1_MAX);
        assert_eq!(
            whole(unknown_long.as_bytes()),
            Received {
                addresses: None,
                len: V1_MAX
            }
        );
        assert_eq!(whole(b"PROXY UNKNOWN\r\n").len, 15);
    }

    #[test]
    fn v1_encodes_as_the_spec_writes_it() {
        let h = stream(Version::V1, "192.168.0.1:56324", "192.168.0.11:443");
        assert_eq!(h, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let h = stream(Version::V1, "[2001:db8::1]:1", "[2001:db8::2]:2");
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n");
    }

    // Known answers built byte by byte from the spec's section 2.2 layout.
    #[test]
    fn v2_known_answers() {
        let tcp4 = stream(Version::V2, "192.168.0.1:56324", "192.168.0.11:443");
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        want.extend_from_slice(&[192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb]);
        assert_eq!(tcp4, want);

        let udp6 = encode(
            Version::V2,
            Transport::Datagram,
            sa("[2001:db8::1]:53"),
            sa("[::1]:5353"),
        );
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x22, 0x00, 0x24]);
        want.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        want.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        want.extend_from_slice(&[0x00, 0x35, 0x14, 0xe9]);
        assert_eq!(udp6, want);
        assert_eq!(
            &V2_SIGNATURE,
            b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"
        );
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let h = stream(Version::V1, "10.0.0.1:1000", "[2001:db8::2]:80");
        assert_eq!(h, b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::2 1000 80\r\n");
        // An IPv4 client of a dual-stack socket is plain IPv4.
        let h = stream(
            Version::V1,
            "[::ffff:10.0.0.1]:1000",
            "[::ffff:10.0.0.2]:80",
        );
        assert_eq!(h, b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 80\r\n");
    }

    #[test]
    fn v2_local_and_unspec_keep_the_connections_addresses() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(
            whole(&local),
            Received {
                addresses: None,
                len: 16
            }
        );
        // LOCAL with an address block and a TLV: skipped whole.
        let mut local4 = V2_SIGNATURE.to_vec();
        local4.extend_from_slice(&[0x20, 0x11, 0x00, 0x0f]);
        local4.extend_from_slice(&[0; 12]);
        local4.extend_from_slice(&[0x04, 0x00, 0x00]);
        assert_eq!(whole(&local4).len, 31);
        // AF_UNIX: no IP to take.
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 0xd8]);
        unix.extend_from_slice(&[0; 216]);
        assert_eq!(whole(&unix).addresses, None);
    }

    #[test]
    fn v2_tlvs_are_skipped_and_payload_follows() {
        let mut h = stream(Version::V2, "1.2.3.4:5", "6.7.8.9:10");
        h[15] = 12 + 7;
        h.extend_from_slice(&[0x02, 0x00, 0x04, b'n', b'a', b'm', b'e']);
        let header_len = h.len();
        h.extend_from_slice(b"payload");
        let r = whole(&h);
        assert_eq!(r.len, header_len);
        assert_eq!(r.addresses, Some((sa("1.2.3.4:5"), sa("6.7.8.9:10"))));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let invalid = |b: &[u8]| matches!(parse(b), Err(ParseError::Invalid(_)));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ParseError::NotProxy));
        assert_eq!(parse(b"\r\n\r\nX"), Err(ParseError::NotProxy));
        assert!(invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"));
        assert!(invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"));
        assert!(invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"));
        assert!(invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"));
        assert!(invalid(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"));
        assert!(invalid(b"PROXY TCP4 ::1 ::2 1 2\r\n"));
        assert!(invalid(b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"));
        assert!(invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"));
        assert!(invalid(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"));
        assert!(invalid(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"));
        let long = format!("PROXY UNKNOWN {}", "x".repeat(100));
        assert_eq!(parse(long.as_bytes()), Err(ParseError::TooLong));
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(92));
        assert_eq!(long.len(), V1_MAX + 1);
        assert_eq!(parse(long.as_bytes()), Err(ParseError::TooLong));

        let v2 = |ver_cmd: u8, fam: u8, len: u16, body: &[u8]| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[ver_cmd, fam]);
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(body);
            h
        };
        assert!(invalid(&v2(0x11, 0x11, 12, &[0; 12])), "version 1");
        assert!(invalid(&v2(0x22, 0x11, 12, &[0; 12])), "command 2");
        assert!(invalid(&v2(0x21, 0x41, 12, &[0; 12])), "family 4");
        assert!(invalid(&v2(0x21, 0x13, 12, &[0; 12])), "transport 3");
        assert!(invalid(&v2(0x21, 0x11, 11, &[0; 11])), "short ipv4 block");
        assert!(invalid(&v2(0x21, 0x21, 12, &[0; 12])), "short ipv6 block");
        assert!(invalid(&v2(0x21, 0x12, 12, &[0; 12])), "udp on a stream");
        assert_eq!(
            parse(&v2(0x21, 0x11, 5000, &[])),
            Err(ParseError::TooLong),
            "refused before the bytes arrive"
        );
    }

    #[test]
    fn partial_headers_ask_for_more() {
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 2000\r\n";
        let v2 = stream(Version::V2, "[2001:db8::1]:1", "[2001:db8::2]:2");
        for h in [&v1[..], &v2[..]] {
            for cut in 1..h.len() {
                assert_eq!(parse(&h[..cut]), Ok(None), "{:?}", &h[..cut]);
            }
            assert_eq!(whole(h).len, h.len());
        }
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(o, p)| SocketAddr::new(Ipv4Addr::from(o).into(), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(o, p)| SocketAddr::new(Ipv6Addr::from(o).into(), p)),
        ]
    }

    fn runner() -> TestRunner {
        let seed: [u8; 32] = *b"forwarder proxy protocol seed 01";
        TestRunner::new_with_rng(
            Config {
                cases: 2000,
                failure_persistence: None,
                ..Config::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
        )
    }

    /// What we send, we read back: the same addresses (canonical, one
    /// family), the header's length, and the payload untouched after it.
    #[test]
    fn stream_headers_round_trip() {
        let strategy = (
            addr(),
            addr(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..64),
        );
        runner()
            .run(&strategy, |(src, dst, v2, payload)| {
                let version = if v2 { Version::V2 } else { Version::V1 };
                let mut h = encode(version, Transport::Stream, src, dst);
                let header_len = h.len();
                h.extend_from_slice(&payload);
                let r = parse(&h).unwrap().unwrap();
                prop_assert_eq!(r.len, header_len);
                let (s, d) = r.addresses.unwrap();
                prop_assert_eq!((s, d), one_family(src, dst));
                prop_assert_eq!(s.ip().to_canonical(), src.ip().to_canonical());
                prop_assert_eq!((s.port(), d.port()), (src.port(), dst.port()));
                Ok(())
            })
            .unwrap();
    }

    /// Random and mutated bytes never panic, and a header is never longer
    /// than the limit or the input.
    #[test]
    fn malformed_bytes_never_panic() {
        let random = proptest::collection::vec(any::<u8>(), 0..300);
        runner()
            .run(&random, |bytes| {
                if let Ok(Some(r)) = parse(&bytes) {
                    prop_assert!(r.len <= bytes.len() && r.len <= HEADER_MAX);
                }
                Ok(())
            })
            .unwrap();
        let mutated = (
            addr(),
            addr(),
            any::<bool>(),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        );
        runner()
            .run(&mutated, |(src, dst, v2, edits)| {
                let version = if v2 { Version::V2 } else { Version::V1 };
                let mut h = encode(version, Transport::Stream, src, dst);
                for (at, byte) in edits {
                    let i = at % h.len();
                    h[i] = byte;
                }
                if let Ok(Some(r)) = parse(&h) {
                    prop_assert!(r.len <= h.len());
                }
                Ok(())
            })
            .unwrap();
    }
}
