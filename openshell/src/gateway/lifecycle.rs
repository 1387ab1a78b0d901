//! Sandbox lifecycle: create, delete, list, and the reconciliation a starting gateway runs.
//!
//! Crash consistency comes from ordering. `create` records the sandbox as `creating` (durable)
//! before it makes the working directories and the cgroup, and marks it `ready` only when
//! everything exists; `delete` marks it `deleting` before tearing anything down. A gateway that
//! starts therefore finds every half-done sandbox in the store and rolls it back (a `creating`
//! sandbox was never acknowledged) or finishes deleting it, and then removes any cgroup under
//! its base that belongs to no ready sandbox. Running processes of ready sandboxes are left
//! alone: their cgroup is simply re-adopted.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    hash::{BuildHasher, Hasher},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    cgroup::{CgroupBase, CgroupError, SandboxCgroup},
    config::Paths,
    proxy::CompiledNetwork,
    store::{NewSandbox, Phase, SandboxRecord, Store, StoreError},
    tls::SandboxCa,
};

use super::{
    api::{CreateSandbox, SandboxInfo},
    launch::{LaunchRequest, StaticConfig},
    trust::{CaStore, TrustError, TrustSetup},
};

/// Environment variable naming a failpoint for the crash-consistency and reload tests. Crash
/// points (`create-after-record`, `create-after-cgroup`, `create-before-ready`,
/// `policy-after-record`): the gateway sends itself SIGKILL when it reaches the point. Pause
/// points (`start-before-reconcile`, `policy-before-load`): it waits [`FAILPOINT_PAUSE`] there.
/// `policy-load-fails`: loading a new policy revision fails.
pub const FAILPOINT_ENV: &str = "OPENSHELL_FAILPOINT";

/// How long a pause point holds the gateway.
pub const FAILPOINT_PAUSE: std::time::Duration = std::time::Duration::from_secs(3);

/// How many generated names are tried before giving up.
const NAME_ATTEMPTS: usize = 8;

/// Attaches network enforcement to a sandbox cgroup before its first process runs (the eBPF
/// interceptor implements this). `ca` is the sandbox's certificate authority, for terminating
/// the TLS of inspected connections.
pub trait CgroupAttach: Send + Sync {
    fn attach(&self, cgroup_dir: &Path, ca: Arc<SandboxCa>) -> Result<(), String>;
    /// Undoes `attach` before the cgroup is removed (best effort; failures are reported by the
    /// implementation).
    fn detach(&self, _cgroup_dir: &Path) {}
    /// Compiles the validated `policy` as revision `revision` of sandbox `name` and puts it in
    /// force atomically; on error the previous policy stays in force.
    fn load_policy(
        &self,
        name: &str,
        policy: &crate::policy::Policy,
        revision: i64,
    ) -> Result<(), String> {
        self.load_compiled(name, CompiledNetwork::new(policy), revision)
    }
    /// Like [`CgroupAttach::load_policy`], with the policy compiled beforehand.
    fn load_compiled(
        &self,
        _name: &str,
        _compiled: CompiledNetwork,
        _revision: i64,
    ) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("{0}")]
    InvalidPolicy(String),
    #[error(
        "invalid sandbox name {name:?}: use 1-63 characters from [A-Za-z0-9._-], starting with a letter or digit"
    )]
    InvalidName { name: String },
    #[error("no sandbox named {name:?} (see `openshell sandbox list`)")]
    NotFound { name: String },
    #[error("sandbox {name:?} already exists; pick another --name or delete it first")]
    Exists { name: String },
    #[error("sandbox {name:?} is {phase}, not ready")]
    NotReady { name: String, phase: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("sandbox {name:?}: {source}")]
    Cgroup {
        name: String,
        #[source]
        source: CgroupError,
    },
    #[error("sandbox {name:?}: {action} {path}: {source}")]
    Io {
        name: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sandbox {name:?}: attaching network enforcement: {message}")]
    Attach { name: String, message: String },
    #[error("sandbox {name:?}: certificate authority: {source}")]
    Trust {
        name: String,
        #[source]
        source: TrustError,
    },
}

