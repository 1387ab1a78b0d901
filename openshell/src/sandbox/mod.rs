//! The launcher: starts a program inside a sandbox with its static restrictions in force.
//!
//! [`spawn`] re-executes the openshell binary as the hidden `openshell __sandbox-init`
//! subcommand (see [`init`]), hands it the [`LaunchSpec`] on an inherited memfd, and waits on a
//! close-on-exec status pipe until the program has been exec'd or a step failed. The init
//! process is a fresh single-threaded process, so the landlock and libseccomp crates, which
//! allocate, never run between `fork` and `exec` of the (threaded) caller.
//!
//! The init process, in this order:
//! 0. joins the sandbox's cgroup (`cgroup.procs`) and starts a new session, with the pty on
//!    stdin as controlling terminal when asked;
//! 1. private mount namespace: every mount private, the working directory bind-mounted on
//!    `/sandbox` and the private temporary directory on `/tmp` ([`mounts`] explains the host's
//!    `/sandbox` mount point);
//! 2. `no_new_privs`, empty bounding, ambient and inheritable capability sets;
//! 3. `setgroups`/`setresgid`/`setresuid` to the resolved user and group (never root), and a
//!    check that no capability survived;
//! 4. Landlock: the policy's paths, the baseline and device paths, and the abstract-socket and
//!    signal scopes, at the highest ABI the kernel offers ([`landlock`]);
//! 5. seccomp ([`seccomp`]);
//!
//! then reports an [`EnforcementReport`] and execs the program, resolving it with the `PATH` of
//! the spec's environment, inside the sandbox.
//!
//! Needs root (CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID, CAP_CHOWN), Linux 6.12+ for Landlock ABI 6
//! (older kernels: see `landlock.compatibility`), and libseccomp. Not done here: network
//! enforcement (the eBPF programs on the cgroup), resource limits (the cgroup's controllers),
//! and a PID namespace (the sandbox sees the host's processes in /proc, read-only; Landlock's
//! signal scope and seccomp's ptrace ban keep it from touching them).

mod error;
mod identity;
pub mod init;
mod landlock;
mod mounts;
mod privileges;
mod report;
mod seccomp;
mod spawn;
mod spec;

pub use error::{SandboxError, SetupError, Step};
pub use identity::DEFAULT_ACCOUNT;
pub use init::InitArgs;
pub use landlock::REQUIRED_ABI as REQUIRED_LANDLOCK_ABI;
pub use report::{
    Access, CapabilityReport, EnforcementReport, IdentityReport, LandlockReport, LandlockRule,
    LandlockStatus, MountReport, RuleOrigin, SeccompReport, SkippedPath,
};
pub use spawn::{Launched, SETUP_TIMEOUT, SandboxStdio, spawn};
pub use spec::{Compatibility, FsRules, LaunchSpec, ReadOnlyBind, SANDBOX_DIR, TMP_DIR};
