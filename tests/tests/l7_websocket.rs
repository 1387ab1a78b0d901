//! WebSocket through an inspected endpoint, end to end: a real WebSocket client
//! (tokio-tungstenite over rustls) talks to `inspect::serve`, which decides the upgrade as the
//! `GET` it is and, when allowed, relays it to a real WebSocket echo server (hyper +
//! tokio-tungstenite over TLS) in a network namespace. The server's own log shows which upgrade
//! requests arrived.

#![expect(
    clippy::expect_used,
    reason = "shared case runners fail the calling test loudly"
)]

mod l7_support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use l7_support::{Harness, skip_unless_root};
use openshell_tests::netns::TestNet;
use openshell_tests::upstream::TestCa;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};

const HOST: &str = "chat.example.com";
const BIN: &str = "/usr/bin/node";
const POLICY: &str = r#"
version: 1
network_policies:
  chat:
    name: chat
    endpoints:
      - host: chat.example.com
        port: 443
        protocol: rest
        rules:
          - allow: { method: GET, path: "/ws/**" }
    binaries:
      - { path: /usr/bin/node }
"#;

/// A WebSocket echo server over TLS (HTTP/1.1): `/ws/refuse` answers 200 instead of switching;
/// every other upgrade request gets 101 and each text or binary message is sent back prefixed
/// with `echo: `. It records `METHOD target` of every request.
struct EchoServer {
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    fn start(net: &TestNet, ca: &TestCa) -> anyhow::Result<(SocketAddr, Self)> {
        let addr = SocketAddr::from((net.ns_v4(), 443));
        let std_listener = net.run(|| std::net::TcpListener::bind(addr))??;
        std_listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let mut config = ca.server_config(&[HOST])?.as_ref().clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let log = Arc::clone(&log);
                        async move { Ok::<_, Infallible>(answer(req, &log)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok((addr, Self { seen, task }))
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("log").clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(mut req: Request<Incoming>, log: &Mutex<Vec<String>>) -> Response<Full<Bytes>> {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(String::new, |pq| pq.as_str().to_owned());
    log.lock()
        .expect("log")
        .push(format!("{} {target}", req.method()));
    let key = req.headers().get("sec-websocket-key").cloned();
    let (Some(key), false) = (key, target.starts_with("/ws/refuse")) else {
        return Response::new(Full::new(Bytes::from_static(b"no websocket here")));
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) => Message::text(format!("echo: {}", t.as_str())),
                Message::Binary(b) => Message::binary([b"echo: ".as_slice(), &b].concat()),
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("accept key"),
    );
    resp
}

async fn harness() -> Harness<EchoServer> {
    Harness::start_with(POLICY, HOST, BIN, |net, ca, _| EchoServer::start(net, ca))
        .await
        .expect("harness")
}

/// Opens a WebSocket to `path` through the inspector (TLS, ALPN http/1.1).
async fn open(
    h: &Harness<EchoServer>,
    path: &str,
) -> Result<
    WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    tungstenite::Error,
> {
    let tls = h.tls(HOST, &[b"http/1.1"]).await;
    let url = format!("wss://{HOST}{path}");
    let opened = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::client_async(url, tls),
    )
    .await
    .expect("the handshake finishes");
    opened.map(|(ws, _)| ws)
}

async fn next_message(
    ws: &mut WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
) -> Message {
    tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("a reply within 20 s")
        .expect("the stream stays open")
        .expect("a well-formed message")
}

/// An allowed path: the upgrade reaches the server and messages echo both ways through the
/// relayed stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_upgrade_relays_messages_both_ways() {
    if skip_unless_root() {
        return;
    }
    let h = harness().await;
    let mut ws = open(&h, "/ws/echo?room=1").await.expect("upgrade allowed");
    ws.send(Message::text("hello")).await.expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("echo: hello"));
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.expect("send");
    let Message::Binary(back) = next_message(&mut ws).await else {
        panic!("expected a binary reply");
    };
    assert_eq!(back.len(), big.len() + 6);
    assert!(back.starts_with(b"echo: ") && back[6..] == big[..]);
    ws.close(None).await.expect("close");
    assert_eq!(h.upstream.seen(), vec!["GET /ws/echo?room=1"]);
    let log = h.log.lock().expect("log").clone();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].method, "GET");
    assert_eq!(log[0].reason, "request allowed by block chat");
}

/// A path no rule allows: 403 with the JSON reason, and the server never sees the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_upgrade_gets_403_and_never_arrives() {
    if skip_unless_root() {
        return;
    }
    let h = harness().await;
    let err = open(&h, "/admin/socket").await.expect_err("denied");
    let tungstenite::Error::Http(resp) = err else {
        panic!("expected an HTTP refusal, got {err:?}");
    };
    assert_eq!(resp.status(), 403);
    let body: serde_json::Value =
        serde_json::from_slice(resp.body().as_deref().expect("a body")).expect("JSON");
    assert_eq!(body["error"], "policy_denied");
    assert_eq!(
        body["reason"],
        "GET /admin/socket not permitted by block chat"
    );
    assert_eq!(h.upstream.seen(), Vec::<String>::new());
}

