//! The control socket: a running daemon answers `forwarder status` here.
//!
//! A Unix stream socket; each connection gets one JSON document (the
//! status) and is closed. Only root can connect (mode 0600).

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

pub const DEFAULT_SOCKET: &str = "/run/forwarder.sock";

/// Produces the status document on demand.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

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

    /// Answers every connection with the current status, until dropped.
    pub async fn serve(&self, status: StatusFn) {
        loop {
            let mut stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: retrying at once would spin.
                    tracing::debug!("control socket accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let mut body = status().to_string();
            body.push('\n');
            tokio::spawn(async move {
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Asks the daemon at `path` for its status.
pub fn query(path: &Path) -> Result<serde_json::Value> {
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
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .with_context(|| format!("read the status from {}", path.display()))?;
    serde_json::from_str(&body)
        .with_context(|| format!("the status from {} is not JSON", path.display()))
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
            serde_json::json!({ "calls": n })
        });
        let server = tokio::spawn(async move {
            socket.serve(status).await;
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
