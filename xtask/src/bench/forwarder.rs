//! The forwarder daemon as a contender: started on a generated rule file
//! with its own control socket, and asked (as `forwarder status --json`
//! does) whether the kernel path is on.
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::configs::{self, FORWARDS};
use super::contenders::{Running, Started};
use super::netns::Netns;
use super::procs::{self, Proc};

/// The status document from the control socket: one JSON value per
/// connection, then EOF.
fn query(socket: &Path) -> Result<Value> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    serde_json::from_str(&body).context("the status is not JSON")
}

/// Why the kernel path is off, as far as the status says.
pub fn kernel_path_off_reason(status: &Value) -> Option<String> {
    if status.get("kernel_path") == Some(&Value::Bool(true)) {
        return None;
    }
    let reason = ["kernel_path_error", "kernel_path_reason", "kernel_error"]
        .iter()
        .find_map(|k| status.get(*k).and_then(Value::as_str))
        .map(str::to_string);
    Some(reason.unwrap_or_else(|| match status.get("kernel_path") {
        None => "the daemon's status has no `kernel_path`".into(),
        Some(v) => format!("the daemon reports \"kernel_path\": {v}"),
    }))
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
    let mut daemon = Proc::spawn(&mut cmd, "forwarder", &dir.join("forwarder.log"))?;
    let status = match wait_for_status(&mut daemon, &socket) {
        Ok(status) => status,
        Err(e) if kernel && procs::check_interrupted().is_ok() => {
            return Ok(Started::Unavailable(format!(
                "kernel path unavailable: {e:#}"
            )));
        }
        Err(e) => return Err(e),
    };
    if kernel && let Some(reason) = kernel_path_off_reason(&status) {
        return Ok(Started::Unavailable(format!(
            "kernel path unavailable: {reason}"
        )));
    }
    let mut running = Running {
        target: listen,
        procs: vec![daemon],
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
        assert_eq!(kernel_path_off_reason(&json!({"kernel_path": true})), None);
        let off = kernel_path_off_reason(&json!({"kernel_path": false})).unwrap();
        assert!(off.contains("false"), "{off}");
        let missing = kernel_path_off_reason(&json!({"rules": 3})).unwrap();
        assert!(missing.contains("no `kernel_path`"), "{missing}");
        let why = kernel_path_off_reason(
            &json!({"kernel_path": false, "kernel_path_error": "BTF not found"}),
        );
        assert_eq!(why.as_deref(), Some("BTF not found"));
    }
}
