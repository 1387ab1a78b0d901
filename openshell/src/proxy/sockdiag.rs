//! Questions and orders about this host's sockets, sent to the kernel with `NETLINK_SOCK_DIAG`.
//!
//! - [`udp_socket_cgroup`]: which cgroup owns a local UDP socket. The DNS listener receives
//!   redirected queries from sandboxed processes and must know which sandbox asked (each sandbox
//!   has its own policy and name cache). A datagram carries only its source address, so the
//!   listener asks the kernel for the socket bound to that address and reads the cgroup v2 id the
//!   kernel reports with it (`INET_DIAG_CGROUP_ID`, Linux 5.9 and later).
//! - [`destroy_tcp`]: aborts one TCP connection of this host from outside the process that owns
//!   it (`SOCK_DESTROY`, what `ss --kill` sends): the owner's next call fails with
//!   `ECONNABORTED` and the peer receives a reset.
//!
//! Relies on: `CONFIG_INET_DIAG` with UDP support (`udp_diag`) and TCP support (`tcp_diag`),
//! `CONFIG_INET_DIAG_DESTROY` and `CAP_NET_ADMIN` for [`destroy_tcp`], the caller in the same
//! network namespace as the socket (sandboxes share the host's). Limits: a client that closes
//! its socket before the lookup cannot be identified, and its query is dropped (it no longer
//! waits anyway); [`destroy_tcp`] finds no socket bound to a network device (`SO_BINDTODEVICE`)
//! unless its address is an IPv6 one with that device as scope id.

use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

/// `nlmsg_type` of a lookup (`linux/sock_diag.h`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `nlmsg_type` of an order to abort one socket (`linux/sock_diag.h`).
const SOCK_DESTROY: u16 = 21;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// Both words of `idiag_cookie` set to `INET_DIAG_NOCOOKIE`: the kernel skips the cookie check.
const NO_COOKIE: u64 = !0;

const NLMSG_HDR_LEN: usize = 16;
/// `struct nlmsgerr` starts with the (negated) errno.
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;
/// Room for any single answer to a request addressed to one socket.
const REPLY_LEN: usize = 8192;

/// The cgroup v2 id of the local UDP socket whose address is `client` and that sent a datagram
/// to `server` (one of our sockets). `Ok(None)` when the kernel knows no such socket.
pub fn udp_socket_cgroup(client: SocketAddr, server: SocketAddr) -> io::Result<Option<u64>> {
    let mut reply = vec![0u8; REPLY_LEN];
    let n = exchange(&udp_lookup_request(client, server).encode(), &mut reply)?;
    parse_response(&reply[..n], client.port())
}

