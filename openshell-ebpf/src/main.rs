//! openshell's eBPF programs, attached to each sandbox's cgroup. Built only for the BPF target;
//! DESIGN.md describes the data flow and `openshell::ebpf` loads them.
//!
//! - `connect4`/`connect6`: TCP is recorded under the socket cookie and rewritten to the
//!   transparent listener; UDP to port 53 goes to the DNS listener; other UDP gets EPERM.
//! - `sock_ops` (TCP_CONNECT_CB): copies the record under the client's source address and port,
//!   which is what the proxy sees after `accept()`; (STATE_CB) drops it again if the handshake
//!   fails, since the proxy never accepts such a connection.
//! - `sendmsg4`/`sendmsg6`: unconnected UDP, same rule as UDP connect.
//! - `recvmsg4`/`recvmsg6`: answers from the DNS listener carry the resolver's address again.
//! - `getpeername4`/`getpeername6`: the program sees the destination it asked for.
//! - `sock_release`: drops the cookie-keyed record when the socket goes away.
//! - `bind4`/`bind6`: listeners stay on loopback. A wildcard bind is rewritten to loopback
//!   (except `[::]:0`, see `openshell_common::decide::bind6_action`), a bind to any other
//!   non-loopback address gets EPERM.
//! - `relay` (sk_skb stream verdict, attached to the relay socket map, not to a cgroup): once
//!   the proxy has allowed a connection it may put both of its sockets (client side, upstream
//!   side) into the map; each segment received on one is then sent out of the other without
//!   waking user space. A socket without a peer entry, or whose peer is gone, keeps its bytes
//!   for user space, and from then on always does (`openshell::proxy::relay` explains why the
//!   order of the bytes holds).
//! - `ingress` (cgroup_skb): `listen()` or `sendto()` without `bind()` autobinds to the wildcard
//!   address and never runs `bind4`/`bind6`; this program drops every inbound packet for a
//!   sandboxed socket that did not arrive on the loopback device for a loopback address. The
//!   sandbox's own traffic all goes to the loopback listeners of the gateway, so its answers
//!   (TCP from the proxy, UDP from the DNS listener, addressed to the socket's loopback source)
//!   pass; `recvmsg4/6` restore the DNS source in the `sockaddr` only, the packet is untouched.
//!
//! - The direct path: `connect4`/`connect6` first look for a verdict of the proxy
//!   (`OPENSHELL_VERDICTS`) for this executable version, sandbox and destination. A verdict of
//!   the cgroup's current epoch, not expired, while the gateway is alive, lets the connect go
//!   to its destination unchanged; the socket is entered in `OPENSHELL_DIRECT` (so `ingress`
//!   lets its packets in and user space can close it after a policy change) and an event goes
//!   to the ring buffer for the decision log. Without one, or if either cannot be written, the
//!   connect goes to the proxy as always. `openshell::ebpf::FastPath` says when the proxy
//!   writes a verdict.
//!
//! Every program has a one-line entry that calls `try_x` and states what happens when `try_x`
//! fails. The default is closed: a connect or send that cannot be handled is refused.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
        bpf_sock_addr, sk_action,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_get_socket_cookie},
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops, stream_verdict},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use openshell_common::{
    AF_INET, AF_INET6, CgroupMode, Config, ConnectRecord, Counter, DIRECT_CAPACITY,
    DIRECT_EVENTS_BYTES, DirectConn, DirectEvent, Endpoint, Ipv4Be, Ipv6Be, KernelDev,
    KernelOffsets, MODE_CAPACITY, PeerKey, PortBe, RECORD_CAPACITY, RELAY_CAPACITY, RelayPeer,
    VERDICT_CAPACITY, Verdict, VerdictKey,
    decide::{
        Action, BindAction, PacketDst, bind4_action, bind6_action, connect_action, ingress_allowed,
        sendmsg_action,
    },
};

/// Return value of a `cgroup/*` program that lets the call proceed.
const ALLOW: i32 = 1;
/// Return value of a `cgroup/connect*` or `cgroup/sendmsg*` program that refuses the call: the
/// caller gets EPERM.
const DENY: i32 = 0;
/// Return value of a `cgroup_skb` program that lets the packet through.
const PASS: i32 = 1;
/// Return value of a `cgroup_skb` program that drops the packet.
const DROP: i32 = 0;

