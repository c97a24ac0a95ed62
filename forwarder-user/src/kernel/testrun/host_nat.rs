//! The host's own NAT beside ours: the egress program notes the ports the
//! host sends from, the SNAT allocator skips them, and a host flow on a
//! tuple a kernel flow holds is moved to a free port and back.

use forwarder_common::host_nat::{
    CT_DIR_HOST_IN, CT_DIR_HOST_OUT, FORWARDED_MARK, HOST_PORTS_MAP, HostPortKey,
};
use forwarder_common::{PROTO_TCP, PROTO_UDP};

use super::fixture::*;
use super::icmp::{CODE_PORT, ICMP_UNREACH, after_hops, assert_checksums, error};
use super::packet::{Csum, ETH_LEN, Spec, TCP_ACK, TCP_SYN, ip_csum_ok, l4_csum_ok, view};
use super::*;
use crate::kernel::snat::addr_of;
use crate::kernel::tables::Tables;

/// Two SNAT ports, 40000 and 40001, every one probed.
fn two_ports() -> Tables {
    let mut t = standard(0);
    t.settings.snat_port_min = 40000;
    t.settings.snat_port_max = 40001;
    t.settings.snat_probe_limit = 2;
    t
}

/// A packet the host sends to the backend from our SNAT address's `port`.
fn from_host(proto: u8, port: u16) -> Spec {
    match proto {
        PROTO_TCP => Spec::tcp((SNAT, port), (BACKEND, BACKEND_PORT), TCP_SYN),
        _ => Spec::udp((SNAT, port), (BACKEND, BACKEND_PORT)),
    }
}

/// A new UDP flow from the client's `cport`: the SNAT port it got, or
/// `None` if it went to the relay.
fn udp_flow(k: &mut Loaded, cport: u16) -> Option<u16> {
    let dgram = Spec::udp(client(cport), listener()).build();
    let out = k.run_tc(&dgram);
    match out.verdict {
        TC_ACT_REDIRECT => Some(assert_forwarded(&out, PROTO_UDP, &dgram)),
        verdict => {
            assert_eq!((verdict, &out.packet), (TC_ACT_UNSPEC, &dgram));
            None
        }
    }
}

#[test]
fn egress_passes_the_kernel_paths_own_packets_and_clears_only_its_mark() {
    if !require_root("egress_passes_the_kernel_paths_own_packets_and_clears_only_its_mark") {
        return;
    }
    with_router(1024, two_ports(), |k| {
        let port = udp_flow(k, 50000).expect("a kernel flow");
        // Its packet as it leaves, marked by the ingress program.
        let sent = from_host(PROTO_UDP, port).build();
        let (out, mark) = k.run_tc_egress(&sent, FORWARDED_MARK | 0x5);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &sent));
        assert_eq!(mark, 0x5, "the other bits of the mark stay");
        assert!(k.host_ports().is_empty(), "{:?}", k.host_ports());
        // Outside the SNAT range the host's packets are not even noted.
        let other = from_host(PROTO_UDP, 39999).build();
        let (out, mark) = k.run_tc_egress(&other, 0x5);
        assert_eq!(
            (out.verdict, &out.packet, mark),
            (TC_ACT_UNSPEC, &other, 0x5)
        );
        assert!(k.host_ports().is_empty());
    });
}

