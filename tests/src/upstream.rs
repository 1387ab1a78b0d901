//! A real HTTPS test upstream (HTTP/1.1 and h2 through ALPN) with its own test CA, that records
//! every request it receives, so tests can prove which requests arrived and that denied ones
//! never did.
//!
//! Bind it inside a [`crate::netns::TestNet`]; it serves from the caller's tokio runtime. Each
//! response is `200` with the JSON `{"method":..,"target":..,"version":..}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::netns::TestNet;

/// One request as the upstream received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// `Host` (HTTP/1) or `:authority` (HTTP/2).
    pub authority: String,
    pub body: Vec<u8>,
}

/// The test CA that signs the upstream's certificate; the inspector is told to trust it.
pub struct TestCa {
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "openshell test upstream CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A server config with a leaf for `names` signed by this CA (ALPN h2, http/1.1).
    pub fn server_config(&self, names: &[&str]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let key = KeyPair::generate()?;
        let params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), self.cert_der.clone()], key_der)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A running upstream; its task stops when this is dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Serves HTTPS for `names` on `net`'s namespace address, port 443. Call inside a tokio
    /// runtime.
    pub fn start(net: &TestNet, ca: &TestCa, names: &[&str]) -> anyhow::Result<Self> {
        let addr = SocketAddr::from((net.ns_v4(), 443));
        let std_listener = net
            .run(|| std::net::TcpListener::bind(addr))?
            .with_context(|| format!("binding the test upstream on {addr}"))?;
        Self::start_on(std_listener, ca, names)
    }

    /// Serves on a listener the caller bound. Call inside a tokio runtime.
    pub fn start_on(
        std_listener: std::net::TcpListener,
        ca: &TestCa,
        names: &[&str],
    ) -> anyhow::Result<Self> {
        let addr = std_listener.local_addr()?;
        std_listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(names)?);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = hyper::service::service_fn(move |req| {
                        let log = Arc::clone(&log);
                        async move { Ok::<_, Infallible>(record(req, &log).await) }
                    });
                    let io = TokioIo::new(tls);
                    let _ = if h2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades()
                            .await
                    };
                });
            }
        });
        Ok(Self { addr, seen, task })
    }

    /// Every request received so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("upstream log lock").clone()
    }

    /// Forgets what was received so far.
    pub fn clear(&self) {
        self.seen.lock().expect("upstream log lock").clear();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(req: Request<Incoming>, log: &Mutex<Vec<Seen>>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(String::new, |pq| pq.as_str().to_owned());
    let version = format!("{:?}", req.version());
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let reply = format!("{{\"method\":{method:?},\"target\":{target:?},\"version\":{version:?}}}");
    log.lock().expect("upstream log lock").push(Seen {
        method,
        target,
        version,
        authority,
        body,
    });
    let mut resp = Response::new(Full::new(Bytes::from(reply)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
