//! `forwarder run`: load the rules, start the kernel path and the relay,
//! answer status queries, reload the rule file on SIGHUP or `forwarder
//! reload`, and stop cleanly on SIGINT, SIGTERM or SIGQUIT.
//!
//! Order matters: the rule file is validated whole before anything is
//! touched; the kernel path starts before the relay binds, so the relay
//! observer exists before the first relay flow; a failure at any step
//! undoes the steps before it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use forwarder_common::RULE_F_RELAY;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::config;
use crate::control::{ControlSocket, Handlers, ReloadFn, StatusFn};
use crate::docker::{self, DiscoveryStatus, ReportLog};
use crate::kernel::{KernelPath, NEED_ROOT, NoSuchInterface, RelayFlows, StartOptions, Steering};
use crate::metrics;
use crate::names;
use crate::privileges;
use crate::relay::Relay;
use crate::reload::{self, ListenKey, Plan, Summary};
use crate::rules::{Answer, Compiled, FlowObserver, NoKernelPath};

pub struct RunOptions {
    pub config: PathBuf,
    pub relay_only: bool,
    pub control: PathBuf,
}

/// Why the daemon did not run; the CLI maps these to exit codes.
pub enum RunError {
    /// The rule file is invalid (exit 2, like `check`).
    Config(config::Errors),
    /// Anything else (exit 1).
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for RunError {
    fn from(e: anyhow::Error) -> Self {
        RunError::Fatal(e)
    }
}

pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    let result = start_and_run(opts).await;
    if let Err(e) = &result
        && crate::upgrade::armed()
    {
        // An upgrade's new image that cannot start: the old one takes
        // everything back (this returns only if it cannot be executed).
        let why = match e {
            RunError::Config(errors) => errors.to_string(),
            RunError::Fatal(e) => format!("{e:#}"),
        };
        error!(
            "the new image failed to start ({why}); giving everything back to the previous binary"
        );
        let failed = crate::upgrade::give_back(&why);
        error!("cannot go back to the previous binary: {failed}");
    }
    result
}

