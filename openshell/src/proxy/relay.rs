//! Relaying an allowed TCP stream between the sandboxed client and the upstream server.
//!
//! Two engines with the same contract ([`RelayMode`]):
//! - [`RelayMode::Splice`] moves bytes socket → pipe → socket with `splice(2)`, so payload never
//!   enters user space. One pipe per direction; both ends are driven by tokio's readiness, so a
//!   relay costs no thread.
//! - [`RelayMode::Copy`] reads into a user-space buffer per direction and writes it out; the
//!   buffer grows with the stream, up to [`RELAY_BUFFER`].
//!
//! `BENCHMARKS.md` ("Proxy L4") has both measured against direct connections; the proxy uses
//! [`RelayMode::default`], the faster one there (copy).
//!
//! Half-close: when one side finishes sending (`read` returns 0), the relay shuts down the write
//! half towards the other side and keeps relaying the opposite direction until it ends too. Any
//! error in either direction ends both, and the sockets are closed with RST (`SO_LINGER` 0) so
//! that the peers see the failure instead of a clean end of stream.
//!
//! A relay can be ended from outside (a new policy generation no longer allows the connection):
//! the `revoked` future passed to [`relay`] resolves, and both sockets are reset.

use std::{
    future::Future,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{TcpStream, tcp},
};

/// Largest buffer of [`RelayMode::Copy`] per direction, and pipe size of [`RelayMode::Splice`].
pub const RELAY_BUFFER: usize = 256 * 1024;
/// First buffer of [`RelayMode::Copy`] per direction (it grows up to [`RELAY_BUFFER`]).
const FIRST_BUFFER: usize = 16 * 1024;

/// How the bytes are moved. See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelayMode {
    /// `splice(2)` through a pipe per direction.
    Splice,
    /// Copy through a user-space buffer per direction (up to [`RELAY_BUFFER`] bytes). The
    /// default: it measured faster than splice on this machine (BENCHMARKS.md, "Proxy L4").
    #[default]
    Copy,
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides finished sending (clean close, half-closes included).
    Finished,
    /// A socket error ended the relay (for example a reset by either peer).
    Failed(io::Error),
    /// The `revoked` future resolved: the connection is no longer allowed.
    Revoked,
}

/// What a relay moved and how it ended.
#[derive(Debug)]
pub struct RelayOutcome {
    /// Bytes sent from the client to the upstream.
    pub sent: u64,
    /// Bytes sent from the upstream to the client.
    pub received: u64,
    pub end: RelayEnd,
}

/// Relays `client` ⇄ `upstream` until both directions end, an error occurs, or `revoked`
/// resolves. Both sockets are closed when this returns.
pub async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    mode: RelayMode,
    revoked: impl Future<Output = ()>,
) -> RelayOutcome {
    let counters = Counters::default();
    let result = tokio::select! {
        r = run(&mut client, &mut upstream, mode, &counters) => r.map(|()| RelayEnd::Finished),
        () = revoked => Ok(RelayEnd::Revoked),
    };
    let end = result.unwrap_or_else(RelayEnd::Failed);
    if !matches!(end, RelayEnd::Finished) {
        reset(&client);
        reset(&upstream);
    }
    RelayOutcome {
        sent: counters.sent.load(Ordering::Relaxed),
        received: counters.received.load(Ordering::Relaxed),
        end,
    }
}

/// Makes the next close of `stream` send RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    // Failing to set the option only means the peer sees FIN instead of RST.
    let _ = stream.set_zero_linger();
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

async fn run(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mode: RelayMode,
    counters: &Counters,
) -> io::Result<()> {
    match mode {
        RelayMode::Copy => {
            let (client_r, client_w) = client.split();
            let (upstream_r, upstream_w) = upstream.split();
            let up = copy_direction(client_r, upstream_w, &counters.sent);
            let down = copy_direction(upstream_r, client_w, &counters.received);
            tokio::try_join!(up, down).map(|_| ())
        }
        RelayMode::Splice => {
            let up_pipe = Pipe::new()?;
            let down_pipe = Pipe::new()?;
            let (client_r, client_w) = client.split();
            let (upstream_r, upstream_w) = upstream.split();
            let up = splice_direction(client_r, upstream_w, &up_pipe, &counters.sent);
            let down = splice_direction(upstream_r, client_w, &down_pipe, &counters.received);
            tokio::try_join!(up, down).map(|_| ())
        }
    }
}

/// Moves bytes `from` → `to` through a buffer until `from` reaches end of stream, then shuts
/// down the write half of `to`.
///
/// The buffer starts at [`FIRST_BUFFER`] and doubles, up to [`RELAY_BUFFER`], each time a read
/// fills it, so a short exchange (most connections) never pays for a large buffer, and a bulk
/// stream soon moves [`RELAY_BUFFER`] bytes per system call. It is never zeroed: reads fill the
/// spare capacity directly.
async fn copy_direction(
    mut from: tcp::ReadHalf<'_>,
    mut to: tcp::WriteHalf<'_>,
    total: &AtomicU64,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(FIRST_BUFFER);
    loop {
        buf.clear();
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            return shutdown_write(to.as_ref().as_raw_fd());
        }
        to.write_all(&buf).await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.capacity() && buf.capacity() < RELAY_BUFFER {
            buf.reserve_exact((2 * buf.capacity()).min(RELAY_BUFFER));
        }
    }
}

