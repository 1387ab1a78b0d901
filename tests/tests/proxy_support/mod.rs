//! Fixture for the proxy end-to-end tests: a sandbox cgroup with the real eBPF programs
//! attached, the real proxy (transparent and DNS listeners) serving it with a given policy, a
//! test host in a network namespace playing the upstream servers (a real DNS server and a TLS
//! web server), and helpers to run real clients inside the cgroup. Everything is removed on
//! drop, also when a test fails.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use openshell::{
    cgroup::{CgroupBase, SandboxCgroup},
    ebpf::{Attachment, Interceptor},
    proxy::{
        Generation, Proxy, ProxyConfig, ProxyListeners, Registry, SandboxNet,
        direct::DirectPath,
        log::{DecisionRecord, MemoryLog},
        relay::RelayMode,
    },
};
pub use openshell_tests::in_cgroup;
use openshell_tests::{dns::TestDns, netns::TestNet};

pub const TIMEOUT: Duration = Duration::from_secs(20);
const CGROUP_BASE: &str = "openshell-test-proxy";

/// Skips (returns false) with a message unless running as root.
pub fn privileged() -> bool {
    if openshell_tests::is_root() {
        true
    } else {
        eprintln!("skipped: proxy end-to-end tests need root (eBPF, cgroups, network namespaces)");
        false
    }
}

/// A test host: a network namespace with a DNS server and an HTTPS server on port 443 whose
/// certificate is valid for `names` (signed by a throw-away CA in `dir`).
pub struct TestHost {
    pub net: TestNet,
    pub dns: TestDns,
    https: Child,
    pub dir: tempfile::TempDir,
}

impl TestHost {
    pub fn new(names: &[&str]) -> anyhow::Result<Self> {
        let net = TestNet::new()?;
        let dns = TestDns::start_in(&net)?;
        let dir = tempfile::tempdir()?;
        make_cert(dir.path(), names)?;
        let script = dir.path().join("server.py");
        std::fs::write(&script, HTTPS_SERVER)?;
        let mut https = net
            .command("/usr/bin/python3")
            .arg(&script)
            .arg(net.ns_v4().to_string())
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the test HTTPS server")?;
        let ready = dir.path().join("ready");
        let deadline = Instant::now() + TIMEOUT;
        while !ready.exists() {
            if Instant::now() > deadline || https.try_wait()?.is_some() {
                let _ = https.kill();
                bail!("the test HTTPS server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            net,
            dns,
            https,
            dir,
        })
    }

    pub fn ip(&self) -> IpAddr {
        self.net.ns_v4().into()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Request paths the HTTPS server has answered so far.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.https.kill();
        let _ = self.https.wait();
    }
}

const HTTPS_SERVER: &str = r#"
import http.server, os, ssl, sys
addr, d = sys.argv[1], sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(os.path.join(d, "requests.log"), "a") as f:
            f.write(self.path + "\n")
        body = b"hello from the test host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer((addr, 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"))
s.socket = ctx.wrap_socket(s.socket, server_side=True)
open(os.path.join(d, "ready"), "w").close()
s.serve_forever()
"#;

fn make_cert(dir: &Path, names: &[&str]) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=openshell test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ])?;
    let san = names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    std::fs::write(dir.join("ext.cnf"), format!("subjectAltName={san}\n"))?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={}", names[0]),
        "-keyout",
        "key.pem",
        "-out",
        "req.csr",
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ])
}

/// The sandbox: a cgroup with the eBPF programs attached and the proxy serving it.
pub struct Sandbox {
    pub log: Arc<MemoryLog>,
    pub sandbox: Arc<SandboxNet>,
    pub own: Vec<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    interceptor: Option<Arc<Mutex<Interceptor>>>,
    interceptor_config: Option<openshell::ebpf::InterceptorConfig>,
    attachment: Option<Attachment>,
    cgroup: SandboxCgroup,
    bpffs_dir: PathBuf,
}

impl Sandbox {
    /// `name` must be unique among the tests of one binary. As the gateway by default: the
    /// default relay, and direct connections on the proxy's verdicts.
    pub fn new(name: &str, policy: &str, upstream_dns: SocketAddr) -> anyhow::Result<Self> {
        Self::with_options(name, policy, upstream_dns, RelayMode::default(), true)
    }

    /// As [`Sandbox::new`], relaying every allowed connection with `relay` (no direct
    /// connections, so that every one goes through the relay).
    pub fn with_relay(
        name: &str,
        policy: &str,
        upstream_dns: SocketAddr,
        relay: RelayMode,
    ) -> anyhow::Result<Self> {
        Self::with_options(name, policy, upstream_dns, relay, false)
    }

