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

/// The answer to [`SetPolicy`]: the new revision (status `pending`; wait for the outcome with
/// `GET /v1/sandboxes/{name}/policy/{version}/status?wait_ms=N`), or the revision in force when
/// the policy is identical to it (`unchanged`). Without the text, which the caller sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetPolicyResult {
    pub unchanged: bool,
    pub revision: crate::store::RevisionInfo,
}

/// `PUT /v1/policy/global` takes a [`SetPolicy`] and answers a [`SetPolicyResult`] (revision of
/// the global scope, `sandbox: null`); `DELETE /v1/policy/global` answers this.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteGlobalResult {
    /// The global revision that was in force, `None` when none was (nothing changed).
    pub deleted: Option<i64>,
    /// Each sandbox with the revision of its own that is in force again.
    pub restored: Vec<(String, i64)>,
    /// Sandboxes whose own policy could not be put back, with the error (they keep the
    /// deleted global policy until the gateway restarts).
    pub failed: Vec<(String, String)>,
}

/// Which logs `GET /v1/sandboxes/{name}/log` reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    /// The sandbox's decision log.
    #[default]
    Sandbox,
    /// Gateway events: the sandbox's and the gateway-wide ones.
    Gateway,
    /// Both.
    All,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sandbox => "sandbox",
            Self::Gateway => "gateway",
            Self::All => "all",
        }
    }

    pub fn decisions(self) -> bool {
        matches!(self, Self::Sandbox | Self::All)
    }

    pub fn events(self) -> bool {
        matches!(self, Self::Gateway | Self::All)
    }
}

/// The query of `GET /v1/sandboxes/{name}/log`:
/// `source=sandbox|gateway|all&n=N[&since_ms=T][&after_decision=ID][&after_event=ID]`.
/// Without a cursor (`after_*`) each log answers its newest `n` rows; with one, up to `n` rows
/// after it, oldest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogRequest {
    pub source: LogSource,
    pub limit: usize,
    pub since_ms: Option<i64>,
    pub after_decision: Option<i64>,
    pub after_event: Option<i64>,
}

impl LogRequest {
    pub fn to_query(&self) -> String {
        let mut q = format!("source={}&n={}", self.source.as_str(), self.limit);
        for (key, value) in [
            ("since_ms", self.since_ms),
            ("after_decision", self.after_decision),
            ("after_event", self.after_event),
        ] {
            if let Some(v) = value {
                q.push_str(&format!("&{key}={v}"));
            }
        }
        q
    }

    /// Parses [`Self::to_query`]'s form; `n` is clamped to `max_limit`.
    pub fn from_query(query: &str, max_limit: usize) -> Result<Self, String> {
        let mut req = Self {
            limit: max_limit,
            ..Self::default()
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || {
                value
                    .parse::<i64>()
                    .map_err(|_| format!("query parameter {key}={value:?} is not a number"))
            };
            match key {
                "source" => {
                    req.source = match value {
                        "sandbox" => LogSource::Sandbox,
                        "gateway" => LogSource::Gateway,
                        "all" => LogSource::All,
                        _ => {
                            return Err(format!(
                                "query parameter source={value:?}: use sandbox, gateway or all"
                            ));
                        }
                    }
                }
                "n" => req.limit = usize::try_from(number()?).unwrap_or(0).min(max_limit),
                "since_ms" => req.since_ms = Some(number()?),
                "after_decision" => req.after_decision = Some(number()?),
                "after_event" => req.after_event = Some(number()?),
                _ => return Err(format!("unknown query parameter {key:?}")),
            }
        }
        Ok(req)
    }
}

/// The answer to [`LogRequest`]: each log the source asked for (`None` for the others).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogResponse {
    pub decisions: Option<crate::store::LogPage<crate::store::DecisionRecord>>,
    pub events: Option<crate::store::LogPage<crate::store::GatewayEvent>>,
}

/// Where the network policy in force for a sandbox comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicySource {
    /// The global policy (`policy set --global`).
    Global,
    /// The sandbox's own revisions.
    Sandbox,
}

/// `GET /v1/sandboxes/{name}/settings`: what governs a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxSettings {
    pub sandbox: String,
    pub policy: EffectivePolicy,
    pub static_enforcement: StaticEnforcement,
    pub gateway: GatewaySettings,
}

/// The network policy revision in force.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub source: PolicySource,
    pub revision: i64,
    pub sha256: String,
    pub status: crate::store::RevisionStatus,
    /// Unix time in milliseconds the revision was created.
    pub created_ms: i64,
    /// The sandbox's own revision that is in force when no global policy is (its newest loaded
    /// one); with a global policy in force, the one that returns on `policy delete --global`.
    pub sandbox_revision: Option<i64>,
}

/// The static sections (fixed at creation) and what the launcher reported about them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StaticEnforcement {
    /// `landlock.compatibility` of the creation policy.
    pub landlock_compatibility: crate::sandbox::Compatibility,
    pub run_as_user: String,
    pub run_as_group: String,
    /// The report of the most recent launch; `None` before the first command ran.
    pub launch: Option<LaunchEnforcement>,
}

/// What the launcher applied at the most recent launch (from its enforcement report).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LaunchEnforcement {
    /// The Landlock ABI the ruleset was built for; 0 when the kernel has none.
    pub landlock_abi: u32,
    pub landlock_status: crate::sandbox::LandlockStatus,
    pub landlock_scoped: Vec<String>,
    /// User paths left out under best effort.
    pub landlock_skipped: Vec<String>,
    pub seccomp_enabled: bool,
    /// How many system calls always fail with EPERM.
    pub seccomp_blocked: usize,
    pub seccomp_foreign_arch: String,
    pub no_new_privs: bool,
    pub uid: u32,
    pub gid: u32,
    pub warnings: Vec<String>,
}

/// The gateway settings that apply to every sandbox (`OPENSHELL_GATEWAY_CONFIG`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GatewaySettings {
    pub state_dir: String,
    pub socket: String,
    pub socket_group: Option<String>,
    /// The cgroup v2 directory holding one cgroup per sandbox.
    pub cgroup_base: String,
    /// The resolvers the DNS listener asks.
    pub dns_upstream: Vec<String>,
    /// `config` (`[dns] upstream`) or `/etc/resolv.conf`.
    pub dns_upstream_from: String,
    /// `[dns] listen` as configured.
    pub dns_listen: String,
    /// `[proxy] transparent_listen` as configured.
    pub transparent_listen: String,
    /// Every address the proxy actually listens on (ports resolved, IPv6 beside IPv4).
    pub listening: Vec<String>,
    /// `[proxy] relay`: how allowed L4 streams are moved (`copy`, `splice` or `kernel`).
    #[serde(default)]
    pub relay: String,
    /// `[tls] extra_roots`: CA files trusted for upstream TLS beside the built-in roots.
    pub extra_roots: Vec<String>,
}
