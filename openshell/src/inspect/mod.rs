//! L7 inspection of `protocol: rest` endpoints: the L4 proxy hands over an allowed connection
//! with [`serve`], and every HTTP request on it is decided on its own before it may reach the
//! upstream.
//!
//! - The first bytes are peeked. A TLS ClientHello is terminated with a leaf for the
//!   connection's destination name, signed by the sandbox CA ([`crate::tls`]); anything else is
//!   read as plain HTTP. A ClientHello that cannot be parsed or a failed handshake closes the
//!   connection: nothing is ever passed through uninspected (except `tls: skip`, where the
//!   policy asks for exactly that).
//! - ALPN picks HTTP/2 or HTTP/1.1 (hyper's server connection builders); plain connections that
//!   start with the HTTP/2 preface are served as h2 (prior knowledge).
//! - Each request is decided by the policy generation current when it arrives
//!   ([`PolicySource::current`]); the upstream receives exactly the canonical target that was
//!   checked. Denied: 403 `application/json`, the connection stays usable.
//! - TLS SNI, `Host` and `:authority` must name the connection's destination, else 421.
//!   Ambiguous HTTP/1 framing gets 400 and the connection is closed.
//! - The upstream is dialed only at the addresses the L4 proxy validated (never the name's or
//!   the client's choice), over TLS when the client side was TLS. An HTTP/1.1 client connection
//!   gets one kept-alive HTTP/1.1 upstream connection of its own; an h2 one a pooled client that
//!   speaks h2 upstream when the upstream offers it.
//!
//! - A WebSocket upgrade (HTTP/1.1 `GET` with `Upgrade: websocket`) is decided as that `GET`.
//!   Allowed, it goes upstream on an HTTP/1.1 connection of its own; after the upstream's `101`
//!   both streams are relayed byte for byte until either side closes, or until a new generation
//!   ([`PolicySource::updates`]) no longer allows that `GET`. Any other answer is passed on and
//!   the connection closes.
//! - Everything a connection needs (hyper's h2 streams, the upstream connections, an upgraded
//!   relay) runs in the connection's own task (module `exec`): fewer wake-ups between threads, and
//!   dropping that task (the proxy does when a generation no longer allows the connection)
//!   closes all of it.
//!
//! Limits: CONNECT, h2c and any other upgrade inside an inspected endpoint are denied with 403
//! and the connection closed; the policy has no rule form that names them (a rule's `path` cannot
//! match CONNECT's authority-form target). WebSocket over HTTP/2 (extended CONNECT, RFC 8441) is
//! not offered: the h2 server does not advertise it, so clients fall back to HTTP/1.1.

mod exec;
mod framing;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use hyper::rt::Executor as _;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::policy::{CompiledPolicy, ConnectionQuery, Decision, HttpRequestQuery, Reason, Verdict};
use crate::tls::{SandboxCa, TlsError};

/// How long the client has to send its first bytes and finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type Body = BoxBody<Bytes, hyper::Error>;

/// A policy generation: the compiled policy and the revision it came from.
#[derive(Clone, Debug)]
pub struct Generation {
    pub policy: Arc<CompiledPolicy>,
    pub revision: i64,
}

/// Yields the generation in force; asked once per request.
pub trait PolicySource: Send + Sync {
    fn current(&self) -> Generation;

    /// The generations that come into force after this call, in order; it ends when no newer
    /// one can come. A relayed WebSocket is judged again by each.
    fn updates(&self) -> BoxStream<'static, Generation> {
        futures_util::stream::pending().boxed()
    }
}

/// The values `changes` takes after this call, as generations (for [`PolicySource::updates`]);
/// the stream ends when the channel's sender is dropped.
pub fn generations_from<T: Send + Sync + 'static>(
    changes: tokio::sync::watch::Receiver<T>,
    to_generation: fn(&T) -> Generation,
) -> BoxStream<'static, Generation> {
    futures_util::stream::unfold(changes, move |mut changes| async move {
        changes.changed().await.ok()?;
        let generation = to_generation(&changes.borrow_and_update());
        Some((generation, changes))
    })
    .boxed()
}