    /// As [`Sandbox::new`], relaying with `relay`, with or without direct connections.
    pub fn with_options(
        name: &str,
        policy: &str,
        upstream_dns: SocketAddr,
        relay: RelayMode,
        direct: bool,
    ) -> anyhow::Result<Self> {
        // Everything that can fail without side effects comes before the cgroup exists, so a
        // rejected policy leaves no cgroup behind (Drop only runs once `Self` is built).
        let generation = Generation::from_text("policy.yaml", policy, 1)?;
        let ca = Arc::new(openshell::tls::SandboxCa::generate(name)?);
        let unique = format!("{name}-{}", std::process::id());
        let base = CgroupBase::open(CGROUP_BASE)?;
        let cgroup = base.sandbox(&unique)?;
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(format!("openshell-test-proxy-{unique}"));
        let mut sandbox = Self {
            log: Arc::new(MemoryLog::default()),
            sandbox: Arc::new(SandboxNet::new(name, cgroup.path(), generation, ca)?),
            own: Vec::new(),
            stop: None,
            thread: None,
            interceptor: None,
            interceptor_config: None,
            attachment: None,
            cgroup,
            bpffs_dir,
        };
        let mut config = ProxyConfig::loopback(0, 0, vec![upstream_dns]);
        config.relay = relay;
        let listeners = ProxyListeners::bind(&config)?;
        sandbox.own = listeners.addresses();
        let interceptor_config = listeners.interceptor_config(&sandbox.bpffs_dir);
        let mut interceptor =
            Interceptor::load(&interceptor_config).context("loading the interceptor")?;
        sandbox.interceptor_config = Some(interceptor_config);
        sandbox.attachment = Some(interceptor.attach(sandbox.cgroup.path())?);
        let kernel_relay = interceptor.kernel_relay();
        let direct = direct.then(|| Arc::new(DirectPath::new(interceptor.fast_path())));
        let interceptor = Arc::new(Mutex::new(interceptor));
        sandbox.interceptor = Some(Arc::clone(&interceptor));
        let registry = Arc::new(match &direct {
            Some(d) => Registry::with_direct(Arc::clone(d.kernel())),
            None => Registry::new(),
        });
        registry.insert(Arc::clone(&sandbox.sandbox));
        let mut proxy = Proxy::new(
            &config,
            &listeners,
            registry,
            interceptor,
            Arc::clone(&sandbox.log) as _,
        )?;
        if let Ok(kernel) = kernel_relay {
            proxy = proxy.with_kernel_relay(kernel);
        }
        if let Some(direct) = direct {
            proxy = proxy.with_direct(direct);
        }
        let proxy = Arc::new(proxy);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        sandbox.stop = Some(tx);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        sandbox.thread = Some(std::thread::spawn(move || {
            let served = runtime.block_on(proxy.serve(listeners, async {
                let _ = rx.await;
            }));
            if let Err(e) = served {
                eprintln!("proxy stopped: {e}");
            }
            runtime.shutdown_timeout(Duration::from_millis(200));
        }));
        Ok(sandbox)
    }

    /// The kernel's decision counters for this sandbox's interceptor.
    pub fn counters(&self) -> anyhow::Result<openshell::ebpf::Counters> {
        Ok(self.interceptor()?.counters()?)
    }

    fn interceptor(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Interceptor>> {
        let interceptor = self
            .interceptor
            .as_ref()
            .context("the interceptor is gone")?;
        Ok(interceptor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Stops the proxy (as a gateway that dies would), leaving the cgroup and the attached
    /// programs in place.
    pub fn stop_proxy(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Loads the eBPF object again on the same pins, as a restarted gateway does (the new
    /// object is dropped at once; the programs attached by the first stay).
    pub fn load_interceptor_again(&self) -> anyhow::Result<()> {
        let config = self
            .interceptor_config
            .as_ref()
            .context("the interceptor is gone")?;
        drop(Interceptor::load(config)?);
        Ok(())
    }

    /// How many verdicts of the proxy the kernel holds.
    pub fn verdicts(&self) -> anyhow::Result<usize> {
        Ok(self.fast_path()?.verdict_count())
    }

    fn fast_path(&self) -> anyhow::Result<Arc<openshell::ebpf::FastPath>> {
        Ok(self.interceptor()?.fast_path())
    }

    /// Waits (bounded) until the kernel holds at least `n` verdicts of the proxy.
    pub fn wait_for_verdicts(&self, n: usize) -> anyhow::Result<()> {
        let fast = self.fast_path()?;
        let deadline = Instant::now() + TIMEOUT;
        while fast.verdict_count() < n {
            if Instant::now() > deadline {
                bail!(
                    "the kernel holds {} verdicts, not {n}",
                    fast.verdict_count()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// A command whose process joins the sandbox cgroup before it execs.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_cgroup(Command::new(program), self.cgroup.path())
    }

    /// Runs `cmd` to completion (bounded by [`TIMEOUT`]).
    pub fn run(&self, mut cmd: Command) -> anyhow::Result<Output> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let deadline = Instant::now() + TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{cmd:?} did not finish within {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(child.wait_with_output()?)
    }

    /// The decisions logged so far, waiting (bounded) until one satisfies `pred`.
    pub fn wait_for_record(
        &self,
        pred: impl Fn(&DecisionRecord) -> bool,
    ) -> anyhow::Result<DecisionRecord> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(r) = self.log.records().into_iter().find(|r| pred(r)) {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!(
                    "no matching decision within {TIMEOUT:?}; logged: {:#?}",
                    self.log.records()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.cgroup.kill();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(a) = self.attachment.take()
            && let Err(e) = a.detach()
        {
            eprintln!("cleanup: detach failed: {e:#}");
        }
        self.interceptor = None;
        if let Err(e) = self.cgroup.clone().remove() {
            eprintln!("cleanup: removing {}: {e:#}", self.cgroup.path().display());
        }
        if let Some(base) = self.cgroup.path().parent() {
            let _ = std::fs::remove_dir(base);
        }
        if self.bpffs_dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.bpffs_dir)
        {
            eprintln!("cleanup: removing {}: {e:#}", self.bpffs_dir.display());
        }
    }
}

/// The real path of the system python3 (`/usr/bin/python3.X`).
pub fn python3() -> PathBuf {
    std::fs::canonicalize("/usr/bin/python3").unwrap_or_else(|_| PathBuf::from("/usr/bin/python3"))
}
