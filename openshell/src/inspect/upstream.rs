//! The upstream side of an inspected connection: a hyper client whose connector dials only the
//! addresses the L4 proxy validated, over TLS (SNI = the destination name, ALPN h2/http1.1)
//! when the client side was TLS.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Dials the validated addresses in order; the request URI's host is ignored on purpose.
#[derive(Clone)]
pub(super) struct Connector {
    addrs: Arc<[SocketAddr]>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Connector {
    pub(super) fn new(
        addrs: Arc<[SocketAddr]>,
        tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    ) -> Self {
        Self {
            addrs,
            tls: tls.map(|(config, name)| (TlsConnector::from(config), name)),
        }
    }

    /// The same destination, offering only HTTP/1.1 over TLS: an upgrade (WebSocket) needs an
    /// HTTP/1.1 connection of its own, since h2 has no `Upgrade`.
    pub(super) fn http1_only(&self) -> Self {
        let tls = self.tls.as_ref().map(|(connector, name)| {
            let mut config = connector.config().as_ref().clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            (TlsConnector::from(Arc::new(config)), name.clone())
        });
        Self {
            addrs: Arc::clone(&self.addrs),
            tls,
        }
    }

    pub(super) async fn dial(self) -> io::Result<TokioIo<UpstreamStream>> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no validated upstream address");
        for addr in self.addrs.iter() {
            let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    last = e;
                    continue;
                }
                Err(_) => {
                    last = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connecting to {addr} timed out"),
                    );
                    continue;
                }
            };
            tcp.set_nodelay(true)?;
            let stream = match &self.tls {
                None => UpstreamStream::Plain(tcp),
                Some((connector, name)) => {
                    let tls =
                        tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                            .await
                            .map_err(|_| {
                                io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    format!("TLS handshake with {addr} timed out"),
                                )
                            })??;
                    UpstreamStream::Tls(Box::new(tls))
                }
            };
            return Ok(TokioIo::new(stream));
        }
        Err(last)
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        Box::pin(self.clone().dial())
    }
}

pub(super) enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain(_) => Connected::new(),
            Self::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                Connected::new().negotiated_h2()
            }
            Self::Tls(_) => Connected::new(),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
