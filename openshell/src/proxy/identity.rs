//! Who is calling: the executable (and its ancestors) behind a sandboxed connection, as paths
//! the policy can match, each checked against the SHA-256 it had when first seen.
//!
//! The kernel records the executable's (device, inode) at `connect()`; this module turns that
//! into a path by reading `/proc/<pid>/exe` and checking that the file it names is the recorded
//! one. If the process has exec'd or exited since, the path learned earlier for the same
//! (device, inode) is used when the file at that path is still the same one.
//!
//! Integrity (trust on first use): the first time a path is seen, its content's SHA-256 is
//! trusted for that path. A later executable at the same path with another hash is refused
//! ([`IdentityError::IntegrityViolation`]), so replacing `/usr/bin/curl` with another program
//! does not inherit curl's permissions. Hashes are cached by (device, inode, size, mtime, ctime),
//! so each file is read once while unchanged.
//!
//! Ancestors are the parent chain inside the sandbox's cgroup (the kernel's recorded parent
//! first, then `/proc/<pid>/status`), at most [`MAX_ANCESTORS`] deep. They are read when the
//! proxy handles the connection, so an ancestor that exits in between is missing from the chain
//! (which can only deny, never allow, more).
//!
//! A process that exited (or exec'd) before the proxy looked is resolved through the path
//! learned earlier for its file, but only while that file has one name: with several hard
//! links, the path learned may not be the one the process ran.
//!
//! Relies on: procfs, and the privilege to read other processes' `exe` links (root).
//! Limits: the trust store lives in memory (a gateway restart trusts afresh) and holds at most
//! [`TRUST_CAPACITY`] paths.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use sha2::{Digest as _, Sha256};

use crate::ebpf::ExeId;

/// Deepest parent chain that is resolved.
pub const MAX_ANCESTORS: usize = 32;
/// Most paths the trust store remembers.
pub const TRUST_CAPACITY: usize = 65_536;
/// Most (file → hash) entries cached.
const HASH_CACHE_CAPACITY: usize = 16_384;

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{self}")
    }
}

/// One resolved executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binary {
    pub pid: u32,
    pub path: Arc<Path>,
    pub sha256: Sha256Digest,
    /// The status-change time (`st_ctime`: seconds, nanoseconds) of the file version that was
    /// hashed and checked.
    pub ctime: (i64, i64),
}

/// Why the executable of a connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "the process {pid} that connected has exited or exec'd another program, and its \
         executable (device {dev:#x}, inode {ino}) was never seen before"
    )]
    Gone { pid: u32, dev: u64, ino: u64 },
    #[error(
        "the process {pid} that connected has exited or exec'd another program, and its \
         executable {path} has {links} names (hard links), so which one it ran cannot be told"
    )]
    GoneAmbiguous { pid: u32, path: PathBuf, links: u64 },
    #[error("the kernel could not record the executable of process {pid}")]
    Unrecorded { pid: u32 },
    #[error(
        "integrity violation: {path} now has SHA-256 {found}, but {trusted} was trusted for this \
         path when it was first used"
    )]
    IntegrityViolation {
        path: PathBuf,
        trusted: Sha256Digest,
        found: Sha256Digest,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl IdentityError {
    fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// What identifies one version of a file's content without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    nlink: u64,
}

impl FileVersion {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            nlink: meta.nlink(),
        }
    }

    const fn exe_id(&self) -> ExeId {
        ExeId {
            dev: self.dev,
            ino: self.ino,
        }
    }
}

/// Resolves executables to paths and checks them against the trust store. Shared by every
/// sandbox of one gateway; thread-safe. The calls read files: run them on a blocking thread.
#[derive(Debug, Default)]
pub struct Identities {
    state: Mutex<State>,
    proc_root: PathBuf,
}

#[derive(Debug, Default)]
struct State {
    hashes: HashMap<FileVersion, Sha256Digest>,
    trusted: HashMap<Arc<Path>, Sha256Digest>,
    paths: HashMap<ExeId, Arc<Path>>,
}

