//! REST inspection end to end: real curl and python3 through `inspect::serve` to a real HTTPS
//! upstream (HTTP/1.1 and h2) in a network namespace, with the repository's `github_repos` and
//! `download_api` example policies. The upstream's own log proves denied requests never arrived.

#![expect(
    clippy::expect_used,
    reason = "shared case runners fail the calling test loudly"
)]

mod l7_support;

use l7_support::{Harness, ORG, example_policy, run, skip_unless_root};

const GH: &str = "api.github.com";
const GH_BIN: &str = "/usr/bin/gh";

/// Status codes of the HTTP/1.1 responses in a raw byte stream, in order.
fn statuses(out: &str) -> Vec<&str> {
    out.split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|r| r.get(..3))
        .collect()
}

fn repo(name: &str, rest: &str) -> String {
    format!("/repos/{ORG}/{name}{rest}")
}

/// The HTTP version curl negotiated with the inspector.
async fn client_version(h: &Harness, proto: &str) -> &'static str {
    let mut cmd = h.curl();
    cmd.args([proto, "-o", "/dev/null", "-w", "%{http_version}"])
        .arg(format!("https://{}/", h.host));
    match run(cmd).await.trim() {
        "2" => "HTTP/2.0",
        "1.1" => "HTTP/1.1",
        other => panic!("unexpected HTTP version {other}"),
    }
}

/// The seed's github_repos cases over one protocol version (`--http1.1` or `--http2`).
async fn github_cases(proto: &str, version: &str) {
    let h = Harness::start(&example_policy("github_repos.yaml"), GH, GH_BIN)
        .await
        .expect("harness");
    let allowed = [
        ("GET", repo("bravo-repo", "/pulls/7")),
        ("GET", "/user".to_owned()),
        ("POST", "/graphql".to_owned()),
        ("DELETE", repo("alpha-repo", "/branches/x")),
        ("PUT", repo("alpha-repo", "/contents/a.txt")),
        ("POST", repo("bravo-repo", "/issues")),
        ("PATCH", repo("bravo-repo", "/issues/3")),
    ];
    for (method, path) in &allowed {
        let (status, body) = h.curl_one(&[proto], method, path).await;
        assert_eq!(status, 200, "{method} {path} over {proto}: {body}");
    }
    let denied = [
        ("DELETE", repo("bravo-repo", "")),
        ("PATCH", repo("bravo-repo", "/pulls/1")),
    ];
    for (method, path) in &denied {
        let (status, body) = h.curl_one(&[proto], method, path).await;
        assert_eq!(status, 403, "{method} {path} over {proto}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("403 body is JSON");
        assert_eq!(json["error"], "policy_denied");
        assert_eq!(json["block"], "github_repos");
        assert_eq!(json["host"], GH);
        assert_eq!(json["binary"], GH_BIN);
        assert_eq!(
            json["reason"],
            format!("{method} {path} not permitted by block github_repos")
        );
    }
    let expected: Vec<String> = allowed.iter().map(|(m, p)| format!("{m} {p}")).collect();
    assert_eq!(
        h.arrived(),
        expected,
        "only the allowed requests reached upstream"
    );
    assert!(
        h.upstream.seen().iter().all(|s| s.authority == GH),
        "{:?}",
        h.upstream.seen()
    );
    let log = h.log.lock().expect("log").clone();
    assert_eq!(log.len(), allowed.len() + denied.len());
    assert!(log.iter().all(|r| r.revision == 1 && r.host.as_ref() == GH));
    assert_eq!(
        client_version(&h, proto).await,
        version,
        "client side speaks {proto}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_repos_rules_http1() {
    if skip_unless_root() {
        return;
    }
    github_cases("--http1.1", "HTTP/1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_repos_rules_h2() {
    if skip_unless_root() {
        return;
    }
    github_cases("--http2", "HTTP/2.0").await;
}

/// A denied request leaves the connection usable: curl sends three requests over one kept-alive
/// (HTTP/1.1) or multiplexed (h2) connection and opens only one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_stays_usable_after_a_denial() {
    if skip_unless_root() {
        return;
    }
    let h = Harness::start(&example_policy("github_repos.yaml"), GH, GH_BIN)
        .await
        .expect("harness");
    for proto in ["--http1.1", "--http2"] {
        let url = |p: &str| format!("https://{GH}{p}");
        let mut cmd = h.curl();
        let each = [
            proto,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}:%{num_connects} ",
        ];
        cmd.args(each).arg(url("/zen")).arg("--next");
        cmd.args(h.curl().get_args())
            .args(each)
            .args(["-X", "DELETE"]);
        cmd.arg(url(&repo("bravo-repo", ""))).arg("--next");
        cmd.args(h.curl().get_args())
            .args(each)
            .arg(url("/octocat"));
        h.upstream.clear();
        let out = run(cmd).await;
        assert_eq!(out.trim(), "200:1 403:0 200:0", "{proto}");
        assert_eq!(h.arrived(), vec!["GET /zen", "GET /octocat"], "{proto}");
    }
}

/// The 403 body, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_body_snapshot() {
    if skip_unless_root() {
        return;
    }
    let h = Harness::start(&example_policy("github_repos.yaml"), GH, GH_BIN)
        .await
        .expect("harness");
    let mut cmd = h.curl();
    cmd.args(["-i", "-X", "PATCH"])
        .arg(format!("https://{GH}{}", repo("bravo-repo", "/pulls/1")));
    let out = run(cmd).await.replace("\r\n", "\n");
    let mut lines: Vec<&str> = out
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .collect();
    lines.retain(|l| !l.is_empty());
    insta::assert_snapshot!(lines.join("\n"));
}

