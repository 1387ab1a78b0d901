//! Request and response bodies of the gateway API (JSON), shared by the server and the CLI.

use serde::{Deserialize, Serialize};

/// Value of the `Upgrade` header that turns an exec request into an exec session.
pub const EXEC_UPGRADE: &str = "openshell-exec/1";

/// Every non-2xx response carries this body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable kind: `invalid_policy`, `not_found`, `conflict`, `bad_request`, `internal`.
    pub kind: String,
    /// Human-readable, complete message (may span lines, e.g. one per policy error).
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub pid: u32,
    pub version: String,
    pub state_dir: String,
    pub socket: String,
    pub cgroup: String,
    pub sandboxes: usize,
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSandbox {
    /// Generated when absent.
    pub name: Option<String>,
    /// Where the policy came from, used in error messages (`./my-policy.yaml`).
    pub policy_source: String,
    pub policy: String,
    pub keep: bool,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxInfo {
    pub name: String,
    /// `creating`, `running` (has processes), `idle` (none) or `deleting`.
    pub status: String,
    pub processes: usize,
    pub keep: bool,
    pub policy_source: String,
    /// Unix time in milliseconds.
    pub created_ms: i64,
    /// Host directory mounted at `/sandbox`.
    pub workdir: String,
    pub cgroup: String,
    /// The static policy in force.
    pub static_policy: serde_json::Value,
    /// Enforcement report of the most recent launch (absent before the first).
    pub report: Option<serde_json::Value>,
    /// Whether network policy is enforced for this sandbox.
    pub network_enforced: bool,
}

/// `POST /v1/sandboxes/{name}/exec` with `Upgrade: openshell-exec/1`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Extra environment (e.g. `TERM`, `LANG`), on top of the sandbox's own.
    pub env: Vec<(String, String)>,
    /// Open a pseudo-terminal (the CLI's stdin is a terminal).
    pub tty: bool,
    /// Initial window size when `tty`.
    pub rows: u16,
    pub cols: u16,
}

/// Messages of the exec session after the upgrade, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ExecEvent {
    /// Gateway → CLI: the gateway owns the raw stream; send the stdio message now.
    Ready,
    /// CLI → gateway: the stdio to use. Carries the CLI's stdin, stdout and stderr as
    /// SCM_RIGHTS unless the request asked for a tty.
    Stdio,
    /// Gateway → CLI: the command runs. With a tty, the pty master rides along (SCM_RIGHTS).
    Started { pid: i32 },
    /// Gateway → CLI: the command could not start; nothing ran.
    Error { message: String },
    /// Gateway → CLI: the command exited with this code (128 + signal when killed).
    Exited { code: i32 },
    /// CLI → gateway: deliver this signal to the command.
    Signal { signal: i32 },
}

/// `POST /v1/sandboxes/{name}/policy`: a new network policy for a running sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetPolicy {
    /// Where the policy came from, used in error messages (`./p.yaml`).
    pub policy_source: String,
    pub policy: String,
}

/// The answer to [`SetPolicy`]: the new revision (status `pending`; poll
/// `GET /v1/sandboxes/{name}/policy` for the outcome), or the revision in force when the policy
/// is identical to it (`unchanged`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetPolicyResult {
    pub unchanged: bool,
    pub revision: crate::store::PolicyRevision,
}
