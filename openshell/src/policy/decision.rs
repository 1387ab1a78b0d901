//! Questions asked of a compiled policy and the answers.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Serialize, Serializer};

use super::ip::Forbidden;
use super::model::TlsMode;
use super::target::TargetError;

/// A connection about to be made: where to, and by which program.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionQuery<'a> {
    /// The DNS name the program asked for, or an IP literal when no name is known.
    pub host: &'a str,
    pub port: u16,
    /// The executable that called `connect()`.
    pub binary: &'a Path,
    /// Its parent, grandparent, ... executables.
    pub ancestors: &'a [PathBuf],
    /// The address the proxy is about to dial, when it is known. For an IP-literal `host` the
    /// host itself is used. Forbidden addresses are always denied; private ones only when a
    /// matching endpoint lists them in `allowed_ips`.
    pub dest_ip: Option<IpAddr>,
}

/// An HTTP request on an inspected connection.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequestQuery<'a> {
    pub method: &'a str,
    /// The request target as sent (origin-form `/path?query` or absolute-form).
    pub target: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
}

/// What the proxy does with an allowed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Inspection {
    /// Nothing to inspect (denied connections, or an allowed TCP passthrough).
    None,
    /// `protocol: rest`: check every HTTP request with `decide_request`. With
    /// `terminate_tls: false` (`tls: skip`), a TLS stream passes uninspected.
    Http { terminate_tls: bool },
}

impl Inspection {
    pub(crate) fn http(tls: TlsMode) -> Self {
        Self::Http {
            terminate_tls: tls == TlsMode::Auto,
        }
    }
}

/// Identifies one endpoint of a compiled policy (block index in key order, endpoint index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointRef {
    pub block: u32,
    pub endpoint: u32,
}

/// The answer to a connection or request query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Allowed only because the endpoint is in `enforcement: audit`; `reason` says what was
    /// violated.
    pub audit: bool,
    /// Display name of the block that decided, if one did.
    pub block: Option<Arc<str>>,
    pub reason: Reason,
    /// For an allowed connection: whether its requests must be inspected.
    pub inspection: Inspection,
    /// The endpoint that matched, if one did.
    pub endpoint: Option<EndpointRef>,
    /// For a request decision that got as far as the path: the canonical target to send
    /// upstream.
    pub canonical_target: Option<String>,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    pub(crate) fn deny(reason: Reason) -> Self {
        Self {
            verdict: Verdict::Deny,
            audit: false,
            block: reason.block().cloned(),
            reason,
            inspection: Inspection::None,
            endpoint: None,
            canonical_target: None,
        }
    }
}

/// Why a decision came out as it did. `Display` gives the sentence shown to users and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The connection matched an endpoint and a binary of the block.
    ConnectionAllowed { block: Arc<str> },
    /// The request matched an allow rule (or preset) of the block.
    RequestAllowed { block: Arc<str> },
    /// The endpoint is TCP passthrough: its requests are not inspected.
    Passthrough { block: Arc<str> },
    /// No endpoint of any block matches host:port.
    NoEndpoint { host: String, port: u16 },
    /// An endpoint matches, but neither the binary nor an ancestor is listed in its block.
    BinaryNotListed {
        block: Arc<str>,
        binary: PathBuf,
        ancestors: Vec<PathBuf>,
    },
    /// No allow rule of the block admits the request.
    RequestNotPermitted {
        block: Arc<str>,
        method: String,
        path: String,
    },
    /// A deny rule of the block matches the request.
    DeniedByRule {
        block: Arc<str>,
        method: String,
        path: String,
    },
    /// The request target is malformed or unsafe.
    BadTarget { block: Arc<str>, error: TargetError },
    /// The destination address is never allowed.
    ForbiddenAddress { ip: IpAddr, class: Forbidden },
    /// The destination address is private and no matching endpoint lists it in `allowed_ips`.
    PrivateAddress { ip: IpAddr },
}

impl Reason {
    pub fn block(&self) -> Option<&Arc<str>> {
        match self {
            Self::ConnectionAllowed { block }
            | Self::RequestAllowed { block }
            | Self::Passthrough { block }
            | Self::BinaryNotListed { block, .. }
            | Self::RequestNotPermitted { block, .. }
            | Self::DeniedByRule { block, .. }
            | Self::BadTarget { block, .. } => Some(block),
            Self::NoEndpoint { .. }
            | Self::ForbiddenAddress { .. }
            | Self::PrivateAddress { .. } => None,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectionAllowed { block } => {
                write!(f, "endpoint and binary allowed by block {block}")
            }
            Self::RequestAllowed { block } => write!(f, "request allowed by block {block}"),
            Self::Passthrough { block } => write!(
                f,
                "endpoint of block {block} is TCP passthrough; requests are not inspected"
            ),
            Self::NoEndpoint { host, port } => {
                write!(f, "no endpoint matches {host}:{port}")
            }
            Self::BinaryNotListed {
                block,
                binary,
                ancestors,
            } => {
                write!(
                    f,
                    "endpoint matches in block {block} but binary {} is not listed",
                    binary.display()
                )?;
                if ancestors.is_empty() {
                    write!(f, " (no ancestors)")
                } else {
                    write!(f, " (ancestors: ")?;
                    for (i, a) in ancestors.iter().enumerate() {
                        if i > 0 {
                            write!(f, ", ")?;
                        }
                        write!(f, "{}", a.display())?;
                    }
                    write!(f, ")")
                }
            }
            Self::RequestNotPermitted {
                block,
                method,
                path,
            } => write!(f, "request {method} {path} not permitted by block {block}"),
            Self::DeniedByRule {
                block,
                method,
                path,
            } => write!(
                f,
                "request {method} {path} matches a deny rule of block {block}"
            ),
            Self::BadTarget { block, error } => {
                write!(
                    f,
                    "request rejected on an endpoint of block {block}: {error}"
                )
            }
            Self::ForbiddenAddress { ip, class } => {
                write!(
                    f,
                    "destination {ip} is a {class} address, which is always denied"
                )
            }
            Self::PrivateAddress { ip } => write!(
                f,
                "destination {ip} is a private address and no matching endpoint lists it in allowed_ips"
            ),
        }
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// `{"decision":"allow"|"deny","audit":bool,"block":string|null,"reason":string}`, the shape
/// `policy check -o json` prints.
impl Serialize for Decision {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Decision", 4)?;
        s.serialize_field("decision", &self.verdict)?;
        s.serialize_field("audit", &self.audit)?;
        s.serialize_field("block", &self.block.as_deref())?;
        s.serialize_field("reason", &self.reason)?;
        s.end()
    }
}
