//! Issue 7, the seed's "Iterate on a Running Sandbox" loop through the real gateway, proxy,
//! eBPF programs and a DNS + HTTPS test host: a denial seen in `logs`, `policy get --full`
//! edited and fed back to `policy set --wait`, the same request then allowed, `policy list`;
//! refused updates (invalid file, changed static section, a gateway killed before loading) leave
//! the old policy in force; a restarted gateway restores the latest loaded revision.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod proxy_support;

use std::time::{Duration, Instant};

use openshell_tests::gateway::{Run, TestGateway};
use proxy_support::{TestHost, privileged};

fn gateway_for(host: &TestHost) -> TestGateway {
    TestGateway::with_dns(host.dns.addr()).unwrap()
}

/// Creation policy: pypi is reachable for pip only, so curl's connection is denied.
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
";

/// The block the operator adds (indented under `network_policies:`).
const PYPI_BLOCK: &str = "  pypi:
    name: pypi
    endpoints:
      - host: pypi.org
        port: 443
    binaries:
      - { path: /usr/bin/curl }
";

fn curl(gw: &TestGateway, url: &str) -> Run {
    gw.curl("iter", url).unwrap()
}

/// `policy list` with the hash and time columns masked.
fn masked_list(gw: &TestGateway) -> String {
    let run = gw.run(&["policy", "list", "iter"]).unwrap().ok().unwrap();
    run.stdout
        .lines()
        .skip(1)
        .map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            assert!(cols[1].starts_with("sha256:"), "{line}");
            assert!(cols[3].ends_with('Z'), "{line}");
            format!(
                "{} [hash] {} [time] {}",
                cols[0],
                cols[2],
                cols[4..].join(" ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `logs -o json` (bounded) for a decision matching `pred`.
fn wait_for_log(gw: &TestGateway, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = gw
            .run(&["logs", "iter", "-o", "json"])
            .unwrap()
            .ok()
            .unwrap();
        let found = run
            .stdout
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| pred(l));
        if let Some(found) = found {
            return found;
        }
        assert!(Instant::now() < deadline, "no such decision: {run:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn iterate_on_a_running_sandbox() {
    if !privileged() {
        return;
    }
    let host = TestHost::new(&["pypi.org"]).unwrap();
    host.dns.add("pypi.org", host.ip());
    let gw = gateway_for(&host);
    let dir = gw.dir.path().to_owned();
    let initial = dir.join("initial.yaml");
    std::fs::write(&initial, INITIAL).unwrap();

    // 1. Create a sandbox whose policy denies pypi for curl.
    let run = gw
        .run(&[
            "sandbox",
            "create",
            "--name",
            "iter",
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
    assert!(host.requests().is_empty());

    // 2. The denial is in the logs.
    let deny = wait_for_log(&gw, |l| l["decision"] == "deny" && l["port"] == 443);
    assert_eq!(deny["binary"], "/usr/bin/curl");
    assert_eq!(deny["host"], "pypi.org");
    assert_eq!(deny["revision"], 1);

    // 3. Pull the policy with its header; revision 1 was marked loaded by the proxy.
    let got = gw
        .run(&["policy", "get", "iter", "--full"])
        .unwrap()
        .ok()
        .unwrap();
    let hash = got
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("# Hash: sha256:")
        .unwrap();
    assert_eq!(hash.len(), 64, "{got:?}");
    insta::assert_snapshot!(got.stdout.replace(hash, "[hash]"), @r"
    # Version: 1
    # Hash: sha256:[hash]
    # Status: loaded
    version: 1
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
    ");

    // 4. Add the pypi block to the pulled file, header and all.
    let edited = dir.join("p.yaml");
    std::fs::write(&edited, format!("{}{PYPI_BLOCK}", got.stdout)).unwrap();
    let edited = edited.to_str().unwrap().to_owned();

    // 5. Push it and wait.
    let set = gw
        .run(&["policy", "set", "iter", "--policy", &edited, "--wait"])
        .unwrap();
    assert_eq!(set.code, Some(0), "{set:?}");
    assert!(set.stdout.contains("policy version 2 loaded"), "{set:?}");

    // 6. The same request now succeeds, decided by revision 2.
    let run = curl(&gw, "https://pypi.org/allowed");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(host.requests(), ["/allowed"]);
    let allow = wait_for_log(&gw, |l| l["decision"] == "allow" && l["host"] == "pypi.org");
    assert_eq!(allow["revision"], 2);
    assert_eq!(allow["block"], "pypi");

    // 7. Both revisions are listed, newest first.
    insta::assert_snapshot!(masked_list(&gw), @r"
    2 [hash] loaded [time] -
    1 [hash] superseded [time] -
    ");

    // Older revisions stay readable; JSON carries the same fields.
    let rev1 = gw
        .run(&["policy", "get", "iter", "--rev", "1", "-o", "json"])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(rev1["version"], 1);
    assert_eq!(rev1["status"], "superseded");
    assert_eq!(rev1["sha256"], hash);
    assert_eq!(rev1["policy"], INITIAL);

    // The original header style (plain `Version:` lines and `---`) is accepted as well, and
    // the same policy again is unchanged: no new version.
    let plain = dir.join("plain.yaml");
    let text = std::fs::read_to_string(&edited).unwrap();
    let body = text.split_once("# Status: loaded\n").unwrap().1;
    std::fs::write(
        &plain,
        format!("Version: 1\nHash: sha256:{hash}\nStatus: Loaded\n---\n{body}"),
    )
    .unwrap();
    let same = gw
        .run(&[
            "policy",
            "set",
            "iter",
            "--policy",
            plain.to_str().unwrap(),
            "--wait",
        ])
        .unwrap();
    assert_eq!(same.code, Some(0), "{same:?}");
    assert!(
        same.stdout.contains("policy unchanged (version 2"),
        "{same:?}"
    );

    // The same policy again: unchanged, no new version.
    let same = gw
        .run(&["policy", "set", "iter", "--policy", &edited, "--wait"])
        .unwrap();
    assert_eq!(same.code, Some(0), "{same:?}");
    assert!(
        same.stdout.contains("policy unchanged (version 2"),
        "{same:?}"
    );

    // An invalid file: line-numbered errors, exit 1, no new version, pypi still allowed.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        format!("{}{PYPI_BLOCK}", got.stdout)
            .replace("port: 443\n    binaries", "port: 99999\n    binaries"),
    )
    .unwrap();
    let run = gw
        .run(&[
            "policy",
            "set",
            "iter",
            "--policy",
            bad.to_str().unwrap(),
            "--wait",
        ])
        .unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");
    let prefix = format!("{}:13:", bad.display());
    assert!(run.stderr.contains(&prefix), "{run:?}");
    assert!(run.stderr.contains(": error: "), "{run:?}");

    // A changed static section is refused, naming it.
    let statics = dir.join("statics.yaml");
    std::fs::write(
        &statics,
        std::fs::read_to_string(&edited).unwrap().replace(
            "read_write: [/sandbox, /tmp]",
            "read_write: [/sandbox, /tmp, /var]",
        ),
    )
    .unwrap();
    let run = gw
        .run(&[
            "policy",
            "set",
            "iter",
            "--policy",
            statics.to_str().unwrap(),
            "--wait",
        ])
        .unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("static section `filesystem_policy` differs"),
        "{run:?}"
    );

    // An inspected (`protocol: rest`) block loads like any other, and supersedes revision 2;
    // what revision 2 allowed is still allowed.
    let rest = dir.join("rest.yaml");
    std::fs::write(
        &rest,
        format!(
            "{}  api:\n    endpoints:\n      - host: api.example.com\n        port: 443\n        protocol: rest\n        access: full\n    binaries:\n      - {{ path: /usr/bin/curl }}\n",
            std::fs::read_to_string(&edited).unwrap()
        ),
    )
    .unwrap();
    let run = gw
        .run(&[
            "policy",
            "set",
            "iter",
            "--policy",
            rest.to_str().unwrap(),
            "--wait",
        ])
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    let listed = masked_list(&gw);
    assert!(
        listed.starts_with("3 [hash] loaded [time] -\n2 [hash] superseded [time] -"),
        "{listed}"
    );
    let run = curl(&gw, "https://pypi.org/still-allowed");
    assert_eq!(run.code, Some(0), "{run:?}");

    // No gateway: `--wait` exits 124.
    gw.run(&["gateway", "stop"]).unwrap().ok().unwrap();
    let run = gw
        .run(&[
            "policy",
            "set",
            "iter",
            "--policy",
            &edited,
            "--wait",
            "--timeout",
            "5",
        ])
        .unwrap();
    assert_eq!(run.code, Some(124), "{run:?}");
    // No gateway and an invalid file: the CLI checks the file itself, so it still says why and
    // exits 1.
    let run = gw
        .run(&[
            "policy",
            "set",
            "iter",
            "--policy",
            bad.to_str().unwrap(),
            "--wait",
        ])
        .unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains(&prefix), "{run:?}");
    assert!(
        run.stderr
            .contains("the policy of sandbox \"iter\" is unchanged"),
        "{run:?}"
    );

    // A restarted gateway restores revision 3, not the creation policy.
    let run = curl(&gw, "https://pypi.org/after-restart");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        host.requests(),
        ["/allowed", "/still-allowed", "/after-restart"]
    );
    let listed = masked_list(&gw);
    assert!(listed.contains("3 [hash] loaded"), "{listed}");

    // A gateway killed between recording a revision and loading it: the restarted gateway
    // marks that revision failed and keeps revision 3 in force.
    gw.run(&["gateway", "stop"]).unwrap().ok().unwrap();
    let mut cmd = gw.command();
    cmd.env("OPENSHELL_FAILPOINT", "policy-after-record")
        .args(["gateway", "start"]);
    openshell_tests::gateway::run_with_timeout(cmd, b"", Duration::from_secs(60))
        .unwrap()
        .ok()
        .unwrap();
    let run = gw
        .run(&[
            "policy",
            "set",
            "iter",
            "--policy",
            initial.to_str().unwrap(),
            "--wait",
        ])
        .unwrap();
    assert_eq!(run.code, Some(124), "{run:?}");
    let log = std::fs::read_to_string(gw.state_dir().join("gateway.log")).unwrap();
    assert!(log.contains("failpoint policy-after-record"), "{log}");
    let listed = masked_list(&gw);
    assert!(
        listed.starts_with("4 [hash] failed [time] the gateway stopped before loading"),
        "{listed}"
    );
    assert!(listed.contains("3 [hash] loaded"), "{listed}");
    let run = curl(&gw, "https://pypi.org/after-crash");
    assert_eq!(run.code, Some(0), "{run:?}");
}

/// `INITIAL`'s network blocks, then `filler` blocks for other hosts; the pypi block goes in the
/// middle of them when `pypi`.
fn many_blocks(filler: usize, pypi: bool) -> String {
    let mut text = INITIAL.to_owned();
    for i in 0..filler {
        if pypi && i == filler / 2 {
            text.push_str(PYPI_BLOCK);
        }
        text.push_str(&format!(
            "  filler_{i}:\n    endpoints:\n      - {{ host: h{i}.example.com, port: 443 }}\n    binaries:\n      - {{ path: /usr/bin/curl }}\n"
        ));
    }
    text
}

/// The `validate ...` part of the gateway's log line for the last loaded revision.
fn last_validate_step(gw: &TestGateway) -> String {
    let log = std::fs::read_to_string(gw.state_dir().join("gateway.log")).unwrap();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" loaded (validate "))
        .unwrap()
        .to_owned();
    let step = line.split_once("(validate ").unwrap().1;
    step.split_once(", static check").unwrap().0.to_owned()
}

/// The gateway reads an edit of the policy it was last sent incrementally (only the changed
/// blocks); what it enforces and the errors it reports are those of the whole file.
#[test]
fn an_edited_policy_is_read_incrementally_and_judged_in_full() {
    if !privileged() {
        return;
    }
    let host = TestHost::new(&["pypi.org"]).unwrap();
    host.dns.add("pypi.org", host.ip());
    let gw = gateway_for(&host);
    let dir = gw.dir.path().to_owned();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let set = |path: &str| {
        gw.run(&["policy", "set", "iter", "--policy", path, "--wait"])
            .unwrap()
    };
    let initial = write("initial.yaml", INITIAL);
    gw.run(&[
        "sandbox", "create", "--name", "iter", "--policy", &initial, "--", "true",
    ])
    .unwrap()
    .ok()
    .unwrap();

    // 200 blocks, none for curl to pypi.org.
    let run = set(&write("big.yaml", &many_blocks(200, false)));
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_ne!(curl(&gw, "https://pypi.org/denied").code, Some(0));

    // The pypi block added in the middle: only it and its neighbour are read again.
    let with_pypi = many_blocks(200, true);
    let run = set(&write("pypi.yaml", &with_pypi));
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("policy version 3 loaded"), "{run:?}");
    let step = last_validate_step(&gw);
    assert!(
        step.contains("reading 2 changed blocks, keeping 200"),
        "{step}"
    );
    let run = curl(&gw, "https://pypi.org/allowed");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(host.requests(), ["/allowed"]);

    // An error in one block far down the file: reported at its line, nothing changes.
    let bad = with_pypi.replace(
        "h150.example.com, port: 443",
        "h150.example.com, port: 99999",
    );
    let line = bad.lines().position(|l| l.contains("port: 99999")).unwrap() + 1;
    let bad_path = write("bad.yaml", &bad);
    let run = set(&bad_path);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains(&format!("{bad_path}:{line}:")),
        "line {line}: {run:?}"
    );
    // An edit that only reads in the context of the whole file (a quote left open swallows
    // the following blocks): an error, not a partial policy.
    let open_quote = with_pypi.replace("host: h120.example.com", "host: \"h120.example.com");
    let run = set(&write("quote.yaml", &open_quote));
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains(": error: "), "{run:?}");

    // Removing the pypi block again (from the last file that parsed) takes effect.
    let run = set(&write("again.yaml", &many_blocks(200, false)));
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("policy version 4 loaded"), "{run:?}");
    assert_ne!(curl(&gw, "https://pypi.org/denied-again").code, Some(0));
    assert_eq!(host.requests(), ["/allowed"]);
}