/// Moves bytes `from` → pipe → `to` until `from` reaches end of stream, then shuts down the
/// write half of `to`.
async fn splice_direction(
    from: tcp::ReadHalf<'_>,
    to: tcp::WriteHalf<'_>,
    pipe: &Pipe,
    total: &AtomicU64,
) -> io::Result<()> {
    let from_fd = from.as_ref().as_raw_fd();
    let to_fd = to.as_ref().as_raw_fd();
    loop {
        // The pipe is empty here (every chunk is drained below), so EAGAIN can only come from
        // the socket, which is what `try_io` assumes when it clears the readiness.
        let n = loop {
            from.as_ref().readable().await?;
            match from.as_ref().try_io(Interest::READABLE, || {
                splice(from_fd, pipe.write_fd(), RELAY_BUFFER)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return shutdown_write(to_fd);
        }
        let mut left = n;
        while left > 0 {
            to.as_ref().writable().await?;
            match to
                .as_ref()
                .try_io(Interest::WRITABLE, || splice(pipe.read_fd(), to_fd, left))
            {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice into the socket moved no bytes",
                    ));
                }
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: `fd` is a socket owned by a live TcpStream borrowed by the caller.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // The peer may already be gone; the other direction reports that if it matters.
    if err.raw_os_error() == Some(libc::ENOTCONN) {
        Ok(())
    } else {
        Err(err)
    }
}

/// One `splice(2)` call that never blocks.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (owned by the caller's
    // TcpStream and Pipe); null offsets are required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A non-blocking pipe sized to [`RELAY_BUFFER`] (or the system's maximum, if smaller).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds: [libc::c_int; 2] = [-1; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = libc::c_int::try_from(RELAY_BUFFER).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_SETPIPE_SZ on an open pipe descriptor. A failure (size above
        // /proc/sys/fs/pipe-max-size for an unprivileged caller) keeps the default size, which
        // is only slower.
        let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        Ok(Self { read, write })
    }

    fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A connected pair of TCP streams on loopback: (the side we hand to the relay, its peer).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (b.unwrap().0, a.unwrap())
    }

    /// Starts a relay between two fresh pairs and returns (client end, upstream end, relay task,
    /// revoke sender).
    async fn start(
        mode: RelayMode,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<RelayOutcome>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (proxy_client_side, client) = pair().await;
        let (proxy_upstream_side, server) = pair().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(relay(proxy_client_side, proxy_upstream_side, mode, async {
            // A dropped sender means "never revoked".
            if rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        }));
        (client, server, task, tx)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    async fn both_directions_with_half_close(mode: RelayMode) {
        let (mut client, mut server, task, _revoke) = start(mode).await;
        let request = pattern(3 * 1024 * 1024 + 17);
        let response = pattern(5 * 1024 * 1024 + 3);
        let expected_request = request.clone();
        let server_side = tokio::spawn(async move {
            // The server reads until the client's half-close, then answers: the response must
            // still reach the client after its write side is shut.
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, expected_request);
            server.write_all(&response).await.unwrap();
            server.shutdown().await.unwrap();
            response
        });
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(TIMEOUT, client.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        let response = server_side.await.unwrap();
        assert_eq!(got, response);
        let outcome = tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
        assert!(matches!(outcome.end, RelayEnd::Finished), "{outcome:?}");
        assert_eq!(outcome.sent, request.len() as u64);
        assert_eq!(outcome.received, response.len() as u64);
    }

    #[tokio::test]
    async fn splice_relays_both_directions_and_half_close() {
        both_directions_with_half_close(RelayMode::Splice).await;
    }

    #[tokio::test]
    async fn copy_relays_both_directions_and_half_close() {
        both_directions_with_half_close(RelayMode::Copy).await;
    }

    async fn revoke_resets_both_sides(mode: RelayMode) {
        let (mut client, mut server, task, revoke) = start(mode).await;
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        revoke.send(()).unwrap();
        let outcome = tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
        assert!(matches!(outcome.end, RelayEnd::Revoked), "{outcome:?}");
        for side in [&mut client, &mut server] {
            let mut rest = Vec::new();
            let err = tokio::time::timeout(TIMEOUT, side.read_to_end(&mut rest))
                .await
                .unwrap()
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        }
    }

    #[tokio::test]
    async fn splice_revoke_resets_both_sides() {
        revoke_resets_both_sides(RelayMode::Splice).await;
    }

    #[tokio::test]
    async fn copy_revoke_resets_both_sides() {
        revoke_resets_both_sides(RelayMode::Copy).await;
    }

    #[tokio::test]
    async fn upstream_reset_propagates_to_client() {
        let (mut client, server, task, _revoke) = start(RelayMode::Splice).await;
        reset(&server);
        drop(server);
        let outcome = tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
        assert!(matches!(outcome.end, RelayEnd::Failed(_)), "{outcome:?}");
        let mut rest = Vec::new();
        let err = tokio::time::timeout(TIMEOUT, client.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
