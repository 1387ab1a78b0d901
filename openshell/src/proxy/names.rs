//! Which names a sandbox resolved to which addresses: the link between the policy DNS and the
//! transparent listener.
//!
//! The policy DNS records every address it handed a sandbox, with the name the sandbox asked
//! for. When that sandbox later connects to the address, the proxy judges the connection by the
//! name; an address the sandbox never resolved through us is judged as an IP literal.
//!
//! An entry lives for the record's TTL, but at least [`MIN_HOLD`]: clients cache answers
//! themselves (curl keeps them 60 s whatever the TTL says), and a connection made from such a
//! cache must still be matched to its name. At most [`MAX_HOLD`], and at most
//! [`NameCache::capacity`] entries per sandbox, so a sandbox cannot grow the gateway's memory
//! without bound by resolving many names.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Shortest time an answer is remembered, whatever its TTL.
pub const MIN_HOLD: Duration = Duration::from_secs(60);
/// Longest time an answer is remembered, whatever its TTL.
pub const MAX_HOLD: Duration = Duration::from_secs(24 * 60 * 60);
/// Default number of (address, name) entries per sandbox.
pub const DEFAULT_CAPACITY: usize = 16_384;
/// Names remembered per address (CDN addresses serve many names).
const NAMES_PER_IP: usize = 8;

/// The names one sandbox resolved, by address. Thread-safe.
#[derive(Debug)]
pub struct NameCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    by_ip: HashMap<IpAddr, Vec<Entry>>,
    len: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    name: Arc<str>,
    expires: Instant,
}

impl Default for NameCache {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl NameCache {
    /// An empty cache holding at most `capacity` (address, name) entries.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }

    /// The most entries this cache holds.
    #[must_use]
    pub const fn capacity(&self) -> usize {
        self.capacity
    }

    /// Remembers that `name` resolved to `ip` in an answer with time to live `ttl`.
    /// `name` must already be in canonical form (lowercase, no trailing dot). Returns whether
    /// the set of names of some address changed (a new pair, or pairs dropped to make room),
    /// which can change how a connection is judged; a longer time to live alone does not.
    pub fn remember(&self, ip: IpAddr, name: &str, ttl: Duration, now: Instant) -> bool {
        let expires = now + ttl.clamp(MIN_HOLD, MAX_HOLD);
        let ip = ip.to_canonical();
        let mut inner = self.lock();
        if let Some(entries) = inner.by_ip.get_mut(&ip)
            && let Some(pos) = entries.iter().position(|e| &*e.name == name)
        {
            let mut entry = entries.remove(pos);
            entry.expires = entry.expires.max(expires);
            entries.insert(0, entry);
            return false;
        }
        if inner.len >= self.capacity {
            inner.purge_expired(now);
        }
        if inner.len >= self.capacity {
            inner.evict_soonest();
        }
        let entries = inner.by_ip.entry(ip).or_default();
        entries.insert(
            0,
            Entry {
                name: Arc::from(name),
                expires,
            },
        );
        let dropped = entries.len().saturating_sub(NAMES_PER_IP);
        entries.truncate(NAMES_PER_IP);
        inner.len = inner.len + 1 - dropped;
        true
    }

    /// When the first of the names [`NameCache::names`] returns for `ip` at `now` expires
    /// (`None` when there is none).
    #[must_use]
    pub fn soonest_expiry(&self, ip: IpAddr, now: Instant) -> Option<Instant> {
        let inner = self.lock();
        inner
            .by_ip
            .get(&ip.to_canonical())?
            .iter()
            .map(|e| e.expires)
            .filter(|expires| *expires > now)
            .min()
    }

    /// The names `ip` was resolved from and that are still remembered at `now`, most recent
    /// first. Empty when the sandbox never resolved this address through the proxy.
    #[must_use]
    pub fn names(&self, ip: IpAddr, now: Instant) -> Vec<Arc<str>> {
        let inner = self.lock();
        inner
            .by_ip
            .get(&ip.to_canonical())
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| e.expires > now)
                    .map(|e| Arc::clone(&e.name))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Number of entries, expired ones included until they are purged.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether the cache holds no entry.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The data stays consistent even if a holder panicked: every update is a single step.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn purge_expired(&mut self, now: Instant) {
        let mut len = 0;
        self.by_ip.retain(|_, entries| {
            entries.retain(|e| e.expires > now);
            len += entries.len();
            !entries.is_empty()
        });
        self.len = len;
    }

