//! A private gateway per test: its own state directory, config file and cgroup base, stopped
//! and cleaned up on drop (even when the test fails).

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Every CLI call in a test is bounded by this.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A gateway owned by one test.
pub struct TestGateway {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Name of the cgroup base directory (under the cgroup2 mount).
    pub cgroup_base: String,
}

/// The result of one CLI call.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Fails with both streams shown unless the call exited 0.
    pub fn ok(self) -> anyhow::Result<Self> {
        if self.code != Some(0) {
            bail!(
                "exit {:?}\nstdout:\n{}\nstderr:\n{}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "stdout is not JSON:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `cmd` to completion with `stdin` as input, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, stdin: &[u8], timeout: Duration) -> anyhow::Result<Run> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let mut input = child.stdin.take().context("stdin")?;
    let data = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok(Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

impl TestGateway {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("openshell-gw-").tempdir()?;
        let cgroup_base = format!(
            "openshell-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            // Port 0: parallel test gateways never compete for the proxy's listener ports.
            format!(
                "[gateway]\ncgroup_base = \"{cgroup_base}\"\n\
                 [proxy]\ntransparent_listen = \"127.0.0.1:0\"\n\
                 [dns]\nlisten = \"127.0.0.1:0\"\n"
            ),
        )?;
        Ok(Self {
            dir,
            config,
            cgroup_base,
        })
    }

    /// A gateway whose policy DNS forwards to `dns` (a test host's resolver).
    pub fn with_dns(dns: std::net::SocketAddr) -> anyhow::Result<Self> {
        let gw = Self::new()?;
        gw.write_config(dns, None)?;
        Ok(gw)
    }

    /// As [`TestGateway::with_dns`], and trusting the CA `ca_pem` for upstream TLS (a test
    /// host's HTTPS server).
    pub fn with_dns_and_ca(dns: std::net::SocketAddr, ca_pem: &str) -> anyhow::Result<Self> {
        let gw = Self::new()?;
        let ca_file = gw.dir.path().join("test-ca.pem");
        std::fs::write(&ca_file, ca_pem)?;
        gw.write_config(dns, Some(&ca_file))?;
        Ok(gw)
    }

    fn write_config(
        &self,
        dns: std::net::SocketAddr,
        ca_file: Option<&Path>,
    ) -> anyhow::Result<()> {
        let mut text = format!(
            "[gateway]\ncgroup_base = \"{}\"\n\
             [proxy]\ntransparent_listen = \"127.0.0.1:0\"\n\
             [dns]\nlisten = \"127.0.0.1:0\"\nupstream = [\"{dns}\"]\n",
            self.cgroup_base
        );
        if let Some(ca_file) = ca_file {
            text.push_str(&format!(
                "[tls]\nextra_roots = [\"{}\"]\n",
                ca_file.display()
            ));
        }
        std::fs::write(&self.config, text)?;
        Ok(())
    }

    /// `curl -sSk --max-time 10 URL` run in `sandbox` through `sandbox exec`.
    pub fn curl(&self, sandbox: &str, url: &str) -> anyhow::Result<Run> {
        self.run(&[
            "sandbox",
            "exec",
            sandbox,
            "--",
            "curl",
            "-sSk",
            "--max-time",
            "10",
            url,
        ])
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `openshell` with this gateway's environment (and nothing inherited that would change
    /// the test: no default policy, no failpoint).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(crate::openshell_bin());
        cmd.env("OPENSHELL_STATE_DIR", self.dir.path())
            .env("OPENSHELL_GATEWAY_CONFIG", &self.config)
            .env_remove("OPENSHELL_SANDBOX_POLICY")
            .env_remove("OPENSHELL_FAILPOINT");
        cmd
    }

    /// Runs `openshell ARGS` with empty stdin.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Run> {
        let mut cmd = self.command();
        cmd.args(args);
        run_with_timeout(cmd, b"", CALL_TIMEOUT)
    }

    /// The cgroup base directory.
    pub fn cgroup_base_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(openshell::cgroup::cgroup2_mount()?.join(&self.cgroup_base))
    }

    /// The cgroup directory of sandbox `name`.
    pub fn cgroup_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self.cgroup_base_dir()?.join(name))
    }

    /// The gateway's pid, from its lock file.
    pub fn gateway_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join("run/gateway.lock"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.run(&["gateway", "stop"]);
        // A gateway that would not stop (or a test that crashed it) is killed.
        if let Some(pid) = self.gateway_pid() {
            // SAFETY: kill has no memory preconditions; pid is this test's gateway.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if let Ok(base) = self.cgroup_base_dir() {
            if let Ok(entries) = std::fs::read_dir(&base) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = openshell::cgroup::SandboxCgroup::from_path(entry.path()).remove();
                    }
                }
            }
            let _ = std::fs::remove_dir(&base);
        }
        // The gateway pins its eBPF maps and links per cgroup base (so enforcement survives a
        // restart); unpinning them releases the kernel objects.
        let pins = std::path::Path::new("/sys/fs/bpf/openshell").join(&self.cgroup_base);
        let _ = std::fs::remove_dir_all(pins);
    }
}

/// Waits (bounded) until process `pid` has exited: gone, or a zombie waiting for its reaper.
pub fn process_exited(pid: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.chars().next()))
            .flatten();
        if matches!(state, None | Some('Z' | 'X')) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// True while process `pid` exists and has not exited.
pub fn process_alive(pid: &str) -> bool {
    !process_exited(pid, Duration::ZERO)
}
