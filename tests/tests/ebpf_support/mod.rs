//! Fixture for the eBPF tests: a sandbox cgroup, an `Interceptor` with its own bpffs directory,
//! listeners standing in for the gateway's proxy, and helpers to run `ebpf-probe` in or out of
//! the cgroup. Everything is removed on drop, also when a test fails.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use openshell::{
    cgroup::{CgroupBase, SandboxCgroup},
    ebpf::{Attachment, Interceptor, InterceptorConfig},
};
pub use openshell_tests::in_cgroup;

pub const PROBE: &str = env!("CARGO_BIN_EXE_ebpf-probe");
const TIMEOUT: Duration = Duration::from_secs(10);
const CGROUP_BASE: &str = "openshell-test-ebpf";

/// Skips (returns `None`) with a message unless running as root.
pub fn privileged() -> bool {
    if openshell_tests::is_root() {
        true
    } else {
        eprintln!("skipped: eBPF tests need root (CAP_BPF, CAP_NET_ADMIN, cgroup v2 writes)");
        false
    }
}

/// The proxy's stand-ins: a TCP listener on 127.0.0.1 and [::1], a UDP socket for DNS.
pub struct Listeners {
    pub tcp4: TcpListener,
    pub tcp6: TcpListener,
    pub dns4: UdpSocket,
    pub dns6: UdpSocket,
}

impl Listeners {
    pub fn bind() -> anyhow::Result<Self> {
        let dns4 = UdpSocket::bind("127.0.0.1:0")?;
        let dns6 = UdpSocket::bind("[::1]:0")?;
        dns4.set_read_timeout(Some(TIMEOUT))?;
        dns6.set_read_timeout(Some(TIMEOUT))?;
        Ok(Self {
            tcp4: TcpListener::bind("127.0.0.1:0")?,
            tcp6: TcpListener::bind("[::1]:0")?,
            dns4,
            dns6,
        })
    }

    pub fn config(&self, bpffs_dir: &Path) -> anyhow::Result<InterceptorConfig> {
        let v4 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => Ok(a),
            SocketAddr::V6(a) => bail!("{a} is not IPv4"),
        };
        let v6 = |a: SocketAddr| match a {
            SocketAddr::V6(a) => Ok(a),
            SocketAddr::V4(a) => bail!("{a} is not IPv6"),
        };
        let mut config = InterceptorConfig::new(
            v4(self.tcp4.local_addr()?)?,
            v4(self.dns4.local_addr()?)?,
            bpffs_dir,
        );
        config.tcp_v6 = Some(v6(self.tcp6.local_addr()?)?);
        config.dns_v6 = Some(v6(self.dns6.local_addr()?)?);
        Ok(config)
    }
}

/// A sandbox cgroup with the programs attached, plus listeners. Drop removes it all.
pub struct Fixture {
    pub interceptor: Option<Interceptor>,
    pub attachment: Option<Attachment>,
    pub listeners: Option<Listeners>,
    pub cgroup: SandboxCgroup,
    pub bpffs_dir: PathBuf,
}

impl Fixture {
    /// `name` must be unique among the tests of one binary.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        Self::with_config(name, |_| {})
    }

    /// As [`Fixture::new`], letting the test adjust the interceptor's configuration.
    pub fn with_config(
        name: &str,
        adjust: impl FnOnce(&mut InterceptorConfig),
    ) -> anyhow::Result<Self> {
        let base = CgroupBase::open(CGROUP_BASE)?;
        let unique = format!("{name}-{}", std::process::id());
        let cgroup = base.sandbox(&unique)?;
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(format!("openshell-test-{unique}"));
        let mut fixture = Self {
            interceptor: None,
            attachment: None,
            listeners: None,
            cgroup,
            bpffs_dir,
        };
        let listeners = Listeners::bind()?;
        let mut config = listeners.config(&fixture.bpffs_dir)?;
        adjust(&mut config);
        let mut interceptor = Interceptor::load(&config).context("loading the interceptor")?;
        fixture.attachment = Some(interceptor.attach(fixture.cgroup.path())?);
        fixture.interceptor = Some(interceptor);
        fixture.listeners = Some(listeners);
        Ok(fixture)
    }

    pub fn interceptor(&self) -> &Interceptor {
        self.interceptor.as_ref().expect("interceptor loaded")
    }

    pub fn listeners(&self) -> &Listeners {
        self.listeners.as_ref().expect("listeners bound")
    }

    /// A command whose process joins the sandbox cgroup before it execs.
    pub fn command_in_cgroup(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_cgroup(Command::new(program), self.cgroup.path())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(a) = self.attachment.take()
            && let Err(e) = a.detach()
        {
            eprintln!("cleanup: detach failed: {e:#}");
        }
        self.interceptor = None;
        if let Err(e) = self.cgroup.clone().remove() {
            eprintln!(
                "cleanup: removing {} failed: {e:#}",
                self.cgroup.path().display()
            );
        }
        // Shared by the tests running in parallel: only the last one succeeds in removing it.
        if let Some(base) = self.cgroup.path().parent() {
            let _ = std::fs::remove_dir(base);
        }
        if self.bpffs_dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.bpffs_dir)
        {
            eprintln!(
                "cleanup: removing {} failed: {e:#}",
                self.bpffs_dir.display()
            );
        }
    }
}

/// A running probe: its first output line, and the child (killed on drop).
pub struct Probe {
    pub child: Child,
    pub line: String,
}

impl Probe {
    /// Spawns `cmd` (an `ebpf-probe` invocation) and waits for its first line.
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // A test that has just copied the probe can race another test thread's fork: the
        // forked child briefly holds the copy's write descriptor, and exec fails with ETXTBSY
        // until that child has exec'd. Retry that error only, a bounded number of times.
        let mut attempts = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other.context("spawning ebpf-probe")?,
            }
        };
        let stdout = child.stdout.take().context("probe stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(TIMEOUT) {
            Ok(line) => line.trim().to_owned(),
            Err(_) => {
                let _ = child.kill();
                bail!("probe printed nothing within {TIMEOUT:?}");
            }
        };
        Ok(Self { child, line })
    }

    /// The value of `key=` in the probe's line.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    pub fn ok(&self) -> bool {
        self.line.starts_with("ok ")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Accepts one connection within the timeout.
pub fn accept(listener: &TcpListener) -> anyhow::Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok(conn) => return Ok(conn),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > TIMEOUT {
                    bail!("no connection within {TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether a connection is waiting on `listener` right now.
pub fn has_pending(listener: &TcpListener) -> anyhow::Result<bool> {
    listener.set_nonblocking(true)?;
    match listener.accept() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e.into()),
    }
}

pub fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("{a} is not IPv4"),
    }
}

pub fn v6(a: SocketAddr) -> SocketAddrV6 {
    match a {
        SocketAddr::V6(a) => a,
        SocketAddr::V4(a) => panic!("{a} is not IPv6"),
    }
}
