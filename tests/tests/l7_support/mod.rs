//! Drives `openshell::inspect::serve` the way the L4 proxy does, from a loopback listener: each
//! accepted connection is handed over with a context naming the test host, its validated
//! upstream address (the test upstream in its network namespace) and the calling binary.
//! Clients (curl, python3) and the upstream are real.

#![allow(dead_code, reason = "each l7 test binary uses a different subset")]
#![expect(
    clippy::expect_used,
    reason = "test helpers fail the calling test loudly when the machine is not as expected"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use openshell::inspect::{self, Generation, InspectContext, PolicySource, RequestRecord};
use openshell::tls::{SandboxCa, upstream_client_config};
use openshell_tests::netns::TestNet;
use openshell_tests::upstream::{TestCa, Upstream};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub const ORG: &str = "acme";

/// The repository's example policy file, with `<org_name>` filled in.
pub fn example_policy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies")
        .join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .replace("<org_name>", ORG)
}

/// The inspector in front of a test upstream `U` (by default the recording HTTPS [`Upstream`]).
pub struct Harness<U = Upstream> {
    /// Where the inspector listens: port 443 on the host side of the test network, so clients
    /// that cannot be pointed at another port (git) reach it through a resolve override.
    pub addr: SocketAddr,
    pub host: String,
    pub ca: Arc<SandboxCa>,
    pub ca_file: PathBuf,
    pub log: Arc<Mutex<Vec<RequestRecord>>>,
    pub upstream: U,
    /// The generation the inspector judges by; [`Harness::set_policy`] replaces it.
    pub policy: Arc<Policies>,
    /// A scratch directory removed with the harness.
    pub dir: PathBuf,
    _dir: TempDir,
    task: tokio::task::JoinHandle<()>,
    /// The task serving each accepted connection.
    served: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    _net: TestNet,
}

/// A policy source that tests replace, as `policy set` does in the gateway.
pub struct Policies(tokio::sync::watch::Sender<Generation>);

impl PolicySource for Policies {
    fn current(&self) -> Generation {
        self.0.borrow().clone()
    }

    fn updates(&self) -> futures_util::stream::BoxStream<'static, Generation> {
        inspect::generations_from(self.0.subscribe(), Generation::clone)
    }
}

fn compile(policy_text: &str, revision: i64) -> anyhow::Result<Generation> {
    let policy =
        openshell::policy::parse("test.yaml", policy_text).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Generation {
        policy: Arc::new(policy.compile()),
        revision,
    })
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Harness {
    /// Starts an upstream playing `host` in a new network namespace and an inspector for
    /// `policy_text` that presents every connection as made by `binary` to `host:443`.
    pub async fn start(policy_text: &str, host: &str, binary: &str) -> anyhow::Result<Self> {
        Self::start_with(policy_text, host, binary, |net, ca, _dir| {
            let upstream = Upstream::start(net, ca, &[host])?;
            Ok((upstream.addr, upstream))
        })
        .await
    }
}

