//! Whole rule files through the whole load: every form, every error class,
//! the compile step, the shipped example, and random input.

mod acl;
mod catalog;
mod compile;
mod defaults;
mod errors;
mod examples;
mod forms;
mod fuzz;
mod godoxy_examples;
mod health;
mod metrics;
mod names;
mod proxy_protocol;
mod ranges;
mod relay_bounds;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::env::{Env, System};
use super::{Errors, Warning, load_with};
use crate::rules::{Answer, Compiled, Listener, Protocol};

/// The TTL every name of [`TestEnv`] is answered with.
pub(super) const TEST_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The machine, except for DNS (answered from a table, so that tests need
/// no network) and, optionally, the port probe.
pub(super) struct TestEnv {
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// Probe with real sockets; otherwise every port is free but `busy`.
    pub real_probe: bool,
    pub busy: HashSet<u16>,
    /// Ports held on IPv6 only (as by an `IPV6_V6ONLY` socket).
    pub busy_v6: HashSet<u16>,
    pub range: Option<(u16, u16)>,
    /// Files are not read (for the fuzzer).
    pub no_files: bool,
    /// A host without IPv6: an IPv6 probe fails as the kernel's would.
    pub no_ipv6: bool,
    /// The services database.
    pub services: &'static str,
}

/// A few lines in `/etc/services`' format.
pub(super) const SERVICES: &str = "ssh\t\t22/tcp\t\t# SSH\n\
domain\t\t53/tcp\n\
domain\t\t53/udp\n\
syslog\t\t514/udp\n\
split\t\t7000/tcp\n\
split\t\t7001/udp\n";

impl Default for TestEnv {
    fn default() -> Self {
        let mut hosts = HashMap::new();
        hosts.insert("backend.test".to_owned(), vec!["10.0.0.9".parse().unwrap()]);
        hosts.insert(
            "dual.test".to_owned(),
            vec!["2001:db8::9".parse().unwrap(), "10.0.0.10".parse().unwrap()],
        );
        hosts.insert("localhost".to_owned(), vec!["127.0.0.1".parse().unwrap()]);
        TestEnv {
            hosts,
            real_probe: true,
            busy: HashSet::new(),
            busy_v6: HashSet::new(),
            range: None,
            no_files: false,
            no_ipv6: false,
            services: SERVICES,
        }
    }
}

impl Env for TestEnv {
    fn read(&self, path: &Path) -> io::Result<String> {
        if self.no_files {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no files here"));
        }
        System.read(path)
    }

    fn resolve(&self, host: &str) -> io::Result<Answer> {
        let addrs = (self.hosts.get(host).cloned())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))?;
        Ok(Answer {
            addrs,
            ttl: Some(TEST_TTL),
        })
    }

    fn services(&self) -> String {
        self.services.to_owned()
    }

    fn ephemeral_range(&self) -> (u16, u16) {
        self.range.unwrap_or_else(|| System.ephemeral_range())
    }

    fn probe(&self, addr: SocketAddr, protocol: Protocol) -> io::Result<()> {
        if self.no_ipv6 && addr.is_ipv6() {
            return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
        }
        if self.busy.contains(&addr.port())
            || (addr.is_ipv6() && self.busy_v6.contains(&addr.port()))
        {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, "busy"));
        }
        if self.real_probe {
            System.probe(addr, protocol)
        } else {
            Ok(())
        }
    }
}

pub(super) fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests-data/config")
}

/// Loads `text` as `test.yaml`, includes relative to the test data.
pub(super) fn load_env(text: &str, env: &TestEnv) -> Result<(Compiled, Vec<Warning>), Errors> {
    load_with(text, &Arc::from("test.yaml"), &data_dir(), env)
}

pub(super) fn load(text: &str) -> Result<(Compiled, Vec<Warning>), Errors> {
    load_env(text, &TestEnv::default())
}

/// The rules of a valid file, one line each:
/// `id alias proto bind -> target[,target] path`.
pub(super) fn rows(text: &str) -> Vec<String> {
    match load(text) {
        Ok((c, _)) => c.listeners.iter().map(row).collect(),
        Err(e) => panic!("expected a valid file, got:\n{e}\n--- file:\n{text}"),
    }
}

pub(super) fn row(l: &Listener) -> String {
    let targets: Vec<String> = l
        .backends
        .iter()
        .map(|b| {
            if b.weight == 1 {
                b.addr.to_string()
            } else {
                format!("{}*{}", b.addr, b.weight)
            }
        })
        .collect();
    format!(
        "{} {} {} {} -> {} {}",
        l.rule_id,
        l.alias,
        l.protocol,
        l.bind,
        targets.join(","),
        l.path.as_str()
    )
}

/// The errors of an invalid file, one string each.
pub(super) fn errors(text: &str) -> Vec<String> {
    errors_env(text, &TestEnv::default())
}

pub(super) fn errors_env(text: &str, env: &TestEnv) -> Vec<String> {
    match load_env(text, env) {
        Ok((c, _)) => panic!(
            "expected errors, got a valid file:\n{}\n--- file:\n{text}",
            super::table(&c)
        ),
        Err(e) => {
            assert_eq!(e.len(), e.iter().count());
            e.to_string().lines().map(str::to_owned).collect()
        }
    }
}

pub(super) fn warnings(text: &str) -> Vec<String> {
    match load(text) {
        Ok((_, w)) => w.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("expected a valid file, got:\n{e}"),
    }
}