#[map(name = "OPENSHELL_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "OPENSHELL_BY_COOKIE")]
static BY_COOKIE: LruHashMap<u64, ConnectRecord> = LruHashMap::with_max_entries(RECORD_CAPACITY, 0);

#[map(name = "OPENSHELL_BY_PEER")]
static BY_PEER: LruHashMap<PeerKey, ConnectRecord> =
    LruHashMap::with_max_entries(RECORD_CAPACITY, 0);

#[map(name = "OPENSHELL_MODES")]
static MODES: HashMap<u64, u32> = HashMap::with_max_entries(MODE_CAPACITY, 0);

/// Flag of the relay maps: entries are allocated when a relay starts, not all up front, since
/// most gateways relay in user space (`RelayMode::Copy`) and never fill them.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "OPENSHELL_RELAY_SOCKETS")]
static RELAY_SOCKETS: SockHash<u64> = SockHash::with_max_entries(RELAY_CAPACITY, 0);

#[map(name = "OPENSHELL_RELAY_PEERS")]
static RELAY_PEERS: HashMap<u64, RelayPeer> =
    HashMap::with_max_entries(RELAY_CAPACITY, BPF_F_NO_PREALLOC);

#[map(name = "OPENSHELL_RELAY_SENT")]
static RELAY_SENT: HashMap<u64, u64> = HashMap::with_max_entries(RELAY_CAPACITY, BPF_F_NO_PREALLOC);

#[map(name = "OPENSHELL_VERDICTS")]
static VERDICTS: LruHashMap<VerdictKey, Verdict> =
    LruHashMap::with_max_entries(VERDICT_CAPACITY, 0);

#[map(name = "OPENSHELL_EPOCHS")]
static EPOCHS: HashMap<u64, u64> = HashMap::with_max_entries(MODE_CAPACITY, 0);

#[map(name = "OPENSHELL_ALIVE")]
static ALIVE: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "OPENSHELL_DIRECT")]
static DIRECT: HashMap<u64, DirectConn> =
    HashMap::with_max_entries(DIRECT_CAPACITY, BPF_F_NO_PREALLOC);

#[map(name = "OPENSHELL_DIRECT_EVENTS")]
static DIRECT_EVENTS: RingBuf = RingBuf::with_byte_size(DIRECT_EVENTS_BYTES, 0);

#[map(name = "OPENSHELL_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Why a program could not finish; every value leads to the program's documented failure mode.
#[derive(Clone, Copy)]
enum Error {
    /// The config map has no entry (cannot happen for an array map, kept for the verifier).
    NoConfig,
    /// Storing the connection record failed.
    Record,
    /// The IP header of a packet could not be read, or it is neither IPv4 nor IPv6.
    Packet,
}

// ---------------------------------------------------------------------------------------------
// Entries. Each states its failure mode.

/// Fail closed: a TCP connect that cannot be recorded and redirected is refused (EPERM), since a
/// connect left alone would go direct.
#[cgroup_sock_addr(connect4)]
pub fn openshell_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx).unwrap_or(DENY)
}

/// Fail closed, as `connect4`.
#[cgroup_sock_addr(connect6)]
pub fn openshell_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(DENY)
}

/// Fail closed: a UDP datagram that cannot be redirected is refused (EPERM).
#[cgroup_sock_addr(sendmsg4)]
pub fn openshell_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sendmsg4(&ctx).unwrap_or(DENY)
}

/// Fail closed, as `sendmsg4`.
#[cgroup_sock_addr(sendmsg6)]
pub fn openshell_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sendmsg6(&ctx).unwrap_or(DENY)
}

/// Fail open, forced by the kernel (a recvmsg program must return 1): without a record the
/// answer keeps the DNS listener's address, and a strict resolver drops it.
#[cgroup_sock_addr(recvmsg4)]
pub fn openshell_recvmsg4(ctx: SockAddrContext) -> i32 {
    try_recvmsg4(&ctx);
    ALLOW
}

/// Fail open, forced by the kernel, as `recvmsg4`.
#[cgroup_sock_addr(recvmsg6)]
pub fn openshell_recvmsg6(ctx: SockAddrContext) -> i32 {
    try_recvmsg6(&ctx);
    ALLOW
}