impl<U> Harness<U> {
    /// As [`Harness::start`], with an upstream of the caller's: `make` starts it in the test
    /// network (given the test CA that the inspector trusts upstream, and the scratch
    /// directory) and returns the address the inspector dials.
    pub async fn start_with(
        policy_text: &str,
        host: &str,
        binary: &str,
        make: impl FnOnce(&TestNet, &TestCa, &Path) -> anyhow::Result<(SocketAddr, U)>,
    ) -> anyhow::Result<Self> {
        let net = TestNet::new()?;
        let test_ca = TestCa::new()?;
        let policy = Arc::new(Policies(tokio::sync::watch::Sender::new(compile(
            policy_text,
            1,
        )?)));
        let ca = Arc::new(SandboxCa::generate("l7-test")?);
        let dir = std::env::temp_dir().join(format!(
            "openshell-l7-{}-{}",
            std::process::id(),
            net.name()
        ));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        let (up_addr, upstream) = make(&net, &test_ca, &dir.0)?;
        let ca_file = dir.0.join("sandbox-ca.pem");
        std::fs::write(&ca_file, ca.cert_pem())?;
        let upstream_tls = upstream_client_config(std::slice::from_ref(&test_ca.cert_der))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind((net.host_v4(), 443)).await?;
        let addr = listener.local_addr()?;
        let (ca2, log2, host2) = (Arc::clone(&ca), Arc::clone(&log), Arc::<str>::from(host));
        let binary = PathBuf::from(binary);
        let served = Arc::new(Mutex::new(Vec::new()));
        let (policy2, served2) = (Arc::clone(&policy), Arc::clone(&served));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let ctx = InspectContext {
                    sandbox: Arc::from("l7-test"),
                    host: Arc::clone(&host2),
                    port: 443,
                    upstream: vec![up_addr],
                    binary: binary.clone(),
                    ancestors: Vec::new(),
                    pid: 1,
                    terminate_tls: true,
                    ca: Arc::clone(&ca2),
                    upstream_tls: Arc::clone(&upstream_tls),
                    policy: Arc::clone(&policy2) as Arc<dyn PolicySource>,
                    log: Arc::clone(&log2) as Arc<dyn inspect::RequestLog>,
                };
                let serving = tokio::spawn(async move {
                    let _ = inspect::serve(tcp, ctx).await;
                });
                served2.lock().expect("served").push(serving);
            }
        });
        Ok(Self {
            addr,
            host: host.to_owned(),
            ca,
            ca_file,
            log,
            upstream,
            policy,
            dir: dir.0.clone(),
            _dir: dir,
            task,
            served,
            _net: net,
        })
    }

    /// Puts `policy_text` in force as `revision`, as a `policy set` does.
    pub fn set_policy(&self, policy_text: &str, revision: i64) {
        let generation = compile(policy_text, revision).expect("test policy compiles");
        self.policy.0.send_replace(generation);
    }

    /// Drops every connection's serving task, as the proxy does with a connection that a new
    /// generation no longer allows.
    pub fn revoke_all(&self) {
        for serving in self.served.lock().expect("served").iter() {
            serving.abort();
        }
    }

    /// curl, reaching the inspector as if `host:443` were dialed: SNI and Host name `host`.
    pub fn curl(&self) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "20", "--path-as-is", "--cacert"])
            .arg(&self.ca_file)
            .arg("--connect-to")
            .arg(format!(
                "{}:443:{}:{}",
                self.host,
                self.addr.ip(),
                self.addr.port()
            ));
        cmd
    }

    /// TLS to the inspector as a client of `host` (SNI `sni`, ALPN `alpn`), trusting the
    /// sandbox CA.
    pub async fn tls(
        &self,
        sni: &str,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.cert_der().clone()).expect("sandbox CA");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect inspector");
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("sni");
        connector
            .connect(name, tcp)
            .await
            .expect("TLS to inspector")
    }

    /// Sends raw bytes over TLS (SNI `sni`, ALPN http/1.1) and reads until the inspector
    /// closes (bounded).
    pub async fn raw_tls(&self, sni: &str, bytes: &[u8]) -> String {
        let mut tls = self.tls(sni, &[b"http/1.1"]).await;
        tls.write_all(bytes).await.expect("write");
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the inspector did not close the connection");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Runs curl with `args` for one URL path and returns (status, body).
    pub async fn curl_one(&self, extra: &[&str], method: &str, path: &str) -> (u16, String) {
        let mut cmd = self.curl();
        cmd.args(extra)
            .args(["-X", method, "-w", "\n%{http_code}"])
            .arg(format!("https://{}{path}", self.host));
        let out = run(cmd).await;
        split_status(&out)
    }
}

impl Harness {
    /// Targets the upstream received, as `METHOD target`.
    pub fn arrived(&self) -> Vec<String> {
        self.upstream
            .seen()
            .into_iter()
            .map(|s| format!("{} {}", s.method, s.target))
            .collect()
    }
}

impl<U> Drop for Harness<U> {
    fn drop(&mut self) {
        self.task.abort();
        self.revoke_all();
    }
}

pub async fn run(mut cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .with_context(|| format!("running {shown}"))
        .expect("client runs");
    assert!(
        out.status.success(),
        "{shown} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Splits `body\nSTATUS` as printed by `-w "\n%{http_code}"`.
pub fn split_status(out: &str) -> (u16, String) {
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", out));
    (code.trim().parse().expect("status code"), body.to_owned())
}

/// Privileged tests need root (network namespaces); say why they skip.
pub fn skip_unless_root() -> bool {
    if openshell_tests::is_root() {
        false
    } else {
        eprintln!("skipped: needs root to create network namespaces");
        true
    }
}
