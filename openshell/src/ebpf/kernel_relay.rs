//! The kernel side of [`crate::proxy::relay`]'s in-kernel relay: the `openshell_relay` stream
//! verdict program, attached to a socket hash map, forwards every segment one socket of a pair
//! receives out of the other socket, so an allowed stream's bytes never wake user space.
//!
//! [`KernelRelay::join`] puts a pair into the maps and returns a [`Joined`] guard; user space
//! keeps owning both sockets (it still sees end of stream, errors and closes them).
//!
//! What the program does with a segment of socket `s`:
//! - `RELAY_PEERS[s]` holds the peer's cookie and the peer is in the socket map: the segment is
//!   queued for sending on the peer, and `RELAY_SENT[s]` grows by its length.
//! - No `RELAY_PEERS[s]` entry: the segment stays on `s`, for user space to read.
//! - The peer is not in the socket map: as above, and the program deletes `RELAY_PEERS[s]`, so
//!   that no later segment overtakes this one.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    sync::{Mutex, PoisonError},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};
use openshell_common::{RelayPeer, map_names};

use super::{EbpfError, is_not_found, take_map};

/// Map update flag: only replace an existing entry.
const BPF_EXIST: u64 = 2;

/// The program's name in the object.
const PROGRAM: &str = "openshell_relay";

/// The relay maps of one loaded object, with the verdict program attached to the socket map.
pub struct KernelRelay {
    sockets: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, RelayPeer>>,
    sent: Mutex<HashMap<MapData, u64, u64>>,
}

impl std::fmt::Debug for KernelRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelRelay").finish_non_exhaustive()
    }
}

/// Which socket of a [`Joined`] pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The first socket given to [`KernelRelay::join`].
    A,
    /// The second one.
    B,
}

impl KernelRelay {
    /// Takes the relay maps out of `ebpf` and attaches the verdict program to the socket map.
    /// The program stays attached as long as `ebpf` lives.
    pub(super) fn load(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        let sockets: SockHash<MapData, u64> = take_map(ebpf, map_names::RELAY_SOCKETS)?;
        let peers = take_map(ebpf, map_names::RELAY_PEERS)?;
        let sent = take_map(ebpf, map_names::RELAY_SENT)?;
        let map_fd = sockets
            .fd()
            .try_clone()
            .map_err(|e| EbpfError::io(std::path::Path::new(map_names::RELAY_SOCKETS), e))?;
        let program: &mut SkSkb = ebpf
            .program_mut(PROGRAM)
            .ok_or(EbpfError::MissingProgram { program: PROGRAM })?
            .try_into()
            .map_err(|e| EbpfError::program(PROGRAM, e))?;
        program.load().map_err(|e| EbpfError::program(PROGRAM, e))?;
        program
            .attach(&map_fd)
            .map_err(|e| EbpfError::program(PROGRAM, e))?;
        Ok(Self {
            sockets: Mutex::new(sockets),
            peers: Mutex::new(peers),
            sent: Mutex::new(sent),
        })
    }