async fn start_and_run(opts: RunOptions) -> Result<(), RunError> {
    // Before anything on the host changes: a signal during start-up must
    // find the handlers that undo it.
    let mut signals = Signals::install()?;
    // Blocked in main until now (and across an upgrade's exec): from here
    // on they reach the handlers, on this thread only.
    crate::upgrade::unblock_signals();
    let mut inherited = crate::upgrade::inherited()?;
    if let Some(record) = inherited.as_ref().filter(|r| r.failed.is_some()) {
        warn!(
            "the new binary failed to start, and this image takes everything back: {}",
            record.failed.as_deref().unwrap_or_default()
        );
    }
    if let Some(record) = &inherited {
        // From here until the upgrade is done, a failed start (an error
        // or a panic on this thread) gives everything back to the old image.
        match crate::upgrade::arm(record) {
            Ok(true) => {}
            Ok(false) => info!("no way back to the previous image is kept for this start"),
            Err(e) => {
                warn!("no way back to the previous image ({e}): a failed start ends this process")
            }
        }
        info!(
            "upgraded in place from {}: taking over {} listeners, {} tcp pairs, {} udp sessions",
            record.from_version,
            record.relay.listeners.len(),
            record.relay.tcp.len(),
            record.relay.udp.len()
        );
    }
    let file_text = config::read_file(&opts.config).map_err(RunError::Config)?;
    // An upgrade starts with the containers the old image last applied, so
    // their rules' listeners and flows are taken over, not closed.
    let containers = inherited
        .as_mut()
        .map(|r| std::mem::take(&mut r.containers))
        .unwrap_or_default();
    let loaded = config::load_text_with_containers(&file_text, &opts.config, &containers)
        .map_err(RunError::Config)?;
    let compiled = loaded.compiled;
    // First: a port that is taken stops the start before anything changed.
    // An upgrade's endpoint socket is taken over: no scrape is refused.
    let handed_metrics = inherited.as_mut().and_then(|r| r.metrics.take());
    let metrics_listener = match compiled.metrics {
        Some(m) => Some((
            m.listen,
            metrics::adopt_or_bind(handed_metrics, m.listen).await?,
        )),
        None => {
            handed_metrics.map(crate::relay::gate::own_fd);
            None
        }
    };
    if opts.relay_only
        && let Some((l, why)) = compiled
            .listeners
            .iter()
            .filter(|l| l.preserve_client_ip)
            .find_map(|l| Some((l, l.needs_kernel()?)))
    {
        return Err(RunError::Fatal(anyhow!(
            "rule `{}` in {} has {why}: --relay-only cannot carry it",
            l.alias,
            opts.config.display()
        )));
    }
    let handed_steer = inherited.as_mut().and_then(|r| r.steer.take());
    let steering = load_steering(&compiled, &opts, handed_steer)?;
    // An upgrade's relay goes first: its handed-over flows are frozen
    // until it runs, and the kernel path then finds them in the observer
    // it is given, so their RELAY_FLOWS entries stay.
    let early = match inherited.as_mut() {
        Some(record) => {
            let flows = Arc::new(RelayFlows::new());
            let relay = Relay::start_steered(
                &compiled.listeners,
                compiled.relay,
                flows.clone(),
                Some(std::mem::take(&mut record.relay)),
                steering.clone(),
            )
            .await?;
            let frozen_ms = crate::upgrade::unix_ms().saturating_sub(record.frozen_at_ms);
            info!(
                frozen_ms,
                "relay carries on: it was frozen for {frozen_ms} ms"
            );
            Some((relay, flows, frozen_ms))
        }
        None => None,
    };
    let kernel = if opts.relay_only {
        info!("relay only (--relay-only): the kernel path is not loaded");
        None
    } else {
        // Containers may bring rules the kernel path can take at any time.
        let relay_flows = early.as_ref().map(|(_, flows, _)| flows.clone());
        let had_kernel_path = inherited.as_ref().is_some_and(|r| r.kernel_path);
        let started = start_kernel_path(
            &compiled,
            &opts,
            loaded.docker.is_some(),
            relay_flows,
            had_kernel_path,
        )
        .await;
        match started {
            Ok(kernel) => kernel,
            Err(e) => {
                if let Some((relay, _, _)) = early {
                    undo_relay(relay).await;
                }
                return Err(e);
            }
        }
    };
    let kernel = kernel.map(Arc::new);
    let frozen_ms = early.as_ref().map_or(0, |(_, _, ms)| *ms);
    let relay = match early {
        Some((relay, _, _)) => Arc::new(relay),
        None => {
            let observer: Arc<dyn FlowObserver> = match &kernel {
                Some(k) => k.observer(),
                None => Arc::new(NoKernelPath),
            };
            let started = Relay::start_steered(
                &compiled.listeners,
                compiled.relay,
                observer,
                None,
                steering.clone(),
            );
            match started.await {
                Ok(relay) => Arc::new(relay),
                Err(e) => {
                    stop_kernel_path(kernel);
                    return Err(e.into());
                }
            }
        }
    };
    if let Some(steering) = &steering {
        // The sockets are in its map: the ranges may point at them.
        if let Err(e) = steering.set_ranges(&compiled.kernel.ranges) {
            relay.health().stop();
            if let Ok(relay) = Arc::try_unwrap(relay) {
                undo_relay(relay).await;
            }
            stop_kernel_path(kernel);
            return Err(e.into());
        }
    }
    let handed_health = inherited.as_mut().map(|r| std::mem::take(&mut r.health));
    start_health_checks(
        &relay,
        kernel.as_ref(),
        &compiled,
        &handed_health.unwrap_or_default(),
    );
    let control = match inherited.as_mut().and_then(|r| r.control.take()) {
        Some(fd) => crate::relay::gate::own_fd(fd)
            .map_err(anyhow::Error::from)
            .and_then(|fd| ControlSocket::inherit(&opts.control, fd)),
        None => ControlSocket::bind(&opts.control),
    };
    let control = match control {
        Ok(c) => c,
        Err(e) => {
            relay.health().stop();
            undo_relay(Arc::try_unwrap(relay).ok().expect("no other owner yet")).await;
            stop_kernel_path(kernel);
            return Err(e.into());
        }
    };
    let rules = compiled.listeners.len();
    let daemon = Arc::new_cyclic(|me| Daemon {
        me: me.clone(),
        metrics: Mutex::new(None),
        config: opts.config.clone(),
        relay_only: opts.relay_only,
        relay,
        kernel,
        running: RwLock::new(compiled),
        reloading: tokio::sync::Mutex::new(()),
        names_changed: tokio::sync::Notify::new(),
        file_text: Mutex::new(file_text),
        docker: Mutex::new(None),
        containers: Mutex::new(containers),
        discovery: Arc::new(Mutex::new(DiscoveryStatus::default())),
        report_log: Mutex::new(ReportLog::default()),
        started: std::time::Instant::now(),
    });
    if let Some(settings) = loaded.docker.clone() {
        if !lock(&daemon.containers).is_empty() {
            // Handed over by an upgrade: the next listing finds them again.
            lock(&daemon.report_log).log(&loaded.containers);
            lock(&daemon.discovery).set_containers(&loaded.containers);
        }
        daemon.start_discovery(settings);
    }
    if let Some((listen, listener)) = metrics_listener {
        daemon.serve_metrics(listen, listener);
    }
    let (upgrade_tx, mut upgrade_rx) = tokio::sync::mpsc::unbounded_channel();
    let handlers = Handlers {
        status: status_fn(daemon.clone()),
        reload: reload_fn(daemon.clone()),
        upgrade: Some(Arc::new(move |requester| {
            let _ = upgrade_tx.send(requester);
        })),
    };
    let control_fd = control.raw_fd();
    let control_task = tokio::spawn(async move { control.serve(handlers).await });
    let names_task = tokio::spawn(follow_names(daemon.clone()));
    // Set-up is done: every thread keeps only what reloads, the relay and
    // the stop still use, and bounds what a start (an upgrade's exec)
    // needs. A daemon that cannot drop stops.
    // The steering's maps are written at reloads too.
    let keep = privileges::needed_after_setup(daemon.kernel.is_some() || steering.is_some());
    let dropped = privileges::drop_to(keep, privileges::needed_for_start());
    match &dropped {
        Ok(()) => info!(
            rules,
            kernel_path = daemon.kernel.is_some(),
            control = %opts.control.display(),
            capabilities = %privileges::names(keep).join(","),
            "forwarder running"
        ),
        Err(e) => error!("cannot drop capabilities: {e:#}; stopping"),
    }
    if let Err(e) = &dropped
        && crate::upgrade::armed()
    {
        // An upgrade's start that fails here gives everything back: the
        // relay freezes again instead of stopping.
        freeze_for_fallback(&daemon.relay).await;
        return Err(RunError::Fatal(anyhow!("cannot drop capabilities: {e:#}")));
    }
    // What loading and compiling the rules allocated is free now.
    crate::process::release_free_memory();
    if let Some(record) = inherited {
        crate::upgrade::disarm();
        let took_ms = crate::upgrade::unix_ms().saturating_sub(record.frozen_at_ms);
        if let Some(why) = &record.failed {
            let why = format!("the new binary failed to start: {why}");
            info!(
                took_ms,
                frozen_ms, "took everything back from the new image"
            );
            warn!("upgrade failed, this daemon runs on: {why}");
            if let Some(fd) = record.requester {
                answer_upgrade(
                    crate::relay::gate::own_fd(fd).ok().map(Into::into),
                    serde_json::json!({ "outcome": "failed", "error": why }),
                );
            }
        } else if let Some(fd) = record.requester {
            answer_upgrade(
                crate::relay::gate::own_fd(fd).ok().map(Into::into),
                serde_json::json!({
                    "outcome": "upgraded",
                    "pid": std::process::id(),
                    "version": env!("CARGO_PKG_VERSION"),
                    "from_version": record.from_version,
                    "frozen_ms": frozen_ms,
                    "took_ms": took_ms,
                }),
            );
        }
        if record.failed.is_none() {
            info!(
                took_ms,
                frozen_ms,
                "upgrade done: the new image runs everything {took_ms} ms after the freeze"
            );
        }
    }

    while dropped.is_ok() {
        let event = tokio::select! {
            signal = signals.next() => signal,
            Some(requester) = upgrade_rx.recv() => Signal::UpgradeAsked(requester),
        };
        match event {
            Signal::Stop(name) => {
                info!("{name}");
                break;
            }
            Signal::Reload => {
                info!("SIGHUP: reloading {}", daemon.config.display());
                daemon.reload().await;
            }
            Signal::Upgrade => {
                info!("SIGUSR2: upgrading in place");
                let why = daemon.upgrade(control_fd, None).await;
                warn!("upgrade failed, this daemon runs on: {why}");
            }
            Signal::UpgradeAsked(requester) => {
                info!("upgrade asked on the control socket");
                let why = daemon.upgrade(control_fd, Some(&requester)).await;
                warn!("upgrade failed, this daemon runs on: {why}");
                let answer = serde_json::json!({ "outcome": "failed", "error": why });
                answer_upgrade(Some(requester), answer);
            }
        }
    }

    // Dropping the control socket and discovery releases their clones of the daemon.
    control_task.abort();
    let _ = control_task.await;
    names_task.abort();
    let _ = names_task.await;
    daemon.stop_metrics().await;
    if let Some(task) = daemon.stop_discovery() {
        let _ = task.await;
    }
    let daemon = sole_owner(daemon)
        .await
        .map_err(|_| anyhow!("the daemon is still shared at stop"))?;
    let drain = daemon.running().relay.drain_timeout;
    info!(?drain, "stopping: no new flows; live flows may finish");
    daemon.relay.health().stop();
    let relay =
        Arc::try_unwrap(daemon.relay).map_err(|_| anyhow!("the relay is still shared at stop"))?;
    relay.shutdown(drain).await;
    stop_kernel_path(daemon.kernel);
    dropped.map_err(|e| anyhow!("cannot drop capabilities: {e:#}"))?;
    info!("stopped");
    Ok(())
}

