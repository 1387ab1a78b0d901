//! The proxy's listeners and what happens to each connection and DNS datagram.
//!
//! Transparent TCP listener, per accepted connection:
//! 1. The eBPF record of the client's address gives the original destination, the caller's
//!    process, executable and cgroup. No record, or a cgroup that is no sandbox: reset.
//! 2. Original port 53: the connection is DNS over TCP, served by the policy DNS.
//! 3. The executable and its ancestors are resolved to paths (with the integrity check).
//! 4. The destination address is matched to the names the sandbox resolved through the policy
//!    DNS; an address it never resolved is judged as an IP literal. A TLS SNI or HTTP Host claim
//!    is never consulted, so a program cannot borrow an allowed name for an address of its
//!    choosing.
//! 5. Denied: reset (RST) and log. Allowed: log, dial exactly the validated original address,
//!    relay until either side ends or a new policy generation no longer allows it.
//!    Allowed to a `protocol: rest` endpoint: hand the connection to [`inspect::serve`], which
//!    decides each HTTP request by the generation current at that moment and logs it here too;
//!    the connection is reset when a new generation no longer allows it.
//! 6. Allowed plain L4 (and direct connections on): the kernel gets a verdict, so the next
//!    connections like this one go direct ([`super::direct`]); their log lines come from the
//!    kernel's events, and a new generation judges them again and aborts the ones it denies.
//!
//! DNS listener (UDP): the sandbox is found from the datagram's source socket (sock_diag), and
//! the policy DNS answers.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};

use super::{
    Generation, ProxyError,
    direct::{DirectPath, NewVerdict, VerdictFacts},
    dns::{self, DnsOutcome, Upstream},
    identity::{Binary, Identities, IdentityError},
    log::{DecisionLog, DecisionRecord, now_ms},
    registry::{Registry, SandboxNet},
    relay::{self, RelayEnd, RelayMode},
};
use crate::{
    ebpf::{ConnectRecord, EbpfError, Interceptor, InterceptorConfig, KernelRelay},
    inspect::{self, InspectContext, PolicySource, RequestLog, RequestRecord},
    policy::{ConnectionQuery, Decision, Inspection, Verdict},
};

/// How long dialing an upstream may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Most DNS datagrams answered at once; more are dropped (the client retries).
const DNS_IN_FLIGHT: usize = 512;
/// How long a resolved identity (executable and ancestors) is reused for further connections of
/// the same process with the same recorded executable and parent. A process cannot change its
/// executable's content while it runs (ETXTBSY) and an exec changes the recorded identity, so
/// this only saves the `/proc` reads and the hand-off to a blocking thread.
const IDENTITY_REUSE: Duration = Duration::from_secs(1);
/// Most identities kept for reuse.
const IDENTITY_CACHE: usize = 4096;
/// How many times the direct connections of a sandbox are looked at after a policy change (a
/// connect that passed the kernel's check just before the change shows up a moment later).
const REJUDGE_PASSES: usize = 5;
/// Pause between those looks.
const REJUDGE_AGAIN_AFTER: Duration = Duration::from_millis(20);
/// While direct connections keep coming, how often their log lines are collected.
const DIRECT_LOG_EVERY: Duration = Duration::from_millis(10);

/// (cgroup id, process, recorded executable, recorded parent).
type IdentityKey = (u64, u32, Option<crate::ebpf::ExeId>, Option<u32>);
type Resolved = (Binary, Vec<Binary>);

/// Where the proxy listens and whom it asks.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Transparent TCP listener for IPv4 (port 0: any free port).
    pub transparent_v4: SocketAddrV4,
    /// Transparent TCP listener for IPv6.
    pub transparent_v6: Option<SocketAddrV6>,
    /// DNS listener for IPv4 resolvers.
    pub dns_v4: SocketAddrV4,
    /// DNS listener for IPv6 resolvers.
    pub dns_v6: Option<SocketAddrV6>,
    /// Upstream DNS servers.
    pub upstream_dns: Vec<SocketAddr>,
    pub relay: RelayMode,
    pub dial_timeout: Duration,
    /// CA certificates trusted for upstream TLS of inspected connections, besides the built-in
    /// roots (`[tls] extra_roots`).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl ProxyConfig {
    /// IPv4 and IPv6 loopback listeners on the given ports.
    #[must_use]
    pub fn loopback(tcp_port: u16, dns_port: u16, upstream_dns: Vec<SocketAddr>) -> Self {
        Self {
            transparent_v4: SocketAddrV4::new([127, 0, 0, 1].into(), tcp_port),
            transparent_v6: Some(SocketAddrV6::new(
                std::net::Ipv6Addr::LOCALHOST,
                tcp_port,
                0,
                0,
            )),
            dns_v4: SocketAddrV4::new([127, 0, 0, 1].into(), dns_port),
            dns_v6: Some(SocketAddrV6::new(
                std::net::Ipv6Addr::LOCALHOST,
                dns_port,
                0,
                0,
            )),
            upstream_dns,
            relay: RelayMode::default(),
            dial_timeout: DIAL_TIMEOUT,
            extra_roots: Vec::new(),
        }
    }
}

/// The bound listener sockets (bound before the interceptor is configured, so that port 0
/// works and the kernel never redirects to a port nobody holds).
#[derive(Debug)]
pub struct ProxyListeners {
    tcp: Vec<std::net::TcpListener>,
    udp: Vec<std::net::UdpSocket>,
    tcp_v4: SocketAddrV4,
    tcp_v6: Option<SocketAddrV6>,
    dns_v4: SocketAddrV4,
    dns_v6: Option<SocketAddrV6>,
}

