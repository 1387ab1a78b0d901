//! cgroup v2 management: finding the hierarchy, and creating, killing and removing the cgroup of
//! each sandbox under `<cgroup2>/<base>/<sandbox>`.
//!
//! Relies on a mounted cgroup2 filesystem (found in `/proc/mounts`, never assumed: hybrid hosts
//! mount it at `/sys/fs/cgroup/unified`) and on `cgroup.kill` (Linux 5.14+). Needs root.

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

/// Base directory name used by the gateway; tests use their own.
pub const DEFAULT_BASE: &str = "openshell";

/// How long [`SandboxCgroup::kill`] waits for the cgroup to empty.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/mounts); mount one with `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    #[error("reading /proc/mounts: {0}")]
    Mounts(#[source] io::Error),
    #[error(
        "invalid cgroup name {name:?}: use 1-64 characters from [A-Za-z0-9._-], not starting with '.'"
    )]
    InvalidName { name: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} still has processes {pids:?} after {timeout:?}")]
    KillTimeout {
        path: PathBuf,
        pids: Vec<i32>,
        timeout: Duration,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup2 mount point, taken from the first `cgroup2` line of `mounts` (the text of
/// `/proc/mounts`).
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mount point of this host.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(CgroupError::Mounts)?;
    cgroup2_mount_in(&mounts).ok_or(CgroupError::NoCgroup2)
}

fn validate_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName {
            name: name.to_owned(),
        })
    }
}

/// The directory holding every sandbox cgroup: `<cgroup2>/<base>`.
#[derive(Debug, Clone)]
pub struct CgroupBase {
    path: PathBuf,
}

impl CgroupBase {
    /// Opens (creating if needed) `<cgroup2>/<base>`.
    pub fn open(base: &str) -> Result<Self, CgroupError> {
        validate_name(base)?;
        let path = cgroup2_mount()?.join(base);
        fs::create_dir_all(&path).map_err(io_err("creating cgroup", &path))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the cgroup of sandbox `name`; an existing one is reused (re-adoption after a
    /// gateway restart).
    pub fn sandbox(&self, name: &str) -> Result<SandboxCgroup, CgroupError> {
        validate_name(name)?;
        let path = self.path.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating cgroup", &path)(e)),
        }
        Ok(SandboxCgroup { path })
    }

    /// Names of the sandbox cgroups that exist under this base.
    pub fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io_err("listing cgroup", &self.path))? {
            let entry = entry.map_err(io_err("listing cgroup", &self.path))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Removes the base directory itself (only succeeds once it has no sandbox cgroups).
    pub fn remove(self) -> Result<(), CgroupError> {
        fs::remove_dir(&self.path).map_err(io_err("removing cgroup", &self.path))
    }
}

/// The cgroup of one sandbox. Every process of the sandbox lives in it; the eBPF programs are
/// attached to it.
#[derive(Debug, Clone)]
pub struct SandboxCgroup {
    path: PathBuf,
}

impl SandboxCgroup {
    /// Wraps an existing cgroup directory.
    pub fn from_path(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(io_err("writing", &procs))
    }

    /// Process ids currently in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let procs = self.path.join("cgroup.procs");
        let text = fs::read_to_string(&procs).map_err(io_err("reading", &procs))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Kills every process in the cgroup (`cgroup.kill`) and waits, bounded, until it is empty.
    pub fn kill(&self) -> Result<(), CgroupError> {
        let kill = self.path.join("cgroup.kill");
        fs::write(&kill, "1").map_err(io_err("writing", &kill))?;
        let start = Instant::now();
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() > KILL_TIMEOUT {
                return Err(CgroupError::KillTimeout {
                    path: self.path.clone(),
                    pids,
                    timeout: KILL_TIMEOUT,
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills every process and removes the cgroup. A cgroup that is already gone is not an error.
    pub fn remove(self) -> Result<(), CgroupError> {
        if !self.path.exists() {
            return Ok(());
        }
        self.kill()?;
        match fs::remove_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing cgroup", &self.path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mounts() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_octal_spaces() {
        let mounts = "cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount_in(mounts), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "..", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        for good in ["openshell", "sb-1", "a.b_c"] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
    }
}
