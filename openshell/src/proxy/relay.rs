//! Relaying an allowed TCP stream between the sandboxed client and the upstream server.
//!
//! Three engines with the same contract ([`RelayMode`]):
//! - [`RelayMode::Kernel`] joins the two sockets in the kernel ([`KernelRelay`]): a BPF stream
//!   verdict program sends each segment one socket receives out of the other, so bytes never
//!   wake user space. User space only watches for end of stream and errors (see "Kernel relay"
//!   below). Without a [`KernelRelay`], or when joining fails, it relays as [`RelayMode::Copy`].
//! - [`RelayMode::Splice`] moves bytes socket → pipe → socket with `splice(2)`, so payload never
//!   enters user space. One pipe per direction; both ends are driven by tokio's readiness, so a
//!   relay costs no thread.
//! - [`RelayMode::Copy`] reads into a user-space buffer per direction and writes it out; the
//!   buffer grows with the stream, up to [`RELAY_BUFFER`].
//!
//! `BENCHMARKS.md` ("Proxy L4") has them measured against direct connections; the proxy uses
//! [`RelayMode::default`] (copy, the best bulk throughput there; kernel has the lowest round
//! trip).
//!
//! Half-close: when one side finishes sending (`read` returns 0), the relay shuts down the write
//! half towards the other side and keeps relaying the opposite direction until it ends too. Any
//! error in either direction ends both, and the sockets are closed with RST (`SO_LINGER` 0) so
//! that the peers see the failure instead of a clean end of stream.
//!
//! Kernel relay: the order of the bytes holds because user space reads a direction only after
//! taking it away from the kernel ([`Joined::stop`]), and writes what it read only after the
//! kernel has handed every byte it forwarded to the sending socket:
//! - Normally a socket is readable only at end of stream or on error. When it is readable
//!   (peeked, not read), user space stops the kernel forwarding that direction, then reads.
//!   Reading takes the socket lock, under which the kernel runs the verdict program, so once
//!   the read returns, the kernel's count of forwarded bytes ([`Joined::sent`]) is final.
//! - The kernel queues forwarded segments on the peer and sends them from a worker. User space
//!   waits until the peer's TCP stream holds them (acknowledged + queued bytes, from
//!   `TCP_INFO` and `SIOCOUTQ`, against the same sum taken when the pair was joined) before it
//!   writes anything of its own or shuts the peer's write side (half-close).
//! - Bytes the program left on a socket (its peer was not joined yet, or is gone) make the
//!   socket readable, so user space takes that direction over as above.
//!
//! Backpressure: the kernel charges the segments it queues on the peer to neither socket, so a
//! slow reader alone does not slow the sender down (measured: a client wrote 1 GiB towards a
//! server that read nothing). The program therefore forwards a direction only within a credit
//! (`RelayPeer::credit`) that user space raises, on the wake-ups above and on a timer paced by
//! the direction's rate, to what the peer's stream has taken plus [`KERNEL_BACKLOG`]; beyond it, bytes stay on the socket, charged to
//! it, and user space relays the direction from then on, where a full socket stops the copy
//! and so the sender. Whether user space runs or not, the kernel never holds more than
//! [`KERNEL_BACKLOG`] per direction.
//!
//! The credit also sorts bulk from interactive streams: a direction whose peer keeps up (each
//! exchange drained before the next) stays in the kernel for as long as it lives, however many
//! bytes it moves; the first time the kernel runs [`KERNEL_BACKLOG`] ahead of the peer (the
//! peer's socket buffer is full, which only bulk does), or moves the whole backlog between two
//! looks at the credit (at least [`CREDIT_LOOK_MIN`] apart), the direction moves to user space
//! for good. There the copy relay moves bulk faster than the kernel's sending worker, which retries
//! a full socket only after a jiffy (BENCHMARKS.md, "Proxy L4", session 4).
//!
//! A relay can be ended from outside (a new policy generation no longer allows the connection):
//! the `revoked` future passed to [`relay`] resolves, and both sockets are reset.

use std::{
    future::Future,
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{TcpStream, tcp},
};

use crate::ebpf::{Joined, KernelRelay, Side};

