//! Durable gateway state: sandboxes, their static policy, policy revisions, settings and the
//! decision log.
//!
//! The gateway talks to storage only through [`Store`], a deliberately narrow interface: one
//! host uses the embedded SQLite [`SqliteStore`]; a fleet could put PostgreSQL or a Kubernetes
//! CRD behind the same trait. Every method is one atomic transaction; when it returns `Ok`, the
//! change is durable (see [`sqlite`] for why).

pub mod sqlite;

use serde::{Deserialize, Serialize};

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sandbox {name:?} already exists")]
    SandboxExists { name: String },
    #[error("no sandbox named {name:?}")]
    NoSuchSandbox { name: String },
    #[error("opening state database {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "state database {path} has schema version {found}, newer than this openshell ({supported}); upgrade openshell"
    )]
    TooNew {
        path: std::path::PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("state database: {action}: {source}")]
    Sql {
        action: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database: corrupt value in {what}: {value:?}")]
    Corrupt { what: &'static str, value: String },
}

/// Where a sandbox is in its life. Only `Ready` sandboxes are usable; a gateway that finds a
/// `Creating` or `Deleting` row at start rolls it back (nothing about it was acknowledged as
/// ready) or finishes deleting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Creating,
    Ready,
    Deleting,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "creating",
            Phase::Ready => "ready",
            Phase::Deleting => "deleting",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "creating" => Phase::Creating,
            "ready" => Phase::Ready,
            "deleting" => Phase::Deleting,
            _ => return None,
        })
    }
}

/// A sandbox as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub name: String,
    pub phase: Phase,
    /// Keep the sandbox after its first command exits.
    pub keep: bool,
    /// Where the policy came from (file name as given, `OPENSHELL_SANDBOX_POLICY` or `default`).
    pub policy_source: String,
    /// The static sections in force, as JSON (fixed at creation).
    pub static_policy: String,
    /// The enforcement report of the most recent launch, as JSON.
    pub report: Option<String>,
    /// Unix time in milliseconds.
    pub created_ms: i64,
}

/// A new sandbox and its first policy revision.
#[derive(Debug, Clone)]
pub struct NewSandbox {
    pub name: String,
    pub keep: bool,
    pub policy_source: String,
    pub static_policy: String,
    /// The full policy text of revision 1.
    pub policy_text: String,
    /// SHA-256 (hex) of the policy's canonical form.
    pub policy_sha256: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevisionStatus {
    Pending,
    Loaded,
    Failed,
    Superseded,
}

impl RevisionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RevisionStatus::Pending => "pending",
            RevisionStatus::Loaded => "loaded",
            RevisionStatus::Failed => "failed",
            RevisionStatus::Superseded => "superseded",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => RevisionStatus::Pending,
            "loaded" => RevisionStatus::Loaded,
            "failed" => RevisionStatus::Failed,
            "superseded" => RevisionStatus::Superseded,
            _ => return None,
        })
    }
}

/// One policy revision of a sandbox (or of the global policy when `sandbox` is `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRevision {
    pub sandbox: Option<String>,
    pub version: i64,
    pub sha256: String,
    pub policy: String,
    pub status: RevisionStatus,
    pub error: Option<String>,
    pub created_ms: i64,
}

impl PolicyRevision {
    /// The revision without its text.
    #[must_use]
    pub fn info(&self) -> RevisionInfo {
        RevisionInfo {
            sandbox: self.sandbox.clone(),
            version: self.version,
            sha256: self.sha256.clone(),
            status: self.status,
            error: self.error.clone(),
            created_ms: self.created_ms,
        }
    }
}

/// A policy revision without its text: what `policy set` and a wait for a revision's outcome
/// need (the text of a 10,000-block policy is over a megabyte).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionInfo {
    pub sandbox: Option<String>,
    pub version: i64,
    pub sha256: String,
    pub status: RevisionStatus,
    pub error: Option<String>,
    pub created_ms: i64,
}

/// One network decision, as the proxy logs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub time_ms: i64,
    pub sandbox: String,
    /// `allow`, `deny` or `audit`.
    pub decision: String,
    pub binary: Option<String>,
    pub pid: Option<i64>,
    /// The calling binary's ancestors, nearest first.
    pub ancestors: Vec<String>,
    pub host: Option<String>,
    pub ip: Option<String>,
    pub port: Option<u16>,
    /// The policy block that decided, if any.
    pub block: Option<String>,
    pub reason: String,
    /// Policy revision in force.
    pub revision: Option<i64>,
}

/// Something the gateway did that an operator may want to see beside the decision log: a
/// policy revision loaded or failed, the global policy set or deleted, a sandbox created or
/// deleted, the gateway started. Kept when its sandbox is deleted (a short audit trail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayEvent {
    pub time_ms: i64,
    /// The sandbox it concerns; `None` for gateway-wide events (they show in every sandbox's
    /// log).
    pub sandbox: Option<String>,
    /// Machine-readable kind, e.g. `policy_loaded` (see [`EventKind`]).
    pub kind: EventKind,
    /// The policy revision concerned, if any (a global one for `global_policy_*`).
    pub revision: Option<i64>,
    /// One line for humans.
    pub message: String,
}

