//! Docker discovery: the running containers and the Engine's event stream,
//! read over the Engine API's Unix socket. What their labels mean is
//! `config::docker`'s business; the daemon applies the result as a reload.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use hyperlocal::{UnixConnector, Uri};
use serde_json::Value;
use tracing::{info, warn};

use crate::config::{Container, ContainerReport};

/// A request other than the event stream that takes longer has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Events closer together than this are one burst, applied once...
const QUIET: Duration = Duration::from_millis(150);
/// ...but a burst that never ends is applied this often.
const BURST_MAX: Duration = Duration::from_millis(600);
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The events that can change a container's routes.
const EVENT_FILTER: &str = r#"{"type":["container","network"],"event":["start","die","destroy","stop","kill","pause","unpause","connect","disconnect"]}"#;

/// The Docker Engine API on a Unix socket.
pub struct Client {
    socket: PathBuf,
    http: HttpClient<UnixConnector, Empty<Bytes>>,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_owned(),
            http: HttpClient::builder(TokioExecutor::new()).build(UnixConnector),
        }
    }

    async fn get(&self, path_and_query: &str) -> anyhow::Result<hyper::Response<Incoming>> {
        let uri: hyper::Uri = Uri::new(&self.socket, path_and_query).into();
        let response = self
            .http
            .get(uri)
            .await
            .with_context(|| format!("Docker at {}", self.socket.display()))?;
        if !response.status().is_success() {
            bail!(
                "Docker at {} answered {} to {path_and_query}",
                self.socket.display(),
                response.status()
            );
        }
        Ok(response)
    }

    /// The running containers.
    pub async fn containers(&self) -> anyhow::Result<Vec<Container>> {
        let body = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let response = self.get("/containers/json").await?;
            anyhow::Ok(response.into_body().collect().await?.to_bytes())
        })
        .await
        .map_err(|_| anyhow!("Docker at {} did not answer", self.socket.display()))??;
        let list: Value = serde_json::from_slice(&body).context("Docker's container list")?;
        let list = list
            .as_array()
            .ok_or_else(|| anyhow!("Docker's container list is not a list"))?;
        Ok(list.iter().map(container).collect())
    }

    /// The event stream of the changes that matter to routes.
    async fn events(&self) -> anyhow::Result<Incoming> {
        let query = format!("/events?filters={}", percent_encode(EVENT_FILTER));
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.get(&query))
            .await
            .map_err(|_| anyhow!("Docker at {} did not answer", self.socket.display()))??;
        Ok(response.into_body())
    }
}