/// Largest buffer of [`RelayMode::Copy`] per direction, and pipe size of [`RelayMode::Splice`].
pub const RELAY_BUFFER: usize = 256 * 1024;
/// Bytes the kernel relay may hold queued for one socket (forwarded, not yet in its TCP
/// stream); a direction that would exceed it goes on in user space.
const KERNEL_BACKLOG: u64 = 1024 * 1024;
/// First buffer of [`RelayMode::Copy`] per direction (it grows up to [`RELAY_BUFFER`]).
const FIRST_BUFFER: usize = 16 * 1024;

/// How the bytes are moved. See the module docs. Chosen with the gateway setting
/// `[proxy] relay = "copy" | "splice" | "kernel"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// In the kernel, through [`KernelRelay`] (copy when it is not available). Lowest round
    /// trip on this machine, but about a third less bulk throughput than copy (BENCHMARKS.md,
    /// "Proxy L4"), so not the default.
    Kernel,
    /// `splice(2)` through a pipe per direction.
    Splice,
    /// Copy through a user-space buffer per direction (up to [`RELAY_BUFFER`] bytes). The
    /// default: the best bulk throughput on this machine (BENCHMARKS.md, "Proxy L4").
    #[default]
    Copy,
}

impl RelayMode {
    /// The name the gateway's settings use for it (`[proxy] relay`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Splice => "splice",
            Self::Copy => "copy",
        }
    }
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
    /// Of `sent` and `received`, the bytes the kernel forwarded ([`RelayMode::Kernel`]).
    pub in_kernel: u64,
    pub end: RelayEnd,
}

