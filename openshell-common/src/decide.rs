//! The decisions the kernel programs take alone, as pure functions the host can test.

use crate::{CgroupMode, Counter};

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

#[cfg(test)]
mod tests {
    use super::*;

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