/// python3's own TLS stack and http.client, trusting the sandbox CA bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client() {
    if skip_unless_root() {
        return;
    }
    let h = Harness::start(&example_policy("github_repos.yaml"), GH, GH_BIN)
        .await
        .expect("harness");
    let script = r#"
import http.client, socket, ssl, sys
ca, addr, port, host = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
sock = ctx.wrap_socket(socket.create_connection((addr, port), timeout=20), server_hostname=host)
conn = http.client.HTTPSConnection(host, 443, context=ctx)
conn.sock = sock
for method, path in [("POST", "/graphql"), ("DELETE", "/repos/acme/bravo-repo"), ("GET", "/rate_limit")]:
    conn.request(method, path, body=b"{}" if method == "POST" else None)
    r = conn.getresponse()
    body = r.read()
    print(method, path, r.status, r.getheader("Content-Type"))
"#;
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", script])
        .arg(&h.ca_file)
        .arg(h.addr.ip().to_string())
        .arg(h.addr.port().to_string())
        .arg(GH);
    let out = run(cmd).await;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "POST /graphql 200 application/json",
            "DELETE /repos/acme/bravo-repo 403 application/json",
            "GET /rate_limit 200 application/json",
        ]
    );
    assert_eq!(h.arrived(), vec!["POST /graphql", "GET /rate_limit"]);
    assert_eq!(h.upstream.seen()[0].body, b"{}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_api_query_matchers() {
    if skip_unless_root() {
        return;
    }
    let host = "api.example.com";
    let h = Harness::start(&example_policy("download_api.yaml"), host, "/usr/bin/curl")
        .await
        .expect("harness");
    let base = "/api/v1/download";
    let cases = [
        ("slug=skill-x&version=1.2", 200),
        ("slug=other&version=1.2", 403),
        ("slug=other", 403),
        ("slug=skill-x&version=1.0&version=3.0", 403),
        ("slug=skill-x&version=1.0&version=2.5", 200),
        // An encoded `&` stays inside the value: slug is "skill-x&version=3.0", version 2.1.
        ("slug=skill-x%26version%3D3.0&version=2.1", 200),
        // ... and cannot smuggle a second version past the matcher.
        ("slug=skill-x&version=2.1%26version%3D9", 200),
        ("slug=skill-%zz&version=1.2", 403),
    ];
    for (proto, version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2.0")] {
        h.upstream.clear();
        let mut expected = Vec::new();
        for (query, want) in cases {
            let path = format!("{base}?{query}");
            let (status, body) = h.curl_one(&[proto], "GET", &path).await;
            assert_eq!(status, want, "{path} over {proto}: {body}");
            if want == 200 {
                expected.push(format!("GET {path}"));
            }
        }
        assert_eq!(
            h.arrived(),
            expected,
            "{proto}: the query reaches upstream as sent"
        );
        assert_eq!(client_version(&h, proto).await, version);
    }
}

