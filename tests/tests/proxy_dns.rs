//! The policy DNS against a real DNS server on loopback: allowed names are forwarded and their
//! answers filtered and remembered, denied names never reach the upstream, truncated answers are
//! retried over TCP, and DNS over TCP is served to clients.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use openshell::proxy::{
    dns::{self, DnsOutcome, DnsScope, Upstream},
    names::NameCache,
};
use openshell_tests::dns::TestDns;

/// Allows two names and refuses loopback answers (the gateway's scope asks the policy).
struct Scope {
    names: NameCache,
}

impl DnsScope for Scope {
    fn may_resolve(&self, name: &str) -> bool {
        matches!(name, "pypi.org" | "files.pythonhosted.org")
    }
    fn may_use_address(&self, _: &str, ip: IpAddr) -> bool {
        !ip.to_canonical().is_loopback()
    }
    fn names(&self) -> &NameCache {
        &self.names
    }
}

fn scope() -> Scope {
    Scope {
        names: NameCache::default(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn upstream_with_zone() -> TestDns {
    let server = TestDns::start("127.0.0.1:0".parse().unwrap()).unwrap();
    server.add("pypi.org", ip("198.18.0.10"));
    server.add("pypi.org", ip("127.0.0.1"));
    server.add("pypi.org", ip("2001:2::10"));
    server.add("evil.example.com", ip("198.18.0.66"));
    server
}

fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

fn addresses(reply: &[u8]) -> (ResponseCode, Vec<IpAddr>) {
    let m = Message::from_vec(reply).unwrap();
    let ips = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    (m.metadata.response_code, ips)
}

#[tokio::test]
async fn allowed_name_is_resolved_filtered_and_remembered() {
    let server = upstream_with_zone();
    let upstream = Upstream::new(vec![server.addr()]);
    let scope = scope();
    let (reply, outcome) =
        dns::answer(&query("PyPI.org.", RecordType::A), &scope, &upstream, true).await;
    assert_eq!(
        outcome,
        DnsOutcome::Resolved {
            name: "pypi.org".into(),
            kept: vec![ip("198.18.0.10")],
            dropped: vec![ip("127.0.0.1")],
        }
    );
    assert_eq!(
        addresses(&reply.unwrap()),
        (ResponseCode::NoError, vec![ip("198.18.0.10")])
    );
    let names = scope.names.names(ip("198.18.0.10"), Instant::now());
    assert_eq!(names.iter().map(|n| &**n).collect::<Vec<_>>(), ["pypi.org"]);
    assert!(
        scope
            .names
            .names(ip("127.0.0.1"), Instant::now())
            .is_empty()
    );

    let (reply, _) = dns::answer(
        &query("pypi.org.", RecordType::AAAA),
        &scope,
        &upstream,
        true,
    )
    .await;
    assert_eq!(
        addresses(&reply.unwrap()),
        (ResponseCode::NoError, vec![ip("2001:2::10")])
    );
    assert_eq!(scope.names.names(ip("2001:2::10"), Instant::now()).len(), 1);
    assert!(server.saw("pypi.org"));
}

#[tokio::test]
async fn denied_name_never_reaches_the_upstream() {
    let server = upstream_with_zone();
    let upstream = Upstream::new(vec![server.addr()]);
    let (reply, outcome) = dns::answer(
        &query("evil.example.com.", RecordType::A),
        &scope(),
        &upstream,
        true,
    )
    .await;
    assert_eq!(
        outcome,
        DnsOutcome::Refused {
            name: "evil.example.com".into()
        }
    );
    assert_eq!(addresses(&reply.unwrap()), (ResponseCode::NXDomain, vec![]));
    // The same server answers it when asked directly, so the check below can fail.
    let (direct, _) = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket
            .send_to(&query("evil.example.com.", RecordType::A), server.addr())
            .unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        (addresses(&buf[..n]), ())
    };
    assert_eq!(direct.1, vec![ip("198.18.0.66")]);
    let proxied: Vec<_> = server
        .queries()
        .into_iter()
        .filter(|q| q.name == "evil.example.com")
        .collect();
    assert_eq!(proxied.len(), 1, "only the direct query reached the server");
}

#[tokio::test]
async fn allowed_name_missing_upstream_is_nxdomain_from_upstream() {
    let server = upstream_with_zone();
    let upstream = Upstream::new(vec![server.addr()]);
    let (reply, outcome) = dns::answer(
        &query("files.pythonhosted.org.", RecordType::A),
        &scope(),
        &upstream,
        true,
    )
    .await;
    assert!(matches!(outcome, DnsOutcome::Resolved { ref kept, .. } if kept.is_empty()));
    assert_eq!(addresses(&reply.unwrap()), (ResponseCode::NXDomain, vec![]));
    assert!(server.saw("files.pythonhosted.org"));
}

#[tokio::test]
async fn truncated_upstream_answers_are_retried_over_tcp() {
    let server = upstream_with_zone();
    server.set_truncate_udp(true);
    let upstream = Upstream::new(vec![server.addr()]);
    let (reply, _) = dns::answer(
        &query("pypi.org.", RecordType::A),
        &scope(),
        &upstream,
        true,
    )
    .await;
    assert_eq!(
        addresses(&reply.unwrap()),
        (ResponseCode::NoError, vec![ip("198.18.0.10")])
    );
    let seen = server.queries();
    assert!(seen.iter().any(|q| !q.tcp), "{seen:?}");
    assert!(seen.iter().any(|q| q.tcp), "{seen:?}");
}

#[tokio::test]
async fn falls_back_to_the_next_upstream() {
    let server = upstream_with_zone();
    let dead: SocketAddr = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let upstream = Upstream::new(vec![dead, server.addr()]).with_timeout(Duration::from_secs(2));
    let (reply, _) = dns::answer(
        &query("pypi.org.", RecordType::A),
        &scope(),
        &upstream,
        true,
    )
    .await;
    assert_eq!(
        addresses(&reply.unwrap()),
        (ResponseCode::NoError, vec![ip("198.18.0.10")])
    );
}

#[tokio::test]
async fn serves_dns_over_tcp() {
    let server = upstream_with_zone();
    let upstream = Upstream::new(vec![server.addr()]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let scope = scope();
        let mut outcomes = Vec::new();
        dns::serve_tcp(stream, &scope, &upstream, |o| outcomes.push(o.clone()))
            .await
            .unwrap();
        outcomes
    });
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    for (name, code) in [
        ("pypi.org.", ResponseCode::NoError),
        ("evil.example.com.", ResponseCode::NXDomain),
    ] {
        dns::write_frame(&mut client, &query(name, RecordType::A))
            .await
            .unwrap();
        let reply = dns::read_frame(&mut client).await.unwrap().unwrap();
        assert_eq!(addresses(&reply).0, code, "{name}");
    }
    drop(client);
    let outcomes = tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(outcomes[0], DnsOutcome::Resolved { .. }));
    assert!(matches!(outcomes[1], DnsOutcome::Refused { .. }));
    assert!(!server.saw("evil.example.com"));
}