/// A fixed generation (tests, or a sandbox whose policy never changes).
impl PolicySource for Generation {
    fn current(&self) -> Generation {
        self.clone()
    }
}

/// One request decision, for the decision log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub sandbox: Arc<str>,
    pub binary: PathBuf,
    pub pid: u32,
    pub host: Arc<str>,
    pub port: u16,
    pub method: String,
    /// The target as the client sent it.
    pub target: String,
    pub decision: Verdict,
    /// Allowed only because the endpoint is in audit mode: the request "would be denied".
    pub audit: bool,
    pub block: Option<Arc<str>>,
    pub reason: String,
    pub revision: i64,
}

/// Where request decisions go.
pub trait RequestLog: Send + Sync {
    fn record(&self, record: RequestRecord);
}

/// Keeps every record in memory (tests, diagnostics).
impl RequestLog for Mutex<Vec<RequestRecord>> {
    fn record(&self, record: RequestRecord) {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(record);
    }
}

/// Everything [`serve`] needs about one allowed connection.
pub struct InspectContext {
    pub sandbox: Arc<str>,
    /// The destination name the connection was tied to (policy DNS), or the IP literal.
    pub host: Arc<str>,
    pub port: u16,
    /// Addresses the L4 proxy resolved and validated; the only ones ever dialed.
    pub upstream: Vec<SocketAddr>,
    pub binary: PathBuf,
    pub ancestors: Vec<PathBuf>,
    pub pid: u32,
    /// `false` for `tls: skip`: a TLS stream is relayed without inspection.
    pub terminate_tls: bool,
    pub ca: Arc<SandboxCa>,
    pub upstream_tls: Arc<rustls::ClientConfig>,
    pub policy: Arc<dyn PolicySource>,
    pub log: Arc<dyn RequestLog>,
}

impl InspectContext {
    fn decide(&self, generation: &Generation, method: &str, target: &str) -> Decision {
        let upstream_ip = self.upstream.first().map(SocketAddr::ip);
        let q = ConnectionQuery {
            host: &self.host,
            port: self.port,
            binary: &self.binary,
            ancestors: &self.ancestors,
            dest_ip: upstream_ip,
        };
        generation
            .policy
            .decide_request(&q, &HttpRequestQuery { method, target })
    }

    #[expect(clippy::too_many_arguments, reason = "one flat log record")]
    fn log_request(
        &self,
        generation: &Generation,
        method: &str,
        target: &str,
        decision: Verdict,
        audit: bool,
        block: Option<Arc<str>>,
        reason: &str,
    ) {
        self.log.record(RequestRecord {
            sandbox: Arc::clone(&self.sandbox),
            binary: self.binary.clone(),
            pid: self.pid,
            host: Arc::clone(&self.host),
            port: self.port,
            method: method.to_owned(),
            target: target.to_owned(),
            decision,
            audit,
            block,
            reason: if audit {
                format!("would deny: {reason}")
            } else {
                reason.to_owned()
            },
            revision: generation.revision,
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("reading the first bytes from the client: {0}")]
    Peek(std::io::Error),
    #[error("the client sent no bytes within {0:?}")]
    PeekTimeout(Duration),
    #[error("the TLS ClientHello could not be read: {0}")]
    ClientHello(std::io::Error),
    #[error("the TLS handshake with the client failed: {0}")]
    Handshake(std::io::Error),
    #[error("the TLS handshake with the client did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("destination name {0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("serving HTTP on the inspected connection: {0}")]
    Http(hyper::Error),
    #[error("relaying the uninspected (tls: skip) stream: {0}")]
    Relay(std::io::Error),
}

/// Inspects one connection until the client or the upstream closes it.
pub async fn serve(client: TcpStream, ctx: InspectContext) -> Result<(), InspectError> {
    let _ = client.set_nodelay(true);
    let mut first = [0u8; H2_PREFACE.len()];
    let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, client.peek(&mut first))
        .await
        .map_err(|_| InspectError::PeekTimeout(HANDSHAKE_TIMEOUT))?
        .map_err(InspectError::Peek)?;
    if n == 0 {
        return Ok(());
    }
    let is_tls = first[0] == 0x16;
    if is_tls && !ctx.terminate_tls {
        return relay_uninspected(client, &ctx).await;
    }
    let server_name = ServerName::try_from(ctx.host.to_string())
        .map_err(|_| InspectError::ServerName(ctx.host.to_string()))?;
    if !is_tls {
        let h2 = first[..n] == H2_PREFACE[..n] && n > 3;
        let (exec, tasks) = exec::channel();
        let conn = Conn::new(ctx, None, false, h2, server_name, exec);
        return serve_http(TokioIo::new(client), h2, conn, tasks).await;
    }
    let acceptor =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client);
    let start = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor)
        .await
        .map_err(|_| InspectError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
        .map_err(InspectError::ClientHello)?;
    let sni = start
        .client_hello()
        .server_name()
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
    let config = ctx.ca.server_config(&ctx.host)?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config))
        .await
        .map_err(|_| InspectError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
        .map_err(InspectError::Handshake)?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let (exec, tasks) = exec::channel();
    let conn = Conn::new(ctx, sni, true, h2, server_name, exec);
    serve_http(TokioIo::new(tls), h2, conn, tasks).await
}