/// The running daemon, as reloads and status queries see it.
struct Daemon {
    /// For the tasks it starts itself (the metrics endpoint), which must
    /// not keep it alive at stop.
    me: Weak<Daemon>,
    /// The metrics endpoint serving now.
    metrics: Mutex<Option<MetricsEndpoint>>,
    config: PathBuf,
    relay_only: bool,
    relay: Arc<Relay>,
    kernel: Option<Arc<KernelPath>>,
    /// The rule table in force.
    running: RwLock<Compiled>,
    /// One reload at a time (SIGHUP, `forwarder reload` and Docker may meet).
    reloading: tokio::sync::Mutex<()>,
    /// Poked when the rules in force change, for the name follower.
    names_changed: tokio::sync::Notify,
    /// The rule file as last loaded: a change in Docker does not re-read it.
    file_text: Mutex<String>,
    /// The `docker:` section in force, and the task following Docker.
    docker: Mutex<Option<Discovery>>,
    /// The running containers as Docker last listed them.
    containers: Mutex<Vec<config::Container>>,
    discovery: Arc<Mutex<DiscoveryStatus>>,
    report_log: Mutex<ReportLog>,
    /// Status documents carry the time since, so rates between two of
    /// them need no clock of the client's.
    started: std::time::Instant,
}

struct Discovery {
    settings: config::DockerSettings,
    task: tokio::task::JoinHandle<()>,
}

struct MetricsEndpoint {
    listen: SocketAddr,
    /// Gives the socket back once it is stopped.
    task: tokio::task::JoinHandle<tokio::net::TcpListener>,
    stop: tokio::sync::oneshot::Sender<()>,
}

/// How long the relay may take to reach a point where it can be handed over.
const FREEZE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The upgrade's relay, resumed, when a later step of the start fails:
/// with a way back it freezes again, so nothing is held in userspace and
/// the record the old image takes back names every flow as it is now
/// (new ones included); without, it shuts down.
async fn undo_relay(relay: Relay) {
    if crate::upgrade::armed() {
        freeze_for_fallback(&relay).await;
        // Its descriptors are the old image's now; nothing may close them.
        std::mem::forget(relay);
        return;
    }
    relay.shutdown(std::time::Duration::ZERO).await;
}

async fn freeze_for_fallback(relay: &Relay) {
    let frozen = relay.freeze(FREEZE_WAIT).await;
    if let Err(e) = frozen.and_then(crate::upgrade::relay_frozen) {
        // The record read at start goes back: flows of the buffered copy
        // may lose what it held in userspace.
        error!("the relay cannot freeze again for the way back: {e}");
    }
}

/// Writes the outcome of an upgrade to the `forwarder upgrade` client.
fn answer_upgrade(requester: Option<std::os::unix::net::UnixStream>, doc: serde_json::Value) {
    use std::io::Write;
    if let Some(mut stream) = requester {
        let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(1)));
        let _ = stream.write_all(format!("{doc}\n").as_bytes());
    }
}

/// What a reload did, as `forwarder reload` reports it.
#[derive(Debug)]
pub enum ReloadOutcome {
    Applied(Summary),
    /// The file is invalid; nothing changed. Every error, one per line.
    Invalid(String),
    /// The file is valid but cannot be applied; nothing changed.
    Refused(String),
}

impl ReloadOutcome {
    fn to_json(&self) -> serde_json::Value {
        match self {
            ReloadOutcome::Applied(summary) => {
                serde_json::json!({ "outcome": "applied", "summary": summary })
            }
            ReloadOutcome::Invalid(errors) => {
                serde_json::json!({ "outcome": "invalid", "errors": errors })
            }
            ReloadOutcome::Refused(why) => {
                serde_json::json!({ "outcome": "refused", "errors": why })
            }
        }
    }
}

