//! What loading needs from the machine: files, DNS, service names, free
//! ports.
//!
//! Behind a trait so that tests can answer DNS without a network; the
//! daemon uses [`System`].

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;

use crate::rules::{Answer, Protocol};

/// The range Linux picks ephemeral ports from when the file cannot be read.
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);

pub(crate) trait Env {
    fn read(&self, path: &Path) -> io::Result<String>;
    /// The addresses of a hostname; none is an error.
    fn resolve(&self, host: &str) -> io::Result<Answer>;
    /// The services database (`/etc/services`); empty when unreadable.
    fn services(&self) -> String;
    /// The kernel's ephemeral port range, inclusive.
    fn ephemeral_range(&self) -> (u16, u16);
    /// Whether `addr` can be bound for `protocol` now (the socket is closed
    /// again at once).
    fn probe(&self, addr: SocketAddr, protocol: Protocol) -> io::Result<()>;
}

/// The real machine.
pub(crate) struct System;

impl Env for System {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn resolve(&self, host: &str) -> io::Result<Answer> {
        crate::names::lookup_blocking(host)
    }

    fn services(&self) -> String {
        std::fs::read_to_string("/etc/services").unwrap_or_default()
    }

    fn ephemeral_range(&self) -> (u16, u16) {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| parse_port_range(&s))
            .unwrap_or(DEFAULT_EPHEMERAL)
    }

    fn probe(&self, addr: SocketAddr, protocol: Protocol) -> io::Result<()> {
        match protocol {
            Protocol::Tcp => TcpListener::bind(addr).map(drop),
            Protocol::Udp => UdpSocket::bind(addr).map(drop),
        }
    }
}

/// The machine, with hostnames answered as they were just looked up (by
/// the daemon's name follower) instead of asked again.
pub(crate) struct Answered<'a> {
    pub answers: &'a BTreeMap<String, Answer>,
}

impl Env for Answered<'_> {
    fn read(&self, path: &Path) -> io::Result<String> {
        System.read(path)
    }

    fn resolve(&self, host: &str) -> io::Result<Answer> {
        match self.answers.get(host) {
            Some(answer) => Ok(answer.clone()),
            None => System.resolve(host),
        }
    }

    fn services(&self) -> String {
        System.services()
    }

    fn ephemeral_range(&self) -> (u16, u16) {
        System.ephemeral_range()
    }

    fn probe(&self, addr: SocketAddr, protocol: Protocol) -> io::Result<()> {
        System.probe(addr, protocol)
    }
}

/// `ip_local_port_range`: two numbers separated by blanks.
pub(crate) fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace().map(|p| p.parse::<u16>());
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) if 0 < lo && lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_file_format() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_port_range("9 1"), None);
        assert_eq!(parse_port_range("0 9"), None, "port 0 is no port");
        assert_eq!(parse_port_range("9 9"), Some((9, 9)));
        // The machine's own range, as the kernel prints it.
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let kernel: Vec<u16> = text
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(System.ephemeral_range(), (kernel[0], kernel[1]));
    }

    #[test]
    fn the_services_database_is_the_systems_file() {
        let file = std::fs::read_to_string("/etc/services").unwrap_or_default();
        assert!(file.contains("ssh"), "this machine has an /etc/services");
        assert_eq!(System.services(), file);
    }

    /// A port held by a socket of ours is refused by the probe of its own
    /// protocol only, and free again once that socket is closed.
    fn probe_sees_a_held_port(env: &dyn Env) {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = tcp.local_addr().unwrap();
        let held = env.probe(at, Protocol::Tcp).unwrap_err();
        assert_eq!(held.kind(), io::ErrorKind::AddrInUse);
        drop(tcp);
        env.probe(at, Protocol::Tcp).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = udp.local_addr().unwrap();
        let held = env.probe(at, Protocol::Udp).unwrap_err();
        assert_eq!(held.kind(), io::ErrorKind::AddrInUse);
        drop(udp);
        env.probe(at, Protocol::Udp).unwrap();
    }

    #[test]
    fn the_probe_binds_for_real() {
        probe_sees_a_held_port(&System);
        probe_sees_a_held_port(&Answered {
            answers: &BTreeMap::new(),
        });
    }

    #[test]
    fn answered_names_come_from_the_answers_and_the_rest_from_the_machine() {
        let answer = Answer {
            addrs: vec!["192.0.2.7".parse().unwrap()],
            ttl: Some(std::time::Duration::from_secs(60)),
        };
        let answers = BTreeMap::from([("backend.example".to_owned(), answer.clone())]);
        let env = Answered { answers: &answers };
        assert_eq!(env.resolve("backend.example").unwrap(), answer);
        assert_eq!(
            env.resolve("localhost").unwrap().addrs,
            System.resolve("localhost").unwrap().addrs
        );
        let path = std::env::temp_dir().join(format!("forwarder-env-{}.yaml", std::process::id()));
        std::fs::write(&path, "routes: {}\n").unwrap();
        let read = env.read(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read.unwrap(), "routes: {}\n");
        assert_eq!(env.services(), System.services());
        assert_eq!(env.ephemeral_range(), System.ephemeral_range());
    }

    #[test]
    fn localhost_resolves() {
        let answer = System.resolve("localhost").unwrap();
        assert!(answer.addrs.iter().all(|a| a.is_loopback()), "{answer:?}");
    }
}