impl ProxyListeners {
    /// Binds every configured listener.
    pub fn bind(config: &ProxyConfig) -> Result<Self, ProxyError> {
        let bind_err = |what, addr| move |source| ProxyError::Bind { what, addr, source };
        let tcp4 = bind_tcp(config.transparent_v4.into())
            .map_err(bind_err("transparent", config.transparent_v4.into()))?;
        let udp4 = bind_udp(config.dns_v4.into()).map_err(bind_err("DNS", config.dns_v4.into()))?;
        let tcp_v4 = v4(tcp4
            .local_addr()
            .map_err(bind_err("transparent", config.transparent_v4.into()))?);
        let dns_v4 = v4(udp4
            .local_addr()
            .map_err(bind_err("DNS", config.dns_v4.into()))?);
        let mut tcp = vec![tcp4];
        let mut udp = vec![udp4];
        let mut tcp_v6 = None;
        if let Some(addr) = config.transparent_v6 {
            // The same port as IPv4 when IPv4 took a free one.
            let addr = SocketAddrV6::new(
                *addr.ip(),
                if addr.port() == 0 {
                    tcp_v4.port()
                } else {
                    addr.port()
                },
                0,
                0,
            );
            let l = bind_tcp(addr.into()).map_err(bind_err("transparent", addr.into()))?;
            tcp_v6 = Some(addr);
            tcp.push(l);
        }
        let mut dns_v6 = None;
        if let Some(addr) = config.dns_v6 {
            let addr = SocketAddrV6::new(
                *addr.ip(),
                if addr.port() == 0 {
                    dns_v4.port()
                } else {
                    addr.port()
                },
                0,
                0,
            );
            let s = bind_udp(addr.into()).map_err(bind_err("DNS", addr.into()))?;
            dns_v6 = Some(addr);
            udp.push(s);
        }
        Ok(Self {
            tcp,
            udp,
            tcp_v4,
            tcp_v6,
            dns_v4,
            dns_v6,
        })
    }

    /// The interceptor configuration that redirects to these listeners.
    #[must_use]
    pub fn interceptor_config(&self, bpffs_dir: &Path) -> InterceptorConfig {
        let mut c = InterceptorConfig::new(self.tcp_v4, self.dns_v4, bpffs_dir);
        c.tcp_v6 = self.tcp_v6;
        c.dns_v6 = self.dns_v6;
        c
    }

    /// Every address the proxy listens on (connections to them are always denied).
    #[must_use]
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = vec![self.tcp_v4.into(), self.dns_v4.into()];
        v.extend(self.tcp_v6.map(SocketAddr::from));
        v.extend(self.dns_v6.map(SocketAddr::from));
        v
    }
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => SocketAddrV4::new(
            a.ip().to_ipv4_mapped().unwrap_or([127, 0, 0, 1].into()),
            a.port(),
        ),
    }
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Where the proxy finds the kernel's connect records.
pub trait ConnectRecords: Send + Sync {
    /// Takes the record of the connection whose client address is `peer`.
    fn take(&self, peer: SocketAddr) -> Result<Option<ConnectRecord>, EbpfError>;
}

impl ConnectRecords for Interceptor {
    fn take(&self, peer: SocketAddr) -> Result<Option<ConnectRecord>, EbpfError> {
        Interceptor::take(self, peer)
    }
}

impl ConnectRecords for Mutex<Interceptor> {
    fn take(&self, peer: SocketAddr) -> Result<Option<ConnectRecord>, EbpfError> {
        self.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(peer)
    }
}

/// The proxy: shared state of every listener task.
pub struct Proxy {
    registry: Arc<Registry>,
    records: Arc<dyn ConnectRecords>,
    identities: Identities,
    log: Arc<dyn DecisionLog>,
    upstream: Upstream,
    own: Vec<SocketAddr>,
    relay: RelayMode,
    kernel_relay: Option<Arc<KernelRelay>>,
    dial_timeout: Duration,
    upstream_tls: Arc<rustls::ClientConfig>,
    recent: Mutex<HashMap<IdentityKey, (Instant, Resolved)>>,
    /// Direct connections on the proxy's verdicts, when on.
    direct: Option<Arc<DirectPath>>,
    /// Sandboxes whose direct connections are watched for policy changes, by cgroup id.
    direct_watched: Mutex<HashMap<u64, std::sync::Weak<SandboxNet>>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("own", &self.own)
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

/// The facts a connection was judged on, kept to judge it again after a policy change.
struct Facts {
    sandbox: Arc<SandboxNet>,
    pid: u32,
    binary: Option<Binary>,
    ancestors: Vec<Binary>,
    ancestor_paths: Vec<PathBuf>,
    names: Vec<Arc<str>>,
    dst: SocketAddr,
}

impl Proxy {
    /// Fails only when `config.extra_roots` holds a certificate rustls cannot use.
    pub fn new(
        config: &ProxyConfig,
        listeners: &ProxyListeners,
        registry: Arc<Registry>,
        records: Arc<dyn ConnectRecords>,
        log: Arc<dyn DecisionLog>,
    ) -> Result<Self, ProxyError> {
        Ok(Self {
            registry,
            records,
            identities: Identities::new(),
            log,
            upstream: Upstream::new(config.upstream_dns.clone()),
            own: listeners.addresses(),
            relay: config.relay,
            kernel_relay: None,
            dial_timeout: config.dial_timeout,
            upstream_tls: crate::tls::upstream_client_config(&config.extra_roots)?,
            recent: Mutex::new(HashMap::new()),
            direct: None,
            direct_watched: Mutex::default(),
        })
    }

