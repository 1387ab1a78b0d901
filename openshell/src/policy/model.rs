//! The validated policy: every value checked, every default filled in. Serializes back to the
//! policy file format (the canonical form used for revision hashes).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use super::host::HostPattern;

/// A validated policy. Build it with [`crate::policy::parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `filesystem_policy` (static).
    pub filesystem: FilesystemPolicy,
    /// `landlock` (static).
    pub landlock: LandlockPolicy,
    /// `process` (static).
    pub process: ProcessPolicy,
    /// Which static sections the file contained. A hot reload may omit them.
    pub present: StaticSections,
    /// `network_policies` (dynamic), by key. Shared, so that a policy made from another by
    /// changing a few blocks (a reload of an edited file) costs no copy of the others.
    pub network: BTreeMap<String, Arc<NetworkBlock>>,
}

/// Which of the static sections were written in the file (absent ones hold their defaults).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StaticSections {
    pub filesystem_policy: bool,
    pub landlock: bool,
    pub process: bool,
}

/// Paths the sandboxed program may read or write, enforced by Landlock. Baseline paths are not
/// included here; the sandbox launcher adds them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FilesystemPolicy {
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    pub include_workdir: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LandlockPolicy {
    pub compatibility: Compatibility,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compatibility {
    /// Skip what the kernel or the filesystem cannot provide, warn, apply the rest.
    #[default]
    BestEffort,
    /// Fail sandbox creation instead.
    HardRequirement,
}

/// The identity the sandboxed program runs as: a name or a numeric id, never root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessPolicy {
    pub run_as_user: String,
    pub run_as_group: String,
}

impl Default for ProcessPolicy {
    fn default() -> Self {
        Self {
            run_as_user: "sandbox".to_owned(),
            run_as_group: "sandbox".to_owned(),
        }
    }
}

/// One entry of `network_policies`: these binaries may reach these endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkBlock {
    /// Display name (defaults to the key).
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    /// Exact paths or globs (`*` within a segment, `**` across).
    pub binaries: Vec<String>,
}

/// A destination (host and ports) and what to do with its traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: HostPattern,
    /// Sorted, deduplicated, 1–65535.
    pub ports: Vec<u16>,
    pub tls: TlsMode,
    /// `None`: TCP passthrough. `Some`: `protocol: rest`.
    pub rest: Option<RestPolicy>,
    /// Private networks this endpoint may resolve to.
    pub allowed_ips: Vec<IpNet>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Detect TLS and terminate it for `rest` endpoints.
    #[default]
    Auto,
    /// Never terminate TLS (a TLS stream then passes uninspected).
    Skip,
}

