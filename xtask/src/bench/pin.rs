//! Where the traffic's ends run. On two cores the scheduler would otherwise
//! sometimes put sender and receiver on one core and sometimes on two, and
//! a round trip takes ~8 µs or ~100 µs (a cross-core wake-up in this VM)
//! depending on that alone. So the two ends always sit on different cores,
//! as on two machines: the client's tools on the first CPU, the backend's on
//! the last. Proxies, the daemon and the kernel run wherever the scheduler
//! puts them, alike for every contender.
use std::process::Command;

use anyhow::{Result, bail};

use super::netns::Netns;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// The CPU of `side`; None on a single core.
pub fn cpu(side: Side) -> Option<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    match (n, side) {
        (1, _) => None,
        (_, Side::Client) => Some(0),
        (_, Side::Backend) => Some(n - 1),
    }
}

/// `program` in `ns`, on `side`'s CPU.
pub fn command(ns: &Netns, side: Side, program: &str) -> Command {
    match cpu(side) {
        Some(cpu) => {
            let mut cmd = ns.command("taskset");
            cmd.args(["-c", &cpu.to_string(), program]);
            cmd
        }
        None => ns.command(program),
    }
}

/// Pins the calling thread to `side`'s CPU.
pub fn this_thread(side: Side) -> Result<()> {
    let Some(cpu) = cpu(side) else {
        return Ok(());
    };
    // SAFETY: a zeroed cpu_set_t is a valid empty set; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pin to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}
