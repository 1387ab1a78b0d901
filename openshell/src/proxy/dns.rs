//! The policy DNS: every DNS query of a sandbox is answered here.
//!
//! - A name that no block of the sandbox's policy could ever allow is answered NXDOMAIN at once
//!   and never sent upstream, so denied names do not leak through DNS.
//! - Any other name is resolved by the configured upstream servers (UDP, then TCP when the
//!   answer is truncated). Address records that fail destination safety (POLICY.md: loopback,
//!   link-local, metadata, multicast, unspecified always; private ranges unless `allowed_ips`
//!   covers them) are dropped from the answer; the rest are remembered in the sandbox's
//!   [`NameCache`] before the answer is sent, so the connection that follows is matched to the
//!   name.
//! - Additional-section records are dropped (the client asked us, not an authority, so glue is
//!   of no use to it), and answers longer than the client can take over UDP are truncated (TC),
//!   which makes resolvers retry over TCP.
//!
//! Wire format by `hickory-proto`. Queries reach this module over UDP (the DNS listener) and over
//! TCP (the transparent listener hands over connections whose original port is 53).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode},
    rr::{DNSClass, RData, Record},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

use super::names::NameCache;

/// Largest answer we send over UDP to a client that did not advertise EDNS.
const CLASSIC_UDP_LIMIT: usize = 512;
/// Largest UDP payload we advertise and accept (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;
/// How long one upstream exchange may take before the next server is tried.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a DNS-over-TCP client may stay idle between queries.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most queries answered on one DNS-over-TCP connection.
const TCP_MAX_QUERIES: usize = 256;

/// What the policy DNS needs to know about the sandbox that asked.
pub trait DnsScope: Send + Sync {
    /// Whether some block of the policy could allow a connection to `name` (canonical form:
    /// lowercase, no trailing dot).
    fn may_resolve(&self, name: &str) -> bool;
    /// Whether `ip`, received as an address of `name`, passes destination safety for this
    /// sandbox's policy.
    fn may_use_address(&self, name: &str, ip: IpAddr) -> bool;
    /// The sandbox's name cache, where usable answers are remembered.
    fn names(&self) -> &NameCache;

    /// Called after an answer changed the set of names of some address in [`DnsScope::names`]
    /// and before the answer goes to the client.
    fn names_changed(&self) {}
}

/// Errors of one upstream exchange.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("no DNS upstream is configured (set [dns] upstream in the gateway configuration)")]
    NoUpstream,
    #[error("DNS upstream {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("DNS upstream {server} did not answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("DNS upstream {server} sent a malformed or mismatched answer: {reason}")]
    BadAnswer { server: SocketAddr, reason: String },
    #[error("encoding a DNS message: {0}")]
    Encode(String),
}

/// What became of one query; the caller logs denials from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsOutcome {
    /// The name was resolved upstream. `kept` addresses were passed to the client and remembered,
    /// `dropped` ones failed destination safety.
    Resolved {
        name: String,
        kept: Vec<IpAddr>,
        dropped: Vec<IpAddr>,
    },
    /// No block could allow the name: NXDOMAIN, nothing sent upstream.
    Refused { name: String },
    /// The query was malformed or of a kind we do not serve (FORMERR, NOTIMP, REFUSED).
    Rejected { code: ResponseCode },
    /// Upstream failed; the client got SERVFAIL.
    UpstreamFailed { name: String, error: String },
}

/// The upstream resolvers the policy DNS asks.
#[derive(Clone, Debug)]
pub struct Upstream {
    servers: Arc<[SocketAddr]>,
    timeout: Duration,
}

