//! The decisions the kernel programs take alone, as pure functions the host can test.

use crate::{CgroupMode, Counter, Ipv4Be, Ipv6Be};

/// `SOCK_STREAM` in `bpf_sock_addr.type`.
pub const SOCK_STREAM: u32 = 1;
/// `SOCK_DGRAM` in `bpf_sock_addr.type`.
pub const SOCK_DGRAM: u32 = 2;
/// `IPPROTO_TCP` in `bpf_sock_addr.protocol`.
pub const IPPROTO_TCP: u32 = 6;
/// `IPPROTO_UDP` in `bpf_sock_addr.protocol`.
pub const IPPROTO_UDP: u32 = 17;
/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// What a connect or UDP send program does with one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Record the connection and send it to the transparent TCP listener.
    RedirectTcp,
    /// Remember the resolver and send the datagram to the DNS listener.
    RedirectDns,
    /// Refuse with EPERM and count it.
    Deny(Counter),
}

/// The action for `connect()` on a socket of `sock_type`/`protocol` to `dst_port` (host order).
/// `configured` says whether user space wrote a complete configuration.
#[must_use]
pub const fn connect_action(
    configured: bool,
    mode: CgroupMode,
    sock_type: u32,
    protocol: u32,
    dst_port: u16,
) -> Action {
    if let CgroupMode::NoNetwork = mode {
        return Action::Deny(Counter::NoNetworkDenied);
    }
    if !configured {
        return Action::Deny(Counter::Unconfigured);
    }
    match (sock_type, protocol) {
        (SOCK_STREAM, IPPROTO_TCP) => Action::RedirectTcp,
        (SOCK_DGRAM, IPPROTO_UDP) => udp_action(dst_port),
        _ => Action::Deny(Counter::OtherProtocolDenied),
    }
}

/// The action for an unconnected UDP `sendmsg()` to `dst_port` (host order).
#[must_use]
pub const fn sendmsg_action(configured: bool, mode: CgroupMode, dst_port: u16) -> Action {
    if let CgroupMode::NoNetwork = mode {
        return Action::Deny(Counter::NoNetworkDenied);
    }
    if !configured {
        return Action::Deny(Counter::Unconfigured);
    }
    udp_action(dst_port)
}

const fn udp_action(dst_port: u16) -> Action {
    if dst_port == DNS_PORT {
        Action::RedirectDns
    } else {
        Action::Deny(Counter::UdpDenied)
    }
}

/// The interface index of the loopback device, the same in every network namespace
/// (`LOOPBACK_IFINDEX` in the kernel).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// What a `bind4`/`bind6` program does with one `bind()` of a sandboxed socket. `A` is the
/// address type of the hook (`Ipv4Be` or `Ipv6Be`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindAction<A> {
    /// A loopback address: bind as asked.
    Allow,
    /// A wildcard address: bind to this loopback address instead (same port).
    Rewrite(A),
    /// Any other address: refuse with EPERM, since it could receive from other hosts.
    Deny,
}

/// The action for `bind()` of an IPv4 socket to `addr`: `0.0.0.0` becomes `127.0.0.1`,
/// `127.0.0.0/8` passes, everything else (host addresses, broadcast, multicast) is refused.
#[must_use]
pub const fn bind4_action(addr: Ipv4Be) -> BindAction<Ipv4Be> {
    if addr.0 == Ipv4Be::UNSPECIFIED.0 {
        BindAction::Rewrite(Ipv4Be::LOOPBACK)
    } else if addr.is_loopback() {
        BindAction::Allow
    } else {
        BindAction::Deny
    }
}