/// Fail open, forced by the kernel (getpeername programs must return 1): without a record the
/// program sees the listener's address, which reveals nothing it could misuse.
#[cgroup_sock_addr(getpeername4)]
pub fn openshell_getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername4(&ctx);
    ALLOW
}

/// Fail open, forced by the kernel, as `getpeername4`.
#[cgroup_sock_addr(getpeername6)]
pub fn openshell_getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername6(&ctx);
    ALLOW
}

/// Fail closed on the proxy side: when the record cannot be re-keyed, the proxy finds nothing
/// for the peer and denies the connection. The return value only reports success to the kernel.
#[sock_ops]
pub fn openshell_sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    1
}

/// Nothing to fail: a record that is not removed here ages out of the LRU map.
#[cgroup_sock(sock_release)]
pub fn openshell_sock_release(ctx: SockContext) -> i32 {
    try_sock_release(&ctx);
    ALLOW
}

/// Nothing to fail: every address gets a verdict, and unknown ones are refused (closed).
#[cgroup_sock_addr(bind4)]
pub fn openshell_bind4(ctx: SockAddrContext) -> i32 {
    bind4(&ctx)
}

/// Nothing to fail, as `bind4`.
#[cgroup_sock_addr(bind6)]
pub fn openshell_bind6(ctx: SockAddrContext) -> i32 {
    bind6(&ctx)
}

/// Fail closed: a packet whose IP header cannot be read is dropped. Every packet the sandbox
/// legitimately receives is one the kernel built or parsed already, so this costs nothing real.
#[cgroup_skb(ingress)]
pub fn openshell_ingress(ctx: SkBuffContext) -> i32 {
    try_ingress(&ctx).unwrap_or_else(|_| drop_packet())
}

/// Fail to user space: a segment that cannot be forwarded stays on its socket, where the
/// proxy reads and relays it (never dropped: TCP has acknowledged it already).
#[stream_verdict]
pub fn openshell_relay(ctx: SkBuffContext) -> u32 {
    relay(&ctx)
}

