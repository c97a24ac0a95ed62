//! The programs' aya-log records, forwarded to `tracing`.
//!
//! aya-log speaks the `log` crate; [`TracingLog`] turns each record into a
//! `tracing` event under the target `forwarder::ebpf`. The reader must stay
//! alive while the programs run: dropping it closes the ring buffer.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

/// The `AYA_LOG_LEVEL` value for the level `tracing` lets through, so that
/// the programs do not even write records nobody reads.
pub fn ebpf_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => aya_log::Level::Error as u8,
        LevelFilter::WARN => aya_log::Level::Warn as u8,
        LevelFilter::INFO => aya_log::Level::Info as u8,
        LevelFilter::DEBUG => aya_log::Level::Debug as u8,
        _ => aya_log::Level::Trace as u8,
    }
}

/// A `log::Log` that re-emits records as `tracing` events.
pub struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "forwarder::ebpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "forwarder::ebpf", "{message}"),
            log::Level::Info => tracing::info!(target: "forwarder::ebpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "forwarder::ebpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "forwarder::ebpf", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Takes the log ring buffer out of `ebpf` and forwards its records from a
/// task on the current runtime until the task is aborted.
pub fn spawn(ebpf: &mut Ebpf) -> anyhow::Result<JoinHandle<()>> {
    let logger = EbpfLogger::init_with_logger(ebpf, TracingLog)
        .map_err(|e| anyhow::anyhow!("cannot read the eBPF programs' logs: {e}"))?;
    // SAFETY: the logger owns its ring buffer descriptor and keeps it open
    // for as long as the AsyncFd holds the logger.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll the eBPF programs' log buffer: {e}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut ready) = logger.readable_mut().await else {
                tracing::warn!(
                    "the eBPF log buffer cannot be polled any more; its records are lost"
                );
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }))
}
