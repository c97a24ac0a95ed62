//! The kernel path, userspace side: loading, attaching and feeding the BPF programs.
//!
//! [`KernelPath::start`] loads the embedded object, attaches the TC and XDP
//! programs to the interfaces and runs the log reader; [`KernelPath::stop`]
//! (or dropping it) takes everything off again.

mod attach;
mod counters;
mod interfaces;
mod load;
mod log;
mod qdisc;

use tokio::task::JoinHandle;

pub use attach::{TC_PROGRAM, TcAttach, XDP_PROGRAM};
pub use counters::{InterfaceCounters, KernelCounters};
pub use interfaces::{Interface, NoSuchInterface};
pub use load::NEED_ROOT;

use crate::rules::Compiled;
use attach::Attached;
use counters::CounterMaps;

/// The eBPF object built by `cargo xtask build`, embedded at compile time.
/// Empty when this binary was built without it (relay only).
#[cfg(forwarder_ebpf)]
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder.bpf.o"));
#[cfg(not(forwarder_ebpf))]
pub static EBPF_OBJECT: &[u8] = &[];

/// Choices beyond the rule table.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// The rule file, named in errors about its `interfaces:`.
    pub config_file: Option<String>,
    /// How TC is attached; `Auto` unless testing the netlink way.
    pub tc_attach: TcAttach,
}

/// The running kernel path. Dropping it detaches everything (best effort);
/// [`KernelPath::stop`] does the same and reports failures.
pub struct KernelPath {
    counters: CounterMaps,
    interfaces: Vec<Interface>,
    tasks: Vec<JoinHandle<()>>,
    /// Last field: dropped after the tasks are aborted.
    attached: Option<Attached>,
}

impl KernelPath {
    /// Loads EBPF_OBJECT, attaches TC ingress + XDP to the interfaces and
    /// spawns the log reader on the current tokio runtime. On any error
    /// nothing stays attached or changed.
    pub async fn start(compiled: &Compiled) -> anyhow::Result<KernelPath> {
        Self::start_with(compiled, &StartOptions::default()).await
    }

    /// [`KernelPath::start`] with [`StartOptions`].
    pub async fn start_with(
        compiled: &Compiled,
        options: &StartOptions,
    ) -> anyhow::Result<KernelPath> {
        load::check_object()?;
        load::check_privileges()?;
        let interfaces = interfaces::resolve(
            compiled.interfaces.as_deref(),
            options.config_file.as_deref(),
        )?;
        if interfaces.is_empty() {
            anyhow::bail!(
                "no interface to attach the kernel path to: none is up apart from loopback \
                 (name them in `interfaces:`)"
            );
        }
        let sizes = load::Sizes {
            conntrack: compiled.kernel_settings.conntrack_size.max(2),
            relay_flows: compiled.kernel_settings.conntrack_size.max(2),
        };
        let mut ebpf = load::load(sizes)?;
        let mut tasks = Vec::new();
        let result = (|| {
            tasks.push(log::spawn(&mut ebpf)?);
            let counters = CounterMaps::take(&mut ebpf)?;
            Attached::load_programs(&mut ebpf)?;
            let attached = Attached::attach(ebpf, &interfaces, options.tc_attach)?;
            anyhow::Ok((counters, attached))
        })();
        let (counters, attached) = match result {
            Ok(parts) => parts,
            Err(e) => {
                for task in &tasks {
                    task.abort();
                }
                return Err(e);
            }
        };
        let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
        tracing::info!("kernel path attached to {}", names.join(", "));
        Ok(KernelPath {
            counters,
            interfaces,
            tasks,
            attached: Some(attached),
        })
    }

    /// The interfaces the programs are attached to.
    pub fn interfaces(&self) -> &[Interface] {
        &self.interfaces
    }

    /// Per-interface counters, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<KernelCounters> {
        self.counters.read(&self.interfaces)
    }

    /// Detaches everything and unloads the programs.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_tasks();
        let result = match self.attached.take() {
            Some(attached) => attached.detach(),
            None => Ok(()),
        };
        if result.is_ok() {
            tracing::info!("kernel path detached");
        }
        result
    }

    fn stop_tasks(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for KernelPath {
    fn drop(&mut self) {
        self.stop_tasks();
        // `attached` detaches in its own Drop.
    }
}

#[cfg(test)]
mod testrun;
