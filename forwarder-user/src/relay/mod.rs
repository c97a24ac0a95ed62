//! The relay path: userspace TCP and UDP forwarding for every rule.
