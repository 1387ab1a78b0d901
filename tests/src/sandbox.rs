//! Helpers for tests that launch real sandboxed processes: per-test directories and cgroup,
//! running a program to completion with a deadline, host fixtures.

use std::ffi::OsString;
use std::fs;
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use openshell::sandbox::{EnforcementReport, LaunchSpec, SandboxError, SandboxStdio};

use crate::TestCgroup;

/// Longest any sandboxed test program may run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The `PATH` sandboxed test programs get.
pub const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Whether this process can launch sandboxes; prints why not when it cannot.
pub fn privileged() -> bool {
    if crate::is_root() {
        return true;
    }
    eprintln!("skipped: launching sandboxes needs root");
    false
}

/// Per-test state: a temporary root with the sandbox's working and temporary directories, and
/// a cgroup.
pub struct TestSandbox {
    pub root: tempfile::TempDir,
    pub workdir: PathBuf,
    pub tmpdir: PathBuf,
    pub cgroup: TestCgroup,
}

impl TestSandbox {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix(&format!("openshell-{name}-"))
            .tempdir()?;
        let workdir = root.path().join("work");
        let tmpdir = root.path().join("tmp");
        fs::create_dir(&workdir)?;
        fs::create_dir(&tmpdir)?;
        let cgroup = TestCgroup::new(name);
        Ok(Self {
            root,
            workdir,
            tmpdir,
            cgroup,
        })
    }

    /// A spec with the seed's static sections (`read_only: [/usr, /lib, /etc]`,
    /// `read_write: [/sandbox, /tmp]`, best effort, user and group `sandbox`).
    pub fn seed_spec(&self, argv: &[&str]) -> anyhow::Result<LaunchSpec> {
        let mut spec = LaunchSpec::new(
            argv.iter().map(OsString::from).collect(),
            self.workdir.clone(),
            self.tmpdir.clone(),
            crate::openshell_bin(),
        );
        spec.env = vec![
            ("PATH".into(), SANDBOX_PATH.into()),
            ("HOME".into(), "/sandbox".into()),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        spec.cgroup_dir = Some(self.cgroup.path().to_path_buf());
        spec.filesystem.read_only = vec!["/usr".into(), "/lib".into(), "/etc".into()];
        spec.filesystem.read_write = vec!["/sandbox".into(), "/tmp".into()];
        Ok(spec)
    }
}

/// How a sandboxed program ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

/// A program that ran to completion in a sandbox.
#[derive(Debug)]
pub struct Finished {
    pub exit: Exit,
    pub stdout: String,
    pub stderr: String,
    pub report: EnforcementReport,
}

