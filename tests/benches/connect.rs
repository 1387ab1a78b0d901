//! connect() cost of the eBPF interception: the same client loop runs once in a sandbox cgroup
//! with the programs attached and once outside it, against one listener on 127.0.0.1 that only
//! accepts. Needs root. Run: `cargo bench -p openshell-tests --bench connect`.
//!
//! The client runs in a child process (this binary re-executed with `--client`), so the process
//! can be placed in the cgroup before it starts; both sides use the same child path. The sides
//! alternate in rounds so that load from other processes affects both alike. Bounded in count
//! and time.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use openshell::{
    cgroup::CgroupBase,
    ebpf::{Interceptor, InterceptorConfig},
};

const CONNECTS: usize = 5_000;
/// The two sides alternate in this many rounds, so load from other processes on the machine
/// hits both alike.
const ROUNDS: usize = 10;
const TIME_LIMIT: Duration = Duration::from_secs(20);
/// Redirected by the programs; never reached (it is not routed anywhere on this host).
const SANDBOX_DST: &str = "198.18.0.10:443";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--client") {
        let addr: SocketAddr = args.get(pos + 1).context("--client ADDR N")?.parse()?;
        let count: usize = args.get(pos + 2).context("--client ADDR N")?.parse()?;
        return client(addr, count);
    }
    if !openshell_tests::is_root() {
        eprintln!("skipped: the connect benchmark needs root (eBPF, cgroups)");
        return Ok(());
    }
    bench()
}

/// Runs `count` connects and prints each latency in ns, one per line, then `total <ns>`.
fn client(addr: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let start = Instant::now();
    for _ in 0..count {
        if start.elapsed() > TIME_LIMIT / ROUNDS as u32 {
            break;
        }
        let t = Instant::now();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect to {addr}"))?;
        let elapsed = t.elapsed();
        drop(stream);
        writeln!(out, "{}", elapsed.as_nanos())?;
    }
    writeln!(out, "total {}", start.elapsed().as_nanos())?;
    Ok(())
}

/// All samples of one side, over every round.
#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    busy: Duration,
}

impl Samples {
    fn add(&mut self, text: &str) -> anyhow::Result<()> {
        for line in text.lines() {
            match line.strip_prefix("total ") {
                Some(total) => self.busy += Duration::from_nanos(total.parse()?),
                None => self.latencies.push(Duration::from_nanos(line.parse()?)),
            }
        }
        Ok(())
    }

    fn stats(mut self) -> anyhow::Result<Stats> {
        self.latencies.sort_unstable();
        let n = self.latencies.len();
        if n == 0 {
            bail!("no connect finished");
        }
        Ok(Stats {
            n: n as u64,
            median: self.latencies[n / 2],
            p99: self.latencies[(n * 99 / 100).min(n - 1)],
            per_sec: n as f64 / self.busy.as_secs_f64(),
        })
    }
}

struct Stats {
    n: u64,
    median: Duration,
    p99: Duration,
    per_sec: f64,
}

fn run_client(addr: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--client", addr, &(CONNECTS / ROUNDS).to_string()])
        .stdout(Stdio::piped());
    collect(cmd)
}

fn bench() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let dns = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let bpffs = PathBuf::from(format!(
        "/sys/fs/bpf/openshell-bench-{}",
        std::process::id()
    ));
    let base = CgroupBase::open("openshell-bench")?;
    let cgroup = base.sandbox(&format!("connect-{}", std::process::id()))?;

    let result = (|| -> anyhow::Result<(Stats, Stats)> {
        let SocketAddr::V4(tcp) = addr else {
            bail!("IPv4 listener expected")
        };
        let SocketAddr::V4(dns_addr) = dns.local_addr()? else {
            bail!("IPv4 DNS expected")
        };
        let mut interceptor = Interceptor::load(&InterceptorConfig::new(tcp, dns_addr, &bpffs))?;
        let attachment = interceptor.attach(cgroup.path())?;
        let (mut outside, mut inside) = (Samples::default(), Samples::default());
        for _ in 0..ROUNDS {
            outside.add(&run_client(&addr.to_string())?)?;
            inside.add(&run_in_cgroup(SANDBOX_DST, cgroup.path())?)?;
        }
        let (outside, inside) = (outside.stats()?, inside.stats()?);
        let counters = interceptor.counters()?;
        attachment.detach()?;
        if counters.tcp_redirected < inside.n {
            bail!(
                "only {} of {} connects were redirected",
                counters.tcp_redirected,
                inside.n
            );
        }
        Ok((outside, inside))
    })();
    let _ = cgroup.remove();
    let _ = base.remove();
    let _ = std::fs::remove_dir_all(&bpffs);
    let (outside, inside) = result?;

    let mut out = std::io::stdout().lock();
    writeln!(out, "| loop | connects | median | p99 | connections/s |")?;
    writeln!(out, "|---|---|---|---|---|")?;
    for (name, s) in [
        ("outside the cgroup", &outside),
        ("inside, programs attached", &inside),
    ] {
        writeln!(
            out,
            "| {name} | {} | {:.1} µs | {:.1} µs | {:.0} |",
            s.n,
            s.median.as_secs_f64() * 1e6,
            s.p99.as_secs_f64() * 1e6,
            s.per_sec
        )?;
    }
    let added = inside.median.as_secs_f64() - outside.median.as_secs_f64();
    writeln!(
        out,
        "\nadded per connect at the median: {:.1} µs (target ≤ 10 µs)",
        added * 1e6
    )?;
    Ok(())
}

/// As [`run_client`], with the child joining `cgroup` before it execs.
fn run_in_cgroup(addr: &str, cgroup: &std::path::Path) -> anyhow::Result<String> {
    let mut cmd = openshell_tests::in_cgroup(Command::new(std::env::current_exe()?), cgroup);
    cmd.args(["--client", addr, &(CONNECTS / ROUNDS).to_string()])
        .stdout(Stdio::piped());
    collect(cmd)
}

fn collect(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd.output().context("running the client")?;
    if !out.status.success() {
        bail!(
            "client failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
