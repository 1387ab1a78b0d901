//! Direct connections: once the proxy has allowed a plain L4 connection, it hands its verdict
//! to the kernel ([`crate::ebpf::FastPath`]), and the next connections of the same executable
//! version from the same sandbox to the same destination go straight there, at wire speed,
//! with no relay and no proxy wake-up in between. Each still gets its line in the decision log,
//! and each is judged again, and aborted if no longer allowed, when the policy changes.
//!
//! A verdict is written only for a decision that nothing outside its key could change:
//! - allowed, not in audit mode, with no HTTP inspection (`protocol: rest` is never direct);
//! - allowed by the executable itself, not through an ancestor (the same decision with no
//!   ancestors), since the kernel does not see the ancestors of the next caller;
//! - the executable has one hard link, and the version the proxy hashed and checked against
//!   the trust store is the version the kernel recorded (same status-change time), so a changed
//!   file is checked again by the proxy;
//! - the destination is the one the proxy would dial (it dials the validated original address),
//!   and the sandbox resolved it from at most one name (with several, which one a connection
//!   meant, and so the block it is logged under, follows the order of the latest answers).
//!
//! A verdict counts until the first of: its sandbox's epoch moves on ([`DirectEpoch`]: before
//! and after every policy change, after every DNS answer that changes the names of an
//! address), its time to live ([`VERDICT_TTL`], shortened to the soonest expiry of the names it
//! was judged under) passes, or the gateway stops refreshing its deadline
//! ([`KEEP_ALIVE_FOR`]).
//!
//! Limits: a direct connection that is judged again after a policy change is judged without its
//! ancestors (the kernel does not record them), so a new policy that would allow it only
//! through an ancestor closes it; its next connect goes through the proxy, which sees them.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use openshell_common::{Verdict, VerdictKey};

use crate::ebpf::FastPath;

/// Longest time a verdict counts without the proxy seeing a connection of its key.
pub const VERDICT_TTL: Duration = Duration::from_secs(60);
/// How far ahead the gateway's deadline is pushed: verdicts stop counting this long after the
/// gateway stops.
pub const KEEP_ALIVE_FOR: Duration = Duration::from_secs(2);
/// How often the deadline is pushed.
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_millis(500);
/// Most verdicts whose facts user space keeps (the kernel holds at most as many).
const FACTS_CAPACITY: usize = openshell_common::VERDICT_CAPACITY as usize;

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
    })
}

/// A new epoch, larger than every epoch issued before by this process or by an earlier
/// gateway on this boot (they are seeded from the monotonic clock, and issuing one takes
/// longer than a nanosecond).
fn next_epoch() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    NEXT.get_or_init(|| AtomicU64::new(monotonic_ns()))
        .fetch_add(1, Ordering::SeqCst)
        + 1
}

/// One sandbox's epoch: 0 while direct connections are off for it.
#[derive(Debug, Default)]
pub struct DirectEpoch {
    kernel: OnceLock<Arc<FastPath>>,
    current: AtomicU64,
    /// Serialises moves, so the kernel's epoch never goes back.
    moving: Mutex<()>,
}

impl DirectEpoch {
    /// Turns direct connections on for `cgroup_id`, with a fresh epoch.
    pub fn enable(&self, kernel: Arc<FastPath>, cgroup_id: u64) {
        if self.kernel.set(kernel).is_ok() {
            self.advance(cgroup_id);
        }
    }

    /// The epoch a verdict judged from now on must carry; 0: write none.
    #[must_use]
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    /// Voids every verdict of `cgroup_id`. Call it before and after a change that could change
    /// a decision: a verdict written with an epoch read before it never counts after it.
    pub fn advance(&self, cgroup_id: u64) {
        let Some(kernel) = self.kernel.get() else {
            return;
        };
        let _moving = self.moving.lock().unwrap_or_else(PoisonError::into_inner);
        let epoch = next_epoch();
        match kernel.set_epoch(cgroup_id, epoch) {
            Ok(()) => self.current.store(epoch, Ordering::SeqCst),
            Err(e) => {
                // Without a current kernel epoch no verdict may count: turn direct off.
                eprintln!("proxy: direct connections off for cgroup {cgroup_id}: {e}");
                self.current.store(0, Ordering::SeqCst);
                let _ = kernel.forget(cgroup_id);
            }
        }
    }

