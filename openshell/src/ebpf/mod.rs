//! Loads openshell's eBPF programs (`openshell-ebpf`), attaches them to sandbox cgroups and
//! answers "who opened this connection?" for the proxy.
//!
//! [`Interceptor::load`] loads the programs and opens (or creates) the pinned maps;
//! [`Interceptor::attach`] attaches every program to one cgroup and pins the links, so the
//! cgroup stays guarded while no gateway runs; [`Interceptor::lookup`] maps the peer address of
//! an accepted proxy connection to the [`ConnectRecord`] the kernel wrote at `connect()`.
//!
//! Relies on: root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON for the kernel reads), cgroup v2, bpffs
//! mounted at the configured directory's filesystem, kernel BTF at `/sys/kernel/btf/vmlinux`
//! (for the offsets of `task_struct` and friends), kernel ≥ 5.7 for cgroup links.
//!
//! Limits: the executable is identified by (device, inode) of `mm->exe_file`; on filesystems
//! whose `stat` reports another device than the superblock's (btrfs subvolumes) the device will
//! not match `stat(2)`. Records live in LRU maps of [`openshell_common::RECORD_CAPACITY`]
//! entries; a record evicted before the proxy looks it up makes the proxy deny that connection.
//!
//! Restarts: maps and links are pinned under `<bpffs_dir>/v<layout version>/`. A new process
//! re-adopts both: the kernel keeps enforcing (connects go to the listener address, refused
//! while nothing listens) between the old process's exit and the new one's start.

mod btf;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, Program, ProgramError,
        links::{FdLink, PinnedLink},
    },
};
pub use btf::BtfError;
pub use openshell_common::CgroupMode;
use openshell_common::{
    self as common, Config, Counter, Ipv4Be, Ipv6Be, KernelOffsets, LAYOUT_VERSION, ListenerV4,
    ListenerV6, PeerKey, map_names,
};

/// The compiled eBPF object, built by `build.rs` through aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/openshell"));

/// Where kernel BTF lives.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The programs, in attach order: the ones that only observe first, the ones that redirect or
/// refuse last, so a half-finished attach never redirects without being able to record.
const PROGRAMS: [&str; 10] = [
    "openshell_sock_release",
    "openshell_sock_ops",
    "openshell_getpeername4",
    "openshell_getpeername6",
    "openshell_recvmsg4",
    "openshell_recvmsg6",
    "openshell_connect4",
    "openshell_connect6",
    "openshell_sendmsg4",
    "openshell_sendmsg6",
];