// ---------------------------------------------------------------------------------------------
// Programs.

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, Error> {
    let cfg = config()?;
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid `bpf_sock_addr` to cgroup sock_addr programs.
    let (ip, port, sock_type, protocol) =
        unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).type_, (*sa).protocol) };
    let dst = Endpoint::v4(Ipv4Be(ip), PortBe(port).to_host());
    match connect_action(cfg.is_configured(), mode(), sock_type, protocol, dst.port) {
        Action::RedirectTcp if cfg.tcp_v4.port == 0 => Ok(deny(Counter::Unconfigured)),
        Action::RedirectTcp => {
            let record = new_record(ctx, cfg, dst, ConnectRecord::FLAG_TCP);
            if go_direct(&record) {
                return Ok(ALLOW);
            }
            store_record(&record)?;
            set_v4(sa, cfg.tcp_v4.addr, cfg.tcp_v4.port);
            count(Counter::TcpRedirected);
            debug!(ctx, "connect4 redirected port {}", dst.port);
            Ok(ALLOW)
        }
        Action::RedirectDns => {
            store_record(&new_record(ctx, cfg, dst, 0))?;
            set_v4(sa, cfg.dns_v4.addr, cfg.dns_v4.port);
            count(Counter::DnsRedirected);
            Ok(ALLOW)
        }
        Action::Deny(counter) => Ok(deny(counter)),
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, Error> {
    let cfg = config()?;
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid `bpf_sock_addr` to cgroup sock_addr programs.
    let (port, sock_type, protocol) = unsafe { ((*sa).user_port, (*sa).type_, (*sa).protocol) };
    let dst = Endpoint::v6(read_ip6(sa), PortBe(port).to_host());
    match connect_action(cfg.is_configured(), mode(), sock_type, protocol, dst.port) {
        Action::RedirectTcp => {
            let (addr, port) = if dst.family == AF_INET {
                (Ipv6Be::mapped(cfg.tcp_v4.addr), cfg.tcp_v4.port)
            } else {
                (cfg.tcp_v6.addr, cfg.tcp_v6.port)
            };
            if port == 0 {
                return Ok(deny(Counter::Unconfigured));
            }
            let record = new_record(ctx, cfg, dst, ConnectRecord::FLAG_TCP);
            if go_direct(&record) {
                return Ok(ALLOW);
            }
            store_record(&record)?;
            set_v6(sa, addr, port);
            count(Counter::TcpRedirected);
            debug!(ctx, "connect6 redirected port {}", dst.port);
            Ok(ALLOW)
        }
        Action::RedirectDns => {
            let (addr, port) = dns_target6(cfg, &dst);
            if port == 0 {
                return Ok(deny(Counter::Unconfigured));
            }
            store_record(&new_record(ctx, cfg, dst, 0))?;
            set_v6(sa, addr, port);
            count(Counter::DnsRedirected);
            Ok(ALLOW)
        }
        Action::Deny(counter) => Ok(deny(counter)),
    }
}

fn try_sendmsg4(ctx: &SockAddrContext) -> Result<i32, Error> {
    let cfg = config()?;
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid `bpf_sock_addr` to cgroup sock_addr programs.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let dst = Endpoint::v4(Ipv4Be(ip), PortBe(port).to_host());
    match sendmsg_action(cfg.is_configured(), mode(), dst.port) {
        Action::RedirectDns => {
            remember_resolver(ctx, dst)?;
            set_v4(sa, cfg.dns_v4.addr, cfg.dns_v4.port);
            count(Counter::DnsRedirected);
            Ok(ALLOW)
        }
        Action::RedirectTcp => Ok(deny(Counter::OtherProtocolDenied)),
        Action::Deny(counter) => Ok(deny(counter)),
    }
}

fn try_sendmsg6(ctx: &SockAddrContext) -> Result<i32, Error> {
    let cfg = config()?;
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid `bpf_sock_addr` to cgroup sock_addr programs.
    let port = unsafe { (*sa).user_port };
    let dst = Endpoint::v6(read_ip6(sa), PortBe(port).to_host());
    match sendmsg_action(cfg.is_configured(), mode(), dst.port) {
        Action::RedirectDns => {
            let (addr, port) = dns_target6(cfg, &dst);
            if port == 0 {
                return Ok(deny(Counter::Unconfigured));
            }
            remember_resolver(ctx, dst)?;
            set_v6(sa, addr, port);
            count(Counter::DnsRedirected);
            Ok(ALLOW)
        }
        Action::RedirectTcp => Ok(deny(Counter::OtherProtocolDenied)),
        Action::Deny(counter) => Ok(deny(counter)),
    }
}

fn try_recvmsg4(ctx: &SockAddrContext) {
    let Ok(cfg) = config() else { return };
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid `bpf_sock_addr` to cgroup sock_addr programs.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    if ip != cfg.dns_v4.addr.0 || PortBe(port).to_host() != cfg.dns_v4.port {
        return;
    }
    if let Some(orig) = lookup_cookie(ctx)
        && let Some(v4) = orig.as_v4()
    {
        set_v4(sa, v4, orig.port);
    }
}

fn try_recvmsg6(ctx: &SockAddrContext) {
    let Ok(cfg) = config() else { return };
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid `bpf_sock_addr` to cgroup sock_addr programs.
    let port = PortBe(unsafe { (*sa).user_port }).to_host();
    let src = read_ip6(sa);
    let from_dns = match src.to_mapped_v4() {
        Some(v4) => v4 == cfg.dns_v4.addr && port == cfg.dns_v4.port,
        None => src == cfg.dns_v6.addr && port == cfg.dns_v6.port,
    };
    if !from_dns {
        return;
    }
    if let Some(orig) = lookup_cookie(ctx) {
        set_v6(sa, orig.addr, orig.port);
    }
}

fn try_getpeername4(ctx: &SockAddrContext) {
    if let Some(orig) = lookup_cookie(ctx)
        && let Some(v4) = orig.as_v4()
    {
        set_v4(ctx.sock_addr, v4, orig.port);
    }
}

fn try_getpeername6(ctx: &SockAddrContext) {
    if let Some(orig) = lookup_cookie(ctx) {
        set_v6(ctx.sock_addr, orig.addr, orig.port);
    }
}

fn try_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => rekey_by_peer(ctx),
        BPF_SOCK_OPS_STATE_CB => forget_unaccepted(ctx),
        _ => {}
    }
}

