//! Policy reload through the real gateway. Needs root (gateway, eBPF, cgroups, a network
//! namespace for the test host). Run: `cargo bench -p openshell-tests --bench reload`.
//!
//! - `set_to_loaded/N` (criterion): wall time of `openshell policy set NAME --policy F --wait`
//!   for a policy of N blocks, from the command's start to its exit after it saw `loaded`:
//!   reading the file in the CLI, the gateway's validation, static-section check, hash, SQLite
//!   write, compilation and swap, and the CLI's wait for the outcome. The gateway's log line of
//!   the last reload at each size is printed after it (its steps' times). Each iteration
//!   sets one of two policies that differ in one block, so every one makes a new revision.
//! - Request latency during reloads: a client in the sandbox's cgroup (this binary re-executed
//!   with `--client`) times allowed requests, a new L4 connection with one echo round trip and a
//!   GET on one kept-alive inspected HTTP connection, alternately without reloads and while
//!   another thread reloads a 1,000-block policy back and forth; rounds alternate so that load
//!   from other processes hits both alike. Printed as a table (median, p99, max).
//! - Reload steps: parse + validate, canonical form + SHA-256 and compile of the same policies,
//!   timed in this process, to show where the time of `set_to_loaded` goes.
//!
//! Bounded in count and time.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use criterion::{BenchmarkId, Criterion};
use openshell_tests::{gateway::TestGateway, netns::TestNet};

const NAME: &str = "bench";
const ECHO_PORT: u16 = 7000;
const HTTP_PORT: u16 = 80;
/// Requests of each kind per client run, and rounds of (quiet, reloading).
const REQUESTS: usize = 1_000;
const ROUNDS: usize = 4;
const CLIENT_LIMIT: Duration = Duration::from_secs(60);
/// Blocks of the policies reloaded during the latency measurement.
const RELOAD_BLOCKS: usize = 1_000;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--client") {
        let ip: IpAddr = args.get(pos + 1).context("--client IP")?.parse()?;
        return client(ip);
    }
    if !openshell_tests::is_root() {
        eprintln!("skipped: the reload benchmark needs root (gateway, eBPF, cgroups, netns)");
        return Ok(());
    }
    let bench = Bench::new()?;
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    set_to_loaded(&mut c, &bench);
    c.final_summary();
    if args.iter().any(|a| a == "--list") {
        return Ok(());
    }
    let filtered_out =
        filter(&args).is_some_and(|f| !"reload_steps latency_during_reloads".contains(f));
    if !filtered_out {
        breakdown(&bench)?;
        latency_during_reloads(&bench)?;
    }
    Ok(())
}

/// Criterion's filter argument, if any: the first positional argument that is not the value
/// of one of its options.
fn filter(args: &[String]) -> Option<&str> {
    const WITH_VALUE: &[&str] = &[
        "--warm-up-time",
        "--measurement-time",
        "--sample-size",
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--output-format",
        "--color",
        "--profile-time",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--nresamples",
        "--plotting-backend",
        "--format",
        "--logfile",
    ];
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        if WITH_VALUE.contains(&arg.as_str()) {
            rest.next();
        } else if !arg.starts_with('-') {
            return Some(arg);
        }
    }
    None
}

/// Where the time of one reload goes, step by step in this process (median of a few runs):
/// the steps the CLI and the gateway run on the policy text.
fn breakdown(bench: &Bench) -> anyhow::Result<()> {
    const RUNS: usize = 5;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\nreload steps in process, median of {RUNS} runs (the gateway validates the file once)"
    )?;
    writeln!(
        out,
        "| blocks | bytes | parse + validate | canonical hash (JSON) | (YAML, as before) | compile |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for blocks in [10, 1_000, 10_000] {
        let path = bench.policy_file(&format!("steps-{blocks}.yaml"), blocks, false)?;
        let text = std::fs::read_to_string(&path)?;
        let mut steps = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..RUNS {
            let t = Instant::now();
            let policy = openshell::policy::parse("steps.yaml", &text)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            steps[0].push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(policy.canonical_sha256()?);
            steps[1].push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(policy.compile());
            steps[2].push(t.elapsed());
            // The hash of the YAML canonical form that revisions used before, for comparison.
            let t = Instant::now();
            let canonical = policy.to_canonical_yaml()?;
            std::hint::black_box(<sha2::Sha256 as sha2::Digest>::digest(canonical.as_bytes()));
            steps[3].push(t.elapsed());
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort_unstable();
            v[v.len() / 2].as_secs_f64() * 1e3
        };
        writeln!(
            out,
            "| {blocks} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            text.len(),
            median(&mut steps[0]),
            median(&mut steps[1]),
            median(&mut steps[3]),
            median(&mut steps[2])
        )?;
    }
    Ok(())
}