/// Aborts the TCP socket whose local address is `local`, connected to `remote`, with socket
/// cookie `cookie` (as [`tcp_socket_cookie`] reads it; the kernel compares it in the two `u32`
/// words of `idiag_cookie`, low word first). Its owner's next call fails with `ECONNABORTED`
/// and the peer receives a reset (a socket in `TIME_WAIT` or `SYN_RECV` is dropped silently).
/// `Ok(false)` when the kernel knows no such socket (`ENOENT`): it is gone already.
///
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as an `AF_INET6` socket that connected to an
/// IPv4 peer reports them) are looked up as the IPv4 addresses they stand for: the kernel
/// hashes such a connection in its IPv4 tables. The scope id of an IPv6 `local` is the device
/// the socket is bound to (0: none).
///
/// Errors: `InvalidInput` when `local` and `remote` are of different families once mapped
/// addresses are unmapped (no socket has such a pair), or when `cookie` is `u64::MAX`
/// (`INET_DIAG_NOCOOKIE`: the kernel would then skip the check and, when no connection has this
/// address pair, abort the socket listening on `local` instead); `EPERM` without
/// `CAP_NET_ADMIN`; `EOPNOTSUPP` on a kernel without `CONFIG_INET_DIAG_DESTROY`.
pub fn destroy_tcp(local: SocketAddr, remote: SocketAddr, cookie: u64) -> io::Result<bool> {
    let request = tcp_destroy_request(local, remote, cookie)?;
    let mut reply = vec![0u8; REPLY_LEN];
    let n = exchange(&request.encode(), &mut reply)?;
    let (kind, payload) = first_message(&reply[..n])?;
    if kind != NLMSG_ERROR {
        return Err(bad_reply(
            "SOCK_DESTROY was answered with another message than an ack",
        ));
    }
    match error_code(payload)? {
        0 => Ok(true),
        libc::ENOENT => Ok(false),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// The socket cookie of `fd` (`SO_COOKIE`): a number the kernel gives each socket once and
/// never reuses while the system runs, to tell a socket from a later one with the same
/// addresses.
pub fn tcp_socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a live descriptor for the duration of the borrow; `cookie` and `len` are
    // valid for writes and `len` holds the size of `cookie`, which the kernel does not exceed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A request about one socket: a netlink header and a `struct inet_diag_req_v2`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SockRequest {
    /// `nlmsg_type`: [`SOCK_DIAG_BY_FAMILY`] or [`SOCK_DESTROY`].
    kind: u16,
    /// `nlmsg_flags`.
    flags: u16,
    /// `sdiag_family`.
    family: u8,
    /// `sdiag_protocol`.
    protocol: u8,
    /// `idiag_sport` and `idiag_src`: for TCP the socket's own address.
    src: SocketAddr,
    /// `idiag_dport` and `idiag_dst`: for TCP the peer's address.
    dst: SocketAddr,
    /// `idiag_if`: the device the socket is bound to, 0 for none.
    ifindex: u32,
    /// `idiag_cookie`, or [`NO_COOKIE`].
    cookie: u64,
}

impl SockRequest {
    fn encode(&self) -> Vec<u8> {
        let total = NLMSG_HDR_LEN + REQ_LEN;
        let mut msg = Vec::with_capacity(total);
        // struct nlmsghdr
        msg.extend_from_slice(&(total as u32).to_ne_bytes());
        msg.extend_from_slice(&self.kind.to_ne_bytes());
        msg.extend_from_slice(&self.flags.to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        // struct inet_diag_req_v2
        msg.push(self.family);
        msg.push(self.protocol);
        msg.push(0); // idiag_ext: the cgroup id is reported without asking
        msg.push(0);
        msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // every socket state
        // struct inet_diag_sockid
        msg.extend_from_slice(&self.src.port().to_be_bytes());
        msg.extend_from_slice(&self.dst.port().to_be_bytes());
        msg.extend_from_slice(&addr_bytes(self.src.ip()));
        msg.extend_from_slice(&addr_bytes(self.dst.ip()));
        msg.extend_from_slice(&self.ifindex.to_ne_bytes());
        // `sock_diag_check_cookie` compares word 0 with the low half and word 1 with the high.
        msg.extend_from_slice(&(self.cookie as u32).to_ne_bytes());
        msg.extend_from_slice(&((self.cookie >> 32) as u32).to_ne_bytes());
        debug_assert_eq!(msg.len(), total);
        msg
    }
}

fn udp_lookup_request(client: SocketAddr, server: SocketAddr) -> SockRequest {
    SockRequest {
        kind: SOCK_DIAG_BY_FAMILY,
        flags: libc::NLM_F_REQUEST as u16,
        family: family_of(client),
        protocol: libc::IPPROTO_UDP as u8,
        // For UDP the kernel looks the socket up as the receiver of a packet from `src` to
        // `dst`; the socket we want is the one at `client`, receiving from `server`.
        src: server,
        dst: client,
        ifindex: 0,
        cookie: NO_COOKIE,
    }
}

fn tcp_destroy_request(
    local: SocketAddr,
    remote: SocketAddr,
    cookie: u64,
) -> io::Result<SockRequest> {
    if cookie == NO_COOKIE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot destroy the TCP socket {local} -> {remote}: cookie {cookie:#x} is \
                 INET_DIAG_NOCOOKIE, which would let the kernel abort the socket listening on \
                 {local} when no connection has this address pair; pass the connection's \
                 SO_COOKIE (tcp_socket_cookie)"
            ),
        ));
    }
    let (src, dst) = (unmapped(local), unmapped(remote));
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot destroy the TCP socket {local} -> {remote}: one address is IPv4 and \
                 the other IPv6, which no connection has; pass both as the socket reports them \
                 (getsockname and getpeername)"
            ),
        ));
    }
    let ifindex = match src {
        SocketAddr::V6(v6) => v6.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    Ok(SockRequest {
        kind: SOCK_DESTROY,
        // Without NLM_F_ACK the kernel answers a success with silence, and a reader could not
        // tell it from a lost request.
        flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        family: family_of(src),
        protocol: libc::IPPROTO_TCP as u8,
        src,
        dst,
        ifindex,
        cookie,
    })
}