/// Copies the cookie-keyed record under the client's source address and port, and asks for
/// state callbacks so [`forget_unaccepted`] can drop it if the handshake fails.
fn rekey_by_peer(ctx: &SockOpsContext) {
    // SAFETY: `ctx.as_ptr()` is the `bpf_sock_ops` the kernel passed in; the helper only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(direct) = DIRECT.get_ptr_mut(cookie) {
        // A direct connection: its own address is known now, and user space needs it to close
        // the connection after a policy change.
        let key = peer_key(ctx);
        // SAFETY: the entry is this socket's, written by its own connect just before; an
        // update races only with user space reading a port of 0 (it then skips the socket).
        unsafe { (*direct).local = Endpoint::v6(key.addr, key.port) };
        return;
    }
    // SAFETY: the value is copied out at once; the LRU map may evict the entry afterwards.
    let Some(record) = (unsafe { BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    if BY_PEER.insert(peer_key(ctx), record, 0).is_err() {
        count(Counter::RecordFailed);
        return;
    }
    // Without the callbacks a refused connect leaves its record until the LRU evicts it.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

/// A connect that never got past SYN_SENT (refused, timed out) was never accepted by the proxy,
/// so nobody will look its record up: drop it. Records of established connections stay until
/// the proxy takes them, even if the client closed first.
fn forget_unaccepted(ctx: &SockOpsContext) {
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    if old == BPF_TCP_SYN_SENT && new == BPF_TCP_CLOSE {
        let _ = BY_PEER.remove(peer_key(ctx));
    }
}

/// The client's source address and port (`local_port` is in host byte order in `bpf_sock_ops`).
fn peer_key(ctx: &SockOpsContext) -> PeerKey {
    let port = ctx.local_port() as u16;
    if ctx.family() == u32::from(AF_INET6) {
        PeerKey::v6(local_ip6(ctx), port)
    } else {
        PeerKey::v4(Ipv4Be(ctx.local_ip4()), port)
    }
}

/// Reads `local_ip6` one 32-bit word at a time (see [`read_ip6`]).
fn local_ip6(ctx: &SockOpsContext) -> Ipv6Be {
    let ops = ctx.ops;
    // SAFETY: readable fields of the context the kernel passed in, one 32-bit load each.
    unsafe {
        Ipv6Be([
            core::ptr::read_volatile(core::ptr::addr_of!((*ops).local_ip6[0])),
            core::ptr::read_volatile(core::ptr::addr_of!((*ops).local_ip6[1])),
            core::ptr::read_volatile(core::ptr::addr_of!((*ops).local_ip6[2])),
            core::ptr::read_volatile(core::ptr::addr_of!((*ops).local_ip6[3])),
        ])
    }
}

fn try_sock_release(ctx: &SockContext) {
    // SAFETY: `ctx.as_ptr()` is the `bpf_sock` the kernel passed in; the helper only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A missing entry is the common case (sockets that were never redirected).
    let _ = BY_COOKIE.remove(cookie);
    let _ = DIRECT.remove(cookie);
}

fn relay(ctx: &SkBuffContext) -> u32 {
    // SAFETY: `ctx.as_ptr()` is the `__sk_buff` the kernel passed in; the helper only reads the
    // socket that received it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is plain data, copied out at once.
    let Some(peer) = (unsafe { RELAY_PEERS.get(cookie) }).copied() else {
        return sk_action::SK_PASS;
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN: TCP has processed it already, and the kernel's sending worker would take
        // an empty segment for a failed send (EPIPE on the peer). Nothing to forward.
        return sk_action::SK_DROP;
    }
    let Some(sent) = RELAY_SENT.get_ptr_mut(cookie) else {
        let _ = RELAY_PEERS.remove(cookie);
        return sk_action::SK_PASS;
    };
    // SAFETY: the entry is this socket's; the kernel runs the verdict program of one socket
    // under its lock, so nothing else writes it, and an aligned u64 store is seen whole by
    // user space.
    let before = unsafe { *sent };
    if before + len <= peer.credit
        && RELAY_SOCKETS.redirect_skb(ctx, peer.peer, 0) == i64::from(sk_action::SK_PASS)
    {
        // SAFETY: as above.
        unsafe { *sent = before + len };
        return sk_action::SK_PASS;
    }
    // Out of credit, or the peer left the map (it closed). This segment goes to user space,
    // and so must every later one, or they would overtake it.
    let _ = RELAY_PEERS.remove(cookie);
    sk_action::SK_PASS
}

fn bind4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid `bpf_sock_addr` to cgroup sock_addr programs.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    match bind4_action(Ipv4Be(ip)) {
        BindAction::Allow => ALLOW,
        BindAction::Rewrite(to) => {
            set_v4(sa, to, PortBe(port).to_host());
            count(Counter::BindToLoopback);
            ALLOW
        }
        BindAction::Deny => deny(Counter::BindDenied),
    }
}

fn bind6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid `bpf_sock_addr` to cgroup sock_addr programs.
    let port = PortBe(unsafe { (*sa).user_port }).to_host();
    match bind6_action(read_ip6(sa), port) {
        BindAction::Allow => ALLOW,
        BindAction::Rewrite(to) => {
            set_v6(sa, to, port);
            count(Counter::BindToLoopback);
            ALLOW
        }
        BindAction::Deny => deny(Counter::BindDenied),
    }
}

