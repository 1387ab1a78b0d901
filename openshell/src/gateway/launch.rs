//! The gateway's one seam to the policy module and the launcher: the static configuration of a
//! sandbox (from [`crate::policy::parse`]) and starting a process in it
//! ([`crate::sandbox::spawn`]).

use std::{os::fd::OwnedFd, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::sandbox::{Compatibility, FsRules, LaunchSpec, ReadOnlyBind, SandboxStdio};

/// The static sections of a sandbox's policy (fixed at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticConfig {
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    pub include_workdir: bool,
    pub compatibility: Compatibility,
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
    let sha256 = policy
        .canonical_sha256()
        .map_err(|e| PolicyRejected(format!("{source}: writing the canonical form: {e}")))?;
    let compatibility = match policy.landlock.compatibility {
        crate::policy::Compatibility::BestEffort => Compatibility::BestEffort,
        crate::policy::Compatibility::HardRequirement => Compatibility::HardRequirement,
    };
    Ok(LoadedPolicy {
        static_config: StaticConfig {
            read_only: policy.filesystem.read_only,
            read_write: policy.filesystem.read_write,
            include_workdir: policy.filesystem.include_workdir,
            compatibility,
            run_as_user: policy.process.run_as_user,
            run_as_group: policy.process.run_as_group,
        },
        sha256,
    })
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
    /// The sandbox's CA bundle over the distro's default CA path.
    pub trust_mount: Option<ReadOnlyBind>,
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
    #[error("no command given")]
    NoCommand,
    #[error("finding the openshell binary (the sandbox init program): {0}")]
    InitProgram(#[source] std::io::Error),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// Starts `req.argv` in the sandbox under its static restrictions. Blocking (the launcher waits
/// for the init process's setup); call it from `spawn_blocking`.
pub fn launch(req: &LaunchRequest, stdio: LaunchStdio) -> Result<Launched, LaunchError> {
    if req.argv.is_empty() {
        return Err(LaunchError::NoCommand);
    }
    let c = &req.config;
    let spec = LaunchSpec {
        argv: req.argv.iter().map(Into::into).collect(),
        env: req.env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
        cwd: PathBuf::from(crate::sandbox::SANDBOX_DIR),
        cgroup_dir: Some(req.cgroup_dir.clone()),
        workdir: req.workdir.clone(),
        tmpdir: req.tmpdir.clone(),
        filesystem: FsRules {
            read_only: c.read_only.clone(),
            read_write: c.read_write.clone(),
            include_workdir: c.include_workdir,
        },
        compatibility: c.compatibility,
        run_as_user: c.run_as_user.clone(),
        run_as_group: c.run_as_group.clone(),
        init_program: std::env::current_exe().map_err(LaunchError::InitProgram)?,
        read_only_bind: req.trust_mount.clone(),
    };
    let launched = crate::sandbox::spawn(
        &spec,
        SandboxStdio {
            stdin: stdio.stdin,
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            controlling_tty: stdio.controlling_tty,
        },
    )?;
    Ok(Launched {
        pid: launched.pid,
        report: serde_json::to_value(&launched.report).unwrap_or(serde_json::Value::Null),
    })
}
