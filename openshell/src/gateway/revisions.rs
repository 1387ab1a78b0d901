//! Policy revisions of a running sandbox: `policy set` and `policy list`/`get` on the gateway.
//!
//! A new policy is validated, checked against the static sections the sandbox was created
//! with, compared with the revision in force (identical canonical form: nothing to do), recorded
//! as a `pending` revision and then compiled and swapped in by the proxy
//! ([`super::CgroupAttach::load_policy`]). The revision ends `loaded` (the previous loaded one
//! becomes `superseded`) or `failed` with the error, in which case the previous generation stays
//! in force. Updates of all sandboxes are serialised, so revisions load in version order.
//!
//! # The global policy
//!
//! `policy set --global` records a revision of the global scope (the store's `sandbox: None`)
//! and puts it in force, in full, in every sandbox (one atomic generation swap each, as above);
//! sandboxes created while it is in force start with it ([`global_in_force`] is what the proxy
//! attaches them with, also after a gateway restart). While it is in force, sandbox-level
//! updates are refused. A global policy carries only `network_policies`: the static sections
//! are fixed per sandbox at creation, so a global file that writes one is rejected
//! ([`parse_global`]). `policy delete --global` marks it `superseded` and puts each sandbox's own
//! newest loaded revision back in force. The global policy in force is simply the newest
//! `loaded` revision of the global scope.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use super::{
    api::{DeleteGlobalResult, EffectivePolicy, PolicySource, SetPolicy, SetPolicyResult},
    lifecycle::{LifecycleError, Sandboxes},
};
use crate::{
    policy::{self, ParseOutcome, Parsed, Policy, PolicyError, PolicyErrors},
    proxy::CompiledNetwork,
    store::{
        EventKind, GatewayEvent, Phase, PolicyRevision, RevisionInfo, RevisionStatus,
        SandboxRecord, Store, StoreError,
    },
};

/// A revision [`Sandboxes::set_policy`] recorded, with the time its steps took.
struct Recorded {
    version: i64,
    hashed: Duration,
    stored: Duration,
}

/// The source name of the global policy in the proxy's errors.
pub const GLOBAL_SOURCE: &str = "global policy";

/// Error of a revision the gateway recorded but stopped before loading.
pub const STALE: &str = "the gateway stopped before loading this revision; the previous policy stayed in force (set it again)";