/// Offset of the destination address in the IPv4 header.
const IPV4_DST: usize = 16;
/// Offset of the destination address in the IPv6 header.
const IPV6_DST: usize = 24;

fn try_ingress(ctx: &SkBuffContext) -> Result<i32, Error> {
    // SAFETY: the kernel passes a valid `__sk_buff`; `ingress_ifindex` is readable for
    // cgroup_skb programs.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // cgroup_skb programs see the packet from its network header on.
    let version = ctx.load::<u8>(0).map_err(|_| Error::Packet)? >> 4;
    let dst = match version {
        4 => PacketDst::V4(Ipv4Be(load_u32(ctx, IPV4_DST)?)),
        6 => PacketDst::V6(Ipv6Be([
            load_u32(ctx, IPV6_DST)?,
            load_u32(ctx, IPV6_DST + 4)?,
            load_u32(ctx, IPV6_DST + 8)?,
            load_u32(ctx, IPV6_DST + 12)?,
        ])),
        _ => return Err(Error::Packet),
    };
    if ingress_allowed(ifindex, dst) {
        return Ok(PASS);
    }
    // SAFETY: `ctx.as_ptr()` is the `__sk_buff` the kernel passed in; the helper only reads the
    // socket the packet was delivered to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: only the presence of the entry is read.
    if unsafe { DIRECT.get(cookie) }.is_some() {
        // An answer on a connection that went direct on the proxy's verdict.
        return Ok(PASS);
    }
    Ok(drop_packet())
}

/// Four packet bytes as they are in memory (network order), the layout of [`Ipv4Be`].
fn load_u32(ctx: &SkBuffContext, offset: usize) -> Result<u32, Error> {
    ctx.load::<u32>(offset).map_err(|_| Error::Packet)
}

fn drop_packet() -> i32 {
    count(Counter::IngressDropped);
    DROP
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn config() -> Result<&'static Config, Error> {
    CONFIG.get(0).ok_or(Error::NoConfig)
}

/// The mode of the calling task's cgroup; no entry means [`CgroupMode::Intercept`].
fn mode() -> CgroupMode {
    // SAFETY: the helper takes no arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out at once.
    match unsafe { MODES.get(cgroup) } {
        Some(raw) => CgroupMode::from_raw(*raw),
        None => CgroupMode::Intercept,
    }
}

fn deny(counter: Counter) -> i32 {
    count(counter);
    DENY
}

fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, so no other program writes it concurrently.
        unsafe { *slot += 1 };
    }
}

/// The record of the current connect: who calls, from which executable, to where.
fn new_record(ctx: &SockAddrContext, cfg: &Config, dst: Endpoint, flags: u32) -> ConnectRecord {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: `ctx.as_ptr()` is the `bpf_sock_addr` the kernel passed in; the helper only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut record = ConnectRecord {
        cookie,
        // SAFETY: the helper takes no arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        flags,
        orig_dst: dst,
        ..ConnectRecord::default()
    };
    if flags & ConnectRecord::FLAG_TCP != 0 {
        match exe_identity(&cfg.offsets) {
            Some(exe) => {
                record.exe_dev = exe.dev;
                record.exe_ino = exe.ino;
                record.parent_tgid = exe.parent_tgid;
                record.exe_nlink = exe.nlink;
                record.exe_ctime_sec = exe.ctime_sec;
                record.exe_ctime_nsec = exe.ctime_nsec;
                record.exe_mnt = exe.mnt;
                record.flags |= ConnectRecord::FLAG_EXE;
            }
            None => count(Counter::ExeUnknown),
        }
    }
    record
}

