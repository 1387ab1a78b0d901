//! What user space tells the kernel: listener addresses and pin location.

use std::{
    net::{SocketAddrV4, SocketAddrV6},
    path::PathBuf,
};

use openshell_common::{Config, Ipv4Be, Ipv6Be, KernelOffsets, ListenerV4, ListenerV6};

use super::EbpfError;

/// Where the kernel sends what it intercepts, and where pins live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptorConfig {
    /// Transparent TCP listener for IPv4 destinations (and IPv4-mapped ones on IPv6 sockets,
    /// which are sent to `::ffff:<this address>`). Usually `127.0.0.1:<port>`. Every listener
    /// must be on a loopback address: the ingress program lets only loopback traffic reach a
    /// sandbox, so answers from anywhere else would never arrive.
    pub tcp_v4: SocketAddrV4,
    /// Transparent TCP listener for IPv6 destinations, usually `[::1]:<port>`. `None` refuses
    /// IPv6 connects (EPERM).
    pub tcp_v6: Option<SocketAddrV6>,
    /// DNS listener (UDP) for IPv4 resolvers, usually `127.0.0.1:<port>`.
    pub dns_v4: SocketAddrV4,
    /// DNS listener (UDP) for IPv6 resolvers. `None` refuses DNS to IPv6 resolvers.
    pub dns_v6: Option<SocketAddrV6>,
    /// bpffs directory for pins, e.g. `/sys/fs/bpf/openshell`; tests use their own.
    pub bpffs_dir: PathBuf,
    /// Turn the programs' debug logs on (they go to the `log` crate through
    /// [`Interceptor::flush_logs`]). Off by default: logging costs time on every connect.
    pub debug_logs: bool,
}

impl InterceptorConfig {
    /// A configuration with IPv4 listeners only, pins under `bpffs_dir`.
    #[must_use]
    pub fn new(tcp_v4: SocketAddrV4, dns_v4: SocketAddrV4, bpffs_dir: impl Into<PathBuf>) -> Self {
        Self {
            tcp_v4,
            tcp_v6: None,
            dns_v4,
            dns_v6: None,
            bpffs_dir: bpffs_dir.into(),
            debug_logs: false,
        }
    }

    pub(super) fn to_kernel(&self, offsets: KernelOffsets) -> Result<Config, EbpfError> {
        fn v4(what: &'static str, a: SocketAddrV4) -> Result<ListenerV4, EbpfError> {
            if a.port() == 0 {
                return Err(EbpfError::ZeroPort { what });
            }
            if !a.ip().is_loopback() {
                return Err(EbpfError::ListenerNotLoopback {
                    what,
                    addr: a.into(),
                });
            }
            Ok(ListenerV4 {
                addr: Ipv4Be::from_octets(a.ip().octets()),
                port: a.port(),
                _pad: 0,
            })
        }
        fn v6(what: &'static str, a: Option<SocketAddrV6>) -> Result<ListenerV6, EbpfError> {
            let Some(a) = a else {
                return Ok(ListenerV6::default());
            };
            if a.port() == 0 {
                return Err(EbpfError::ZeroPort { what });
            }
            if !a.ip().is_loopback() {
                return Err(EbpfError::ListenerNotLoopback {
                    what,
                    addr: a.into(),
                });
            }
            Ok(ListenerV6 {
                addr: Ipv6Be::from_octets(a.ip().octets()),
                port: a.port(),
                _pad: 0,
            })
        }
        Ok(Config {
            tcp_v4: v4("tcp_v4 listener", self.tcp_v4)?,
            dns_v4: v4("dns_v4 listener", self.dns_v4)?,
            tcp_v6: v6("tcp_v6 listener", self.tcp_v6)?,
            dns_v6: v6("dns_v6 listener", self.dns_v6)?,
            offsets,
            flags: Config::FLAG_CONFIGURED,
            _reserved: 0,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    #[test]
    fn config_rejects_port_zero() {
        let c = InterceptorConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:53".parse().unwrap(),
            "/nonexistent",
        );
        assert!(matches!(
            c.to_kernel(KernelOffsets::default()),
            Err(EbpfError::ZeroPort { .. })
        ));
    }

    #[test]
    fn config_rejects_listeners_off_loopback() {
        let mut c = InterceptorConfig::new(
            "198.18.0.1:15001".parse().unwrap(),
            "127.0.0.1:15053".parse().unwrap(),
            "/nonexistent",
        );
        let err = c.to_kernel(KernelOffsets::default()).unwrap_err();
        insta::assert_snapshot!(err.to_string(), @"tcp_v4 listener: 198.18.0.1:15001 is not a loopback address; sandboxes only receive loopback traffic, so bind the listener to 127.0.0.1 (or ::1 for IPv6)");
        c.tcp_v4 = "127.0.0.1:15001".parse().unwrap();
        c.dns_v6 = Some("[2001:2::1]:15053".parse().unwrap());
        let err = c.to_kernel(KernelOffsets::default()).unwrap_err();
        insta::assert_snapshot!(err.to_string(), @"dns_v6 listener: [2001:2::1]:15053 is not a loopback address; sandboxes only receive loopback traffic, so bind the listener to 127.0.0.1 (or ::1 for IPv6)");
        c.dns_v6 = Some("[::1]:15053".parse().unwrap());
        assert!(c.to_kernel(KernelOffsets::default()).is_ok());
    }

    #[test]
    fn config_layout() {
        let mut c = InterceptorConfig::new(
            "127.0.0.1:15001".parse().unwrap(),
            "127.0.0.1:15053".parse().unwrap(),
            "/nonexistent",
        );
        c.tcp_v6 = Some("[::1]:15001".parse().unwrap());
        let k = c.to_kernel(KernelOffsets::default()).unwrap();
        assert!(k.is_configured());
        assert_eq!(k.tcp_v4.addr.octets(), [127, 0, 0, 1]);
        assert_eq!(k.tcp_v4.port, 15001);
        assert_eq!(k.tcp_v6.addr.octets()[15], 1);
        assert_eq!(k.dns_v6.port, 0);
    }
}