#[derive(Debug, thiserror::Error)]
pub enum RevisionError {
    /// Validation errors, one `FILE:LINE:COL: error: ...` line each.
    #[error("{0}")]
    Invalid(String),
    #[error(
        "sandbox {name:?}: static section `{section}` differs from the one the sandbox was created with; static sections are fixed at creation: leave `{section}` out of the file (or keep it as it was), or recreate the sandbox to change it"
    )]
    StaticChanged { name: String, section: &'static str },
    #[error(
        "sandbox {name:?}: a global policy (version {version}) is in force and replaces the network policy of every sandbox, so sandbox-level `policy set` is refused; remove it with `openshell policy delete --global` (each sandbox then returns to its own latest loaded policy) and set this one again"
    )]
    GlobalInForce { name: String, version: i64 },
    #[error(
        "sandbox {name:?} has no policy revision {version} (see `openshell policy list {name}`)"
    )]
    NoSuchRevision { name: String, version: i64 },
    #[error("sandbox {name:?}: stored policy revision {version} does not parse: {message}")]
    Corrupt {
        name: String,
        version: i64,
        message: String,
    },
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RevisionError {
    /// The API error kind and HTTP status.
    pub fn kind(&self) -> (&'static str, u16) {
        match self {
            Self::Invalid(_) => ("invalid_policy", 400),
            Self::StaticChanged { .. } => ("static_policy_changed", 409),
            Self::GlobalInForce { .. } => ("global_policy_in_force", 409),
            Self::NoSuchRevision { .. } | Self::Store(StoreError::NoSuchSandbox { .. }) => {
                ("not_found", 404)
            }
            Self::Lifecycle(e) => e.kind(),
            Self::Corrupt { .. } | Self::Store(_) => ("internal", 500),
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `sha256:`-less lowercase hex SHA-256 of the policy's canonical form
/// ([`Policy::canonical_sha256`]).
fn canonical_sha256(policy: &Policy, source: &str) -> Result<String, RevisionError> {
    policy
        .canonical_sha256()
        .map_err(|e| RevisionError::Invalid(format!("{source}: writing the canonical form: {e}")))
}

/// Milliseconds of `d`, for the step timings in the gateway's log.
fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// `policy` with the static sections it omits taken from `creation`, so that two policies
/// differing only by omitted static sections have the same canonical form.
fn with_creation_statics(mut policy: Policy, creation: &Policy) -> Policy {
    policy.filesystem.clone_from(&creation.filesystem);
    policy.landlock.clone_from(&creation.landlock);
    policy.process.clone_from(&creation.process);
    policy.present = creation.present;
    policy
}

/// The first static section that `new` writes differently from `creation`.
fn changed_static_section(new: &Policy, creation: &Policy) -> Option<&'static str> {
    if new.present.filesystem_policy && new.filesystem != creation.filesystem {
        Some("filesystem_policy")
    } else if new.present.landlock && new.landlock != creation.landlock {
        Some("landlock")
    } else if new.present.process && new.process != creation.process {
        Some("process")
    } else {
        None
    }
}

/// The static sections of creation policies, by the hash of their revision (content-addressed,
/// so a sandbox deleted and created again under the same name cannot see a stale entry): each
/// `policy set` needs them, and parsing the creation policy again costs as much as the new one.
#[derive(Debug, Default)]
pub struct StaticsCache(Mutex<HashMap<String, Arc<Policy>>>);

impl StaticsCache {
    /// More entries than sandboxes on one host; past it the cache starts over.
    const MAX_ENTRIES: usize = 1024;

    /// The static sections of creation revision `rev` (a policy without network blocks),
    /// parsed with `parse` the first time.
    fn get_or_parse(
        &self,
        rev: &PolicyRevision,
        parse: impl FnOnce() -> Result<Policy, RevisionError>,
    ) -> Result<Arc<Policy>, RevisionError> {
        let lock = || self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(statics) = lock().get(&rev.sha256) {
            return Ok(Arc::clone(statics));
        }
        let mut statics = parse()?;
        statics.network.clear();
        let statics = Arc::new(statics);
        let mut cache = lock();
        if cache.len() >= Self::MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(rev.sha256.clone(), Arc::clone(&statics));
        Ok(statics)
    }
}

/// The last policy text submitted for each sandbox that parsed, kept so that the next edit of it
/// is read incrementally ([`Parsed::update`]: only the changed blocks of a large file are parsed
/// again; the result is the same as a full parse).
#[derive(Debug, Default)]
pub struct ParseCache(Mutex<HashMap<String, Parsed>>);

impl ParseCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Parsed>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Parses and validates `text`, a new policy for sandbox `name`, as an edit of the last one
    /// that parsed if there is one, and keeps it for the next. Returns the policy and how it
    /// was read.
    fn parse(
        &self,
        name: &str,
        source: &str,
        text: &str,
    ) -> Result<(Policy, ParseOutcome), PolicyErrors> {
        // Taken out while it is updated: a concurrent update of the same sandbox reads its
        // file in full, which gives the same result.
        let taken = self.lock().remove(name);
        let parsed = match taken {
            Some(mut parsed) => match parsed.update(source, text) {
                Ok(()) => parsed,
                Err(errors) => {
                    // Still the last text that parsed.
                    self.lock().insert(name.to_owned(), parsed);
                    return Err(errors);
                }
            },
            None => policy::parse_keeping(source, text)?,
        };
        let result = (parsed.policy().clone(), parsed.outcome());
        self.lock().insert(name.to_owned(), parsed);
        Ok(result)
    }

    /// Forgets sandbox `name` (deleted).
    pub(super) fn forget(&self, name: &str) {
        self.lock().remove(name);
    }
}

/// The global revision in force: the newest `loaded` revision of the global scope.
pub fn global_in_force(store: &dyn Store) -> Result<Option<PolicyRevision>, StoreError> {
    Ok(store
        .revisions(None)?
        .into_iter()
        .find(|r| r.status == RevisionStatus::Loaded))
}

/// The revision of a sandbox's own that governs it when no global policy does: its newest
/// `loaded` one, else (never loaded yet: created while a global policy was in force) its newest
/// one that did not fail. `revisions` is newest first.
fn own_in_force(revisions: &[PolicyRevision]) -> Option<&PolicyRevision> {
    revisions
        .iter()
        .find(|r| r.status == RevisionStatus::Loaded)
        .or_else(|| {
            revisions
                .iter()
                .find(|r| r.status != RevisionStatus::Failed)
        })
}

/// Where `key` starts as a top-level key of a block-style YAML document, for error positions
/// (1-based; `(0, 0)` when it is not written that way).
fn top_level_key_pos(text: &str, key: &str) -> (u64, u64) {
    text.lines()
        .position(|line| {
            let rest = line
                .strip_prefix(key)
                .or_else(|| line.strip_prefix(&format!("\"{key}\"")))
                .or_else(|| line.strip_prefix(&format!("'{key}'")));
            rest.is_some_and(|r| r.trim_start().starts_with(':'))
        })
        .map_or((0, 0), |i| (i as u64 + 1, 1))
}

/// Parses and validates a global policy file: a policy whose only section beside `version` is
/// `network_policies`. Each static section it writes is an error at its line.
pub fn parse_global(source: &str, text: &str) -> Result<Policy, PolicyErrors> {
    let policy = policy::parse(source, text)?;
    let written = [
        ("filesystem_policy", policy.present.filesystem_policy),
        ("landlock", policy.present.landlock),
        ("process", policy.present.process),
    ];
    let errors: Vec<PolicyError> = written
        .into_iter()
        .filter(|(_, present)| *present)
        .map(|(section, _)| {
            let (line, column) = top_level_key_pos(text, section);
            PolicyError {
                file: source.to_owned(),
                line,
                column,
                path: section.to_owned(),
                message: format!(
                    "`{section}` is a static section, and a global policy carries only `network_policies`"
                ),
                hint: Some(format!(
                    "static sections are fixed per sandbox when it is created: remove `{section}` from the global policy file"
                )),
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyErrors::new(errors))
    }
}

impl Sandboxes {
    /// Appends a gateway event; a store failure is reported on stderr only (the event log is
    /// informational, the action it describes already happened).
    pub(super) fn record_event(
        &self,
        sandbox: Option<&str>,
        kind: EventKind,
        revision: Option<i64>,
        message: impl Into<String>,
    ) {
        let event = GatewayEvent {
            time_ms: now_ms(),
            sandbox: sandbox.map(str::to_owned),
            kind,
            revision,
            message: message.into(),
        };
        if let Err(e) = self.store().append_event(&event) {
            eprintln!("gateway: recording event {}: {e}", kind.as_str());
        }
    }

    fn lifecycle_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ready_sandboxes(&self) -> Result<Vec<SandboxRecord>, RevisionError> {
        Ok(self
            .store()
            .sandboxes()?
            .into_iter()
            .filter(|r| r.phase == Phase::Ready)
            .collect())
    }

    fn ready_source(&self, name: &str) -> Result<String, RevisionError> {
        let rec = self
            .store()
            .sandbox(name)?
            .ok_or_else(|| LifecycleError::NotFound {
                name: name.to_owned(),
            })?;
        if rec.phase != Phase::Ready {
            return Err(LifecycleError::NotReady {
                name: name.to_owned(),
                phase: rec.phase.as_str(),
            }
            .into());
        }
        Ok(rec.policy_source)
    }

    /// Every policy revision of sandbox `name`, newest first.
    pub fn policy_revisions(&self, name: &str) -> Result<Vec<PolicyRevision>, RevisionError> {
        self.ready_source(name)?;
        Ok(self.store().revisions(Some(name))?)
    }

    fn parse_stored(
        name: &str,
        source: &str,
        rev: &PolicyRevision,
    ) -> Result<Policy, RevisionError> {
        policy::parse(source, &rev.policy).map_err(|e| RevisionError::Corrupt {
            name: name.to_owned(),
            version: rev.version,
            message: e.to_string(),
        })
    }

    /// Revision `version` of sandbox `name`, without its text.
    pub fn policy_revision_info(
        &self,
        name: &str,
        version: i64,
    ) -> Result<RevisionInfo, RevisionError> {
        self.ready_source(name)?;
        self.store()
            .revision_info(Some(name), Some(version))?
            .ok_or_else(|| RevisionError::NoSuchRevision {
                name: name.to_owned(),
                version,
            })
    }

    /// Revision `version` of sandbox `name`.
    pub fn policy_revision(
        &self,
        name: &str,
        version: i64,
    ) -> Result<PolicyRevision, RevisionError> {
        self.ready_source(name)?;
        self.store()
            .revision(Some(name), Some(version))?
            .ok_or_else(|| RevisionError::NoSuchRevision {
                name: name.to_owned(),
                version,
            })
    }

    /// Marks revisions that a previous gateway recorded but never loaded (it stopped in
    /// between) as failed; the revision loaded before them stays in force. Revision 1 is left
    /// alone: it is loaded when the sandbox is attached.
    pub(super) fn fail_stale_revisions(&self, name: &str) -> Result<(), LifecycleError> {
        for rev in self.store().revisions(Some(name))? {
            if rev.status == RevisionStatus::Pending && rev.version > 1 {
                self.store().set_revision_status(
                    Some(name),
                    rev.version,
                    RevisionStatus::Failed,
                    Some(STALE),
                )?;
                eprintln!(
                    "gateway: sandbox {name:?}: policy revision {} was never loaded; marked failed",
                    rev.version
                );
            }
        }
        Ok(())
    }

    /// Hashes `new` (the policy of `req` with the creation statics) and records it as a new
    /// revision of sandbox `name`, then hands the result to `recorded`. `None` when it is the
    /// policy in force (`recorded` was told so and nothing was recorded).
    fn record_revision(
        &self,
        name: &str,
        req: &SetPolicy,
        new: &Policy,
        recorded: impl FnOnce(SetPolicyResult),
    ) -> Result<Option<Recorded>, RevisionError> {
        let t = Instant::now();
        let sha256 = canonical_sha256(new, &req.policy_source)?;
        let hashed = t.elapsed();
        // Every revision's hash is that of its canonical form with the creation statics, so
        // comparing hashes compares policies without parsing the one in force again.
        if let Some(current) = self.store().revision_info(Some(name), None)?
            && current.sha256 == sha256
        {
            recorded(SetPolicyResult {
                unchanged: true,
                revision: current,
            });
            return Ok(None);
        }
        let t = Instant::now();
        let rev = self
            .store()
            .add_revision(Some(name), &req.policy, &sha256, now_ms())?;
        let version = rev.version;
        let stored = t.elapsed();
        recorded(SetPolicyResult {
            unchanged: false,
            revision: rev,
        });
        Ok(Some(Recorded {
            version,
            hashed,
            stored,
        }))
    }

    /// Validates `req` and records it as a new revision of sandbox `name`, hands the result to
    /// `recorded` (the API answers at this point), then loads the revision and records the
    /// outcome. Errors returned before `recorded` was called refuse the update; nothing changed.
    pub fn set_policy(
        &self,
        name: &str,
        req: &SetPolicy,
        recorded: impl FnOnce(SetPolicyResult),
    ) -> Result<(), RevisionError> {
        // Validation comes first, outside the lock (it is most of a large reload's time): an
        // invalid file is reported as such whatever the state of the sandbox, as the CLI did
        // when it validated the file itself.
        let started = Instant::now();
        let (new, read) = self
            .parses
            .parse(name, &req.policy_source, &req.policy)
            .map_err(|e| RevisionError::Invalid(e.to_string()))?;
        let validated = started.elapsed();
        let _guard = self
            .policy_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let locked = Instant::now();
        let creation_source = self.ready_source(name)?;
        if let Some(global) = global_in_force(self.store().as_ref())? {
            return Err(RevisionError::GlobalInForce {
                name: name.to_owned(),
                version: global.version,
            });
        }
        // Only the two revisions needed, not every stored one: the cost of a reload must not
        // grow with the sandbox's history.
        let first =
            self.store()
                .revision(Some(name), Some(1))?
                .ok_or(RevisionError::NoSuchRevision {
                    name: name.to_owned(),
                    version: 1,
                })?;
        let creation = self.creation_statics.get_or_parse(&first, || {
            Self::parse_stored(name, &creation_source, &first)
        })?;
        if let Some(section) = changed_static_section(&new, &creation) {
            return Err(RevisionError::StaticChanged {
                name: name.to_owned(),
                section,
            });
        }
        let new = with_creation_statics(new, &creation);
        let checked = locked.elapsed();
        // The proxy's compilation of the policy runs beside the hash and the record (it is pure
        // work on the validated policy); only putting it in force waits for the record.
        let network = self.network();
        let (recorded_rev, compiled) = std::thread::scope(|scope| {
            let compiling = network.map(|_| {
                scope.spawn(|| {
                    let t = Instant::now();
                    (CompiledNetwork::new(&new), t.elapsed())
                })
            });
            let recorded_rev = self.record_revision(name, req, &new, recorded);
            (
                recorded_rev,
                compiling.map(std::thread::ScopedJoinHandle::join),
            )
        });
        let Some(Recorded {
            version,
            hashed,
            stored,
        }) = recorded_rev?
        else {
            return Ok(());
        };
        self.failpoint("policy-after-record");
        self.pause("policy-before-load");
        let t = Instant::now();
        let mut compile_time = Duration::ZERO;
        let loaded = match (network, compiled) {
            _ if self.failing("policy-load-fails") => {
                Err("failpoint policy-load-fails: loading refused".to_owned())
            }
            (Some(network), Some(Ok((compiled, took)))) => {
                compile_time = took;
                network.load_compiled(name, compiled, version)
            }
            (Some(_), _) => Err("compiling the policy failed (the compiler panicked)".to_owned()),
            (None, _) => Ok(()),
        };
        let swapped = t.elapsed();
        let (status, error) = match &loaded {
            Ok(()) => (RevisionStatus::Loaded, None),
            Err(message) => (RevisionStatus::Failed, Some(message.as_str())),
        };
        let t = Instant::now();
        self.store()
            .set_revision_status(Some(name), version, status, error)?;
        self.revision_settled();
        let settled = t.elapsed();
        let (kind, message) = match loaded {
            Ok(()) => (
                EventKind::PolicyLoaded,
                format!("policy revision {version} loaded"),
            ),
            Err(e) => (
                EventKind::PolicyFailed,
                format!("policy revision {version} failed; the previous one stays in force: {e}"),
            ),
        };
        // Where the time went, for BENCHMARKS.md and for operators wondering why a reload of a
        // large policy is slow.
        eprintln!(
            "gateway: sandbox {name:?}: {message} (validate {} {}, static check {}, hash {}, record {}, compile {} beside them, swap {}, status {})",
            ms(validated),
            match read {
                ParseOutcome::Reused { reused, parsed } => {
                    format!("reading {parsed} changed blocks, keeping {reused}")
                }
                ParseOutcome::Full | ParseOutcome::Fallback(_) => {
                    "reading the whole file".to_owned()
                }
            },
            ms(checked),
            ms(hashed),
            ms(stored),
            ms(compile_time),
            ms(swapped),
            ms(settled)
        );
        self.record_event(Some(name), kind, Some(version), message);
        Ok(())
    }

    /// Puts sandbox `rec`'s own policy back in force ([`own_in_force`]) and marks it loaded.
    fn restore_own(&self, rec: &SandboxRecord) -> Result<i64, String> {
        let revisions = self
            .store()
            .revisions(Some(&rec.name))
            .map_err(|e| e.to_string())?;
        let rev = own_in_force(&revisions).ok_or("it has no policy revision that did not fail")?;
        if let Some(network) = self.network() {
            let policy = Self::parse_stored(&rec.name, &rec.policy_source, rev)
                .map_err(|e| e.to_string())?;
            network.load_policy(&rec.name, &policy, rev.version)?;
        }
        if rev.status != RevisionStatus::Loaded {
            self.store()
                .set_revision_status(Some(&rec.name), rev.version, RevisionStatus::Loaded, None)
                .map_err(|e| e.to_string())?;
        }
        Ok(rev.version)
    }

    /// Validates `req` as a global policy ([`parse_global`]), records it as a new global
    /// revision, hands the result to `recorded`, then puts it in force in every sandbox. If a
    /// sandbox cannot take it, the sandboxes already switched go back to what they had and the
    /// revision is marked failed: it is in force everywhere or nowhere.
    pub fn set_global_policy(
        &self,
        req: &SetPolicy,
        recorded: impl FnOnce(SetPolicyResult),
    ) -> Result<(), RevisionError> {
        let _policy = self
            .policy_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let new = parse_global(&req.policy_source, &req.policy)
            .map_err(|e| RevisionError::Invalid(e.to_string()))?;
        let sha256 = canonical_sha256(&new, &req.policy_source)?;
        let previous = global_in_force(self.store().as_ref())?;
        // Every global revision's hash is that of its canonical form: equal hashes, equal
        // policies.
        if let Some(current) = previous.as_ref().filter(|c| c.sha256 == sha256) {
            recorded(SetPolicyResult {
                unchanged: true,
                revision: current.info(),
            });
            return Ok(());
        }
        // No sandbox is created or deleted while the policy changes under them.
        let _lifecycle = self.lifecycle_guard();
        let rev = self
            .store()
            .add_revision(None, &req.policy, &sha256, now_ms())?;
        let version = rev.version;
        recorded(SetPolicyResult {
            unchanged: false,
            revision: rev,
        });
        let sandboxes = self.ready_sandboxes()?;
        let mut failure = None;
        let mut switched = Vec::new();
        if let Some(network) = self.network() {
            for rec in &sandboxes {
                match network.load_policy(&rec.name, &new, version) {
                    Ok(()) => switched.push(rec),
                    Err(e) => {
                        failure = Some(format!("sandbox {:?} could not take it: {e}", rec.name));
                        break;
                    }
                }
            }
        }
        if let (Some(_), Some(network)) = (&failure, self.network()) {
            for rec in switched {
                let back = match &previous {
                    Some(g) => parse_global(GLOBAL_SOURCE, &g.policy)
                        .map_err(|e| e.to_string())
                        .and_then(|p| network.load_policy(&rec.name, &p, g.version))
                        .map(|()| g.version),
                    None => self.restore_own(rec),
                };
                if let Err(e) = back {
                    eprintln!(
                        "gateway: sandbox {:?}: putting its previous policy back: {e}",
                        rec.name
                    );
                }
            }
        }
        let (status, kind, message) = match &failure {
            None => (
                RevisionStatus::Loaded,
                EventKind::GlobalPolicyLoaded,
                format!(
                    "global policy revision {version} loaded into {} sandbox(es)",
                    sandboxes.len()
                ),
            ),
            Some(e) => (
                RevisionStatus::Failed,
                EventKind::GlobalPolicyFailed,
                format!("global policy revision {version} failed; nothing changed: {e}"),
            ),
        };
        self.store()
            .set_revision_status(None, version, status, failure.as_deref())?;
        eprintln!("gateway: {message}");
        self.record_event(None, kind, Some(version), message);
        Ok(())
    }

    /// Removes the global policy: marks its revision superseded and puts each sandbox's own
    /// policy back in force. Nothing to do when none is in force.
    pub fn delete_global_policy(&self) -> Result<DeleteGlobalResult, RevisionError> {
        let _policy = self
            .policy_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _lifecycle = self.lifecycle_guard();
        let mut result = DeleteGlobalResult {
            deleted: None,
            restored: Vec::new(),
            failed: Vec::new(),
        };
        let Some(current) = global_in_force(self.store().as_ref())? else {
            return Ok(result);
        };
        // Superseded first: a gateway that stops half-way restarts every sandbox on its own.
        self.store().set_revision_status(
            None,
            current.version,
            RevisionStatus::Superseded,
            None,
        )?;
        result.deleted = Some(current.version);
        for rec in self.ready_sandboxes()? {
            match self.restore_own(&rec) {
                Ok(version) => result.restored.push((rec.name, version)),
                Err(e) => {
                    eprintln!(
                        "gateway: sandbox {:?}: restoring its own policy: {e}",
                        rec.name
                    );
                    result.failed.push((rec.name, e));
                }
            }
        }
        let message = format!(
            "global policy revision {} deleted; {} sandbox(es) back on their own policy",
            current.version,
            result.restored.len()
        );
        eprintln!("gateway: {message}");
        self.record_event(
            None,
            EventKind::GlobalPolicyDeleted,
            Some(current.version),
            message,
        );
        Ok(result)
    }

    /// Every revision of the global policy, newest first.
    pub fn global_revisions(&self) -> Result<Vec<PolicyRevision>, RevisionError> {
        Ok(self.store().revisions(None)?)
    }

    /// Marks global revisions that a previous gateway recorded but never loaded as failed.
    pub(super) fn fail_stale_global(&self) -> Result<(), RevisionError> {
        for rev in self.store().revisions(None)? {
            if rev.status == RevisionStatus::Pending {
                self.store().set_revision_status(
                    None,
                    rev.version,
                    RevisionStatus::Failed,
                    Some(STALE),
                )?;
                eprintln!(
                    "gateway: global policy revision {} was never loaded; marked failed",
                    rev.version
                );
            }
        }
        Ok(())
    }

    /// The network policy revision that governs sandbox `name`.
    pub fn effective_policy(&self, name: &str) -> Result<EffectivePolicy, RevisionError> {
        self.ready_source(name)?;
        let own = self.store().revisions(Some(name))?;
        let own = own_in_force(&own);
        let (source, rev) = match global_in_force(self.store().as_ref())? {
            Some(global) => (PolicySource::Global, global),
            None => (
                PolicySource::Sandbox,
                own.cloned().ok_or(RevisionError::NoSuchRevision {
                    name: name.to_owned(),
                    version: 1,
                })?,
            ),
        };
        Ok(EffectivePolicy {
            source,
            revision: rev.version,
            sha256: rev.sha256,
            status: rev.status,
            created_ms: rev.created_ms,
            sandbox_revision: own.map(|r| r.version),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATION: &str = "version: 1
filesystem_policy:
  read_only: [/usr]
network_policies:
  a:
    endpoints:
      - { host: example.com, port: 443 }
    binaries:
      - { path: /usr/bin/curl }
";

    fn parse(text: &str) -> Policy {
        policy::parse("p.yaml", text).unwrap()
    }

    #[test]
    fn omitted_static_sections_are_fine_and_hash_like_the_creation_policy() {
        let creation = parse(CREATION);
        let network_only = parse(
            "version: 1
network_policies:
  a:
    endpoints:
      - { host: example.com, port: 443 }
    binaries:
      - { path: /usr/bin/curl }
",
        );
        assert_eq!(changed_static_section(&network_only, &creation), None);
        let a = canonical_sha256(&with_creation_statics(network_only, &creation), "x").unwrap();
        let b = canonical_sha256(&with_creation_statics(creation.clone(), &creation), "x").unwrap();
        assert_eq!(a, b);
        let other = canonical_sha256(&parse(&CREATION.replace("443", "8443")), "x").unwrap();
        assert_ne!(a, other);
    }

    #[test]
    fn creation_statics_are_parsed_once_per_revision_hash() {
        let cache = StaticsCache::default();
        let rev = |sha256: &str| PolicyRevision {
            sandbox: Some("a".into()),
            version: 1,
            sha256: sha256.to_owned(),
            policy: CREATION.to_owned(),
            status: RevisionStatus::Loaded,
            error: None,
            created_ms: 0,
        };
        let mut parses = 0;
        for sha256 in ["h1", "h1", "h2"] {
            let statics = cache
                .get_or_parse(&rev(sha256), || {
                    parses += 1;
                    Ok(parse(CREATION))
                })
                .unwrap();
            assert_eq!(statics.filesystem, parse(CREATION).filesystem);
            assert!(statics.network.is_empty());
        }
        assert_eq!(parses, 2);
        let failed = cache.get_or_parse(&rev("h3"), || {
            Err(RevisionError::Invalid("corrupt".to_owned()))
        });
        assert!(failed.is_err());
    }

    #[test]
    fn a_global_policy_carries_only_network_policies() {
        let errors = parse_global("g.yaml", CREATION).unwrap_err().to_string();
        insta::assert_snapshot!(errors, @r"g.yaml:2:1: error: `filesystem_policy` is a static section, and a global policy carries only `network_policies`; static sections are fixed per sandbox when it is created: remove `filesystem_policy` from the global policy file (at filesystem_policy)");
        let both = format!(
            "{CREATION}\"process\":\n  run_as_user: nobody\nlandlock:\n  compatibility: best_effort\n"
        );
        insta::assert_snapshot!(parse_global("g.yaml", &both).unwrap_err().to_string(), @r"
            g.yaml:2:1: error: `filesystem_policy` is a static section, and a global policy carries only `network_policies`; static sections are fixed per sandbox when it is created: remove `filesystem_policy` from the global policy file (at filesystem_policy)
            g.yaml:10:1: error: `process` is a static section, and a global policy carries only `network_policies`; static sections are fixed per sandbox when it is created: remove `process` from the global policy file (at process)
            g.yaml:12:1: error: `landlock` is a static section, and a global policy carries only `network_policies`; static sections are fixed per sandbox when it is created: remove `landlock` from the global policy file (at landlock)
        ");
        let network_only = CREATION.replace("filesystem_policy:\n  read_only: [/usr]\n", "");
        assert_eq!(
            parse_global("g.yaml", &network_only).unwrap().network.len(),
            1
        );
    }

    #[test]
    fn own_policy_in_force_is_the_newest_loaded_else_the_newest_that_did_not_fail() {
        let rev = |version, status| PolicyRevision {
            sandbox: Some("a".into()),
            version,
            sha256: String::new(),
            policy: String::new(),
            status,
            error: None,
            created_ms: 0,
        };
        let revs = [
            rev(3, RevisionStatus::Failed),
            rev(2, RevisionStatus::Loaded),
            rev(1, RevisionStatus::Superseded),
        ];
        assert_eq!(own_in_force(&revs).map(|r| r.version), Some(2));
        let never_loaded = [rev(1, RevisionStatus::Pending)];
        assert_eq!(own_in_force(&never_loaded).map(|r| r.version), Some(1));
        assert!(own_in_force(&[rev(1, RevisionStatus::Failed)]).is_none());
    }

    #[test]
    fn a_changed_static_section_is_named() {
        let creation = parse(CREATION);
        let changed = parse(&CREATION.replace("[/usr]", "[/usr, /opt]"));
        assert_eq!(
            changed_static_section(&changed, &creation),
            Some("filesystem_policy")
        );
        let process = parse(&format!("{CREATION}process:\n  run_as_user: nobody\n"));
        assert_eq!(changed_static_section(&process, &creation), Some("process"));
    }
}