impl LifecycleError {
    /// The API error kind and HTTP status.
    pub fn kind(&self) -> (&'static str, u16) {
        match self {
            Self::InvalidPolicy(_) => ("invalid_policy", 400),
            Self::InvalidName { .. } => ("bad_request", 400),
            Self::NotFound { .. } | Self::Store(StoreError::NoSuchSandbox { .. }) => {
                ("not_found", 404)
            }
            Self::Exists { .. } | Self::NotReady { .. } => ("conflict", 409),
            Self::Store(StoreError::SandboxExists { .. }) => ("conflict", 409),
            _ => ("internal", 500),
        }
    }
}

/// What reconciliation did at gateway start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub adopted: Vec<String>,
    pub rolled_back: Vec<String>,
    pub orphan_cgroups: Vec<String>,
}

pub struct Sandboxes {
    store: Arc<dyn Store>,
    paths: Paths,
    cgroups: CgroupBase,
    cas: CaStore,
    /// How each ready sandbox's processes trust its CA.
    trust: Mutex<HashMap<String, TrustSetup>>,
    attach: Option<Arc<dyn CgroupAttach>>,
    failpoint: Option<String>,
    /// Serialises create and delete (cheap; they are rare); global policy changes take it too,
    /// so a sandbox created meanwhile gets the policy that is in force.
    pub(super) lock: Mutex<()>,
    /// Serialises policy updates, so revisions are loaded in version order.
    pub(super) policy_lock: Mutex<()>,
    /// Bumped whenever a policy revision leaves `pending` (for `policy set --wait`).
    settled: tokio::sync::watch::Sender<u64>,
    /// Creation policies already parsed for their static sections, by revision hash.
    pub(super) creation_statics: super::revisions::StaticsCache,
    /// The last parse of each sandbox's submitted policy, for the next reload.
    pub(super) parses: super::revisions::ParseCache,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A sandbox name: 1-63 of [A-Za-z0-9._-], starting with a letter or digit (it names a cgroup
/// and a directory).
pub fn validate_name(name: &str) -> Result<(), LifecycleError> {
    let ok = (1..=63).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LifecycleError::InvalidName {
            name: name.to_owned(),
        })
    }
}

const ADJECTIVES: &[&str] = &[
    "amber", "brisk", "calm", "dusty", "eager", "fuzzy", "gentle", "hidden", "icy", "jolly",
    "keen", "lucky", "mellow", "nimble", "quiet", "rapid", "silent", "tidy", "vivid", "witty",
];
const NOUNS: &[&str] = &[
    "badger", "comet", "delta", "ember", "falcon", "garnet", "harbor", "island", "juniper",
    "kestrel", "lagoon", "meadow", "nebula", "otter", "pebble", "quartz", "raven", "summit",
    "tundra", "willow",
];

/// A random `adjective-noun-xxxx` name.
pub fn generate_name() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(now_ms());
    h.write_u32(std::process::id());
    let r = h.finish();
    let adj = ADJECTIVES[(r % ADJECTIVES.len() as u64) as usize];
    let noun = NOUNS[((r >> 8) % NOUNS.len() as u64) as usize];
    format!("{adj}-{noun}-{:04x}", (r >> 32) & 0xffff)
}

impl Sandboxes {
    pub fn new(
        store: Arc<dyn Store>,
        paths: Paths,
        cgroups: CgroupBase,
        cas: CaStore,
        attach: Option<Arc<dyn CgroupAttach>>,
    ) -> Self {
        Self {
            store,
            paths,
            cgroups,
            cas,
            trust: Mutex::new(HashMap::new()),
            attach,
            failpoint: std::env::var(FAILPOINT_ENV).ok(),
            lock: Mutex::new(()),
            policy_lock: Mutex::new(()),
            settled: tokio::sync::watch::Sender::new(0),
            creation_statics: super::revisions::StaticsCache::default(),
            parses: super::revisions::ParseCache::default(),
        }
    }

