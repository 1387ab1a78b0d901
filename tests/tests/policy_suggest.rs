//! `openshell policy suggest` and `openshell term` through the real gateway, proxy, eBPF
//! programs and a DNS + HTTPS test host: two connections are denied (a binary missing from a
//! block, an endpoint no block has), `policy suggest` prints the blocks that would allow them,
//! the operator pastes them into the pulled policy, `policy set --wait` loads it, and the same
//! commands then succeed; an inspected request no rule allows gets a rule for its method and
//! path. `term` runs on a real pty (screen, keys, the terminal restored) and refuses to start
//! without a gateway or without a terminal.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod proxy_support;

use std::{
    os::fd::{AsFd as _, OwnedFd},
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    pty::{Winsize, openpty},
    sys::{
        signal::{Signal, kill},
        termios::{LocalFlags, tcgetattr},
    },
    unistd::Pid,
};

use openshell_tests::{
    dns::TestDns,
    gateway::{Run, TestGateway},
    netns::TestNet,
    upstream::{TestCa, Upstream},
};
use proxy_support::{TestHost, privileged};

fn gateway_for(host: &TestHost) -> TestGateway {
    TestGateway::with_dns(host.dns.addr()).unwrap()
}

/// pypi.org is reachable for pip only; files.pythonhosted.org only on port 80 (so its name
/// resolves, but a connection to 443 matches no endpoint).
const INITIAL: &str = "version: 1
filesystem_policy:
  read_only: [/usr, /lib, /etc]
  read_write: [/sandbox, /tmp]
network_policies:
  pip:
    name: pip
    endpoints:
      - host: pypi.org
        port: 443
    binaries:
      - { path: /usr/bin/pip }
  files_plain:
    name: files_plain
    endpoints:
      - host: files.pythonhosted.org
        port: 80
    binaries:
      - { path: /usr/bin/curl }
";

/// The `pip` block as INITIAL writes it (the suggestion replaces it).
const PIP_BLOCK: &str = "  pip:
    name: pip
    endpoints:
      - host: pypi.org
        port: 443
    binaries:
      - { path: /usr/bin/pip }
";

fn curl(gw: &TestGateway, url: &str) -> Run {
    gw.curl("sugg", url).unwrap()
}

/// Polls `logs -o json` of sandbox `sugg` (bounded) until `count` decisions match `pred`.
fn wait_for_denials(gw: &TestGateway, count: usize, pred: impl Fn(&serde_json::Value) -> bool) {
    wait_for_denials_of(gw, "sugg", count, pred);
}

