//! Proxy L4 benchmark (issue 5): an allowed TCP stream from a sandbox against direct
//! connections to the same test host, in one run. Needs root.
//! Run: `cargo bench -p openshell-tests --bench proxy_l4`.
//!
//! The upstream servers run on a test host in a network namespace (198.18.N.10): a sink (reads
//! to end of stream, then closes), an accept-and-close server, and a one-byte echo server. Each
//! client is this binary re-executed with `--client`, either outside any sandbox (direct) or
//! inside a sandbox cgroup with the eBPF programs attached and the real proxy serving it. The
//! sandboxes: one with the gateway's defaults (copy relay, direct connections on the proxy's
//! verdicts: after the warm-up connection to each server, which the proxy relays and judges,
//! connects go straight to the server and are logged from the kernel's events), and one per
//! relay with direct connections off (connect → eBPF redirect → proxy accept → record, binary
//! identity, decision, log → dial the test host → relay). The sides alternate in rounds so that
//! load from other processes hits both alike. Every loop is bounded in count and time.
//!
//! - Throughput: one stream of [`STREAM_BYTES`], measured from connect to the server's close
//!   (so every byte reached the server), for the default path and each relay.
//! - New connections/s: connect, then wait for the server's close (a full end-to-end
//!   connection), one at a time: the default path, the kernel relay and the copy relay; with
//!   the CPU time the proxies' runtime threads spent per connection.
//! - Round trip added on a kept-alive connection: 1-byte ping-pong, median, for the same three.
//!
//! `PROXY_L4_ONLY=stream|connects|rtt` runs one measure alone (to profile it).

#[path = "../tests/proxy_support/mod.rs"]
mod proxy_support;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use openshell::proxy::relay::RelayMode;
use openshell_tests::netns::TestNet;
use proxy_support::Sandbox;

const STREAM_BYTES: u64 = 256 * 1024 * 1024;
const STREAM_ROUNDS: usize = 3;
const CONNECTS: usize = 400;
const CONNECT_ROUNDS: usize = 5;
const PINGS: usize = 4_000;
const PING_ROUNDS: usize = 2;
const CLIENT_TIME_LIMIT: Duration = Duration::from_secs(20);

const SINK_PORT: u16 = 5001;
const CLOSE_PORT: u16 = 5002;
const ECHO_PORT: u16 = 5003;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--client") {
        let mode = args.get(pos + 1).context("--client MODE ADDR N")?;
        let addr: SocketAddr = args.get(pos + 2).context("--client MODE ADDR N")?.parse()?;
        let n: u64 = args.get(pos + 3).context("--client MODE ADDR N")?.parse()?;
        return client(mode, addr, n);
    }
    if !openshell_tests::is_root() {
        eprintln!("skipped: the proxy benchmark needs root (eBPF, cgroups, network namespaces)");
        return Ok(());
    }
    bench()
}

