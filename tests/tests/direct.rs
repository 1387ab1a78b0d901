//! Direct connections end to end: real eBPF on a test cgroup, the real proxy, a real DNS and
//! HTTPS server on a test host in a network namespace, and real clients in the cgroup. An
//! allowed L4 connection the proxy judged before goes direct on its verdict; each test here
//! attacks one of the conditions under which the kernel may apply a verdict alone.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod proxy_support;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    sync::mpsc,
    time::Duration,
};

use proxy_support::{Sandbox, TestHost, privileged, python3};

/// `binaries` may reach pypi.org:443 (the seed's `pypi` block, trimmed).
fn policy(binaries: &[&str]) -> String {
    let mut list = String::new();
    for b in binaries {
        list.push_str(&format!("      - {{ path: {b} }}\n"));
    }
    format!(
        "version: 1
network_policies:
  pypi:
    name: pypi
    endpoints:
      - host: pypi.org
        port: 443
    binaries:
{list}"
    )
}

fn pypi_host() -> TestHost {
    let host = TestHost::new(&["pypi.org"]).unwrap();
    host.dns.add("pypi.org", host.ip());
    host
}

/// `program` (a copy of curl, or curl) fetches `https://pypi.org/PATH` in `sandbox`.
fn fetch(sandbox: &Sandbox, host: &TestHost, program: &Path, path: &str) -> std::process::Output {
    for _ in 0..50 {
        let mut cmd = sandbox.command(program);
        cmd.args(["-sS", "--max-time", "10", "--cacert"])
            .arg(host.ca())
            .arg(format!("https://pypi.org/{path}"));
        match sandbox.run(cmd) {
            Ok(out) => return out,
            // A copy made a moment ago can be busy while a parallel test's fork holds it.
            Err(e) if format!("{e:#}").contains("Text file busy") => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e:#}"),
        }
    }
    panic!("{} stayed busy", program.display());
}

fn succeeded(out: &std::process::Output) -> bool {
    out.status.success() && String::from_utf8_lossy(&out.stdout) == "hello from the test host\n"
}

/// A sandbox whose policy lets `DIR/tool` (a copy of curl in a fresh directory) reach
/// pypi.org, with the test host playing it.
struct ToolSandbox {
    host: TestHost,
    dir: tempfile::TempDir,
    tool: std::path::PathBuf,
    sandbox: Sandbox,
}

impl ToolSandbox {
    fn new(name: &str) -> Self {
        let host = pypi_host();
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let tool = curl_copy(dir.path(), "tool");
        let tool_text = tool.display().to_string();
        let sandbox = Sandbox::new(name, &policy(&[&tool_text]), host.dns.addr()).unwrap();
        Self {
            host,
            dir,
            tool,
            sandbox,
        }
    }
}

/// `program` fetches `/a`, which the proxy relays and judges (writing a verdict), then `/b`,
/// which goes direct on it.
fn teach(sandbox: &Sandbox, host: &TestHost, program: &Path) {
    assert!(succeeded(&fetch(sandbox, host, program, "a")));
    assert!(succeeded(&fetch(sandbox, host, program, "b")));
    assert_eq!(direct(sandbox), 1);
}

/// `program`'s request for `/c` fails, and the proxy logs a denial of `program` that says
/// `why`.
fn assert_denied(sandbox: &Sandbox, host: &TestHost, program: &Path, why: &str) {
    let out = fetch(sandbox, host, program, "c");
    assert!(!out.status.success(), "{out:?}");
    let path = program.display().to_string();
    let denied = sandbox
        .wait_for_record(|r| r.decision == "deny" && r.binary.as_deref() == Some(&*path))
        .unwrap();
    assert!(denied.reason.contains(why), "{}", denied.reason);
}

/// How many connects went direct so far.
fn direct(sandbox: &Sandbox) -> u64 {
    sandbox.counters().unwrap().direct
}

/// curl copied into a fresh directory (one hard link, its own inode).
fn curl_copy(dir: &Path, name: &str) -> std::path::PathBuf {
    let copy = dir.join(name);
    std::fs::copy("/usr/bin/curl", &copy).unwrap();
    copy
}

