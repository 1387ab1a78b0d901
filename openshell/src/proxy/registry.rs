//! The sandboxes the proxy serves, keyed by the cgroup id the kernel records with every
//! connection, each with its policy generation in force and its name cache.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{Arc, PoisonError, RwLock},
};

use tokio::sync::watch;

use super::{Generation, direct::DirectEpoch, dns::DnsScope, names::NameCache};
use crate::{ebpf::FastPath, tls::SandboxCa};

/// One sandbox as the proxy sees it.
#[derive(Debug)]
pub struct SandboxNet {
    name: String,
    cgroup_id: u64,
    /// The cgroup as `/proc/<pid>/cgroup` writes it after `0::` (for ancestor checks).
    cgroup_path: String,
    generation: watch::Sender<Arc<Generation>>,
    names: NameCache,
    /// Terminates the sandbox's TLS connections to `protocol: rest` endpoints.
    ca: Arc<SandboxCa>,
    /// Voids the kernel's verdicts for this sandbox when a decision could change.
    direct: DirectEpoch,
}

impl SandboxNet {
    /// A sandbox whose processes live in the cgroup v2 directory `cgroup_dir` and trust `ca`.
    pub fn new(
        name: &str,
        cgroup_dir: &Path,
        generation: Generation,
        ca: Arc<SandboxCa>,
    ) -> std::io::Result<Self> {
        let cgroup_id = std::fs::metadata(cgroup_dir)?.ino();
        let mount = crate::cgroup::cgroup2_mount().map_err(std::io::Error::other)?;
        let relative = cgroup_dir.strip_prefix(&mount).map_err(|_| {
            std::io::Error::other(format!(
                "{} is not under the cgroup2 mount {}",
                cgroup_dir.display(),
                mount.display()
            ))
        })?;
        Ok(Self {
            name: name.to_owned(),
            cgroup_id,
            cgroup_path: format!("/{}", relative.display()),
            generation: watch::Sender::new(Arc::new(generation)),
            names: NameCache::default(),
            ca,
            direct: DirectEpoch::default(),
        })
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub const fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    #[must_use]
    pub fn cgroup_path(&self) -> &str {
        &self.cgroup_path
    }

    /// The generation in force.
    #[must_use]
    pub fn generation(&self) -> Arc<Generation> {
        Arc::clone(&self.generation.borrow())
    }

    /// Notified whenever the generation changes.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Arc<Generation>> {
        self.generation.subscribe()
    }

    /// Puts a new generation in force and returns the one it replaced. Open connections are
    /// judged again under it, and the ones it no longer allows are closed. The kernel's
    /// verdicts for this sandbox stop counting before the new generation is in force, and
    /// those written meanwhile after.
    pub fn set_generation(&self, generation: Generation) -> Arc<Generation> {
        self.direct.advance(self.cgroup_id);
        let old = self.generation.send_replace(Arc::new(generation));
        self.direct.advance(self.cgroup_id);
        old
    }

    /// The epoch a kernel verdict judged now must carry (0: write none). Read it before
    /// the facts the decision is made on.
    #[must_use]
    pub fn direct_epoch(&self) -> u64 {
        self.direct.current()
    }

    /// The sandbox's certificate authority.
    #[must_use]
    pub fn ca(&self) -> Arc<SandboxCa> {
        Arc::clone(&self.ca)
    }

    #[must_use]
    pub const fn name_cache(&self) -> &NameCache {
        &self.names
    }
}

impl DnsScope for SandboxNet {
    fn may_resolve(&self, name: &str) -> bool {
        self.generation
            .borrow()
            .policy()
            .name_could_be_allowed(name)
    }

    fn may_use_address(&self, name: &str, ip: IpAddr) -> bool {
        self.generation.borrow().may_use_address(name, ip)
    }

    fn names(&self) -> &NameCache {
        &self.names
    }

    fn names_changed(&self) {
        self.direct.advance(self.cgroup_id);
    }
}

/// Every sandbox the proxy serves. Thread-safe; lookups are read-locked.
#[derive(Debug, Default)]
pub struct Registry {
    by_cgroup: RwLock<HashMap<u64, Arc<SandboxNet>>>,
    /// The kernel's verdict maps, when direct connections are on.
    direct: Option<Arc<FastPath>>,
}

impl Registry {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry whose sandboxes may connect directly on the proxy's verdicts.
    #[must_use]
    pub fn with_direct(kernel: Arc<FastPath>) -> Self {
        Self {
            by_cgroup: RwLock::default(),
            direct: Some(kernel),
        }
    }

    /// Adds (or replaces) a sandbox.
    pub fn insert(&self, sandbox: Arc<SandboxNet>) {
        if let Some(kernel) = &self.direct {
            sandbox
                .direct
                .enable(Arc::clone(kernel), sandbox.cgroup_id());
        }
        // A sandbox it replaces keeps nothing: its verdicts carry an older epoch.
        self.write().insert(sandbox.cgroup_id(), sandbox);
    }

    /// Removes the sandbox of cgroup `cgroup_id`; none of its connections goes direct after.
    pub fn remove(&self, cgroup_id: u64) -> Option<Arc<SandboxNet>> {
        let removed = self.write().remove(&cgroup_id);
        if let Some(s) = &removed {
            s.direct.disable(cgroup_id);
        }
        removed
    }

    /// The sandbox whose cgroup id is `cgroup_id`.
    #[must_use]
    pub fn get(&self, cgroup_id: u64) -> Option<Arc<SandboxNet>> {
        self.by_cgroup
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&cgroup_id)
            .cloned()
    }

    /// The sandbox named `name`.
    #[must_use]
    pub fn by_name(&self, name: &str) -> Option<Arc<SandboxNet>> {
        self.by_cgroup
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .find(|s| s.name() == name)
            .cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<SandboxNet>>> {
        self.by_cgroup
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
