//! Types shared by the openshell eBPF programs (`openshell-ebpf`) and user space (`openshell`).
//!
//! Everything here is `#[repr(C)]` with explicit padding and a compile-time size check, because
//! the kernel side and the user side must agree on the layout byte for byte. Logic that both
//! sides need and that can be tested on the host lives here too.
//!
//! Conventions:
//! - Addresses are kept as the kernel hands them over: IPv4 as one `u32` whose memory holds the
//!   address in network byte order ([`Ipv4Be`]), IPv6 as four such words ([`Ipv6Be`]). IPv4
//!   addresses inside an IPv6 field are IPv4-mapped (`::ffff:a.b.c.d`).
//! - Ports are stored in host byte order ([`Endpoint::port`]); [`PortBe`] converts to and from the
//!   `user_port` field of `bpf_sock_addr`, which holds the port in network byte order.
#![no_std]
#![deny(unsafe_code)]

pub mod decide;
pub mod dev;
pub mod net;

pub use dev::KernelDev;
pub use net::{Endpoint, Ipv4Be, Ipv6Be, PortBe};

/// Version of the pinned map layout. Bump it whenever any type in this crate that lives in a
/// pinned map changes; pins of another version are never reused (user space keeps them in a
/// directory named after the version).
pub const LAYOUT_VERSION: u32 = 3;

/// `AF_INET`, as stored in [`Endpoint::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`Endpoint::family`].
pub const AF_INET6: u16 = 10;

/// Capacity of the connection record maps. They are LRU maps, so a flood of connections evicts
/// the oldest records instead of failing; a record evicted before the proxy looked it up means
/// the proxy denies that connection (fail closed).
pub const RECORD_CAPACITY: u32 = 65_536;
/// Capacity of the kernel relay maps ([`map_names::RELAY_SOCKETS`] and its companions): two
/// entries per relayed connection. A full map only means the next connection is relayed in user
/// space.
pub const RELAY_CAPACITY: u32 = 65_536;
/// Capacity of the per-cgroup mode map (one entry per sandbox that is not in the default mode).
pub const MODE_CAPACITY: u32 = 4_096;
/// Capacity of the kernel's verdict cache ([`map_names::VERDICTS`]). An LRU map: a full cache
/// evicts the least used verdict, whose next connection goes through the proxy again.
pub const VERDICT_CAPACITY: u32 = 16_384;
/// Capacity of the map of open direct connections ([`map_names::DIRECT`]). A plain hash map:
/// when it is full, a connection that has a verdict goes through the proxy instead.
pub const DIRECT_CAPACITY: u32 = 65_536;
/// Size of the ring buffer that carries direct connections to the decision log
/// ([`map_names::DIRECT_EVENTS`]), in bytes (a power of two, a multiple of the page size).
/// When it is full, a connection that has a verdict goes through the proxy instead, so nothing
/// goes direct unlogged.
pub const DIRECT_EVENTS_BYTES: u32 = 1 << 20;

/// Names of the maps, shared so that user space never spells them differently.
pub mod map_names {
    /// `Array<Config>` with one entry: listeners and kernel offsets.
    pub const CONFIG: &str = "OPENSHELL_CONFIG";
    /// `LruHashMap<u64 socket cookie, ConnectRecord>`.
    pub const BY_COOKIE: &str = "OPENSHELL_BY_COOKIE";
    /// `LruHashMap<PeerKey, ConnectRecord>`: the same record keyed by the client's source.
    pub const BY_PEER: &str = "OPENSHELL_BY_PEER";
    /// `HashMap<u64 cgroup id, u32 CgroupMode>`.
    pub const MODES: &str = "OPENSHELL_MODES";
    /// `PerCpuArray<u64>` indexed by [`super::Counter`].
    pub const COUNTERS: &str = "OPENSHELL_COUNTERS";
    /// `LruHashMap<VerdictKey, Verdict>`: the proxy's allow decisions that the connect
    /// programs may apply alone (`openshell::ebpf::FastPath` explains when).
    pub const VERDICTS: &str = "OPENSHELL_VERDICTS";
    /// `HashMap<u64 cgroup id, u64 epoch>`: a verdict counts only while its epoch is its
    /// cgroup's current one; user space moves the epoch on before anything that could change a
    /// decision (a policy change, a name the sandbox newly resolved).
    pub const EPOCHS: &str = "OPENSHELL_EPOCHS";
    /// `Array<u64>` with one entry: verdicts count only until this `CLOCK_MONOTONIC` time in
    /// nanoseconds, which the gateway keeps pushing forward while it runs.
    pub const ALIVE: &str = "OPENSHELL_ALIVE";
    /// `HashMap<u64 socket cookie, DirectConn>`: open connections that went direct on a
    /// verdict, so that user space can judge them again and close them.
    pub const DIRECT: &str = "OPENSHELL_DIRECT";
    /// `RingBuf` of [`super::DirectEvent`]: one per connection that went direct.
    pub const DIRECT_EVENTS: &str = "OPENSHELL_DIRECT_EVENTS";