/// Errors of the eBPF layer. Each says what failed and on which object.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the openshell eBPF object failed (are you root on a kernel with BTF?)")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program `{program}`: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("eBPF program `{program}` is missing from the object or has the wrong type")]
    MissingProgram { program: &'static str },
    #[error("eBPF map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("eBPF map `{map}` is missing from the object")]
    MissingMap { map: &'static str },
    #[error("reading kernel BTF from {VMLINUX_BTF}: {0}")]
    BtfRead(#[source] std::io::Error),
    #[error("kernel BTF at {VMLINUX_BTF}: {0}")]
    Btf(#[from] BtfError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning or opening link {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error(
        "{path} is not on a BPF filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or \
         choose a pin directory under an existing bpffs mount"
    )]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup v2 directory")]
    NotACgroup { path: PathBuf },
    #[error("{what}: port 0 is not a usable listener port")]
    ZeroPort { what: &'static str },
}

impl EbpfError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn map(map: &'static str, source: MapError) -> Self {
        Self::Map {
            map,
            source: Box::new(source),
        }
    }

    fn program(program: &'static str, source: ProgramError) -> Self {
        Self::Program {
            program,
            source: Box::new(source),
        }
    }
}

/// Where the kernel sends what it intercepts, and where pins live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptorConfig {
    /// Transparent TCP listener for IPv4 destinations (and IPv4-mapped ones on IPv6 sockets,
    /// which are sent to `::ffff:<this address>`). Usually `127.0.0.1:<port>`.
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

    fn to_kernel(&self, offsets: KernelOffsets) -> Result<Config, EbpfError> {
        fn v4(what: &'static str, a: SocketAddrV4) -> Result<ListenerV4, EbpfError> {
            if a.port() == 0 {
                return Err(EbpfError::ZeroPort { what });
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
}

impl From<common::ConnectRecord> for ConnectRecord {
    fn from(r: common::ConnectRecord) -> Self {
        let port = r.orig_dst.port;
        let original_dst = match r.orig_dst.as_v4() {
            Some(v4) => SocketAddr::new(IpAddr::V4(Ipv4Addr::from(v4.octets())), port),
            None => SocketAddr::new(IpAddr::V6(Ipv6Addr::from(r.orig_dst.addr.octets())), port),
        };
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
        }
    }
}

/// The key under which `sock_ops` stored the record of a client with source address `peer`.
fn peer_key(peer: SocketAddr) -> PeerKey {
    match peer {
        SocketAddr::V4(a) => PeerKey::v4(Ipv4Be::from_octets(a.ip().octets()), a.port()),
        SocketAddr::V6(a) => PeerKey::v6(Ipv6Be::from_octets(a.ip().octets()), a.port()),
    }
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
}

/// The programs attached to one cgroup, pinned. Dropping an `Attachment` keeps the programs
/// attached (that is what lets enforcement survive a gateway restart); [`Attachment::detach`]
/// or [`Interceptor::detach`] removes them.
#[derive(Debug)]
#[must_use = "dropping an Attachment keeps the programs attached; call detach() to remove them"]
pub struct Attachment {
    cgroup_id: u64,
    dir: PathBuf,
    links: Vec<PinnedLink>,
    /// Whether this call attached the programs (false: re-adopted existing pins).
    created: bool,
}

impl Attachment {
    /// The cgroup v2 id the programs are attached to.
    #[must_use]
    pub const fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// Whether [`Interceptor::attach`] attached the programs now (`false`: it found them
    /// attached and pinned by an earlier gateway process and re-adopted them).
    #[must_use]
    pub const fn newly_attached(&self) -> bool {
        self.created
    }

    /// Detaches the programs from the cgroup and removes the pins.
    pub fn detach(self) -> Result<(), EbpfError> {
        for link in self.links {
            // Unpinning removes the file; dropping the returned FdLink closes the last reference
            // and detaches the program.
            drop(link.unpin().map_err(|e| EbpfError::io(&self.dir, e))?);
        }
        remove_dir_if_exists(&self.dir)
    }
}

/// The loaded programs and the maps shared with the kernel.
pub struct Interceptor {
    ebpf: Ebpf,
    config_map: Array<MapData, Config>,
    by_peer: Mutex<HashMap<MapData, PeerKey, common::ConnectRecord>>,
    modes: Mutex<HashMap<MapData, u64, u32>>,
    counters: PerCpuArray<MapData, u64>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    root: PathBuf,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Interceptor {
    /// Loads the programs, opens the pinned maps (creating and pinning them on first use),
    /// resolves kernel offsets from BTF and writes `config` into the kernel. Existing
    /// attachments (from an earlier process) start using the new configuration at once.
    pub fn load(config: &InterceptorConfig) -> Result<Self, EbpfError> {
        let offsets = kernel_offsets()?;
        let kernel_config = config.to_kernel(offsets)?;
        ensure_bpffs(&config.bpffs_dir)?;
        let root = config.bpffs_dir.join(format!("v{LAYOUT_VERSION}"));
        let maps_dir = root.join("maps");
        fs::create_dir_all(&maps_dir).map_err(|e| EbpfError::io(&maps_dir, e))?;

        let pin_paths: Vec<(&'static str, PathBuf)> = map_names::PINNED
            .iter()
            .map(|name| (*name, maps_dir.join(name)))
            .collect();
        let log_level = if config.debug_logs {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &log_level, false);
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;

        for name in PROGRAMS {
            load_program(&mut ebpf, name)?;
        }
        let logger = if config.debug_logs {
            aya_log::EbpfLogger::init(&mut ebpf).ok()
        } else {
            None
        };

        let mut config_map: Array<MapData, Config> = take_map(&mut ebpf, map_names::CONFIG)?;
        config_map
            .set(0, kernel_config, 0)
            .map_err(|e| EbpfError::map(map_names::CONFIG, e))?;
        let by_peer = take_map(&mut ebpf, map_names::BY_PEER)?;
        let modes = take_map(&mut ebpf, map_names::MODES)?;
        let counters = take_map(&mut ebpf, map_names::COUNTERS)?;
        Ok(Self {
            ebpf,
            config_map,
            by_peer: Mutex::new(by_peer),
            modes: Mutex::new(modes),
            counters,
            logger,
            root,
        })
    }

    /// The configuration currently in the kernel (for diagnostics).
    pub fn kernel_config(&self) -> Result<Config, EbpfError> {
        self.config_map
            .get(&0, 0)
            .map_err(|e| EbpfError::map(map_names::CONFIG, e))
    }

    /// Attaches every program to the cgroup v2 directory `cgroup_dir` and pins the links. If an
    /// earlier gateway process already attached and pinned them, they are re-adopted instead
    /// (never attached twice).
    pub fn attach(&mut self, cgroup_dir: &Path) -> Result<Attachment, EbpfError> {
        let cgroup_id = cgroup_id(cgroup_dir)?;
        let dir = self.links_dir(cgroup_id);
        if let Some(existing) = self.adopt(cgroup_id, &dir)? {
            return Ok(existing);
        }
        fs::create_dir_all(&dir).map_err(|e| EbpfError::io(&dir, e))?;
        let cgroup = fs::File::open(cgroup_dir).map_err(|e| EbpfError::io(cgroup_dir, e))?;
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for name in PROGRAMS {
            match self.attach_one(name, &cgroup, &dir) {
                Ok(link) => links.push(link),
                Err(err) => {
                    // Leave nothing half attached; the caller fails sandbox creation.
                    let partial = Attachment {
                        cgroup_id,
                        dir,
                        links,
                        created: true,
                    };
                    let _ = partial.detach();
                    return Err(err);
                }
            }
        }
        Ok(Attachment {
            cgroup_id,
            dir,
            links,
            created: true,
        })
    }

    /// Detaches the programs from `cgroup_dir` (attached by this or an earlier process) and
    /// forgets its mode. Call it before removing the cgroup.
    pub fn detach(&mut self, cgroup_dir: &Path) -> Result<(), EbpfError> {
        let cgroup_id = cgroup_id(cgroup_dir)?;
        let dir = self.links_dir(cgroup_id);
        if let Some(attachment) = self.adopt(cgroup_id, &dir)? {
            attachment.detach()?;
        } else {
            remove_dir_if_exists(&dir)?;
        }
        let mut modes = self
            .modes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match modes.remove(&cgroup_id) {
            Err(e) if !is_not_found(&e) => Err(EbpfError::map(map_names::MODES, e)),
            _ => Ok(()),
        }
    }

    /// Sets what the kernel does for processes in `cgroup_dir` (see [`CgroupMode`]).
    pub fn set_mode(&self, cgroup_dir: &Path, mode: CgroupMode) -> Result<(), EbpfError> {
        let cgroup_id = cgroup_id(cgroup_dir)?;
        let mut modes = self
            .modes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = match mode {
            CgroupMode::Intercept => match modes.remove(&cgroup_id) {
                Err(e) if is_not_found(&e) => Ok(()),
                other => other,
            },
            CgroupMode::NoNetwork => modes.insert(cgroup_id, mode as u32, 0),
        };
        result.map_err(|e| EbpfError::map(map_names::MODES, e))
    }

    /// The record of the connection whose client address (the proxy's `accept()` peer) is
    /// `peer`, or `None` if the kernel recorded nothing for it (then the connection did not come
    /// from a sandbox, or its record was evicted: deny it).
    pub fn lookup(&self, peer: SocketAddr) -> Result<Option<ConnectRecord>, EbpfError> {
        let by_peer = self
            .by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match by_peer.get(&peer_key(peer), 0) {
            Ok(r) => Ok(Some(r.into())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(EbpfError::map(map_names::BY_PEER, e)),
        }
    }

    /// As [`Interceptor::lookup`], and removes the record so that a later connection from the
    /// same source port can never be confused with this one. The proxy calls this once per
    /// accepted connection.
    pub fn take(&self, peer: SocketAddr) -> Result<Option<ConnectRecord>, EbpfError> {
        let key = peer_key(peer);
        let mut by_peer = self
            .by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let record = match by_peer.get(&key, 0) {
            Ok(r) => r,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(EbpfError::map(map_names::BY_PEER, e)),
        };
        match by_peer.remove(&key) {
            Err(e) if !is_not_found(&e) => Err(EbpfError::map(map_names::BY_PEER, e)),
            _ => Ok(Some(record.into())),
        }
    }

    /// The kernel's decision counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, EbpfError> {
        let mut totals = [0u64; Counter::COUNT as usize];
        for (i, total) in totals.iter_mut().enumerate() {
            let values = self
                .counters
                .get(&(i as u32), 0)
                .map_err(|e| EbpfError::map(map_names::COUNTERS, e))?;
            *total = values.iter().sum();
        }
        let [
            tcp_redirected,
            dns_redirected,
            udp_denied,
            no_network_denied,
            unconfigured,
            other_protocol_denied,
            record_failed,
            exe_unknown,
        ] = totals;
        Ok(Counters {
            tcp_redirected,
            dns_redirected,
            udp_denied,
            no_network_denied,
            unconfigured,
            other_protocol_denied,
            record_failed,
            exe_unknown,
        })
    }

    /// Forwards the programs' pending debug logs to the `log` crate (no-op unless
    /// [`InterceptorConfig::debug_logs`] was set).
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    fn links_dir(&self, cgroup_id: u64) -> PathBuf {
        self.root.join("links").join(cgroup_id.to_string())
    }

    /// Re-opens the pinned links of `cgroup_id`, if every program's link is pinned. A partial
    /// set (a crash in the middle of `attach`) is removed, so the caller attaches afresh.
    fn adopt(&self, cgroup_id: u64, dir: &Path) -> Result<Option<Attachment>, EbpfError> {
        if !dir.exists() {
            return Ok(None);
        }
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for name in PROGRAMS {
            let path = dir.join(name);
            match PinnedLink::from_pin(&path) {
                Ok(link) => links.push(link),
                Err(_) if !path.exists() => {
                    let partial = Attachment {
                        cgroup_id,
                        dir: dir.to_path_buf(),
                        links,
                        created: false,
                    };
                    partial.detach()?;
                    return Ok(None);
                }
                Err(e) => {
                    return Err(EbpfError::Pin {
                        path,
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(Some(Attachment {
            cgroup_id,
            dir: dir.to_path_buf(),
            links,
            created: false,
        }))
    }

    fn attach_one(
        &mut self,
        name: &'static str,
        cgroup: &fs::File,
        dir: &Path,
    ) -> Result<PinnedLink, EbpfError> {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram { program: name })?;
        let mode = CgroupAttachMode::Single;
        let err = |e| EbpfError::program(name, e);
        let link_err = |e: aya::programs::links::LinkError| EbpfError::Pin {
            path: dir.join(name),
            message: e.to_string(),
        };
        let link: FdLink = match program {
            Program::CgroupSockAddr(p) => {
                let id = p.attach(cgroup, mode).map_err(err)?;
                p.take_link(id).map_err(err)?.try_into().map_err(link_err)?
            }
            Program::SockOps(p) => {
                let id = p.attach(cgroup, mode).map_err(err)?;
                p.take_link(id).map_err(err)?.try_into().map_err(link_err)?
            }
            Program::CgroupSock(p) => {
                let id = p.attach(cgroup, mode).map_err(err)?;
                p.take_link(id).map_err(err)?.try_into().map_err(link_err)?
            }
            _ => return Err(EbpfError::MissingProgram { program: name }),
        };
        let path = dir.join(name);
        link.pin(&path).map_err(|e| EbpfError::Pin {
            path,
            message: e.to_string(),
        })
    }
}

/// Whether a map operation failed only because the key was absent (aya reports a lookup miss as
/// `KeyNotFound` but a delete miss as the syscall's ENOENT).
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), EbpfError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram { program: name })?;
    let result = match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        _ => return Err(EbpfError::MissingProgram { program: name }),
    };
    result.map_err(|e| EbpfError::program(name, e))
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::MissingMap { map: name })?;
    M::try_from(map).map_err(|e| EbpfError::map(name, e))
}

/// The cgroup v2 id of a cgroup directory: its inode number on cgroupfs.
fn cgroup_id(cgroup_dir: &Path) -> Result<u64, EbpfError> {
    let meta = fs::metadata(cgroup_dir).map_err(|e| EbpfError::io(cgroup_dir, e))?;
    if !meta.is_dir() || !cgroup_dir.join("cgroup.procs").exists() {
        return Err(EbpfError::NotACgroup {
            path: cgroup_dir.to_path_buf(),
        });
    }
    Ok(meta.ino())
}

fn remove_dir_if_exists(dir: &Path) -> Result<(), EbpfError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EbpfError::io(dir, e)),
    }
}