#[test]
fn repeated_connections_go_direct_and_each_is_logged() {
    if !privileged() {
        return;
    }
    let host = pypi_host();
    let sandbox = Sandbox::new("repeat", &policy(&["/usr/bin/curl"]), host.dns.addr()).unwrap();
    for i in 0..4 {
        let out = fetch(
            &sandbox,
            &host,
            Path::new("/usr/bin/curl"),
            &format!("r{i}"),
        );
        assert!(succeeded(&out), "{out:?}");
    }
    assert_eq!(host.requests(), ["/r0", "/r1", "/r2", "/r3"]);
    // The first connection taught the proxy; the next three went direct.
    assert_eq!(direct(&sandbox), 3);
    let mut allowed = Vec::new();
    for _ in 0..100 {
        allowed = sandbox
            .log
            .records()
            .into_iter()
            .filter(|r| r.decision == "allow" && r.port == Some(443))
            .collect();
        if allowed.len() >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(allowed.len(), 4, "{allowed:#?}");
    for r in &allowed {
        assert_eq!(r.binary.as_deref(), Some("/usr/bin/curl"));
        assert_eq!(r.host.as_deref(), Some("pypi.org"));
        assert_eq!(r.ip, Some(host.ip().to_string()));
        assert_eq!(r.block.as_deref(), Some("pypi"));
        assert_eq!(r.revision, Some(1));
        assert!(r.pid.is_some());
    }
}

#[test]
fn a_binary_changed_in_place_is_checked_by_the_proxy_again() {
    if !privileged() {
        return;
    }
    let ToolSandbox {
        host,
        dir: _dir,
        tool,
        sandbox,
    } = ToolSandbox::new("changed");
    teach(&sandbox, &host, &tool);
    // Same inode, new content: trust on first use must catch it, so the verdict must not apply.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&tool)
        .unwrap();
    std::io::Write::write_all(&mut f, b"tampered").unwrap();
    drop(f);
    assert_denied(&sandbox, &host, &tool, "integrity violation");
    assert_eq!(direct(&sandbox), 1);
    assert_eq!(host.requests(), ["/a", "/b"]);
}

#[test]
fn a_hard_link_to_an_allowed_binary_never_borrows_its_verdict() {
    if !privileged() {
        return;
    }
    let ToolSandbox {
        host,
        dir,
        tool,
        sandbox,
    } = ToolSandbox::new("hardlink");
    teach(&sandbox, &host, &tool);
    // A second name for the same file, made after the verdict was written.
    let alias = dir.path().join("alias");
    std::fs::hard_link(&tool, &alias).unwrap();
    assert_denied(&sandbox, &host, &alias, "not listed");
    // While the file has two names, even the allowed one goes through the proxy.
    assert!(succeeded(&fetch(&sandbox, &host, &tool, "d")));
    assert!(succeeded(&fetch(&sandbox, &host, &tool, "e")));
    assert_eq!(direct(&sandbox), 1);
    assert_eq!(host.requests(), ["/a", "/b", "/d", "/e"]);
}

#[test]
fn connections_allowed_through_an_ancestor_never_go_direct() {
    if !privileged() {
        return;
    }
    let host = pypi_host();
    let sandbox = Sandbox::new("ancestor", &policy(&["/usr/bin/bash"]), host.dns.addr()).unwrap();
    let python = python3().display().to_string();
    let script = format!(
        "import ssl, urllib.request\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         for p in ('x', 'y', 'z'):\n    urllib.request.urlopen('https://pypi.org/' + p, context=ctx, timeout=10).read()\n",
        ca = host.ca().display().to_string()
    );
    let mut cmd = sandbox.command("/usr/bin/bash");
    cmd.arg("-c")
        .arg(format!("{python} -c \"$SCRIPT\"; true"))
        .env("SCRIPT", &script);
    let out = sandbox.run(cmd).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(host.requests(), ["/x", "/y", "/z"]);
    // python3 is allowed only as bash's child; another parent must be asked about again.
    assert_eq!(direct(&sandbox), 0);
    // And python3 alone, with no listed ancestor, is denied.
    let mut alone = sandbox.command(&python);
    alone.arg("-c").arg(&script);
    let out = sandbox.run(alone).unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(host.requests(), ["/x", "/y", "/z"]);
}

#[test]
fn a_policy_change_aborts_open_direct_connections_and_voids_verdicts() {
    if !privileged() {
        return;
    }
    let host = pypi_host();
    let python = python3().display().to_string();
    let sandbox = Sandbox::new("revoke", &policy(&[&python]), host.dns.addr()).unwrap();
    // Prints `connected` once connected, then how the connection ended.
    let connect = "import socket, sys\n\
                   try:\n    \
                   s = socket.create_connection((sys.argv[1], 443), timeout=30)\n    \
                   print('connected', flush=True)\n    \
                   print('eof' if s.recv(1) == b'' else 'data', flush=True)\n\
                   except OSError as e:\n    print(type(e).__name__, flush=True)\n";
    let spawn = |target: &str| {
        let mut cmd = sandbox.command(&python);
        cmd.arg("-c")
            .arg(connect)
            .arg(target)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        (child, rx)
    };
    let timeout = Duration::from_secs(20);
    // The first connection goes through the proxy (and teaches it); the second goes direct.
    let (mut first, first_out) = spawn("pypi.org");
    assert_eq!(first_out.recv_timeout(timeout).unwrap(), "connected");
    // The client's connect completes at the proxy's listener; the verdict follows the decision.
    sandbox.wait_for_verdicts(1).unwrap();
    let (mut second, second_out) = spawn("pypi.org");
    assert_eq!(second_out.recv_timeout(timeout).unwrap(), "connected");
    assert_eq!(direct(&sandbox), 1);
    let revised = "version: 1
network_policies:
  other:
    name: other
    endpoints:
      - host: files.pythonhosted.org
        port: 443
    binaries:
      - { path: /usr/bin/curl }
";
    sandbox.sandbox.set_generation(
        openshell::proxy::Generation::from_text("policy.yaml", revised, 2).unwrap(),
    );
    // Both are closed: the relayed one by the proxy, the direct one from outside its owner.
    let first_end = first_out.recv_timeout(timeout).unwrap();
    let second_end = second_out.recv_timeout(timeout).unwrap();
    assert_eq!(first_end, "ConnectionResetError");
    // Aborted from outside (SOCK_DESTROY): its owner sees ECONNABORTED, its peer a reset.
    assert_eq!(second_end, "ConnectionAbortedError");
    let closed: Vec<_> = (0..100)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            sandbox
                .log
                .records()
                .into_iter()
                .filter(|r| r.revision == Some(2) && r.decision == "deny")
                .count()
        })
        .find(|n| *n >= 2)
        .into_iter()
        .collect();
    assert_eq!(closed, [2], "{:#?}", sandbox.log.records());
    // The verdict (for the address) is void: the next connect to it goes to the proxy, which
    // judges it under the new policy (by the name the sandbox resolved) and denies it.
    let (mut third, third_out) = spawn(&host.ip().to_string());
    // The proxy's reset can beat the client's return from connect(): then connect fails.
    let mut third_end = third_out.recv_timeout(timeout).unwrap();
    if third_end == "connected" {
        third_end = third_out.recv_timeout(timeout).unwrap();
    }
    assert_eq!(third_end, "ConnectionResetError");
    sandbox
        .wait_for_record(|r| {
            r.revision == Some(2)
                && r.decision == "deny"
                && !r.reason.starts_with("open connection closed")
        })
        .unwrap();
    assert_eq!(direct(&sandbox), 1);
    for c in [&mut first, &mut second, &mut third] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn a_new_name_for_an_address_voids_the_sandboxs_verdicts() {
    if !privileged() {
        return;
    }
    let host = pypi_host();
    let sandbox = Sandbox::new("names", &policy(&["/usr/bin/curl"]), host.dns.addr()).unwrap();
    let resolve = |name: &str| {
        let mut cmd = sandbox.command("getent");
        cmd.args(["ahostsv4", name]);
        sandbox.run(cmd).unwrap()
    };
    let start = sandbox.sandbox.direct_epoch();
    assert_ne!(start, 0);
    assert!(resolve("pypi.org").status.success());
    let after_new = sandbox.sandbox.direct_epoch();
    assert!(after_new > start);
    // The same answer again changes nothing a decision depends on.
    assert!(resolve("pypi.org").status.success());
    assert_eq!(sandbox.sandbox.direct_epoch(), after_new);
}

