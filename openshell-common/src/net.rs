//! Network addresses in the byte order the kernel's `bpf_sock_addr` and `bpf_sock_ops` use.

use crate::{AF_INET, AF_INET6};

/// An IPv4 address as a `u32` whose in-memory bytes are the address in network byte order
/// (`bpf_sock_addr.user_ip4`, `bpf_sock_ops.local_ip4`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ipv4Be(pub u32);

impl Ipv4Be {
    /// `0.0.0.0`.
    pub const UNSPECIFIED: Self = Self(0);
    /// `127.0.0.1`.
    pub const LOOPBACK: Self = Self::from_octets([127, 0, 0, 1]);

    /// Whether the address is in `127.0.0.0/8`.
    #[must_use]
    pub const fn is_loopback(self) -> bool {
        self.octets()[0] == 127
    }

    /// From the four octets `a.b.c.d`.
    #[must_use]
    pub const fn from_octets(octets: [u8; 4]) -> Self {
        Self(u32::from_ne_bytes(octets))
    }

    /// The four octets `a.b.c.d`.
    #[must_use]
    pub const fn octets(self) -> [u8; 4] {
        self.0.to_ne_bytes()
    }
}

/// An IPv6 address as four `u32` words whose in-memory bytes are the address in network byte
/// order (`bpf_sock_addr.user_ip6`). IPv4 addresses are IPv4-mapped (`::ffff:a.b.c.d`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ipv6Be(pub [u32; 4]);

/// The third word of an IPv4-mapped IPv6 address (`0000:ffff` in network byte order).
const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Ipv6Be {
    /// `::`.
    pub const UNSPECIFIED: Self = Self([0; 4]);
    /// `::1`.
    pub const LOOPBACK: Self = Self([0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);

    /// `::ffff:a.b.c.d` for the IPv4 address `a.b.c.d`.
    #[must_use]
    pub const fn mapped(v4: Ipv4Be) -> Self {
        Self([0, 0, MAPPED_WORD, v4.0])
    }

    /// The IPv4 address if this is an IPv4-mapped address.
    #[must_use]
    pub const fn to_mapped_v4(self) -> Option<Ipv4Be> {
        let [a, b, c, d] = self.0;
        if a == 0 && b == 0 && c == MAPPED_WORD {
            Some(Ipv4Be(d))
        } else {
            None
        }
    }

    /// From the sixteen octets of the address.
    #[must_use]
    pub const fn from_octets(o: [u8; 16]) -> Self {
        Self([
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ])
    }

    /// The sixteen octets of the address.
    #[must_use]
    pub const fn octets(self) -> [u8; 16] {
        let [a, b, c, d] = self.0;
        let (a, b, c, d) = (
            a.to_ne_bytes(),
            b.to_ne_bytes(),
            c.to_ne_bytes(),
            d.to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }
}

/// A port as `bpf_sock_addr.user_port` holds it: the 16-bit port in network byte order in the
/// low-addressed bytes of a `u32`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortBe(pub u32);

impl PortBe {
    /// From a port in host byte order.
    #[must_use]
    pub const fn from_host(port: u16) -> Self {
        Self(port.to_be() as u32)
    }

    /// The port in host byte order.
    #[must_use]
    pub const fn to_host(self) -> u16 {
        u16::from_be(self.0 as u16)
    }
}

/// A destination: address (IPv4 as IPv4-mapped IPv6), port in host byte order, family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: Ipv6Be,
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]: the family the program used (an IPv4-mapped destination
    /// dialled from an IPv6 socket is [`AF_INET`], since it is an IPv4 destination).
    pub family: u16,
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);

impl Endpoint {
    /// An IPv4 destination.
    #[must_use]
    pub const fn v4(addr: Ipv4Be, port: u16) -> Self {
        Self {
            addr: Ipv6Be::mapped(addr),
            port,
            family: AF_INET,
        }
    }

    /// An IPv6 destination; an IPv4-mapped address becomes an IPv4 destination.
    #[must_use]
    pub const fn v6(addr: Ipv6Be, port: u16) -> Self {
        match addr.to_mapped_v4() {
            Some(v4) => Self::v4(v4, port),
            None => Self {
                addr,
                port,
                family: AF_INET6,
            },
        }
    }

    /// The IPv4 address if this is an IPv4 destination.
    #[must_use]
    pub const fn as_v4(&self) -> Option<Ipv4Be> {
        if self.family == AF_INET {
            self.addr.to_mapped_v4()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_octets_are_network_order_in_memory() {
        let a = Ipv4Be::from_octets([198, 18, 0, 10]);
        assert_eq!(a.0.to_ne_bytes(), [198, 18, 0, 10]);
        assert_eq!(a.octets(), [198, 18, 0, 10]);
    }

    #[test]
    fn mapped_round_trip() {
        let v4 = Ipv4Be::from_octets([127, 0, 0, 1]);
        let m = Ipv6Be::mapped(v4);
        assert_eq!(
            m.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
        assert_eq!(m.to_mapped_v4(), Some(v4));
    }

    #[test]
    fn plain_v6_is_not_mapped() {
        let mut o = [0u8; 16];
        o[0] = 0x20;
        o[1] = 0x01;
        o[2] = 0x00;
        o[3] = 0x02;
        o[15] = 1;
        let a = Ipv6Be::from_octets(o);
        assert_eq!(a.octets(), o);
        assert_eq!(a.to_mapped_v4(), None);
        // ::ffff:0:0/96 only: 0:0:1:ffff:... is not mapped.
        let mut o2 = [0u8; 16];
        o2[5] = 1;
        o2[10] = 0xff;
        o2[11] = 0xff;
        assert_eq!(Ipv6Be::from_octets(o2).to_mapped_v4(), None);
    }

    #[test]
    fn loopback_and_unspecified() {
        assert!(Ipv4Be::LOOPBACK.is_loopback());
        assert!(Ipv4Be::from_octets([127, 255, 0, 6]).is_loopback());
        assert!(!Ipv4Be::from_octets([128, 0, 0, 1]).is_loopback());
        assert!(!Ipv4Be::from_octets([1, 0, 0, 127]).is_loopback());
        assert_eq!(Ipv4Be::UNSPECIFIED.octets(), [0; 4]);
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(Ipv6Be::LOOPBACK.octets(), one);
        assert_eq!(Ipv6Be::UNSPECIFIED.octets(), [0; 16]);
    }

    #[test]
    fn port_be_matches_user_port_layout() {
        let p = PortBe::from_host(443);
        // user_port holds htons(port) in its first two bytes.
        assert_eq!(&p.0.to_ne_bytes()[..2], &443u16.to_be_bytes());
        assert_eq!(p.to_host(), 443);
    }

    #[test]
    fn endpoint_v6_mapped_becomes_v4() {
        let v4 = Ipv4Be::from_octets([198, 18, 0, 10]);
        let e = Endpoint::v6(Ipv6Be::mapped(v4), 443);
        assert_eq!(e, Endpoint::v4(v4, 443));
        assert_eq!(e.family, AF_INET);
        assert_eq!(e.as_v4(), Some(v4));
    }

    #[test]
    fn endpoint_v6_plain_stays_v6() {
        let a = Ipv6Be::from_octets([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10]);
        let e = Endpoint::v6(a, 443);
        assert_eq!(e.family, AF_INET6);
        assert_eq!(e.as_v4(), None);
    }
}
