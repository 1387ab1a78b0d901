//! A real DNS server for tests: authoritative for a small zone the test fills in, serving UDP
//! and TCP on one address (normally a test host in a network namespace, see [`crate::netns`]),
//! and recording every query it receives, so a test can prove that a name never reached it.
//!
//! Names not in the zone get NXDOMAIN; names in the zone without records of the asked type get
//! an empty NOERROR answer. [`TestDns::set_truncate_udp`] makes every UDP answer truncated (TC),
//! so clients must retry over TCP.
//!
//! ```no_run
//! let net = openshell_tests::netns::TestNet::new()?;
//! let dns = openshell_tests::dns::TestDns::start_in(&net)?;
//! dns.add("pypi.org", net.ns_v4().into());
//! // ... point the gateway's [dns] upstream at dns.addr() ...
//! assert!(!dns.saw("evil.example.com"));
//! # anyhow::Ok(())
//! ```

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA},
    },
};

use crate::netns::TestNet;

/// TTL of every record served.
pub const TTL: u32 = 300;
const POLL: Duration = Duration::from_millis(50);

/// One query as the server received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenQuery {
    /// Lowercase, without the trailing dot.
    pub name: String,
    pub record_type: RecordType,
    pub tcp: bool,
}

#[derive(Default)]
struct State {
    zone: HashMap<String, Vec<IpAddr>>,
    seen: Vec<SeenQuery>,
    truncate_udp: bool,
}

/// The running server; dropping it stops it.
pub struct TestDns {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TestDns {
    /// Serves on port 53 of the namespace side of `net` (`198.18.N.10:53`).
    pub fn start_in(net: &TestNet) -> anyhow::Result<Self> {
        let addr = SocketAddr::new(net.ns_v4().into(), 53);
        let (udp, tcp) = net.run(move || -> std::io::Result<_> {
            Ok((UdpSocket::bind(addr)?, TcpListener::bind(addr)?))
        })??;
        Self::serve(udp, tcp)
    }

    /// Serves on `addr` in the test's own network namespace (loopback tests).
    /// With port 0, the UDP socket picks the port and the TCP listener takes the same one; if
    /// another test holds that TCP port, another is tried (a bounded number of times).
    pub fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut attempt = 0;
        loop {
            let udp = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
            let port = udp.local_addr()?;
            match TcpListener::bind(port) {
                Ok(tcp) => return Self::serve(udp, tcp),
                Err(e)
                    if addr.port() == 0
                        && e.kind() == std::io::ErrorKind::AddrInUse
                        && attempt < 20 =>
                {
                    attempt += 1;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("binding TCP {port}"));
                }
            }
        }
    }

    fn serve(udp: UdpSocket, tcp: TcpListener) -> anyhow::Result<Self> {
        let addr = udp.local_addr()?;
        udp.set_read_timeout(Some(POLL))?;
        tcp.set_nonblocking(true)?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![
            {
                let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
                std::thread::spawn(move || serve_udp(&udp, &state, &stop))
            },
            {
                let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
                std::thread::spawn(move || serve_tcp(&tcp, &state, &stop))
            },
        ];
        Ok(Self {
            addr,
            state,
            stop,
            threads,
        })
    }

    /// Where the server listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds an address record (A or AAAA by the address family) for `name`.
    pub fn add(&self, name: &str, ip: IpAddr) {
        self.lock()
            .zone
            .entry(canonical(name))
            .or_default()
            .push(ip);
    }

    /// Makes every UDP answer truncated (or not), forcing clients onto TCP.
    pub fn set_truncate_udp(&self, on: bool) {
        self.lock().truncate_udp = on;
    }

    /// Every query received so far.
    pub fn queries(&self) -> Vec<SeenQuery> {
        self.lock().seen.clone()
    }

    /// Whether any query for `name` (any type, UDP or TCP) was received.
    pub fn saw(&self, name: &str) -> bool {
        let name = canonical(name);
        self.lock().seen.iter().any(|q| q.name == name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn canonical(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn serve_udp(socket: &UdpSocket, state: &Mutex<State>, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = respond(&buf[..n], state, false) {
            let _ = socket.send_to(&reply, from);
        }
    }
}

fn serve_tcp(listener: &TcpListener, state: &Mutex<State>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                // One connection at a time is enough for tests; each is bounded by timeouts.
                let _ = serve_tcp_conn(stream, state);
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn serve_tcp_conn(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    for _ in 0..64 {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return Ok(());
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut query)?;
        let Some(reply) = respond(&query, state, true) else {
            return Ok(());
        };
        let len = u16::try_from(reply.len()).unwrap_or(u16::MAX);
        stream.write_all(&len.to_be_bytes())?;
        stream.write_all(&reply)?;
    }
    Ok(())
}

fn respond(query: &[u8], state: &Mutex<State>, tcp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let question = query.queries.first()?.clone();
    let name = canonical(&question.name().to_ascii());
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    state.seen.push(SeenQuery {
        name: name.clone(),
        record_type: question.query_type(),
        tcp,
    });
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = query.queries.clone();
    if !tcp && state.truncate_udp {
        reply.metadata.truncation = true;
        return reply.to_vec().ok();
    }
    let Some(ips) = state.zone.get(&name) else {
        reply.metadata.response_code = ResponseCode::NXDomain;
        return reply.to_vec().ok();
    };
    let owner = Name::from_ascii(format!("{name}.")).ok()?;
    for ip in ips {
        let data = match (ip, question.query_type()) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
            _ => continue,
        };
        reply
            .answers
            .push(Record::from_rdata(owner.clone(), TTL, data));
    }
    reply.to_vec().ok()
}