    /// `SockHash<u64 socket cookie>`: the proxy's sockets whose received bytes the
    /// `openshell_relay` program forwards in the kernel. Not pinned: the sockets belong to one
    /// gateway process.
    pub const RELAY_SOCKETS: &str = "OPENSHELL_RELAY_SOCKETS";
    /// `HashMap<u64 socket cookie, RelayPeer>`: where `openshell_relay` forwards a socket's
    /// bytes, and how many it may. No entry: the bytes stay on the socket, for user space.
    pub const RELAY_PEERS: &str = "OPENSHELL_RELAY_PEERS";
    /// `HashMap<u64 socket cookie, u64 bytes>`: how many bytes `openshell_relay` forwarded from
    /// the socket to its peer.
    pub const RELAY_SENT: &str = "OPENSHELL_RELAY_SENT";

    /// Every map that user space pins, so that it survives a gateway restart (all but the relay
    /// maps).
    pub const PINNED: [&str; 10] = [
        CONFIG,
        BY_COOKIE,
        BY_PEER,
        MODES,
        COUNTERS,
        VERDICTS,
        EPOCHS,
        ALIVE,
        DIRECT,
        DIRECT_EVENTS,
    ];
}

/// What the programs do for the sockets of one cgroup.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupMode {
    /// Redirect TCP to the transparent listener and DNS to the DNS listener (the default for a
    /// cgroup that has no entry in the mode map).
    Intercept = 0,
    /// No network at all: every connect and every UDP send fails with EPERM in the kernel.
    NoNetwork = 1,
}

impl CgroupMode {
    /// Decodes a value read from the mode map; unknown values mean "no network" (fail closed).
    #[must_use]
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            0 => Self::Intercept,
            _ => Self::NoNetwork,
        }
    }
}

/// Per-CPU counters of the decisions the kernel takes alone. The index into
/// [`map_names::COUNTERS`] is the discriminant.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A TCP connect was redirected to the transparent listener.
    TcpRedirected = 0,
    /// A UDP datagram or UDP connect to port 53 was redirected to the DNS listener.
    DnsRedirected = 1,
    /// A UDP send or connect to another port was refused with EPERM.
    UdpDenied = 2,
    /// A connect or send was refused because the cgroup is in [`CgroupMode::NoNetwork`].
    NoNetworkDenied = 3,
    /// A connect or send was refused because user space has not configured the listener.
    Unconfigured = 4,
    /// A connect of another protocol (neither TCP nor UDP) was refused.
    OtherProtocolDenied = 5,
    /// A connect was refused because its record could not be stored.
    RecordFailed = 6,
    /// The executable identity could not be read (kernel thread, or a read failed).
    ExeUnknown = 7,
    /// A bind to a wildcard address (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) was rewritten to the
    /// loopback address of its family.
    BindToLoopback = 8,
    /// A bind to a specific address other than loopback was refused with EPERM.
    BindDenied = 9,
    /// An inbound packet for a sandboxed socket was dropped because it did not arrive on the
    /// loopback device for a loopback address.
    IngressDropped = 10,
    /// A TCP connect went direct on a verdict of the proxy ([`map_names::VERDICTS`]).
    Direct = 11,
    /// A TCP connect had a verdict but went through the proxy, because the direct-connection map
    /// or the event ring was full.
    DirectFull = 12,
}