/// One entry of `GET /containers/json`.
fn container(v: &Value) -> Container {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let name = v["Names"]
        .as_array()
        .and_then(|n| n.first())
        .map(|n| text(n).trim_start_matches('/').to_owned())
        .unwrap_or_else(|| text(&v["Id"]));
    let labels = v["Labels"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), text(v))).collect())
        .unwrap_or_default();
    let networks: BTreeMap<String, IpAddr> = v["NetworkSettings"]["Networks"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(name, n)| {
                    Some((name.clone(), n["IPAddress"].as_str()?.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    let ports: Vec<(u16, String)> = v["Ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| {
                    Some((
                        u16::try_from(p["PrivatePort"].as_u64()?).ok()?,
                        text(&p["Type"]),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut udp_only_ports: Vec<u16> = ports
        .iter()
        .filter(|(port, kind)| kind == "udp" && !ports.contains(&(*port, "tcp".to_owned())))
        .map(|(port, _)| *port)
        .collect();
    udp_only_ports.sort_unstable();
    udp_only_ports.dedup();
    Container {
        id: text(&v["Id"]),
        name,
        labels,
        networks,
        udp_only_ports,
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What `forwarder status` says of discovery.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DiscoveryStatus {
    pub socket: String,
    /// Following the event stream.
    pub connected: bool,
    /// Why not, and when it is tried again.
    pub error: Option<String>,
    pub retry_in_ms: Option<u64>,
    pub containers: Vec<ContainerStatus>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ContainerStatus {
    pub name: String,
    pub aliases: Vec<String>,
    pub errors: Vec<String>,
}

impl DiscoveryStatus {
    pub fn set_containers(&mut self, reports: &[ContainerReport]) {
        self.containers = reports
            .iter()
            .map(|r| ContainerStatus {
                name: r.name.clone(),
                aliases: r.aliases.clone(),
                errors: r.errors.clone(),
            })
            .collect();
    }
}

/// Logs each container's errors and warnings once, not at every event.
#[derive(Default)]
pub struct ReportLog {
    logged: HashSet<(String, String)>,
}

impl ReportLog {
    pub fn log(&mut self, reports: &[ContainerReport]) {
        let mut now = HashSet::new();
        for r in reports {
            for e in &r.errors {
                let key = (r.id.clone(), e.clone());
                if !self.logged.contains(&key) {
                    warn!("docker: container `{}` skipped: {e}", r.name);
                }
                now.insert(key);
            }
            for w in &r.warnings {
                let key = (r.id.clone(), w.clone());
                if !self.logged.contains(&key) {
                    warn!("docker: {w}");
                }
                now.insert(key);
            }
        }
        self.logged = now;
    }
}

/// Follows Docker for the daemon's life: lists the containers, hands them
/// to `apply`, then again after each burst of events. If Docker cannot be
/// reached it says so in `status` and tries again, backing off.
pub async fn follow<F, Fut>(client: Client, status: Arc<Mutex<DiscoveryStatus>>, apply: F)
where
    F: Fn(Vec<Container>) -> Fut,
    Fut: Future<Output = ()>,
{
    let set =
        |f: &dyn Fn(&mut DiscoveryStatus)| f(&mut status.lock().unwrap_or_else(|e| e.into_inner()));
    let mut retry = RETRY_FIRST;
    loop {
        let e = session(&client, &apply, &|| {
            set(&|s| {
                s.connected = true;
                s.error = None;
                s.retry_in_ms = None;
            })
        })
        .await;
        let connected = status.lock().map(|s| s.connected).unwrap_or(false);
        if connected {
            retry = RETRY_FIRST;
        }
        warn!("docker: {e:#}; the rules already applied stay; trying again in {retry:?}");
        set(&|s| {
            s.connected = false;
            s.error = Some(format!("{e:#}"));
            s.retry_in_ms = Some(retry.as_millis() as u64);
        });
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// One connection: subscribe, list, apply, and apply again after each burst
/// of events until the stream fails. Returns why it ended.
async fn session<F, Fut>(client: &Client, apply: &F, connected: &(dyn Fn() + Sync)) -> anyhow::Error
where
    F: Fn(Vec<Container>) -> Fut,
    Fut: Future<Output = ()>,
{
    // Subscribed before listing, so that no change falls between the two.
    let mut events = match client.events().await {
        Ok(events) => events,
        Err(e) => return e,
    };
    match client.containers().await {
        Ok(list) => {
            info!("docker: following {} running containers", list.len());
            connected();
            apply(list).await;
        }
        Err(e) => return e,
    }
    loop {
        // Wait for the first event of a burst.
        match events.frame().await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return anyhow!(e).context("Docker's event stream"),
            None => return anyhow!("Docker's event stream ended"),
        }
        let burst_end = tokio::time::Instant::now() + BURST_MAX;
        loop {
            let quiet_end = (tokio::time::Instant::now() + QUIET).min(burst_end);
            match tokio::time::timeout_at(quiet_end, events.frame()).await {
                Err(_) => break,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return anyhow!(e).context("Docker's event stream"),
                Ok(None) => return anyhow!("Docker's event stream ended"),
            }
        }
        match client.containers().await {
            Ok(list) => apply(list).await,
            Err(e) => return e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_container_of_the_list() {
        let v: Value = serde_json::from_str(
            r#"{"Id":"f00","Names":["/turn"],"Labels":{"proxy.aliases":"turn"},
                "Ports":[{"PrivatePort":3478,"Type":"udp"},{"PrivatePort":3478,"Type":"tcp"},
                         {"PrivatePort":5349,"Type":"udp"}],
                "NetworkSettings":{"Networks":{"bridge":{"IPAddress":"172.17.0.2"},
                                               "none":{"IPAddress":""}}}}"#,
        )
        .unwrap();
        let c = container(&v);
        assert_eq!(c.name, "turn");
        assert_eq!(c.labels["proxy.aliases"], "turn");
        assert_eq!(c.networks.len(), 1);
        assert_eq!(c.networks["bridge"].to_string(), "172.17.0.2");
        assert_eq!(c.udp_only_ports, [5349]);
    }

    #[test]
    fn the_event_filter_is_one_query_value() {
        let q = percent_encode(EVENT_FILTER);
        assert!(!q.contains(['{', '"', ',', ':', '[']), "{q}");
        assert!(q.starts_with("%7B%22type%22%3A"), "{q}");
    }
}
