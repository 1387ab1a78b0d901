//! The kernel side of direct connections: verdicts of the proxy that the connect programs apply
//! alone, so that an allowed connection the proxy has judged before goes straight to its
//! destination at wire speed, with no relay in between.
//!
//! A verdict ([`VerdictKey`] → [`Verdict`]) says: this version of this executable (device,
//! inode, status-change time), reached through this mount, in this sandbox (cgroup), may connect
//! to this destination. The
//! connect program applies it only when all of these hold, and otherwise sends the connect to
//! the proxy as always:
//! - the executable has exactly one hard link, and is reached through the same mount (so it has
//!   one path, the one the proxy judged; a bind mount, such as the sandbox's `/sandbox`, shows a
//!   file at a second path through another mount);
//! - the verdict's epoch is its cgroup's current epoch ([`FastPath::set_epoch`]): user space
//!   moves the epoch on before anything that could change a decision takes effect, which
//!   voids every verdict of that sandbox at once;
//! - the verdict has not expired (user space bounds it by the time to live of the names it
//!   was judged under);
//! - the gateway is alive: it pushes a deadline forward every fraction of a second
//!   ([`FastPath::keep_alive`]); if it stops, verdicts stop counting within that deadline.
//!
//! A connection that goes direct is entered in the direct map under its socket cookie (the
//! `ingress` program lets its packets in; [`FastPath::direct_connections`] lists them so that
//! user space can judge them again after a policy change and abort the ones no longer
//! allowed), and one [`DirectEvent`] goes to the ring buffer for the decision log. If either
//! cannot be written, the connect goes to the proxy: nothing goes direct unlisted or unlogged.

use std::sync::{Mutex, PoisonError};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, RingBuf},
};
use openshell_common::{DirectConn, Verdict, VerdictKey, map_names};

use super::{EbpfError, is_not_found, take_map};

/// The verdict maps of one loaded object.
pub struct FastPath {
    verdicts: Mutex<HashMap<MapData, VerdictKey, Verdict>>,
    epochs: Mutex<HashMap<MapData, u64, u64>>,
    alive: Mutex<Array<MapData, u64>>,
    direct: Mutex<HashMap<MapData, u64, DirectConn>>,
    events: Mutex<Option<RingBuf<MapData>>>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every operation is a single map call: nothing is left half done by a panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FastPath {
    /// Takes the maps out of `ebpf`. Verdicts left by an earlier gateway process are dropped,
    /// and so is its deadline: nothing goes direct until this process says it is alive.
    pub(super) fn load(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        let mut verdicts: HashMap<MapData, VerdictKey, Verdict> =
            take_map(ebpf, map_names::VERDICTS)?;
        let mut alive: Array<MapData, u64> = take_map(ebpf, map_names::ALIVE)?;
        alive
            .set(0, 0, 0)
            .map_err(|e| EbpfError::map(map_names::ALIVE, e))?;
        let stale: Vec<VerdictKey> = verdicts.keys().filter_map(Result::ok).collect();
        for key in stale {
            remove(&mut verdicts, &key, map_names::VERDICTS)?;
        }
        Ok(Self {
            verdicts: Mutex::new(verdicts),
            epochs: Mutex::new(take_map(ebpf, map_names::EPOCHS)?),
            alive: Mutex::new(alive),
            direct: Mutex::new(take_map(ebpf, map_names::DIRECT)?),
            events: Mutex::new(Some(take_map(ebpf, map_names::DIRECT_EVENTS)?)),
        })
    }

    /// Makes `epoch` the current one of `cgroup_id`: verdicts written with any other epoch no
    /// longer count. Epochs must never repeat for one cgroup.
    pub fn set_epoch(&self, cgroup_id: u64, epoch: u64) -> Result<(), EbpfError> {
        lock(&self.epochs)
            .insert(cgroup_id, epoch, 0)
            .map_err(|e| EbpfError::map(map_names::EPOCHS, e))
    }

    /// Forgets `cgroup_id`: none of its connections goes direct any more.
    pub fn forget(&self, cgroup_id: u64) -> Result<(), EbpfError> {
        remove(&mut lock(&self.epochs), &cgroup_id, map_names::EPOCHS)
    }

    /// Writes a verdict. The connect programs apply it from the next connect on.
    pub fn insert(&self, key: VerdictKey, verdict: Verdict) -> Result<(), EbpfError> {
        lock(&self.verdicts)
            .insert(key, verdict, 0)
            .map_err(|e| EbpfError::map(map_names::VERDICTS, e))
    }

    /// Lets verdicts count until `until_ns` (`CLOCK_MONOTONIC` nanoseconds); 0 stops them now.
    pub fn keep_alive(&self, until_ns: u64) -> Result<(), EbpfError> {
        lock(&self.alive)
            .set(0, until_ns, 0)
            .map_err(|e| EbpfError::map(map_names::ALIVE, e))
    }

    /// Every connection that went direct and whose socket is still open, with its cookie.
    pub fn direct_connections(&self) -> Result<Vec<(u64, DirectConn)>, EbpfError> {
        let direct = lock(&self.direct);
        let mut out = Vec::new();
        for entry in direct.iter() {
            match entry {
                Ok(e) => out.push(e),
                // Closed between listing its key and reading it.
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(EbpfError::map(map_names::DIRECT, e)),
            }
        }
        Ok(out)
    }

    /// The ring buffer of [`openshell_common::DirectEvent`]s, once (its reader owns it).
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        lock(&self.events).take()
    }

    /// Number of verdicts held (diagnostics and tests).
    pub fn verdict_count(&self) -> usize {
        lock(&self.verdicts).keys().filter(Result::is_ok).count()
    }
}

fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), EbpfError> {
    match map.remove(key) {
        Err(e) if !is_not_found(&e) => Err(EbpfError::map(name, e)),
        _ => Ok(()),
    }
}