/// Relays `client` ⇄ `upstream` until both directions end, an error occurs, or `revoked`
/// resolves. Both sockets are closed when this returns. `kernel` serves [`RelayMode::Kernel`].
pub async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    mode: RelayMode,
    kernel: Option<&KernelRelay>,
    revoked: impl Future<Output = ()>,
) -> RelayOutcome {
    let counters = Counters::default();
    let joined = match (mode, kernel) {
        (RelayMode::Kernel, Some(kernel)) => join(kernel, &client, &upstream),
        _ => None,
    };
    let mode = match (mode, &joined) {
        (RelayMode::Kernel, None) => RelayMode::Copy,
        _ => mode,
    };
    let result = tokio::select! {
        r = async {
            match &joined {
                Some((joined, base)) => run_kernel(&client, &upstream, joined, *base, &counters).await,
                None => run(&mut client, &mut upstream, mode, &counters).await,
            }
        } => r.map(|()| RelayEnd::Finished),
        () = revoked => Ok(RelayEnd::Revoked),
    };
    drop(joined);
    let end = result.unwrap_or_else(RelayEnd::Failed);
    if !matches!(end, RelayEnd::Finished) {
        reset(&client);
        reset(&upstream);
    }
    RelayOutcome {
        sent: counters.sent.load(Ordering::Relaxed),
        received: counters.received.load(Ordering::Relaxed),
        in_kernel: counters.in_kernel.load(Ordering::Relaxed),
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
    in_kernel: AtomicU64,
}

async fn run(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mode: RelayMode,
    counters: &Counters,
) -> io::Result<()> {
    match mode {
        RelayMode::Copy | RelayMode::Kernel => {
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

/// Joins `client` and `upstream` in the kernel, with the bytes each socket's stream held before
/// (see [`stream_bytes`]), as (client, upstream). `None`: relay in user space instead.
fn join<'k>(
    kernel: &'k KernelRelay,
    client: &TcpStream,
    upstream: &TcpStream,
) -> Option<(Joined<'k>, (u64, u64))> {
    let base = (
        stream_bytes(client.as_raw_fd()).ok()?,
        stream_bytes(upstream.as_raw_fd()).ok()?,
    );
    let joined = kernel
        .join(client.as_fd(), upstream.as_fd(), KERNEL_BACKLOG)
        .ok()?;
    Some((joined, base))
}

/// Both directions of a joined pair (`client` is side A, `upstream` side B).
async fn run_kernel(
    client: &TcpStream,
    upstream: &TcpStream,
    joined: &Joined<'_>,
    (client_base, upstream_base): (u64, u64),
    counters: &Counters,
) -> io::Result<()> {
    let up = kernel_direction(
        client,
        upstream,
        joined,
        Side::A,
        upstream_base,
        [&counters.sent, &counters.in_kernel],
    );
    let down = kernel_direction(
        upstream,
        client,
        joined,
        Side::B,
        client_base,
        [&counters.received, &counters.in_kernel],
    );
    tokio::try_join!(up, down).map(|_| ())
}

/// One direction of a joined pair: `from` is `side`, `to` the other socket, `to_base` the bytes
/// `to`'s stream held when the pair was joined. Returns once `from` ended and `to`'s write side
/// is shut (after every forwarded byte).
async fn kernel_direction(
    from: &TcpStream,
    to: &TcpStream,
    joined: &Joined<'_>,
    side: Side,
    to_base: u64,
    [total, in_kernel]: [&AtomicU64; 2],
) -> io::Result<()> {
    // The socket wakes us at end of stream, on errors and when bytes stay on it (and on some
    // forwarded segments too); peek to tell those apart.
    // The direction's credit (see `RelayPeer::credit`) is raised to what `to`'s stream took
    // plus [`KERNEL_BACKLOG`]: the kernel takes whatever arrives and charges it to neither
    // socket, so the credit is what bounds the memory it holds; past it the program leaves
    // the bytes on `from`, which then reads as readable here, and user space takes the
    // direction over. The kernel does not wake us for every segment it forwards, so a timer
    // looks at the kernel's count as well, more often the faster the direction moves (see
    // [`next_look`]): a direction whose peer keeps up then never runs out of credit.
    let mut credit = Credit {
        granted: KERNEL_BACKLOG,
        seen: 0,
        pause: CREDIT_LOOK_MIN,
    };
    let look = tokio::time::sleep(credit.pause);
    tokio::pin!(look);
    loop {
        tokio::select! {
            ready = from.readable() => {
                ready?;
                match from.try_io(Interest::READABLE, || peek(from.as_raw_fd())) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        credit.raise(joined, side, to, to_base)?;
                    }
                    Err(e) => return Err(e),
                }
            }
            () = &mut look => {
                let sent = joined.sent(side).map_err(io::Error::other)?;
                credit.pause = next_look(credit.pause, sent - credit.seen.min(sent), credit.granted.saturating_sub(sent));
                credit.seen = sent;
                if sent + KERNEL_BACKLOG / 2 >= credit.granted {
                    credit.raise(joined, side, to, to_base)?;
                }
                look.as_mut().reset(tokio::time::Instant::now() + credit.pause);
            }
        }
    }
    joined.stop(side).map_err(io::Error::other)?;
    // A read attempt (even one that finds nothing) waits for the socket lock, so after it no
    // verdict is running on `from` and the kernel's count is final.
    let mut buf: Vec<u8> = Vec::with_capacity(FIRST_BUFFER);
    let first = match from.try_read_buf(&mut buf) {
        Ok(n) => Some(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => return Err(e),
    };
    let forwarded = joined.sent(side).map_err(io::Error::other)?;
    wait_flushed(to, to_base + forwarded).await?;
    total.fetch_add(forwarded, Ordering::Relaxed);
    in_kernel.fetch_add(forwarded, Ordering::Relaxed);
    match first {
        Some(0) => shutdown_write(to.as_raw_fd()),
        Some(n) => {
            write_all(to, &buf).await?;
            total.fetch_add(n as u64, Ordering::Relaxed);
            copy_shared(from, to, buf, total).await
        }
        None => copy_shared(from, to, buf, total).await,
    }
}

/// Shortest and longest pause between two looks at a joined direction's credit.
const CREDIT_LOOK_MIN: Duration = Duration::from_millis(1);
const CREDIT_LOOK_MAX: Duration = Duration::from_secs(1);

/// The credit of one joined direction, as user space last granted and watched it.
struct Credit {
    /// Bytes the kernel may forward in all (the last grant).
    granted: u64,
    /// The kernel's count at the last look.
    seen: u64,
    /// Until the next look.
    pause: Duration,
}

impl Credit {
    /// Grants what `to`'s stream took plus [`KERNEL_BACKLOG`], when that is at least a quarter
    /// of the backlog more than the last grant.
    fn raise(
        &mut self,
        joined: &Joined<'_>,
        side: Side,
        to: &TcpStream,
        to_base: u64,
    ) -> io::Result<()> {
        let flushed = stream_bytes(to.as_raw_fd())?.saturating_sub(to_base);
        let credit = flushed + KERNEL_BACKLOG;
        if credit >= self.granted + KERNEL_BACKLOG / 4 {
            joined.grant(side, credit).map_err(io::Error::other)?;
            self.granted = credit;
        }
        Ok(())
    }
}

/// The pause before the next look at a credit, after one `pause` long in which the kernel
/// forwarded `moved` bytes and has `left` to go: a quarter of the time the same pace would
/// take to use up what is left, within [`CREDIT_LOOK_MIN`]..[`CREDIT_LOOK_MAX`]; twice the
/// last pause when nothing moved, so an idle direction is looked at about once a second. A
/// direction that would use up its credit within a few milliseconds is bulk, which runs the
/// kernel ahead of its peer and moves to user space anyway.
fn next_look(pause: Duration, moved: u64, left: u64) -> Duration {
    if moved == 0 {
        return pause.saturating_mul(2).min(CREDIT_LOOK_MAX);
    }
    let rounds = u32::try_from(left / moved / 4).unwrap_or(u32::MAX);
    pause
        .saturating_mul(rounds)
        .clamp(CREDIT_LOOK_MIN, CREDIT_LOOK_MAX)
}

/// [`copy_direction`] over shared references (the kernel relay's fallback for one direction).
async fn copy_shared(
    from: &TcpStream,
    to: &TcpStream,
    mut buf: Vec<u8>,
    total: &AtomicU64,
) -> io::Result<()> {
    loop {
        buf.clear();
        from.readable().await?;
        let n = match from.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return shutdown_write(to.as_raw_fd());
        }
        write_all(to, &buf).await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.capacity() && buf.capacity() < RELAY_BUFFER {
            buf.reserve_exact((2 * buf.capacity()).min(RELAY_BUFFER));
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the socket accepted no bytes",
                ));
            }
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `to`'s stream holds `target` bytes (see [`stream_bytes`]): the kernel's worker
/// has moved every forwarded segment into it. Polled, since the kernel signals nothing; this
/// only runs once per direction, at its end or when user space takes it over.
async fn wait_flushed(to: &TcpStream, target: u64) -> io::Result<()> {
    let mut pause = Duration::from_micros(50);
    while stream_bytes(to.as_raw_fd())? < target {
        if let Some(e) = to.take_error()? {
            return Err(e);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    Ok(())
}

/// Bytes written into the socket's TCP stream so far, counted from an arbitrary origin: the
/// bytes the peer acknowledged (`tcpi_bytes_acked`) plus the ones still queued (`SIOCOUTQ`).
/// Read in that order, an acknowledgement in between can only make the sum smaller, never
/// larger than the true count, so a waiter never stops early.
fn stream_bytes(fd: RawFd) -> io::Result<u64> {
    /// Offset of `tcpi_bytes_acked` in `struct tcp_info` (stable kernel ABI since Linux 4.1).
    const BYTES_ACKED: usize = 120;
    let mut info = [0u8; 232];
    let mut len = libc::socklen_t::try_from(info.len()).unwrap_or(0);
    // SAFETY: `fd` is an open socket; `info` and `len` describe a writable buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let acked = info
        .get(BYTES_ACKED..BYTES_ACKED + 8)
        .filter(|_| usize::try_from(len).unwrap_or(0) >= BYTES_ACKED + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_ne_bytes)
        .ok_or_else(|| io::Error::other("TCP_INFO has no tcpi_bytes_acked"))?;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(queued).unwrap_or(0))
}

/// Peeks one byte: `Ok` when the socket has bytes, end of stream or an error to report.
fn peek(fd: RawFd) -> io::Result<()> {
    let mut byte = 0u8;
    // SAFETY: `fd` is an open socket; the buffer is one writable byte.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
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
        let task = tokio::spawn(relay(
            proxy_client_side,
            proxy_upstream_side,
            mode,
            None,
            async {
                // A dropped sender means "never revoked".
                if rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
            },
        ));
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
