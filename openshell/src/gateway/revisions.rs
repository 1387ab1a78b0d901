//! Policy revisions of a running sandbox: `policy set` and `policy list`/`get` on the gateway.
//!
//! A new policy is validated, checked against the static sections the sandbox was created
//! with, compared with the revision in force (identical canonical form: nothing to do), recorded
//! as a `pending` revision and then compiled and swapped in by the proxy
//! ([`super::CgroupAttach::load_policy`]). The revision ends `loaded` (the previous loaded one
//! becomes `superseded`) or `failed` with the error, in which case the previous generation stays
//! in force. Updates of all sandboxes are serialised, so revisions load in version order.

use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use super::{
    api::{SetPolicy, SetPolicyResult},
    lifecycle::{LifecycleError, Sandboxes},
};
use crate::{
    policy::{self, Policy},
    store::{Phase, PolicyRevision, RevisionStatus, StoreError},
};

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

/// `sha256:`-less lowercase hex SHA-256 of the policy's canonical form.
fn canonical_sha256(policy: &Policy, source: &str) -> Result<(String, String), RevisionError> {
    let canonical = policy.to_canonical_yaml().map_err(|e| {
        RevisionError::Invalid(format!("{source}: writing the canonical form: {e}"))
    })?;
    let hex = Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((canonical, hex))
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

impl Sandboxes {
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

    /// Validates `req` and records it as a new revision of sandbox `name`, hands the result to
    /// `recorded` (the API answers at this point), then loads the revision and records the
    /// outcome. Errors returned before `recorded` was called refuse the update; nothing changed.
    pub fn set_policy(
        &self,
        name: &str,
        req: &SetPolicy,
        recorded: impl FnOnce(SetPolicyResult),
    ) -> Result<(), RevisionError> {
        let _guard = self
            .policy_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let creation_source = self.ready_source(name)?;
        let new = policy::parse(&req.policy_source, &req.policy)
            .map_err(|e| RevisionError::Invalid(e.to_string()))?;
        // Only the two revisions needed, not every stored one: the cost of a reload must not
        // grow with the sandbox's history.
        let first =
            self.store()
                .revision(Some(name), Some(1))?
                .ok_or(RevisionError::NoSuchRevision {
                    name: name.to_owned(),
                    version: 1,
                })?;
        let creation = Self::parse_stored(name, &creation_source, &first)?;
        if let Some(section) = changed_static_section(&new, &creation) {
            return Err(RevisionError::StaticChanged {
                name: name.to_owned(),
                section,
            });
        }
        let new = with_creation_statics(new, &creation);
        let (_, sha256) = canonical_sha256(&new, &req.policy_source)?;
        // Every revision's hash is that of its canonical form with the creation statics, so
        // comparing hashes compares policies without parsing the one in force again.
        if let Some(current) = self.store().revision(Some(name), None)?
            && current.sha256 == sha256
        {
            recorded(SetPolicyResult {
                unchanged: true,
                revision: current,
            });
            return Ok(());
        }
        let rev = self
            .store()
            .add_revision(Some(name), &req.policy, &sha256, now_ms())?;
        let version = rev.version;
        recorded(SetPolicyResult {
            unchanged: false,
            revision: rev,
        });
        self.failpoint("policy-after-record");
        self.pause("policy-before-load");
        let loaded = match self.network() {
            _ if self.failing("policy-load-fails") => {
                Err("failpoint policy-load-fails: loading refused".to_owned())
            }
            Some(network) => network.load_policy(name, &new, version),
            None => Ok(()),
        };
        let (status, error) = match &loaded {
            Ok(()) => (RevisionStatus::Loaded, None),
            Err(message) => (RevisionStatus::Failed, Some(message.as_str())),
        };
        self.store()
            .set_revision_status(Some(name), version, status, error)?;
        self.revision_settled();
        match loaded {
            Ok(()) => eprintln!("gateway: sandbox {name:?}: policy revision {version} loaded"),
            Err(e) => eprintln!("gateway: sandbox {name:?}: policy revision {version} failed: {e}"),
        }
        Ok(())
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