/// Stores `record` under its socket cookie, for the proxy (and `recvmsg`, `getpeername`).
fn store_record(record: &ConnectRecord) -> Result<(), Error> {
    // A socket whose earlier connect went direct and failed is not direct any more.
    let _ = DIRECT.remove(record.cookie);
    BY_COOKIE.insert(record.cookie, *record, 0).map_err(|_| {
        count(Counter::RecordFailed);
        Error::Record
    })
}

/// Whether the connect of `record` may go to its destination unchanged, on a verdict of the
/// proxy. When it returns `true` the socket is in the direct map and its event is in the ring
/// buffer; otherwise nothing was left behind and the connect goes to the proxy.
fn go_direct(record: &ConnectRecord) -> bool {
    // One path per file: a file with several hard links could be run under a path the verdict
    // was not given for.
    if !record.has_exe() || record.exe_nlink != 1 {
        return false;
    }
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match ALIVE.get(0) {
        Some(until) if now < *until => {}
        _ => return false,
    }
    // SAFETY: the value is copied out at once.
    let Some(epoch) = (unsafe { EPOCHS.get(record.cgroup_id) }).copied() else {
        return false;
    };
    // SAFETY: the value is copied out at once; the LRU map may evict the entry afterwards.
    let Some(verdict) = (unsafe { VERDICTS.get(VerdictKey::of_record(record)) }).copied() else {
        return false;
    };
    if verdict.epoch != epoch || now >= verdict.expires_ns {
        return false;
    }
    let conn = DirectConn {
        id: verdict.id,
        cgroup_id: record.cgroup_id,
        dst: record.orig_dst,
        tgid: record.tgid,
        ..DirectConn::default()
    };
    if DIRECT.insert(record.cookie, conn, 0).is_err() {
        count(Counter::DirectFull);
        return false;
    }
    let event = DirectEvent {
        id: verdict.id,
        cookie: record.cookie,
        cgroup_id: record.cgroup_id,
        tgid: record.tgid,
        parent_tgid: record.parent_tgid,
        dst: record.orig_dst,
        _pad: 0,
    };
    // Wake the reader only for the first event after it drained the ring: while events keep
    // coming it collects them on its own every few milliseconds.
    let wake = if DIRECT_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) == 0 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if DIRECT_EVENTS
        .output::<DirectEvent>(&event, u64::from(wake))
        .is_err()
    {
        // Nothing goes direct unlogged.
        let _ = DIRECT.remove(record.cookie);
        count(Counter::DirectFull);
        return false;
    }
    count(Counter::Direct);
    true
}