#[test]
fn the_snat_allocator_skips_ports_the_host_uses_toward_the_backend() {
    if !require_root("the_snat_allocator_skips_ports_the_host_uses_toward_the_backend") {
        return;
    }
    with_router(1024, two_ports(), |k| {
        // The host (its NAT, a socket) sends from 40000 to the backend's
        // port, and from 40001 to another port of the backend.
        let host = from_host(PROTO_UDP, 40000).build();
        let (out, _) = k.run_tc_egress(&host, 0);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_UNSPEC, &host));
        let elsewhere = Spec::udp((SNAT, 40001), (BACKEND, 53)).build();
        assert_eq!(k.run_tc_egress(&elsewhere, 0).0.verdict, TC_ACT_UNSPEC);
        let noted: Vec<HostPortKey> = k.host_ports().into_iter().map(|(key, _)| key).collect();
        assert!(noted.contains(&HostPortKey {
            addr: addr_of(BACKEND.into()),
            port: BACKEND_PORT.to_be(),
            sport: 40000u16.to_be(),
            proto: PROTO_UDP,
            _pad: [0; 3],
        }));
        // Whatever the random start, flows get 40001 and then none.
        assert_eq!(udp_flow(k, 50000), Some(40001));
        assert_eq!(udp_flow(k, 50001), None, "40000 is the host's");
        // TCP toward the same backend port is another tuple.
        let syn = Spec::tcp(client(50002), listener(), TCP_SYN).build();
        assert_eq!(k.run_tc(&syn).verdict, TC_ACT_REDIRECT);

        // Past the hold (as long as the host's conntrack keeps an idle
        // UDP flow) the port is ours again.
        let mut map: aya::maps::HashMap<_, HostPortKey, u64> =
            aya::maps::HashMap::try_from(k.ebpf.map_mut(HOST_PORTS_MAP).unwrap()).unwrap();
        let long_ago = crate::kernel::sweeper::monotonic_ns() - 181_000_000_000;
        for key in noted {
            map.insert(key, long_ago, 0).unwrap();
        }
        assert_eq!(udp_flow(k, 50003), Some(40000));
    });
}

/// The host sends on the tuple of a kernel flow: it is moved to the other
/// port, both ways, and the kernel flow goes on as before.
fn host_flow_is_moved(proto: u8) {
    with_router(1024, two_ports(), |k| {
        let ours = match proto {
            PROTO_TCP => {
                let syn = Spec::tcp(client(50000), listener(), TCP_SYN).build();
                assert_forwarded(&k.run_tc(&syn), PROTO_TCP, &syn)
            }
            _ => udp_flow(k, 50000).expect("a kernel flow"),
        };
        let free = if ours == 40000 { 40001 } else { 40000 };

        let host = from_host(proto, ours).build();
        let (out, _) = k.run_tc_egress(&host, 0);
        assert_eq!(out.verdict, TC_ACT_UNSPEC);
        let v = view(&out.packet);
        assert_eq!(
            (v.src, v.sport, v.dst, v.dport, v.ttl),
            (SNAT, free, BACKEND, BACKEND_PORT, view(&host).ttl)
        );
        assert!(ip_csum_ok(&out.packet) && l4_csum_ok(&out.packet));
        let mut dirs: Vec<u8> = k.conntrack().iter().map(|(_, v)| v.direction).collect();
        dirs.sort();
        assert_eq!(dirs, vec![0, 1, CT_DIR_HOST_OUT, CT_DIR_HOST_IN]);
        // Its next packet takes the same port.
        let again = match proto {
            PROTO_TCP => Spec::tcp((SNAT, ours), (BACKEND, BACKEND_PORT), TCP_ACK).build(),
            _ => host.clone(),
        };
        let (out, _) = k.run_tc_egress(&again, 0);
        assert_eq!(view(&out.packet).sport, free);
        assert!(l4_csum_ok(&out.packet));

        // The backend's answer to the moved port goes up the stack with
        // the host's port back, TTL untouched (the stack forwards it);
        // XDP leaves it to TC.
        let flags = TCP_SYN | TCP_ACK;
        let answer = match proto {
            PROTO_TCP => Spec::tcp((BACKEND, BACKEND_PORT), (SNAT, free), flags).build(),
            _ => Spec::udp((BACKEND, BACKEND_PORT), (SNAT, free)).build(),
        };
        let xdp = k.run_xdp(&answer);
        assert_eq!((xdp.verdict, &xdp.packet), (XDP_PASS, &answer));
        let up = k.run_tc(&answer);
        assert_eq!(up.verdict, TC_ACT_UNSPEC);
        let v = view(&up.packet);
        assert_eq!(
            (v.src, v.sport, v.dst, v.dport, v.ttl),
            (BACKEND, BACKEND_PORT, SNAT, ours, view(&answer).ttl)
        );
        assert!(ip_csum_ok(&up.packet) && l4_csum_ok(&up.packet));

        // The kernel flow's own answer still goes to its client.
        let to_client = match proto {
            PROTO_TCP => Spec::tcp((BACKEND, BACKEND_PORT), (SNAT, ours), flags).build(),
            _ => Spec::udp((BACKEND, BACKEND_PORT), (SNAT, ours)).build(),
        };
        let back = k.run_tc(&to_client);
        assert_eq!(back.verdict, TC_ACT_REDIRECT);
        assert_eq!(view(&back.packet).dst, CLIENT);
    });
}