/// HTTP inspection settings of a `protocol: rest` endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestPolicy {
    pub enforcement: Enforcement,
    pub allow: AllowSet,
    pub deny_rules: Vec<RequestRule>,
    pub allow_encoded_slash: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Violations are blocked.
    #[default]
    Enforce,
    /// Violations are logged and allowed.
    Audit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowSet {
    Access(AccessPreset),
    Rules(Vec<RequestRule>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AccessPreset {
    /// GET, HEAD, OPTIONS on every path.
    #[serde(rename = "read-only")]
    ReadOnly,
    /// read-only plus POST, PUT, PATCH.
    #[serde(rename = "read-write")]
    ReadWrite,
    /// Every method on every path.
    #[serde(rename = "full")]
    Full,
}

/// `{method, path, query}` of an allow rule or a deny rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestRule {
    /// Upper-case method or `*`.
    pub method: String,
    /// Path glob.
    pub path: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, QueryMatcher>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum QueryMatcher {
    Glob(String),
    Any { any: Vec<String> },
}

impl QueryMatcher {
    pub fn globs(&self) -> &[String] {
        match self {
            Self::Glob(glob) => std::slice::from_ref(glob),
            Self::Any { any } => any,
        }
    }
}

impl Policy {
    /// The canonical YAML form: fixed field order, blocks sorted by key, defaults written out,
    /// absent static sections left out. Parsing it gives back an equal policy (positions aside).
    pub fn to_canonical_yaml(&self) -> Result<String, serde_saphyr::SerializeError> {
        serde_saphyr::to_string(self)
    }

    /// Lowercase hex SHA-256 of the canonical form, for revision hashes: equal for equal
    /// policies (positions aside), different otherwise.
    ///
    /// The hashed bytes are the canonical form as compact JSON (same fields, order and defaults
    /// as [`Self::to_canonical_yaml`]), streamed into the hasher: at 10,000 blocks this takes
    /// about a tenth of the time of writing the YAML form.
    pub fn canonical_sha256(&self) -> Result<String, serde_json::Error> {
        let mut hasher = Sha256::new();
        serde_json::to_writer(&mut hasher, self)?;
        let digest = hasher.finalize();
        let mut hex = String::with_capacity(2 * digest.len());
        for b in digest {
            // Writing to a String cannot fail.
            let _ = write!(hex, "{b:02x}");
        }
        Ok(hex)
    }

    /// Whether the static sections (filesystem, landlock, process) of two policies are equal.
    pub fn same_static_sections(&self, other: &Self) -> bool {
        self.filesystem == other.filesystem
            && self.landlock == other.landlock
            && self.process == other.process
    }
}

impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Policy", 5)?;
        s.serialize_field("version", &1)?;
        if self.present.filesystem_policy {
            s.serialize_field("filesystem_policy", &self.filesystem)?;
        } else {
            s.skip_field("filesystem_policy")?;
        }
        if self.present.landlock {
            s.serialize_field("landlock", &self.landlock)?;
        } else {
            s.skip_field("landlock")?;
        }
        if self.present.process {
            s.serialize_field("process", &self.process)?;
        } else {
            s.skip_field("process")?;
        }
        s.serialize_field("network_policies", &self.network)?;
        s.end()
    }
}

impl Serialize for NetworkBlock {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Binary<'a> {
            path: &'a str,
        }
        let mut s = serializer.serialize_struct("NetworkBlock", 3)?;
        s.serialize_field("name", &self.name)?;
        s.serialize_field("endpoints", &self.endpoints)?;
        let binaries: Vec<Binary<'_>> = self.binaries.iter().map(|p| Binary { path: p }).collect();
        s.serialize_field("binaries", &binaries)?;
        s.end()
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut m = serializer.serialize_map(None)?;
        m.serialize_entry("host", self.host.as_str())?;
        m.serialize_entry("ports", &self.ports)?;
        if let Some(rest) = &self.rest {
            m.serialize_entry("protocol", "rest")?;
            if self.tls == TlsMode::Skip {
                m.serialize_entry("tls", &self.tls)?;
            }
            m.serialize_entry("enforcement", &rest.enforcement)?;
            match &rest.allow {
                AllowSet::Access(preset) => m.serialize_entry("access", preset)?,
                AllowSet::Rules(rules) => {
                    #[derive(Serialize)]
                    struct Allow<'a> {
                        allow: &'a RequestRule,
                    }
                    let rules: Vec<Allow<'_>> = rules.iter().map(|allow| Allow { allow }).collect();
                    m.serialize_entry("rules", &rules)?;
                }
            }
            if !rest.deny_rules.is_empty() {
                m.serialize_entry("deny_rules", &rest.deny_rules)?;
            }
            if rest.allow_encoded_slash {
                m.serialize_entry("allow_encoded_slash", &true)?;
            }
        } else if self.tls == TlsMode::Skip {
            m.serialize_entry("tls", &self.tls)?;
        }
        if !self.allowed_ips.is_empty() {
            let ips: Vec<String> = self.allowed_ips.iter().map(ToString::to_string).collect();
            m.serialize_entry("allowed_ips", &ips)?;
        }
        m.end()
    }
}