#[test]
fn an_address_with_two_names_goes_through_the_proxy_each_time() {
    if !privileged() {
        return;
    }
    let host = TestHost::new(&["pypi.org", "files.pythonhosted.org"]).unwrap();
    host.dns.add("pypi.org", host.ip());
    host.dns.add("files.pythonhosted.org", host.ip());
    let two_blocks = "version: 1
network_policies:
  pypi:
    endpoints:
      - { host: pypi.org, port: 443 }
    binaries:
      - { path: /usr/bin/curl }
  files:
    endpoints:
      - { host: files.pythonhosted.org, port: 443 }
    binaries:
      - { path: /usr/bin/curl }
";
    let sandbox = Sandbox::new("two-names", two_blocks, host.dns.addr()).unwrap();
    let curl = Path::new("/usr/bin/curl");
    teach(&sandbox, &host, curl);
    // The same address now also stands for files.pythonhosted.org.
    let mut cmd = sandbox.command("/usr/bin/curl");
    cmd.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(host.ca())
        .arg("https://files.pythonhosted.org/c");
    assert!(succeeded(&sandbox.run(cmd).unwrap()));
    assert!(succeeded(&fetch(&sandbox, &host, curl, "d")));
    assert!(succeeded(&fetch(&sandbox, &host, curl, "e")));
    assert_eq!(direct(&sandbox), 1);
    assert_eq!(host.requests(), ["/a", "/b", "/c", "/d", "/e"]);
}

