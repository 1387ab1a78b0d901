//! The policy engine: text in, decisions out. No IO here (no files, no environment, no clock);
//! the CLI, the gateway and the proxy wrap it.
//!
//! Four stages, four types:
//! 1. [`parse`] reads YAML into `raw` serde types that keep source positions (serde-saphyr,
//!    duplicate keys rejected, alias expansion bounded), then
//! 2. validates every field into a [`Policy`], collecting every error as a [`PolicyError`] with
//!    file, line, column, field path and a fix hint;
//! 3. [`Policy::compile`] builds a [`CompiledPolicy`] once: host tables, glob matchers, CIDR lists;
//! 4. [`CompiledPolicy::decide_connection`] (L4) and [`CompiledPolicy::decide_request`] (L7)
//!    answer with a [`Decision`].
//!
//! [`parse_keeping`] and [`reparse()`] (module [`mod@reparse`]) give the result of stages 1 and 2
//! for an edited file by reading only the `network_policies` blocks that changed.
//!
//! The format and its meaning are in POLICY.md. Limits: only `protocol: rest` is inspected;
//! GraphQL, MCP, JSON-RPC, WebSocket and credential-rewrite settings of the original schema are
//! rejected as "not supported yet".

mod compile;
mod decision;
mod error;
mod glob;
mod host;
mod ip;
mod model;
mod raw;
pub mod reparse;
mod suggest;
mod target;
mod validate;

pub use compile::CompiledPolicy;
pub use decision::{
    ConnectionQuery, Decision, EndpointRef, HttpRequestQuery, Inspection, Reason, Verdict,
};
pub use error::{PolicyError, PolicyErrors, SourcePos};
pub use host::{HostError, HostPattern};
pub use ip::{AddressClass, Forbidden, classify, classify_forbidden, is_private, unmap};
pub use model::{
    AccessPreset, AllowSet, Compatibility, Endpoint, Enforcement, FilesystemPolicy, LandlockPolicy,
    NetworkBlock, Policy, ProcessPolicy, QueryMatcher, RequestRule, RestPolicy, StaticSections,
    TlsMode,
};
pub use reparse::{Outcome as ParseOutcome, Parsed, parse_keeping, reparse};
pub use suggest::{
    Change, Covered, Denial, DeniedRequest, Suggestion, Suggestions, Unresolved, describe,
    render_block, suggest,
};
pub use target::{CanonicalTarget, MalformedQuery, Query, TargetError, canonicalize};
pub use validate::{MAX_FILESYSTEM_PATHS, MAX_PATH_LEN, parse, too_large};

/// Largest policy file accepted (4 MiB).
pub const MAX_POLICY_BYTES: usize = 4 * 1024 * 1024;

#[cfg(test)]
mod tests;
