//! Framing of the exec session (after the HTTP upgrade): one JSON [`ExecEvent`] per line, and
//! file descriptors passed with SCM_RIGHTS attached to the first byte of a line. Used by the
//! gateway (on a non-blocking tokio stream) and by the CLI (on a blocking one). Also the pty
//! helpers the gateway uses to give a command a terminal.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use nix::{
    fcntl::OFlag,
    pty::{grantpt, posix_openpt, ptsname_r, unlockpt},
    sys::{
        socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg},
        stat::Mode,
    },
};

use super::api::ExecEvent;

/// At most this many descriptors ride on one message (stdin, stdout, stderr).
const MAX_FDS: usize = 3;
/// A line longer than this is a protocol error.
const MAX_LINE: usize = 64 * 1024;

/// Sends one event line, with `fds` attached to its first byte. Blocks (or returns
/// `WouldBlock` on a non-blocking socket before anything was sent).
pub fn send_event(
    sock: BorrowedFd<'_>,
    event: &ExecEvent,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
    line.push(b'\n');
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    while sent < line.len() {
        let cmsgs = if sent == 0 && !raw.is_empty() {
            vec![ControlMessage::ScmRights(&raw)]
        } else {
            Vec::new()
        };
        let iov = [IoSlice::new(&line[sent..])];
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            // Only the first chunk may be retried by the caller; later chunks must go out.
            Err(nix::errno::Errno::EAGAIN) if sent > 0 => wait_writable(sock)?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn wait_writable(sock: BorrowedFd<'_>) -> io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(sock, PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::from(1000u16))?;
    Ok(())
}

/// Reassembles event lines from a stream and keeps the descriptors that arrived with them.
#[derive(Debug, Default)]
pub struct EventReader {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    eof: bool,
}

impl EventReader {
    /// Starts with bytes another reader already took off the stream (hyper's read buffer).
    pub fn with_prefix(prefix: &[u8]) -> Self {
        Self {
            buf: prefix.to_vec(),
            ..Self::default()
        }
    }

    /// The next complete event, if one is buffered.
    pub fn next_buffered(&mut self) -> io::Result<Option<ExecEvent>> {
        let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "exec session: line too long",
                ));
            }
            return Ok(None);
        };
        let line: Vec<u8> = self.buf.drain(..=end).collect();
        serde_json::from_slice(&line[..end])
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("exec session: {e}")))
    }

    /// True once the peer closed its end.
    pub fn at_eof(&self) -> bool {
        self.eof
    }

    /// Descriptors received so far, in arrival order.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    /// One `recvmsg`; returns the number of bytes read (0 at end of stream). On a non-blocking
    /// socket this returns `WouldBlock` when nothing is there.
    pub fn fill(&mut self, sock: BorrowedFd<'_>) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg = loop {
            match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other?,
            }
        };
        let n = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel just installed `fd` in our table for us; nothing
                    // else owns it.
                    self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "exec session: too many file descriptors in one message",
            ));
        }
        if n == 0 {
            self.eof = true;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }
}

/// A pseudo-terminal pair; both ends close-on-exec so that no other sandbox inherits them.
#[derive(Debug)]
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a pty with the given window size.
pub fn open_pty(rows: u16, cols: u16) -> io::Result<Pty> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    let slave = nix::fcntl::open(
        Path::new(&name),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let master = OwnedFd::from(master);
    set_window_size(master.as_fd(), rows, cols)?;
    Ok(Pty { master, slave })
}

/// The window size of terminal `fd`.
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the valid pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((ws.ws_row, ws.ws_col))
}

/// Sets the window size of terminal `fd` (the kernel signals SIGWINCH to its foreground group).
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the valid pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsFd, unix::net::UnixStream};

    use super::*;

    #[test]
    fn events_and_fds_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send_event(a.as_fd(), &ExecEvent::Ready, &[]).unwrap();
        send_event(
            a.as_fd(),
            &ExecEvent::Started { pid: 7 },
            &[r.as_fd(), w.as_fd()],
        )
        .unwrap();
        drop(a);
        let mut reader = EventReader::default();
        let mut events = Vec::new();
        for _ in 0..10 {
            while let Some(ev) = reader.next_buffered().unwrap() {
                events.push(ev);
            }
            if reader.fill(b.as_fd()).unwrap() == 0 {
                break;
            }
        }
        assert_eq!(
            events,
            vec![ExecEvent::Ready, ExecEvent::Started { pid: 7 }]
        );
        assert!(reader.at_eof());
        let fds = reader.take_fds();
        assert_eq!(fds.len(), 2);
        // The passed pipe works: write on the received write end, read on the original.
        nix::unistd::write(&fds[1], b"x").unwrap();
        let mut buf = [0u8; 1];
        nix::unistd::read(&r, &mut buf).unwrap();
        assert_eq!(&buf, b"x");
    }

    #[test]
    fn pty_has_requested_size() {
        let pty = open_pty(33, 101).unwrap();
        assert_eq!(window_size(pty.slave.as_fd()).unwrap(), (33, 101));
    }
}