#[test]
fn a_host_udp_flow_on_a_kernel_flows_tuple_is_moved_to_a_free_port_and_back() {
    if !require_root("a_host_udp_flow_on_a_kernel_flows_tuple_is_moved_to_a_free_port_and_back") {
        return;
    }
    host_flow_is_moved(PROTO_UDP);
}

#[test]
fn a_host_tcp_flow_on_a_kernel_flows_tuple_is_moved_to_a_free_port_and_back() {
    if !require_root("a_host_tcp_flow_on_a_kernel_flows_tuple_is_moved_to_a_free_port_and_back") {
        return;
    }
    host_flow_is_moved(PROTO_TCP);
}

#[test]
fn a_moved_udp_flow_without_checksum_keeps_none_and_no_free_port_drops() {
    if !require_root("a_moved_udp_flow_without_checksum_keeps_none_and_no_free_port_drops") {
        return;
    }
    with_router(1024, two_ports(), |k| {
        let first = udp_flow(k, 50000).expect("a kernel flow");
        let host = from_host(PROTO_UDP, first).csum(Csum::Zero).build();
        let (out, _) = k.run_tc_egress(&host, 0);
        assert_eq!(out.verdict, TC_ACT_UNSPEC);
        assert_eq!(view(&out.packet).l4_csum, 0, "no checksum stays none");
        assert_ne!(view(&out.packet).sport, first);
        // Both ports taken now (the kernel flow's and the moved one's):
        // a host flow on a second kernel flow's tuple has nowhere to go,
        // and is dropped rather than answered to our client.
        let t = k.conntrack().len();
        assert_eq!(t, 4);
        let mut one = two_ports();
        one.settings.snat_port_max = 40000;
        one.settings.snat_probe_limit = 1;
        k.write_tables(&one);
        let held = Spec::tcp(client(50001), listener(), TCP_SYN).build();
        let ours = assert_forwarded(&k.run_tc(&held), PROTO_TCP, &held);
        let host = from_host(PROTO_TCP, ours).build();
        let (out, _) = k.run_tc_egress(&host, 0);
        assert_eq!(out.verdict, TC_ACT_SHOT);
    });
}

#[test]
fn an_icmp_error_about_a_moved_host_flow_goes_up_about_the_hosts_own_port() {
    if !require_root("an_icmp_error_about_a_moved_host_flow_goes_up_about_the_hosts_own_port") {
        return;
    }
    with_router(1024, two_ports(), |k| {
        let ours = udp_flow(k, 50000).expect("a kernel flow");
        let host = from_host(PROTO_UDP, ours).build();
        let (moved, _) = k.run_tc_egress(&host, 0);
        assert_ne!(view(&moved.packet).sport, ours, "moved");
        // The backend's port unreachable about the moved datagram, as it
        // arrived there (one hop on).
        let kind = (ICMP_UNREACH, CODE_PORT, 0);
        let unreachable = error(BACKEND, SNAT, 64, kind, &after_hops(&moved.packet, 1));
        let up = k.run_tc(&unreachable);
        // To the stack, about the datagram as the host sent it: its
        // conntrack finds its own flow and tells the container.
        assert_eq!(up.verdict, TC_ACT_UNSPEC);
        let expected = error(BACKEND, SNAT, 64, kind, &after_hops(&host, 1));
        assert_eq!(up.packet[ETH_LEN..], expected[ETH_LEN..]);
        assert_checksums(&up.packet);
        // skb->csum (CHECKSUM_COMPLETE) still matches the bytes.
        let complete = k
            .run_tc_flags(&unreachable, F_CHECKSUM_COMPLETE)
            .expect("a CHECKSUM_COMPLETE run");
        assert_eq!(complete.verdict, TC_ACT_UNSPEC);
        assert_eq!(complete.packet[ETH_LEN..], expected[ETH_LEN..]);
        // Nothing was counted as a kernel flow's.
        assert_eq!(k.rule_counters(UDP_RULE).icmp_translated, 0);
    });
}