    /// Turns direct connections off for `cgroup_id` for good (the sandbox is going away).
    pub fn disable(&self, cgroup_id: u64) {
        let _moving = self.moving.lock().unwrap_or_else(PoisonError::into_inner);
        self.current.store(0, Ordering::SeqCst);
        if let Some(kernel) = self.kernel.get()
            && let Err(e) = kernel.forget(cgroup_id)
        {
            eprintln!("proxy: forgetting the epoch of cgroup {cgroup_id}: {e}");
        }
    }
}

/// What the proxy decided for a verdict, to log every connection that goes direct on it and to
/// judge those connections again.
#[derive(Debug)]
pub struct VerdictFacts {
    pub binary: crate::proxy::identity::Binary,
    pub exe: crate::ebpf::ExeId,
    pub host: String,
    pub block: Option<String>,
    pub reason: String,
    pub revision: i64,
}

/// The proxy's side of direct connections: the facts behind each verdict it wrote, with when
/// the verdict expires.
#[derive(Debug)]
pub struct DirectPath {
    kernel: Arc<FastPath>,
    next_id: AtomicU64,
    facts: Mutex<HashMap<u64, (Instant, Arc<VerdictFacts>)>>,
}

/// A verdict to write, with what it was decided on.
#[derive(Debug)]
pub struct NewVerdict {
    pub key: VerdictKey,
    pub epoch: u64,
    /// Soonest expiry of the names the decision used.
    pub names_expire: Option<Instant>,
    pub facts: VerdictFacts,
}

impl DirectPath {
    #[must_use]
    pub fn new(kernel: Arc<FastPath>) -> Self {
        Self {
            kernel,
            next_id: AtomicU64::new(1),
            facts: Mutex::new(HashMap::new()),
        }
    }

    /// The kernel maps.
    #[must_use]
    pub fn kernel(&self) -> &Arc<FastPath> {
        &self.kernel
    }

    /// Writes a verdict; `false` when it was not written (no room, or the kernel refused), which
    /// only means the next connection goes through the proxy again.
    pub fn write(&self, v: NewVerdict) -> bool {
        let now = Instant::now();
        let ttl = v
            .names_expire
            .map_or(VERDICT_TTL, |at| at.saturating_duration_since(now))
            .min(VERDICT_TTL);
        if ttl.is_zero() || v.epoch == 0 {
            return false;
        }
        let expires = now + ttl;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut facts = self.facts.lock().unwrap_or_else(PoisonError::into_inner);
            if facts.len() >= FACTS_CAPACITY {
                // Full until the next purge ([`DirectPath::purge`]): this one stays proxied.
                return false;
            }
            facts.insert(id, (expires, Arc::new(v.facts)));
        }
        let ttl_ns = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        let verdict = Verdict {
            epoch: v.epoch,
            expires_ns: monotonic_ns().saturating_add(ttl_ns),
            id,
        };
        match self.kernel.insert(v.key, verdict) {
            Ok(()) => true,
            Err(_) => {
                self.facts
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                false
            }
        }
    }

    /// The facts of verdict `id`. Kept for [`VERDICT_TTL`] after the verdict expired, so that
    /// the events of connections made just before are still logged in full.
    #[must_use]
    pub fn facts(&self, id: u64) -> Option<Arc<VerdictFacts>> {
        self.facts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .map(|(_, f)| Arc::clone(f))
    }

    /// Pushes the gateway's deadline forward (see [`KEEP_ALIVE_FOR`]).
    pub fn keep_alive(&self) {
        let ahead = u64::try_from(KEEP_ALIVE_FOR.as_nanos()).unwrap_or(u64::MAX);
        if let Err(e) = self.kernel.keep_alive(monotonic_ns().saturating_add(ahead)) {
            eprintln!("proxy: refreshing the direct-connection deadline: {e}");
        }
    }

    /// Drops the facts of verdicts that expired more than a time to live ago, except those of
    /// connections still open (a policy change judges them on these facts).
    pub fn purge(&self) {
        let open: std::collections::HashSet<u64> = match self.kernel.direct_connections() {
            Ok(conns) => conns.into_iter().map(|(_, c)| c.id).collect(),
            // Without the list, keep everything until the next purge.
            Err(_) => return,
        };
        let now = Instant::now();
        self.facts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, (expires, _)| *expires + VERDICT_TTL > now || open.contains(id));
    }
}
