//! The caller's side: validate, resolve the identity, start the init process, wait for its word.

use std::fs::File;
use std::io::{Seek as _, SeekFrom, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::init::{InitArgs, InitRequest, SUBCOMMAND, StatusMessage};
use super::{EnforcementReport, LaunchSpec, SandboxError, identity};

/// How long the init process may take from start to exec. Setup takes milliseconds; this only
/// bounds a wedged init (a hung cgroup write, say) so that the caller never waits forever.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest status output accepted from the init process.
const MAX_STATUS: usize = 16 << 20;

/// The standard streams of the sandboxed program.
#[derive(Debug)]
pub struct SandboxStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Make stdin (a pty slave) the controlling terminal of the program's new session.
    pub controlling_tty: bool,
}

/// A sandboxed program that is running.
#[derive(Debug)]
pub struct Launched {
    /// Its pid, a child of the caller: the caller must reap it (`waitpid`, or the pidfd).
    pub pid: i32,
    /// A pidfd for `pid`, opened before anyone could reap it (poll it for exit; `pidfd_send_signal`).
    pub pidfd: OwnedFd,
    /// What each enforcement step did.
    pub report: EnforcementReport,
}

/// Starts `spec.argv` in a sandbox and returns once it runs under every restriction.
///
/// Blocking: it waits for the init process to finish its setup (milliseconds; at most
/// [`SETUP_TIMEOUT`]). Async callers should use `spawn_blocking`. On error nothing runs and the
/// init process has been reaped.
pub fn spawn(spec: &LaunchSpec, stdio: SandboxStdio) -> Result<Launched, SandboxError> {
    spec.validate()?;
    let identity = identity::resolve(&spec.run_as_user, &spec.run_as_group)?;
    let request = InitRequest {
        spec: spec.clone(),
        identity,
        controlling_tty: stdio.controlling_tty,
    };
    let request_fd = request_memfd(&request)?;
    let (status_read, status_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::io("creating the status pipe", e))?;
    // Both fds must survive std's dup2 of the stdio onto 0-2.
    let request_fd = above_stdio(request_fd)?;
    let status_write = above_stdio(status_write)?;
    let args = InitArgs {
        spec_fd: request_fd.as_raw_fd(),
        status_fd: status_write.as_raw_fd(),
    };

    let mut command = Command::new(&spec.init_program);
    command
        .arg(SUBCOMMAND)
        .arg("--spec-fd")
        .arg(args.spec_fd.to_string())
        .arg("--status-fd")
        .arg(args.status_fd.to_string())
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::from(stdio.stdin))
        .stdout(Stdio::from(stdio.stdout))
        .stderr(Stdio::from(stdio.stderr));
    let inherited = [args.spec_fd, args.status_fd];
    // SAFETY: the hook runs between fork and exec and only calls fcntl, which is
    // async-signal-safe; it allocates nothing (an OS error is stored inline).
    unsafe {
        command.pre_exec(move || {
            for fd in inherited {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| SandboxError::SpawnInit {
        program: spec.init_program.clone(),
        source,
    })?;
    // Close the parent's copies: EOF on the pipe must mean the child exec'd or exited.
    drop(command);
    drop(status_write);
    drop(request_fd);
    wait_for_init(child, &status_read)
}

fn wait_for_init(mut child: Child, status_read: &OwnedFd) -> Result<Launched, SandboxError> {
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(err) => {
            reap(&mut child, true);
            return Err(err);
        }
    };
    let output = match read_to_eof(status_read, SETUP_TIMEOUT) {
        Ok(Some(output)) => output,
        Ok(None) => {
            reap(&mut child, true);
            return Err(SandboxError::InitTimeout {
                seconds: SETUP_TIMEOUT.as_secs(),
            });
        }
        Err(err) => {
            reap(&mut child, true);
            return Err(err);
        }
    };
    let last = output
        .split(|b| *b == b'\n')
        .rfind(|line| !line.is_empty())
        .map(serde_json::from_slice::<StatusMessage>);
    match last {
        Some(Ok(StatusMessage::Ready(report))) => Ok(Launched {
            pid,
            pidfd,
            report: *report,
        }),
        Some(Ok(StatusMessage::Failed(err))) => {
            reap(&mut child, false);
            Err(err.into())
        }
        Some(Err(err)) => {
            reap(&mut child, true);
            Err(SandboxError::io(
                "the sandbox init process sent an unreadable status",
                std::io::Error::new(std::io::ErrorKind::InvalidData, err),
            ))
        }
        None => {
            let status = child
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            Err(SandboxError::InitDied { status })
        }
    }
}

/// Kills (if asked) and reaps the init process; it is already failing, so errors are moot.
fn reap(child: &mut Child, kill: bool) {
    if kill {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// The request as JSON in a memfd, rewound for the child to read.
fn request_memfd(request: &InitRequest) -> Result<OwnedFd, SandboxError> {
    let fd = nix::sys::memfd::memfd_create(
        c"openshell-sandbox-request",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .map_err(|e| SandboxError::io("creating the request memfd", e))?;
    let mut file = File::from(fd);
    serde_json::to_writer(&mut file, request)
        .map_err(|e| SandboxError::io("writing the request", std::io::Error::from(e)))?;
    file.flush()
        .map_err(|e| SandboxError::io("writing the request", e))?;
    // The child shares this file offset.
    file.seek(SeekFrom::Start(0))
        .map_err(|e| SandboxError::io("rewinding the request", e))?;
    Ok(OwnedFd::from(file))
}

/// Moves an fd above 2 (a daemon started with closed stdio hands out 0-2 for new fds).
fn above_stdio(fd: OwnedFd) -> Result<OwnedFd, SandboxError> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let dup = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
        .map_err(|e| SandboxError::io("duplicating an fd above the standard streams", e))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new open fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

fn pidfd_open(pid: i32) -> Result<OwnedFd, SandboxError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory involved.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(SandboxError::io(
            format!("pidfd_open({pid})"),
            Errno::last(),
        ));
    }
    let fd = i32::try_from(fd).map_err(|_| SandboxError::io("pidfd_open", Errno::EBADF))?;
    // SAFETY: fd is a new open fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads until EOF; `None` when the deadline passes first.
fn read_to_eof(fd: &OwnedFd, timeout: Duration) -> Result<Option<Vec<u8>>, SandboxError> {
    let deadline = Instant::now() + timeout;
    let mut output = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, wait) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(SandboxError::io("waiting for the sandbox init process", e)),
        }
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => return Ok(Some(output)),
            Ok(n) => {
                output.extend_from_slice(&buf[..n]);
                if output.len() > MAX_STATUS {
                    return Err(SandboxError::io(
                        "the sandbox init process sent too much status",
                        Errno::EMSGSIZE,
                    ));
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err(SandboxError::io("reading the sandbox init status", e)),
        }
    }
}
