//! Step 1: a private mount namespace with the sandbox's own `/sandbox` and `/tmp`.
//!
//! The namespace starts as a copy of the host's. Every mount is made private first, so nothing
//! mounted here shows up on the host and nothing the host mounts later appears here. Then the
//! sandbox's working directory is bind-mounted on `/sandbox` and its private temporary
//! directory on `/tmp`, both `nosuid,nodev`.
//!
//! A bind mount needs an existing mount point. `/tmp` exists on every host; `/sandbox` usually
//! does not, so the launcher creates it on the host as an empty `root:root 0755` directory the
//! first time (it stays empty on the host: only sandboxes see something mounted there). A
//! `/sandbox` that exists as anything but a real directory is refused rather than replaced.
//!
//! When the spec asks for it, one host file is also bind-mounted read-only over an existing file
//! (the gateway shows the sandbox's CA bundle at the distro's default CA path this way).
//!
//! All sources are opened before the first mount and mounted through `/proc/self/fd`, so a
//! source below `/tmp` (test directories often are) is not hidden by the `/tmp` mount.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use super::error::{SetupError, Step};
use super::identity::Identity;
use super::report::MountReport;
use super::spec::{LaunchSpec, SANDBOX_DIR, TMP_DIR};

const STEP: Step = Step::MountNamespace;

/// Creates the namespace and the two mounts. Runs as root, before the identity switch.
pub(crate) fn setup(spec: &LaunchSpec, identity: &Identity) -> Result<MountReport, SetupError> {
    ensure_mount_point(Path::new(SANDBOX_DIR))?;
    ensure_mount_point(Path::new(TMP_DIR))?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| SetupError::sys(STEP, "unshare(CLONE_NEWNS)", e))?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| SetupError::sys(STEP, "making every mount private", e).at("/"))?;
    // Opened inside the new namespace (a bind source must belong to it) and before the first
    // mount (which could hide the other source).
    let workdir = open_dir(&spec.workdir)?;
    let tmpdir = open_dir(&spec.tmpdir)?;
    let extra = spec
        .read_only_bind
        .as_ref()
        .map(|b| open_file(&b.source).map(|fd| (fd, b.target.as_path())))
        .transpose()?;
    // The sandbox user owns its working directory; /tmp behaves like a host /tmp.
    let (uid, gid) = (Uid::from_raw(identity.uid), Gid::from_raw(identity.gid));
    nix::unistd::fchown(&workdir, Some(uid), Some(gid)).map_err(|e| {
        SetupError::sys(STEP, "fchown of the working directory", e).at(&spec.workdir)
    })?;
    nix::unistd::fchown(&tmpdir, Some(Uid::from_raw(0)), Some(Gid::from_raw(0))).map_err(|e| {
        SetupError::sys(STEP, "fchown of the temporary directory", e).at(&spec.tmpdir)
    })?;
    nix::sys::stat::fchmod(&tmpdir, Mode::from_bits_truncate(0o1777)).map_err(|e| {
        SetupError::sys(STEP, "fchmod 1777 of the temporary directory", e).at(&spec.tmpdir)
    })?;
    bind(&workdir, Path::new(SANDBOX_DIR))?;
    bind(&tmpdir, Path::new(TMP_DIR))?;
    if let Some((source, target)) = &extra {
        bind_read_only(source, target)?;
    }
    Ok(MountReport {
        private: true,
        sandbox: spec.workdir.clone(),
        tmp: spec.tmpdir.clone(),
    })
}

fn ensure_mount_point(path: &Path) -> Result<(), SetupError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(SetupError::new(
            STEP,
            "exists on the host but is not a directory; openshell mounts the sandbox's directory \
             there. Move it away",
        )
        .at(path)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            match nix::unistd::mkdir(path, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(nix::Error::EEXIST) => Ok(()),
                Err(e) => {
                    Err(SetupError::sys(STEP, "creating the mount point on the host", e).at(path))
                }
            }
        }
        Err(err) => Err(SetupError::io(STEP, "inspecting the mount point", &err).at(path)),
    }
}

fn open_dir(path: &Path) -> Result<OwnedFd, SetupError> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SetupError::sys(STEP, "opening the directory to mount", e).at(path))
}

fn open_file(path: &Path) -> Result<OwnedFd, SetupError> {
    nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| SetupError::sys(STEP, "opening the file to mount", e).at(path))
}

/// A read-only file bind mount; `target` must exist in the sandbox.
fn bind_read_only(source: &OwnedFd, target: &Path) -> Result<(), SetupError> {
    match std::fs::metadata(target) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Err(SetupError::new(
                STEP,
                "is not a regular file; cannot mount a file over it",
            )
            .at(target));
        }
        Err(err) => {
            return Err(SetupError::io(STEP, "inspecting the mount target", &err).at(target));
        }
    }
    bind_with(source, target, MsFlags::MS_RDONLY)
}

fn bind(source: &OwnedFd, target: &Path) -> Result<(), SetupError> {
    bind_with(source, target, MsFlags::empty())
}

fn bind_with(source: &OwnedFd, target: &Path, extra: MsFlags) -> Result<(), SetupError> {
    let source = format!("/proc/self/fd/{}", source.as_raw_fd());
    nix::mount::mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| SetupError::sys(STEP, "bind mount", e).at(target))?;
    let flags =
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | extra;
    nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(|e| SetupError::sys(STEP, "remounting nosuid,nodev", e).at(target))
}