impl Finished {
    /// Fails with the program's output unless it exited 0.
    pub fn success(self) -> anyhow::Result<Self> {
        if self.exit != Exit::Code(0) {
            bail!(
                "sandboxed program ended with {:?}\nstdout:\n{}\nstderr:\n{}",
                self.exit,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

/// Runs `spec` with stdin from /dev/null and captured stdout/stderr, waiting at most
/// [`RUN_TIMEOUT`]. The outer error is a test-harness failure, the inner one the launcher's.
pub fn run(spec: &LaunchSpec) -> anyhow::Result<Result<Finished, SandboxError>> {
    let stdin = OwnedFd::from(fs::File::open("/dev/null")?);
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let stdio = SandboxStdio {
        stdin,
        stdout: out_w,
        stderr: err_w,
        controlling_tty: false,
    };
    let launched = match openshell::sandbox::spawn(spec, stdio) {
        Ok(launched) => launched,
        Err(err) => return Ok(Err(err)),
    };
    let deadline = Instant::now() + RUN_TIMEOUT;
    let outputs = read_all(&[&out_r, &err_r], deadline);
    let exit = wait(&launched.pidfd, launched.pid, deadline)?;
    let mut outputs = outputs?.into_iter();
    let stdout = outputs.next().unwrap_or_default();
    let stderr = outputs.next().unwrap_or_default();
    Ok(Ok(Finished {
        exit,
        stdout,
        stderr,
        report: launched.report,
    }))
}

/// Reads every fd to EOF, all at once, until the deadline.
pub fn read_all(fds: &[&OwnedFd], deadline: Instant) -> anyhow::Result<Vec<String>> {
    let mut outputs = vec![Vec::new(); fds.len()];
    let mut open: Vec<bool> = vec![true; fds.len()];
    let mut buf = [0u8; 8192];
    while open.contains(&true) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the sandboxed program did not close its output within {RUN_TIMEOUT:?}");
        }
        let mut polls: Vec<PollFd<'_>> = fds
            .iter()
            .zip(&open)
            .filter(|(_, open)| **open)
            .map(|(fd, _)| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .collect();
        match nix::poll::poll(
            &mut polls,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = polls.iter().map(|p| p.any().unwrap_or(false)).collect();
        let open_indices: Vec<usize> = (0..fds.len()).filter(|i| open[*i]).collect();
        for (slot, i) in open_indices.into_iter().enumerate() {
            if !ready[slot] {
                continue;
            }
            match nix::unistd::read(fds[i], &mut buf) {
                // A pty master reads EIO once the last slave fd is closed.
                Ok(0) | Err(Errno::EIO) => open[i] = false,
                Ok(n) => outputs[i].extend_from_slice(&buf[..n]),
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(outputs
        .into_iter()
        .map(|o| String::from_utf8_lossy(&o).into_owned())
        .collect())
}

/// Waits for the sandboxed program through its pidfd; kills it at the deadline.
pub fn wait(pidfd: &OwnedFd, pid: i32, deadline: Instant) -> anyhow::Result<Exit> {
    let pid = Pid::from_raw(pid);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            bail!("the sandboxed program did not exit within {RUN_TIMEOUT:?} and was killed");
        }
        let mut polls = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(
            &mut polls,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(e.into()),
        }
    }
    match nix::sys::wait::waitpid(pid, None)? {
        WaitStatus::Exited(_, code) => Ok(Exit::Code(code)),
        WaitStatus::Signaled(_, signal, _) => Ok(Exit::Signal(signal)),
        other => bail!("unexpected wait status {other:?}"),
    }
}

/// A command on the host, outside any sandbox, as `uid`/`gid`, in `cgroup` (so that the
/// cgroup's drop kills whatever it leaves behind). Run it with [`host_output`] or spawn it.
pub fn host_command(
    program: &str,
    uid: u32,
    gid: u32,
    cgroup: &TestCgroup,
) -> anyhow::Result<std::process::Command> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    // Opened here, as root: cgroup v2 checks the opener's credentials, and the hook below runs
    // after the uid switch.
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.path().join("cgroup.procs"))
        .context("opening cgroup.procs")?;
    let mut command = std::process::Command::new(program);
    // std drops the supplementary groups when root sets a uid.
    command
        .uid(uid)
        .gid(gid)
        .current_dir("/")
        .stdin(std::process::Stdio::null());
    // SAFETY: the hook only calls write, which is async-signal-safe, on an fd opened before the
    // fork (close-on-exec, so the program never sees it).
    unsafe {
        command.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0\n".as_ptr().cast(), 2) != 2 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

/// What a host command printed and how it ended.
#[derive(Debug)]
pub struct HostOutput {
    pub exit: Exit,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a host command with captured output, killing it at [`RUN_TIMEOUT`].
pub fn host_output(command: &mut std::process::Command) -> anyhow::Result<HostOutput> {
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning")?;
    let stdout = OwnedFd::from(child.stdout.take().context("stdout")?);
    let stderr = OwnedFd::from(child.stderr.take().context("stderr")?);
    let deadline = Instant::now() + RUN_TIMEOUT;
    let outputs = read_all(&[&stdout, &stderr], deadline);
    let pid = i32::try_from(child.id())?;
    // SAFETY: pidfd_open takes a pid and flags; the child is not reaped yet.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let _ = child.kill();
        let _ = child.wait();
        bail!("pidfd_open: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let pidfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(i32::try_from(pidfd)?) };
    let exit = wait(&pidfd, pid, deadline)?;
    let mut outputs = outputs?.into_iter();
    Ok(HostOutput {
        exit,
        stdout: outputs.next().unwrap_or_default(),
        stderr: outputs.next().unwrap_or_default(),
    })
}

/// A host directory (outside every sandbox rule) that is removed on drop.
#[derive(Debug)]
pub struct HostDir {
    pub path: PathBuf,
}

impl HostDir {
    /// Creates `parent/openshell-test-<name>-<pid>` with `mode`, so that only Landlock, not
    /// file permissions, can stand in the sandbox's way.
    pub fn new(parent: &Path, name: &str, mode: u32) -> anyhow::Result<Self> {
        let path = parent.join(format!("openshell-test-{name}-{}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(Self { path })
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
