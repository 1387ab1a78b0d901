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
//! Listening: `bind4`/`bind6` keep a sandbox's bound sockets on loopback and the `ingress`
//! program drops every inbound packet for a sandboxed socket that did not come in on the
//! loopback device for a loopback address, so a sandbox cannot accept connections (or datagrams)
//! from other hosts, also when it listens without binding. Its listeners stay reachable from
//! this host at loopback addresses (`127.0.0.0/8`, `::1`), never at the host's network addresses.
//!
//! Limits: the executable is identified by (device, inode) of `mm->exe_file`; on filesystems
//! whose `stat` reports another device than the superblock's (btrfs subvolumes) the device will
//! not match `stat(2)`. Records live in LRU maps of [`openshell_common::RECORD_CAPACITY`]
//! entries; a record evicted before the proxy looks it up makes the proxy deny that connection.
//!
//! Restarts: maps and links are pinned under `<bpffs_dir>/v<layout version>/`. A new process
//! re-adopts both: the kernel keeps enforcing (connects go to the listener address, refused
//! while nothing listens) between the old process's exit and the new one's start.

mod bpffs;
mod btf;
mod config;
mod error;
mod fast_path;
mod kernel_relay;
mod record;

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkbAttachType, Program,
        links::{FdLink, PinnedLink},
    },
};
pub use btf::BtfError;
pub use config::InterceptorConfig;
pub use error::EbpfError;
pub use fast_path::FastPath;
pub use kernel_relay::{Joined, KernelRelay, Side};
use openshell_common::{self as common, Config, Counter, KernelOffsets, PeerKey, map_names};
pub use openshell_common::{CgroupMode, LAYOUT_VERSION};
pub use record::{ConnectRecord, Counters, ExeId, RecordCounts, endpoint_addr};

/// The compiled eBPF object, built by `build.rs` through aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/openshell"));

/// Where kernel BTF lives.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The programs, in attach order: the ones that only observe first, the ones that redirect or
/// refuse last, so a half-finished attach never redirects without being able to record.
const PROGRAMS: [&str; 13] = [
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
    "openshell_bind4",
    "openshell_bind6",
    "openshell_ingress",
];

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
    by_cookie: HashMap<MapData, u64, common::ConnectRecord>,
    modes: Mutex<HashMap<MapData, u64, u32>>,
    counters: PerCpuArray<MapData, u64>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    kernel_relay: Result<Arc<KernelRelay>, String>,
    fast_path: Arc<FastPath>,
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
        bpffs::ensure_bpffs(&config.bpffs_dir)?;
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
        loader.override_global(aya_log::LEVEL, &log_level, true);
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;

        for name in PROGRAMS {
            load_program(&mut ebpf, name)?;
        }
        // The reader exists either way; whether the programs write anything is decided in the
        // kernel by AYA_LOG_LEVEL above, so "off" costs one branch per log statement.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();

        let mut config_map: Array<MapData, Config> = take_map(&mut ebpf, map_names::CONFIG)?;
        config_map
            .set(0, kernel_config, 0)
            .map_err(|e| EbpfError::map(map_names::CONFIG, e))?;
        let by_peer = take_map(&mut ebpf, map_names::BY_PEER)?;
        let by_cookie = take_map(&mut ebpf, map_names::BY_COOKIE)?;
        let modes = take_map(&mut ebpf, map_names::MODES)?;
        let counters = take_map(&mut ebpf, map_names::COUNTERS)?;
        // The relay is an optimisation: without it (a kernel without sockmap support) the
        // proxy relays in user space.
        let kernel_relay = KernelRelay::load(&mut ebpf)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        let fast_path = Arc::new(FastPath::load(&mut ebpf)?);
        Ok(Self {
            ebpf,
            config_map,
            by_peer: Mutex::new(by_peer),
            by_cookie,
            modes: Mutex::new(modes),
            counters,
            logger,
            kernel_relay,
            fast_path,
            root,
        })
    }

    /// The verdict maps of the direct path.
    #[must_use]
    pub fn fast_path(&self) -> Arc<FastPath> {
        Arc::clone(&self.fast_path)
    }

    /// The in-kernel relay, or why it could not be set up.
    pub fn kernel_relay(&self) -> Result<Arc<KernelRelay>, String> {
        self.kernel_relay.clone()
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

    /// Sets what the kernel does for processes in `cgroup_dir` (see [`CgroupMode`]). The mode
    /// applies to processes directly in that cgroup; processes in a child cgroup of it get the
    /// default ([`CgroupMode::Intercept`]), which still sends everything through the proxy.
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
        match by_peer.get(&record::peer_key(peer), 0) {
            Ok(r) => Ok(Some(r.into())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(EbpfError::map(map_names::BY_PEER, e)),
        }
    }

    /// As [`Interceptor::lookup`], and removes the record so that a later connection from the
    /// same source port can never be confused with this one. The proxy calls this once per
    /// accepted connection.
    pub fn take(&self, peer: SocketAddr) -> Result<Option<ConnectRecord>, EbpfError> {
        let key = record::peer_key(peer);
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

    /// How many records the kernel keeps right now (diagnostics, and the tests that show
    /// records do not leak).
    pub fn record_counts(&self) -> Result<RecordCounts, EbpfError> {
        let mut sockets = 0;
        for key in self.by_cookie.keys() {
            key.map_err(|e| EbpfError::map(map_names::BY_COOKIE, e))?;
            sockets += 1;
        }
        let by_peer = self
            .by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut peers = 0;
        for key in by_peer.keys() {
            key.map_err(|e| EbpfError::map(map_names::BY_PEER, e))?;
            peers += 1;
        }
        Ok(RecordCounts { sockets, peers })
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
            bind_to_loopback,
            bind_denied,
            ingress_dropped,
            direct,
            direct_full,
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
            bind_to_loopback,
            bind_denied,
            ingress_dropped,
            direct,
            direct_full,
        })
    }

    /// Forwards the programs' pending debug logs to the `log` crate (there are none unless
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
            Program::CgroupSkb(p) => {
                let id = p
                    .attach(cgroup, CgroupSkbAttachType::Ingress, mode)
                    .map_err(err)?;
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

// The proxy shares one Interceptor between its tasks.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Interceptor>();
};

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), EbpfError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram { program: name })?;
    let result = match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
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