    /// Makes the kernel forward what `a` receives out of `b` and the other way round, up to
    /// `credit` bytes each way until [`Joined::grant`] raises it.
    ///
    /// Bytes that were already waiting on either socket are pushed through the program too (in
    /// order, before anything newer). On failure nothing stays in the maps, and the caller
    /// relays in user space.
    pub fn join<'a>(
        &'a self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        credit: u64,
    ) -> Result<Joined<'a>, EbpfError> {
        let cookie =
            |fd| cookie(fd).map_err(|e| EbpfError::io(std::path::Path::new("SO_COOKIE"), e));
        let joined = Joined {
            relay: self,
            a: cookie(a)?,
            b: cookie(b)?,
        };
        // The peers and counters first: a socket whose segments arrive before its peer is in
        // the socket map then falls back to user space for good (see the module docs), instead
        // of waiting for a peer entry that would let later segments overtake them.
        {
            let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
            let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
            for (from, to) in [(joined.a, joined.b), (joined.b, joined.a)] {
                sent.insert(from, 0, 0)
                    .map_err(|e| EbpfError::map(map_names::RELAY_SENT, e))?;
                peers
                    .insert(from, RelayPeer { peer: to, credit }, 0)
                    .map_err(|e| EbpfError::map(map_names::RELAY_PEERS, e))?;
            }
        }
        {
            let mut sockets = self.sockets.lock().unwrap_or_else(PoisonError::into_inner);
            for (key, fd) in [(joined.a, a), (joined.b, b)] {
                sockets
                    .insert(key, fd.as_raw_fd(), 0)
                    .map_err(|e| EbpfError::map(map_names::RELAY_SOCKETS, e))?;
            }
        }
        // Bytes that already sit in a receive queue: older kernels run the program over them
        // only when the next segment arrives, and there may be none (a request sent before the
        // proxy accepted, a server's greeting; redbpf issue #281 shows it). Setting
        // SO_RCVLOWAT makes TCP signal "data ready" now, which runs the program over the queue.
        // (On 6.18 the join alone already forwards them; if neither happens, the bytes leave
        // the socket readable and the relay takes that direction over in user space.)
        for fd in [a, b] {
            set_rcvlowat(fd).map_err(|e| EbpfError::io(std::path::Path::new("SO_RCVLOWAT"), e))?;
        }
        Ok(joined)
    }
}

/// A pair of sockets joined in the kernel. Dropping it removes the pair's map entries (the
/// socket map entries go when the sockets close).
#[derive(Debug)]
pub struct Joined<'a> {
    relay: &'a KernelRelay,
    a: u64,
    b: u64,
}

impl Joined<'_> {
    const fn cookie(&self, side: Side) -> u64 {
        match side {
            Side::A => self.a,
            Side::B => self.b,
        }
    }

    /// Stops forwarding what `side` receives: from now on its bytes stay on the socket.
    pub fn stop(&self, side: Side) -> Result<(), EbpfError> {
        let mut peers = self
            .relay
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match peers.remove(&self.cookie(side)) {
            Err(e) if !is_not_found(&e) => Err(EbpfError::map(map_names::RELAY_PEERS, e)),
            _ => Ok(()),
        }
    }

    /// Lets the kernel forward up to `credit` bytes (in total) of what `side` receives. Does
    /// nothing once the direction is stopped (by [`Joined::stop`] or by the program).
    pub fn grant(&self, side: Side, credit: u64) -> Result<(), EbpfError> {
        let (cookie, peer) = match side {
            Side::A => (self.a, self.b),
            Side::B => (self.b, self.a),
        };
        let mut peers = self
            .relay
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // BPF_EXIST: never bring back an entry the program or `stop` deleted.
        match peers.insert(cookie, RelayPeer { peer, credit }, BPF_EXIST) {
            Err(e) if !is_not_found(&e) => Err(EbpfError::map(map_names::RELAY_PEERS, e)),
            _ => Ok(()),
        }
    }

    /// How many bytes the kernel forwarded from what `side` received to the other socket.
    pub fn sent(&self, side: Side) -> Result<u64, EbpfError> {
        let sent = self
            .relay
            .sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        sent.get(&self.cookie(side), 0)
            .map_err(|e| EbpfError::map(map_names::RELAY_SENT, e))
    }
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        // Missing entries are fine (a side stopped); other failures leave entries that the next
        // pair with the same cookies would overwrite (cookies are never reused).
        for side in [Side::A, Side::B] {
            let _ = self.stop(side);
            let mut sent = self
                .relay
                .sent
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let _ = sent.remove(&self.cookie(side));
        }
        let mut sockets = self
            .relay
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for key in [self.a, self.b] {
            let _ = sockets.remove(&key);
        }
    }
}

/// The socket's cookie (`SO_COOKIE`), the key of the relay maps.
fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap_or(8);
    // SAFETY: `fd` is an open socket; `value` and `len` describe a writable u64.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_rcvlowat(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is an open socket; the option value is a readable c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
