//! Issue 7, the global policy override and the operator's views, through the real gateway,
//! proxy, eBPF programs and a DNS + HTTPS test host: `policy set --global` puts one network
//! policy in force in every sandbox (existing and new, also across a gateway restart) and
//! refuses sandbox-level updates with a message saying why; `policy delete --global` gives each
//! sandbox its own policy back. On the way: `settings get`, `logs` in text, JSON and OCSF with
//! gateway events, and `logs --tail` following live and ending cleanly on SIGINT and when the
//! gateway goes away.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod proxy_support;

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use openshell_tests::gateway::{Run, TestGateway};
use proxy_support::{TestHost, privileged};

/// Own policy of every sandbox here: curl may reach pypi.org.
const OWN: &str = "version: 1
filesystem_policy:
  read_only: [/usr, /lib, /etc]
  read_write: [/sandbox, /tmp]
network_policies:
  pypi:
    endpoints:
      - host: pypi.org
        port: 443
    binaries:
      - { path: /usr/bin/curl }
";

/// The global policy: curl may reach files.pythonhosted.org, and nothing else.
const GLOBAL: &str = "version: 1
network_policies:
  files:
    endpoints:
      - host: files.pythonhosted.org
        port: 443
    binaries:
      - { path: /usr/bin/curl }
";

fn gateway_for(host: &TestHost) -> TestGateway {
    TestGateway::with_dns(host.dns.addr()).unwrap()
}

fn curl(gw: &TestGateway, sandbox: &str, url: &str) -> Run {
    gw.curl(sandbox, url).unwrap()
}

/// Asserts which of the two hosts `sandbox` may reach, and that the upstream saw exactly the
/// allowed request.
fn reaches(gw: &TestGateway, host: &TestHost, sandbox: &str, pypi: bool, files: bool, tag: &str) {
    for (name, allowed) in [("pypi.org", pypi), ("files.pythonhosted.org", files)] {
        let path = format!("/{tag}-{sandbox}-{name}");
        let run = curl(gw, sandbox, &format!("https://{name}{path}"));
        assert_eq!(run.code == Some(0), allowed, "{sandbox} -> {name}: {run:?}");
        assert_eq!(
            host.requests().contains(&path),
            allowed,
            "{sandbox} -> {name}: upstream saw {:?}",
            host.requests()
        );
    }
}

