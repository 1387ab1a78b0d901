//! REST inspection cost: requests/s and per-request latency over one kept-alive TLS connection,
//! HTTP/1.1 and h2, directly to the test upstream and through `inspect::serve` (TLS termination
//! with the sandbox CA, a policy decision per request, TLS to the same upstream). Needs root (the
//! upstream runs in a network namespace so that its address is not loopback, which policy always
//! denies). Run: `cargo bench -p openshell-tests --bench l7`.
//!
//! `L7_ONLY=h1|h2` and `L7_SIDE=direct|inspected` run one part alone (for `perf`).
//!
//! The sides alternate in rounds so that load from other processes affects both alike. Bounded
//! in count and time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use openshell::inspect::{self, Generation, InspectContext};
use openshell::tls::{SandboxCa, upstream_client_config};
use openshell_tests::netns::TestNet;
use openshell_tests::upstream::{TestCa, Upstream};
use rustls::pki_types::{CertificateDer, ServerName};

const HOST: &str = "api.github.com";
const PER_ROUND: usize = 500;
const ROUNDS: usize = 6;
const TIME_LIMIT: Duration = Duration::from_secs(30);
const POLICY: &str = "version: 1
network_policies:
  github_repos:
    name: github_repos
    endpoints:
      - host: api.github.com
        port: 443
        protocol: rest
        rules:
          - allow: { method: GET, path: \"/**\" }
          - allow: { method: POST, path: \"/graphql\" }
    binaries:
      - { path: /usr/bin/gh }
";

fn main() -> anyhow::Result<()> {
    if !openshell_tests::is_root() {
        eprintln!("skipped: needs root to create a network namespace");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let net = TestNet::new()?;
    let test_ca = TestCa::new()?;
    let upstream = Upstream::start(&net, &test_ca, &[HOST])?;
    let sandbox_ca = Arc::new(SandboxCa::generate("bench")?);
    let inspector = start_inspector(&sandbox_ca, &test_ca, upstream.addr).await?;

    println!("| protocol | path | requests | p50 | p99 | requests/s |");
    println!("|---|---|---|---|---|---|");
    let only = std::env::var("L7_ONLY").unwrap_or_default();
    let side = std::env::var("L7_SIDE").unwrap_or_default();
    for h2 in [false, true] {
        if (only == "h2" && !h2) || (only == "h1" && h2) {
            continue;
        }
        let mut direct = Side::default();
        let mut inspected = Side::default();
        let mut direct_conn = Conn::open(upstream.addr, &test_ca.cert_der, h2).await?;
        let mut inspected_conn = Conn::open(inspector, sandbox_ca.cert_der(), h2).await?;
        let deadline = Instant::now() + TIME_LIMIT;
        for _ in 0..ROUNDS {
            if Instant::now() > deadline {
                break;
            }
            if side != "inspected" {
                direct.measure(&mut direct_conn).await?;
            }
            if side != "direct" {
                inspected.measure(&mut inspected_conn).await?;
            }
        }
        let proto = if h2 { "h2" } else { "HTTP/1.1" };
        direct.print(proto, "direct TLS");
        inspected.print(proto, "inspected");
        println!(
            "| {proto} | added (inspected − direct) | | {:.1} µs | {:.1} µs | {:.0}% of direct |",
            inspected.pct(50) - direct.pct(50),
            inspected.pct(99) - direct.pct(99),
            100.0 * inspected.rps() / direct.rps()
        );
    }
    drop(upstream);
    Ok(())
}

async fn start_inspector(
    ca: &Arc<SandboxCa>,
    test_ca: &TestCa,
    upstream: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    let policy =
        openshell::policy::parse("bench.yaml", POLICY).map_err(|e| anyhow::anyhow!("{e}"))?;
    let generation = Generation {
        policy: Arc::new(policy.compile()),
        revision: 1,
    };
    let upstream_tls = upstream_client_config(std::slice::from_ref(&test_ca.cert_der))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let ca = Arc::clone(ca);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let ctx = InspectContext {
                sandbox: Arc::from("bench"),
                host: Arc::from(HOST),
                port: 443,
                upstream: vec![upstream],
                binary: "/usr/bin/gh".into(),
                ancestors: Vec::new(),
                pid: 1,
                terminate_tls: true,
                ca: Arc::clone(&ca),
                upstream_tls: Arc::clone(&upstream_tls),
                policy: Arc::new(generation.clone()),
                log: Arc::new(NullLog),
            };
            tokio::spawn(async move {
                let _ = inspect::serve(tcp, ctx).await;
            });
        }
    });
    Ok(addr)
}

/// The decision log is the L4 proxy's; the benchmark measures inspection, not storage.
struct NullLog;

impl inspect::RequestLog for NullLog {
    fn record(&self, _record: inspect::RequestRecord) {}
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

struct Conn(Sender);

impl Conn {
    async fn open(
        addr: SocketAddr,
        root: &CertificateDer<'static>,
        h2: bool,
    ) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone())?;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(HOST)?, tcp)
            .await
            .with_context(|| format!("TLS to {addr}"))?;
        let io = TokioIo::new(tls);
        let sender = if h2 {
            let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(c);
            Sender::H2(s)
        } else {
            let (s, c) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(c);
            Sender::H1(s)
        };
        Ok(Self(sender))
    }

    async fn get(&mut self) -> anyhow::Result<()> {
        let resp = match &mut self.0 {
            Sender::H1(s) => {
                let req = Request::get("/repos/acme/alpha-repo/pulls?state=open")
                    .header(hyper::header::HOST, HOST)
                    .body(Empty::new())?;
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                let req = Request::get(format!(
                    "https://{HOST}/repos/acme/alpha-repo/pulls?state=open"
                ))
                .body(Empty::new())?;
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
        resp.into_body().collect().await?;
        Ok(())
    }
}

#[derive(Default)]
struct Side {
    latencies: Vec<Duration>,
    busy: Duration,
}

impl Side {
    async fn measure(&mut self, conn: &mut Conn) -> anyhow::Result<()> {
        let start = Instant::now();
        for _ in 0..PER_ROUND {
            let t = Instant::now();
            conn.get().await?;
            self.latencies.push(t.elapsed());
        }
        self.busy += start.elapsed();
        Ok(())
    }

    fn pct(&mut self, p: usize) -> f64 {
        self.latencies.sort_unstable();
        let i = (self.latencies.len() * p / 100).min(self.latencies.len().saturating_sub(1));
        self.latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    }

    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.busy.as_secs_f64().max(1e-9)
    }

    fn print(&mut self, proto: &str, path: &str) {
        let (p50, p99) = (self.pct(50), self.pct(99));
        println!(
            "| {proto} | {path} | {} | {p50:.1} µs | {p99:.1} µs | {:.0} |",
            self.latencies.len(),
            self.rps()
        );
    }
}