/// Path attacks: each is denied (or canonicalised to a denied path) and never reaches upstream;
/// an allowed one is forwarded in exactly its canonical form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_attacks() {
    if skip_unless_root() {
        return;
    }
    let h = Harness::start(&example_policy("github_repos.yaml"), GH, GH_BIN)
        .await
        .expect("harness");
    let denied = [
        repo("alpha-repo", "/../bravo-repo"),
        repo("alpha-repo", "/%2e%2e/bravo-repo"),
        repo("alpha-repo", "/%2E%2E/bravo-repo"),
        repo("alpha-repo", "%2f..%2fbravo-repo"),
        repo("alpha-repo", "/..;/bravo-repo"),
        repo("alpha-repo", "/..%3B/bravo-repo"),
        repo("alpha-repo", ";x=1/../bravo-repo"),
        format!("/repos/{ORG}//alpha-repo/../../{ORG}/bravo-repo"),
        repo("alpha-repo", "/../../../../etc"),
        repo("alpha-repo", "/%00"),
        repo("alpha-repo", "/a%0d%0aX-Injected:%201"),
    ];
    for proto in ["--http1.1", "--http2"] {
        h.upstream.clear();
        for path in &denied {
            let (status, body) = h.curl_one(&[proto], "DELETE", path).await;
            assert_eq!(status, 403, "DELETE {path} over {proto}: {body}");
        }
        // GET is allowed on every path, but a control byte is rejected all the same.
        let (status, _) = h.curl_one(&[proto], "GET", "/search%7f").await;
        assert_eq!(status, 403, "{proto}");
        assert_eq!(
            h.arrived(),
            Vec::<String>::new(),
            "{proto}: nothing arrived"
        );
        // Allowed after canonicalisation, and forwarded canonical.
        let (status, _) = h
            .curl_one(
                &[proto],
                "DELETE",
                &format!("/repos/{ORG}//alpha-repo/./b;v=1/%61"),
            )
            .await;
        assert_eq!(status, 200, "{proto}");
        assert_eq!(
            h.arrived(),
            vec![format!("DELETE {}", repo("alpha-repo", "/b/a"))]
        );
    }
}