/// The gateway, the test host (echo server and plain HTTP upstream) and a sandbox.
struct Bench {
    gw: TestGateway,
    net: TestNet,
    _runtime: tokio::runtime::Runtime,
}

impl Bench {
    fn new() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let net = TestNet::new()?;
        let echo = net.run(|| std::net::TcpListener::bind((net.ns_v4(), ECHO_PORT)))??;
        let http = net.run(|| std::net::TcpListener::bind((net.ns_v4(), HTTP_PORT)))??;
        std::thread::spawn(move || serve_echo(&echo));
        runtime.spawn(serve_http(http));
        let gw = TestGateway::new()?;
        let bench = Self {
            gw,
            net,
            _runtime: runtime,
        };
        let policy = bench.policy_file("create.yaml", 0, false)?;
        bench
            .gw
            .run(&[
                "sandbox", "create", "--name", NAME, "--policy", &policy, "--", "true",
            ])?
            .ok()?;
        Ok(bench)
    }

    fn ip(&self) -> IpAddr {
        self.net.ns_v4().into()
    }

    /// Writes a policy of the two measured blocks plus `filler` generated ones (`variant`
    /// changes the port of the first generated block) and returns its path.
    fn policy_file(&self, name: &str, filler: usize, variant: bool) -> anyhow::Result<String> {
        let ip = self.ip();
        let mut text = format!(
            "version: 1
network_policies:
  echo:
    endpoints:
      - {{ host: \"{ip}\", port: {ECHO_PORT} }}
    binaries:
      - {{ path: \"/**\" }}
  api:
    endpoints:
      - host: \"{ip}\"
        port: {HTTP_PORT}
        protocol: rest
        rules:
          - allow: {{ method: GET, path: \"/**\" }}
    binaries:
      - {{ path: \"/**\" }}
"
        );
        for i in 0..filler {
            let port = if i == 0 && variant { 8443 } else { 443 };
            write!(
                text,
                "  block_{i}:\n    endpoints:\n      - {{ host: h{i}.example.com, port: {port} }}\n    binaries:\n      - {{ path: /usr/bin/curl }}\n"
            )?;
        }
        let path = self.gw.dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    }

    fn set(&self, policy: &str) -> anyhow::Result<()> {
        let run = self
            .gw
            .run(&["policy", "set", NAME, "--policy", policy, "--wait"])?;
        if run.code != Some(0) || !run.stdout.contains("loaded") {
            bail!("policy set failed: {run:?}");
        }
        Ok(())
    }
}

fn set_to_loaded(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("set_to_loaded");
    // One `policy set` takes up to a second at 10,000 blocks: a fixed number of iterations per
    // sample rather than criterion's growing counts.
    group.sampling_mode(criterion::SamplingMode::Flat);
    for blocks in [10, 1_000, 10_000] {
        let files = [
            bench.policy_file(&format!("{blocks}-a.yaml"), blocks, false),
            bench.policy_file(&format!("{blocks}-b.yaml"), blocks, true),
        ];
        let [Ok(a), Ok(b)] = files else {
            eprintln!("writing the {blocks}-block policies failed");
            continue;
        };
        let mut next = 0usize;
        group.bench_function(BenchmarkId::from_parameter(blocks), |bencher| {
            bencher.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let file = if next.is_multiple_of(2) { &a } else { &b };
                    next += 1;
                    let start = Instant::now();
                    if let Err(e) = bench.set(file) {
                        eprintln!("{e:#}");
                    }
                    total += start.elapsed();
                }
                total
            });
        });
        last_gateway_steps(bench, blocks);
    }
    group.finish();
}

/// The gateway's own account of its last reload (its log line says how long each step took),
/// to split `set_to_loaded` into the gateway's steps and the rest (the CLI process, reading the
/// file, the two HTTP requests).
fn last_gateway_steps(bench: &Bench, blocks: usize) {
    let log = std::fs::read_to_string(bench.gw.state_dir().join("gateway.log")).unwrap_or_default();
    if let Some(line) = log.lines().rev().find(|l| l.contains("loaded (validate ")) {
        println!("gateway steps of the last reload at {blocks} blocks: {line}");
    }
}

fn serve_echo(listener: &std::net::TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if (&stream).write_all(line.as_bytes()).is_err() {
                    break;
                }
                line.clear();
            }
        });
    }
}