/// Resolves the kernel structure offsets the connect programs follow.
fn kernel_offsets() -> Result<KernelOffsets, EbpfError> {
    let data = fs::read(VMLINUX_BTF).map_err(EbpfError::BtfRead)?;
    let btf = btf::Btf::parse(&data)?;
    let (inode_i_ctime_sec, inode_i_ctime_nsec) = ctime_offsets(&btf)?;
    Ok(KernelOffsets {
        task_mm: btf.member_offset("task_struct", "mm", 8)?,
        task_real_parent: btf.member_offset("task_struct", "real_parent", 8)?,
        task_tgid: btf.member_offset("task_struct", "tgid", 4)?,
        mm_exe_file: btf.member_offset("mm_struct", "exe_file", 8)?,
        file_f_inode: btf.member_offset("file", "f_inode", 8)?,
        inode_i_sb: btf.member_offset("inode", "i_sb", 8)?,
        inode_i_ino: btf.member_offset("inode", "i_ino", 8)?,
        sb_s_dev: btf.member_offset("super_block", "s_dev", 4)?,
        inode_i_ctime_sec,
        inode_i_ctime_nsec,
        inode_i_nlink: btf.member_offset("inode", "__i_nlink", 4)?,
        file_f_path_mnt: btf.member_offset("file", "f_path", 16)?
            + btf.member_offset("path", "mnt", 8)?,
    })
}

/// Offsets of the seconds and nanoseconds of `inode`'s status-change time: two fields since
/// Linux 6.11 (`i_ctime_sec`, `i_ctime_nsec`), a `struct timespec64` before (`__i_ctime`, and
/// `i_ctime` before 6.6), whose nanoseconds (a `long`) start with their low 32 bits.
fn ctime_offsets(btf: &btf::Btf) -> Result<(u32, u32), EbpfError> {
    match btf.member_offset("inode", "i_ctime_sec", 8) {
        Ok(sec) => Ok((sec, btf.member_offset("inode", "i_ctime_nsec", 4)?)),
        Err(first) => ["__i_ctime", "i_ctime"]
            .iter()
            .find_map(|name| btf.member_offset("inode", name, 16).ok())
            .map(|at| (at, at + 8))
            .ok_or_else(|| first.into()),
    }
}
