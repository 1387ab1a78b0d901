//! git smart-HTTP over HTTPS through an inspected endpoint, end to end: the real `git` client
//! (its `git-remote-https` helper, libcurl) clones and pushes through `inspect::serve` to a test
//! host playing api.github.com, which serves bare repositories with the real `git http-backend`
//! (CGI, behind a small hyper server with a certificate from the test CA). The seed's
//! `github_repos` block allows anything under `alpha-repo` but no POST under `bravo-repo`
//! except issues, so a push to bravo-repo (`POST .../git-receive-pack`) is refused with 403.
//! The CGI server's own log and the repositories on disk show what arrived.

#![expect(
    clippy::expect_used,
    reason = "shared case runners fail the calling test loudly"
)]

mod l7_support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use l7_support::{Harness, ORG, example_policy, skip_unless_root};
use openshell_tests::netns::TestNet;
use openshell_tests::upstream::TestCa;
use tokio::io::AsyncWriteExt as _;

const GH: &str = "api.github.com";
const GIT_BIN: &str = "/usr/bin/git";
/// Bound on every git command and CGI run.
const GIT_TIMEOUT: Duration = Duration::from_secs(60);

/// `git http-backend` behind hyper (HTTP/1.1 over TLS), serving `root`; records
/// `METHOD target` of every request.
struct GitServer {
    root: PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl GitServer {
    fn start(net: &TestNet, ca: &TestCa, dir: &Path) -> anyhow::Result<(SocketAddr, Self)> {
        let root = dir.join("srv");
        seed_repositories(&root, &dir.join("seed"))?;
        let addr = SocketAddr::from((net.ns_v4(), 443));
        let std_listener = net.run(|| std::net::TcpListener::bind(addr))??;
        std_listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let mut config = ca.server_config(&[GH])?.as_ref().clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, served) = (Arc::clone(&seen), Arc::new(root.clone()));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, log, served) =
                    (acceptor.clone(), Arc::clone(&log), Arc::clone(&served));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (log, served) = (Arc::clone(&log), Arc::clone(&served));
                        async move { Ok::<_, Infallible>(cgi(req, &served, &log).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok((addr, Self { root, seen, task }))
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("log").clone()
    }

    fn clear(&self) {
        self.seen.lock().expect("log").clear();
    }

    /// The commit `main` points at in the served repository `name`.
    fn head(&self, name: &str) -> String {
        let repo = self.root.join("repos").join(ORG).join(name);
        git_sync(&repo, &["--git-dir", ".", "rev-parse", "main"])
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bare `alpha-repo` and `bravo-repo` under `root/repos/acme/`, each with one commit on `main`.
fn seed_repositories(root: &Path, seed: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(seed)?;
    git_sync(seed, &["init", "-q", "-b", "main"]);
    std::fs::write(seed.join("README"), "hello\n")?;
    git_sync(seed, &["add", "README"]);
    git_sync(seed, &["commit", "-q", "-m", "first"]);
    for name in ["alpha-repo", "bravo-repo"] {
        let bare = root.join("repos").join(ORG).join(name);
        std::fs::create_dir_all(&bare)?;
        git_sync(&bare, &["init", "-q", "--bare", "-b", "main"]);
        let bare_s = bare.to_str().context("utf-8 path")?;
        git_sync(seed, &["push", "-q", bare_s, "main"]);
    }
    Ok(())
}

/// git with no user or system configuration, bounded in time.
fn git_command(cwd: &Path) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(GIT_TIMEOUT.as_secs().to_string())
        .arg("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .current_dir(cwd)
        .env("HOME", cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null());
    cmd
}

fn git_sync(cwd: &Path, args: &[&str]) -> String {
    let out = git_command(cwd).args(args).output().expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        cwd.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One request through `git http-backend` (RFC 3875 CGI).
async fn cgi(
    req: Request<Incoming>,
    root: &Path,
    log: &Mutex<Vec<String>>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(String::new, |pq| pq.as_str().to_owned());
    log.lock()
        .expect("log")
        .push(format!("{} {target}", parts.method));
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", root)
        // A named user enables receive-pack (push) in http-backend.
        .env("REMOTE_USER", "tester")
        .env("REMOTE_ADDR", "198.18.0.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let failed = |why: String| {
        let mut resp = Response::new(Full::new(Bytes::from(why)));
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        resp
    };
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format!("spawning git http-backend: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        tokio::spawn(async move {
            let _ = stdin.write_all(&body).await;
        });
    }
    let out = match tokio::time::timeout(GIT_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => out.stdout,
        Ok(Err(e)) => return failed(format!("running git http-backend: {e}")),
        Err(_) => return failed("git http-backend timed out".to_owned()),
    };
    cgi_response(&out).unwrap_or_else(|| failed("malformed CGI output".to_owned()))
}

/// CGI output (header lines, an empty line, the body) as an HTTP response.
fn cgi_response(out: &[u8]) -> Option<Response<Full<Bytes>>> {
    let (head, body) = [&b"\r\n\r\n"[..], b"\n\n"].iter().find_map(|sep| {
        let at = out.windows(sep.len()).position(|w| w == *sep)?;
        Some((&out[..at], &out[at + sep.len()..]))
    })?;
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body)));
    for line in String::from_utf8_lossy(head).lines() {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next()?.parse().ok()?;
            *resp.status_mut() = StatusCode::from_u16(code).ok()?;
        } else {
            resp.headers_mut().append(
                HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                HeaderValue::from_str(value).ok()?,
            );
        }
    }
    Some(resp)
}