/// The server answers 200 instead of 101: the client gets that answer and the connection is
/// closed, so the bytes pipelined behind the upgrade request (here a plain GET) never reach
/// the server as a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrade_passes_the_answer_and_closes() {
    if skip_unless_root() {
        return;
    }
    let h = harness().await;
    let err = open(&h, "/ws/refuse").await.expect_err("refused");
    let tungstenite::Error::Http(resp) = err else {
        panic!("expected an HTTP answer, got {err:?}");
    };
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.body().as_deref(),
        Some(b"no websocket here".as_slice())
    );

    let raw = format!(
        "GET /ws/refuse HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\
         GET /ws/after HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
    );
    let out = h.raw_tls(HOST, raw.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    assert_eq!(
        h.upstream.seen(),
        vec!["GET /ws/refuse", "GET /ws/refuse"],
        "the pipelined GET never arrived"
    );
}

/// Upgrades other than WebSocket, and a WebSocket upgrade on a method other than GET, are
/// refused whatever the rules say, and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_upgrades_are_refused() {
    if skip_unless_root() {
        return;
    }
    let h = harness().await;
    let cases = [
        ("GET", "h2c", "an upgrade to \\\"h2c\\\""),
        (
            "GET",
            "websocket, h2c",
            "an upgrade to \\\"websocket, h2c\\\"",
        ),
        ("POST", "websocket", "an upgrade to \\\"websocket\\\""),
    ];
    for (method, upgrade, what) in cases {
        let raw = format!(
            "{method} /ws/echo HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        let out = h.raw_tls(HOST, raw.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 403 "), "{upgrade}: {out}");
        assert!(
            out.contains(&format!("{what} inside an inspected endpoint")),
            "{out}"
        );
    }
    assert_eq!(h.upstream.seen(), Vec::<String>::new());
}

/// The chat block again, allowing `allowed` instead of `/ws/**`.
fn chat_policy_allowing(allowed: &str) -> String {
    POLICY.replace("/ws/**", allowed)
}

/// Waits (bounded) for the relayed stream to end: a close frame, an error or end of stream.
async fn relay_ends(
    ws: &mut WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
) {
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the relayed WebSocket stayed open");
}

/// A harness and a WebSocket to `/ws/echo` through it that has echoed one message.
async fn relaying() -> (
    Harness<EchoServer>,
    WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
) {
    let h = harness().await;
    let mut ws = open(&h, "/ws/echo").await.expect("upgrade allowed");
    ws.send(Message::text("one")).await.expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("echo: one"));
    (h, ws)
}

/// A new generation that still allows the upgrade's `GET` leaves the relay alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_still_allows_the_path_keeps_the_relay() {
    if skip_unless_root() {
        return;
    }
    let (h, mut ws) = relaying().await;
    h.set_policy(&chat_policy_allowing("/ws/echo"), 2);
    h.set_policy(&chat_policy_allowing("/ws/*"), 3);
    ws.send(Message::text("two"))
        .await
        .expect("send after the reloads");
    assert_eq!(next_message(&mut ws).await, Message::text("echo: two"));
    let log = h.log.lock().expect("log").clone();
    assert_eq!(log.len(), 1, "only the upgrade itself was decided: {log:?}");
}

/// A new generation that no longer allows the upgrade's `GET` closes the relayed stream, and
/// the closing is logged under that revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_no_longer_allows_the_path_closes_the_relay() {
    if skip_unless_root() {
        return;
    }
    let (h, mut ws) = relaying().await;
    h.set_policy(&chat_policy_allowing("/ws/other/**"), 2);
    relay_ends(&mut ws).await;
    let log = h.log.lock().expect("log").clone();
    let closed = log.last().expect("a record for the closing");
    assert_eq!(closed.revision, 2);
    assert_eq!(
        (closed.method.as_str(), closed.target.as_str()),
        ("GET", "/ws/echo")
    );
    assert!(
        closed
            .reason
            .starts_with("open upgraded stream closed: policy revision 2 no longer allows it: "),
        "{closed:?}"
    );
    // A new upgrade to the same path is now refused.
    assert!(open(&h, "/ws/echo").await.is_err());
}

/// Dropping the connection's task, as the proxy does when a new generation no longer allows
/// the connection itself, closes a relayed upgrade with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_connection_closes_the_relay() {
    if skip_unless_root() {
        return;
    }
    let (h, mut ws) = relaying().await;
    h.revoke_all();
    relay_ends(&mut ws).await;
}