/// The conventional bpffs mount point, which systemd mounts at boot on most distributions.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Checks that `dir` (or its nearest existing ancestor) is on bpffs. When that ancestor is the
/// conventional `/sys/fs/bpf` and nothing is mounted there yet, mounts bpffs, as systemd does.
fn ensure_bpffs(dir: &Path) -> Result<(), EbpfError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    if existing != Path::new(BPFFS_MOUNT) {
        return Err(EbpfError::NotBpffs {
            path: dir.to_path_buf(),
        });
    }
    mount_bpffs(existing)?;
    if is_bpffs(existing)? {
        Ok(())
    } else {
        Err(EbpfError::NotBpffs {
            path: dir.to_path_buf(),
        })
    }
}

fn is_bpffs(path: &Path) -> Result<bool, EbpfError> {
    let c_path = path_cstring(path)?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated path and `stat` is large enough for the result.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(EbpfError::io(path, std::io::Error::last_os_error()));
    }
    // SAFETY: statfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(i64::from(stat.f_type) == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<(), EbpfError> {
    let c_path = path_cstring(path)?;
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(EbpfError::MountBpffs {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        })
    }
}

fn path_cstring(path: &Path) -> Result<std::ffi::CString, EbpfError> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        EbpfError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"),
        )
    })
}

/// Resolves the kernel structure offsets the connect programs follow.
fn kernel_offsets() -> Result<KernelOffsets, EbpfError> {
    let data = fs::read(VMLINUX_BTF).map_err(EbpfError::BtfRead)?;
    let btf = btf::Btf::parse(&data)?;
    Ok(KernelOffsets {
        task_mm: btf.member_offset("task_struct", "mm", 8)?,
        task_real_parent: btf.member_offset("task_struct", "real_parent", 8)?,
        task_tgid: btf.member_offset("task_struct", "tgid", 4)?,
        mm_exe_file: btf.member_offset("mm_struct", "exe_file", 8)?,
        file_f_inode: btf.member_offset("file", "f_inode", 8)?,
        inode_i_sb: btf.member_offset("inode", "i_sb", 8)?,
        inode_i_ino: btf.member_offset("inode", "i_ino", 8)?,
        sb_s_dev: btf.member_offset("super_block", "s_dev", 4)?,
    })
}

#[cfg(test)]
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
            _pad: 0,
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