impl Daemon {
    fn running(&self) -> std::sync::RwLockReadGuard<'_, Compiled> {
        // Replaced whole under the write lock: never seen half-written.
        self.running.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the rule file again and applies the difference (see
    /// `reload`); on any error nothing changes and the old rules run on.
    async fn reload(&self) -> ReloadOutcome {
        self.rebuild(true, "reload").await
    }

    /// Docker listed its containers anew: their routes replace the ones
    /// of the last listing, with the rule file as last loaded.
    async fn containers_changed(&self, containers: Vec<config::Container>) {
        *lock(&self.containers) = containers;
        self.rebuild(false, "docker").await;
    }

    /// The `docker:` section in force.
    fn docker_settings(&self) -> Option<config::DockerSettings> {
        lock(&self.docker).as_ref().map(|d| d.settings.clone())
    }

    /// Follows Docker at `settings`: every listing is applied as a reload.
    fn start_discovery(&self, settings: config::DockerSettings) {
        info!(
            "docker: discovering containers at {}",
            settings.socket.display()
        );
        lock(&self.discovery).socket = settings.socket.display().to_string();
        // Not a strong reference: the task must not keep the daemon alive at stop.
        let me = self.me.clone();
        let status = self.discovery.clone();
        let client = docker::Client::new(&settings.socket);
        let task = tokio::spawn(async move {
            docker::follow(client, status, |containers| {
                let me = me.clone();
                async move {
                    if let Some(d) = me.upgrade() {
                        d.containers_changed(containers).await;
                    }
                }
            })
            .await
        });
        *lock(&self.docker) = Some(Discovery { settings, task });
    }

    /// Stops following Docker; the task, aborted, to await.
    fn stop_discovery(&self) -> Option<tokio::task::JoinHandle<()>> {
        let discovery = lock(&self.docker).take()?;
        discovery.task.abort();
        Some(discovery.task)
    }

    /// Loads the rule file (read again if `reread`) with the containers'
    /// routes and applies the difference; `what` names the cause in logs.
    async fn rebuild(&self, reread: bool, what: &'static str) -> ReloadOutcome {
        let _one_at_a_time = self.reloading.lock().await;
        let started = std::time::Instant::now();
        let path = self.config.clone();
        let text = (!reread).then(|| lock(&self.file_text).clone());
        let containers = lock(&self.containers).clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let text = match text {
                Some(text) => text,
                None => config::read_file(&path)?,
            };
            let loaded = config::load_text_with_containers(&text, &path, &containers)?;
            if loaded.docker.is_none() && !containers.is_empty() {
                // `docker:` is gone: so are the containers' routes.
                let loaded = config::load_text_with_containers(&text, &path, &[])?;
                return Ok((text, loaded));
            }
            Ok::<_, config::Errors>((text, loaded))
        })
        .await;
        let (text, loaded) = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(errors)) => {
                let text = errors.to_string();
                for line in text.lines() {
                    warn!("{what}: {line}");
                }
                warn!(
                    "{what}: {} is invalid ({} errors); the running rules stay",
                    self.config.display(),
                    errors.len()
                );
                return ReloadOutcome::Invalid(text);
            }
            Err(e) => return ReloadOutcome::Refused(format!("the rule file loader failed: {e}")),
        };
        if self.docker_settings().is_some() && loaded.docker.is_some() {
            lock(&self.report_log).log(&loaded.containers);
            lock(&self.discovery).set_containers(&loaded.containers);
        }
        let loaded_in = started.elapsed();
        // The endpoint's new socket is bound first: a reload that cannot
        // bind it changes nothing.
        let wanted = loaded.compiled.metrics.map(|m| m.listen);
        let serving = lock(&self.metrics).as_ref().map(|e| e.listen);
        let metrics_moved = wanted != serving;
        let new_metrics = match wanted.filter(|_| metrics_moved) {
            Some(listen) => match metrics::bind(listen).await {
                Ok(listener) => Some((listen, listener)),
                Err(e) => {
                    warn!("{what}: {e:#}; the running rules stay");
                    return ReloadOutcome::Refused(format!("{e:#}"));
                }
            },
            None => None,
        };
        match self.apply(loaded.compiled).await {
            Ok(summary) => {
                *lock(&self.file_text) = text;
                if metrics_moved {
                    self.stop_metrics().await;
                    match new_metrics {
                        Some((listen, listener)) => self.serve_metrics(listen, listener),
                        None => info!("{what}: metrics: the endpoint at {serving:?} is closed"),
                    }
                }
                let following = self.docker_settings();
                if loaded.docker != following {
                    // The containers' rules went with `docker:` above; a
                    // new section is followed from its first listing.
                    info!(
                        "{what}: docker: {} -> {}",
                        docker_setting(&following),
                        docker_setting(&loaded.docker)
                    );
                    if let Some(task) = self.stop_discovery() {
                        let _ = task.await;
                    }
                    if loaded.docker.is_none() {
                        lock(&self.containers).clear();
                        *lock(&self.discovery) = DiscoveryStatus::default();
                        *lock(&self.report_log) = ReportLog::default();
                    }
                    if let Some(settings) = loaded.docker.clone() {
                        self.start_discovery(settings);
                    }
                }
                info!(
                    load_ms = loaded_in.as_millis() as u64,
                    apply_ms = (started.elapsed() - loaded_in).as_millis() as u64,
                    "{what}: {} added, {} changed, {} removed, {} unchanged",
                    summary.added.len(),
                    summary.changed.len(),
                    summary.removed.len(),
                    summary.unchanged
                );
                for setting in &summary.needs_restart {
                    warn!("{what}: {setting} takes effect only after a restart");
                }
                crate::process::release_free_memory();
                ReloadOutcome::Applied(summary)
            }
            Err(e) => {
                warn!("{what}: {e:#}; the running rules stay");
                ReloadOutcome::Refused(format!("{e:#}"))
            }
        }
    }

    /// Takes fresh answers for some hostnames: where addresses changed,
    /// the rule file as last applied is compiled with them and new flows
    /// follow (as a reload that changes only backends would).
    async fn refresh_names(&self, fresh: BTreeMap<String, Answer>, names: &mut NameWatch) {
        let _one_at_a_time = self.reloading.lock().await;
        let running = self.running().clone();
        let mut answers = running.hostnames.clone();
        answers.extend(fresh);
        let moved = (answers.iter()).any(|(name, a)| {
            running
                .hostnames
                .get(name)
                .is_some_and(|old| old.addrs != a.addrs)
        });
        if !moved {
            // Only TTLs: nothing to compile, but the answers in force are these.
            let mut running = self.running.write().unwrap_or_else(|e| e.into_inner());
            for (name, answer) in answers {
                if let Some(old) = running.hostnames.get_mut(&name) {
                    *old = answer;
                }
            }
            return;
        }
        let text = lock(&self.file_text).clone();
        let path = self.config.clone();
        // With the containers' routes, or they would look removed.
        let containers = lock(&self.containers).clone();
        let loaded = tokio::task::spawn_blocking(move || {
            config::load_text_with_answers(&text, &path, &containers, &answers).map(|l| l.compiled)
        });
        let loaded = match loaded.await {
            Ok(Ok(compiled)) => compiled,
            Ok(Err(errors)) => {
                names.unusable(&errors.to_string());
                return;
            }
            Err(_) => return,
        };
        names.usable();
        let plan = match self.plan(&running, loaded) {
            Ok(plan) => plan,
            Err(e) => {
                warn!("names: the new answers cannot be applied: {e:#}");
                return;
            }
        };
        if !only_backends_changed(&running, &plan) {
            // Never from the same file and containers; said rather than applied.
            warn!("names: the rules changed otherwise too; the new answers wait for a reload");
            return;
        }
        for (_, new) in &plan.changed {
            let to: Vec<String> = new.backends.iter().map(|b| b.addr.to_string()).collect();
            info!(alias = %new.alias, "names: new flows of {} go to {}", new.protocol, to.join(", "));
        }
        if let Err(e) = self.apply_plan(plan).await {
            warn!("names: the new answers cannot be applied: {e:#}");
        }
    }

    /// Re-executes the binary at the start path in place, handing over
    /// everything; returns only if that did not happen, with the reason,
    /// and then everything runs on as before.
    async fn upgrade(
        &self,
        control_fd: std::os::fd::RawFd,
        requester: Option<&std::os::unix::net::UnixStream>,
    ) -> String {
        let _one_at_a_time = self.reloading.lock().await;
        let path = self.config.clone();
        let running: Vec<ListenKey> = self.running().listeners.iter().map(ListenKey::of).collect();
        // Docker's last listing, as applied: the new image starts with it.
        let containers = lock(&self.containers).clone();
        let handed = containers.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let loaded = config::load_with_containers(&path, &handed).map_err(|e| {
                format!(
                    "{} is invalid, so the new image could not start on it:\n{e}",
                    path.display()
                )
            })?;
            if loaded.docker.is_none() && !handed.is_empty() {
                // It would keep the containers' rules with nobody to follow them.
                return Err(format!(
                    "{} has no `docker:` any more, so the new image would not follow Docker: \
                     `forwarder reload` first (it stops following Docker, and the containers' \
                     rules drain as removed rules), then upgrade",
                    path.display()
                ));
            }
            let loaded = loaded.compiled;
            let mut now: Vec<ListenKey> = loaded.listeners.iter().map(ListenKey::of).collect();
            let mut before = running;
            now.sort();
            before.sort();
            if now != before {
                return Err(format!(
                    "{} has other listeners than the running rules: `forwarder reload` first, \
                     then upgrade",
                    path.display()
                ));
            }
            crate::upgrade::preflight(&path)
        })
        .await;
        let exe = match checked {
            Ok(Ok(exe)) => exe,
            Ok(Err(why)) => return why,
            Err(e) => return format!("the preflight check failed: {e}"),
        };
        // Stops answering scrapes but keeps the socket: new ones wait in
        // its backlog for the new image.
        let metrics = self.pause_metrics().await;
        let frozen_at_ms = crate::upgrade::unix_ms();
        let relay = match self.relay.freeze(FREEZE_WAIT).await {
            Ok(relay) => relay,
            Err(why) => {
                if let Some((listen, listener)) = metrics {
                    self.serve_metrics(listen, listener);
                }
                return why;
            }
        };
        info!(
            "relay frozen: {} listeners, {} tcp pairs, {} udp sessions; executing {}",
            relay.listeners.len(),
            relay.tcp.len(),
            relay.udp.len(),
            exe.display()
        );
        let record = crate::upgrade::Record {
            control: Some(control_fd),
            requester: requester.map(std::os::fd::AsRawFd::as_raw_fd),
            relay,
            steer: self.relay.steer_record(),
            frozen_at_ms,
            from_version: env!("CARGO_PKG_VERSION").into(),
            containers,
            metrics: metrics
                .as_ref()
                .map(|(_, l)| std::os::fd::AsRawFd::as_raw_fd(l)),
            health: self.relay.health().export(),
            kernel_path: self.kernel.is_some(),
            fallback: None,
            failed: None,
        };
        let why = crate::upgrade::exec(&exe, &record);
        self.relay.thaw();
        if let Some((listen, listener)) = metrics {
            self.serve_metrics(listen, listener);
        }
        why
    }

    /// Stops the metrics endpoint's accepting, lets the scrapes under way
    /// finish, and returns its socket, still listening.
    async fn pause_metrics(&self) -> Option<(SocketAddr, tokio::net::TcpListener)> {
        let endpoint = lock(&self.metrics).take()?;
        let _ = endpoint.stop.send(());
        match endpoint.task.await {
            Ok(listener) => Some((endpoint.listen, listener)),
            Err(_) => None,
        }
    }

    /// Serves the metrics endpoint on `listener`.
    fn serve_metrics(&self, listen: SocketAddr, listener: tokio::net::TcpListener) {
        if !listen.ip().is_loopback() {
            warn!(
                "metrics: {listen} is not a loopback address: every host that reaches it can read the rules' aliases and counters"
            );
        }
        info!("metrics: serving GET /metrics on {listen}");
        let me = self.me.clone();
        let scrape: metrics::ScrapeFn = Arc::new(move || match me.upgrade() {
            Some(daemon) => daemon.scrape(),
            None => Err("the daemon is stopping".to_owned()),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(metrics::serve(listener, scrape, stopped));
        *lock(&self.metrics) = Some(MetricsEndpoint { listen, task, stop });
    }

    /// Closes the metrics endpoint: its socket is closed on return.
    async fn stop_metrics(&self) {
        let endpoint = lock(&self.metrics).take();
        if let Some(endpoint) = endpoint {
            endpoint.task.abort();
            let _ = endpoint.task.await;
        }
    }

    /// One scrape of the metrics endpoint.
    fn scrape(&self) -> Result<String, String> {
        let relay = self.relay.counters();
        let kernel = match &self.kernel {
            Some(k) => Some(
                k.counters()
                    .map_err(|e| format!("the kernel path's counters cannot be read: {e:#}"))?,
            ),
            None => None,
        };
        let health_checks = self.relay.health();
        let health = self
            .running()
            .listeners
            .iter()
            .map(|l| {
                (
                    l.alias.clone(),
                    l.protocol.as_str(),
                    health_checks.status(l.rule_id),
                )
            })
            .collect();
        let discovery = self
            .docker_settings()
            .map(|_| lock(&self.discovery).clone());
        let text = metrics::render(&metrics::Sample {
            relay: &relay,
            kernel: kernel.as_ref(),
            health,
            docker: discovery.as_ref(),
            process: crate::process::Footprint::now().ok(),
        });
        drop((relay, kernel));
        crate::process::release_free_memory();
        Ok(text)
    }

    /// Prepares everything that can fail on both paths, then switches.
    async fn apply(&self, loaded: Compiled) -> anyhow::Result<Summary> {
        let running = self.running().clone();
        let plan = self.plan(&running, loaded)?;
        self.apply_plan(plan).await
    }

    fn plan(&self, running: &Compiled, loaded: Compiled) -> anyhow::Result<Plan> {
        let kernel = self.kernel.as_deref();
        let held = |id: u32| kernel.is_some_and(|k| k.holds(id));
        reload::plan(running, loaded, &held).map_err(|e| anyhow!(e))
    }

    async fn apply_plan(&self, mut plan: Plan) -> anyhow::Result<Summary> {
        if !self.relay.steers()
            && let Some(l) = plan.added.iter().find(|l| l.ports.is_range())
        {
            // The first port range: its sockets need the steering program.
            let steering = Steering::load().with_context(|| {
                format!(
                    "rule `{}` is a port range, which the relay serves through a socket-lookup \
                     BPF program (sk_lookup), and it cannot be loaded now; restart the daemon \
                     as root",
                    l.alias
                )
            })?;
            info!(
                program = ?steering.program_id(),
                "port ranges: socket lookup steers them to the relay"
            );
            self.relay.enable_steering(Arc::new(steering));
        }
        let kernel = self.kernel.as_deref();
        let tables = match kernel {
            Some(k) => Some(k.prepare(&plan)?),
            None => {
                self.without_kernel_path(&mut plan)?;
                None
            }
        };
        let prepared = self.relay.prepare(&plan).await?;
        if let (Some(k), Some(tables)) = (kernel, tables)
            && let Err(e) = k.apply(&plan, tables)
        {
            self.relay.abandon(prepared);
            return Err(e.context("updating the kernel tables"));
        }
        self.relay.apply(&plan, prepared);
        self.relay.refresh_udp_limit();
        // Changed rules have fresh ids: their checks restart with the new settings.
        self.relay.health().sync(&plan.next.listeners);
        let summary = plan.summary();
        *self.running.write().unwrap_or_else(|e| e.into_inner()) = plan.next;
        // The names in force, or their answers, may be others now.
        self.names_changed.notify_one();
        Ok(summary)
    }

    /// With no kernel path running, rules that require it are refused and
    /// rules that could use it are carried by the relay until a restart.
    fn without_kernel_path(&self, plan: &mut Plan) -> anyhow::Result<()> {
        let new = plan.added.iter().chain(plan.changed.iter().map(|(_, l)| l));
        let mut could = Vec::new();
        for l in new {
            if let Some(why) = l.needs_kernel() {
                bail!(
                    "rule `{}` has {why}, but this daemon runs without the kernel path{}",
                    l.alias,
                    if self.relay_only {
                        " (--relay-only)"
                    } else {
                        "; restart it to load the kernel path"
                    }
                );
            }
            let kernel_capable = plan
                .next
                .kernel
                .values()
                .any(|v| v.rule_id == l.rule_id && v.flags & RULE_F_RELAY == 0);
            if !self.relay_only && kernel_capable {
                could.push(l.alias.clone());
            }
        }
        if !could.is_empty() {
            plan.needs_restart.push(format!(
                "the kernel path (not loaded at start) for {}: the relay carries them",
                could.join(", ")
            ));
        }
        Ok(())
    }
}

/// The value once every other clone is gone. A control answer already
/// under way at stop (`status` polled by a watcher) holds one for a moment.
async fn sole_owner<T>(mut shared: Arc<T>) -> Result<T, Arc<T>> {
    for _ in 0..200 {
        match Arc::try_unwrap(shared) {
            Ok(value) => return Ok(value),
            Err(again) => shared = again,
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Arc::try_unwrap(shared)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn docker_setting(s: &Option<config::DockerSettings>) -> String {
    match s {
        Some(s) => format!("socket {}", s.socket.display()),
        None => "off".into(),
    }
}

/// The file unchanged but for what its names resolve to: the same rules,
/// settings included, with other backends.
fn only_backends_changed(running: &Compiled, plan: &Plan) -> bool {
    let same_settings = running.relay == plan.next.relay
        && running.dns == plan.next.dns
        && running.metrics == plan.next.metrics;
    same_settings
        && plan.added.is_empty()
        && plan.removed.is_empty()
        && plan.needs_restart.is_empty()
        && plan.changed.iter().all(|(old, new)| {
            let as_old = crate::rules::Listener {
                rule_id: old.rule_id,
                backends: old.backends.clone(),
                ..new.clone()
            };
            as_old == *old
        })
}

/// What the name follower said last, so that it says each thing once.
#[derive(Default)]
struct NameWatch {
    failing: BTreeSet<String>,
    unusable: Option<String>,
}

impl NameWatch {
    fn failed(&mut self, name: &str, why: &std::io::Error, retry: Duration) {
        if self.failing.insert(name.to_owned()) {
            warn!(
                "names: {name} does not resolve ({why}); its last answer stays until it \
                 resolves again (next try in {}, then less often)",
                config::format_duration(retry)
            );
        }
    }

    fn resolved(&mut self, name: &str) {
        if self.failing.remove(name) {
            info!("names: {name} resolves again");
        }
    }

    fn unusable(&mut self, errors: &str) {
        if self.unusable.as_deref() != Some(errors) {
            for line in errors.lines() {
                warn!("names: {line}");
            }
            warn!("names: the last usable answers stay");
            self.unusable = Some(errors.to_owned());
        }
    }

    fn usable(&mut self) {
        if self.unusable.take().is_some() {
            info!("names: the answers are usable again");
        }
    }
}

/// Looks each target hostname up again when its answer lapses (its TTL
/// within `dns.min_ttl`..`dns.max_ttl`, or `dns.refresh` from /etc/hosts).
async fn follow_names(daemon: Arc<Daemon>) {
    let mut schedule = names::Schedule::default();
    let mut watch = NameWatch::default();
    loop {
        let changed = daemon.names_changed.notified();
        let (hostnames, dns) = {
            let running = daemon.running();
            (running.hostnames.clone(), running.dns)
        };
        schedule.follow(&hostnames, &dns, Instant::now());
        match schedule.next() {
            None => {
                changed.await;
                continue;
            }
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(at.into()) => {}
                () = changed => continue,
            },
        }
        let mut lookups = tokio::task::JoinSet::new();
        for name in schedule.due(Instant::now()) {
            lookups.spawn(async move {
                let answer = names::lookup(&name).await;
                (name, answer)
            });
        }
        let mut fresh = BTreeMap::new();
        for (name, answer) in lookups.join_all().await {
            match answer {
                Ok(answer) => {
                    watch.resolved(&name);
                    schedule.answered(&name, &answer, &dns, Instant::now());
                    fresh.insert(name, answer);
                }
                Err(e) => {
                    if let Some(retry) = schedule.failed(&name, &dns, Instant::now()) {
                        watch.failed(&name, &e, retry);
                    }
                }
            }
        }
        if !fresh.is_empty() {
            daemon.refresh_names(fresh, &mut watch).await;
        }
    }
}

fn reload_fn(daemon: Arc<Daemon>) -> ReloadFn {
    Arc::new(move || {
        let daemon = daemon.clone();
        Box::pin(async move { daemon.reload().await.to_json() })
    })
}

/// The signals the daemon acts on.
enum Signal {
    Stop(&'static str),
    Reload,
    Upgrade,
    /// `forwarder upgrade`, waiting on this connection for the outcome.
    UpgradeAsked(std::os::unix::net::UnixStream),
}

/// SIGTERM, SIGINT and SIGQUIT stop the daemon cleanly; SIGHUP reloads the
/// rule file. SIGUSR2 is caught so that it cannot end the process without
/// the clean stop.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        let on = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("listen for {name}"))
        };
        Ok(Signals {
            term: on(SignalKind::terminate(), "SIGTERM")?,
            int: on(SignalKind::interrupt(), "SIGINT")?,
            quit: on(SignalKind::quit(), "SIGQUIT")?,
            hup: on(SignalKind::hangup(), "SIGHUP")?,
            usr2: on(SignalKind::user_defined2(), "SIGUSR2")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.quit.recv() => Signal::Stop("SIGQUIT"),
            _ = self.hup.recv() => Signal::Reload,
            _ = self.usr2.recv() => Signal::Upgrade,
        }
    }
}

/// The socket-lookup program that steers port ranges to the relay,
/// loaded when a rule is a range; without it such a rule cannot run.
/// An upgrade's handed-over steering is adopted (it stays attached); if
/// that fails, a fresh one is loaded and the old one detaches when its
/// descriptors close here.
fn load_steering(
    compiled: &Compiled,
    opts: &RunOptions,
    handed: Option<crate::kernel::SteerRecord>,
) -> Result<Option<Arc<Steering>>, RunError> {
    let Some(range) = compiled.listeners.iter().find(|l| l.ports.is_range()) else {
        if let Some(handed) = handed {
            // No range left to steer: closing them detaches the program.
            for fd in handed.fds() {
                drop(crate::relay::gate::own_fd(fd));
            }
        }
        return Ok(None);
    };
    let adopted = handed.map(|record| {
        Steering::adopt(record).inspect_err(|e| {
            warn!(
                "cannot take over the socket steering of the previous image ({e:#}); loading \
                 it anew: new flows to the ports of ranges may be refused until it is attached"
            )
        })
    });
    let loaded = match adopted {
        Some(Ok(steering)) => {
            info!(
                program = ?steering.program_id(),
                "port ranges: took over the socket steering of the previous image"
            );
            return Ok(Some(Arc::new(steering)));
        }
        _ => Steering::load(),
    };
    match loaded {
        Ok(steering) => {
            info!(
                program = ?steering.program_id(),
                "port ranges: socket lookup steers them to the relay"
            );
            Ok(Some(Arc::new(steering)))
        }
        Err(e) => Err(RunError::Fatal(e.context(format!(
            "rule `{}` in {} is a port range ({} {}-{}), which the relay serves with one \
             socket per protocol steered by a socket-lookup BPF program (sk_lookup), and it \
             cannot be loaded; run as root on a kernel with BPF, or use single ports",
            range.alias,
            opts.config.display(),
            range.protocol,
            range.bind,
            range.ports.last(range.bind.port())
        )))),
    }
}

async fn start_kernel_path(
    compiled: &Compiled,
    opts: &RunOptions,
    docker: bool,
    // The relay's flows when an upgrade's relay started first; also marks
    // this image as the exec'd successor of the one that pinned the kernel path.
    relay_flows: Option<Arc<RelayFlows>>,
    // The old image of an upgrade ran the kernel path.
    had_kernel_path: bool,
) -> Result<Option<KernelPath>, RunError> {
    // A pinned kernel path (an upgrade's predecessor, a dead daemon) is
    // adopted even so: its programs would go on forwarding by its rules.
    if !docker
        && !had_kernel_path
        && !crate::kernel::pinned_here()
        && compiled
            .kernel
            .values()
            .all(|rule| rule.flags & RULE_F_RELAY != 0)
    {
        info!("no rule can use the kernel path (relay-only or local targets): it is not loaded");
        return Ok(None);
    }
    let required_by = compiled
        .listeners
        .iter()
        .find_map(|l| Some((l.alias.clone(), l.needs_kernel()?)));
    let options = StartOptions {
        config_file: Some(opts.config.display().to_string()),
        pin: true,
        successor: relay_flows.is_some(),
        relay_flows,
        ..StartOptions::default()
    };
    match KernelPath::start_with(compiled, &options).await {
        Ok(k) => Ok(Some(k)),
        // What the user must fix, as opposed to a kernel that cannot run BPF.
        Err(e) if e.is::<NoSuchInterface>() => Err(RunError::Fatal(e)),
        Err(e) if e.to_string().starts_with(NEED_ROOT) => Err(RunError::Fatal(anyhow!(
            "{e:#}; run it as root, or pass --relay-only"
        ))),
        Err(e) => match required_by {
            Some((alias, why)) => Err(RunError::Fatal(e.context(format!(
                "rule `{alias}` in {} has {why}, but the kernel path cannot start",
                opts.config.display()
            )))),
            // With a way back, the old image runs on with its kernel path
            // rather than this one without it.
            None if had_kernel_path && crate::upgrade::armed() => Err(RunError::Fatal(
                e.context("cannot start the kernel path, which the running daemon has"),
            )),
            None => {
                warn!("the kernel path cannot start, so the relay carries every flow: {e:#}");
                Ok(None)
            }
        },
    }
}

/// The checks of every rule with `healthcheck`; their changes reach the
/// relay's picks directly and the kernel path's maps through the sink.
fn start_health_checks(
    relay: &Relay,
    kernel: Option<&Arc<KernelPath>>,
    compiled: &Compiled,
    handed: &[crate::health::HealthRecord],
) {
    let health = relay.health();
    if let Some(kernel) = kernel {
        // Weak: the kernel path must be the daemon's alone at stop.
        let kernel = Arc::downgrade(kernel);
        health.set_sink(Arc::new(move |rule_id, healthy| {
            let Some(k) = kernel.upgrade() else { return };
            if let Err(e) = k.set_backend_health(rule_id, healthy) {
                warn!(
                    rule_id,
                    "cannot write backend health to the kernel path: {e:#}"
                );
            }
        }));
    }
    // An upgrade's state first, so that no flow goes to a backend that is down.
    health.restore(&compiled.listeners, handed);
    health.sync(&compiled.listeners);
}

fn stop_kernel_path(kernel: Option<Arc<KernelPath>>) {
    let Some(kernel) = kernel else { return };
    match Arc::try_unwrap(kernel) {
        Ok(k) => {
            if let Err(e) = k.stop() {
                warn!("stopping the kernel path: {e:#}");
            }
        }
        // Unreachable by construction; Drop detaches as a last resort.
        Err(_) => warn!("the kernel path is still shared at stop; detaching on drop"),
    }
}

/// One rule of the status document.
#[derive(serde::Serialize)]
struct StatusRule {
    rule_id: u32,
    alias: String,
    protocol: &'static str,
    bind: String,
    backends: Vec<String>,
    path: &'static str,
    health_check: Option<String>,
    max_connections: Option<u32>,
    health: Vec<crate::health::BackendStatus>,
}

/// The kernel path's part of the status document (`null` without one).
#[derive(serde::Serialize)]
#[serde(untagged)]
enum StatusKernel {
    Counters(crate::kernel::KernelCounters),
    Failed { error: String },
}

/// The status document `forwarder status` prints.
#[derive(serde::Serialize)]
struct StatusDoc {
    pid: u32,
    uptime_ms: u64,
    process: serde_json::Value,
    config: String,
    kernel_path: bool,
    rules: Vec<StatusRule>,
    relay: Vec<crate::relay::RelayRuleCounters>,
    relay_udp_sessions: crate::relay::UdpSessionsStatus,
    kernel: Option<StatusKernel>,
    docker: Option<crate::docker::DiscoveryStatus>,
}

/// Takes the status document, written to the client as it is serialized:
/// a `serde_json::Value` of 10,000 rules' counters would take about
/// 100 MiB of short-lived maps, its text 17 MB.
fn status_fn(daemon: Arc<Daemon>) -> StatusFn {
    Arc::new(move || {
        let process = match crate::process::Footprint::now() {
            Ok(f) => serde_json::to_value(f).unwrap_or_default(),
            Err(e) => serde_json::json!({ "error": format!("{e}") }),
        };
        let relay = daemon.relay.counters();
        let kernel = daemon.kernel.as_ref().map(|k| match k.counters() {
            Ok(c) => StatusKernel::Counters(c),
            Err(e) => StatusKernel::Failed {
                error: format!("{e:#}"),
            },
        });
        let health = daemon.relay.health();
        let rules: Vec<_> = daemon
            .running()
            .listeners
            .iter()
            .map(|l| StatusRule {
                rule_id: l.rule_id,
                alias: l.alias.clone(),
                protocol: l.protocol.as_str(),
                bind: l.listen_text(),
                backends: l.backends.iter().map(|b| b.addr.to_string()).collect(),
                path: l.path.as_str(),
                health_check: l.health.as_ref().map(crate::health::describe),
                max_connections: (l.protocol == crate::rules::Protocol::Tcp)
                    .then(|| l.connection_limit()),
                health: health.status(l.rule_id),
            })
            .collect();
        let docker = daemon
            .docker_settings()
            .map(|_| lock(&daemon.discovery).clone());
        let doc = StatusDoc {
            pid: std::process::id(),
            uptime_ms: daemon.started.elapsed().as_millis() as u64,
            process,
            config: daemon.config.display().to_string(),
            kernel_path: daemon.kernel.is_some(),
            rules,
            relay,
            relay_udp_sessions: daemon.relay.udp_sessions(),
            kernel,
            docker,
        };
        Box::new(move |w: &mut dyn std::io::Write| {
            serde_json::to_writer(w, &doc).map_err(std::io::Error::from)
        })
    })
}
