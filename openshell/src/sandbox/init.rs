//! The init process: `openshell __sandbox-init`, started by [`super::spawn`].
//!
//! It is a fresh, single-threaded exec of the openshell binary, so it may allocate and call the
//! landlock and libseccomp crates freely, which a `pre_exec` hook after `fork` in the threaded
//! gateway could not. It reads its request (spec and resolved identity) from an inherited
//! memfd, applies the steps in order, writes one JSON line to the status pipe, and execs the
//! program. The status pipe is close-on-exec: the parent reads until end of file, and a last
//! line `ready` followed by EOF means the exec happened.

use std::convert::Infallible;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::sys::signal::{SigSet, SigmaskHow};
use serde::{Deserialize, Serialize};

use super::error::{SetupError, Step};
use super::identity::{self, Identity};
use super::report::{CapabilityReport, EnforcementReport};
use super::{LaunchSpec, landlock, mounts, privileges, seccomp};

/// Name of the hidden subcommand.
pub const SUBCOMMAND: &str = "__sandbox-init";

/// Largest request accepted (4096 paths of 4096 bytes plus argv and env fit easily).
const MAX_REQUEST: u64 = 64 << 20;

/// `PATH` used when the spec's environment has none (execvp's default without ".").
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Exit codes of a failed init, as shells use them.
const EXIT_SETUP_FAILED: u8 = 125;
const EXIT_NOT_EXECUTABLE: u8 = 126;
const EXIT_NOT_FOUND: u8 = 127;

/// Arguments of the hidden `__sandbox-init` subcommand (internal; only [`super::spawn`] calls it).
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Inherited fd holding the JSON request.
    #[arg(long)]
    pub spec_fd: RawFd,
    /// Inherited fd of the close-on-exec status pipe.
    #[arg(long)]
    pub status_fd: RawFd,
}

/// What the parent sends.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InitRequest {
    pub spec: LaunchSpec,
    pub identity: Identity,
    pub controlling_tty: bool,
}

/// One line on the status pipe.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StatusMessage {
    /// Every step succeeded; exec comes next.
    Ready(Box<EnforcementReport>),
    /// A step failed; the program did not run.
    Failed(SetupError),
}

/// Entry point of `openshell __sandbox-init`. Returns only when something failed.
pub fn main(args: &InitArgs) -> ExitCode {
    let mut status = match take_fd(args.status_fd) {
        Ok(fd) => File::from(fd),
        Err(err) => {
            // Without a status pipe nobody can be told why; stderr is the sandbox's stderr.
            let _ = writeln!(
                std::io::stderr(),
                "openshell {SUBCOMMAND}: {err} (internal command)"
            );
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let Err(err) = run(args, &mut status);
    let code = match (err.step, err.errno) {
        (Step::Exec, Some(libc::ENOENT)) => EXIT_NOT_FOUND,
        (Step::Exec, _) => EXIT_NOT_EXECUTABLE,
        _ => EXIT_SETUP_FAILED,
    };
    // If the launcher is gone there is nobody left to tell.
    let _ = send(&mut status, &StatusMessage::Failed(err));
    ExitCode::from(code)
}

fn run(args: &InitArgs, status: &mut File) -> Result<Infallible, SetupError> {
    let request = read_request(args.spec_fd)?;
    prepare_process()?;
    let spec = &request.spec;

    if let Some(cgroup) = &spec.cgroup_dir {
        join_cgroup(cgroup)?;
    }
    start_session(request.controlling_tty)?;
    // 1. Mount namespace.
    let mount_namespace = mounts::setup(spec, &request.identity)?;
    // 2. No new privileges, empty capability sets.
    privileges::set_no_new_privs()?;
    let bounding_dropped = privileges::clear_capabilities()?;
    // 3. Identity.
    let identity = identity::switch(&request.identity)?;
    // 4. Landlock.
    let planned = landlock::plan(&spec.filesystem, &spec.cwd, &landlock::terminals());
    let landlock = landlock::apply(&planned, spec.compatibility, landlock::kernel_abi())?;
    let mut stderr = std::io::stderr();
    for warning in &landlock.warnings {
        // A closed stderr must not stop the sandbox; the report carries the warning too.
        let _ = writeln!(stderr, "openshell: warning: {warning}");
    }
    // 5. seccomp.
    let seccomp = seccomp::apply()?;

    nix::unistd::chdir(&spec.cwd).map_err(|e| {
        SetupError::sys(Step::WorkingDirectory, "chdir as the sandbox user", e).at(&spec.cwd)
    })?;
    let exec = Exec::new(spec)?;
    let report = EnforcementReport {
        cgroup: spec.cgroup_dir.clone(),
        mount_namespace,
        no_new_privs: true,
        capabilities: CapabilityReport {
            bounding_dropped,
            bounding_ambient_inheritable_empty: true,
            effective_permitted_empty: true,
        },
        identity,
        landlock: landlock.report,
        seccomp,
        warnings: landlock.warnings,
    };
    send(status, &StatusMessage::Ready(Box::new(report)))
        .map_err(|e| SetupError::io(Step::Exec, "reporting to the launcher", &e))?;
    // The status pipe is close-on-exec: a successful exec closes it, which the launcher sees.
    Err(exec.run())
}

fn read_request(fd: RawFd) -> Result<InitRequest, SetupError> {
    let mut file = File::from(take_fd(fd)?);
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_REQUEST)
        .read_to_end(&mut bytes)
        .map_err(|e| SetupError::io(Step::Spec, format!("reading the request from fd {fd}"), &e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        SetupError::new(
            Step::Spec,
            format!("the request is not valid JSON of this openshell version: {e}"),
        )
    })
}

/// Adopts an fd inherited from the launcher.
fn take_fd(fd: RawFd) -> Result<OwnedFd, SetupError> {
    if fd < 3 {
        return Err(SetupError::new(
            Step::Spec,
            format!("fd {fd} is a standard stream"),
        ));
    }
    // SAFETY: F_GETFD only reads the fd's flags; it checks that the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(SetupError::sys(
            Step::Spec,
            format!("fd {fd} from the launcher"),
            nix::Error::last(),
        ));
    }
    // SAFETY: the fd is open (checked above) and was handed to this process for its sole use;
    // each fd number is adopted once, at the start of `main`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(status: &mut File, message: &StatusMessage) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    status.write_all(&line)
}

