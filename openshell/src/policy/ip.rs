//! Destination safety for IP addresses, whatever the policy says.
//!
//! Always denied: loopback, link-local (including the cloud metadata address 169.254.169.254),
//! unspecified, multicast and broadcast. Private ranges (RFC 1918, CGNAT 100.64.0.0/10, IPv6
//! unique-local fc00::/7) only through an endpoint's `allowed_ips`. IPv4-mapped IPv6 addresses
//! are judged as the IPv4 address they carry.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

/// Why an address is never a permitted destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Forbidden {
    Loopback,
    LinkLocal,
    Unspecified,
    Multicast,
    Broadcast,
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Loopback => "loopback",
            Self::LinkLocal => "link-local",
            Self::Unspecified => "unspecified",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
        })
    }
}

/// What kind of destination an address is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressClass {
    /// Never allowed.
    Forbidden(Forbidden),
    /// Allowed only through `allowed_ips`.
    Private,
    /// Allowed when a block allows the endpoint.
    Public,
}

/// The forbidden ranges as networks (used to reject `allowed_ips` that overlap them).
pub(crate) static FORBIDDEN_NETS: LazyLock<Vec<(IpNet, Forbidden)>> = LazyLock::new(|| {
    let v4 = |a: [u8; 4], len: u8| Ipv4Net::new(Ipv4Addr::from(a), len).map(IpNet::V4);
    let v6 = |a: Ipv6Addr, len: u8| Ipv6Net::new(a, len).map(IpNet::V6);
    [
        (v4([127, 0, 0, 0], 8), Forbidden::Loopback),
        (v4([169, 254, 0, 0], 16), Forbidden::LinkLocal),
        (v4([0, 0, 0, 0], 8), Forbidden::Unspecified),
        (v4([224, 0, 0, 0], 4), Forbidden::Multicast),
        (v4([255, 255, 255, 255], 32), Forbidden::Broadcast),
        (v6(Ipv6Addr::LOCALHOST, 128), Forbidden::Loopback),
        (v6(Ipv6Addr::UNSPECIFIED, 128), Forbidden::Unspecified),
        (
            v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
            Forbidden::LinkLocal,
        ),
        (
            v6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
            Forbidden::Multicast,
        ),
    ]
    .into_iter()
    .filter_map(|(net, class)| net.ok().map(|n| (n, class)))
    .collect()
});

/// The address an IPv4-mapped IPv6 address stands for; other addresses unchanged.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Why `ip` can never be a destination, if it cannot.
pub fn classify_forbidden(ip: IpAddr) -> Option<Forbidden> {
    match unmap(ip) {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some(Forbidden::Loopback)
            } else if v4.is_link_local() {
                Some(Forbidden::LinkLocal)
            } else if v4.octets()[0] == 0 {
                // 0.0.0.0/8: "this network"; connecting to it reaches the local host.
                Some(Forbidden::Unspecified)
            } else if v4.is_multicast() {
                Some(Forbidden::Multicast)
            } else if v4.is_broadcast() {
                Some(Forbidden::Broadcast)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some(Forbidden::Loopback)
            } else if v6.is_unspecified() {
                Some(Forbidden::Unspecified)
            } else if v6.is_unicast_link_local() {
                Some(Forbidden::LinkLocal)
            } else if v6.is_multicast() {
                Some(Forbidden::Multicast)
            } else {
                None
            }
        }
    }
}

/// Whether `ip` is in a private range (RFC 1918, CGNAT 100.64.0.0/10, IPv6 ULA fc00::/7).
pub fn is_private(ip: IpAddr) -> bool {
    match unmap(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => v6.is_unique_local(),
    }
}

/// Classifies a destination address.
pub fn classify(ip: IpAddr) -> AddressClass {
    if let Some(f) = classify_forbidden(ip) {
        AddressClass::Forbidden(f)
    } else if is_private(ip) {
        AddressClass::Private
    } else {
        AddressClass::Public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn classes() {
        for (addr, class) in [
            ("127.0.0.1", AddressClass::Forbidden(Forbidden::Loopback)),
            ("127.9.9.9", AddressClass::Forbidden(Forbidden::Loopback)),
            ("::1", AddressClass::Forbidden(Forbidden::Loopback)),
            (
                "::ffff:127.0.0.1",
                AddressClass::Forbidden(Forbidden::Loopback),
            ),
            (
                "169.254.169.254",
                AddressClass::Forbidden(Forbidden::LinkLocal),
            ),
            ("fe80::1", AddressClass::Forbidden(Forbidden::LinkLocal)),
            ("0.0.0.0", AddressClass::Forbidden(Forbidden::Unspecified)),
            ("::", AddressClass::Forbidden(Forbidden::Unspecified)),
            ("224.0.0.251", AddressClass::Forbidden(Forbidden::Multicast)),
            ("ff02::fb", AddressClass::Forbidden(Forbidden::Multicast)),
            (
                "255.255.255.255",
                AddressClass::Forbidden(Forbidden::Broadcast),
            ),
            ("10.1.2.3", AddressClass::Private),
            ("172.16.0.1", AddressClass::Private),
            ("192.168.1.1", AddressClass::Private),
            ("100.64.0.1", AddressClass::Private),
            ("100.127.255.255", AddressClass::Private),
            ("::ffff:10.0.0.1", AddressClass::Private),
            ("fd00::1", AddressClass::Private),
            ("100.128.0.1", AddressClass::Public),
            ("198.18.0.1", AddressClass::Public),
            ("140.82.112.6", AddressClass::Public),
            ("2606:4700::1111", AddressClass::Public),
        ] {
            assert_eq!(classify(ip(addr)), class, "{addr}");
        }
    }
}