async fn relay_uninspected(
    mut client: TcpStream,
    ctx: &InspectContext,
) -> Result<(), InspectError> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no validated address");
    for addr in &ctx.upstream {
        match TcpStream::connect(addr).await {
            Ok(mut up) => {
                tokio::io::copy_bidirectional(&mut client, &mut up)
                    .await
                    .map_err(InspectError::Relay)?;
                return Ok(());
            }
            Err(e) => last = e,
        }
    }
    Err(InspectError::Relay(last))
}

async fn serve_http<I>(
    io: TokioIo<I>,
    h2: bool,
    mut conn: Conn,
    tasks: exec::Tasks,
) -> Result<(), InspectError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let served = if h2 {
        let exec = conn.exec.clone();
        let conn = Arc::new(conn);
        let svc = hyper::service::service_fn(move |req| {
            let conn = Arc::clone(&conn);
            async move { Ok::<_, Infallible>(conn.handle(req).await) }
        });
        let serving = hyper::server::conn::http2::Builder::new(exec).serve_connection(io, svc);
        exec::drive(serving, tasks).await
    } else {
        let verdicts = framing::Verdicts::default();
        conn.framing = Some(Arc::clone(&verdicts));
        let io = TokioIo::new(framing::Guard::new(io.into_inner(), verdicts));
        let conn = Arc::new(conn);
        let svc = hyper::service::service_fn(move |req| {
            let conn = Arc::clone(&conn);
            async move { Ok::<_, Infallible>(conn.handle(req).await) }
        });
        let serving = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades();
        exec::drive(serving, tasks).await
    };
    served.map_err(InspectError::Http)
}

/// Per-connection state shared by its requests.
struct Conn {
    ctx: Arc<InspectContext>,
    /// The SNI the client sent, when it differs from the destination name.
    sni_mismatch: Option<String>,
    scheme: &'static str,
    /// h2 clients: a pooled client (h2 upstream when offered, else a pool of HTTP/1.1
    /// connections for the concurrent streams).
    client: Client<upstream::Connector, Incoming>,
    /// HTTP/1.1 clients send one request at a time: one upstream HTTP/1.1 connection, opened on
    /// first use and again when it closes (no pool, no task per request).
    h1_upstream: Option<tokio::sync::Mutex<Option<http1::SendRequest<Incoming>>>>,
    connector: upstream::Connector,
    /// Runs the upstream connections (and hyper's h2 streams) inside this connection's task.
    exec: exec::ConnExec,
    /// HTTP/1.1-only twin of `connector`, made on the first upgrade.
    upgrade_connector: OnceLock<upstream::Connector>,
    /// HTTP/1: the framing guard's verdict and the index of the next request to serve.
    framing: Option<framing::Verdicts>,
    next_request: AtomicU64,
}