/// Close-on-exec for every inherited fd above stderr, default signal dispositions and an
/// empty signal mask, one thread.
fn prepare_process() -> Result<(), SetupError> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on fds; it frees nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        return Err(SetupError::sys(
            Step::Spec,
            "close_range(CLOSE_RANGE_CLOEXEC)",
            nix::Error::last(),
        ));
    }
    reset_ignored_signals()?;
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| SetupError::sys(Step::Spec, "clearing the signal mask", e))?;
    // Landlock and seccomp bind the calling thread only; a second thread would stay unconfined
    // until exec. Nothing in the init path starts one, and this keeps it that way.
    let threads = std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .unwrap_or(0);
    if threads != 1 {
        return Err(SetupError::new(
            Step::Spec,
            format!("the init process has {threads} threads; it must run single-threaded"),
        ));
    }
    Ok(())
}

/// The kernel's `struct sigaction` as `rt_sigaction` takes it. Only the handler (first on
/// every architecture) is read or set; the rest stays zero, and the struct is at least as
/// large as any architecture's.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Ignored signals stay ignored across exec. The Rust runtime ignores SIGPIPE, and a daemon
/// may have been started with SIGINT, SIGHUP or a real-time signal ignored; a sandboxed shell
/// must see all of them at their defaults. glibc refuses to touch the real-time signals it
/// reserves (32, 33), so this goes to the kernel directly.
fn reset_ignored_signals() -> Result<(), SetupError> {
    const SIGSET_SIZE: usize = 8;
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        let mut old = KernelSigaction::default();
        // SAFETY: a NULL new action only queries; `old` is a writable struct at least as large
        // as the kernel's struct sigaction.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                std::ptr::null::<KernelSigaction>(),
                &raw mut old,
                SIGSET_SIZE,
            )
        };
        if rc != 0 || old.handler != libc::SIG_IGN {
            continue;
        }
        let default = KernelSigaction {
            handler: libc::SIG_DFL,
            ..KernelSigaction::default()
        };
        // SAFETY: `default` is a valid action (SIG_DFL, no flags, empty mask) that the kernel
        // only reads; the old action is not requested.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &raw const default,
                std::ptr::null_mut::<KernelSigaction>(),
                SIGSET_SIZE,
            )
        };
        if rc != 0 {
            return Err(SetupError::sys(
                Step::Spec,
                format!("resetting signal {signal} to its default"),
                nix::Error::last(),
            ));
        }
    }
    Ok(())
}