impl Upstream {
    /// Upstream servers, tried in order.
    #[must_use]
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Self {
            servers: servers.into(),
            timeout: UPSTREAM_TIMEOUT,
        }
    }

    /// The same servers with another per-exchange timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The configured servers.
    #[must_use]
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Asks the servers in turn for `query` (name, type, class) and returns the first answer.
    pub async fn resolve(&self, query: &Query) -> Result<Message, DnsError> {
        let mut last = DnsError::NoUpstream;
        for &server in self.servers.iter() {
            match self.exchange(server, query).await {
                Ok(answer) => return Ok(answer),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn exchange(&self, server: SocketAddr, query: &Query) -> Result<Message, DnsError> {
        let mut request = Message::query();
        request.metadata.recursion_desired = true;
        request.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        request.set_edns(edns);
        let bytes = request
            .to_vec()
            .map_err(|e| DnsError::Encode(e.to_string()))?;
        let io = |source| DnsError::Io { server, source };
        let timeout = || DnsError::Timeout {
            server,
            timeout: self.timeout,
        };

        let bind: SocketAddr = match server {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(bind).await.map_err(io)?;
        socket.connect(server).await.map_err(io)?;
        socket.send(&bytes).await.map_err(io)?;
        let mut buf = vec![0u8; usize::from(EDNS_PAYLOAD) + 512];
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Datagrams that are not the answer (a late answer to someone else's ID cannot reach a
        // fresh connected socket, but a malformed one can) are skipped until the deadline.
        let answer = loop {
            let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
                .await
                .map_err(|_| timeout())?
                .map_err(io)?;
            if let Ok(answer) = Message::from_vec(&buf[..n])
                && matches_request(&answer, &request)
            {
                break answer;
            }
        };
        if !answer.metadata.truncation {
            return Ok(answer);
        }
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(server))
            .await
            .map_err(|_| timeout())?
            .map_err(io)?;
        tokio::time::timeout_at(
            deadline,
            self.exchange_tcp(server, stream, &request, &bytes),
        )
        .await
        .map_err(|_| timeout())?
    }

    async fn exchange_tcp(
        &self,
        server: SocketAddr,
        mut stream: TcpStream,
        request: &Message,
        bytes: &[u8],
    ) -> Result<Message, DnsError> {
        let io = |source| DnsError::Io { server, source };
        write_frame(&mut stream, bytes).await.map_err(io)?;
        let frame =
            read_frame(&mut stream)
                .await
                .map_err(io)?
                .ok_or_else(|| DnsError::BadAnswer {
                    server,
                    reason: "connection closed before the answer".into(),
                })?;
        let answer = Message::from_vec(&frame).map_err(|e| DnsError::BadAnswer {
            server,
            reason: e.to_string(),
        })?;
        if !matches_request(&answer, request) {
            return Err(DnsError::BadAnswer {
                server,
                reason: "the answer's ID or question differs from the query".into(),
            });
        }
        Ok(answer)
    }
}

fn matches_request(answer: &Message, request: &Message) -> bool {
    answer.metadata.id == request.metadata.id
        && answer.metadata.message_type == MessageType::Response
        && answer.queries.len() == request.queries.len()
        && answer.queries.iter().zip(&request.queries).all(|(a, q)| {
            a.name().to_lowercase() == q.name().to_lowercase()
                && a.query_type() == q.query_type()
                && a.query_class() == q.query_class()
        })
}

/// The canonical form of a DNS name for policy checks: lowercase ASCII (punycode), no trailing
/// dot.
#[must_use]
pub fn canonical_name(name: &hickory_proto::rr::Name) -> String {
    let mut s = name.to_lowercase().to_ascii();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

/// Answers one DNS query (wire format) for the sandbox `scope`. Over UDP (`over_udp`) the answer
/// is truncated to what the client advertised (512 bytes without EDNS). Returns the answer to
/// send (none for input that cannot be answered) and what happened.
pub async fn answer(
    request: &[u8],
    scope: &dyn DnsScope,
    upstream: &Upstream,
    over_udp: bool,
) -> (Option<Vec<u8>>, DnsOutcome) {
    let Ok(query) = Message::from_vec(request) else {
        return (
            error_for_raw(request, ResponseCode::FormErr),
            DnsOutcome::Rejected {
                code: ResponseCode::FormErr,
            },
        );
    };
    let limit = if over_udp {
        query.edns.as_ref().map_or(CLASSIC_UDP_LIMIT, |e| {
            usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD))
        })
    } else {
        usize::from(u16::MAX)
    };
    let reject = |code| {
        (
            encode(&reply_to(&query, code), limit),
            DnsOutcome::Rejected { code },
        )
    };
    if query.metadata.message_type != MessageType::Query {
        return (
            None,
            DnsOutcome::Rejected {
                code: ResponseCode::FormErr,
            },
        );
    }
    if query.metadata.op_code != OpCode::Query {
        return reject(ResponseCode::NotImp);
    }
    let [question] = query.queries.as_slice() else {
        return reject(ResponseCode::FormErr);
    };
    if question.query_class() != DNSClass::IN {
        return reject(ResponseCode::Refused);
    }
    let name = canonical_name(question.name());
    if !scope.may_resolve(&name) {
        return (
            encode(&reply_to(&query, ResponseCode::NXDomain), limit),
            DnsOutcome::Refused { name },
        );
    }
    let upstream_answer = match upstream.resolve(question).await {
        Ok(a) => a,
        Err(e) => {
            return (
                encode(&reply_to(&query, ResponseCode::ServFail), limit),
                DnsOutcome::UpstreamFailed {
                    name,
                    error: e.to_string(),
                },
            );
        }
    };
    let mut reply = reply_to(&query, upstream_answer.metadata.response_code);
    let now = Instant::now();
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    let mut changed = false;
    for record in upstream_answer.answers {
        match address_of(&record) {
            Some(ip) if scope.may_use_address(&name, ip) => {
                changed |= scope.names().remember(
                    ip,
                    &name,
                    Duration::from_secs(u64::from(record.ttl)),
                    now,
                );
                kept.push(ip);
                reply.answers.push(record);
            }
            Some(ip) => dropped.push(ip),
            None => reply.answers.push(record),
        }
    }
    if changed {
        scope.names_changed();
    }
    reply.authorities = upstream_answer
        .authorities
        .into_iter()
        .filter(|r| address_of(r).is_none())
        .collect();
    (
        encode(&reply, limit),
        DnsOutcome::Resolved {
            name,
            kept,
            dropped,
        },
    )
}

fn address_of(record: &Record) -> Option<IpAddr> {
    match &record.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

/// An empty answer to `query` with `code`, echoing its question.
fn reply_to(query: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata = Metadata::response_from_request(&query.metadata);
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = code;
    reply.queries = query.queries.clone();
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        reply.set_edns(edns);
    }
    reply
}

/// Serialises `reply`, truncating it (TC, question only) when it exceeds `limit` bytes.
fn encode(reply: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = reply.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    reply.truncate().to_vec().ok()
}

/// A header-only error answer for a query we could not parse, if it has an ID at all.
fn error_for_raw(request: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*request.first()?, *request.get(1)?]);
    Message::error_msg(id, OpCode::Query, code).to_vec().ok()
}