async fn serve_http(listener: std::net::TcpListener) {
    use hyper_util::rt::TokioIo;
    let _ = listener.set_nonblocking(true);
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"ok\n"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The client: `REQUESTS` times a new connection to the echo server with one round trip
/// (`l4 NS`) and a GET on one kept-alive HTTP connection (`l7 NS`).
fn client(ip: IpAddr) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let start = Instant::now();
    let timeout = Some(Duration::from_secs(10));
    let api = SocketAddr::new(ip, HTTP_PORT);
    let mut http = TcpStream::connect_timeout(&api, Duration::from_secs(10))?;
    http.set_read_timeout(timeout)?;
    http.set_nodelay(true)?;
    let request = format!("GET /x HTTP/1.1\r\nHost: {ip}\r\n\r\n");
    let echo = SocketAddr::new(ip, ECHO_PORT);
    for _ in 0..REQUESTS {
        if start.elapsed() > CLIENT_LIMIT {
            break;
        }
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&echo, Duration::from_secs(10))?;
        s.set_read_timeout(timeout)?;
        s.write_all(b"ping\n")?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        writeln!(out, "l4 {}", t.elapsed().as_nanos())?;
        drop(s);

        let t = Instant::now();
        http.write_all(request.as_bytes())?;
        read_response(&mut http)?;
        writeln!(out, "l7 {}", t.elapsed().as_nanos())?;
    }
    Ok(())
}

/// Reads one HTTP/1.1 response with a Content-Length body.
fn read_response(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte)?;
        head.push(byte[0]);
        if head.len() > 16 * 1024 {
            bail!("response head too long");
        }
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 200") {
        bail!("not allowed: {head}");
    }
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .context("no Content-Length")?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(())
}

#[derive(Default)]
struct Samples {
    l4: Vec<Duration>,
    l7: Vec<Duration>,
}

impl Samples {
    fn add(&mut self, text: &str) -> anyhow::Result<()> {
        for line in text.lines() {
            let (kind, ns) = line.split_once(' ').context("sample line")?;
            let d = Duration::from_nanos(ns.parse()?);
            match kind {
                "l4" => self.l4.push(d),
                "l7" => self.l7.push(d),
                _ => bail!("unexpected sample {line:?}"),
            }
        }
        Ok(())
    }
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    let n = v.len();
    if n == 0 {
        return "| 0 | - | - | - |".to_owned();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "| {n} | {:.2} ms | {:.2} ms | {:.2} ms |",
        ms(v[n / 2]),
        ms(v[(n * 99 / 100).min(n - 1)]),
        ms(v[n - 1])
    )
}

fn run_client(bench: &Bench) -> anyhow::Result<String> {
    let cgroup = bench.gw.cgroup_dir(NAME)?;
    let mut cmd = openshell_tests::in_cgroup(Command::new(std::env::current_exe()?), &cgroup);
    cmd.args(["--client", &bench.ip().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = cmd.output().context("running the client")?;
    if !out.status.success() {
        bail!(
            "client failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn latency_during_reloads(bench: &Bench) -> anyhow::Result<()> {
    let a = bench.policy_file("reload-a.yaml", RELOAD_BLOCKS, false)?;
    let b = bench.policy_file("reload-b.yaml", RELOAD_BLOCKS, true)?;
    bench.set(&a)?;
    let (mut quiet, mut reloading) = (Samples::default(), Samples::default());
    let mut reloads = 0;
    let mut busy = Duration::ZERO;
    for _ in 0..ROUNDS {
        quiet.add(&run_client(bench)?)?;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let (out, reload_time) = std::thread::scope(|s| {
            let reloader = s.spawn(|| {
                let started = Instant::now();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < CLIENT_LIMIT {
                    let file = if i.is_multiple_of(2) { &b } else { &a };
                    if let Err(e) = bench.set(file) {
                        eprintln!("{e:#}");
                        break;
                    }
                    i += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                started.elapsed()
            });
            let out = run_client(bench);
            stop.store(true, Ordering::Relaxed);
            (out, reloader.join().unwrap_or_default())
        });
        reloading.add(&out?)?;
        reloads += count.load(Ordering::Relaxed);
        busy += reload_time;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\nallowed requests from the sandbox, {ROUNDS} rounds of {REQUESTS} each; {reloads} reloads of a {RELOAD_BLOCKS}-block policy in {:.1} s ({:.0} ms each)",
        busy.as_secs_f64(),
        busy.as_secs_f64() * 1e3 / reloads.max(1) as f64
    )?;
    writeln!(out, "| request | reloads | n | median | p99 | max |")?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    writeln!(
        out,
        "| L4 connect + echo | none {}",
        stats(quiet.l4.clone())
    )?;
    writeln!(
        out,
        "| L4 connect + echo | running {}",
        stats(reloading.l4.clone())
    )?;
    writeln!(
        out,
        "| L7 GET, kept-alive | none {}",
        stats(quiet.l7.clone())
    )?;
    writeln!(
        out,
        "| L7 GET, kept-alive | running {}",
        stats(reloading.l7.clone())
    )?;
    Ok(())
}
