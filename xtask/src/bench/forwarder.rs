//! The forwarder daemon as a contender: started on a generated rule file
//! with its own control socket, and asked (as `forwarder status --json`
//! does) whether the kernel path is on.
use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::configs::{self, FORWARDS};
use super::contenders::{Running, Started};
use super::measure::{Figure, Note};
use super::netns::Netns;
use super::procs::{self, Proc};

/// The status document from the control socket: a `status` request, one
/// JSON value back, then EOF.
pub fn query(socket: &Path) -> Result<Value> {
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(b"status\n")?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    serde_json::from_str(&body).context("the status is not JSON")
}

/// Why the kernel path is off, if the status says it is.
pub fn kernel_path_off(status: &Value) -> Option<String> {
    match status.get("kernel_path") {
        Some(Value::Bool(true)) => None,
        None => Some("the daemon's status has no `kernel_path`".into()),
        Some(v) => Some(format!("the daemon reports \"kernel_path\": {v}")),
    }
}

/// Flows the relay took since start, over every rule.
pub fn relay_flows(status: &Value) -> Result<u64> {
    let rules = status["relay"]
        .as_array()
        .context("the daemon's status has no `relay` list")?;
    rules
        .iter()
        .map(|r| r["flows"].as_u64().context("a relay rule without `flows`"))
        .sum()
}

/// Watches a daemon whose row is about the kernel path.
pub struct KernelWatch {
    socket: PathBuf,
    /// Why a measure's figures were dropped, if one's were.
    dropped: RefCell<Option<String>>,
}

impl KernelWatch {
    fn relay_flows(&self) -> Result<u64> {
        relay_flows(&query(&self.socket)?)
    }

    /// Set once the relay stood in: then the daemon's memory is the relay's
    /// too, and is not reported under a kernel label either.
    pub fn dropped(&self) -> Option<String> {
        self.dropped.borrow().clone()
    }
}

type Outcomes = Vec<(Figure, Result<f64, Note>)>;

/// Runs a measure; under a kernel label, its figures count only if the relay
/// took no flow meanwhile (a flow stays on the path it started on, so any
/// flow there means the relay carried part of the traffic).
pub fn on_kernel_path(
    watch: Option<&KernelWatch>,
    measure: impl FnOnce() -> Result<Outcomes>,
) -> Result<Outcomes> {
    let Some(watch) = watch else {
        return measure();
    };
    let before = watch.relay_flows();
    let mut outcomes = measure()?;
    let why = match (before, watch.relay_flows()) {
        (Ok(b), Ok(a)) if a == b => return Ok(outcomes),
        (Ok(b), Ok(a)) => format!(
            "kernel path unavailable: the relay carried {} flow(s) of this run",
            a.saturating_sub(b)
        ),
        (Err(e), _) | (_, Err(e)) => format!("kernel path unverified: {e:#}"),
    };
    for (_, outcome) in &mut outcomes {
        *outcome = Err(Note::NotApplicable(why.clone()));
    }
    watch.dropped.replace(Some(why));
    Ok(outcomes)
}

/// How the daemon runs in a contender.
pub struct Mode {
    /// Every rule's `path`.
    pub path: &'static str,
    /// `forwarder run --relay-only`.
    pub relay_only: bool,
    /// The row is about the kernel path: it is measured only if the daemon
    /// reports one, never with the relay standing in.
    pub kernel: bool,
}

/// Starts the daemon in `ns` on rules from `listen` to `backend`, its files
/// in `dir`, and waits until it answers and listens.
pub fn start(
    ns: &Netns,
    bin: &Path,
    dir: &Path,
    mode: &Mode,
    listen: Ipv4Addr,
    backend: Ipv4Addr,
) -> Result<Started> {
    let rules = dir.join(format!("forwarder-{}.yaml", mode.path));
    std::fs::write(&rules, configs::forwarder(backend, mode.path))
        .with_context(|| format!("write {}", rules.display()))?;
    let (relay_only, kernel) = (mode.relay_only, mode.kernel);
    let socket = dir.join("forwarder.sock");
    let _ = std::fs::remove_file(&socket);
    let mut cmd = ns.command(&bin.display().to_string());
    cmd.arg("run");
    if relay_only {
        cmd.arg("--relay-only");
    }
    cmd.arg("-c").arg(&rules).arg("--control").arg(&socket);
    let log = dir.join("forwarder.log");
    let mut daemon = Proc::spawn(&mut cmd, "forwarder", &log)?;
    let status = match wait_for_status(&mut daemon, &socket) {
        Ok(status) => status,
        Err(e) if kernel && procs::check_interrupted().is_ok() => {
            return Ok(Started::Unavailable(format!(
                "kernel path unavailable: {e:#}"
            )));
        }
        Err(e) => return Err(e),
    };
    if kernel && let Some(off) = kernel_path_off(&status) {
        // The daemon logs why it fell back to the relay; that says more.
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let why = log
            .lines()
            .rev()
            .find(|l| l.contains("kernel path"))
            .map_or(off, |l| l.trim().to_string());
        return Ok(Started::Unavailable(format!(
            "kernel path unavailable: {why}"
        )));
    }
    let mut running = Running {
        target: listen,
        procs: vec![daemon],
        kernel_watch: kernel.then_some(KernelWatch {
            socket,
            dropped: RefCell::new(None),
        }),
    };
    let tcp: Vec<u16> = FORWARDS.iter().map(|f| f.port).collect();
    let udp: Vec<u16> = FORWARDS.iter().filter(|f| f.udp).map(|f| f.port).collect();
    super::lab::wait_listening(&mut running.procs, &tcp, &udp)?;
    Ok(Started::Running(running))
}

fn wait_for_status(daemon: &mut Proc, socket: &Path) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        daemon.check_alive()?;
        match query(socket) {
            Ok(status) => return Ok(status),
            Err(e) if Instant::now() >= deadline => {
                bail!("no status on {} after 10 s: {e:#}", socket.display())
            }
            Err(_) => procs::sleep(Duration::from_millis(50))?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kernel_path_on_only_when_the_status_says_true() {
        assert_eq!(kernel_path_off(&json!({"kernel_path": true})), None);
        let off = kernel_path_off(&json!({"kernel_path": false})).unwrap();
        assert!(off.contains("false"), "{off}");
        let missing = kernel_path_off(&json!({"rules": []})).unwrap();
        assert!(missing.contains("no `kernel_path`"), "{missing}");
    }

    #[test]
    fn relay_flows_sum_over_rules() {
        let status = json!({"kernel_path": true, "relay": [
            {"rule_id": 0, "alias": "bench-iperf", "protocol": "tcp", "flows": 2},
            {"rule_id": 1, "alias": "bench-iperf", "protocol": "udp", "flows": 1}]});
        assert_eq!(relay_flows(&status).unwrap(), 3);
        assert!(relay_flows(&json!({"relay": null})).is_err());
        assert!(relay_flows(&json!({"relay": [{"alias": "x"}]})).is_err());
    }

    #[test]
    fn without_a_watch_the_measure_is_taken_as_it_is() {
        let out = on_kernel_path(None, || Ok(vec![(Figure::TcpGbps, Ok(9.0))])).unwrap();
        assert_eq!(out, vec![(Figure::TcpGbps, Ok(9.0))]);
    }
}