    fn evict_soonest(&mut self) {
        let soonest = self
            .by_ip
            .iter()
            .flat_map(|(ip, entries)| entries.iter().map(move |e| (e.expires, *ip)))
            .min_by_key(|(expires, _)| *expires);
        if let Some((expires, ip)) = soonest
            && let Some(entries) = self.by_ip.get_mut(&ip)
            && let Some(pos) = entries.iter().position(|e| e.expires == expires)
        {
            entries.remove(pos);
            self.len -= 1;
            if entries.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn remembers_for_the_ttl_with_a_floor() {
        let cache = NameCache::default();
        let t0 = Instant::now();
        cache.remember(ip("198.18.0.10"), "pypi.org", Duration::from_secs(300), t0);
        cache.remember(
            ip("198.18.0.11"),
            "files.pythonhosted.org",
            Duration::from_secs(1),
            t0,
        );
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(
            cache.names(ip("198.18.0.10"), at(299)),
            vec![Arc::from("pypi.org")]
        );
        assert!(cache.names(ip("198.18.0.10"), at(300)).is_empty());
        // TTL 1 s is held for MIN_HOLD.
        assert_eq!(cache.names(ip("198.18.0.11"), at(59)).len(), 1);
        assert!(cache.names(ip("198.18.0.11"), at(60)).is_empty());
        assert!(cache.names(ip("198.18.0.12"), t0).is_empty());
    }

    #[test]
    fn remember_reports_only_changes_of_the_names_of_an_address() {
        let cache = NameCache::new(2);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(300);
        let a = ip("198.18.0.10");
        assert!(cache.remember(a, "a.example.com", ttl, t0));
        // The same pair again, even with a longer time to live, changes no decision.
        assert!(!cache.remember(a, "a.example.com", ttl * 2, t0));
        assert!(!cache.remember(ip("::ffff:198.18.0.10"), "a.example.com", ttl, t0));
        assert!(cache.remember(a, "b.example.com", ttl, t0));
        // Full: the new pair evicts another.
        assert!(cache.remember(ip("198.18.0.11"), "c.example.com", ttl, t0));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn soonest_expiry_is_when_the_first_name_of_an_address_goes() {
        let cache = NameCache::default();
        let t0 = Instant::now();
        let a = ip("198.18.0.10");
        assert_eq!(cache.soonest_expiry(a, t0), None);
        cache.remember(a, "long.example.com", Duration::from_secs(600), t0);
        cache.remember(a, "short.example.com", Duration::from_secs(120), t0);
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(cache.soonest_expiry(a, t0), Some(at(120)));
        // Once the short one has gone, the long one is the soonest.
        assert_eq!(cache.soonest_expiry(a, at(120)), Some(at(600)));
        assert_eq!(cache.soonest_expiry(a, at(600)), None);
    }

    #[test]
    fn mapped_and_plain_ipv4_are_one_address() {
        let cache = NameCache::default();
        let t0 = Instant::now();
        cache.remember(
            ip("::ffff:198.18.0.10"),
            "pypi.org",
            Duration::from_secs(300),
            t0,
        );
        assert_eq!(cache.names(ip("198.18.0.10"), t0).len(), 1);
    }

    #[test]
    fn several_names_per_address_most_recent_first() {
        let cache = NameCache::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(300);
        cache.remember(ip("198.18.0.10"), "a.example.com", ttl, t0);
        cache.remember(ip("198.18.0.10"), "b.example.com", ttl, t0);
        cache.remember(ip("198.18.0.10"), "a.example.com", ttl, t0);
        let names = cache.names(ip("198.18.0.10"), t0);
        assert_eq!(
            names,
            vec![Arc::from("a.example.com"), Arc::from("b.example.com")]
        );
        assert_eq!(cache.len(), 2);
        for i in 0..20 {
            cache.remember(ip("198.18.0.10"), &format!("n{i}.example.com"), ttl, t0);
        }
        assert_eq!(cache.names(ip("198.18.0.10"), t0).len(), NAMES_PER_IP);
        assert_eq!(cache.len(), NAMES_PER_IP);
    }

    #[test]
    fn a_refresh_never_shortens_an_entry() {
        let cache = NameCache::default();
        let t0 = Instant::now();
        cache.remember(ip("198.18.0.10"), "pypi.org", Duration::from_secs(3600), t0);
        cache.remember(ip("198.18.0.10"), "pypi.org", Duration::from_secs(1), t0);
        assert_eq!(
            cache
                .names(ip("198.18.0.10"), t0 + Duration::from_secs(3000))
                .len(),
            1
        );
    }

    #[test]
    fn bounded_expired_first_then_soonest_to_expire() {
        let cache = NameCache::new(3);
        let t0 = Instant::now();
        let long = Duration::from_secs(3600);
        cache.remember(ip("198.18.0.1"), "short.example.com", MIN_HOLD, t0);
        cache.remember(ip("198.18.0.2"), "long.example.com", long, t0);
        cache.remember(
            ip("198.18.0.3"),
            "mid.example.com",
            Duration::from_secs(600),
            t0,
        );
        // Full: the soonest to expire (short) goes.
        cache.remember(ip("198.18.0.4"), "new.example.com", long, t0);
        assert_eq!(cache.len(), 3);
        assert!(cache.names(ip("198.18.0.1"), t0).is_empty());
        // Later the mid entry has expired and is purged first.
        let t1 = t0 + Duration::from_secs(601);
        cache.remember(ip("198.18.0.5"), "later.example.com", long, t1);
        assert_eq!(cache.len(), 3);
        assert!(cache.names(ip("198.18.0.3"), t0).is_empty());
        assert_eq!(cache.names(ip("198.18.0.2"), t1).len(), 1);
        assert_eq!(cache.names(ip("198.18.0.4"), t1).len(), 1);
        assert_eq!(cache.names(ip("198.18.0.5"), t1).len(), 1);
    }
}
