//! Where the kernel refuses splice(2), the relay copies through a buffer:
//! the daemon runs under a seccomp filter that fails every splice with
//! EINVAL, and a transfer still arrives intact.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;

use crate::common::harness::{Daemon, in_netns};
use crate::common::seccomp::fail_syscall;
use crate::common::traffic::{BackendServers, tcp_hash_transfer};
use crate::common::{self, Netns};

#[test]
fn where_splice_is_refused_the_relay_copies_through_a_buffer() {
    if !common::require_root("where_splice_is_refused_the_relay_copies_through_a_buffer") {
        return;
    }
    let ns = Netns::new("splice");
    let _servers = BackendServers::start(&ns);
    let yaml = "routes:\n  bulk: {scheme: tcp, bind: 127.0.0.1, port: 7878:3478}\n";
    let daemon = Daemon::start_with(&ns, "nosplice", yaml, "info,forwarder=debug", |cmd| {
        cmd.arg("--relay-only");
        // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
        unsafe { cmd.pre_exec(|| fail_syscall(libc::SYS_splice, libc::EINVAL)) };
    });
    let size: u64 = 16 << 20;
    let to = SocketAddr::from(([127, 0, 0, 1], 7878));
    let (sent, received) = in_netns(&ns, || tcp_hash_transfer(to, size));
    assert_eq!(sent, received, "SHA-256 of the 16 MiB at the backend");
    let log = daemon.stop();
    assert!(
        log.contains("splice refused for this flow; copying through a buffer"),
        "the buffered copy carried it:\n{log}"
    );
}