impl Conn {
    fn new(
        ctx: InspectContext,
        sni: Option<String>,
        tls: bool,
        h2: bool,
        server_name: ServerName<'static>,
        exec: exec::ConnExec,
    ) -> Self {
        let sni_mismatch = sni.filter(|s| *s != *ctx.host);
        let connector = upstream::Connector::new(
            ctx.upstream.clone().into(),
            tls.then(|| (Arc::clone(&ctx.upstream_tls), server_name)),
        );
        // An HTTP/1.1 client sends one request at a time, so one kept-alive HTTP/1.1 upstream
        // connection serves it, and costs less per request than an h2 stream. h2 clients
        // multiplex, and get h2 upstream when the upstream offers it.
        let connector = if h2 {
            connector
        } else {
            connector.http1_only()
        };
        let client = Client::builder(exec.clone()).build(connector.clone());
        Self {
            ctx: Arc::new(ctx),
            sni_mismatch,
            scheme: if tls { "https" } else { "http" },
            client,
            h1_upstream: (!h2).then(|| tokio::sync::Mutex::new(None)),
            connector,
            exec,
            upgrade_connector: OnceLock::new(),
            framing: None,
            next_request: AtomicU64::new(0),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let index = self.next_request.fetch_add(1, Ordering::Relaxed);
        if let Some(verdicts) = &self.framing {
            let verdict = *verdicts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, why)) = verdict.filter(|(first, _)| *first <= index) {
                return error_response(StatusCode::BAD_REQUEST, "bad_request", why, true);
            }
        }
        if req.version() != Version::HTTP_2
            && let Some(problem) = framing_problem(req.headers())
        {
            return error_response(StatusCode::BAD_REQUEST, "bad_request", problem, true);
        }
        if let Some(sni) = &self.sni_mismatch {
            let resp = self.misdirected(format!("TLS SNI {sni:?}"));
            return after_request_body(req, resp).await;
        }
        if let Err(what) = self.authority_problem(&req) {
            let resp = self.misdirected(what);
            return after_request_body(req, resp).await;
        }
        let target = match req.uri().scheme() {
            Some(_) => req.uri().to_string(),
            None => req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().to_string(), |pq| pq.as_str().to_owned()),
        };
        let method = req.method().as_str().to_owned();
        let tunnel = Tunnel::of(&req);
        // An upgraded stream is judged again by every later generation; subscribe before this
        // one is read so that none is missed in between.
        let updates = matches!(tunnel, Ok(Some(_))).then(|| self.ctx.policy.updates());
        let generation = self.ctx.policy.current();
        let tunnel = match tunnel {
            Ok(tunnel) => tunnel,
            Err(what) => {
                // Whatever follows such a request on the connection is not known to be HTTP,
                // so the connection closes after the 403.
                let reason = format!("{what} inside an inspected endpoint is not permitted");
                self.ctx.log_request(
                    &generation,
                    &method,
                    &target,
                    Verdict::Deny,
                    false,
                    None,
                    &reason,
                );
                let resp = self.forbidden(None, reason, req.version() != Version::HTTP_2);
                return after_request_body(req, resp).await;
            }
        };
        let decision = self.ctx.decide(&generation, &method, &target);
        let reason = reason_text(&decision.reason);
        self.ctx.log_request(
            &generation,
            &method,
            &target,
            decision.verdict,
            decision.audit,
            decision.block.clone(),
            &reason,
        );
        if !decision.is_allowed() {
            let resp = self.forbidden(decision.block.as_deref(), reason, tunnel.is_some());
            return after_request_body(req, resp).await;
        }
        match (tunnel, updates) {
            (Some(protocol), Some(updates)) => {
                // The target as sent is kept: the upgrade is judged again by later generations.
                let path = decision.canonical_target.unwrap_or_else(|| target.clone());
                let upgrade = Upgrade {
                    protocol,
                    target,
                    updates,
                };
                self.forward_upgrade(req, &path, upgrade).await
            }
            _ => {
                let path = decision.canonical_target.unwrap_or(target);
                self.forward(req, &path).await
            }
        }
    }

    /// `Host` (HTTP/1) or `:authority` (HTTP/2, or an absolute-form target) must name the
    /// destination.
    fn authority_problem(&self, req: &Request<Incoming>) -> Result<(), String> {
        let mut claims: Vec<String> = Vec::new();
        if let Some(a) = req.uri().authority() {
            claims.push(a.as_str().to_owned());
        }
        let hosts = req.headers().get_all(header::HOST);
        let mut n_hosts = 0;
        for h in hosts {
            n_hosts += 1;
            match h.to_str() {
                Ok(s) => claims.push(s.to_owned()),
                Err(_) => return Err("a Host header that is not text".to_owned()),
            }
        }
        if n_hosts > 1 {
            return Err("more than one Host header".to_owned());
        }
        if claims.is_empty() {
            return Err("no Host header".to_owned());
        }
        for claim in claims {
            if !self.names_destination(&claim) {
                return Err(format!("authority {claim:?}"));
            }
        }
        Ok(())
    }

    fn names_destination(&self, authority: &str) -> bool {
        let Ok(parsed) = authority.parse::<http::uri::Authority>() else {
            return false;
        };
        let host = parsed.host().trim_start_matches('[').trim_end_matches(']');
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let port_ok = parsed.port_u16().is_none_or(|p| p == self.ctx.port);
        host == *self.ctx.host && port_ok
    }

    fn forbidden(&self, block: Option<&str>, reason: String, close: bool) -> Response<Body> {
        let body = DeniedBody {
            error: "policy_denied",
            block,
            reason: &reason,
            host: &self.ctx.host,
            binary: &self.ctx.binary.to_string_lossy(),
        };
        json_response(StatusCode::FORBIDDEN, &body, close)
    }

    fn misdirected(&self, what: String) -> Response<Body> {
        let reason = format!(
            "{what} does not match the connection's destination {}",
            self.ctx.host
        );
        error_response(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_request",
            &reason,
            false,
        )
    }

    /// The request as the upstream gets it: the canonical target, `Host` / `:authority` naming
    /// the destination, hop-by-hop headers removed.
    fn upstream_parts(
        &self,
        mut parts: http::request::Parts,
        path: &str,
        origin_form: bool,
    ) -> Result<http::request::Parts, Box<Response<Body>>> {
        let authority = if self.ctx.port == default_port(self.scheme) {
            self.ctx.host.to_string()
        } else {
            format!("{}:{}", self.ctx.host, self.ctx.port)
        };
        let uri = if origin_form {
            path.parse::<Uri>()
        } else {
            format!("{}://{authority}{path}", self.scheme).parse::<Uri>()
        };
        parts.uri = uri.map_err(|e| {
            Box::new(error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("the canonical target cannot be sent: {e}"),
                false,
            ))
        })?;
        strip_hop_by_hop(&mut parts.headers);
        if origin_form {
            let host = HeaderValue::from_str(&authority).map_err(|e| {
                Box::new(error_response(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    &format!("the destination {authority} is not a valid Host header: {e}"),
                    false,
                ))
            })?;
            parts.headers.insert(header::HOST, host);
        } else {
            // The pooled client sets Host / :authority from the URI.
            parts.headers.remove(header::HOST);
        }
        // The version follows the upstream connection.
        parts.version = Version::HTTP_11;
        Ok(parts)
    }

    async fn forward(&self, req: Request<Incoming>, path: &str) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let parts = match self.upstream_parts(parts, path, self.h1_upstream.is_some()) {
            Ok(parts) => parts,
            Err(resp) => return *resp,
        };
        let req = Request::from_parts(parts, body);
        let sent = match &self.h1_upstream {
            Some(slot) => self.send_h1(slot, req).await,
            None => self.client.request(req).await.map_err(|e| e.to_string()),
        };
        match sent {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => self.unreachable(&e, false),
        }
    }

    /// Sends on the connection's own upstream HTTP/1.1 connection, (re)opening it when there is
    /// none or the upstream closed it. The previous response's body has been relayed in full
    /// before the client could send this request, so waiting for readiness does not stall.
    async fn send_h1(
        &self,
        slot: &tokio::sync::Mutex<Option<http1::SendRequest<Incoming>>>,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, String> {
        let mut slot = slot.lock().await;
        let reusable = match slot.as_mut() {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            *slot = None;
            let io = self
                .connector
                .clone()
                .dial()
                .await
                .map_err(|e| e.to_string())?;
            let (mut sender, connection) = http1::handshake(io).await.map_err(|e| e.to_string())?;
            self.exec.execute(async move {
                // Ends when the upstream or this side closes the connection.
                let _ = connection.await;
            });
            sender.ready().await.map_err(|e| e.to_string())?;
            *slot = Some(sender);
        }
        let Some(sender) = slot.as_mut() else {
            return Err("no upstream connection".to_owned());
        };
        sender.send_request(req).await.map_err(|e| e.to_string())
    }

    /// An allowed upgrade (WebSocket) goes upstream on an HTTP/1.1 connection of its own. On
    /// `101 Switching Protocols` both upgraded streams are relayed, in this connection's task,
    /// until either side closes or a new generation no longer allows the upgrade's `GET`; any
    /// other answer is passed on and the client connection closes after it.
    async fn forward_upgrade(
        &self,
        mut req: Request<Incoming>,
        path: &str,
        upgrade: Upgrade,
    ) -> Response<Body> {
        let protocol = upgrade.protocol.clone();
        let client_side = hyper::upgrade::on(&mut req);
        let (parts, body) = req.into_parts();
        let mut parts = match self.upstream_parts(parts, path, true) {
            Ok(parts) => parts,
            Err(resp) => return *resp,
        };
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
        let connector = self
            .upgrade_connector
            .get_or_init(|| self.connector.http1_only())
            .clone();
        let io = match connector.dial().await {
            Ok(io) => io,
            Err(e) => return self.unreachable(&e, true),
        };
        let (mut sender, connection) = match hyper::client::conn::http1::handshake(io).await {
            Ok(pair) => pair,
            Err(e) => return self.unreachable(&e, true),
        };
        self.exec.linger(async move {
            // Ends when the upgrade hands the stream over, or the upstream closes.
            let _ = connection.with_upgrades().await;
        });
        let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp,
            Err(e) => return self.unreachable(&e, true),
        };
        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && resp
                .headers()
                .get(header::UPGRADE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(protocol.as_bytes()));
        if !switched {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "the upstream switched to a protocol the client did not ask for",
                    true,
                );
            }
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Response::from_parts(parts, body.boxed());
        }
        let upstream_side = hyper::upgrade::on(&mut resp);
        let ctx = Arc::clone(&self.ctx);
        self.exec.linger(async move {
            let (Ok(client), Ok(upstream)) = tokio::join!(client_side, upstream_side) else {
                return;
            };
            relay_upgraded(ctx, upgrade, TokioIo::new(client), TokioIo::new(upstream)).await;
        });
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
        Response::from_parts(parts, body.boxed())
    }

    fn unreachable(&self, error: &dyn std::fmt::Display, close: bool) -> Response<Body> {
        error_response(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            &format!(
                "the upstream {} could not be reached: {error}",
                self.ctx.host
            ),
            close,
        )
    }
}