impl Counter {
    /// Number of counters (the size of the counters map).
    pub const COUNT: u32 = 13;
    /// Every counter, in index order.
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::TcpRedirected,
        Self::DnsRedirected,
        Self::UdpDenied,
        Self::NoNetworkDenied,
        Self::Unconfigured,
        Self::OtherProtocolDenied,
        Self::RecordFailed,
        Self::ExeUnknown,
        Self::BindToLoopback,
        Self::BindDenied,
        Self::IngressDropped,
        Self::Direct,
        Self::DirectFull,
    ];
}

/// Byte offsets of the kernel structure fields the connect programs follow to find the
/// executable: `task_struct → mm → exe_file → (f_path.mnt, f_inode → (i_sb → s_dev, i_ino,
/// i_ctime_sec, i_ctime_nsec, i_nlink))` and `task_struct → real_parent → tgid`. Rust eBPF has no CO-RE, so
/// user space reads these from `/sys/kernel/btf/vmlinux` and stores them in [`Config`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_mm: u32,
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub mm_exe_file: u32,
    pub file_f_inode: u32,
    pub inode_i_sb: u32,
    pub inode_i_ino: u32,
    pub sb_s_dev: u32,
    pub inode_i_ctime_sec: u32,
    pub inode_i_ctime_nsec: u32,
    pub inode_i_nlink: u32,
    /// `file.f_path.mnt`: the mount the executable was reached through.
    pub file_f_path_mnt: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 48);

/// An IPv4 listener address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerV4 {
    pub addr: Ipv4Be,
    /// Host byte order; 0 means "not configured".
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ListenerV4>() == 8);

/// An IPv6 listener address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerV6 {
    pub addr: Ipv6Be,
    /// Host byte order; 0 means "not configured".
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ListenerV6>() == 20);

/// The single entry of [`map_names::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Transparent TCP listener for IPv4 (and IPv4-mapped IPv6) destinations.
    pub tcp_v4: ListenerV4,
    /// DNS (UDP) listener for IPv4 (and IPv4-mapped IPv6) resolvers.
    pub dns_v4: ListenerV4,
    /// Transparent TCP listener for IPv6 destinations.
    pub tcp_v6: ListenerV6,
    /// DNS (UDP) listener for IPv6 resolvers.
    pub dns_v6: ListenerV6,
    pub offsets: KernelOffsets,
    /// [`Config::FLAG_CONFIGURED`] once user space wrote a complete configuration.
    pub flags: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 112);

impl Config {
    /// Set by user space when the entry is complete; until then every connect is refused.
    pub const FLAG_CONFIGURED: u32 = 1;

    /// Whether user space has written a complete configuration.
    #[must_use]
    pub const fn is_configured(&self) -> bool {
        self.flags & Self::FLAG_CONFIGURED != 0
    }
}

/// What the connect programs record about one intercepted connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectRecord {
    /// Socket cookie of the client socket.
    pub cookie: u64,
    /// cgroup v2 id of the connecting task.
    pub cgroup_id: u64,
    /// Inode number of the executable (valid when [`ConnectRecord::FLAG_EXE`] is set).
    pub exe_ino: u64,
    /// Device of the executable's filesystem, in the kernel's encoding ([`KernelDev`]).
    pub exe_dev: KernelDev,
    /// Thread group id (the process id seen by user space).
    pub tgid: u32,
    /// Thread group id of the real parent.
    pub parent_tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// [`ConnectRecord::FLAG_EXE`], [`ConnectRecord::FLAG_TCP`].
    pub flags: u32,
    /// The destination the program asked for.
    pub orig_dst: Endpoint,
    /// Number of hard links of the executable (valid with [`ConnectRecord::FLAG_EXE`]).
    pub exe_nlink: u32,
    /// Last status change of the executable (`st_ctime`, seconds and nanoseconds), valid with
    /// [`ConnectRecord::FLAG_EXE`]: any change of its content or links moves it.
    pub exe_ctime_sec: i64,
    pub exe_ctime_nsec: u32,
    pub _pad: u32,
    /// The mount the executable was reached through (the kernel's `vfsmount` address, only
    /// ever compared): the same file seen at two paths through a bind mount differs here.
    pub exe_mnt: u64,
}
const _: () = assert!(core::mem::size_of::<ConnectRecord>() == 96);