    /// Lets allowed L4 connections that the proxy has judged before go direct on its verdicts
    /// ([`super::direct`]). The registry must hand the same kernel maps to its sandboxes
    /// ([`Registry::with_direct`]).
    #[must_use]
    pub fn with_direct(mut self, direct: Arc<DirectPath>) -> Self {
        self.direct = Some(direct);
        self
    }

    /// Serves [`RelayMode::Kernel`] with `kernel` (without one, that mode copies in user space).
    #[must_use]
    pub fn with_kernel_relay(mut self, kernel: Arc<KernelRelay>) -> Self {
        self.kernel_relay = Some(kernel);
        self
    }

    fn recent_identity(&self, key: &IdentityKey) -> Option<Resolved> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent
            .get(key)
            .filter(|(at, _)| at.elapsed() < IDENTITY_REUSE)
            .map(|(_, resolved)| resolved.clone())
    }

    fn remember_identity(&self, key: IdentityKey, resolved: &Resolved) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() >= IDENTITY_CACHE {
            recent.retain(|_, (at, _)| at.elapsed() < IDENTITY_REUSE);
            if recent.len() >= IDENTITY_CACHE {
                recent.clear();
            }
        }
        recent.insert(key, (Instant::now(), resolved.clone()));
    }

    /// Serves every listener until `shutdown` resolves. Must run inside a tokio runtime.
    pub async fn serve(
        self: Arc<Self>,
        listeners: ProxyListeners,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners.tcp {
            let l = TcpListener::from_std(l)?;
            tasks.spawn(Arc::clone(&self).accept_loop(l));
        }
        if let Some(direct) = &self.direct {
            tasks.spawn(keep_alive(Arc::clone(direct)));
            if let Some(events) = direct.kernel().take_events() {
                tasks.spawn(Arc::clone(&self).direct_events(events));
            }
        }
        let limit = Arc::new(Semaphore::new(DNS_IN_FLIGHT));
        for s in listeners.udp {
            let s = Arc::new(UdpSocket::from_std(s)?);
            tasks.spawn(Arc::clone(&self).dns_loop(s, Arc::clone(&limit)));
        }
        shutdown.await;
        tasks.shutdown().await;
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tokio::spawn(Arc::clone(&self).handle_tcp(stream, peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("proxy: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle_tcp(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let record = match self.records.take(peer) {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => {
                // Not a redirected sandbox connection (or its record was evicted): refuse.
                relay::reset(&stream);
                return;
            }
        };
        let Some(sandbox) = self.registry.get(record.cgroup_id) else {
            relay::reset(&stream);
            return;
        };
        let dst = SocketAddr::new(
            record.original_dst.ip().to_canonical(),
            record.original_dst.port(),
        );
        if dst.port() == 53 && !self.own.contains(&dst) {
            let log = Arc::clone(&self.log);
            let scope = Arc::clone(&sandbox);
            let _ = dns::serve_tcp(stream, &*scope, &self.upstream, |o| {
                log_dns(&*log, &sandbox, o);
            })
            .await;
            return;
        }
        let key = (
            record.cgroup_id,
            record.tgid,
            record.exe,
            record.parent_tgid,
        );
        let identity = match self.recent_identity(&key) {
            Some(resolved) => Ok(Ok(resolved)),
            None => {
                let identities = Arc::clone(&self);
                let cgroup_path = sandbox.cgroup_path().to_owned();
                let resolved = tokio::task::spawn_blocking(move || {
                    let me = identities.identities.executable(record.tgid, record.exe)?;
                    let ancestors = identities.identities.ancestors(
                        record.tgid,
                        record.parent_tgid,
                        &cgroup_path,
                    )?;
                    Ok::<_, IdentityError>((me, ancestors))
                })
                .await;
                if let Ok(Ok(resolved)) = &resolved {
                    self.remember_identity(key, resolved);
                }
                resolved
            }
        };
        // Read before every fact the decision is made on (see `direct`).
        let epoch = sandbox.direct_epoch();
        let names = sandbox.name_cache().names(dst.ip(), Instant::now());
        let mut facts = Facts {
            sandbox: Arc::clone(&sandbox),
            pid: record.tgid,
            binary: None,
            ancestors: Vec::new(),
            ancestor_paths: Vec::new(),
            names,
            dst,
        };
        // Subscribed before reading the generation: a reload after this point re-judges the
        // connection (below), so none can slip between its decision and its revocation watch.
        let mut updates = sandbox.subscribe();
        let generation = Arc::clone(&updates.borrow_and_update());
        match identity {
            Ok(Ok((binary, ancestors))) => {
                facts.ancestor_paths = ancestors.iter().map(|b| b.path.to_path_buf()).collect();
                facts.binary = Some(binary);
                facts.ancestors = ancestors;
            }
            Ok(Err(e)) => {
                let binary = match &e {
                    IdentityError::IntegrityViolation { path, .. } => {
                        Some(path.display().to_string())
                    }
                    _ => None,
                };
                self.log.record(self.record_for(
                    &facts,
                    &generation,
                    binary,
                    None,
                    Verdict::Deny,
                    e.to_string(),
                ));
                relay::reset(&stream);
                return;
            }
            Err(e) => {
                self.log.record(self.record_for(
                    &facts,
                    &generation,
                    None,
                    None,
                    Verdict::Deny,
                    format!("resolving the calling binary failed: {e}"),
                ));
                relay::reset(&stream);
                return;
            }
        }
        let (host, decision) = self.decide(&facts, &generation);
        let binary = facts.binary.as_ref().map(|b| b.path.display().to_string());
        self.log.record(
            self.record_for(
                &facts,
                &generation,
                binary.clone(),
                Some(&host),
                decision.verdict,
                decision.reason.to_string(),
            )
            .with_block(decision.block.as_deref()),
        );
        if decision.verdict != Verdict::Allow {
            relay::reset(&stream);
            return;
        }
        if let Inspection::Http { terminate_tls } = decision.inspection {
            self.inspect(stream, &facts, &host, binary, terminate_tls, updates)
                .await;
            return;
        }
        self.write_verdict(&record, &facts, &generation, epoch, (&host, &decision));
        let upstream = match tokio::time::timeout(self.dial_timeout, TcpStream::connect(dst)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(_)) | Err(_) => {
                relay::reset(&stream);
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let revoked = self.revoked(&facts, updates);
        let revoke_future = async move {
            let why = revoked.await;
            let _ = tx.send(why);
        };
        let outcome = relay::relay(
            stream,
            upstream,
            self.relay,
            self.kernel_relay.as_deref(),
            revoke_future,
        )
        .await;
        if matches!(outcome.end, RelayEnd::Revoked)
            && let Ok(why) = rx.await
        {
            self.log_revoked(&facts, binary, &host, why);
        }
    }

    /// Hands the kernel a verdict for connections like this allowed one, when nothing outside
    /// the verdict's key could change the decision (see [`super::direct`]).
    fn write_verdict(
        self: &Arc<Self>,
        record: &ConnectRecord,
        facts: &Facts,
        generation: &Generation,
        epoch: u64,
        decided: (&str, &Decision),
    ) {
        let Some(direct) = &self.direct else { return };
        let raw = &record.raw;
        let (Some(binary), Some(exe)) = (&facts.binary, record.exe) else {
            return;
        };
        // The file the proxy hashed is the one the kernel saw (any write or link moves ctime).
        let same_version = binary.ctime == (raw.exe_ctime_sec, i64::from(raw.exe_ctime_nsec));
        // An address resolved from several names: which one a connection meant decides the
        // block it is logged under, and that order changes with every answer.
        let one_name = facts.names.len() <= 1;
        if epoch == 0 || !raw.has_exe() || raw.exe_nlink != 1 || !same_version || !one_name {
            return;
        }
        // Allowed by the executable alone: the kernel does not see the next caller's ancestors.
        let judged_alone;
        let (host, decision) = if facts.ancestor_paths.is_empty() {
            decided
        } else {
            let alone = Facts {
                sandbox: Arc::clone(&facts.sandbox),
                pid: facts.pid,
                binary: facts.binary.clone(),
                ancestors: Vec::new(),
                ancestor_paths: Vec::new(),
                names: facts.names.clone(),
                dst: facts.dst,
            };
            judged_alone = self.decide(&alone, generation);
            (judged_alone.0.as_str(), &judged_alone.1)
        };
        if decision.verdict != Verdict::Allow
            || decision.audit
            || !matches!(decision.inspection, Inspection::None)
        {
            return;
        }
        let names_expire = if facts.names.is_empty() {
            None
        } else {
            Some(
                facts
                    .sandbox
                    .name_cache()
                    .soonest_expiry(facts.dst.ip(), Instant::now())
                    .unwrap_or_else(Instant::now),
            )
        };
        let written = direct.write(NewVerdict {
            key: openshell_common::VerdictKey::of_record(raw),
            epoch,
            names_expire,
            facts: VerdictFacts {
                binary: binary.clone(),
                exe,
                host: host.to_owned(),
                block: decision.block.as_deref().map(str::to_owned),
                reason: decision.reason.to_string(),
                revision: generation.revision(),
            },
        });
        if written {
            self.watch_direct(&facts.sandbox);
        }
    }

    /// Starts (once per sandbox) the task that judges the sandbox's direct connections again
    /// after each policy change.
    fn watch_direct(self: &Arc<Self>, sandbox: &Arc<SandboxNet>) {
        let cgroup = sandbox.cgroup_id();
        let weak = Arc::downgrade(sandbox);
        {
            let mut watched = self
                .direct_watched
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // A sandbox that replaced another of the same cgroup gets its own watch.
            if watched.get(&cgroup).is_some_and(|w| w.ptr_eq(&weak)) {
                return;
            }
            watched.insert(cgroup, weak.clone());
        }
        let mut updates = sandbox.subscribe();
        updates.borrow_and_update();
        let me = Arc::clone(self);
        tokio::spawn(async move {
            // Ends when the sandbox is dropped (its sender with it).
            while updates.changed().await.is_ok() {
                updates.borrow_and_update();
                let Some(sandbox) = weak.upgrade() else { break };
                let me2 = Arc::clone(&me);
                let _ = tokio::task::spawn_blocking(move || me2.rejudge_direct(&sandbox)).await;
            }
            let mut watched = me
                .direct_watched
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if watched.get(&cgroup).is_some_and(|w| w.ptr_eq(&weak)) {
                watched.remove(&cgroup);
            }
        });
    }

    /// Judges every open direct connection of `sandbox` under its generation in force and
    /// aborts the ones it no longer allows (their peers get a reset), logging each. Runs on a
    /// blocking thread: it looks again a few times, for connects that were passing the
    /// kernel's check while the generation changed (their entry or their port appears a moment
    /// later).
    fn rejudge_direct(&self, sandbox: &Arc<SandboxNet>) {
        let mut judged = std::collections::HashSet::new();
        for pass in 0..REJUDGE_PASSES {
            if pass > 0 {
                std::thread::sleep(REJUDGE_AGAIN_AFTER);
            }
            let pending = self.rejudge_direct_once(sandbox, &mut judged);
            if pending == 0 && pass > 0 {
                break;
            }
        }
    }

    /// One pass of [`Proxy::rejudge_direct`]; returns how many connections had no port yet.
    fn rejudge_direct_once(
        &self,
        sandbox: &Arc<SandboxNet>,
        judged: &mut std::collections::HashSet<u64>,
    ) -> usize {
        let Some(direct) = &self.direct else { return 0 };
        let conns = match direct.kernel().direct_connections() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("proxy: listing direct connections: {e}");
                return 0;
            }
        };
        let generation = sandbox.generation();
        let mut pending = 0;
        for (cookie, conn) in conns {
            if conn.cgroup_id != sandbox.cgroup_id() || judged.contains(&cookie) {
                continue;
            }
            let dst = crate::ebpf::endpoint_addr(&conn.dst);
            let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
            let known = direct.facts(conn.id);
            let facts = Facts {
                sandbox: Arc::clone(sandbox),
                pid: conn.tgid,
                binary: known.as_ref().map(|k| k.binary.clone()),
                ancestors: Vec::new(),
                ancestor_paths: Vec::new(),
                names: sandbox.name_cache().names(dst.ip(), Instant::now()),
                dst,
            };
            let (host, decision) = self.decide(&facts, &generation);
            if decision.verdict == Verdict::Allow {
                continue;
            }
            let local = crate::ebpf::endpoint_addr(&conn.local);
            if local.port() == 0 {
                // Its SYN has not left yet: it has no address to abort it by. The next pass.
                pending += 1;
                continue;
            }
            judged.insert(cookie);
            match super::sockdiag::destroy_tcp(local, crate::ebpf::endpoint_addr(&conn.dst), cookie)
            {
                Ok(true) => {
                    let binary = facts.binary.as_ref().map(|b| b.path.display().to_string());
                    self.log_revoked(
                        &facts,
                        binary,
                        &host,
                        (Some(Arc::clone(&generation)), decision.reason.to_string()),
                    );
                }
                Ok(false) => {}
                Err(e) => eprintln!("proxy: closing direct connection {local} -> {dst}: {e}"),
            }
        }
        pending
    }

    /// Writes the decision-log line of every connection that went direct.
    async fn direct_events(self: Arc<Self>, events: aya::maps::RingBuf<aya::maps::MapData>) {
        // SAFETY: the ring buffer owns its map's file descriptor, which stays open and the
        // same for as long as the `AsyncFd` owns the ring buffer.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE)
        };
        let Ok(mut events) = registered else {
            eprintln!("proxy: direct connections are not logged: cannot poll the event ring");
            return;
        };
        loop {
            // Woken by the first event after the ring was drained (the programs ask for a
            // wake-up only then); later ones are collected every `DIRECT_LOG_EVERY` until a look
            // finds none, so a busy sandbox costs a wake-up per window, not per connection.
            let Ok(mut guard) = events.readable_mut().await else {
                return;
            };
            // Cleared before draining: a wake-up for an event after the drain is kept.
            guard.clear_ready();
            drop(guard);
            loop {
                let mut batch = Vec::new();
                let ring = events.get_mut();
                while let Some(item) = ring.next() {
                    if let Some(event) = parse_direct_event(&item) {
                        batch.push(event);
                    }
                }
                if batch.is_empty() {
                    break;
                }
                for event in batch {
                    self.log_direct(event).await;
                }
                tokio::time::sleep(DIRECT_LOG_EVERY).await;
            }
        }
    }

    async fn log_direct(self: &Arc<Self>, event: openshell_common::DirectEvent) {
        let Some(direct) = &self.direct else { return };
        let Some(sandbox) = self.registry.get(event.cgroup_id) else {
            return;
        };
        let dst = crate::ebpf::endpoint_addr(&event.dst);
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        // The facts outlive their verdict by a time to live; the fallback below is a safety net.
        let known = direct.facts(event.id);
        let ancestors = match &known {
            Some(known) => self.direct_ancestors(&sandbox, &event, known).await,
            None => Vec::new(),
        };
        self.log.record(DecisionRecord {
            time_ms: now_ms(),
            sandbox: sandbox.name().to_owned(),
            decision: "allow".to_owned(),
            binary: known.as_ref().map(|k| k.binary.path.display().to_string()),
            pid: Some(i64::from(event.tgid)),
            ancestors: ancestors
                .iter()
                .map(|a| a.path.display().to_string())
                .collect(),
            host: known.as_ref().map(|k| k.host.clone()),
            ip: Some(dst.ip().to_string()),
            port: Some(dst.port()),
            block: known.as_ref().and_then(|k| k.block.clone()),
            reason: known.as_ref().map_or_else(
                || "went direct on a verdict of the proxy that is no longer known".to_owned(),
                |k| k.reason.clone(),
            ),
            revision: known.as_ref().map(|k| k.revision),
        });
    }

    /// The ancestors of the process behind a direct connection, as the proxy resolves them for
    /// a relayed one (reusing a recent resolution of the same process).
    async fn direct_ancestors(
        self: &Arc<Self>,
        sandbox: &SandboxNet,
        event: &openshell_common::DirectEvent,
        known: &VerdictFacts,
    ) -> Vec<Binary> {
        let key = (
            event.cgroup_id,
            event.tgid,
            Some(known.exe),
            Some(event.parent_tgid),
        );
        if let Some((_, ancestors)) = self.recent_identity(&key) {
            return ancestors;
        }
        let me = Arc::clone(self);
        let cgroup_path = sandbox.cgroup_path().to_owned();
        let (tgid, parent) = (event.tgid, event.parent_tgid);
        let ancestors = tokio::task::spawn_blocking(move || {
            me.identities.ancestors(tgid, Some(parent), &cgroup_path)
        })
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
        self.remember_identity(key, &(known.binary.clone(), ancestors.clone()));
        ancestors
    }

    /// Resolves when a new generation of the sandbox no longer allows the connection judged
    /// on `facts` (or the sandbox is removed), with that generation and the reason.
    async fn revoked(
        &self,
        facts: &Facts,
        mut updates: tokio::sync::watch::Receiver<Arc<Generation>>,
    ) -> (Option<Arc<Generation>>, String) {
        loop {
            if updates.changed().await.is_err() {
                // The sandbox is gone: nothing can allow the connection any more.
                return (None, String::from("the sandbox was removed"));
            }
            let generation = Arc::clone(&updates.borrow_and_update());
            let (_, decision) = self.decide(facts, &generation);
            if decision.verdict != Verdict::Allow {
                return (Some(generation), decision.reason.to_string());
            }
        }
    }

    fn log_revoked(
        &self,
        facts: &Facts,
        binary: Option<String>,
        host: &str,
        (generation, reason): (Option<Arc<Generation>>, String),
    ) {
        let generation = generation.unwrap_or_else(|| facts.sandbox.generation());
        self.log.record(self.record_for(
            facts,
            &generation,
            binary,
            Some(host),
            Verdict::Deny,
            format!(
                "open connection closed: policy revision {} no longer allows it: {reason}",
                generation.revision()
            ),
        ));
    }

    /// Serves an allowed connection to a `protocol: rest` endpoint with HTTP inspection until
    /// it ends, or until a new generation no longer allows the connection (then it is reset).
    async fn inspect(
        &self,
        stream: TcpStream,
        facts: &Facts,
        host: &str,
        binary: Option<String>,
        terminate_tls: bool,
        updates: tokio::sync::watch::Receiver<Arc<Generation>>,
    ) {
        // A second handle on the client socket, to reset it if the connection is revoked.
        let Ok(client) = stream
            .as_fd()
            .try_clone_to_owned()
            .map(socket2::Socket::from)
        else {
            relay::reset(&stream);
            return;
        };
        let sandbox = &facts.sandbox;
        let ctx = InspectContext {
            sandbox: Arc::from(sandbox.name()),
            host: Arc::from(host),
            port: facts.dst.port(),
            upstream: vec![facts.dst],
            binary: facts
                .binary
                .as_ref()
                .map(|b| b.path.to_path_buf())
                .unwrap_or_default(),
            ancestors: facts.ancestor_paths.clone(),
            pid: facts.pid,
            terminate_tls,
            ca: sandbox.ca(),
            upstream_tls: Arc::clone(&self.upstream_tls),
            policy: Arc::new(CurrentGeneration(Arc::clone(sandbox))),
            log: Arc::new(RequestDecisions {
                log: Arc::clone(&self.log),
                ancestors: facts
                    .ancestors
                    .iter()
                    .map(|a| a.path.display().to_string())
                    .collect(),
                ip: facts.dst.ip(),
            }),
        };
        tokio::select! {
            // A failed handshake or broken framing ends this connection only; the requests
            // that were decided are in the log already.
            _ = inspect::serve(stream, ctx) => {}
            why = self.revoked(facts, updates) => {
                // The serving future (and its handle on the socket) is dropped with this
                // select; ours is then the last one, and closing it sends the reset.
                let _ = client.set_linger(Some(Duration::ZERO));
                self.log_revoked(facts, binary, host, why);
            }
        }
        drop(client);
    }

    /// Judges the connection under `generation`: by each name the sandbox resolved to the
    /// address (the first that allows wins), else by the address as an IP literal.
    fn decide(&self, facts: &Facts, generation: &Generation) -> (String, Decision) {
        let dst = facts.dst;
        let binary = facts.binary.as_ref().map_or(Path::new(""), |b| &*b.path);
        let ip_text = dst.ip().to_string();
        if self
            .own
            .iter()
            .any(|own| own == &dst || (own.port() == dst.port() && own.ip().is_unspecified()))
        {
            return (
                ip_text,
                Decision {
                    verdict: Verdict::Deny,
                    audit: false,
                    block: None,
                    reason: crate::policy::Reason::ForbiddenAddress {
                        ip: dst.ip(),
                        class: crate::policy::Forbidden::Loopback,
                    },
                    inspection: crate::policy::Inspection::None,
                    endpoint: None,
                    canonical_target: None,
                },
            );
        }
        let decide = |host: &str| {
            generation.policy().decide_connection(&ConnectionQuery {
                host,
                port: dst.port(),
                binary,
                ancestors: &facts.ancestor_paths,
                dest_ip: Some(dst.ip()),
            })
        };
        let mut first: Option<(String, Decision)> = None;
        for name in &facts.names {
            let d = decide(name);
            if d.verdict == Verdict::Allow {
                return (name.to_string(), d);
            }
            first.get_or_insert((name.to_string(), d));
        }
        if let Some(denied) = first {
            return denied;
        }
        let d = decide(&ip_text);
        (ip_text, d)
    }

    fn record_for(
        &self,
        facts: &Facts,
        generation: &Generation,
        binary: Option<String>,
        host: Option<&str>,
        verdict: Verdict,
        reason: String,
    ) -> DecisionRecord {
        DecisionRecord {
            time_ms: now_ms(),
            sandbox: facts.sandbox.name().to_owned(),
            decision: match verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
            }
            .to_owned(),
            binary,
            pid: Some(i64::from(facts.pid)),
            ancestors: facts
                .ancestors
                .iter()
                .map(|a| a.path.display().to_string())
                .collect(),
            host: host.map(str::to_owned),
            ip: Some(facts.dst.ip().to_string()),
            port: Some(facts.dst.port()),
            block: None,
            reason,
            revision: Some(generation.revision()),
        }
    }

    async fn dns_loop(self: Arc<Self>, socket: Arc<UdpSocket>, limit: Arc<Semaphore>) {
        let Ok(local) = socket.local_addr() else {
            return;
        };
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(_) => continue,
            };
            let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                continue;
            };
            let query = buf[..n].to_vec();
            let (me, socket) = (Arc::clone(&self), Arc::clone(&socket));
            tokio::spawn(async move {
                let _permit = permit;
                me.handle_dns(&socket, local, from, &query).await;
            });
        }
    }

    async fn handle_dns(
        &self,
        socket: &UdpSocket,
        local: SocketAddr,
        from: SocketAddr,
        query: &[u8],
    ) {
        let cgroup = match super::sockdiag::udp_socket_cgroup(from, local) {
            Ok(Some(id)) => id,
            Ok(None) | Err(_) => return,
        };
        let Some(sandbox) = self.registry.get(cgroup) else {
            // Not a sandbox: no answer.
            return;
        };
        let (reply, outcome) = dns::answer(query, &*sandbox, &self.upstream, true).await;
        log_dns(&*self.log, &sandbox, &outcome);
        if let Some(reply) = reply {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

/// Keeps the kernel's deadline for verdicts ahead of now while the proxy runs, and drops the
/// facts of long expired verdicts now and then.
async fn keep_alive(direct: Arc<DirectPath>) {
    let mut tick = tokio::time::interval(super::direct::KEEP_ALIVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    loop {
        tick.tick().await;
        direct.keep_alive();
        n = n.wrapping_add(1);
        if n.is_multiple_of(64) {
            // Lists the open direct connections: a map walk, off the runtime's threads.
            let d = Arc::clone(&direct);
            let _ = tokio::task::spawn_blocking(move || d.purge()).await;
        }
    }
}

/// A [`openshell_common::DirectEvent`] from the bytes of a ring-buffer item (`None` if it is
/// too short to be one).
fn parse_direct_event(bytes: &[u8]) -> Option<openshell_common::DirectEvent> {
    if bytes.len() < std::mem::size_of::<openshell_common::DirectEvent>() {
        return None;
    }
    // SAFETY: `DirectEvent` is `repr(C)` and made only of integers, so any bytes are a valid
    // value; `bytes` holds at least its size, and `read_unaligned` needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// Logs DNS refusals and dropped answers (resolutions that succeeded are not decisions).
fn log_dns(log: &dyn DecisionLog, sandbox: &SandboxNet, outcome: &DnsOutcome) {
    let revision = Some(sandbox.generation().revision());
    let base = |host: &str, ip: Option<IpAddr>, reason: String| DecisionRecord {
        time_ms: now_ms(),
        sandbox: sandbox.name().to_owned(),
        decision: "deny".to_owned(),
        binary: None,
        pid: None,
        ancestors: Vec::new(),
        host: Some(host.to_owned()),
        ip: ip.map(|i| i.to_string()),
        port: Some(53),
        block: None,
        reason,
        revision,
    };
    match outcome {
        DnsOutcome::Refused { name } => log.record(base(
            name,
            None,
            format!("DNS query for {name}: no block of the policy allows this name; answered NXDOMAIN without asking upstream"),
        )),
        DnsOutcome::Resolved { name, dropped, .. } if !dropped.is_empty() => {
            let list: Vec<String> = dropped.iter().map(ToString::to_string).collect();
            log.record(base(
                name,
                dropped.first().copied(),
                format!(
                    "DNS answer for {name}: dropped {} (always-denied, or private without a matching allowed_ips)",
                    list.join(", ")
                ),
            ));
        }
        _ => {}
    }
}

/// The generation in force for a sandbox, read again for every inspected request.
struct CurrentGeneration(Arc<SandboxNet>);

impl PolicySource for CurrentGeneration {
    fn current(&self) -> inspect::Generation {
        inspect_generation(&self.0.generation())
    }

    /// Ends when the sandbox is removed (its sender is dropped).
    fn updates(&self) -> futures_util::stream::BoxStream<'static, inspect::Generation> {
        inspect::generations_from(self.0.subscribe(), |g| inspect_generation(g))
    }
}

fn inspect_generation(generation: &Generation) -> inspect::Generation {
    inspect::Generation {
        policy: generation.shared_policy(),
        revision: generation.revision(),
    }
}

/// Writes inspected request decisions to the proxy's decision log, beside the connection
/// decisions.
struct RequestDecisions {
    log: Arc<dyn DecisionLog>,
    ancestors: Vec<String>,
    ip: IpAddr,
}

impl RequestLog for RequestDecisions {
    fn record(&self, record: RequestRecord) {
        self.log
            .record(request_decision(record, &self.ancestors, self.ip));
    }
}

/// The decision-log entry of one inspected request. Its reason always names the method and the
/// target the client sent (its path alone when the target names the connection's own
/// destination, as every HTTP/2 request does).
fn request_decision(record: RequestRecord, ancestors: &[String], ip: IpAddr) -> DecisionRecord {
    let request = format!(
        "{} {}",
        record.method,
        own_path(&record.target, &record.host, record.port)
    );
    let reason = if record.reason.starts_with(&format!("{request} ")) {
        record.reason
    } else {
        format!("{request}: {}", record.reason)
    };
    DecisionRecord {
        time_ms: now_ms(),
        sandbox: record.sandbox.to_string(),
        decision: match record.decision {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
        .to_owned(),
        binary: Some(record.binary.display().to_string()),
        pid: Some(i64::from(record.pid)),
        ancestors: ancestors.to_vec(),
        host: Some(record.host.to_string()),
        ip: Some(ip.to_string()),
        port: Some(record.port),
        block: record.block.map(|b| b.to_string()),
        reason,
        revision: Some(record.revision),
    }
}

/// `target` without its scheme and authority when they name `host:port` (default port allowed).
fn own_path<'a>(target: &'a str, host: &str, port: u16) -> &'a str {
    let Ok(uri) = target.parse::<http::Uri>() else {
        return target;
    };
    let ours = uri.authority().is_some_and(|a| {
        a.host().eq_ignore_ascii_case(host) && a.port_u16().is_none_or(|p| p == port)
    });
    match (ours, uri.path_and_query()) {
        (true, Some(pq)) => &target[target.len() - pq.as_str().len()..],
        _ => target,
    }
}

trait WithBlock {
    fn with_block(self, block: Option<&str>) -> Self;
}

impl WithBlock for DecisionRecord {
    fn with_block(mut self, block: Option<&str>) -> Self {
        self.block = block.map(str::to_owned);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_events_are_read_whole_from_ring_bytes() {
        let event = openshell_common::DirectEvent {
            id: 7,
            cookie: 0x1122_3344_5566_7788,
            cgroup_id: 99,
            tgid: 4242,
            parent_tgid: 1,
            dst: openshell_common::Endpoint::v4(
                openshell_common::Ipv4Be::from_octets([198, 18, 0, 10]),
                443,
            ),
            _pad: 0,
        };
        let size = std::mem::size_of::<openshell_common::DirectEvent>();
        // SAFETY: test only: the bytes of a plain `repr(C)` value, as the kernel writes them.
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw const event).cast::<u8>(), size) }.to_vec();
        // The ring buffer hands items at 8-byte alignment plus its header; any offset works.
        let mut shifted = vec![0u8; 1];
        shifted.extend_from_slice(&bytes);
        assert_eq!(parse_direct_event(&bytes), Some(event));
        assert_eq!(parse_direct_event(&shifted[1..]), Some(event));
        assert_eq!(parse_direct_event(&bytes[..size - 1]), None);
        assert_eq!(
            crate::ebpf::endpoint_addr(&event.dst),
            "198.18.0.10:443".parse::<SocketAddr>().unwrap()
        );
    }

    fn record(method: &str, target: &str, decision: Verdict, reason: &str) -> RequestRecord {
        RequestRecord {
            sandbox: Arc::from("box"),
            binary: PathBuf::from("/usr/bin/curl"),
            pid: 42,
            host: Arc::from("api.github.com"),
            port: 443,
            method: method.to_owned(),
            target: target.to_owned(),
            decision,
            audit: false,
            block: Some(Arc::from("github_repos")),
            reason: reason.to_owned(),
            revision: 3,
        }
    }

    #[test]
    fn request_decisions_name_method_and_target_once() {
        let ip: IpAddr = [198, 18, 0, 10].into();
        let ancestors = vec!["/usr/bin/bash".to_owned()];
        let allowed = request_decision(
            record(
                "GET",
                "/repos/o/alpha-repo",
                Verdict::Allow,
                "allowed by block github_repos",
            ),
            &ancestors,
            ip,
        );
        let denied = request_decision(
            record(
                "DELETE",
                "/repos/o/bravo-repo",
                Verdict::Deny,
                "DELETE /repos/o/bravo-repo not permitted by block github_repos",
            ),
            &ancestors,
            ip,
        );
        let shown = |r: &DecisionRecord| {
            format!(
                "{} {:?} {:?} {:?} {:?} {:?} {:?} rev {:?}: {}",
                r.decision,
                r.binary,
                r.pid,
                r.ancestors,
                r.host,
                r.ip,
                r.port,
                r.revision,
                r.reason
            )
        };
        insta::assert_snapshot!(format!("{}\n{}", shown(&allowed), shown(&denied)), @r#"
        allow Some("/usr/bin/curl") Some(42) ["/usr/bin/bash"] Some("api.github.com") Some("198.18.0.10") Some(443) rev Some(3): GET /repos/o/alpha-repo: allowed by block github_repos
        deny Some("/usr/bin/curl") Some(42) ["/usr/bin/bash"] Some("api.github.com") Some("198.18.0.10") Some(443) rev Some(3): DELETE /repos/o/bravo-repo not permitted by block github_repos
        "#);
        assert_eq!(denied.block.as_deref(), Some("github_repos"));
        let h2 = request_decision(
            record(
                "GET",
                "https://api.github.com/x?y=1",
                Verdict::Allow,
                "allowed",
            ),
            &ancestors,
            ip,
        );
        assert_eq!(h2.reason, "GET /x?y=1: allowed");
        let elsewhere = request_decision(
            record("GET", "http://evil.example/x", Verdict::Deny, "refused"),
            &ancestors,
            ip,
        );
        assert_eq!(elsewhere.reason, "GET http://evil.example/x: refused");
    }
}
