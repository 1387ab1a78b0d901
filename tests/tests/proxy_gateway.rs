//! Issue 5 through the real gateway: `openshell sandbox create --policy F -- curl ...` with the
//! proxy and the eBPF programs wired in, a real DNS server and HTTPS server on a test host, and
//! `openshell logs` reading the decisions back.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod proxy_support;

use std::time::{Duration, Instant};

use openshell_tests::gateway::TestGateway;
use proxy_support::{TestHost, privileged, python3};

fn gateway_for(host: &TestHost) -> TestGateway {
    let gw = TestGateway::new().unwrap();
    std::fs::write(
        &gw.config,
        format!(
            "[gateway]\ncgroup_base = \"{}\"\n\
             [proxy]\ntransparent_listen = \"127.0.0.1:0\"\n\
             [dns]\nlisten = \"127.0.0.1:0\"\nupstream = [\"{}\"]\n",
            gw.cgroup_base,
            host.dns.addr()
        ),
    )
    .unwrap();
    gw
}

const PYPI: &str = "version: 1
network_policies:
  pypi:
    name: pypi
    endpoints:
      - host: pypi.org
        port: 443
      - host: files.pythonhosted.org
        port: 443
    binaries:
      - { path: /usr/bin/pip }
      - { path: /usr/local/bin/uv }
      - { path: /usr/bin/curl }
";

/// `openshell logs NAME -o json`, polled (bounded) until `want` lines are there.
fn json_logs(gw: &TestGateway, name: &str, want: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = gw.run(&["logs", name, "-o", "json"]).unwrap().ok().unwrap();
        let lines: Vec<serde_json::Value> = run
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= want || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sandbox_create_curl_allowed_python_denied_and_logged() {
    if !privileged() {
        return;
    }
    let host = TestHost::new(&["pypi.org", "files.pythonhosted.org"]).unwrap();
    host.dns.add("pypi.org", host.ip());
    let gw = gateway_for(&host);
    let policy = gw.dir.path().join("pypi.yaml");
    std::fs::write(&policy, PYPI).unwrap();
    let policy = policy.display().to_string();

    let run = gw
        .run(&[
            "sandbox",
            "create",
            "--name",
            "net",
            "--policy",
            &policy,
            "--",
            "curl",
            "-sSk",
            "--max-time",
            "10",
            "https://pypi.org/through-the-gateway",
        ])
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("hello from the test host"), "{run:?}");
    assert_eq!(host.requests(), ["/through-the-gateway"]);

    let script = "import socket; socket.create_connection(('pypi.org', 443), timeout=10).recv(1)";
    let python = python3().display().to_string();
    let run = gw
        .run(&["sandbox", "exec", "net", "--", &python, "-c", script])
        .unwrap();
    assert_ne!(run.code, Some(0), "python3 must be denied: {run:?}");
    assert_eq!(host.requests().len(), 1);

    let logs = json_logs(&gw, "net", 2);
    let allow = logs
        .iter()
        .find(|l| l["decision"] == "allow")
        .unwrap_or_else(|| panic!("{logs:#?}"));
    assert_eq!(allow["binary"], "/usr/bin/curl");
    assert_eq!(allow["host"], "pypi.org");
    assert_eq!(allow["port"], 443);
    assert_eq!(allow["sandbox"], "net");
    assert_eq!(allow["block"], "pypi");
    assert_eq!(allow["revision"], 1);
    let deny = logs
        .iter()
        .find(|l| l["decision"] == "deny" && l["port"] == 443)
        .unwrap_or_else(|| panic!("{logs:#?}"));
    assert_eq!(deny["binary"], python.as_str());
    assert_eq!(deny["host"], "pypi.org");
    assert!(
        deny["reason"].as_str().unwrap().contains("is not listed"),
        "{deny}"
    );
    let mut keys: Vec<_> = deny.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "ancestors",
            "binary",
            "block",
            "decision",
            "host",
            "ip",
            "pid",
            "port",
            "reason",
            "revision",
            "sandbox",
            "time"
        ]
    );
    let text = gw.run(&["logs", "net", "-n", "1"]).unwrap().ok().unwrap();
    assert_eq!(text.stdout.lines().count(), 1, "{text:?}");
    assert!(text.stdout.contains("DENY"), "{text:?}");
}

#[test]
fn rest_endpoint_is_refused_until_inspection_lands() {
    if !privileged() {
        return;
    }
    let host = TestHost::new(&["api.example.com"]).unwrap();
    let gw = gateway_for(&host);
    let policy = gw.dir.path().join("rest.yaml");
    std::fs::write(
        &policy,
        "version: 1
network_policies:
  my_api:
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        access: full
    binaries:
      - { path: /usr/bin/curl }
",
    )
    .unwrap();
    let policy = policy.display().to_string();
    let run = gw
        .run(&[
            "sandbox", "create", "--name", "rest", "--policy", &policy, "--", "true",
        ])
        .unwrap();
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("is not supported yet"), "{run:?}");
    let list = gw
        .run(&["sandbox", "list", "-o", "json"])
        .unwrap()
        .ok()
        .unwrap();
    assert!(!list.stdout.contains("\"rest\""), "rolled back: {list:?}");
}