impl ConnectRecord {
    /// `exe_dev`, `exe_ino` and `parent_tgid` were read successfully.
    pub const FLAG_EXE: u32 = 1;
    /// The record belongs to a TCP connect (otherwise to a UDP DNS exchange).
    pub const FLAG_TCP: u32 = 2;

    #[must_use]
    pub const fn has_exe(&self) -> bool {
        self.flags & Self::FLAG_EXE != 0
    }
}

/// Key of [`map_names::BY_PEER`]: the client's source address (IPv4 as IPv4-mapped IPv6) and
/// port, as the proxy sees it after `accept()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub addr: Ipv6Be,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<PeerKey>() == 20);

impl PeerKey {
    /// Key for an IPv4 source.
    #[must_use]
    pub const fn v4(addr: Ipv4Be, port: u16) -> Self {
        Self {
            addr: Ipv6Be::mapped(addr),
            port,
            _pad: 0,
        }
    }

    /// Key for an IPv6 source; an IPv4-mapped source gives the same key as [`PeerKey::v4`].
    #[must_use]
    pub const fn v6(addr: Ipv6Be, port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
        }
    }
}

/// Where the kernel relay forwards one socket's bytes ([`map_names::RELAY_PEERS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayPeer {
    /// Socket cookie of the peer the bytes go out of.
    pub peer: u64,
    /// The program forwards while the socket's forwarded total ([`map_names::RELAY_SENT`])
    /// stays within this; a segment that would pass it stays on the socket, and the program
    /// deletes the entry (user space relays the rest). User space raises it as the peer's
    /// stream takes the forwarded bytes, which bounds what the kernel holds queued.
    pub credit: u64,
}

const _: () = assert!(core::mem::size_of::<RelayPeer>() == 16);

/// Which executable, in which sandbox, may connect where without asking the proxy
/// ([`map_names::VERDICTS`]). The executable is one version of one file reached through one
/// mount: its device, inode and status-change time (a write, a rename, a new hard link all move
/// the time), and the mount (a bind mount shows the same file at another path).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    pub cgroup_id: u64,
    pub exe_ino: u64,
    pub exe_ctime_sec: i64,
    pub exe_mnt: u64,
    pub exe_dev: KernelDev,
    pub exe_ctime_nsec: u32,
    /// The destination exactly as the connect program sees it.
    pub dst: Endpoint,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<VerdictKey>() == 64);

impl VerdictKey {
    /// The key of the connection `record` describes (its executable fields must be valid).
    #[must_use]
    pub const fn of_record(record: &ConnectRecord) -> Self {
        Self {
            cgroup_id: record.cgroup_id,
            exe_ino: record.exe_ino,
            exe_ctime_sec: record.exe_ctime_sec,
            exe_mnt: record.exe_mnt,
            exe_dev: record.exe_dev,
            exe_ctime_nsec: record.exe_ctime_nsec,
            dst: record.orig_dst,
            _pad: 0,
        }
    }
}

/// One allow decision of the proxy that the connect programs apply alone
/// ([`map_names::VERDICTS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Counts only while this is the cgroup's epoch in [`map_names::EPOCHS`].
    pub epoch: u64,
    /// Counts only before this `CLOCK_MONOTONIC` time, in nanoseconds.
    pub expires_ns: u64,
    /// User space's handle on the decision (what it logs for each direct connection).
    pub id: u64,
}
const _: () = assert!(core::mem::size_of::<Verdict>() == 24);

/// One open connection that went direct ([`map_names::DIRECT`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectConn {
    /// The verdict it went on.
    pub id: u64,
    pub cgroup_id: u64,
    /// The destination.
    pub dst: Endpoint,
    /// The socket's own address, filled in by `sock_ops` when the SYN leaves (port 0 until
    /// then).
    pub local: Endpoint,
    pub tgid: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DirectConn>() == 64);

/// What the connect programs report for each connection that went direct
/// ([`map_names::DIRECT_EVENTS`]): what the proxy would have logged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectEvent {
    /// The verdict it went on.
    pub id: u64,
    pub cookie: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub parent_tgid: u32,
    pub dst: Endpoint,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DirectEvent>() == 56);

#[cfg(feature = "user")]
#[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers, and has no implicit
    // padding (every padding byte is an explicit field, and the size asserts above pin it).
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RelayPeer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VerdictKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Verdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DirectConn {}
}