/// Reads one length-prefixed DNS message (RFC 1035 4.2.2). `Ok(None)` at a clean end of stream.
pub async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut frame = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut frame).await?;
    Ok(Some(frame))
}

/// Writes one length-prefixed DNS message.
pub async fn write_frame(
    stream: &mut (impl AsyncWrite + Unpin),
    message: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "DNS message too long")
    })?;
    let mut frame = Vec::with_capacity(message.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    stream.write_all(&frame).await
}

/// Serves DNS over TCP on an accepted connection for `scope` until the client closes it, stays
/// idle for [`TCP_IDLE_TIMEOUT`], or has sent [`TCP_MAX_QUERIES`] queries. `on_outcome` sees
/// every query's outcome.
pub async fn serve_tcp(
    mut stream: TcpStream,
    scope: &dyn DnsScope,
    upstream: &Upstream,
    mut on_outcome: impl FnMut(&DnsOutcome),
) -> std::io::Result<()> {
    for _ in 0..TCP_MAX_QUERIES {
        let Ok(frame) = tokio::time::timeout(TCP_IDLE_TIMEOUT, read_frame(&mut stream)).await
        else {
            return Ok(());
        };
        let Some(frame) = frame? else {
            return Ok(());
        };
        let (reply, outcome) = answer(&frame, scope, upstream, false).await;
        on_outcome(&outcome);
        match reply {
            Some(reply) => write_frame(&mut stream, &reply).await?,
            None => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::{Name, RecordType};

    use super::*;

    /// A scope that allows names under `allowed` and every public address.
    struct Scope {
        allowed: &'static str,
        names: NameCache,
    }

    impl DnsScope for Scope {
        fn may_resolve(&self, name: &str) -> bool {
            name == self.allowed
        }
        fn may_use_address(&self, _: &str, ip: IpAddr) -> bool {
            !ip.is_loopback()
        }
        fn names(&self) -> &NameCache {
            &self.names
        }
    }

    fn scope() -> Scope {
        Scope {
            allowed: "pypi.org",
            names: NameCache::default(),
        }
    }

    fn query_bytes(name: &str, rtype: RecordType, edns: bool) -> (u16, Vec<u8>) {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if edns {
            m.set_edns(Edns::new());
        }
        (m.metadata.id, m.to_vec().unwrap())
    }

    /// An upstream that must never be asked: nothing listens on the port.
    fn dead_upstream() -> Upstream {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        Upstream::new(vec![addr]).with_timeout(Duration::from_millis(200))
    }

    #[test]
    fn canonical_names() {
        for (raw, canonical) in [
            ("PyPI.org.", "pypi.org"),
            ("pypi.org", "pypi.org"),
            ("Files.PythonHosted.ORG", "files.pythonhosted.org"),
        ] {
            assert_eq!(canonical_name(&Name::from_ascii(raw).unwrap()), canonical);
        }
    }

    #[tokio::test]
    async fn denied_name_is_nxdomain_without_upstream() {
        let (id, q) = query_bytes("evil.example.com.", RecordType::A, false);
        let (reply, outcome) = answer(&q, &scope(), &dead_upstream(), true).await;
        assert_eq!(
            outcome,
            DnsOutcome::Refused {
                name: "evil.example.com".into()
            }
        );
        let reply = Message::from_vec(&reply.unwrap()).unwrap();
        assert_eq!(reply.metadata.id, id);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(reply.queries.len(), 1);
        assert!(reply.answers.is_empty());
    }

    #[tokio::test]
    async fn upstream_failure_is_servfail() {
        let (_, q) = query_bytes("pypi.org.", RecordType::A, true);
        let (reply, outcome) = answer(&q, &scope(), &dead_upstream(), true).await;
        assert!(
            matches!(outcome, DnsOutcome::UpstreamFailed { .. }),
            "{outcome:?}"
        );
        let reply = Message::from_vec(&reply.unwrap()).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert!(reply.edns.is_some());
    }

    #[tokio::test]
    async fn malformed_and_unsupported_queries() {
        // Garbage with an ID: FORMERR with that ID.
        let (reply, outcome) = answer(&[0x12, 0x34, 0xff], &scope(), &dead_upstream(), true).await;
        assert_eq!(
            outcome,
            DnsOutcome::Rejected {
                code: ResponseCode::FormErr
            }
        );
        let reply = Message::from_vec(&reply.unwrap()).unwrap();
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        // Too short to carry an ID: no answer.
        assert_eq!(answer(&[1], &scope(), &dead_upstream(), true).await.0, None);
        // Two questions: FORMERR.
        let mut m = Message::query();
        m.add_query(Query::query(
            Name::from_ascii("pypi.org.").unwrap(),
            RecordType::A,
        ));
        m.add_query(Query::query(
            Name::from_ascii("pypi.org.").unwrap(),
            RecordType::AAAA,
        ));
        let (_, outcome) = answer(&m.to_vec().unwrap(), &scope(), &dead_upstream(), true).await;
        assert_eq!(
            outcome,
            DnsOutcome::Rejected {
                code: ResponseCode::FormErr
            }
        );
        // Chaos class: REFUSED.
        let mut q = Query::query(Name::from_ascii("version.bind.").unwrap(), RecordType::TXT);
        q.set_query_class(DNSClass::CH);
        let mut m = Message::query();
        m.add_query(q);
        let (_, outcome) = answer(&m.to_vec().unwrap(), &scope(), &dead_upstream(), true).await;
        assert_eq!(
            outcome,
            DnsOutcome::Rejected {
                code: ResponseCode::Refused
            }
        );
    }

    #[test]
    fn long_udp_answers_are_truncated() {
        let (_, q) = query_bytes("pypi.org.", RecordType::A, false);
        let query = Message::from_vec(&q).unwrap();
        let mut reply = reply_to(&query, ResponseCode::NoError);
        for i in 0..64u8 {
            reply.answers.push(Record::from_rdata(
                Name::from_ascii("pypi.org.").unwrap(),
                60,
                RData::A(hickory_proto::rr::rdata::A::new(198, 18, 1, i)),
            ));
        }
        let full = encode(&reply, usize::from(u16::MAX)).unwrap();
        assert!(full.len() > CLASSIC_UDP_LIMIT);
        let short = Message::from_vec(&encode(&reply, CLASSIC_UDP_LIMIT).unwrap()).unwrap();
        assert!(short.metadata.truncation);
        assert!(short.answers.is_empty());
        assert_eq!(short.queries.len(), 1);
    }
}