fn client(mode: &str, addr: SocketAddr, n: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    match mode {
        "stream" => {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            let chunk = vec![0x5au8; 256 * 1024];
            let mut left = n;
            while left > 0 {
                let len = usize::try_from(left.min(chunk.len() as u64))?;
                s.write_all(&chunk[..len])?;
                left -= len as u64;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
            println!("{}", start.elapsed().as_nanos());
        }
        "connects" => {
            let mut done = 0u64;
            while done < n && start.elapsed() < CLIENT_TIME_LIMIT {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                let mut buf = [0u8; 1];
                // End of stream: the server accepted (through the proxy: the proxy dialed it).
                if s.read(&mut buf)? != 0 {
                    bail!("the accept-and-close server sent data");
                }
                done += 1;
            }
            println!("{done} {}", start.elapsed().as_nanos());
        }
        "rtt" => {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            let mut out = std::io::stdout().lock();
            let mut buf = [0u8; 1];
            for _ in 0..n {
                if start.elapsed() > CLIENT_TIME_LIMIT {
                    break;
                }
                let t = Instant::now();
                s.write_all(b"x")?;
                s.read_exact(&mut buf)?;
                writeln!(out, "{}", t.elapsed().as_nanos())?;
            }
        }
        other => bail!("unknown client mode {other}"),
    }
    Ok(())
}

/// Starts the three servers on the test host.
fn start_servers(net: &TestNet) -> anyhow::Result<()> {
    let ip: IpAddr = net.ns_v4().into();
    let bind = |port: u16| -> anyhow::Result<TcpListener> {
        Ok(net.run(move || TcpListener::bind((ip, port)))??)
    };
    let sink = bind(SINK_PORT)?;
    let close = bind(CLOSE_PORT)?;
    let echo = bind(ECHO_PORT)?;
    std::thread::spawn(move || {
        for s in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = std::io::copy(&mut s, &mut std::io::sink());
            });
        }
    });
    std::thread::spawn(move || {
        for s in close.incoming() {
            drop(s);
        }
    });
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 1];
                while s.read_exact(&mut buf).is_ok() {
                    if s.write_all(&buf).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Runs one client, in `sandbox` when given, and returns its stdout.
fn run_client(
    sandbox: Option<&Sandbox>,
    mode: &str,
    addr: SocketAddr,
    n: u64,
) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let mut cmd = match sandbox {
        Some(s) => s.command(&exe),
        None => Command::new(&exe),
    };
    cmd.args(["--client", mode, &addr.to_string(), &n.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let out = cmd.output().context("running the benchmark client")?;
    if !out.status.success() {
        bail!("{mode} client failed: {out:?}");
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench() -> anyhow::Result<()> {
    let net = TestNet::new()?;
    start_servers(&net)?;
    let host: IpAddr = net.ns_v4().into();
    let policy = format!(
        "version: 1
network_policies:
  bench:
    endpoints:
      - host: {host}
        ports: [{SINK_PORT}, {CLOSE_PORT}, {ECHO_PORT}]
    binaries:
      - {{ path: \"/**\" }}
"
    );
    // The DNS upstream is never asked (the clients dial the address).
    let dns: SocketAddr = (host, 53).into();
    // `Direct`: the gateway's default (copy relay, and direct connections on the proxy's
    // verdicts); the others relay every connection.
    let relays = [
        ("direct (default)", Path::Direct),
        ("kernel relay", Path::Relay(RelayMode::Kernel)),
        ("splice relay", Path::Relay(RelayMode::Splice)),
        ("copy relay", Path::Relay(RelayMode::Copy)),
    ];
    let sandboxes = relays
        .iter()
        .enumerate()
        .map(|(i, (_, path))| match path {
            Path::Direct => Sandbox::new(&format!("bench-{i}"), &policy, dns),
            Path::Relay(mode) => Sandbox::with_relay(&format!("bench-{i}"), &policy, dns, *mode),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sink = SocketAddr::new(host, SINK_PORT);
    let close = SocketAddr::new(host, CLOSE_PORT);
    let echo = SocketAddr::new(host, ECHO_PORT);
    // Warm up: the first proxied connection hashes this binary (trust on first use), and the
    // first to each destination of the direct path teaches the proxy (its verdict).
    for s in &sandboxes {
        run_client(Some(s), "connects", close, 1)?;
        run_client(Some(s), "stream", sink, 1)?;
        run_client(Some(s), "rtt", echo, 1)?;
    }
    // Connection rate and round trip: the direct path, the kernel relay and the copy relay.
    let per_connection = [
        Path::Direct,
        Path::Relay(RelayMode::Kernel),
        Path::Relay(RelayMode::Copy),
    ];
    let sandbox_of = |mode: Path| {
        relays
            .iter()
            .position(|(_, m)| *m == mode)
            .and_then(|i| sandboxes.get(i))
            .context("no sandbox for the relay")
    };
    let name_of = |mode: Path| {
        relays
            .iter()
            .find(|(_, m)| *m == mode)
            .map_or("?", |(n, _)| *n)
    };

    let gbit = |bytes: u64, ns: &str| -> anyhow::Result<f64> {
        Ok(bytes as f64 * 8.0 / ns.trim().parse::<f64>()?)
    };
    // `PROXY_L4_ONLY=stream|connects|rtt` runs one measure alone (for profiling).
    let only = std::env::var("PROXY_L4_ONLY").unwrap_or_default();
    let phase = |name: &str| only.is_empty() || only == name;
    let mut direct_tp = Vec::new();
    let mut proxy_tp = vec![Vec::new(); relays.len()];
    for _ in 0..if phase("stream") { STREAM_ROUNDS } else { 0 } {
        direct_tp.push(gbit(
            STREAM_BYTES,
            &run_client(None, "stream", sink, STREAM_BYTES)?,
        )?);
        for (s, tp) in sandboxes.iter().zip(&mut proxy_tp) {
            tp.push(gbit(
                STREAM_BYTES,
                &run_client(Some(s), "stream", sink, STREAM_BYTES)?,
            )?);
        }
    }

    let rate = |out: &str| -> anyhow::Result<(u64, f64)> {
        let mut it = out.split_whitespace();
        let n: u64 = it.next().context("count")?.parse()?;
        let ns: f64 = it.next().context("time")?.parse()?;
        Ok((n, ns))
    };
    let (mut direct_c, mut direct_ns) = (0u64, 0f64);
    let mut proxy_c = [(0u64, 0f64); 3];
    // CPU time of the proxies' runtime threads (tokio workers and blocking threads) while each
    // path's connection rounds ran: what the gateway spends per connection.
    let mut proxy_cpu_ns = [0u64; 3];
    for _ in 0..if phase("connects") { CONNECT_ROUNDS } else { 0 } {
        let (n, ns) = rate(&run_client(None, "connects", close, CONNECTS as u64)?)?;
        direct_c += n;
        direct_ns += ns;
        for ((mode, acc), cpu) in per_connection
            .iter()
            .zip(&mut proxy_c)
            .zip(&mut proxy_cpu_ns)
        {
            let before = runtime_cpu_ns();
            let (n, ns) = rate(&run_client(
                Some(sandbox_of(*mode)?),
                "connects",
                close,
                CONNECTS as u64,
            )?)?;
            // The direct path's log lines are written just after; let them finish.
            std::thread::sleep(Duration::from_millis(100));
            *cpu += runtime_cpu_ns().saturating_sub(before);
            acc.0 += n;
            acc.1 += ns;
        }
    }

    let mut direct_rtt = Vec::new();
    let mut proxy_rtt = [Vec::new(), Vec::new(), Vec::new()];
    let parse_rtts = |out: &str| -> Vec<f64> {
        out.lines()
            .filter_map(|l| l.parse::<f64>().ok())
            .map(|ns| ns / 1000.0)
            .collect()
    };
    for _ in 0..if phase("rtt") { PING_ROUNDS } else { 0 } {
        direct_rtt.extend(parse_rtts(&run_client(None, "rtt", echo, PINGS as u64)?));
        for (mode, acc) in per_connection.iter().zip(&mut proxy_rtt) {
            acc.extend(parse_rtts(&run_client(
                Some(sandbox_of(*mode)?),
                "rtt",
                echo,
                PINGS as u64,
            )?));
        }
    }

    let d = median(direct_tp);
    println!(
        "throughput, one stream of {} MiB, median of {STREAM_ROUNDS}:",
        STREAM_BYTES >> 20
    );
    println!("| path | Gbit/s | of direct |");
    println!("|---|---|---|");
    println!("| direct | {d:.2} | 100% |");
    for ((name, _), tp) in relays.iter().zip(proxy_tp) {
        let t = median(tp);
        println!("| proxy, {name} | {t:.2} | {:.0}% |", 100.0 * t / d);
    }
    let dr = direct_c as f64 / (direct_ns / 1e9);
    println!("new connections, one at a time, {direct_c} direct:");
    println!("| path | connections/s | of direct |");
    println!("|---|---|---|");
    println!("| direct | {dr:.0} | 100% |");
    for (mode, (n, ns)) in per_connection.iter().zip(proxy_c) {
        let pr = n as f64 / (ns / 1e9);
        println!(
            "| proxy, {} | {pr:.0} | {:.0}% |",
            name_of(*mode),
            100.0 * pr / dr
        );
    }
    println!("proxy runtime CPU per connection (connection rounds):");
    for ((mode, (n, _)), cpu) in per_connection.iter().zip(proxy_c).zip(proxy_cpu_ns) {
        println!(
            "| proxy, {} | {:.1} µs |",
            name_of(*mode),
            cpu as f64 / 1e3 / n.max(1) as f64
        );
    }
    let dm = median(direct_rtt.clone());
    println!(
        "round trip on a kept-alive connection, {} direct pings:",
        direct_rtt.len()
    );
    println!("| path | median | added |");
    println!("|---|---|---|");
    println!("| direct | {dm:.1} µs | |");
    for (mode, rtts) in per_connection.iter().zip(proxy_rtt) {
        let pm = median(rtts);
        println!(
            "| proxy, {} | {pm:.1} µs | {:.1} µs |",
            name_of(*mode),
            pm - dm
        );
    }
    let decisions: usize = sandboxes.iter().map(|s| s.log.records().len()).sum();
    println!("decisions logged by the proxies: {decisions}");
    if let Some(s) = sandboxes.first() {
        let c = s.counters()?;
        println!(
            "direct path: {} connects went direct, {} through the proxy",
            c.direct, c.tcp_redirected
        );
    }
    Ok(())
}

/// How a sandbox's allowed connections reach the test host.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The default: direct on the proxy's verdict after the first connection.
    Direct,
    /// Every connection through the proxy's relay.
    Relay(RelayMode),
}

/// Time on CPU, in nanoseconds, of this process's tokio runtime threads (the proxies'), read
/// from each thread's CPU clock (`/proc/self/task` lists them; the kernel's per-thread clock id
/// for thread `tid` is `(!tid << 3) | 6`, as glibc's `pthread_getcpuclockid` builds it).
fn runtime_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("tokio-"))
        })
        .filter_map(|t| t.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .map(|tid| {
            let clock: libc::clockid_t = (!tid << 3) | 6;
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid out-pointer; a thread that exited meanwhile gives EINVAL,
            // counted as 0.
            if unsafe { libc::clock_gettime(clock, &raw mut ts) } != 0 {
                return 0;
            }
            u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
                + u64::try_from(ts.tv_nsec).unwrap_or(0)
        })
        .sum()
}