fn write(gw: &TestGateway, name: &str, text: &str) -> String {
    let path = gw.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// `settings get NAME` text with the volatile values (hash, paths, ports) masked.
fn masked_settings(gw: &TestGateway, name: &str, host: &TestHost) -> String {
    let run = gw.run(&["settings", "get", name]).unwrap().ok().unwrap();
    let state = gw.state_dir().display().to_string();
    let cgroup = gw.cgroup_base_dir().unwrap().display().to_string();
    run.stdout
        .lines()
        .map(|line| {
            let line = line
                .replace(&state, "[state]")
                .replace(&cgroup, "[cgroup]")
                .replace(&host.dns.addr().to_string(), "[dns]");
            if let Some((head, _)) = line.split_once("sha256:") {
                format!("{head}sha256:[hash]")
            } else if line.starts_with("  listening") {
                "  listening       [addresses]".to_owned()
            } else if line.starts_with("  seccomp") {
                "  seccomp         [seccomp]".to_owned()
            } else if let Some((head, _)) = line.split_once("; uid ") {
                format!("{head}; uid [uid], gid [gid]")
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `logs` text lines with the times, pids, test directory and test host address masked.
fn masked_logs(run: &Run, gw: &TestGateway, host: &TestHost) -> String {
    let dir = gw.state_dir().display().to_string();
    run.stdout
        .lines()
        .map(|line| {
            let (_time, rest) = line.split_once(' ').unwrap();
            let rest = rest.replace(&host.ip().to_string(), "[ip]");
            let rest = match rest.split_once(" pid=") {
                Some((head, tail)) if tail.starts_with(|c: char| c.is_ascii_digit()) => {
                    let (_, after) = tail.split_once(' ').unwrap();
                    format!("{head} pid=[pid] {after}")
                }
                _ => rest,
            };
            let rest = rest.replace(&dir, "[dir]");
            let rest = match rest.split_once("(pid ") {
                Some((head, tail)) => {
                    let (_, after) = tail.split_once(',').unwrap();
                    format!("{head}(pid [gateway],{after}")
                }
                None => rest,
            };
            format!("[time] {rest}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `openshell ARGS` on a pseudo-terminal (util-linux `script`), answering `answer` to what it
/// asks.
fn on_a_terminal(gw: &TestGateway, args: &str, answer: &[u8]) -> Run {
    let mut cmd = std::process::Command::new("script");
    cmd.env("OPENSHELL_STATE_DIR", gw.state_dir())
        .env("OPENSHELL_GATEWAY_CONFIG", &gw.config)
        .env_remove("OPENSHELL_FAILPOINT")
        .args([
            "-qec",
            &format!("{} {args}", openshell_tests::openshell_bin().display()),
            "/dev/null",
        ]);
    openshell_tests::gateway::run_with_timeout(cmd, answer, Duration::from_secs(60)).unwrap()
}

/// A `logs --tail` process whose stdout lines arrive on a channel.
struct Tail {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Tail {
    fn start(gw: &TestGateway, args: &[&str]) -> Self {
        let mut cmd = gw.command();
        cmd.arg("logs")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
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
        Self { child, lines }
    }

    /// Waits (bounded) for a line matching `pred`.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!("logs --tail never printed {what}; it printed {seen:#?}"),
            }
        }
    }

    /// Waits (bounded) for the process to exit; its code and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "logs --tail did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut stderr).unwrap();
        (status.code(), stderr)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn global_policy_overrides_every_sandbox_and_gives_way() {
    if !privileged() {
        return;
    }
    let host = TestHost::new(&["pypi.org", "files.pythonhosted.org"]).unwrap();
    host.dns.add("pypi.org", host.ip());
    host.dns.add("files.pythonhosted.org", host.ip());
    let gw = gateway_for(&host);
    let own = write(&gw, "own.yaml", OWN);
    let global = write(&gw, "global.yaml", GLOBAL);

    // Sandbox a on its own policy: pypi yes, files no.
    gw.run(&[
        "sandbox", "create", "--name", "a", "--policy", &own, "--", "true",
    ])
    .unwrap()
    .ok()
    .unwrap();
    reaches(&gw, &host, "a", true, false, "own");
    insta::assert_snapshot!(masked_settings(&gw, "a", &host), @r"
        sandbox:          a
        policy:           sandbox revision 1 (loaded), sha256:[hash]
        static:           landlock.compatibility best_effort, run as sandbox:sandbox
          landlock        fully enforced (ABI 7); scoped: abstract_unix_socket signal
          seccomp         [seccomp]
          no_new_privs    yes; uid [uid], gid [gid]
        gateway:
          state dir       [state]
          socket          [state]/run/gateway.sock (root only)
          cgroup base     [cgroup]
          dns upstream    [dns] (from config)
          dns listen      127.0.0.1:0
          proxy listen    127.0.0.1:0
          listening       [addresses]
          relay           copy
          extra roots     -
    ");

    // Without a terminal and without --yes, nothing happens.
    let run = gw
        .run(&["policy", "set", "--global", "--policy", &global])
        .unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");
    insta::assert_snapshot!(run.stderr, @r"
        error: refusing to set the global policy without confirmation (stdin is not a terminal): it replaces the network policy of every sandbox; pass --yes to confirm
        the global policy is unchanged
    ");
    // On a terminal it asks; anything but yes changes nothing.
    let run = on_a_terminal(
        &gw,
        &format!("policy set --global --policy {global}"),
        b"n\n",
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stdout.contains(&format!(
            "The global policy from {global} replaces the network policy of all 1 sandbox(es), and of every new one, until `openshell policy delete --global`. Continue? [y/N]"
        )),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("the global policy is unchanged"),
        "{run:?}"
    );
    let list = gw
        .run(&["policy", "list", "--global"])
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(list.stdout.lines().count(), 1, "only the header: {list:?}");

    // A global policy carries only network_policies; errors have line numbers.
    let statics = write(&gw, "statics.yaml", OWN);
    let run = gw
        .run(&["policy", "set", "--global", "--yes", "--policy", &statics])
        .unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");
    insta::assert_snapshot!(run.stderr.replace(&statics, "statics.yaml"), @r"
        statics.yaml:2:1: error: `filesystem_policy` is a static section, and a global policy carries only `network_policies`; static sections are fixed per sandbox when it is created: remove `filesystem_policy` from the global policy file (at filesystem_policy)
        the global policy is unchanged
    ");

    // Set it: every sandbox switches at once.
    let run = gw
        .run(&[
            "policy", "set", "--global", "--yes", "--policy", &global, "--wait",
        ])
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains("global: policy version 1 loaded"),
        "{run:?}"
    );
    reaches(&gw, &host, "a", false, true, "global");

    // A sandbox created while it is in force starts with it.
    gw.run(&[
        "sandbox", "create", "--name", "b", "--policy", &own, "--", "true",
    ])
    .unwrap()
    .ok()
    .unwrap();
    reaches(&gw, &host, "b", false, true, "new");

    // Sandbox-level updates are refused, saying why and what to do.
    let run = gw
        .run(&["policy", "set", "a", "--policy", &own, "--wait"])
        .unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");
    insta::assert_snapshot!(run.stderr, @r#"error: sandbox "a": a global policy (version 1) is in force and replaces the network policy of every sandbox, so sandbox-level `policy set` is refused; remove it with `openshell policy delete --global` (each sandbox then returns to its own latest loaded policy) and set this one again"#);

    // An invalid global file: line-numbered errors, exit 1, the old global policy stays.
    let bad = write(&gw, "bad.yaml", &GLOBAL.replace("port: 443", "port: 99999"));
    let run = gw
        .run(&[
            "policy", "set", "--global", "--yes", "--policy", &bad, "--wait",
        ])
        .unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.starts_with(&format!("{bad}:6:")), "{run:?}");
    assert!(run.stderr.contains(": error: "), "{run:?}");
    assert!(
        run.stderr.contains("the global policy is unchanged"),
        "{run:?}"
    );
    reaches(&gw, &host, "a", false, true, "after-invalid");

    // The same policy again, confirmed on a terminal: unchanged, no new revision.
    let run = on_a_terminal(
        &gw,
        &format!("policy set --global --policy {global}"),
        b"y\n",
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains("global: policy unchanged (version 1"),
        "{run:?}"
    );

    insta::assert_snapshot!(masked_settings(&gw, "a", &host), @r"
        sandbox:          a
        policy:           global revision 1 (loaded), sha256:[hash]
          own revision    1, in force again after `openshell policy delete --global`
        static:           landlock.compatibility best_effort, run as sandbox:sandbox
          landlock        fully enforced (ABI 7); scoped: abstract_unix_socket signal
          seccomp         [seccomp]
          no_new_privs    yes; uid [uid], gid [gid]
        gateway:
          state dir       [state]
          socket          [state]/run/gateway.sock (root only)
          cgroup base     [cgroup]
          dns upstream    [dns] (from config)
          dns listen      127.0.0.1:0
          proxy listen    127.0.0.1:0
          listening       [addresses]
          relay           copy
          extra roots     -
    ");
    let json = gw
        .run(&["settings", "get", "b", "-o", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(json["policy"]["source"], "global");
    assert_eq!(json["policy"]["revision"], 1);
    assert_eq!(json["policy"]["sandbox_revision"], 1);
    assert_eq!(json["static_enforcement"]["launch"]["landlock_abi"], 7);
    assert_eq!(
        json["static_enforcement"]["launch"]["seccomp_enabled"],
        true
    );

    // A restarted gateway restores the global policy before anything connects.
    gw.run(&["gateway", "stop"]).unwrap().ok().unwrap();
    reaches(&gw, &host, "a", false, true, "restart");
    reaches(&gw, &host, "b", false, true, "restart");

    // The gateway events: loaded, refused updates leave no trace, the restart.
    let events = gw
        .run(&["logs", "a", "--source", "gateway"])
        .unwrap()
        .ok()
        .unwrap();
    insta::assert_snapshot!(masked_logs(&events, &gw, &host), @r#"
        [time] EVENT gateway_started sandbox=- rev=- message="gateway started (pid [gateway], version 0.1.0)"
        [time] EVENT sandbox_created sandbox=a rev=- message="sandbox created (policy from [dir]/own.yaml)"
        [time] EVENT global_policy_loaded sandbox=- rev=1 message="global policy revision 1 loaded into 1 sandbox(es)"
        [time] EVENT gateway_started sandbox=- rev=- message="gateway started (pid [gateway], version 0.1.0)"
    "#);

    // Delete it: each sandbox is back on its own policy (b's was never loaded before).
    let run = gw
        .run(&["policy", "delete", "--global"])
        .unwrap()
        .ok()
        .unwrap();
    insta::assert_snapshot!(run.stdout, @r"
        global: policy version 1 deleted
        sandbox a: back on its own policy version 1
        sandbox b: back on its own policy version 1
    ");
    reaches(&gw, &host, "a", true, false, "deleted");
    reaches(&gw, &host, "b", true, false, "deleted");
    let json = gw
        .run(&["settings", "get", "a", "-o", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(json["policy"]["source"], "sandbox");
    assert_eq!(json["policy"]["revision"], 1);
    let run = gw
        .run(&["policy", "delete", "--global"])
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(
        run.stdout,
        "no global policy is in force; nothing changed\n"
    );
    let list = gw
        .run(&["policy", "list", "--global"])
        .unwrap()
        .ok()
        .unwrap();
    assert!(list.stdout.contains(" superseded "), "{list:?}");
    let run = gw.run(&["policy", "get", "--global"]).unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");

    // Sandbox-level updates work again.
    let both = write(
        &gw,
        "both.yaml",
        &format!(
            "{OWN}{}",
            GLOBAL.split_once("network_policies:\n").unwrap().1
        ),
    );
    let run = gw
        .run(&["policy", "set", "a", "--policy", &both, "--wait"])
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    reaches(&gw, &host, "a", true, true, "own-again");
    // The seed's denial: python3 is not a listed binary for pypi.
    let run = gw
        .run(&[
            "sandbox",
            "exec",
            "a",
            "--",
            "python3",
            "-c",
            "import socket; socket.create_connection(('pypi.org', 443), 10).recv(1)",
        ])
        .unwrap();
    assert_ne!(run.code, Some(0), "{run:?}");
    // Decisions reach the log a moment after the connection: wait (bounded) for this one.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let newest = gw
            .run(&["logs", "a", "-n", "1", "-o", "json"])
            .unwrap()
            .json()
            .unwrap();
        if newest["decision"] == "deny" && newest["port"] == 443 {
            break;
        }
        assert!(Instant::now() < deadline, "python3's denial never logged");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The decision log in its three shapes.
    let text = gw.run(&["logs", "a", "-n", "3"]).unwrap().ok().unwrap();
    insta::assert_snapshot!(masked_logs(&text, &gw, &host), @r#"
        [time] ALLOW /usr/bin/curl -> pypi.org:443 ([ip]) block=pypi rev=2 pid=[pid] reason="endpoint and binary allowed by block pypi"
        [time] ALLOW /usr/bin/curl -> files.pythonhosted.org:443 ([ip]) block=files rev=2 pid=[pid] reason="endpoint and binary allowed by block files"
        [time] DENY  /usr/bin/python3.11 -> pypi.org:443 ([ip]) block=pypi rev=2 pid=[pid] reason="endpoint matches in block pypi but binary /usr/bin/python3.11 is not listed (no ancestors)"
    "#);
    let ocsf = gw
        .run(&["logs", "a", "-o", "ocsf", "-n", "1000"])
        .unwrap()
        .ok()
        .unwrap();
    let events: Vec<serde_json::Value> = ocsf
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let refused = events
        .iter()
        .find(|e| {
            e["activity_id"] == 5
                && e["dst_endpoint"]["hostname"] == "pypi.org"
                && e["dst_endpoint"]["port"] == 443
        })
        .unwrap_or_else(|| panic!("no refused pypi connection in {events:#?}"));
    let python = refused["actor"]["process"]["file"]["path"]
        .as_str()
        .unwrap();
    assert!(python.starts_with("/usr/bin/python3"), "{refused:#}");
    assert_eq!(refused["class_uid"], 4001);
    assert_eq!(refused["type_uid"], 400_105);
    assert_eq!(refused["disposition_id"], 2);
    assert_eq!(refused["dst_endpoint"]["port"], 443);
    assert_eq!(refused["dst_endpoint"]["ip"], host.ip().to_string());
    assert_eq!(refused["src_endpoint"]["name"], "a");
    assert!(refused["actor"]["process"]["pid"].as_i64().unwrap() > 0);
    assert_eq!(refused["metadata"]["product"]["name"], "openshell");
    let opened = events
        .iter()
        .find(|e| e["activity_id"] == 1 && e["firewall_rule"]["name"] == "files")
        .unwrap_or_else(|| panic!("no allowed files connection in {events:#?}"));
    assert_eq!(opened["status_id"], 1);
    let all = gw
        .run(&["logs", "a", "--source", "all", "-o", "json", "-n", "1000"])
        .unwrap()
        .ok()
        .unwrap();
    let lines: Vec<serde_json::Value> = all
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|l| l["event"] == "global_policy_deleted"));
    assert!(lines.iter().any(|l| l["decision"] == "deny"));
    let times: Vec<&str> = lines.iter().map(|l| l["time"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let run = gw
        .run(&["logs", "a", "--source", "all", "-o", "ocsf"])
        .unwrap();
    assert_eq!(run.code, Some(2), "{run:?}");
    // --since: every decision of this test is within the last day; a bad duration is a usage
    // error.
    let recent = gw
        .run(&["logs", "a", "--since", "1d", "-n", "1000"])
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(recent.stdout.lines().count(), events.len());
    let run = gw.run(&["logs", "a", "--since", "5 minutes"]).unwrap();
    assert_eq!(run.code, Some(2), "{run:?}");
}

#[test]
fn logs_tail_follows_until_sigint_or_the_gateway_goes_away() {
    if !privileged() {
        return;
    }
    let host = TestHost::new(&["pypi.org"]).unwrap();
    host.dns.add("pypi.org", host.ip());
    let gw = gateway_for(&host);
    let own = write(&gw, "own.yaml", OWN);
    gw.run(&[
        "sandbox", "create", "--name", "t", "--policy", &own, "--", "true",
    ])
    .unwrap()
    .ok()
    .unwrap();

    // Followed from now: a new allowed connection shows up, then Ctrl-C ends it with 0.
    let tail = Tail::start(&gw, &["t", "--tail", "-n", "0", "--source", "all"]);
    assert_eq!(curl(&gw, "t", "https://pypi.org/followed").code, Some(0));
    let line = tail.wait_for("the allowed connection", |l| {
        l.contains("ALLOW /usr/bin/curl -> pypi.org:443")
    });
    assert!(line.contains("block=pypi"), "{line}");
    let set = write(&gw, "set.yaml", &OWN.replace("pypi:\n", "pypi2:\n"));
    gw.run(&["policy", "set", "t", "--policy", &set, "--wait"])
        .unwrap()
        .ok()
        .unwrap();
    tail.wait_for("the revision event", |l| {
        l.contains("EVENT policy_loaded sandbox=t rev=2")
    });
    tail.signal(nix::sys::signal::Signal::SIGINT);
    let (code, stderr) = tail.finish();
    assert_eq!(code, Some(0), "{stderr}");

    // The followed sandbox is deleted: the follower says so and exits 1.
    gw.run(&[
        "sandbox", "create", "--name", "gone", "--policy", &own, "--", "true",
    ])
    .unwrap()
    .ok()
    .unwrap();
    let tail = Tail::start(&gw, &["gone", "--tail", "--source", "gateway"]);
    tail.wait_for("the creation event", |l| {
        l.contains("EVENT sandbox_created sandbox=gone")
    });
    gw.run(&["sandbox", "delete", "gone"])
        .unwrap()
        .ok()
        .unwrap();
    let (code, stderr) = tail.finish();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("no sandbox named \"gone\"") && stderr.contains("stopped following"),
        "{stderr}"
    );

    // Following JSON: the gateway goes away, the follower says so and exits 1.
    let tail = Tail::start(&gw, &["t", "--tail", "-o", "json"]);
    tail.wait_for("the earlier decision", |l| l.contains("\"/usr/bin/curl\""));
    gw.run(&["gateway", "stop"]).unwrap().ok().unwrap();
    let (code, stderr) = tail.finish();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("the gateway went away"), "{stderr}");
}