/// Raw bytes: absolute-form naming another host, a pipelined denied request behind an allowed
/// one, and SNI / Host mismatches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_requests_pipelining_and_authority() {
    if skip_unless_root() {
        return;
    }
    let h = Harness::start(&example_policy("github_repos.yaml"), GH, GH_BIN)
        .await
        .expect("harness");
    let del_bravo = repo("bravo-repo", "");
    let pipelined = format!(
        "GET /zen HTTP/1.1\r\nHost: {GH}\r\n\r\n\
         DELETE {del_bravo} HTTP/1.1\r\nHost: {GH}\r\n\r\n\
         GET /octocat HTTP/1.1\r\nHost: {GH}\r\nConnection: close\r\n\r\n"
    );
    let out = h.raw_tls(GH, pipelined.as_bytes()).await;
    assert_eq!(statuses(&out), vec!["200", "403", "200"], "{out}");
    assert_eq!(h.arrived(), vec!["GET /zen", "GET /octocat"]);

    h.upstream.clear();
    let absolute = format!(
        "DELETE https://evil.example{} HTTP/1.1\r\nHost: {GH}\r\nConnection: close\r\n\r\n",
        repo("alpha-repo", "/x")
    );
    let out = h.raw_tls(GH, absolute.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 421 "), "{out}");
    // The same absolute form naming the connection's own host is judged by its path.
    let own = format!(
        "DELETE https://{GH}{} HTTP/1.1\r\nHost: {GH}\r\nConnection: close\r\n\r\n",
        repo("alpha-repo", "/x")
    );
    let out = h.raw_tls(GH, own.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");

    let other_host = "GET /zen HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
    let out = h.raw_tls(GH, other_host.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 421 "), "{out}");
    // SNI evil.example, Host api.github.com (curl -k: the leaf names the destination only).
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "-k",
        "--max-time",
        "20",
        "-w",
        "\n%{http_code}",
        "-H",
    ])
    .arg(format!("Host: {GH}"))
    .arg("--connect-to")
    .arg(format!(
        "evil.example:443:{}:{}",
        h.addr.ip(),
        h.addr.port()
    ))
    .arg("https://evil.example/zen");
    let out = run(cmd).await;
    assert!(out.ends_with("\n421"), "{out}");
    assert!(
        out.contains(r#"TLS SNI \"evil.example\" does not match"#),
        "{out}"
    );
    assert_eq!(
        h.arrived(),
        vec![format!("DELETE {}", repo("alpha-repo", "/x"))]
    );
}

/// Ambiguous framing: 400 (or a refusal by hyper's parser) and the connection closed; nothing
/// reaches upstream, including a request smuggled behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_rejected_and_closes() {
    if skip_unless_root() {
        return;
    }
    let h = Harness::start(&example_policy("github_repos.yaml"), GH, GH_BIN)
        .await
        .expect("harness");
    let smuggled = format!(
        "DELETE {} HTTP/1.1\r\nHost: {GH}\r\n\r\n",
        repo("alpha-repo", "/s")
    );
    let cases = [
        (
            "CL+TE",
            format!(
                "POST /graphql HTTP/1.1\r\nHost: {GH}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "duplicate CL",
            format!(
                "POST /graphql HTTP/1.1\r\nHost: {GH}\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}"
            ),
        ),
        (
            "conflicting CL",
            format!(
                "POST /graphql HTTP/1.1\r\nHost: {GH}\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{{}}"
            ),
        ),
        (
            "non-numeric CL",
            format!("POST /graphql HTTP/1.1\r\nHost: {GH}\r\nContent-Length: +2\r\n\r\n{{}}"),
        ),
        (
            "obs-fold",
            format!(
                "POST /graphql HTTP/1.1\r\nHost: {GH}\r\nX-A: 1\r\n  folded\r\nContent-Length: 2\r\n\r\n{{}}"
            ),
        ),
        (
            "bare LF",
            format!("POST /graphql HTTP/1.1\nHost: {GH}\nContent-Length: 2\n\n{{}}"),
        ),
    ];
    for (name, request) in cases {
        h.upstream.clear();
        let out = h
            .raw_tls(GH, format!("{request}{smuggled}").as_bytes())
            .await;
        assert!(
            out.starts_with("HTTP/1.1 400 "),
            "{name}: expected 400 and close, got {out:?}"
        );
        assert_eq!(
            statuses(&out),
            vec!["400"],
            "{name}: one response, then closed"
        );
        assert_eq!(
            h.arrived(),
            Vec::<String>::new(),
            "{name}: nothing reached upstream"
        );
    }
}

/// h2c upgrade and CONNECT inside an inspected endpoint are denied and close the connection (no
/// rule form can name them); a garbage ClientHello gets no passthrough. WebSocket upgrades are
/// in `l7_websocket.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_denied_and_bad_tls_is_never_passed_through() {
    if skip_unless_root() {
        return;
    }
    let h = Harness::start(&example_policy("github_repos.yaml"), GH, GH_BIN)
        .await
        .expect("harness");
    let h2c = format!(
        "GET /zen HTTP/1.1\r\nHost: {GH}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n\
         GET /x HTTP/1.1\r\nHost: {GH}\r\nConnection: close\r\n\r\n"
    );
    let out = h.raw_tls(GH, h2c.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 403 "), "{out}");
    assert!(
        out.contains("an upgrade to \\\"h2c\\\" inside an inspected endpoint"),
        "{out}"
    );
    let connect =
        format!("CONNECT {GH}:443 HTTP/1.1\r\nHost: {GH}:443\r\nConnection: close\r\n\r\n");
    let out = h.raw_tls(GH, connect.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 403 "), "{out}");

    // A record that starts like TLS but is not a ClientHello: the inspector closes.
    let mut tcp = tokio::net::TcpStream::connect(h.addr)
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tcp.write_all(b"\x16\x03\x01\x00\x05hello GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tcp.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the inspector must close a bad ClientHello");
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"));
    // The connection closed after the refused h2c upgrade: the GET pipelined behind it (GET is
    // allowed) was never read.
    assert_eq!(h.arrived(), Vec::<String>::new());
}

/// `enforcement: audit`: a request no rule allows is forwarded and logged as "would deny".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_forwards_and_logs_would_deny() {
    if skip_unless_root() {
        return;
    }
    let policy =
        example_policy("github_repos.yaml").replace("enforcement: enforce", "enforcement: audit");
    assert!(policy.contains("enforcement: audit"));
    let h = Harness::start(&policy, GH, GH_BIN).await.expect("harness");
    let path = repo("bravo-repo", "");
    let (status, _) = h.curl_one(&[], "DELETE", &path).await;
    assert_eq!(status, 200);
    assert_eq!(h.arrived(), vec![format!("DELETE {path}")]);
    let log = h.log.lock().expect("log").clone();
    assert_eq!(log.len(), 1);
    assert!(log[0].audit);
    assert_eq!(
        log[0].reason,
        format!("would deny: DELETE {path} not permitted by block github_repos")
    );
}

/// The raw cases over HTTP/2: one multiplexed connection carries concurrent streams, each
/// decided by itself; an `:authority` naming another host gets 421, a denied stream 403, and
/// only the allowed ones reach upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_are_checked_one_by_one() {
    if skip_unless_root() {
        return;
    }
    let h = Harness::start(&example_policy("github_repos.yaml"), GH, GH_BIN)
        .await
        .expect("harness");
    let tls = h.tls(GH, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let alpha_x = repo("alpha-repo", "/x");
    let cases = [
        ("GET", format!("https://{GH}/zen"), 200),
        (
            "DELETE",
            format!("https://{GH}{}", repo("bravo-repo", "")),
            403,
        ),
        ("DELETE", format!("https://evil.example{alpha_x}"), 421),
        ("DELETE", format!("https://{GH}:8443{alpha_x}"), 421),
        (
            "DELETE",
            format!("https://{GH}{}", repo("alpha-repo", "/..%3B/../bravo-repo")),
            403,
        ),
        ("DELETE", format!("https://{GH}{alpha_x}"), 200),
    ];
    let requests = cases.iter().map(|(method, uri, _)| {
        let mut sender = sender.clone();
        let req = hyper::Request::builder()
            .method(*method)
            .uri(uri.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        async move {
            let resp =
                tokio::time::timeout(std::time::Duration::from_secs(20), sender.send_request(req))
                    .await
                    .expect("answered within 20 s")
                    .expect("a response");
            resp.status().as_u16()
        }
    });
    let mut handles = Vec::new();
    for request in requests {
        handles.push(tokio::spawn(request));
    }
    let mut statuses = Vec::new();
    for handle in handles {
        statuses.push(handle.await.expect("join"));
    }
    let expected: Vec<u16> = cases.iter().map(|(_, _, s)| *s).collect();
    assert_eq!(statuses, expected);
    let mut arrived = h.arrived();
    arrived.sort();
    assert_eq!(
        arrived,
        vec![format!("DELETE {alpha_x}"), "GET /zen".to_owned()]
    );
    assert!(h.upstream.seen().iter().all(|s| s.version == "HTTP/2.0"));
}