/// Polls `logs -o json` of sandbox `name` (bounded) until `count` decisions match `pred`.
fn wait_for_denials_of(
    gw: &TestGateway,
    name: &str,
    count: usize,
    pred: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = gw.run(&["logs", name, "-o", "json"]).unwrap().ok().unwrap();
        let found = run
            .stdout
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| pred(l))
            .count();
        if found >= count {
            return;
        }
        assert!(Instant::now() < deadline, "denials not logged: {run:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Bytes that switch to and from the alternate screen.
const ENTER_ALT: &str = "\x1b[?1049h";
const LEAVE_ALT: &str = "\x1b[?1049l";

/// What `openshell term` wrote to its terminal, its exit code, and whether the terminal was
/// back in canonical mode with echo once it exited.
struct TermRun {
    output: String,
    code: Option<i32>,
    restored: bool,
}

/// What the test does to `openshell term` once its screen is ready.
enum Input<'a> {
    /// Types these bytes.
    Keys(&'a [u8]),
    /// Sends this signal to the process, as `kill` or a closed terminal window does.
    Signal(Signal),
}

/// Runs `openshell term` on a fresh pty (120x30) playing the terminal emulator, waits until its
/// screen shows `ready`, gives it `input`, and waits (bounded) for it to exit.
fn term_on_a_pty(gw: &TestGateway, ready: &str, input: Input<'_>) -> TermRun {
    let size = Winsize {
        ws_row: 30,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).unwrap();
    let slave: OwnedFd = pty.slave;
    let mut cmd = gw.command();
    cmd.arg("term")
        .env("TERM", "xterm-256color")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut output = Vec::new();
    let mut typed = false;
    let mut answered = 0;
    let status = loop {
        assert!(
            Instant::now() < deadline,
            "term did not finish; it wrote:\n{}",
            String::from_utf8_lossy(&output)
        );
        let mut fds = [PollFd::new(pty.master.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(100u16)).unwrap() > 0 {
            let mut buf = [0u8; 65536];
            if let Ok(n) = nix::unistd::read(&pty.master, &mut buf) {
                output.extend_from_slice(&buf[..n]);
            }
        }
        // Answer cursor position queries as a terminal emulator does.
        let queries = String::from_utf8_lossy(&output).matches("\x1b[6n").count();
        while answered < queries {
            nix::unistd::write(&pty.master, b"\x1b[1;1R").unwrap();
            answered += 1;
        }
        if !typed && String::from_utf8_lossy(&output).contains(ready) {
            match &input {
                Input::Keys(keys) => {
                    nix::unistd::write(&pty.master, keys).unwrap();
                }
                Input::Signal(signal) => {
                    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
                    kill(pid, *signal).unwrap();
                }
            }
            typed = true;
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
    };
    // What was still buffered.
    let mut fds = [PollFd::new(pty.master.as_fd(), PollFlags::POLLIN)];
    while poll(&mut fds, PollTimeout::from(100u16)).unwrap() > 0 {
        let mut buf = [0u8; 65536];
        match nix::unistd::read(&pty.master, &mut buf) {
            Ok(n) if n > 0 => output.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let flags = tcgetattr(slave.as_fd()).unwrap().local_flags;
    TermRun {
        output: String::from_utf8_lossy(&output).into_owned(),
        code: status.code(),
        restored: typed && flags.contains(LocalFlags::ICANON | LocalFlags::ECHO),
    }
}

/// The suggested block of `key` (from its `  key:` line to the next comment or block).
fn block_of(output: &str, key: &str) -> String {
    let start = output
        .find(&format!("\n  {key}:\n"))
        .unwrap_or_else(|| panic!("no block {key} in\n{output}"))
        + 1;
    let rest = &output[start..];
    let end = rest[1..]
        .find("\n  #")
        .or_else(|| rest[1..].find("\n#"))
        .map_or(rest.len(), |i| i + 2);
    rest[..end].to_owned()
}

#[test]
fn suggested_blocks_allow_what_was_denied() {
    if !privileged() {
        return;
    }
    let names = ["pypi.org", "files.pythonhosted.org"];
    let host = TestHost::new(&names).unwrap();
    for name in names {
        host.dns.add(name, host.ip());
    }
    let gw = gateway_for(&host);
    let dir = gw.dir.path().to_owned();
    let initial = dir.join("initial.yaml");
    std::fs::write(&initial, INITIAL).unwrap();

    // Two denials: curl is not listed in `pip`, and no block has files.pythonhosted.org:443.
    let run = gw
        .run(&[
            "sandbox",
            "create",
            "--name",
            "sugg",
            "--policy",
            initial.to_str().unwrap(),
            "--",
            "curl",
            "-sSk",
            "--max-time",
            "10",
            "https://pypi.org/denied",
        ])
        .unwrap();
    assert_ne!(run.code, Some(0), "pypi must be denied: {run:?}");
    let run = curl(&gw, "https://files.pythonhosted.org/denied");
    assert_ne!(run.code, Some(0), "files must be denied: {run:?}");
    assert!(host.requests().is_empty());
    wait_for_denials(&gw, 2, |l| l["decision"] == "deny" && l["port"] == 443);

    // The suggestion covers both.
    let suggested = gw
        .run(&["policy", "suggest", "sugg"])
        .unwrap()
        .ok()
        .unwrap();
    let (first, body) = suggested.stdout.split_once('\n').unwrap();
    assert!(
        first.starts_with("# openshell policy suggest sugg: 2 denied of the ")
            && first.ends_with(" decisions read, policy version 1"),
        "{first}"
    );
    insta::assert_snapshot!(body, @r#"
    # Paste the blocks under `network_policies:`; a block marked "replaces" takes the place of the block with the same key.
      # new block files_pythonhosted_org
      # covers 1 denial: /usr/bin/curl -> files.pythonhosted.org:443
      files_pythonhosted_org:
        name: files_pythonhosted_org
        endpoints:
          - host: files.pythonhosted.org
            port: 443
        binaries:
          - { path: /usr/bin/curl }
      # replaces block pip: adds binary /usr/bin/curl
      # covers 1 denial: /usr/bin/curl -> pypi.org:443
      pip:
        name: pip
        endpoints:
          - host: pypi.org
            port: 443
        binaries:
          - { path: /usr/bin/pip }
          - { path: /usr/bin/curl }
    "#);
    // `--since` keeps only recent decisions: none in the future.
    let none = gw
        .run(&["policy", "suggest", "sugg", "--since", "1ms"])
        .unwrap()
        .ok()
        .unwrap();
    assert!(none.stdout.contains("# no block to suggest"), "{none:?}");

    // The dashboard shows the sandbox and its denials; Enter quits and prints the selected
    // denial's block on the restored terminal.
    let run = term_on_a_pty(&gw, "files.pythonhosted.org:443", Input::Keys(b"\r"));
    assert_eq!(run.code, Some(0), "{}", run.output);
    assert!(run.restored, "{}", run.output);
    let (screen, after) = run
        .output
        .split_once(ENTER_ALT)
        .and_then(|(_, rest)| rest.split_once(LEAVE_ALT))
        .unwrap_or_else(|| panic!("no alternate screen: {:?}", run.output));
    // (ratatui moves the cursor over blanks, so only words are contiguous.)
    for shown in [
        "Sandboxes",
        "(1)",
        "sugg",
        "loaded",
        "pypi.org:443",
        "/usr/bin/curl",
    ] {
        assert!(screen.contains(shown), "{shown} not on {screen:?}");
    }
    let printed = after.replace("\r\n", "\n");
    assert!(
        printed.contains("  # new block files_pythonhosted_org\n")
            || printed.contains("  # replaces block pip: adds binary /usr/bin/curl\n"),
        "{printed:?}"
    );
    // q and Ctrl-C quit as well, printing nothing.
    for key in [b"q", b"\x03"] {
        let run = term_on_a_pty(&gw, "pypi.org:443", Input::Keys(key));
        assert_eq!(run.code, Some(0), "{}", run.output);
        assert!(run.restored, "{}", run.output);
        let after = run.output.rsplit_once(LEAVE_ALT).unwrap().1;
        assert!(!after.contains("block"), "{after:?}");
    }
    // SIGTERM and SIGHUP end it too, with the terminal restored and 128 + the signal's number.
    for (signal, code) in [(Signal::SIGTERM, 143), (Signal::SIGHUP, 129)] {
        let run = term_on_a_pty(&gw, "pypi.org:443", Input::Signal(signal));
        assert_eq!(run.code, Some(code), "{signal}: {}", run.output);
        assert!(run.restored, "{signal}: {}", run.output);
        assert!(run.output.contains(LEAVE_ALT), "{signal}: {}", run.output);
    }

    // Paste: the new block is appended, the amended one replaces `pip`.
    let got = gw
        .run(&["policy", "get", "sugg", "--full"])
        .unwrap()
        .ok()
        .unwrap();
    assert!(got.stdout.contains(PIP_BLOCK), "{got:?}");
    let edited = format!(
        "{}{}",
        got.stdout
            .replace(PIP_BLOCK, &block_of(&suggested.stdout, "pip")),
        block_of(&suggested.stdout, "files_pythonhosted_org")
    );
    let file = dir.join("p.yaml");
    std::fs::write(&file, &edited).unwrap();
    let set = gw
        .run(&[
            "policy",
            "set",
            "sugg",
            "--policy",
            file.to_str().unwrap(),
            "--wait",
        ])
        .unwrap();
    assert_eq!(set.code, Some(0), "{set:?}\n{edited}");

    // The same commands now succeed, and reach the upstream.
    let run = curl(&gw, "https://pypi.org/allowed");
    assert_eq!(run.code, Some(0), "{run:?}");
    let run = curl(&gw, "https://files.pythonhosted.org/allowed");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(host.requests(), ["/allowed", "/allowed"]);

    // Nothing left to suggest for the old denials: version 2 allows them.
    let again = gw
        .run(&["policy", "suggest", "sugg"])
        .unwrap()
        .ok()
        .unwrap();
    assert!(again.stdout.contains("# no block to suggest"), "{again:?}");
    assert!(
        again
            .stdout
            .contains("# 2 of the denials are allowed by policy version 2 already"),
        "{again:?}"
    );

    // `term` needs a terminal; with pipes it says so and exits 1.
    let term = gw.run(&["term"]).unwrap();
    assert_eq!(term.code, Some(1), "{term:?}");
    assert!(
        term.stderr
            .contains("openshell term needs a terminal on stdin and stdout"),
        "{term:?}"
    );
}

/// The seed's `github_repos` block for organisation `acme`, for curl as well.
fn github_policy() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/github_repos.yaml"),
    )
    .unwrap()
    .replace("<org_name>", "acme")
    .replace(
        "      - { path: /usr/bin/gh }\n",
        "      - { path: /usr/bin/gh }\n      - { path: /usr/bin/curl }\n",
    )
}

/// An inspected request no rule allows: the suggestion adds a rule for exactly its method and
/// path, and once loaded that request reaches the upstream while a neighbour stays denied.
#[test]
fn a_denied_request_gets_a_rule() {
    if !privileged() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _enter = runtime.enter();
    let net = TestNet::new().unwrap();
    let dns = TestDns::start_in(&net).unwrap();
    let ca = TestCa::new().unwrap();
    let upstream = Upstream::start(&net, &ca, &["api.github.com"]).unwrap();
    dns.add("api.github.com", net.ns_v4().into());
    let gw = TestGateway::with_dns_and_ca(dns.addr(), &ca.cert_pem).unwrap();
    let policy = gw.dir.path().join("github.yaml");
    std::fs::write(&policy, github_policy()).unwrap();
    let delete = |name: &str, path: &str| -> String {
        let url = format!("https://api.github.com/repos/acme/{path}");
        let args = [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "DELETE",
            &url,
        ];
        let run = if name.is_empty() {
            let mut all = vec![
                "sandbox",
                "create",
                "--name",
                "gh",
                "--policy",
                policy.to_str().unwrap(),
                "--",
            ];
            all.extend(args);
            gw.run(&all).unwrap()
        } else {
            let mut all = vec!["sandbox", "exec", name, "--"];
            all.extend(args);
            gw.run(&all).unwrap()
        };
        assert_eq!(run.code, Some(0), "{run:?}");
        run.stdout
    };
    assert_eq!(delete("", "bravo-repo/issues/7"), "403");
    wait_for_denials_of(&gw, "gh", 1, |l| {
        l["decision"] == "deny" && l["reason"].as_str().unwrap_or("").starts_with("DELETE ")
    });

    let suggested = gw.run(&["policy", "suggest", "gh"]).unwrap().ok().unwrap();
    let block = block_of(&suggested.stdout, "github_repos");
    assert!(
        suggested.stdout.contains(
            "  # replaces block github_repos: adds rule DELETE /repos/acme/bravo-repo/issues/7 to api.github.com:443\n"
        ),
        "{suggested:?}"
    );
    assert!(
        block.ends_with(
            "          - allow:\n              method: DELETE\n              path: \"/repos/acme/bravo-repo/issues/7\"\n    binaries:\n      - { path: /usr/local/bin/claude }\n      - { path: /usr/bin/gh }\n      - { path: /usr/bin/curl }\n"
        ),
        "{block}"
    );

    // `github_repos` is the policy's last block: the suggestion replaces it to the end.
    let got = gw
        .run(&["policy", "get", "gh", "--full"])
        .unwrap()
        .ok()
        .unwrap();
    let start = got.stdout.find("  github_repos:\n").unwrap();
    let file = gw.dir.path().join("p.yaml");
    std::fs::write(&file, format!("{}{block}", &got.stdout[..start])).unwrap();
    let set = gw
        .run(&[
            "policy",
            "set",
            "gh",
            "--policy",
            file.to_str().unwrap(),
            "--wait",
        ])
        .unwrap();
    assert_eq!(set.code, Some(0), "{set:?}");

    upstream.clear();
    assert_eq!(delete("gh", "bravo-repo/issues/7"), "200");
    assert_eq!(delete("gh", "bravo-repo/issues/8"), "403");
    let seen: Vec<(String, String)> = upstream
        .seen()
        .into_iter()
        .map(|s| (s.method, s.target))
        .collect();
    assert_eq!(
        seen,
        [(
            "DELETE".to_owned(),
            "/repos/acme/bravo-repo/issues/7".to_owned()
        )]
    );
}

#[test]
fn term_without_a_gateway_says_so() {
    let gw = TestGateway::new().unwrap();
    let run = gw.run(&["term"]).unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");
    let socket = gw.state_dir().join("run/gateway.sock");
    assert!(
        run.stderr.contains(&format!(
            "openshell term: no gateway answers on {} (start one with `openshell gateway start`)",
            socket.display()
        )),
        "{run:?}"
    );
    // Nothing was started behind the user's back.
    assert!(gw.gateway_pid().is_none());
}