/// The kinds of [`GatewayEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    GatewayStarted,
    SandboxCreated,
    SandboxDeleted,
    PolicyLoaded,
    PolicyFailed,
    GlobalPolicyLoaded,
    GlobalPolicyFailed,
    GlobalPolicyDeleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GatewayStarted => "gateway_started",
            Self::SandboxCreated => "sandbox_created",
            Self::SandboxDeleted => "sandbox_deleted",
            Self::PolicyLoaded => "policy_loaded",
            Self::PolicyFailed => "policy_failed",
            Self::GlobalPolicyLoaded => "global_policy_loaded",
            Self::GlobalPolicyFailed => "global_policy_failed",
            Self::GlobalPolicyDeleted => "global_policy_deleted",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Self::GatewayStarted,
            Self::SandboxCreated,
            Self::SandboxDeleted,
            Self::PolicyLoaded,
            Self::PolicyFailed,
            Self::GlobalPolicyLoaded,
            Self::GlobalPolicyFailed,
            Self::GlobalPolicyDeleted,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Which rows of a log to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogQuery {
    /// Only rows with a larger id, oldest first (following a log). Without it: the newest
    /// `limit` rows, oldest first.
    pub after_id: Option<i64>,
    /// Only rows at or after this Unix time in milliseconds.
    pub since_ms: Option<i64>,
    pub limit: usize,
}

/// Rows of a log, each with its id, oldest first, and the cursor to follow the log from:
/// the largest id returned, else `after_id`, else the newest id of the log (0 when empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPage<T> {
    pub rows: Vec<(i64, T)>,
    pub last_id: i64,
}

/// The gateway's storage. Implementations must make every call atomic and durable on return.
pub trait Store: Send + Sync {
    /// Records a new sandbox in phase `Creating` with policy revision 1 (`pending`).
    fn insert_sandbox(&self, new: &NewSandbox) -> Result<SandboxRecord, StoreError>;
    fn set_phase(&self, name: &str, phase: Phase) -> Result<(), StoreError>;
    fn set_report(&self, name: &str, report_json: &str) -> Result<(), StoreError>;
    fn sandbox(&self, name: &str) -> Result<Option<SandboxRecord>, StoreError>;
    /// Every sandbox, ordered by name.
    fn sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError>;
    /// Removes a sandbox with its revisions, settings and decision log.
    fn delete_sandbox(&self, name: &str) -> Result<(), StoreError>;

    /// Adds a revision with the next version number (status `pending`) and returns it.
    fn add_revision(
        &self,
        sandbox: Option<&str>,
        policy: &str,
        sha256: &str,
        created_ms: i64,
    ) -> Result<RevisionInfo, StoreError>;
    /// Sets a revision's status; `loaded` supersedes every older loaded revision of the scope.
    fn set_revision_status(
        &self,
        sandbox: Option<&str>,
        version: i64,
        status: RevisionStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError>;
    /// Revisions of a scope, newest first.
    fn revisions(&self, sandbox: Option<&str>) -> Result<Vec<PolicyRevision>, StoreError>;
    /// One revision of a scope: `version`, or the newest loaded one when `version` is `None`.
    fn revision(
        &self,
        sandbox: Option<&str>,
        version: Option<i64>,
    ) -> Result<Option<PolicyRevision>, StoreError>;
    /// Like [`Store::revision`], without reading the text.
    fn revision_info(
        &self,
        sandbox: Option<&str>,
        version: Option<i64>,
    ) -> Result<Option<RevisionInfo>, StoreError>;

    fn setting(&self, scope: &str, key: &str) -> Result<Option<String>, StoreError>;
    fn put_setting(&self, scope: &str, key: &str, value: &str) -> Result<(), StoreError>;
    fn delete_setting(&self, scope: &str, key: &str) -> Result<(), StoreError>;

    fn append_decisions(&self, decisions: &[DecisionRecord]) -> Result<(), StoreError>;
    /// The newest `limit` decisions of a sandbox, oldest first.
    fn decisions(&self, sandbox: &str, limit: usize) -> Result<Vec<DecisionRecord>, StoreError>;
    /// Decisions of a sandbox selected by `query`.
    fn decision_page(
        &self,
        sandbox: &str,
        query: &LogQuery,
    ) -> Result<LogPage<DecisionRecord>, StoreError>;

    fn append_event(&self, event: &GatewayEvent) -> Result<(), StoreError>;
    /// Events of a sandbox and the gateway-wide ones, selected by `query`.
    fn event_page(
        &self,
        sandbox: &str,
        query: &LogQuery,
    ) -> Result<LogPage<GatewayEvent>, StoreError>;
}