/// The action for `bind()` of an IPv6 socket to `addr`, port `port` (host order).
///
/// - `::` with a port becomes `::1`: a listener, kept on loopback. The kernel makes any socket
///   bound to a specific non-mapped address IPv6-only, so a dual-stack `[::]:P` listener ends up
///   reachable at `[::1]:P` only (one loopback has to be chosen; `localhost` resolves to `::1`
///   first).
/// - `::` with port 0 is left alone: that is how dual-stack clients (Java's `DatagramSocket`,
///   resolvers) get an ephemeral socket, and making it IPv6-only would break their IPv4-mapped
///   traffic with ENETUNREACH. Like a socket that never called `bind()`, it is kept from
///   hearing other hosts by the ingress program ([`ingress_allowed`]).
/// - `::1` passes. IPv4-mapped addresses follow [`bind4_action`] in mapped form
///   (`::ffff:0.0.0.0` becomes `::ffff:127.0.0.1`). Everything else is refused.
pub const fn bind6_action(addr: Ipv6Be, port: u16) -> BindAction<Ipv6Be> {
    if let Some(v4) = addr.to_mapped_v4() {
        return match bind4_action(v4) {
            BindAction::Allow => BindAction::Allow,
            BindAction::Rewrite(to) => BindAction::Rewrite(Ipv6Be::mapped(to)),
            BindAction::Deny => BindAction::Deny,
        };
    }
    let [a, b, c, d] = addr.0;
    let [la, lb, lc, ld] = Ipv6Be::LOOPBACK.0;
    if a == 0 && b == 0 && c == 0 && d == 0 {
        if port == 0 {
            BindAction::Allow
        } else {
            BindAction::Rewrite(Ipv6Be::LOOPBACK)
        }
    } else if a == la && b == lb && c == lc && d == ld {
        BindAction::Allow
    } else {
        BindAction::Deny
    }
}

/// The destination of an inbound packet, read from its IP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketDst {
    V4(Ipv4Be),
    V6(Ipv6Be),
}