    /// Notified whenever a policy revision leaves `pending` (its count so far).
    pub fn revisions_settled(&self) -> tokio::sync::watch::Receiver<u64> {
        self.settled.subscribe()
    }

    pub(super) fn revision_settled(&self) {
        self.settled.send_modify(|n| *n += 1);
    }

    pub(super) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(super) fn network(&self) -> Option<&Arc<dyn CgroupAttach>> {
        self.attach.as_ref()
    }

    pub fn cgroup_base(&self) -> &Path {
        self.cgroups.path()
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn failpoint(&self, point: &str) {
        if self.failpoint.as_deref() == Some(point) {
            eprintln!("gateway: failpoint {point}: killing myself with SIGKILL");
            // The test that set this wants a real SIGKILL at exactly this point.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Waits [`FAILPOINT_PAUSE`] when the failpoint names `point`.
    pub fn pause(&self, point: &str) {
        if self.failing(point) {
            eprintln!("gateway: failpoint {point}: pausing {FAILPOINT_PAUSE:?}");
            std::thread::sleep(FAILPOINT_PAUSE);
        }
    }

    /// Whether the failpoint names `point`.
    pub(super) fn failing(&self, point: &str) -> bool {
        self.failpoint.as_deref() == Some(point)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.paths.sandboxes_dir().join(name)
    }

    pub fn workdir(&self, name: &str) -> PathBuf {
        self.dir(name).join("work")
    }

    pub fn tmpdir(&self, name: &str) -> PathBuf {
        self.dir(name).join("tmp")
    }

    fn io_err(
        name: &str,
        action: &'static str,
        path: &Path,
    ) -> impl FnOnce(io::Error) -> LifecycleError {
        let (name, path) = (name.to_owned(), path.to_path_buf());
        move |source| LifecycleError::Io {
            name,
            action,
            path,
            source,
        }
    }

    fn trust_err(name: &str) -> impl FnOnce(TrustError) -> LifecycleError {
        let name = name.to_owned();
        move |source| LifecycleError::Trust { name, source }
    }

    fn cgroup_err(name: &str) -> impl FnOnce(CgroupError) -> LifecycleError {
        let name = name.to_owned();
        move |source| LifecycleError::Cgroup { name, source }
    }

    fn make_dirs(&self, name: &str) -> Result<SandboxCgroup, LifecycleError> {
        for dir in [self.workdir(name), self.tmpdir(name)] {
            fs::create_dir_all(&dir).map_err(Self::io_err(name, "creating", &dir))?;
        }
        let (ca, trust) = self.cas.ensure(name).map_err(Self::trust_err(name))?;
        self.trust
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), trust);
        let cgroup = self.cgroups.sandbox(name).map_err(Self::cgroup_err(name))?;
        if let Some(attach) = &self.attach {
            attach
                .attach(cgroup.path(), ca)
                .map_err(|message| LifecycleError::Attach {
                    name: name.to_owned(),
                    message,
                })?;
        }
        Ok(cgroup)
    }

    /// Creates a sandbox (no process yet) and returns it once it is durably `ready`.
    pub fn create(&self, req: &CreateSandbox) -> Result<SandboxInfo, LifecycleError> {
        let policy = super::launch::static_config(&req.policy_source, &req.policy)
            .map_err(|e| LifecycleError::InvalidPolicy(e.to_string()))?;
        let static_policy = serde_json::to_string(&policy.static_config)
            .map_err(|e| LifecycleError::InvalidPolicy(e.to_string()))?;
        let _guard = self.guard();
        let mut new = NewSandbox {
            name: String::new(),
            keep: req.keep,
            policy_source: req.policy_source.clone(),
            static_policy,
            policy_text: req.policy.clone(),
            policy_sha256: policy.sha256,
            created_ms: now_ms(),
        };
        let record = match &req.name {
            Some(name) => {
                validate_name(name)?;
                new.name = name.clone();
                self.store.insert_sandbox(&new).map_err(|e| match e {
                    StoreError::SandboxExists { name } => LifecycleError::Exists { name },
                    e => e.into(),
                })?
            }
            None => {
                let mut attempt = 0;
                loop {
                    new.name = generate_name();
                    match self.store.insert_sandbox(&new) {
                        Err(StoreError::SandboxExists { .. }) if attempt < NAME_ATTEMPTS => {
                            attempt += 1;
                        }
                        other => break other?,
                    }
                }
            }
        };
        let name = record.name.clone();
        self.failpoint("create-after-record");
        let made = self.make_dirs(&name).and_then(|_| {
            self.failpoint("create-after-cgroup");
            self.failpoint("create-before-ready");
            Ok(self.store.set_phase(&name, Phase::Ready)?)
        });
        if let Err(err) = made {
            eprintln!("gateway: creating sandbox {name:?} failed: {err}");
            if let Err(cleanup) = self.destroy(&name) {
                eprintln!("gateway: rolling back sandbox {name:?}: {cleanup}");
            }
            return Err(err);
        }
        eprintln!("gateway: created sandbox {name:?}");
        self.info(SandboxRecord {
            phase: Phase::Ready,
            ..record
        })
    }

    /// Kills every process of the sandbox and removes its cgroup, directories and records.
    pub fn delete(&self, name: &str) -> Result<(), LifecycleError> {
        let _guard = self.guard();
        if self.store.sandbox(name)?.is_none() {
            return Err(LifecycleError::NotFound {
                name: name.to_owned(),
            });
        }
        self.destroy(name)?;
        eprintln!("gateway: deleted sandbox {name:?}");
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<(), LifecycleError> {
        match self.store.set_phase(name, Phase::Deleting) {
            Ok(()) | Err(StoreError::NoSuchSandbox { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let cgroup = SandboxCgroup::from_path(self.cgroups.path().join(name));
        if let Some(attach) = &self.attach
            && cgroup.path().exists()
        {
            // Empty the cgroup first: a process left running after the programs are detached
            // would connect without the proxy.
            cgroup.kill().map_err(Self::cgroup_err(name))?;
            attach.detach(cgroup.path());
        }
        cgroup.remove().map_err(Self::cgroup_err(name))?;
        let dir = self.dir(name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Self::io_err(name, "removing", &dir)(e)),
        }
        self.trust
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        self.cas.remove(name).map_err(Self::trust_err(name))?;
        self.store.delete_sandbox(name)?;
        self.parses.forget(name);
        Ok(())
    }

    /// Brings the host in line with the store after a (re)start; see the module docs.
    pub fn reconcile(&self) -> Result<Reconciled, LifecycleError> {
        let _guard = self.guard();
        let mut done = Reconciled::default();
        let mut ready = BTreeSet::new();
        for rec in self.store.sandboxes()? {
            match rec.phase {
                Phase::Ready => {
                    self.fail_stale_revisions(&rec.name)?;
                    self.make_dirs(&rec.name)?;
                    ready.insert(rec.name.clone());
                    done.adopted.push(rec.name);
                }
                Phase::Creating | Phase::Deleting => {
                    self.destroy(&rec.name)?;
                    done.rolled_back.push(rec.name);
                }
            }
        }
        for name in self
            .cgroups
            .list()
            .map_err(Self::cgroup_err("(cgroup base)"))?
        {
            if !ready.contains(&name) {
                SandboxCgroup::from_path(self.cgroups.path().join(&name))
                    .remove()
                    .map_err(Self::cgroup_err(&name))?;
                done.orphan_cgroups.push(name);
            }
        }
        if let Ok(entries) = fs::read_dir(self.paths.sandboxes_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !ready.contains(&name) {
                    let path = entry.path();
                    fs::remove_dir_all(&path).map_err(Self::io_err(&name, "removing", &path))?;
                }
            }
        }
        for name in self.cas.names().map_err(Self::trust_err("(CA store)"))? {
            if !ready.contains(&name) {
                self.cas.remove(&name).map_err(Self::trust_err(&name))?;
            }
        }
        Ok(done)
    }

    fn info(&self, rec: SandboxRecord) -> Result<SandboxInfo, LifecycleError> {
        let cgroup = self.cgroups.path().join(&rec.name);
        let processes = SandboxCgroup::from_path(cgroup.clone())
            .pids()
            .map_or(0, |p| p.len());
        let status = match rec.phase {
            Phase::Creating => "creating",
            Phase::Deleting => "deleting",
            Phase::Ready if processes > 0 => "running",
            Phase::Ready => "idle",
        };
        Ok(SandboxInfo {
            status: status.to_owned(),
            processes,
            keep: rec.keep,
            policy_source: rec.policy_source,
            created_ms: rec.created_ms,
            workdir: self.workdir(&rec.name).display().to_string(),
            cgroup: cgroup.display().to_string(),
            static_policy: serde_json::from_str(&rec.static_policy)
                .unwrap_or(serde_json::Value::Null),
            report: rec
                .report
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok()),
            network_enforced: self.attach.is_some(),
            name: rec.name,
        })
    }

    /// The newest `limit` network decisions of sandbox `name`, oldest first.
    pub fn decisions(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<Vec<crate::store::DecisionRecord>, LifecycleError> {
        if self.store.sandbox(name)?.is_none() {
            return Err(LifecycleError::NotFound {
                name: name.to_owned(),
            });
        }
        Ok(self.store.decisions(name, limit)?)
    }

    pub fn get(&self, name: &str) -> Result<SandboxInfo, LifecycleError> {
        let rec = self
            .store
            .sandbox(name)?
            .ok_or_else(|| LifecycleError::NotFound {
                name: name.to_owned(),
            })?;
        self.info(rec)
    }

    pub fn list(&self) -> Result<Vec<SandboxInfo>, LifecycleError> {
        self.store
            .sandboxes()?
            .into_iter()
            .map(|rec| self.info(rec))
            .collect()
    }

    /// What to launch for `argv` in ready sandbox `name`.
    pub fn launch_request(
        &self,
        name: &str,
        argv: Vec<String>,
        extra_env: &[(String, String)],
    ) -> Result<LaunchRequest, LifecycleError> {
        let rec = self
            .store
            .sandbox(name)?
            .ok_or_else(|| LifecycleError::NotFound {
                name: name.to_owned(),
            })?;
        if rec.phase != Phase::Ready {
            return Err(LifecycleError::NotReady {
                name: name.to_owned(),
                phase: rec.phase.as_str(),
            });
        }
        let config: StaticConfig =
            serde_json::from_str(&rec.static_policy).map_err(|e| StoreError::Corrupt {
                what: "sandboxes.static_policy",
                value: e.to_string(),
            })?;
        let mut env = vec![
            (
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
            ("HOME".to_owned(), "/sandbox".to_owned()),
            ("OPENSHELL_SANDBOX".to_owned(), name.to_owned()),
        ];
        let trust = self
            .trust
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned();
        let trust_mount = trust.as_ref().and_then(|t| t.mount.clone());
        env.extend(trust.into_iter().flat_map(|t| t.env));
        for (k, v) in extra_env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        Ok(LaunchRequest {
            argv,
            env,
            cgroup_dir: self.cgroups.path().join(name),
            workdir: self.workdir(name),
            tmpdir: self.tmpdir(name),
            config,
            trust_mount,
        })
    }

    /// Records the enforcement report of the latest launch.
    pub fn record_report(
        &self,
        name: &str,
        report: &serde_json::Value,
    ) -> Result<(), LifecycleError> {
        Ok(self.store.set_report(name, &report.to_string())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_valid_and_vary() {
        let names: BTreeSet<String> = (0..20).map(|_| generate_name()).collect();
        assert!(names.len() > 1);
        for n in &names {
            validate_name(n).unwrap();
        }
    }

    #[test]
    fn name_rules() {
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "my-box_1.2", &"x".repeat(63)] {
            validate_name(good).unwrap();
        }
    }
}
