//! connect() cost of the eBPF interception: the same client loop runs once in a sandbox cgroup
//! with the programs attached and once outside it, against one listener on 127.0.0.1 that only
//! accepts. Needs root. Run: `cargo bench -p openshell-tests --bench connect`.
//!
//! The client runs in a child process (this binary re-executed with `--client`), so the process
//! can be placed in the cgroup before it starts; both loops use the same child path. Each loop is
//! bounded in count and time.

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
const TIME_LIMIT: Duration = Duration::from_secs(20);
/// Redirected by the programs; never reached (it is not routed anywhere on this host).
const SANDBOX_DST: &str = "198.18.0.10:443";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--client") {
        let addr: SocketAddr = args.get(pos + 1).context("--client ADDR")?.parse()?;
        return client(addr);
    }
    if !openshell_tests::is_root() {
        eprintln!("skipped: the connect benchmark needs root (eBPF, cgroups)");
        return Ok(());
    }
    bench()
}

/// Runs the connect loop and prints `n median_ns p99_ns total_ns`.
fn client(addr: SocketAddr) -> anyhow::Result<()> {
    let mut samples = Vec::with_capacity(CONNECTS);
    let start = Instant::now();
    for _ in 0..CONNECTS {
        if start.elapsed() > TIME_LIMIT {
            break;
        }
        let t = Instant::now();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .with_context(|| format!("connect to {addr}"))?;
        samples.push(t.elapsed());
        drop(stream);
    }
    let total = start.elapsed();
    samples.sort_unstable();
    let n = samples.len();
    if n == 0 {
        bail!("no connect finished");
    }
    println!(
        "{n} {} {} {}",
        samples[n / 2].as_nanos(),
        samples[(n * 99 / 100).min(n - 1)].as_nanos(),
        total.as_nanos()
    );
    Ok(())
}

struct Stats {
    n: u64,
    median: Duration,
    p99: Duration,
    per_sec: f64,
}

fn run_client(addr: &str) -> anyhow::Result<Stats> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--client", addr]).stdout(Stdio::piped());
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
        let outside = run_client(&addr.to_string())?;
        let inside = run_in_cgroup(SANDBOX_DST, cgroup.path())?;
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
fn run_in_cgroup(addr: &str, cgroup: &std::path::Path) -> anyhow::Result<Stats> {
    use std::os::unix::{ffi::OsStrExt as _, process::CommandExt as _};
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--client", addr]).stdout(Stdio::piped());
    // SAFETY: only async-signal-safe calls (open, write, close) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    collect(cmd)
}

fn collect(mut cmd: Command) -> anyhow::Result<Stats> {
    let out = cmd.output().context("running the client")?;
    if !out.status.success() {
        bail!(
            "client failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let v: Vec<u128> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [n, median, p99, total] = v[..] else {
        bail!("unexpected client output {text:?}");
    };
    Ok(Stats {
        n: n as u64,
        median: Duration::from_nanos(median as u64),
        p99: Duration::from_nanos(p99 as u64),
        per_sec: n as f64 / Duration::from_nanos(total as u64).as_secs_f64(),
    })
}
