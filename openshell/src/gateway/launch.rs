//! The gateway's one seam to the launcher and the policy module: static configuration of a
//! sandbox, and starting a process in it.
//!
//! [`static_config`] reads the policy with [`crate::policy::parse`].
//!
//! TEMPORARY (until `openshell::sandbox::spawn` lands on main): [`launch`] only joins the
//! sandbox cgroup, starts a new session and execs, with no mount namespace, Landlock, seccomp or
//! identity switch. It is replaced by a call to the launcher; nothing else in the gateway changes.

use std::{
    fs::OpenOptions,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::PathBuf,
    process::{Command, Stdio},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The static sections of a sandbox's policy (fixed at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticConfig {
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    pub include_workdir: bool,
    /// `best_effort` or `hard_requirement`.
    pub compatibility: String,
    pub run_as_user: String,
    pub run_as_group: String,
}

/// A validated policy as the gateway keeps it.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    pub static_config: StaticConfig,
    /// SHA-256 (hex) of the canonical form.
    pub sha256: String,
}

/// A policy that failed validation; `Display` is one `FILE:LINE:COL: error: ...` line per error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyRejected(pub String);

/// Validates `text` (named `source` in error messages) and extracts its static sections.
pub fn static_config(source: &str, text: &str) -> Result<LoadedPolicy, PolicyRejected> {
    let policy = crate::policy::parse(source, text).map_err(|e| PolicyRejected(e.to_string()))?;
    let canonical = policy
        .to_canonical_yaml()
        .map_err(|e| PolicyRejected(format!("{source}: writing the canonical form: {e}")))?;
    let compatibility = match policy.landlock.compatibility {
        crate::policy::Compatibility::BestEffort => "best_effort",
        crate::policy::Compatibility::HardRequirement => "hard_requirement",
    };
    Ok(LoadedPolicy {
        static_config: StaticConfig {
            read_only: policy.filesystem.read_only,
            read_write: policy.filesystem.read_write,
            include_workdir: policy.filesystem.include_workdir,
            compatibility: compatibility.to_owned(),
            run_as_user: policy.process.run_as_user,
            run_as_group: policy.process.run_as_group,
        },
        sha256: hex(&Sha256::digest(canonical.as_bytes())),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What to start and where.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cgroup_dir: PathBuf,
    /// Host directory mounted at `/sandbox`.
    pub workdir: PathBuf,
    /// Host directory mounted at `/tmp`.
    pub tmpdir: PathBuf,
    pub config: StaticConfig,
}

/// The standard streams of the new process.
#[derive(Debug)]
pub struct LaunchStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// stdin is a pty slave that becomes the controlling terminal of a new session.
    pub controlling_tty: bool,
}

/// A started process: a child of the gateway, which must reap it.
#[derive(Debug)]
pub struct Launched {
    pub pid: i32,
    /// What the launcher enforced, as JSON.
    pub report: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Sandbox(String),
    #[error("opening {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting {program:?}: {source}")]
    Exec {
        program: String,
        #[source]
        source: io::Error,
    },
}

/// Starts `req.argv` in the sandbox. Blocking; call it from `spawn_blocking`.
pub fn launch(req: &LaunchRequest, stdio: LaunchStdio) -> Result<Launched, LaunchError> {
    let Some(program) = req.argv.first() else {
        return Err(LaunchError::Sandbox("no command given".to_owned()));
    };
    let procs_path = req.cgroup_dir.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(|source| LaunchError::Cgroup {
            path: procs_path.clone(),
            source,
        })?;
    let procs_fd = procs.as_raw_fd();
    let tty = stdio.controlling_tty;
    let mut command = Command::new(program);
    command
        .args(&req.argv[1..])
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&req.workdir)
        .stdin(Stdio::from(stdio.stdin))
        .stdout(Stdio::from(stdio.stdout))
        .stderr(Stdio::from(stdio.stderr));
    // SAFETY: runs between fork and exec and only makes async-signal-safe system calls
    // (write, setsid, ioctl) on descriptors that stay open across the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| LaunchError::Exec {
        program: program.clone(),
        source,
    })?;
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    Ok(Launched {
        pid,
        report: serde_json::json!({
            "launcher": "temporary (cgroup and session only; no Landlock, seccomp or identity switch)",
            "cgroup": req.cgroup_dir,
        }),
    })
}
