//! Issue 5 through the real gateway: `openshell sandbox create --policy F -- curl ...` with the
//! proxy and the eBPF programs wired in, a real DNS server and HTTPS server on a test host, and
//! `openshell logs` reading the decisions back.

#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod proxy_support;

use std::{
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use openshell_tests::{
    dns::TestDns,
    gateway::TestGateway,
    netns::TestNet,
    upstream::{TestCa, Upstream},
};
use proxy_support::{TestHost, privileged, python3};

fn gateway_for(host: &TestHost) -> TestGateway {
    TestGateway::with_dns(host.dns.addr()).unwrap()
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

/// The seed's `github_repos` block for organisation `acme`, for curl and python3 as well.
fn github_policy() -> String {
    let seed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/github_repos.yaml"),
    )
    .unwrap();
    let python = python3().display().to_string();
    seed.replace("<org_name>", "acme").replace(
        "      - { path: /usr/bin/gh }\n",
        &format!(
            "      - {{ path: /usr/bin/gh }}\n      - {{ path: /usr/bin/curl }}\n      - {{ path: {python} }}\n"
        ),
    )
}

#[test]
fn rest_endpoint_is_inspected_with_the_sandbox_ca() {
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
    let policy = policy.display().to_string();
    let api = "https://api.github.com/repos/acme";

    // No -k and no CA option: the sandbox trusts its CA through the bundle alone.
    let run = gw
        .run(&[
            "sandbox",
            "create",
            "--name",
            "gh",
            "--policy",
            &policy,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("{api}/alpha-repo/issues?state=open"),
        ])
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("\"method\":\"GET\""), "{run:?}");

    let run = gw
        .run(&[
            "sandbox",
            "exec",
            "gh",
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-X",
            "DELETE",
            "-w",
            "\n%{http_code}",
            &format!("{api}/bravo-repo"),
        ])
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    let (body, status) = run.stdout.rsplit_once('\n').unwrap();
    assert_eq!(status, "403", "{run:?}");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"], "policy_denied");
    assert_eq!(body["block"], "github_repos");
    assert_eq!(body["host"], "api.github.com");
    assert_eq!(body["binary"], "/usr/bin/curl");
    assert_eq!(
        body["reason"],
        "DELETE /repos/acme/bravo-repo not permitted by block github_repos"
    );

    // Plain python3: the variables name the bundle, the default CA path shows it too.
    let script = "import sys, urllib.request\n\
                  r = urllib.request.urlopen(sys.argv[1], timeout=10)\n\
                  print(r.status, r.read().decode())";
    let python = python3().display().to_string();
    let run = gw
        .run(&[
            "sandbox",
            "exec",
            "gh",
            "--",
            &python,
            "-c",
            script,
            &format!("{api}/alpha-repo/pulls"),
        ])
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("200 {"), "{run:?}");
    let run = gw
        .run(&[
            "sandbox",
            "exec",
            "gh",
            "--",
            &python,
            "-c",
            "import os, urllib.request\n\
             del os.environ['SSL_CERT_FILE']\n\
             urllib.request.urlopen('https://api.github.com/graphql', b'{}', timeout=10)",
        ])
        .unwrap();
    assert_eq!(
        run.code,
        Some(0),
        "the default CA path shows the bundle: {run:?}"
    );

    let seen: Vec<(String, String)> = upstream
        .seen()
        .into_iter()
        .map(|s| (s.method, s.target))
        .collect();
    assert_eq!(
        seen,
        [
            (
                "GET".to_owned(),
                "/repos/acme/alpha-repo/issues?state=open".to_owned()
            ),
            ("GET".to_owned(), "/repos/acme/alpha-repo/pulls".to_owned()),
            ("POST".to_owned(), "/graphql".to_owned()),
        ],
        "the denied DELETE never arrived"
    );

    let logs = json_logs(&gw, "gh", 8);
    let find = |decision: &str, reason: &str| {
        logs.iter()
            .find(|l| {
                l["decision"] == decision && l["reason"].as_str().unwrap().starts_with(reason)
            })
            .unwrap_or_else(|| panic!("no {decision} {reason}: {logs:#?}"))
    };
    let allowed = find("allow", "GET /repos/acme/alpha-repo/issues?state=open");
    assert_eq!(allowed["binary"], "/usr/bin/curl");
    assert_eq!(allowed["host"], "api.github.com");
    assert_eq!(allowed["block"], "github_repos");
    let denied = find(
        "deny",
        "DELETE /repos/acme/bravo-repo not permitted by block github_repos",
    );
    assert_eq!(denied["binary"], "/usr/bin/curl");
    assert_eq!(denied["port"], 443);
    assert_eq!(denied["revision"], 1);
    find("allow", "POST /graphql");

    // A restarted gateway terminates TLS with the same CA, whose key stays root-only.
    let ca_dir = gw.state_dir().join("ca/gh");
    let key_mode = std::fs::metadata(ca_dir.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let ca_before = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    gw.run(&["gateway", "stop"]).unwrap().ok().unwrap();
    gw.run(&["gateway", "start"]).unwrap().ok().unwrap();
    assert_eq!(
        std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
        ca_before
    );
    let run = gw
        .run(&[
            "sandbox",
            "exec",
            "gh",
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("{api}/alpha-repo/after-restart"),
        ])
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        upstream.seen().last().map(|s| s.target.clone()).as_deref(),
        Some("/repos/acme/alpha-repo/after-restart")
    );
}

/// `[proxy] relay = "kernel"` in the gateway's settings: allowed streams go through the
/// in-kernel relay, and a client sees the same bytes as with the default relay; denials are
/// unchanged.
#[test]
fn gateway_with_the_kernel_relay_relays_allowed_streams_and_denies_the_rest() {
    if !privileged() {
        return;
    }
    let host = TestHost::new(&["pypi.org"]).unwrap();
    host.dns.add("pypi.org", host.ip());
    let gw = gateway_for(&host);
    let settings = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        settings.replace("[proxy]\n", "[proxy]\nrelay = \"kernel\"\n"),
    )
    .unwrap();
    let policy = gw.dir.path().join("pypi.yaml");
    std::fs::write(&policy, PYPI).unwrap();
    let policy = policy.display().to_string();
    let run = gw
        .run(&["sandbox", "create", "--name", "k", "--policy", &policy])
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    for i in 0..3 {
        let run = gw
            .curl("k", &format!("https://pypi.org/kernel-{i}"))
            .unwrap();
        assert_eq!(run.code, Some(0), "{run:?}");
        assert!(run.stdout.contains("hello from the test host"), "{run:?}");
    }
    assert_eq!(
        host.requests(),
        ["/kernel-0", "/kernel-1", "/kernel-2"],
        "every request arrived once, in order"
    );
    let python = python3().display().to_string();
    let script = "import socket; socket.create_connection(('pypi.org', 443), timeout=10).recv(1)";
    let run = gw
        .run(&["sandbox", "exec", "k", "--", &python, "-c", script])
        .unwrap();
    assert_ne!(run.code, Some(0), "python3 must be denied: {run:?}");
    assert_eq!(host.requests().len(), 3);
    // The kernel side was there to use (else the gateway says it relays with copy instead).
    let log = std::fs::read_to_string(gw.state_dir().join("gateway.log")).unwrap();
    assert!(log.contains("gateway: pid"), "{log}");
    assert!(!log.contains("relay = \"kernel\" is unavailable"), "{log}");
}
