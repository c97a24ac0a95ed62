//! Name resolution inside a test's namespace: files that `ip netns exec`
//! puts over /etc (hosts, resolv.conf), and a small authoritative DNS
//! server whose answer and TTL the test sets and whose queries it counts.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::Netns;
use super::harness::in_netns;

/// `/etc/netns/NAME/` for `ns`: each file in it is bind-mounted over the
/// same name in /etc for commands started with `ip netns exec` (the
/// daemon). Removed (with the directory) on drop.
pub struct NetnsEtc {
    dir: PathBuf,
}

impl NetnsEtc {
    pub fn new(ns: &Netns) -> NetnsEtc {
        let dir = PathBuf::from("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        NetnsEtc { dir }
    }

    /// Writes `/etc/netns/NAME/FILE` in place: a daemon already running
    /// sees it through a bind mount of this very file, so it must keep its
    /// inode.
    pub fn set(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join(file), text).unwrap();
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // /etc/netns itself stays only if something else is in it.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

/// What the server answers for its one name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    /// An A record with this TTL (seconds).
    A(Ipv4Addr, u32),
    /// NXDOMAIN: the name is gone (one query per lookup; a resolver may
    /// ask again at once after a SERVFAIL).
    Gone,
}

struct State {
    zone: Zone,
    /// When each A query for the name arrived.
    queries: Vec<Instant>,
}

/// An authoritative DNS server on UDP for one name, in a namespace; other
/// names are NXDOMAIN. Stopped on drop.
pub struct TestDns {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestDns {
    pub fn start(ns: &Netns, at: SocketAddr, name: &str, zone: Zone) -> TestDns {
        let socket = in_netns(ns, || UdpSocket::bind(at).unwrap());
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let name = Name::from_str(&format!("{name}.")).unwrap();
        let state = Arc::new(Mutex::new(State {
            zone,
            queries: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || serve(&socket, &name, &state, &stop))
        };
        TestDns {
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// What the name is answered with from now on.
    pub fn set(&self, zone: Zone) {
        self.state.lock().unwrap().zone = zone;
    }

    /// When the A queries for the name arrived, in order.
    pub fn queries(&self) -> Vec<Instant> {
        self.state.lock().unwrap().queries.clone()
    }

    /// Waits (at most `limit`) for the next A query after the ones seen
    /// so far; its arrival time.
    pub fn next_query(&self, limit: Duration) -> Instant {
        let seen = self.queries().len();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(&at) = self.queries().get(seen) {
                return at;
            }
            assert!(Instant::now() < deadline, "no query in {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: &UdpSocket, name: &Name, state: &Mutex<State>, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.authoritative = true;
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        let mut state = state.lock().unwrap();
        for q in &query.queries {
            reply.add_query(q.clone());
            if q.name() != name {
                reply.metadata.response_code = ResponseCode::NXDomain;
                continue;
            }
            if q.query_type() != RecordType::A {
                continue;
            }
            state.queries.push(Instant::now());
            match state.zone {
                Zone::A(ip, ttl) => {
                    reply.add_answer(Record::from_rdata(name.clone(), ttl, RData::A(A(ip))));
                }
                Zone::Gone => reply.metadata.response_code = ResponseCode::NXDomain,
            }
        }
        drop(state);
        let _ = socket.send_to(&reply.to_vec().unwrap(), from);
    }
}
