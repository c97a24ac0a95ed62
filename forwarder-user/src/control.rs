//! The control socket: a running daemon answers `forwarder status` and
//! `forwarder reload` here.
//!
//! A Unix stream socket. The client writes one request line (`status` or
//! `reload`; nothing at all means `status`), and gets one JSON document
//! back before the socket closes. Only root can connect (mode 0600).

use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub const DEFAULT_SOCKET: &str = "/run/forwarder.sock";

/// Writes one status document as JSON: what `StatusFn` took, owned, so
/// that no lock is held while a slow client reads.
pub type StatusWriter = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + Send>;

/// Takes the status on demand; its document is written straight to the
/// socket (10,000 rules make 17 MB of text, never held whole).
pub type StatusFn = Arc<dyn Fn() -> StatusWriter + Send + Sync>;

/// How long a client may take to read its answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// Reloads the rule file and answers with what happened.
pub type ReloadFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = serde_json::Value> + Send>> + Send + Sync>;

/// Takes the connection of an `upgrade` request: the daemon answers on it
/// when the upgrade failed, the new image when it succeeded.
pub type UpgradeFn = Arc<dyn Fn(StdUnixStream) + Send + Sync>;

/// What the daemon answers on its control socket.
#[derive(Clone)]
pub struct Handlers {
    pub status: StatusFn,
    pub reload: ReloadFn,
    pub upgrade: Option<UpgradeFn>,
}

/// How long a client may take to send its request line.
const REQUEST_WAIT: Duration = Duration::from_secs(1);

/// The bound socket; the file is removed on drop.
pub struct ControlSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ControlSocket {
    /// Binds `path`. A stale socket (no daemon answers) is replaced; a live
    /// one means another forwarder runs there, which is an error.
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        if path.exists() {
            if StdUnixStream::connect(path).is_ok() {
                bail!(
                    "another forwarder is running: its control socket {} answers (stop it, or pass --control PATH)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("remove the stale control socket {}", path.display()))?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("bind the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restrict {}", path.display()))?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            listener,
        })
    }

    /// The socket an upgrade handed over (bound at `path` already).
    pub fn inherit(path: &Path, fd: std::os::fd::OwnedFd) -> Result<ControlSocket> {
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            listener: UnixListener::from_std(listener)
                .with_context(|| format!("take over the control socket {}", path.display()))?,
        })
    }

    /// The listening descriptor, for an upgrade's record.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.listener)
    }

    /// Answers every connection, until dropped.
    pub async fn serve(&self, handlers: Handlers) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: retrying at once would spin.
                    tracing::debug!("control socket accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            tokio::spawn(answer(stream, handlers.clone()));
        }
    }
}

async fn answer(stream: UnixStream, handlers: Handlers) {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    // A client that sends nothing (or is slow to) asks for the status.
    let _ = tokio::time::timeout(REQUEST_WAIT, stream.read_line(&mut line)).await;
    let mut body = match line.trim() {
        "" | "status" => {
            let write = (handlers.status)();
            if let Ok(std) = stream.into_inner().into_std() {
                let _ = tokio::task::spawn_blocking(move || write_status(std, write)).await;
            }
            crate::process::release_free_memory();
            return;
        }
        "reload" => (handlers.reload)().await.to_string(),
        "upgrade" => match (&handlers.upgrade, stream.into_inner().into_std()) {
            (Some(upgrade), Ok(std)) => {
                let _ = std.set_nonblocking(false);
                return upgrade(std);
            }
            _ => return,
        },
        other => serde_json::json!({
            "error": format!("unknown request {other:?}: `status`, `reload` or `upgrade`")
        })
        .to_string(),
    };
    body.push('\n');
    let mut stream = stream.into_inner();
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
    drop(body);
    crate::process::release_free_memory();
}

/// Writes the status to the client, blocking (on a blocking thread).
fn write_status(stream: StdUnixStream, write: StatusWriter) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(ANSWER_WAIT))?;
    let mut out = io::BufWriter::with_capacity(64 << 10, &stream);
    write(&mut out)?;
    out.write_all(b"\n")?;
    out.flush()?;
    drop(out);
    stream.shutdown(std::net::Shutdown::Write)
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Asks the daemon at `path` for its status.
pub fn query(path: &Path) -> Result<serde_json::Value> {
    request(path, "status", Duration::from_secs(5))
}

/// Sends `what` to the daemon at `path` and reads its answer, waiting at
/// most `wait` for it.
pub fn request(path: &Path, what: &str, wait: Duration) -> Result<serde_json::Value> {
    let mut stream = StdUnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no forwarder is running at {} ({e}); start one with `forwarder run -c FILE`",
            path.display()
        ),
        io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "not allowed to read {}: run `forwarder status` as root",
            path.display()
        ),
        _ => anyhow::anyhow!("cannot reach the forwarder at {}: {e}", path.display()),
    })?;
    stream
        .write_all(format!("{what}\n").as_bytes())
        .with_context(|| format!("send {what:?} to {}", path.display()))?;
    stream.set_read_timeout(Some(wait))?;
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .with_context(|| format!("read the answer to {what:?} from {}", path.display()))?;
    serde_json::from_str(&body)
        .with_context(|| format!("the answer from {} is not JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("forwarder-test-{}-{name}.sock", std::process::id()))
    }

    #[tokio::test]
    async fn serves_the_status_and_removes_the_socket() {
        let path = temp_socket("serve");
        let socket = ControlSocket::bind(&path).unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = calls.clone();
        let status: StatusFn = Arc::new(move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::new(move |w: &mut dyn Write| {
                serde_json::to_writer(w, &serde_json::json!({ "calls": n }))
                    .map_err(io::Error::from)
            })
        });
        let reload: ReloadFn =
            Arc::new(|| Box::pin(async { serde_json::json!({ "reloaded": true }) }));
        let server = tokio::spawn(async move {
            socket
                .serve(Handlers {
                    status,
                    reload,
                    upgrade: None,
                })
                .await;
        });
        let p = path.clone();
        let first = tokio::task::spawn_blocking(move || query(&p))
            .await
            .unwrap()
            .unwrap();
        let p = path.clone();
        let second = tokio::task::spawn_blocking(move || query(&p))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first["calls"], 0);
        assert_eq!(second["calls"], 1);
        let p = path.clone();
        let reloaded =
            tokio::task::spawn_blocking(move || request(&p, "reload", Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(reloaded["reloaded"], true);
        let p = path.clone();
        let unknown =
            tokio::task::spawn_blocking(move || request(&p, "dance", Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap();
        assert!(unknown["error"].as_str().unwrap().contains("\"dance\""));
        // A client that only reads (an older `forwarder status`) gets the status.
        let p = path.clone();
        let silent = tokio::task::spawn_blocking(move || {
            let mut s = StdUnixStream::connect(&p).unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(silent["calls"], 2);
        // A second daemon on the same socket is refused while the first answers.
        let err = ControlSocket::bind(&path)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("another forwarder is running"), "{err}");
        server.abort();
        let _ = server.await;
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_no_daemon_is_a_clear_error() {
        let path = temp_socket("stale");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let err = query(&path).unwrap_err().to_string();
        assert!(err.contains("no forwarder is running"), "{err}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let socket = ControlSocket::bind(&path).unwrap();
            drop(socket);
        });
        assert!(!path.exists());
    }
}