/// An allowed upgrade request: the protocol asked for, the target as the client sent it (as
/// it was decided and logged) and the generations that come into force after the decision.
struct Upgrade {
    protocol: HeaderValue,
    target: String,
    updates: BoxStream<'static, Generation>,
}

/// Relays an upgraded stream (WebSocket) until either side closes it, or until a generation
/// comes into force that no longer allows its `GET`: then both streams are dropped (closed)
/// and the closing is logged as a denial under that revision.
async fn relay_upgraded<C, U>(
    ctx: Arc<InspectContext>,
    upgrade: Upgrade,
    mut client: C,
    mut upstream: U,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Upgrade {
        target,
        mut updates,
        ..
    } = upgrade;
    let relay = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    let mut relay = std::pin::pin!(relay);
    loop {
        tokio::select! {
            _ = &mut relay => return,
            next = updates.next() => {
                let Some(generation) = next else {
                    // No generation can come any more: relay until a side closes.
                    let _ = relay.await;
                    return;
                };
                let decision = ctx.decide(&generation, "GET", &target);
                if decision.is_allowed() {
                    continue;
                }
                let reason = format!(
                    "open upgraded stream closed: policy revision {} no longer allows it: {}",
                    generation.revision,
                    reason_text(&decision.reason)
                );
                ctx.log_request(
                    &generation,
                    "GET",
                    &target,
                    Verdict::Deny,
                    false,
                    decision.block.clone(),
                    &reason,
                );
                return;
            }
        }
    }
}

