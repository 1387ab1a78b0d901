//! Which cgroup owns a local UDP socket, asked of the kernel with `NETLINK_SOCK_DIAG`.
//!
//! The DNS listener receives redirected queries from sandboxed processes and must know which
//! sandbox asked (each sandbox has its own policy and name cache). A datagram carries only its
//! source address, so the listener asks the kernel for the socket bound to that address and reads
//! the cgroup v2 id the kernel reports with it (`INET_DIAG_CGROUP_ID`, Linux 5.9 and later).
//!
//! Relies on: `CONFIG_INET_DIAG` with UDP support (`udp_diag`), the caller in the same network
//! namespace as the client (sandboxes share the host's). Limits: a client that closes its socket
//! before the lookup cannot be identified, and its query is dropped (it no longer waits anyway).

use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_CGROUP_ID: u16 = 21;
const INET_DIAG_NOCOOKIE: u32 = !0;

const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;

/// The cgroup v2 id of the local UDP socket whose address is `client` and that sent a datagram
/// to `server` (one of our sockets). `Ok(None)` when the kernel knows no such socket.
pub fn udp_socket_cgroup(client: SocketAddr, server: SocketAddr) -> io::Result<Option<u64>> {
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
    let request = encode_request(client, server);
    // SAFETY: the buffer is valid for its length; netlink to the kernel (pid 0) needs no address
    // because an unbound netlink socket sends to the kernel by default.
    let sent = unsafe { libc::send(sock.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: the buffer is valid and writable for its length. The kernel answers a
    // non-dump request synchronously, before `send` returns, so this does not block for long.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    parse_response(&buf[..n], client.port())
}

fn encode_request(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let family = match client {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    let total = NLMSG_HDR_LEN + REQ_LEN;
    let mut msg = Vec::with_capacity(total);
    // struct nlmsghdr
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    // struct inet_diag_req_v2
    msg.push(family as u8);
    msg.push(libc::IPPROTO_UDP as u8);
    msg.push(0); // idiag_ext: the cgroup id is reported without asking
    msg.push(0);
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // every socket state
    // struct inet_diag_sockid. For UDP the kernel looks the socket up as the receiver of a
    // packet from `src` to `dst`; the socket we want is the one at `client`, receiving from
    // `server`.
    msg.extend_from_slice(&server.port().to_be_bytes());
    msg.extend_from_slice(&client.port().to_be_bytes());
    msg.extend_from_slice(&addr_bytes(server.ip()));
    msg.extend_from_slice(&addr_bytes(client.ip()));
    msg.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    msg.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    msg.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    debug_assert_eq!(msg.len(), total);
    msg
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

fn parse_response(buf: &[u8], client_port: u16) -> io::Result<Option<u64>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    let header = buf.get(..NLMSG_HDR_LEN).ok_or_else(|| bad("short reply"))?;
    let len = u32_at(header, 0) as usize;
    let kind = u16::from_ne_bytes([header[4], header[5]]);
    let msg = buf.get(..len).ok_or_else(|| bad("truncated reply"))?;
    if kind == libc::NLMSG_ERROR as u16 {
        let errno = msg
            .get(NLMSG_HDR_LEN..NLMSG_HDR_LEN + 4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| bad("truncated error"))?;
        return match -errno {
            0 => Ok(None),
            libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(bad("unexpected message type"));
    }
    // inet_diag_msg starts with family, state, timer, retrans, then the socket id whose first
    // field is the socket's own port (network byte order).
    let sport = msg
        .get(NLMSG_HDR_LEN + 4..NLMSG_HDR_LEN + 6)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| bad("short inet_diag_msg"))?;
    if sport != client_port {
        return Err(bad(
            "the kernel reported another socket than the one asked for",
        ));
    }
    let mut attrs = msg
        .get(NLMSG_HDR_LEN + MSG_LEN..)
        .ok_or_else(|| bad("short inet_diag_msg"))?;
    while attrs.len() >= 4 {
        let attr_len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let attr_type = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if attr_len < 4 || attr_len > attrs.len() {
            return Err(bad("malformed attribute"));
        }
        if attr_type == INET_DIAG_CGROUP_ID {
            let value = attrs
                .get(4..12)
                .ok_or_else(|| bad("short cgroup id attribute"))?;
            let mut id = [0u8; 8];
            id.copy_from_slice(value);
            return Ok(Some(u64::from_ne_bytes(id)));
        }
        let aligned = (attr_len + 3) & !3;
        attrs = attrs.get(aligned..).unwrap_or_default();
    }
    Err(bad(
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
    use std::{net::UdpSocket, os::unix::fs::MetadataExt as _};

    use super::*;

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
}