fn join_cgroup(dir: &Path) -> Result<(), SetupError> {
    let procs = dir.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .and_then(|mut f| f.write_all(b"0\n"))
        .map_err(|e| SetupError::io(Step::Cgroup, "joining the cgroup", &e).at(procs))
}

/// A new session, so that the sandbox never shares the gateway's process group, and the pty
/// on stdin as controlling terminal when asked for.
fn start_session(controlling_tty: bool) -> Result<(), SetupError> {
    nix::unistd::setsid().map_err(|e| SetupError::sys(Step::Terminal, "setsid", e))?;
    if controlling_tty {
        // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal) and touches no memory.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } == -1 {
            return Err(SetupError::sys(
                Step::Terminal,
                "making stdin the controlling terminal (TIOCSCTTY)",
                nix::Error::last(),
            ));
        }
    }
    Ok(())
}

/// The exec step, prepared before the report is sent so that only the exec itself can fail
/// after it.
struct Exec {
    program: OsString,
    candidates: Vec<PathBuf>,
    search_path: OsString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

impl Exec {
    fn new(spec: &LaunchSpec) -> Result<Self, SetupError> {
        let cstring = |bytes: Vec<u8>| {
            CString::new(bytes)
                .map_err(|_| SetupError::new(Step::Exec, "an argument contains a NUL byte"))
        };
        let argv = spec
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes().to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = spec
            .env
            .iter()
            .map(|(k, v)| cstring([k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<Result<Vec<_>, _>>()?;
        let program = spec.argv.first().cloned().unwrap_or_default();
        let search_path = spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or_else(|| OsString::from(DEFAULT_PATH), |(_, v)| v.clone());
        let candidates = candidates(&program, &search_path);
        Ok(Self {
            program,
            candidates,
            search_path,
            argv,
            envp,
        })
    }

    /// execve each candidate in turn like execvp; returns only on failure.
    fn run(self) -> SetupError {
        let mut denied = None;
        for candidate in &self.candidates {
            let Ok(path) = CString::new(candidate.as_os_str().as_bytes()) else {
                continue;
            };
            let err = match nix::unistd::execve(&path, &self.argv, &self.envp) {
                Err(err) => err,
                Ok(never) => match never {},
            };
            match err {
                nix::Error::ENOENT | nix::Error::ENOTDIR | nix::Error::ESTALE => {}
                nix::Error::EACCES => denied = Some(candidate.clone()),
                other => return SetupError::sys(Step::Exec, "execve", other).at(candidate),
            }
        }
        let program = Path::new(&self.program);
        if let Some(path) = denied {
            return SetupError::sys(
                Step::Exec,
                "the program is not executable by the sandbox user, or a filesystem_policy rule \
                 denies it",
                nix::Error::EACCES,
            )
            .at(path);
        }
        let message = if self.program.as_bytes().contains(&b'/') {
            "the program does not exist inside the sandbox".to_owned()
        } else {
            format!(
                "the program was not found in PATH ({}) inside the sandbox",
                self.search_path.to_string_lossy()
            )
        };
        SetupError {
            step: Step::Exec,
            path: Some(program.into()),
            message,
            errno: Some(libc::ENOENT),
        }
    }
}

/// Where execvp would look for `program`.
fn candidates(program: &OsStr, search_path: &OsStr) -> Vec<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return vec![PathBuf::from(program)];
    }
    search_path
        .as_bytes()
        .split(|b| *b == b':')
        .map(|dir| {
            // An empty PATH entry means the current directory, as in execvp.
            let dir = if dir.is_empty() {
                Path::new(".")
            } else {
                Path::new(OsStr::from_bytes(dir))
            };
            dir.join(program)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_execvp() {
        let found = candidates(OsStr::new("ls"), OsStr::new("/usr/bin::/bin"));
        assert_eq!(
            found,
            vec![
                PathBuf::from("/usr/bin/ls"),
                "./ls".into(),
                "/bin/ls".into()
            ]
        );
        assert_eq!(
            candidates(OsStr::new("./x"), OsStr::new("/bin")),
            vec![PathBuf::from("./x")]
        );
    }

    #[test]
    fn status_messages_round_trip() {
        let failed = StatusMessage::Failed(SetupError::new(Step::Landlock, "x").at("/p"));
        let line = serde_json::to_string(&failed).unwrap();
        assert_eq!(
            line,
            r#"{"failed":{"step":"landlock","path":"/p","message":"x","errno":null}}"#
        );
    }
}