/// Whether the ingress program lets an inbound packet reach a sandboxed socket: only when it
/// came in on the loopback device (so it was sent by this host) and is addressed to a loopback
/// address (so it was meant for a loopback listener, not for the host's network addresses).
///
/// The device check matters where `route_localnet` is on (kube-proxy sets it): there the kernel
/// accepts packets for `127.0.0.0/8` from other hosts on a real interface (CVE-2020-8558).
#[must_use]
pub const fn ingress_allowed(ingress_ifindex: u32, dst: PacketDst) -> bool {
    if ingress_ifindex != LOOPBACK_IFINDEX {
        return false;
    }
    match dst {
        PacketDst::V4(addr) => addr.is_loopback(),
        PacketDst::V6(addr) => {
            let [a, b, c, d] = addr.0;
            let [la, lb, lc, ld] = Ipv6Be::LOOPBACK.0;
            a == la && b == lb && c == lc && d == ld
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(o: [u8; 4]) -> Ipv4Be {
        Ipv4Be::from_octets(o)
    }

    fn v6(s: &str) -> Ipv6Be {
        let addr: core::net::Ipv6Addr = s.parse().expect("an IPv6 literal");
        Ipv6Be::from_octets(addr.octets())
    }

    #[test]
    fn bind4_wildcard_goes_to_loopback_others_are_refused() {
        assert_eq!(
            bind4_action(v4([0, 0, 0, 0])),
            BindAction::Rewrite(Ipv4Be::LOOPBACK)
        );
        assert_eq!(bind4_action(v4([127, 0, 0, 1])), BindAction::Allow);
        assert_eq!(bind4_action(v4([127, 1, 2, 3])), BindAction::Allow);
        for denied in [
            [198, 18, 0, 1],
            [10, 0, 0, 1],
            [255, 255, 255, 255],
            [224, 0, 0, 251],
            [0, 0, 0, 1],
        ] {
            assert_eq!(bind4_action(v4(denied)), BindAction::Deny, "{denied:?}");
        }
    }

    #[test]
    fn bind6_wildcards_go_to_loopback_of_their_family() {
        assert_eq!(
            bind6_action(v6("::"), 8080),
            BindAction::Rewrite(Ipv6Be::LOOPBACK)
        );
        // An ephemeral dual-stack socket stays dual-stack (the ingress program guards it).
        assert_eq!(bind6_action(v6("::"), 0), BindAction::Allow);
        assert_eq!(bind6_action(v6("::1"), 8080), BindAction::Allow);
        for port in [0, 8080] {
            assert_eq!(
                bind6_action(v6("::ffff:0.0.0.0"), port),
                BindAction::Rewrite(Ipv6Be::mapped(Ipv4Be::LOOPBACK))
            );
        }
        assert_eq!(bind6_action(v6("::ffff:127.0.0.1"), 0), BindAction::Allow);
        for denied in [
            "::ffff:198.18.0.1",
            "2001:2:0:1::1",
            "fe80::1",
            "ff02::1",
            "::2",
            "::127.0.0.1",
            "1::",
        ] {
            for port in [0, 8080] {
                assert_eq!(bind6_action(v6(denied), port), BindAction::Deny, "{denied}");
            }
        }
    }

    #[test]
    fn ingress_needs_loopback_device_and_loopback_destination() {
        let lo = LOOPBACK_IFINDEX;
        assert!(ingress_allowed(lo, PacketDst::V4(v4([127, 0, 0, 1]))));
        assert!(ingress_allowed(lo, PacketDst::V4(v4([127, 0, 0, 6]))));
        assert!(ingress_allowed(lo, PacketDst::V6(Ipv6Be::LOOPBACK)));
        // The host's own network address, even when sent by the host itself (over lo).
        assert!(!ingress_allowed(lo, PacketDst::V4(v4([198, 18, 0, 1]))));
        assert!(!ingress_allowed(lo, PacketDst::V6(v6("2001:2:0:1::1"))));
        // A mapped address never appears in a real IPv6 header; refuse it.
        assert!(!ingress_allowed(
            lo,
            PacketDst::V6(Ipv6Be::mapped(Ipv4Be::LOOPBACK))
        ));
        // Loopback destinations from a real interface (route_localnet).
        assert!(!ingress_allowed(2, PacketDst::V4(v4([127, 0, 0, 1]))));
        assert!(!ingress_allowed(2, PacketDst::V6(Ipv6Be::LOOPBACK)));
        assert!(!ingress_allowed(0, PacketDst::V4(v4([127, 0, 0, 1]))));
    }

    const I: CgroupMode = CgroupMode::Intercept;

    #[test]
    fn tcp_is_redirected_on_any_port() {
        for port in [0, 22, 53, 80, 443, 65535] {
            assert_eq!(
                connect_action(true, I, SOCK_STREAM, IPPROTO_TCP, port),
                Action::RedirectTcp
            );
        }
    }

    #[test]
    fn udp_connect_only_dns() {
        assert_eq!(
            connect_action(true, I, SOCK_DGRAM, IPPROTO_UDP, 53),
            Action::RedirectDns
        );
        assert_eq!(
            connect_action(true, I, SOCK_DGRAM, IPPROTO_UDP, 5353),
            Action::Deny(Counter::UdpDenied)
        );
        assert_eq!(sendmsg_action(true, I, 53), Action::RedirectDns);
        assert_eq!(
            sendmsg_action(true, I, 123),
            Action::Deny(Counter::UdpDenied)
        );
    }

    #[test]
    fn other_protocols_are_denied() {
        // SCTP stream socket, UDP-lite datagram socket.
        assert_eq!(
            connect_action(true, I, SOCK_STREAM, 132, 443),
            Action::Deny(Counter::OtherProtocolDenied)
        );
        assert_eq!(
            connect_action(true, I, SOCK_DGRAM, 136, 53),
            Action::Deny(Counter::OtherProtocolDenied)
        );
    }

    #[test]
    fn no_network_wins_over_everything() {
        let n = CgroupMode::NoNetwork;
        assert_eq!(
            connect_action(true, n, SOCK_STREAM, IPPROTO_TCP, 443),
            Action::Deny(Counter::NoNetworkDenied)
        );
        assert_eq!(
            sendmsg_action(false, n, 53),
            Action::Deny(Counter::NoNetworkDenied)
        );
    }

    #[test]
    fn unconfigured_fails_closed() {
        assert_eq!(
            connect_action(false, I, SOCK_STREAM, IPPROTO_TCP, 443),
            Action::Deny(Counter::Unconfigured)
        );
        assert_eq!(
            sendmsg_action(false, I, 53),
            Action::Deny(Counter::Unconfigured)
        );
    }

    #[test]
    fn unknown_mode_values_fail_closed() {
        assert_eq!(CgroupMode::from_raw(0), CgroupMode::Intercept);
        assert_eq!(CgroupMode::from_raw(1), CgroupMode::NoNetwork);
        assert_eq!(CgroupMode::from_raw(7), CgroupMode::NoNetwork);
    }
}