/// Remembers the resolver an unconnected UDP socket sent to, for `recvmsg` and `getpeername`.
fn remember_resolver(ctx: &SockAddrContext, dst: Endpoint) -> Result<(), Error> {
    // SAFETY: `ctx.as_ptr()` is the `bpf_sock_addr` the kernel passed in; the helper only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    if let Some(existing) = unsafe { BY_COOKIE.get(cookie) }
        && existing.orig_dst == dst
    {
        return Ok(());
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let record = ConnectRecord {
        cookie,
        tgid: (pid_tgid >> 32) as u32,
        orig_dst: dst,
        ..ConnectRecord::default()
    };
    BY_COOKIE.insert(cookie, record, 0).map_err(|_| {
        count(Counter::RecordFailed);
        Error::Record
    })
}

fn lookup_cookie(ctx: &SockAddrContext) -> Option<Endpoint> {
    // SAFETY: `ctx.as_ptr()` is the `bpf_sock_addr` the kernel passed in; the helper only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    unsafe { BY_COOKIE.get(cookie) }.map(|r| r.orig_dst)
}

/// The nanoseconds in `inode.i_ctime_nsec`, without the kernel's flag bit (`I_CTIME_QUERIED`).
const CTIME_NSEC_MASK: u32 = 0x7fff_ffff;

struct ExeIdentity {
    dev: KernelDev,
    ino: u64,
    parent_tgid: u32,
    nlink: u32,
    ctime_sec: i64,
    ctime_nsec: u32,
    mnt: u64,
}

/// Reads `current → mm → exe_file → (f_path.mnt, f_inode → (i_sb → s_dev, i_ino, i_nlink,
/// i_ctime))` and `current → real_parent → tgid` with the offsets user space resolved from BTF.
fn exe_identity(off: &KernelOffsets) -> Option<ExeIdentity> {
    // SAFETY: the helper takes no arguments and returns the current task_struct's address.
    let task = unsafe { bpf_get_current_task() } as usize;
    let mm: usize = read_kernel(task, off.task_mm)?;
    if mm == 0 {
        // Kernel threads have no mm and no executable.
        return None;
    }
    let exe_file: usize = read_kernel(mm, off.mm_exe_file)?;
    if exe_file == 0 {
        return None;
    }
    let inode: usize = read_kernel(exe_file, off.file_f_inode)?;
    let mnt: u64 = read_kernel(exe_file, off.file_f_path_mnt)?;
    let ino: u64 = read_kernel(inode, off.inode_i_ino)?;
    let sb: usize = read_kernel(inode, off.inode_i_sb)?;
    let dev: u32 = read_kernel(sb, off.sb_s_dev)?;
    let nlink: u32 = read_kernel(inode, off.inode_i_nlink)?;
    let ctime_sec: i64 = read_kernel(inode, off.inode_i_ctime_sec)?;
    // The top bit is the kernel's own flag (multigrain timestamps: "ctime was queried"), not
    // part of the time; nanoseconds never reach it.
    let ctime_nsec = read_kernel::<u32>(inode, off.inode_i_ctime_nsec)? & CTIME_NSEC_MASK;
    let parent: usize = read_kernel(task, off.task_real_parent)?;
    let parent_tgid: u32 = read_kernel(parent, off.task_tgid)?;
    Some(ExeIdentity {
        dev: KernelDev(dev),
        ino,
        parent_tgid,
        nlink,
        ctime_sec,
        ctime_nsec,
        mnt,
    })
}

/// Reads a `T` at `base + offset` in kernel memory; `None` on a null base or a failed read.
fn read_kernel<T>(base: usize, offset: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    let ptr = base.wrapping_add(offset as usize) as *const T;
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(ptr) }.ok()
}

fn set_v4(sa: *mut bpf_sock_addr, addr: Ipv4Be, port: u16) {
    // SAFETY: writable fields of the context the kernel passed in.
    unsafe {
        (*sa).user_ip4 = addr.0;
        (*sa).user_port = PortBe::from_host(port).0;
    }
}

/// Reads `user_ip6` one 32-bit word at a time (the verifier rejects wider context reads).
fn read_ip6(sa: *mut bpf_sock_addr) -> Ipv6Be {
    // SAFETY: readable fields of the context the kernel passed in; each volatile read is one
    // 32-bit load at a constant offset from the context pointer, as the verifier requires.
    unsafe {
        Ipv6Be([
            core::ptr::read_volatile(core::ptr::addr_of!((*sa).user_ip6[0])),
            core::ptr::read_volatile(core::ptr::addr_of!((*sa).user_ip6[1])),
            core::ptr::read_volatile(core::ptr::addr_of!((*sa).user_ip6[2])),
            core::ptr::read_volatile(core::ptr::addr_of!((*sa).user_ip6[3])),
        ])
    }
}

/// Writes `user_ip6` one 32-bit word at a time, and `user_port`.
fn set_v6(sa: *mut bpf_sock_addr, addr: Ipv6Be, port: u16) {
    // SAFETY: writable fields of the context the kernel passed in; each volatile write is one
    // 32-bit store at a constant offset from the context pointer.
    unsafe {
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[0]), addr.0[0]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[1]), addr.0[1]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[2]), addr.0[2]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[3]), addr.0[3]);
        (*sa).user_port = PortBe::from_host(port).0;
    }
}

/// The DNS listener for a destination seen by an IPv6 socket: IPv4 (mapped) resolvers go to the
/// IPv4 listener as `::ffff:a.b.c.d`, IPv6 ones to the IPv6 listener. Port 0: not configured.
fn dns_target6(cfg: &Config, dst: &Endpoint) -> (Ipv6Be, u16) {
    if dst.family == AF_INET {
        (Ipv6Be::mapped(cfg.dns_v4.addr), cfg.dns_v4.port)
    } else {
        (cfg.dns_v6.addr, cfg.dns_v6.port)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
