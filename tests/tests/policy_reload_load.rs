//! Issue 7, semantics under change, through the real gateway, proxy and eBPF programs, with a
//! real DNS server, an HTTPS upstream and TCP echo servers on a test host:
//!
//! - Under a constant load of L4 connections and inspected HTTP requests (on one kept-alive
//!   connection) from python3 inside a sandbox, 100 reloads alternating between two policies
//!   produce no error on what both allow, and every logged decision is the one its revision's
//!   policy gives (checked against the policy engine), consistent with what the client and the
//!   upstreams saw.
//! - Open L4 relays and inspected connections that a new generation denies are closed; those it
//!   still allows are left alone.
//! - `policy set --wait` exits 124 while a revision stays pending and when no gateway is
//!   reachable; a revision that fails to load leaves the previous generation in force.
//! - A restarted gateway judges a connection that arrives before it re-adopted its sandboxes by
//!   the restored revision, never without it.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod proxy_support;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    path::PathBuf,
    process::{Child, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use openshell::policy::{CompiledPolicy, ConnectionQuery, HttpRequestQuery, Verdict};
use openshell_tests::{
    dns::TestDns,
    gateway::{Run, TestGateway, run_with_timeout},
    netns::TestNet,
    upstream::{TestCa, Upstream},
};
use proxy_support::{privileged, python3};

const NAME: &str = "load";
const API: &str = "api.example.com";
const ECHO: &str = "echo.example.com";
/// Echo port both policies allow.
const SHARED_PORT: u16 = 7000;
/// Echo port only policy A allows.
const A_PORT: u16 = 7001;
const RELOADS: usize = 100;
/// Upper bounds of the load client, whatever happens.
const CLIENT_ITERATIONS: usize = 20_000;
const CLIENT_SECONDS: u64 = 300;
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// A test host with the HTTPS upstream (`api.example.com`), TCP echo servers on
/// [`SHARED_PORT`] and [`A_PORT`] (`echo.example.com`) and the DNS server naming both, plus a
/// gateway configured to use them. Dropped in reverse order: gateway first.
struct Fixture {
    gw: TestGateway,
    upstream: Upstream,
    /// Lines the echo servers received, with their port.
    echoed: Arc<Mutex<Vec<(u16, String)>>>,
    net: TestNet,
    _dns: TestDns,
    _runtime: tokio::runtime::Runtime,
}

impl Fixture {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _enter = runtime.enter();
        let net = TestNet::new().unwrap();
        let dns = TestDns::start_in(&net).unwrap();
        let ca = TestCa::new().unwrap();
        let upstream = Upstream::start(&net, &ca, &[API]).unwrap();
        let ip: IpAddr = net.ns_v4().into();
        dns.add(API, ip);
        dns.add(ECHO, ip);
        let echoed = Arc::new(Mutex::new(Vec::new()));
        for port in [SHARED_PORT, A_PORT] {
            let listener = net
                .run(|| std::net::TcpListener::bind((net.ns_v4(), port)))
                .unwrap()
                .unwrap();
            runtime.spawn(echo(listener, port, Arc::clone(&echoed)));
        }
        let gw = TestGateway::with_dns_and_ca(dns.addr(), &ca.cert_pem).unwrap();
        Self {
            gw,
            upstream,
            echoed,
            net,
            _dns: dns,
            _runtime: runtime,
        }
    }

    fn ip(&self) -> IpAddr {
        self.net.ns_v4().into()
    }

    /// Writes `text` to a file in the gateway's directory and returns its path.
    fn file(&self, name: &str, text: &str) -> String {
        let path = self.gw.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    /// Creates sandbox [`NAME`] with policy file `policy` (running `true` once).
    fn create(&self, policy: &str) {
        self.gw
            .run(&[
                "sandbox", "create", "--name", NAME, "--policy", policy, "--", "true",
            ])
            .unwrap()
            .ok()
            .unwrap();
    }

    /// Host directory mounted at `/sandbox`.
    fn workdir(&self) -> PathBuf {
        self.gw
            .state_dir()
            .join("sandboxes")
            .join(NAME)
            .join("work")
    }

    fn set(&self, policy: &str, extra: &[&str]) -> Run {
        let mut args = vec!["policy", "set", NAME, "--policy", policy, "--wait"];
        args.extend_from_slice(extra);
        self.gw.run(&args).unwrap()
    }

    /// Every decision of the sandbox, oldest first.
    fn decisions(&self) -> Vec<serde_json::Value> {
        let run = self
            .gw
            .run(&["logs", NAME, "-o", "json", "-n", "100000"])
            .unwrap()
            .ok()
            .unwrap();
        run.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Polls the decision log (bounded) until `pred` holds for one record, and returns it.
    fn wait_for_decision(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all = self.decisions();
            if let Some(found) = all.iter().find(|r| pred(r)) {
                return found.clone();
            }
            assert!(Instant::now() < deadline, "no such decision in {all:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every revision of the sandbox, compiled, by version.
    fn revisions(&self) -> BTreeMap<i64, (String, CompiledPolicy)> {
        let run = self
            .gw
            .run(&["policy", "list", NAME, "-o", "json"])
            .unwrap()
            .ok()
            .unwrap();
        run.json()
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let text = r["policy"].as_str().unwrap();
                let policy = openshell::policy::parse("revision", text).unwrap();
                (
                    r["version"].as_i64().unwrap(),
                    (r["status"].as_str().unwrap().to_owned(), policy.compile()),
                )
            })
            .collect()
    }

    /// Runs python3 `script` with `args` in the sandbox, stdin and stdout piped.
    fn python(&self, script: &str, args: &[&str]) -> Client {
        let python = python3().display().to_string();
        let mut cmd = self.gw.command();
        cmd.args(["sandbox", "exec", NAME, "--", &python, "-c", script])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Client { child, lines }
    }
}

/// A client in the sandbox; killed on drop.
struct Client {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Client {
    fn line(&self) -> String {
        self.lines.recv_timeout(LINE_TIMEOUT).unwrap()
    }

    fn say(&mut self, what: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{what}").unwrap();
        stdin.flush().unwrap();
    }

    /// Every remaining line, until the client ends (bounded).
    fn rest(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return out,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the client did not finish within {timeout:?}; got {out:?}")
                }
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Echoes every line back and records it.
async fn echo(listener: std::net::TcpListener, port: u16, seen: Arc<Mutex<Vec<(u16, String)>>>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    while let Ok((stream, _)) = listener.accept().await {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                seen.lock().unwrap().push((port, line.clone()));
                if write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

/// Policy A (`a == true`) or B. Both allow python3 to reach the echo server on
/// [`SHARED_PORT`] and `GET /both/**` on the inspected API; A also allows the echo server on
/// [`A_PORT`] and `GET /a/**`, B allows `GET /b/**` instead.
fn policy(a: bool) -> String {
    let python = python3().display().to_string();
    let (only, only_port) = if a {
        ("a", format!("      - {{ host: {ECHO}, port: {A_PORT} }}\n"))
    } else {
        ("b", String::new())
    };
    format!(
        "version: 1
network_policies:
  echo:
    endpoints:
      - {{ host: {ECHO}, port: {SHARED_PORT} }}
{only_port}    binaries:
      - {{ path: {python} }}
  api:
    endpoints:
      - host: {API}
        port: 443
        protocol: rest
        rules:
          - allow: {{ method: GET, path: \"/both/**\" }}
          - allow: {{ method: GET, path: \"/{only}/**\" }}
    binaries:
      - {{ path: {python} }}
"
    )
}

/// The load client: per iteration one L4 connection to each echo port and three requests on
/// one kept-alive HTTPS connection (`/both/I`, `/a/I`, `/b/I`), one result line each
/// (`KIND I OUTCOME`), until `/sandbox/stop` exists or its bounds are reached; then the number
/// of HTTPS connections it had to open.
const LOAD_CLIENT: &str = r#"
import http.client, os, socket, ssl, sys, time
limit, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
ECHO, SHARED, ONLY_A, API = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
ctx = ssl.create_default_context()
conn, conns = None, 0

def l4(port, i):
    msg = b"%d-%d\n" % (port, i)
    try:
        with socket.create_connection((ECHO, port), timeout=10) as s:
            s.sendall(msg)
            got = b""
            while not got.endswith(b"\n"):
                chunk = s.recv(64)
                if not chunk:
                    break
                got += chunk
            return "ok" if got == msg else "eof"
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return "reset"
    except OSError as e:
        return "error:" + type(e).__name__

def l7(path):
    global conn, conns
    if conn is None:
        conn = http.client.HTTPSConnection(API, 443, context=ctx, timeout=10)
        conns += 1
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return str(r.status)
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        conn = None
        return "error:" + type(e).__name__

print("started", flush=True)
i = 0
while i < limit and time.monotonic() < deadline and not os.path.exists("/sandbox/stop"):
    print("l4both", i, l4(SHARED, i))
    print("l4a", i, l4(ONLY_A, i))
    for kind in ("both", "a", "b"):
        print("l7" + kind, i, l7("/%s/%d" % (kind, i)))
    sys.stdout.flush()
    i += 1
print("conns", conns, flush=True)
"#;

/// What the policy engine says about a logged decision under `policy`: an inspected request
/// (its reason starts with `GET /`) or a connection.
fn expected(policy: &CompiledPolicy, record: &serde_json::Value) -> Verdict {
    let reason = record["reason"].as_str().unwrap();
    let binary = PathBuf::from(record["binary"].as_str().unwrap());
    let ancestors: Vec<PathBuf> = record["ancestors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| PathBuf::from(a.as_str().unwrap()))
        .collect();
    let host = record["host"].as_str().unwrap();
    let ip: IpAddr = record["ip"].as_str().unwrap().parse().unwrap();
    let query = ConnectionQuery {
        host,
        port: u16::try_from(record["port"].as_u64().unwrap()).unwrap(),
        binary: &binary,
        ancestors: &ancestors,
        dest_ip: Some(ip),
    };
    match reason.strip_prefix("GET ") {
        Some(rest) if rest.starts_with('/') => {
            let target = rest.split([':', ' ']).next().unwrap();
            policy
                .decide_request(
                    &query,
                    &HttpRequestQuery {
                        method: "GET",
                        target,
                    },
                )
                .verdict
        }
        _ => policy.decide_connection(&query).verdict,
    }
}

fn verdict(record: &serde_json::Value) -> Verdict {
    match record["decision"].as_str().unwrap() {
        "allow" => Verdict::Allow,
        "deny" => Verdict::Deny,
        other => panic!("unexpected decision {other:?} in {record}"),
    }
}

#[test]
fn reloads_under_load_keep_every_decision_to_its_generation() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    let a = fx.file("a.yaml", &policy(true));
    let b = fx.file("b.yaml", &policy(false));
    fx.create(&a);

    let client = fx.python(
        LOAD_CLIENT,
        &[
            &CLIENT_ITERATIONS.to_string(),
            &CLIENT_SECONDS.to_string(),
            ECHO,
            &SHARED_PORT.to_string(),
            &A_PORT.to_string(),
            API,
        ],
    );
    assert_eq!(client.line(), "started");
    // The load is running before the first reload.
    assert!(client.line().starts_with("l4both 0 "));

    for i in 0..RELOADS {
        let file = if i.is_multiple_of(2) { &b } else { &a };
        let run = fx.set(file, &[]);
        assert_eq!(run.code, Some(0), "reload {i}: {run:?}");
        assert!(run.stdout.contains("loaded"), "reload {i}: {run:?}");
    }
    std::fs::write(fx.workdir().join("stop"), "").unwrap();
    let lines = client.rest(Duration::from_secs(CLIENT_SECONDS + 60));

    // The client's view: what both policies allow never failed; the kept-alive connection was
    // never broken.
    let mut outcomes: BTreeMap<(String, u64), String> = BTreeMap::new();
    let mut conns = None;
    for line in &lines {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["conns", n] => conns = Some(n.parse::<u64>().unwrap()),
            [kind, i, outcome] => {
                outcomes.insert(
                    ((*kind).to_owned(), i.parse().unwrap()),
                    (*outcome).to_owned(),
                );
            }
            _ => panic!("unexpected client line {line:?}"),
        }
    }
    assert_eq!(conns, Some(1), "the kept-alive connection was reopened");
    let iterations = outcomes.keys().filter(|(k, _)| k == "l7b").count();
    assert!(iterations > 0, "{lines:?}");
    for ((kind, i), outcome) in &outcomes {
        let fine = match kind.as_str() {
            "l4both" => outcome == "ok",
            "l7both" => outcome == "200",
            "l4a" => outcome == "ok" || outcome == "reset",
            "l7a" | "l7b" => outcome == "200" || outcome == "403",
            _ => false,
        };
        assert!(fine, "{kind} {i}: {outcome}");
    }

    // The log's view: every decision is what its revision's policy says.
    let revisions = fx.revisions();
    assert_eq!(revisions.len(), RELOADS + 1);
    assert!(
        revisions
            .iter()
            .filter(|(v, _)| **v <= i64::try_from(RELOADS).unwrap())
            .all(|(_, (status, _))| status == "superseded")
    );
    let python = python3().display().to_string();
    let log: Vec<serde_json::Value> = fx
        .decisions()
        .into_iter()
        .filter(|r| r["port"] != 53)
        .collect();
    let mut request_revisions = Vec::new();
    let mut logged: BTreeMap<String, Verdict> = BTreeMap::new();
    for record in &log {
        assert_eq!(record["binary"], python.as_str(), "{record}");
        let revision = record["revision"].as_i64().unwrap();
        let (_, policy) = &revisions[&revision];
        assert_eq!(
            verdict(record),
            expected(policy, record),
            "revision {revision} decided otherwise: {record}"
        );
        let reason = record["reason"].as_str().unwrap();
        if let Some(rest) = reason.strip_prefix("GET /") {
            let target = format!("/{}", rest.split([':', ' ']).next().unwrap());
            request_revisions.push(revision);
            assert!(
                logged.insert(target.clone(), verdict(record)).is_none(),
                "{target} decided twice"
            );
        }
    }
    // Requests on the one kept-alive connection were decided by many generations, in order.
    assert!(request_revisions.is_sorted(), "{request_revisions:?}");
    let distinct: BTreeSet<i64> = request_revisions.iter().copied().collect();
    assert!(distinct.len() > 10, "{distinct:?}");

    // Client, log and upstreams agree: an allowed request reached the upstream, a denied one
    // did not; both outcomes of what only one policy allows were seen.
    let arrived: BTreeSet<String> = fx.upstream.seen().into_iter().map(|s| s.target).collect();
    let mut seen_both_ways = BTreeSet::new();
    for ((kind, i), outcome) in &outcomes {
        let Some(path) = kind.strip_prefix("l7") else {
            continue;
        };
        let target = format!("/{path}/{i}");
        let verdict = logged.get(&target).copied();
        let want = if outcome == "200" {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        assert_eq!(verdict, Some(want), "{target}: client saw {outcome}");
        assert_eq!(
            arrived.contains(&target),
            want == Verdict::Allow,
            "{target}"
        );
        seen_both_ways.insert((path.to_owned(), outcome.clone()));
    }
    let echoed: BTreeSet<(u16, String)> = fx.echoed.lock().unwrap().iter().cloned().collect();
    let mut a_port = BTreeSet::new();
    let mut unechoed_reached = 0;
    for ((kind, i), outcome) in &outcomes {
        let port = match kind.as_str() {
            "l4both" => SHARED_PORT,
            "l4a" => A_PORT,
            _ => continue,
        };
        let line = (port, format!("{port}-{i}"));
        if outcome == "ok" {
            assert!(echoed.contains(&line), "{kind} {i}");
        } else {
            unechoed_reached += usize::from(echoed.contains(&line));
        }
        if port == A_PORT {
            a_port.insert(outcome.clone());
        }
    }
    // Each allowed connection on the A-only port completed, or was closed by the reload that
    // came while it was open (it may have reached the echo server before that).
    let count = |decision: &str, closed: bool| {
        log.iter()
            .filter(|r| {
                r["port"] == A_PORT
                    && r["decision"] == decision
                    && r["reason"]
                        .as_str()
                        .unwrap()
                        .starts_with("open connection closed")
                        == closed
            })
            .count()
    };
    let (allowed, revoked) = (count("allow", false), count("deny", true));
    let l4_ok = outcomes
        .iter()
        .filter(|((k, _), o)| k == "l4a" && *o == "ok")
        .count();
    assert!(
        l4_ok <= allowed && allowed <= l4_ok + revoked && unechoed_reached <= revoked,
        "port {A_PORT}: {allowed} allowed, {revoked} closed by a reload, {l4_ok} echoed, {unechoed_reached} reached the echo server but not the client"
    );
    for both in [("a", "200"), ("a", "403"), ("b", "200"), ("b", "403")] {
        assert!(
            seen_both_ways.contains(&(both.0.to_owned(), both.1.to_owned())),
            "no {both:?} under load: the reloads did not interleave with it"
        );
    }
    assert_eq!(a_port.len(), 2, "port {A_PORT} outcomes: {a_port:?}");
    eprintln!(
        "{iterations} client iterations, {} decisions checked against {} revisions, {} on the kept-alive connection",
        log.len(),
        revisions.len(),
        distinct.len()
    );
}

/// Holds one connection of each kind open and reports on it when told to.
const OPEN_CLIENT: &str = r#"
import http.client, socket, ssl, sys
ECHO, SHARED, ONLY_A, API = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
shared = socket.create_connection((ECHO, SHARED), timeout=10)
only_a = socket.create_connection((ECHO, ONLY_A), timeout=10)
api = http.client.HTTPSConnection(API, 443, context=ssl.create_default_context(), timeout=10)
api.auto_open = 0

def echo(s, name, n):
    try:
        s.sendall(b"%s-%d\n" % (name, n))
        return "ok" if s.recv(64) == b"%s-%d\n" % (name, n) else "eof"
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return "reset"

def get(n):
    try:
        api.request("GET", "/both/open-%d" % n)
        r = api.getresponse()
        r.read()
        return str(r.status)
    except http.client.NotConnected:
        return "closed"
    except (OSError, http.client.HTTPException) as e:
        return "closed"

api.connect()
for n in range(3):
    print(echo(shared, b"shared", n), echo(only_a, b"only-a", n), get(n), flush=True)
    if not sys.stdin.readline():
        break
"#;

#[test]
fn open_connections_are_closed_only_when_the_new_generation_denies_them() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    let a = fx.file("a.yaml", &policy(true));
    let b = fx.file("b.yaml", &policy(false));
    // C keeps the shared echo port only: no API at all.
    let python = python3().display().to_string();
    let c = fx.file(
        "c.yaml",
        &format!(
            "version: 1\nnetwork_policies:\n  echo:\n    endpoints:\n      - {{ host: {ECHO}, port: {SHARED_PORT} }}\n    binaries:\n      - {{ path: {python} }}\n"
        ),
    );
    fx.create(&a);
    let mut client = fx.python(
        OPEN_CLIENT,
        &[ECHO, &SHARED_PORT.to_string(), &A_PORT.to_string(), API],
    );
    assert_eq!(client.line(), "ok ok 200");

    // B no longer allows port 7001: that relay is reset; the shared relay and the inspected
    // connection (B still allows the API) are left alone.
    assert_eq!(fx.set(&b, &[]).code, Some(0));
    client.say("next");
    assert_eq!(client.line(), "ok reset 200");
    let closed = fx.wait_for_decision(|r| {
        r["port"] == A_PORT && r["decision"] == "deny" && r["revision"] == 2
    });
    assert!(
        closed["reason"]
            .as_str()
            .unwrap()
            .starts_with("open connection closed: policy revision 2 no longer allows it"),
        "{closed}"
    );

    // C drops the API: the inspected connection is closed; the shared relay still stands.
    assert_eq!(fx.set(&c, &[]).code, Some(0));
    let closed =
        fx.wait_for_decision(|r| r["port"] == 443 && r["decision"] == "deny" && r["revision"] == 3);
    assert!(
        closed["reason"]
            .as_str()
            .unwrap()
            .starts_with("open connection closed: policy revision 3 no longer allows it"),
        "{closed}"
    );
    client.say("next");
    assert_eq!(client.line(), "ok reset closed");
    let arrived: Vec<String> = fx.upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(arrived, ["/both/open-0", "/both/open-1"]);
    let echoed: Vec<String> = fx
        .echoed
        .lock()
        .unwrap()
        .iter()
        .map(|(_, l)| l.clone())
        .collect();
    assert_eq!(echoed, ["shared-0", "only-a-0", "shared-1", "shared-2"]);
}

/// One connection to the echo server on `port`: `ok`, `reset` or an error name.
const ONE_SHOT: &str = r#"
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
        s.sendall(b"one-shot\n")
        print("ok" if s.recv(64) == b"one-shot\n" else "eof")
except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
    print("reset")
except OSError as e:
    print("error:" + type(e).__name__)
"#;

#[test]
fn set_wait_exit_codes_and_a_failed_load_keeps_the_previous_generation() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    let a = fx.file("a.yaml", &policy(true));
    let b = fx.file("b.yaml", &policy(false));
    fx.create(&a);
    let one_shot = || fx.python(ONE_SHOT, &[ECHO, &A_PORT.to_string()]).line();
    assert_eq!(one_shot(), "ok");
    let restart_with = |failpoint: &str| {
        fx.gw.run(&["gateway", "stop"]).unwrap().ok().unwrap();
        let mut cmd = fx.gw.command();
        cmd.env("OPENSHELL_FAILPOINT", failpoint)
            .args(["gateway", "start"]);
        run_with_timeout(cmd, b"", Duration::from_secs(60))
            .unwrap()
            .ok()
            .unwrap();
    };
    let status = |version: i64| fx.revisions()[&version].0.clone();

    // A revision held pending: --wait gives up with 124 and says so; the revision still loads
    // later, once the gateway gets to it.
    restart_with("policy-before-load");
    let run = fx.set(&b, &["--timeout", "1"]);
    assert_eq!(run.code, Some(124), "{run:?}");
    assert!(
        run.stderr
            .contains("policy version 2 still pending after 1 s"),
        "{run:?}"
    );
    assert_eq!(status(2), "pending");
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(2) != "loaded" {
        assert!(Instant::now() < deadline, "revision 2 never loaded");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(one_shot(), "reset");

    // A revision that fails to load: exit 1 with the error, recorded as failed; revision 2
    // stays in force (port 7001 still denied), and so it does for the next connection.
    restart_with("policy-load-fails");
    let run = fx.set(&a, &[]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("policy version 3 failed to load; the previous policy stays in force"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("failpoint policy-load-fails"),
        "{run:?}"
    );
    assert_eq!(status(3), "failed");
    assert_eq!(status(2), "loaded");
    assert_eq!(one_shot(), "reset");
    let denied = fx.wait_for_decision(|r| r["port"] == A_PORT && r["revision"] == 2);
    assert_eq!(denied["decision"], "deny");
    assert!(
        !fx.decisions().iter().any(|r| r["revision"] == 3),
        "a failed revision decided something"
    );

    // No gateway at all: 124 as well.
    fx.gw.run(&["gateway", "stop"]).unwrap().ok().unwrap();
    let run = fx.set(&a, &["--timeout", "5"]);
    assert_eq!(run.code, Some(124), "{run:?}");
}

/// Waits for `/sandbox/go`, then connects to `ECHO_IP:PORT` until a connection is accepted
/// (refused ones are the gateway being down), and writes what became of it to
/// `/sandbox/result`.
const AFTER_RESTART: &str = r#"
import os, socket, sys, time
deadline = time.monotonic() + 60
print("waiting", flush=True)
while not os.path.exists("/sandbox/go"):
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.01)
refused = 0
while time.monotonic() < deadline:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
    except ConnectionRefusedError:
        refused += 1
        time.sleep(0.005)
        continue
    try:
        s.sendall(b"after-restart\n")
        result = "ok" if s.recv(64) == b"after-restart\n" else "eof"
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        result = "reset"
    except OSError as e:
        result = "error:" + type(e).__name__
    break
else:
    result = "timeout"
with open("/sandbox/result.tmp", "w") as f:
    f.write("%s %d" % (result, refused))
os.rename("/sandbox/result.tmp", "/sandbox/result")
"#;

#[test]
fn a_connection_right_after_a_restart_is_judged_by_the_restored_revision() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    let python = python3().display().to_string();
    let ip = fx.ip();
    // The creation policy denies the echo server; revision 2 allows it (by address, so that
    // no DNS answer from before the restart is needed).
    let denies = fx.file(
        "denies.yaml",
        &format!(
            "version: 1\nnetwork_policies:\n  other:\n    endpoints:\n      - {{ host: {API}, port: 443 }}\n    binaries:\n      - {{ path: {python} }}\n"
        ),
    );
    let allows = fx.file(
        "allows.yaml",
        &format!(
            "version: 1\nnetwork_policies:\n  echo:\n    endpoints:\n      - {{ host: \"{ip}\", port: {SHARED_PORT} }}\n    binaries:\n      - {{ path: {python} }}\n"
        ),
    );
    fx.create(&denies);
    assert_eq!(fx.set(&allows, &[]).code, Some(0));
    let client = fx.python(AFTER_RESTART, &[&ip.to_string(), &SHARED_PORT.to_string()]);
    assert_eq!(client.line(), "waiting");

    // The client starts connecting while the gateway is down; the new gateway binds its
    // listeners and pauses before re-adopting the sandbox: the first connection that gets
    // through arrives in that pause.
    fx.gw.run(&["gateway", "stop"]).unwrap().ok().unwrap();
    std::fs::write(fx.workdir().join("go"), "").unwrap();
    let mut cmd = fx.gw.command();
    cmd.env("OPENSHELL_FAILPOINT", "start-before-reconcile")
        .args(["gateway", "start"]);
    run_with_timeout(cmd, b"", Duration::from_secs(60))
        .unwrap()
        .ok()
        .unwrap();
    let log = std::fs::read_to_string(fx.gw.state_dir().join("gateway.log")).unwrap();
    assert!(log.contains("failpoint start-before-reconcile"), "{log}");
    let result = fx.workdir().join("result");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !result.exists() {
        assert!(Instant::now() < deadline, "the client never connected");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(client);
    let result = std::fs::read_to_string(&result).unwrap();
    let (outcome, refused) = result.split_once(' ').unwrap();
    assert_eq!(outcome, "ok", "{result}");
    // It tried while the gateway was down, so the accepted one came in after the restart.
    assert!(refused.parse::<u64>().unwrap() > 0, "{result}");
    let allowed = fx.wait_for_decision(|r| r["port"] == SHARED_PORT);
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    assert_eq!(allowed["revision"], 2, "{allowed}");
    assert_eq!(
        fx.echoed.lock().unwrap().as_slice(),
        [(SHARED_PORT, "after-restart".to_owned())]
    );
}