/// git on the client side: reaches api.github.com:443 at the inspector (libcurl resolve
/// override) and trusts the sandbox CA through `GIT_SSL_CAINFO`, as a sandboxed git does.
fn client_git(h: &Harness<GitServer>, cwd: &Path, version: &str) -> Command {
    let mut cmd = git_command(cwd);
    cmd.env("GIT_SSL_CAINFO", &h.ca_file)
        .arg("-c")
        .arg(format!("http.curloptResolve={GH}:443:{}", h.addr.ip()))
        .arg("-c")
        .arg(format!("http.version={version}"));
    cmd
}

fn url(name: &str) -> String {
    format!("https://{GH}/repos/{ORG}/{name}")
}

async fn output(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("git runs")
}

async fn clone_push_and_refused_push(version: &str) {
    let policy = example_policy("github_repos.yaml").replace(
        "      - { path: /usr/bin/gh }",
        "      - { path: /usr/bin/gh }\n      - { path: /usr/bin/git }",
    );
    assert!(policy.contains(GIT_BIN));
    let h = Harness::start_with(&policy, GH, GIT_BIN, GitServer::start)
        .await
        .expect("harness");
    let work = h.dir.join("client");
    std::fs::create_dir_all(&work).expect("client dir");

    // Clone: GET info/refs and POST git-upload-pack, both allowed under alpha-repo.
    let out = output({
        let mut c = client_git(&h, &work, version);
        c.env("GIT_TRACE_CURL", "1")
            .env("GIT_TRACE_CURL_NO_DATA", "1")
            .args(["clone", "-q", &url("alpha-repo"), "alpha"]);
        c
    })
    .await;
    let alpn = if version == "HTTP/2" {
        "h2"
    } else {
        "http/1.1"
    };
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("ALPN: server accepted {alpn}")),
        "git speaks {alpn} to the inspector: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "clone over {version}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alpha = work.join("alpha");
    assert_eq!(
        std::fs::read_to_string(alpha.join("README")).expect("README"),
        "hello\n"
    );
    // Protocol v2: the advertisement, then one POST per command (ls-refs, fetch).
    let seen = h.upstream.seen();
    assert_eq!(
        seen.first().map(String::as_str),
        Some(format!("GET /repos/{ORG}/alpha-repo/info/refs?service=git-upload-pack").as_str())
    );
    assert!(seen.len() >= 2, "{seen:?}");
    let upload = format!("POST /repos/{ORG}/alpha-repo/git-upload-pack");
    assert!(seen[1..].iter().all(|s| *s == upload), "{seen:?}");

    // A push to alpha-repo is allowed (any method under alpha-repo) and lands.
    std::fs::write(alpha.join("change"), "1\n").expect("write");
    git_sync(&alpha, &["add", "change"]);
    git_sync(&alpha, &["commit", "-q", "-m", "change"]);
    let new_head = git_sync(&alpha, &["rev-parse", "HEAD"]);
    let out = output({
        let mut c = client_git(&h, &alpha, version);
        c.args(["push", "-q", "origin", "HEAD:main"]);
        c
    })
    .await;
    assert!(
        out.status.success(),
        "push to alpha over {version}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(h.upstream.head("alpha-repo"), new_head);

    // A push to bravo-repo: the ref advertisement (GET) is allowed, the pack upload (POST
    // git-receive-pack) is denied with 403 and never reaches the server.
    let bravo_before = h.upstream.head("bravo-repo");
    h.upstream.clear();
    let out = output({
        let mut c = client_git(&h, &alpha, version);
        c.args(["push", "-q", &url("bravo-repo"), "HEAD:main"]);
        c
    })
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "push to bravo must fail over {version}"
    );
    assert!(stderr.contains("403"), "{stderr}");
    assert_eq!(
        h.upstream.seen(),
        vec![format!(
            "GET /repos/{ORG}/bravo-repo/info/refs?service=git-receive-pack"
        )],
        "the denied POST never arrived"
    );
    assert_eq!(h.upstream.head("bravo-repo"), bravo_before);
    let log = h.log.lock().expect("log").clone();
    let denied: Vec<_> = log
        .iter()
        .filter(|r| r.decision == openshell::policy::Verdict::Deny)
        .map(|r| (r.method.as_str(), r.reason.as_str()))
        .collect();
    let reason = format!(
        "POST /repos/{ORG}/bravo-repo/git-receive-pack not permitted by block github_repos"
    );
    assert_eq!(denied, vec![("POST", reason.as_str())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_and_push_http1() {
    if skip_unless_root() {
        return;
    }
    clone_push_and_refused_push("HTTP/1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_and_push_h2() {
    if skip_unless_root() {
        return;
    }
    clone_push_and_refused_push("HTTP/2").await;
}