/// A request that asks to turn the connection into something other than HTTP.
struct Tunnel;

impl Tunnel {
    /// `Ok(None)`: a plain request. `Ok(Some(protocol))`: an HTTP/1.1 `GET` asking for a
    /// WebSocket upgrade, which is decided as that `GET`. `Err(what)`: CONNECT, an h2c upgrade or
    /// any other upgrade, which no rule can allow.
    fn of<B>(req: &Request<B>) -> Result<Option<HeaderValue>, String> {
        if req.method() == Method::CONNECT {
            return Err("CONNECT".to_owned());
        }
        let Some(up) = req.headers().get(header::UPGRADE) else {
            return Ok(None);
        };
        let websocket = up.as_bytes().eq_ignore_ascii_case(b"websocket");
        let connection_upgrade = req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        if websocket
            && connection_upgrade
            && req.method() == Method::GET
            && req.version() == Version::HTTP_11
            && req.headers().get_all(header::UPGRADE).iter().count() == 1
        {
            return Ok(Some(up.clone()));
        }
        let shown = String::from_utf8_lossy(up.as_bytes());
        Err(format!("an upgrade to {shown:?}"))
    }
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

/// The 403 body.
#[derive(Serialize)]
struct DeniedBody<'a> {
    error: &'static str,
    block: Option<&'a str>,
    reason: &'a str,
    host: &'a str,
    binary: &'a str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'static str,
    reason: &'a str,
}

