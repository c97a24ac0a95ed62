//! Socket steering for port ranges: the `sk_lookup` program sends every
//! port of a range rule to that rule's one relay socket per protocol.
//!
//! It matches a packet's (local address, protocol, port) in its own copy of
//! the `RANGES` trie (layout and entries as in [`crate::ranges`]) and
//! assigns the socket at the rule's id in [`STEER_SOCKETS_MAP`]. Only
//! packets that reach socket lookup are steered: established sockets (an
//! accepted TCP connection, a connected UDP socket) are found before it
//! runs, and flows TC rewrote never look for a local socket.

/// Name of the `SOCKMAP` indexed by rule id: the relay socket of each range rule.
pub const STEER_SOCKETS_MAP: &str = "STEER_SOCKETS";
/// Entries of [`STEER_SOCKETS_MAP`]: one per rule id.
pub const STEER_SOCKETS_SIZE: u32 = crate::RULE_IDS;
/// Name of the program, as the object and `bpftool` show it.
pub const STEER_PROGRAM: &str = "forwarder_steer";

/// `bpf_sk_lookup.family` values.
pub const FAMILY_V4: u32 = 2;
pub const FAMILY_V6: u32 = 10;