#[test]
fn verdicts_stop_counting_soon_after_the_gateway_stops() {
    if !privileged() {
        return;
    }
    let host = pypi_host();
    let mut sandbox =
        Sandbox::new("stopped", &policy(&["/usr/bin/curl"]), host.dns.addr()).unwrap();
    let curl = Path::new("/usr/bin/curl");
    teach(&sandbox, &host, curl);
    sandbox.stop_proxy();
    // The verdict is still in the kernel, but nobody renews the gateway's deadline.
    std::thread::sleep(openshell::proxy::direct::KEEP_ALIVE_FOR + Duration::from_millis(500));
    // Resolve by address: the policy DNS stopped with the proxy.
    let mut cmd = sandbox.command("/usr/bin/curl");
    cmd.args(["-sS", "--max-time", "5", "--cacert"])
        .arg(host.ca())
        .arg("--resolve")
        .arg(format!("pypi.org:443:{}", host.ip()))
        .arg("https://pypi.org/c");
    let out = sandbox.run(cmd).unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(direct(&sandbox), 1);
    assert_eq!(host.requests(), ["/a", "/b"]);
}

#[test]
fn ipv6_connections_go_direct_too() {
    if !privileged() {
        return;
    }
    use std::io::{BufRead as _, Write as _};
    let host = pypi_host();
    let v6 = host.net.ns_v6();
    let listener = host
        .net
        .run(move || std::net::TcpListener::bind((v6, 7443)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(3).flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut line).is_ok() {
                let _ = (&stream).write_all(line.as_bytes());
            }
        }
    });
    // Cargo hard-links its binaries (two names): a copy has one.
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let probe = dir.path().join("probe");
    std::fs::copy(env!("CARGO_BIN_EXE_ebpf-probe"), &probe).unwrap();
    let v6_policy = format!(
        "version: 1
network_policies:
  v6:
    endpoints:
      - {{ host: \"{v6}\", port: 7443 }}
    binaries:
      - {{ path: {} }}
",
        probe.display()
    );
    let sandbox = Sandbox::new("ipv6", &v6_policy, host.dns.addr()).unwrap();
    for _ in 0..3 {
        let mut cmd = sandbox.command(&probe);
        cmd.args(["tcp-echo", &format!("[{v6}]:7443")]);
        let out = sandbox.run(cmd).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("reply=ping"), "{out:?}");
        sandbox.wait_for_verdicts(1).unwrap();
    }
    assert_eq!(direct(&sandbox), 2);
}

/// A bind mount of `source` on `target`, undone on drop (even when the test fails).
struct BindMount(std::path::PathBuf);

impl BindMount {
    fn new(source: &Path, target: &Path) -> Self {
        let out = std::process::Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount --bind: {out:?}");
        Self(target.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.0)
            .output();
    }
}

#[test]
fn the_same_file_through_a_bind_mount_is_another_binary() {
    if !privileged() {
        return;
    }
    let ToolSandbox {
        host,
        dir,
        tool,
        sandbox,
    } = ToolSandbox::new("bind");
    // One file, one hard link, two paths (as the sandbox's /sandbox shows its work directory).
    let elsewhere = tempfile::tempdir_in("/tmp").unwrap();
    let _mount = BindMount::new(dir.path(), elsewhere.path());
    let aliased = elsewhere.path().join("tool");
    teach(&sandbox, &host, &tool);
    assert_denied(&sandbox, &host, &aliased, "not listed");
    assert_eq!(direct(&sandbox), 1);
    assert_eq!(host.requests(), ["/a", "/b"]);
}

#[test]
fn a_restarted_gateway_drops_the_verdicts_of_the_one_before() {
    if !privileged() {
        return;
    }
    let host = pypi_host();
    let sandbox = Sandbox::new("restart", &policy(&["/usr/bin/curl"]), host.dns.addr()).unwrap();
    let curl = Path::new("/usr/bin/curl");
    teach(&sandbox, &host, curl);
    assert_eq!(sandbox.verdicts().unwrap(), 1);
    sandbox.load_interceptor_again().unwrap();
    assert_eq!(sandbox.verdicts().unwrap(), 0);
    // The new load also stopped the deadline; once the running proxy has pushed it again,
    // only the dropped verdict keeps the next connection from going direct: it is judged
    // again (and teaches the kernel again).
    std::thread::sleep(openshell::proxy::direct::KEEP_ALIVE_EVERY * 2);
    assert!(succeeded(&fetch(&sandbox, &host, curl, "c")));
    assert_eq!(direct(&sandbox), 1);
    sandbox.wait_for_verdicts(1).unwrap();
    assert!(succeeded(&fetch(&sandbox, &host, curl, "d")));
    assert_eq!(direct(&sandbox), 2);
    assert_eq!(host.requests(), ["/a", "/b", "/c", "/d"]);
}