/// `addr`, with an IPv4-mapped IPv6 address replaced by the IPv4 address it stands for.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn family_of(addr: SocketAddr) -> u8 {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    family as u8
}

/// An address as the 16 bytes of `idiag_src`/`idiag_dst` (IPv4 in the first four).
fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// Sends `request` to the kernel on a fresh `NETLINK_SOCK_DIAG` socket and reads the first
/// datagram of its answer into `reply`, returning its length.
fn exchange(request: &[u8], reply: &mut [u8]) -> io::Result<usize> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the buffer is valid for its length; netlink to the kernel (pid 0) needs no address
    // because an unbound netlink socket sends to the kernel by default.
    let sent = unsafe { libc::send(sock.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the buffer is valid and writable for its length. The kernel answers a
    // non-dump request synchronously, before `send` returns, so this does not block for long.
    let n = unsafe { libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn bad_reply(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"))
}

/// The type and the payload of the first netlink message in `buf`.
fn first_message(buf: &[u8]) -> io::Result<(u16, &[u8])> {
    let header = buf
        .get(..NLMSG_HDR_LEN)
        .ok_or_else(|| bad_reply("short reply"))?;
    let len = u32_at(header, 0) as usize;
    let kind = u16::from_ne_bytes([header[4], header[5]]);
    let payload = buf
        .get(NLMSG_HDR_LEN..len)
        .ok_or_else(|| bad_reply("truncated reply"))?;
    Ok((kind, payload))
}

/// The errno (positive, 0 for an ack) of an `NLMSG_ERROR` payload.
fn error_code(payload: &[u8]) -> io::Result<i32> {
    payload
        .get(..4)
        .map(|b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| bad_reply("truncated error"))
}

fn parse_response(buf: &[u8], client_port: u16) -> io::Result<Option<u64>> {
    let (kind, msg) = first_message(buf)?;
    if kind == NLMSG_ERROR {
        return match error_code(msg)? {
            0 | libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(bad_reply("unexpected message type"));
    }
    // inet_diag_msg starts with family, state, timer, retrans, then the socket id whose first
    // field is the socket's own port (network byte order).
    let sport = msg
        .get(4..6)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| bad_reply("short inet_diag_msg"))?;
    if sport != client_port {
        return Err(bad_reply(
            "the kernel reported another socket than the one asked for",
        ));
    }
    let mut attrs = msg
        .get(MSG_LEN..)
        .ok_or_else(|| bad_reply("short inet_diag_msg"))?;
    while attrs.len() >= 4 {
        let attr_len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let attr_type = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if attr_len < 4 || attr_len > attrs.len() {
            return Err(bad_reply("malformed attribute"));
        }
        if attr_type == INET_DIAG_CGROUP_ID {
            let value = attrs
                .get(4..12)
                .ok_or_else(|| bad_reply("short cgroup id attribute"))?;
            let mut id = [0u8; 8];
            id.copy_from_slice(value);
            return Ok(Some(u64::from_ne_bytes(id)));
        }
        let aligned = (attr_len + 3) & !3;
        attrs = attrs.get(aligned..).unwrap_or_default();
    }
    Err(bad_reply(
        "the kernel reported no cgroup id (Linux 5.9 or later is needed)",
    ))
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_ne_bytes(b)
}

const _: () = assert!(size_of::<libc::nlmsghdr>() == NLMSG_HDR_LEN);

#[cfg(test)]
mod tests {
    use std::{
        io::{ErrorKind, Read as _, Write as _},
        net::{TcpListener, TcpStream, UdpSocket},
        os::{fd::AsFd as _, unix::fs::MetadataExt as _},
        time::Duration,
    };

    use super::*;

    /// Bounds every read of the TCP tests, so that a socket that was not aborted fails the test
    /// instead of hanging it.
    const READ_TIMEOUT: Duration = Duration::from_secs(5);

    /// The cgroup v2 id of this process: the inode of its cgroup directory.
    fn own_cgroup_id() -> u64 {
        let mount = crate::cgroup::cgroup2_mount().unwrap();
        let procs = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = procs
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .trim_start_matches('/');
        std::fs::metadata(mount.join(rel)).unwrap().ino()
    }

    #[test]
    fn finds_the_cgroup_of_a_udp_client() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("0.0.0.0:0").unwrap();
        let server_addr = server.local_addr().unwrap();
        client.send_to(b"q", server_addr).unwrap();
        let mut buf = [0u8; 4];
        let (_, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(from.port(), client.local_addr().unwrap().port());
        let id = udp_socket_cgroup(from, server_addr).unwrap();
        assert_eq!(id, Some(own_cgroup_id()));
    }

    #[test]
    fn finds_a_dual_stack_client_sending_to_ipv4() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("[::]:0").unwrap();
        let server_addr = server.local_addr().unwrap();
        let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", server_addr.port())
            .parse()
            .unwrap();
        client.send_to(b"q", mapped).unwrap();
        let mut buf = [0u8; 4];
        let (_, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(
            udp_socket_cgroup(from, server_addr).unwrap(),
            Some(own_cgroup_id())
        );
    }

    #[test]
    fn unknown_socket_is_none() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
        let gone_addr = gone.local_addr().unwrap();
        drop(gone);
        assert_eq!(
            udp_socket_cgroup(gone_addr, server.local_addr().unwrap()).unwrap(),
            None
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn destroy_request_bytes() {
        let request = tcp_destroy_request(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.2:443".parse().unwrap(),
            0x1122_3344_5566_7788,
        )
        .unwrap();
        #[rustfmt::skip]
        let expected: [u8; 72] = [
            // nlmsghdr: length 72, type 21 (SOCK_DESTROY), flags REQUEST|ACK, sequence 1, port 0
            72, 0, 0, 0, 21, 0, 0x05, 0x00, 1, 0, 0, 0, 0, 0, 0, 0,
            // AF_INET, IPPROTO_TCP, no extensions, padding, every state
            2, 6, 0, 0, 0xff, 0xff, 0xff, 0xff,
            // sport 40000, dport 443 (big endian)
            0x9c, 0x40, 0x01, 0xbb,
            // src 127.0.0.1
            127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            // dst 127.0.0.2
            127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            // no interface
            0, 0, 0, 0,
            // cookie: low word, then high word
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,
        ];
        assert_eq!(request.encode(), expected);
    }

    #[test]
    fn destroy_request_fields() {
        let v6 = tcp_destroy_request(
            "[fe80::1%7]:5000".parse().unwrap(),
            "[fe80::2]:80".parse().unwrap(),
            42,
        )
        .unwrap();
        assert_eq!(v6.family, libc::AF_INET6 as u8);
        assert_eq!(v6.ifindex, 7);
        let bytes = v6.encode();
        assert_eq!(&bytes[24..28], &[0x13, 0x88, 0x00, 0x50]);
        assert_eq!(
            &bytes[28..44],
            &"fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&bytes[60..64], &7u32.to_ne_bytes());
        assert_eq!(&bytes[64..68], &42u32.to_ne_bytes());
        assert_eq!(&bytes[68..72], &0u32.to_ne_bytes());

        // An AF_INET6 socket connected to an IPv4 peer lives in the IPv4 tables, and either side
        // may be given in its mapped form.
        let plain = tcp_destroy_request(
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.2:80".parse().unwrap(),
            42,
        )
        .unwrap();
        for (local, remote) in [
            ("[::ffff:127.0.0.1]:5000", "[::ffff:127.0.0.2]:80"),
            ("[::ffff:127.0.0.1]:5000", "127.0.0.2:80"),
            ("127.0.0.1:5000", "[::ffff:127.0.0.2]:80"),
        ] {
            let mapped =
                tcp_destroy_request(local.parse().unwrap(), remote.parse().unwrap(), 42).unwrap();
            assert_eq!(mapped, plain, "{local} -> {remote}");
        }
    }

    #[test]
    fn destroy_request_rejects_what_no_socket_has() {
        let mixed = tcp_destroy_request(
            "127.0.0.1:5000".parse().unwrap(),
            "[::1]:80".parse().unwrap(),
            42,
        )
        .unwrap_err();
        assert_eq!(mixed.kind(), ErrorKind::InvalidInput);
        assert!(
            mixed.to_string().contains("127.0.0.1:5000 -> [::1]:80"),
            "{mixed}"
        );

        let any = destroy_tcp(
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
            u64::MAX,
        )
        .unwrap_err();
        assert_eq!(any.kind(), ErrorKind::InvalidInput);
        assert!(any.to_string().contains("SO_COOKIE"), "{any}");
    }

    #[test]
    fn parses_acks_and_errors() {
        let reply = |errno: i32| {
            let mut buf = Vec::new();
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&[0; 10]);
            buf.extend_from_slice(&(-errno).to_ne_bytes());
            buf.extend_from_slice(&[0; 16]);
            buf
        };
        let ack = reply(0);
        let (kind, payload) = first_message(&ack).unwrap();
        assert_eq!(kind, NLMSG_ERROR);
        assert_eq!(error_code(payload).unwrap(), 0);
        let gone = reply(libc::ENOENT);
        assert_eq!(
            error_code(first_message(&gone).unwrap().1).unwrap(),
            libc::ENOENT
        );
        let truncated = &ack[..20];
        assert_eq!(
            first_message(truncated).unwrap_err().kind(),
            ErrorKind::InvalidData
        );
    }

    #[test]
    fn socket_cookies_are_distinct_and_stable() {
        let (client, server) = connected("127.0.0.1:0", |addr| addr);
        let a = tcp_socket_cookie(client.as_fd()).unwrap();
        let b = tcp_socket_cookie(server.as_fd()).unwrap();
        assert_ne!(a, 0);
        assert_ne!(a, b);
        assert_eq!(tcp_socket_cookie(client.as_fd()).unwrap(), a);
    }

    /// Whether this process may destroy sockets; prints why not when it may not.
    fn privileged() -> bool {
        if nix::unistd::Uid::effective().is_root() {
            return true;
        }
        eprintln!("skipped: SOCK_DESTROY needs CAP_NET_ADMIN (run as root)");
        false
    }

    /// A connection to a fresh listener on `listen`, dialled at `dial(listener address)`:
    /// (client, accepted server side), both with read timeouts.
    fn connected(listen: &str, dial: impl Fn(SocketAddr) -> SocketAddr) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind(listen).unwrap();
        connect_to(&listener, dial)
    }

    fn connect_to(
        listener: &TcpListener,
        dial: impl Fn(SocketAddr) -> SocketAddr,
    ) -> (TcpStream, TcpStream) {
        let client =
            TcpStream::connect_timeout(&dial(listener.local_addr().unwrap()), READ_TIMEOUT)
                .unwrap();
        let (server, _) = listener.accept().unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        }
        (client, server)
    }

    /// Sends one byte each way.
    fn assert_works(client: &mut TcpStream, server: &mut TcpStream) {
        let mut buf = [0u8; 1];
        client.write_all(b"c").unwrap();
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"c");
        server.write_all(b"s").unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"s");
    }

    /// Destroys `victim` by its addresses and cookie, then checks that its owner sees
    /// `ECONNABORTED` and `peer` a reset, and that a second attempt finds nothing.
    fn assert_destroys(victim: &mut TcpStream, peer: &mut TcpStream) {
        assert_works(victim, peer);
        let local = victim.local_addr().unwrap();
        let remote = victim.peer_addr().unwrap();
        let cookie = tcp_socket_cookie(victim.as_fd()).unwrap();
        assert!(
            destroy_tcp(local, remote, cookie).unwrap(),
            "{local} -> {remote}"
        );

        let mut buf = [0u8; 1];
        let aborted = victim.read(&mut buf).unwrap_err();
        assert_eq!(
            aborted.raw_os_error(),
            Some(libc::ECONNABORTED),
            "{aborted}"
        );
        let reset = peer.read(&mut buf).unwrap_err();
        assert_eq!(reset.kind(), ErrorKind::ConnectionReset, "{reset}");

        assert!(
            !destroy_tcp(local, remote, cookie).unwrap(),
            "destroyed twice"
        );
    }

    #[test]
    fn destroys_an_ipv4_connection() {
        if !privileged() {
            return;
        }
        let (mut client, mut server) = connected("127.0.0.1:0", |addr| addr);
        assert_destroys(&mut client, &mut server);
    }

    #[test]
    fn destroys_an_ipv6_connection() {
        if !privileged() {
            return;
        }
        let (mut client, mut server) = connected("[::1]:0", |addr| addr);
        assert_destroys(&mut client, &mut server);
    }

    #[test]
    fn destroys_a_dual_stack_connection_to_ipv4() {
        if !privileged() {
            return;
        }
        let (mut client, mut server) = connected("127.0.0.1:0", |addr| {
            format!("[::ffff:127.0.0.1]:{}", addr.port())
                .parse()
                .unwrap()
        });
        // The client is an AF_INET6 socket and reports mapped addresses.
        assert!(client.local_addr().unwrap().is_ipv6());
        assert_destroys(&mut client, &mut server);
    }

    #[test]
    fn destroys_the_accepted_side_and_spares_the_listener() {
        if !privileged() {
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut client, mut server) = connect_to(&listener, |addr| addr);
        // The second attempt inside looks up listener address -> client address again, which
        // now only the listener matches; the cookie keeps it from being aborted.
        assert_destroys(&mut server, &mut client);
        let (mut client, mut server) = connect_to(&listener, |addr| addr);
        assert_works(&mut client, &mut server);
    }

    #[test]
    fn a_wrong_cookie_destroys_nothing() {
        if !privileged() {
            return;
        }
        let (mut client, mut server) = connected("127.0.0.1:0", |addr| addr);
        let cookie = tcp_socket_cookie(client.as_fd()).unwrap();
        let destroyed = destroy_tcp(
            client.local_addr().unwrap(),
            client.peer_addr().unwrap(),
            cookie.wrapping_add(1),
        )
        .unwrap();
        assert!(!destroyed);
        assert_works(&mut client, &mut server);
    }

    #[test]
    fn an_unknown_connection_is_gone() {
        if !privileged() {
            return;
        }
        // Two ports nothing listens on or connects from.
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (local, remote) = (free(), free());
        assert!(!destroy_tcp(local, remote, 1).unwrap());
    }
}