/// The sentence shown in the 403 body: `METHOD PATH not permitted by block NAME` for requests
/// no rule allows.
fn reason_text(reason: &Reason) -> String {
    match reason {
        Reason::RequestNotPermitted {
            block,
            method,
            path,
        } => format!("{method} {path} not permitted by block {block}"),
        Reason::DeniedByRule {
            block,
            method,
            path,
        } => format!("{method} {path} denied by a deny rule of block {block}"),
        other => other.to_string(),
    }
}

/// HTTP/1 framing that two parsers could read differently (request smuggling). hyper itself
/// rejects obs-fold, non-numeric and conflicting Content-Length values; these are the cases it
/// lets through.
fn framing_problem(headers: &HeaderMap) -> Option<&'static str> {
    let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if lengths > 1 {
        return Some("more than one Content-Length header");
    }
    if lengths == 1 && headers.contains_key(header::TRANSFER_ENCODING) {
        return Some("Content-Length together with Transfer-Encoding");
    }
    None
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

/// Most of a refused HTTP/2 request's body that is read before the refusal is sent.
const REFUSED_BODY_DRAIN: usize = 1 << 20;
/// Longest wait for that body.
const REFUSED_BODY_WAIT: Duration = Duration::from_secs(1);

/// `resp`, a refusal of `req`, once `req`'s body has been read and dropped (up to
/// [`REFUSED_BODY_DRAIN`] bytes or [`REFUSED_BODY_WAIT`]). Over HTTP/2, dropping an unread body
/// resets the stream, and that reset can reach a client still uploading (git push) before the
/// refusal does, so it sees a stream error instead of the 403. Nothing read is forwarded.
/// HTTP/1 needs no such care: hyper reads the rest of the body or closes the connection.
async fn after_request_body(req: Request<Incoming>, resp: Response<Body>) -> Response<Body> {
    if req.version() != Version::HTTP_2 || req.body().is_end_stream() {
        return resp;
    }
    let mut body = req.into_body();
    let drain = async {
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read = read.saturating_add(frame.data_ref().map_or(0, Bytes::len));
            if read >= REFUSED_BODY_DRAIN {
                break;
            }
        }
    };
    // A body that is too large or too slow is dropped and the stream reset after all.
    let _ = tokio::time::timeout(REFUSED_BODY_WAIT, drain).await;
    resp
}

fn error_response(
    status: StatusCode,
    error: &'static str,
    reason: &str,
    close: bool,
) -> Response<Body> {
    json_response(status, &ErrorBody { error, reason }, close)
}

fn json_response(status: StatusCode, body: &impl Serialize, close: bool) -> Response<Body> {
    // Serialising these plain structs cannot fail; an empty body would still carry the status.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(
        Full::new(Bytes::from(bytes))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests;
