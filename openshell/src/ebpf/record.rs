//! What the kernel recorded about a connection, in user-space types.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use openshell_common::{self as common, Ipv4Be, Ipv6Be, PeerKey};

/// The identity of an executable file: what `stat(2)` reports as `st_dev` and `st_ino`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExeId {
    pub dev: u64,
    pub ino: u64,
}

impl ExeId {
    /// The identity of the file at `path` (following symlinks, as `execve` does).
    pub fn of_path(path: &Path) -> std::io::Result<Self> {
        let meta = fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// What the kernel recorded when a sandboxed process called `connect()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRecord {
    /// The destination the process asked for (IPv4-mapped IPv6 destinations are IPv4).
    pub original_dst: SocketAddr,
    /// Process id (thread group id) of the caller.
    pub tgid: u32,
    /// Process id of the caller's parent, when the kernel could read it.
    pub parent_tgid: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 id of the caller (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// The caller's executable at connect time, when the kernel could read it.
    pub exe: Option<ExeId>,
    /// Socket cookie of the client socket.
    pub cookie: u64,
    /// What the kernel recorded, as it recorded it (the verdict cache is keyed on it).
    pub raw: common::ConnectRecord,
}

/// An endpoint the programs recorded, as a socket address (IPv4 destinations as IPv4).
#[must_use]
pub fn endpoint_addr(e: &common::Endpoint) -> SocketAddr {
    match e.as_v4() {
        Some(v4) => SocketAddr::new(IpAddr::V4(Ipv4Addr::from(v4.octets())), e.port),
        None => SocketAddr::new(IpAddr::V6(Ipv6Addr::from(e.addr.octets())), e.port),
    }
}

impl From<common::ConnectRecord> for ConnectRecord {
    fn from(r: common::ConnectRecord) -> Self {
        let original_dst = endpoint_addr(&r.orig_dst);
        let has_exe = r.has_exe();
        Self {
            original_dst,
            tgid: r.tgid,
            parent_tgid: has_exe.then_some(r.parent_tgid),
            uid: r.uid,
            gid: r.gid,
            cgroup_id: r.cgroup_id,
            exe: has_exe.then_some(ExeId {
                dev: r.exe_dev.to_userspace(),
                ino: r.exe_ino,
            }),
            cookie: r.cookie,
            raw: r,
        }
    }
}

/// The key under which `sock_ops` stored the record of a client with source address `peer`.
pub(super) fn peer_key(peer: SocketAddr) -> PeerKey {
    match peer {
        SocketAddr::V4(a) => PeerKey::v4(Ipv4Be::from_octets(a.ip().octets()), a.port()),
        SocketAddr::V6(a) => PeerKey::v6(Ipv6Be::from_octets(a.ip().octets()), a.port()),
    }
}

/// Sizes of the record maps (see [`super::Interceptor::record_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordCounts {
    /// Sockets with a record: redirected TCP sockets and UDP sockets that talked to a resolver.
    /// `sock_release` removes an entry when its socket is closed.
    pub sockets: usize,
    /// Connections waiting for the proxy to take their record. A connect whose handshake fails
    /// removes its own; the proxy's `take` removes the rest.
    pub peers: usize,
}

/// Totals of the decisions the kernel took alone, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub tcp_redirected: u64,
    pub dns_redirected: u64,
    pub udp_denied: u64,
    pub no_network_denied: u64,
    pub unconfigured: u64,
    pub other_protocol_denied: u64,
    pub record_failed: u64,
    pub exe_unknown: u64,
    /// Wildcard binds rewritten to loopback.
    pub bind_to_loopback: u64,
    /// Binds to non-loopback addresses refused with EPERM.
    pub bind_denied: u64,
    /// Inbound packets for sandboxed sockets dropped (not loopback).
    pub ingress_dropped: u64,
    /// TCP connects that went direct on a verdict of the proxy.
    pub direct: u64,
    /// TCP connects that had a verdict but went through the proxy (direct map or event ring
    /// full).
    pub direct_full: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    #[test]
    fn peer_keys_of_v4_and_mapped_v6_agree() {
        let v4: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(peer_key(v4), peer_key(mapped));
        let v6: SocketAddr = "[::1]:40000".parse().unwrap();
        assert_ne!(peer_key(v4), peer_key(v6));
    }

    #[test]
    fn record_conversion() {
        let raw = common::ConnectRecord {
            cookie: 9,
            cgroup_id: 77,
            exe_ino: 1234,
            exe_dev: common::KernelDev((8 << 20) | 1),
            tgid: 100,
            parent_tgid: 1,
            uid: 1000,
            gid: 1001,
            flags: common::ConnectRecord::FLAG_EXE | common::ConnectRecord::FLAG_TCP,
            orig_dst: common::Endpoint::v4(Ipv4Be::from_octets([198, 18, 0, 10]), 443),
            exe_nlink: 1,
            exe_ctime_sec: 1_700_000_000,
            exe_ctime_nsec: 5,
            _pad: 0,
            exe_mnt: 0xffff_8880_0000_1000,
        };
        let r = ConnectRecord::from(raw);
        assert_eq!(r.original_dst, "198.18.0.10:443".parse().unwrap());
        assert_eq!(
            r.exe,
            Some(ExeId {
                dev: 0x801,
                ino: 1234
            })
        );
        assert_eq!(r.parent_tgid, Some(1));
        let no_exe = ConnectRecord::from(common::ConnectRecord { flags: 0, ..raw });
        assert_eq!(no_exe.exe, None);
        assert_eq!(no_exe.parent_tgid, None);
    }
}