impl Identities {
    /// Resolver reading `/proc`.
    #[must_use]
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// Resolver reading another procfs mount (tests).
    #[must_use]
    pub fn with_proc_root(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            proc_root: proc_root.into(),
        }
    }

    /// The executable of process `pid`, which the kernel recorded as `recorded` at connect time.
    pub fn executable(&self, pid: u32, recorded: Option<ExeId>) -> Result<Binary, IdentityError> {
        let Some(recorded) = recorded else {
            return Err(IdentityError::Unrecorded { pid });
        };
        match self.open_exe(pid) {
            Ok((path, file, version)) if version.exe_id() == recorded => {
                self.check(pid, path, &file, version)
            }
            // Exited, exec'd, or the pid was reused: fall back to the path learned earlier.
            Ok(_) | Err(_) => self.known_path(pid, recorded),
        }
    }

    /// The executables of `pid`'s ancestors inside the cgroup `cgroup` (as written in
    /// `/proc/<pid>/cgroup` after `0::`), nearest first. `parent` is the parent the kernel
    /// recorded at connect time, if any. Ancestors that cannot be read end the chain; an
    /// integrity violation is an error.
    pub fn ancestors(
        &self,
        pid: u32,
        parent: Option<u32>,
        cgroup: &str,
    ) -> Result<Vec<Binary>, IdentityError> {
        let mut chain = Vec::new();
        let mut next = parent.or_else(|| self.parent_of(pid));
        while let Some(p) = next {
            if p <= 1 || chain.len() >= MAX_ANCESTORS || p == pid {
                break;
            }
            if self.cgroup_of(p).as_deref() != Some(cgroup) {
                break;
            }
            let Ok((path, file, version)) = self.open_exe(p) else {
                break;
            };
            chain.push(self.check(p, path, &file, version)?);
            next = self.parent_of(p);
        }
        Ok(chain)
    }

    /// The cgroup v2 path of `pid` (the part after `0::` in `/proc/<pid>/cgroup`).
    #[must_use]
    pub fn cgroup_of(&self, pid: u32) -> Option<String> {
        let text = std::fs::read_to_string(self.proc(pid, "cgroup")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_owned)
    }

    fn parent_of(&self, pid: u32) -> Option<u32> {
        let status = std::fs::read_to_string(self.proc(pid, "status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
    }

    fn proc(&self, pid: u32, file: &str) -> PathBuf {
        self.proc_root.join(pid.to_string()).join(file)
    }

    fn open_exe(&self, pid: u32) -> Result<(PathBuf, File, FileVersion), IdentityError> {
        let link = self.proc(pid, "exe");
        let path = std::fs::read_link(&link).map_err(|e| IdentityError::io(&link, e))?;
        // Opening the link opens the very file the process runs, even if the path now names
        // another one.
        let file = File::open(&link).map_err(|e| IdentityError::io(&link, e))?;
        let meta = file.metadata().map_err(|e| IdentityError::io(&link, e))?;
        Ok((path, file, FileVersion::of(&meta)))
    }

    fn known_path(&self, pid: u32, recorded: ExeId) -> Result<Binary, IdentityError> {
        let gone = || IdentityError::Gone {
            pid,
            dev: recorded.dev,
            ino: recorded.ino,
        };
        let path = self.lock().paths.get(&recorded).cloned().ok_or_else(gone)?;
        let file = File::open(&path).map_err(|_| gone())?;
        let meta = file.metadata().map_err(|e| IdentityError::io(&*path, e))?;
        let version = FileVersion::of(&meta);
        if version.exe_id() != recorded {
            return Err(gone());
        }
        if version.nlink != 1 {
            // The path learned earlier is one of several names of this file; the process may
            // have run another, which the policy may not allow.
            return Err(IdentityError::GoneAmbiguous {
                pid,
                path: path.to_path_buf(),
                links: version.nlink,
            });
        }
        self.check(pid, path.to_path_buf(), &file, version)
    }

    /// Hashes `file` (cached by version) and checks the hash against the trust store.
    fn check(
        &self,
        pid: u32,
        path: PathBuf,
        file: &File,
        version: FileVersion,
    ) -> Result<Binary, IdentityError> {
        let cached = self.lock().hashes.get(&version).copied();
        let sha256 = match cached {
            Some(h) => h,
            None => {
                let h = hash_file(file).map_err(|e| IdentityError::io(&path, e))?;
                let mut state = self.lock();
                if state.hashes.len() >= HASH_CACHE_CAPACITY {
                    state.hashes.clear();
                }
                state.hashes.insert(version, h);
                h
            }
        };
        let mut state = self.lock();
        let path: Arc<Path> = match state.trusted.get_key_value(path.as_path()) {
            Some((known, trusted)) => {
                if *trusted != sha256 {
                    return Err(IdentityError::IntegrityViolation {
                        path,
                        trusted: *trusted,
                        found: sha256,
                    });
                }
                Arc::clone(known)
            }
            None => {
                if state.trusted.len() >= TRUST_CAPACITY
                    && let Some(evict) = state.trusted.keys().next().cloned()
                {
                    state.trusted.remove(&evict);
                }
                let path: Arc<Path> = Arc::from(path);
                state.trusted.insert(Arc::clone(&path), sha256);
                path
            }
        };
        if state.paths.len() >= HASH_CACHE_CAPACITY {
            state.paths.clear();
        }
        state.paths.insert(version.exe_id(), Arc::clone(&path));
        Ok(Binary {
            pid,
            path,
            sha256,
            ctime: version.ctime,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single insert or remove, so the maps stay consistent after a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn hash_file(mut file: &File) -> io::Result<Sha256Digest> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Sha256Digest(hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::PermissionsExt as _,
        process::{Child, Command, Stdio},
    };

    use super::*;

    /// A child process that stays alive until dropped.
    struct Running(Child);

    impl Running {
        fn spawn(cmd: &mut Command) -> Self {
            cmd.stdin(Stdio::piped()).stdout(Stdio::null());
            // A binary copied just now can be briefly "busy" (ETXTBSY) while another test
            // thread's fork still holds the write descriptor; retry a few times.
            for _ in 0..50 {
                match cmd.spawn() {
                    Ok(child) => return Self(child),
                    Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => panic!("spawning {cmd:?}: {e}"),
                }
            }
            panic!("{cmd:?} stayed busy (ETXTBSY)");
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn exe_id(path: &Path) -> ExeId {
        ExeId::of_path(path).unwrap()
    }

    fn copy_executable(from: &Path, to: &Path) {
        std::fs::copy(from, to).unwrap();
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn resolves_a_running_process_to_its_real_path() {
        let ids = Identities::new();
        let cat = Running::spawn(&mut Command::new("cat"));
        let expected = std::fs::canonicalize(which("cat")).unwrap();
        let bin = ids.executable(cat.pid(), Some(exe_id(&expected))).unwrap();
        assert_eq!(&*bin.path, expected.as_path());
        assert_eq!(bin.pid, cat.pid());
        let digest = Sha256::digest(std::fs::read(&expected).unwrap());
        assert_eq!(bin.sha256.0, <[u8; 32]>::from(digest));
    }

    fn which(program: &str) -> PathBuf {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.join(program))
            .find(|p| p.is_file())
            .unwrap()
    }

    #[test]
    fn a_copy_is_another_path() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("cat");
        copy_executable(&std::fs::canonicalize(which("cat")).unwrap(), &copy);
        let ids = Identities::new();
        let proc = Running::spawn(&mut Command::new(&copy));
        let bin = ids.executable(proc.pid(), Some(exe_id(&copy))).unwrap();
        assert_eq!(&*bin.path, copy.as_path());
    }

    #[test]
    fn exited_process_falls_back_to_the_known_path_of_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("sleeper");
        copy_executable(&std::fs::canonicalize(which("cat")).unwrap(), &copy);
        let ids = Identities::new();
        let first = Running::spawn(&mut Command::new(&copy));
        let recorded = exe_id(&copy);
        ids.executable(first.pid(), Some(recorded)).unwrap();
        let gone_pid = first.pid();
        drop(first);
        // The pid no longer runs `copy`; the path learned before still has the same inode.
        let bin = ids.executable(gone_pid, Some(recorded)).unwrap();
        assert_eq!(&*bin.path, copy.as_path());
        // An executable never seen before cannot be resolved once its process is gone.
        let other = dir.path().join("other");
        copy_executable(&copy, &other);
        let err = Identities::new()
            .executable(gone_pid, Some(exe_id(&other)))
            .unwrap_err();
        assert!(matches!(err, IdentityError::Gone { .. }), "{err}");
        // Once the file has a second name, the known path may not be the one the process ran.
        let alias = dir.path().join("alias");
        std::fs::hard_link(&copy, &alias).unwrap();
        let err = ids.executable(gone_pid, Some(recorded)).unwrap_err();
        assert!(
            matches!(err, IdentityError::GoneAmbiguous { links: 2, .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string()
                .replace(&copy.display().to_string(), "COPY")
                .replace(&gone_pid.to_string(), "PID"),
            "the process PID that connected has exited or exec'd another program, and its \
             executable COPY has 2 names (hard links), so which one it ran cannot be told"
        );
    }

    #[test]
    fn a_changed_binary_at_a_trusted_path_is_an_integrity_violation() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        copy_executable(&std::fs::canonicalize(which("cat")).unwrap(), &tool);
        let ids = Identities::new();
        {
            let p = Running::spawn(&mut Command::new(&tool));
            ids.executable(p.pid(), Some(exe_id(&tool))).unwrap();
        }
        // Replace the program at the same path with another one.
        std::fs::remove_file(&tool).unwrap();
        copy_executable(&std::fs::canonicalize(which("sleep")).unwrap(), &tool);
        let p = Running::spawn(Command::new(&tool).arg("30"));
        let err = ids.executable(p.pid(), Some(exe_id(&tool))).unwrap_err();
        match err {
            IdentityError::IntegrityViolation {
                path,
                trusted,
                found,
            } => {
                assert_eq!(path, tool);
                assert_ne!(trusted, found);
            }
            other => panic!("expected an integrity violation, got {other}"),
        }
    }

    #[test]
    fn unrecorded_executable_is_an_error() {
        let err = Identities::new().executable(1, None).unwrap_err();
        assert!(matches!(err, IdentityError::Unrecorded { pid: 1 }));
    }

    #[test]
    fn ancestors_stop_at_the_cgroup_boundary() {
        // sh → sh → sleep, all in this process's cgroup. The chain of `sleep` holds both shells
        // and then this test binary, and stops before leaving the cgroup or reaching pid 1.
        let ids = Identities::new();
        let own = std::process::id();
        let cgroup = ids.cgroup_of(own).unwrap();
        let mut outer = Command::new("sh");
        outer
            .arg("-c")
            .arg("sh -c 'sleep 30; true'; true")
            .stdout(Stdio::piped());
        let shells = Running::spawn(&mut outer);
        let sleep_pid = wait_for_grandchild(shells.pid());
        let chain = ids.ancestors(sleep_pid, None, &cgroup).unwrap();
        let paths: Vec<_> = chain.iter().map(|b| b.path.to_path_buf()).collect();
        let sh = std::fs::canonicalize(which("sh")).unwrap();
        assert!(paths.len() >= 3, "{paths:?}");
        assert_eq!(paths[0], sh);
        assert_eq!(paths[1], sh);
        assert_eq!(chain[1].pid, shells.pid());
        assert_eq!(chain[2].pid, own);
        // A cgroup nobody is in: no ancestors.
        assert!(
            ids.ancestors(sleep_pid, None, "/nonexistent")
                .unwrap()
                .is_empty()
        );
    }

    /// The pid of the first grandchild of `pid` (bounded wait).
    fn wait_for_grandchild(pid: u32) -> u32 {
        let children = |p: u32| -> Vec<u32> {
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect()
        };
        for _ in 0..500 {
            if let Some(child) = children(pid).first()
                && let Some(grandchild) = children(*child).first()
            {
                return *grandchild;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("process {pid} started no grandchild within 5 s");
    }
}
