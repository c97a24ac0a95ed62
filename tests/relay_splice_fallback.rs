//! Where the kernel refuses splice(2), the relay copies through a buffer:
//! the daemon runs under a seccomp filter that fails every splice with
//! EINVAL, and a transfer still arrives intact.

use std::io;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;

use crate::common::harness::{Daemon, in_netns};
use crate::common::traffic::{BackendServers, tcp_hash_transfer};
use crate::common::{self, Netns};

/// Installs a seccomp filter on the calling process: splice(2) fails with
/// EINVAL, everything else is allowed. Inherited across exec.
fn refuse_splice() -> io::Result<()> {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let filter = [
        // A = seccomp_data.nr
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_splice as u32,
        },
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EINVAL as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a filter that outlives the call; only this
    // (forked, about to exec) process is affected.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &raw const prog,
            ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

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
        unsafe { cmd.pre_exec(refuse_splice) };
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
