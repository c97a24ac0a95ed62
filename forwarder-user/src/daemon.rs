//! `forwarder run`: load the rules, start the kernel path and the relay,
//! answer status queries, and stop cleanly on SIGINT or SIGTERM.
//!
//! Order matters: the rule file is validated whole before anything is
//! touched; the kernel path starts before the relay binds, so the relay
//! observer exists before the first relay flow; a failure at any step
//! undoes the steps before it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use forwarder_common::RULE_F_RELAY;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::config;
use crate::control::{ControlSocket, StatusFn};
use crate::kernel::{KernelPath, NEED_ROOT, NoSuchInterface, StartOptions};
use crate::relay::Relay;
use crate::rules::{Compiled, FlowObserver, NoKernelPath};

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
    let compiled = config::load(&opts.config).map_err(RunError::Config)?;
    let kernel = if opts.relay_only {
        info!("relay only (--relay-only): the kernel path is not loaded");
        None
    } else {
        start_kernel_path(&compiled, &opts).await?
    };
    let observer: Arc<dyn FlowObserver> = match &kernel {
        Some(k) => k.observer(),
        None => Arc::new(NoKernelPath),
    };
    let kernel = kernel.map(Arc::new);

    let relay = match Relay::start(&compiled.listeners, compiled.relay, observer).await {
        Ok(relay) => Arc::new(relay),
        Err(e) => {
            stop_kernel_path(kernel);
            return Err(e.into());
        }
    };
    let control = match ControlSocket::bind(&opts.control) {
        Ok(c) => c,
        Err(e) => {
            Arc::try_unwrap(relay)
                .ok()
                .expect("no other owner yet")
                .shutdown(std::time::Duration::ZERO)
                .await;
            stop_kernel_path(kernel);
            return Err(e.into());
        }
    };
    let status = status_fn(&opts, &compiled, relay.clone(), kernel.clone());
    let control_task = tokio::spawn(async move { control.serve(status).await });
    info!(
        rules = compiled.listeners.len(),
        kernel_path = kernel.is_some(),
        control = %opts.control.display(),
        "forwarder running"
    );

    wait_for_stop_signal().await?;

    // Dropping the control socket releases its clones of the relay and kernel path.
    control_task.abort();
    let _ = control_task.await;
    info!(
        drain = ?compiled.relay.drain_timeout,
        "stopping: no new flows; live flows may finish"
    );
    let relay = Arc::try_unwrap(relay).map_err(|_| anyhow!("the relay is still shared at stop"))?;
    relay.shutdown(compiled.relay.drain_timeout).await;
    stop_kernel_path(kernel);
    info!("stopped");
    Ok(())
}

async fn start_kernel_path(
    compiled: &Compiled,
    opts: &RunOptions,
) -> Result<Option<KernelPath>, RunError> {
    if compiled
        .kernel
        .rules
        .iter()
        .all(|(_, rule)| rule.flags & RULE_F_RELAY != 0)
    {
        info!("no rule can use the kernel path (relay-only or local targets): it is not loaded");
        return Ok(None);
    }
    let required_by = compiled
        .listeners
        .iter()
        .find(|l| l.path.requires_kernel())
        .map(|l| l.alias.clone());
    let options = StartOptions {
        config_file: Some(opts.config.display().to_string()),
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
            Some(alias) => Err(RunError::Fatal(e.context(format!(
                "rule `{alias}` in {} has `path: kernel`, but the kernel path cannot start",
                opts.config.display()
            )))),
            None => {
                warn!("the kernel path cannot start, so the relay carries every flow: {e:#}");
                Ok(None)
            }
        },
    }
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

/// Waits for SIGTERM, SIGINT or SIGQUIT. SIGHUP, which would end the
/// process without the clean stop (leaving the reserved ports behind), is
/// answered with a warning: the rule file is read only at start.
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    let mut quit = signal(SignalKind::quit()).context("listen for SIGQUIT")?;
    let mut hup = signal(SignalKind::hangup()).context("listen for SIGHUP")?;
    loop {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
            _ = quit.recv() => info!("SIGQUIT"),
            _ = hup.recv() => {
                warn!("SIGHUP: reloading is not supported yet; restart the daemon to apply a changed rule file");
                continue;
            }
        }
        return Ok(());
    }
}

/// The status document `forwarder status` prints.
fn status_fn(
    opts: &RunOptions,
    compiled: &Compiled,
    relay: Arc<Relay>,
    kernel: Option<Arc<KernelPath>>,
) -> StatusFn {
    let config = opts.config.display().to_string();
    let listeners = compiled.listeners.clone();
    Arc::new(move || {
        let relay_counters = serde_json::to_value(relay.counters()).unwrap_or_default();
        let kernel_counters = match &kernel {
            Some(k) => match k.counters() {
                Ok(c) => serde_json::to_value(c).unwrap_or_default(),
                Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
            },
            None => serde_json::Value::Null,
        };
        let rules: Vec<_> = listeners
            .iter()
            .map(|l| {
                serde_json::json!({
                    "rule_id": l.rule_id,
                    "alias": l.alias,
                    "protocol": l.protocol.as_str(),
                    "bind": l.bind.to_string(),
                    "backends": l.backends.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>(),
                    "path": l.path.as_str(),
                })
            })
            .collect();
        serde_json::json!({
            "pid": std::process::id(),
            "config": config,
            "kernel_path": kernel.is_some(),
            "rules": rules,
            "relay": relay_counters,
            "kernel": kernel_counters,
        })
    })
}
