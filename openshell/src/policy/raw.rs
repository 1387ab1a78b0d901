//! The policy file as written: serde types with source locations, no meaning attached yet.
//!
//! Every struct denies unknown fields. Fields of the original OpenShell schema that openshell does
//! not implement are declared here (as [`Unsupported`]) so that validation can say "not supported
//! yet" instead of "unknown field".

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde_saphyr::{Location, Spanned};

/// A field that is accepted by the parser only to be rejected by validation.
pub(crate) type Unsupported = Option<Spanned<IgnoredAny>>;

/// The whole file. `B` is how `network_policies` is read: [`RawBlocks`] for [`crate::policy::parse`],
/// [`KeyedBlocks`] when the reparse layout needs to know where each key was written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "B: Deserialize<'de>"))]
pub(crate) struct RawPolicy<B = RawBlocks> {
    pub version: Option<Spanned<RawScalar>>,
    pub filesystem_policy: Option<Spanned<RawFilesystem>>,
    pub landlock: Option<Spanned<RawLandlock>>,
    pub process: Option<Spanned<RawProcess>>,
    pub network_policies: Option<Spanned<Option<B>>>,
    pub network_middlewares: Unsupported,
}

/// `network_policies`, by key (an empty `network_policies:` is null, hence the `Option` above).
pub(crate) type RawBlocks = BTreeMap<String, Spanned<RawBlock>>;

/// `network_policies` read like [`RawBlocks`] (same keys, values and errors), plus where each
/// block's value starts, in file order, and how many entries were read (a mapping whose keys
/// collide only as strings loses entries to the map).
#[derive(Debug)]
pub(crate) struct KeyedBlocks {
    pub blocks: RawBlocks,
    pub values: Vec<Location>,
}

impl<'de> Deserialize<'de> for KeyedBlocks {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyedVisitor;

        impl<'de> Visitor<'de> for KeyedVisitor {
            type Value = KeyedBlocks;

            // The words of `BTreeMap`'s visitor, so that an error reads as it does for `parse`.
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut blocks = RawBlocks::new();
                let mut values = Vec::new();
                while let Some((key, block)) = map.next_entry::<String, Spanned<RawBlock>>()? {
                    values.push(block.referenced);
                    blocks.insert(key, block);
                }
                Ok(KeyedBlocks { blocks, values })
            }
        }

        deserializer.deserialize_map(KeyedVisitor)
    }
}

impl RawPolicy<KeyedBlocks> {
    /// The policy as [`crate::policy::parse`] reads it, and where the values of
    /// `network_policies` start, in file order (empty when the section is absent or null).
    pub(crate) fn split_values(self) -> (RawPolicy, Vec<Location>) {
        let mut values = Vec::new();
        let network_policies = self.network_policies.map(|np| {
            let blocks = np.value.map(|keyed| {
                values = keyed.values;
                keyed.blocks
            });
            Spanned::new(blocks, np.referenced, np.defined)
        });
        let raw = RawPolicy {
            version: self.version,
            filesystem_policy: self.filesystem_policy,
            landlock: self.landlock,
            process: self.process,
            network_policies,
            network_middlewares: self.network_middlewares,
        };
        (raw, values)
    }
}

/// A document holding only `network_policies`: how the reparse reads the changed blocks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetworkOnly {
    pub network_policies: Option<Spanned<Option<KeyedBlocks>>>,
}

/// A scalar whose type is checked by validation rather than by serde, so that a wrong type is
/// reported with the others instead of stopping the parse.
#[derive(Debug)]
pub(crate) enum RawScalar {
    Int(i64),
    Str(String),
    /// Anything else (a float, a bool, a list, a map, null), consumed whole.
    Other,
}

impl<'de> Deserialize<'de> for RawScalar {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;

        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = RawScalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or a string")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(RawScalar::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(i64::try_from(v).map_or(RawScalar::Other, RawScalar::Int))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(RawScalar::Other)
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(RawScalar::Other)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(RawScalar::Other)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawScalar::Str(v.to_owned()))
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawScalar::Other)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(RawScalar::Other)
            }
        }

        deserializer.deserialize_any(ScalarVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFilesystem {
    pub read_only: Option<Vec<Spanned<String>>>,
    pub read_write: Option<Vec<Spanned<String>>>,
    pub include_workdir: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLandlock {
    pub compatibility: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProcess {
    pub run_as_user: Option<Spanned<RawScalar>>,
    pub run_as_group: Option<Spanned<RawScalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBlock {
    pub name: Option<Spanned<String>>,
    pub endpoints: Option<Spanned<Vec<Spanned<RawEndpoint>>>>,
    pub binaries: Option<Spanned<Vec<Spanned<RawBinary>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBinary {
    pub path: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEndpoint {
    pub host: Option<Spanned<String>>,
    pub port: Option<Spanned<RawScalar>>,
    pub ports: Option<Spanned<Vec<Spanned<RawScalar>>>>,
    pub protocol: Option<Spanned<String>>,
    pub tls: Option<Spanned<String>>,
    pub enforcement: Option<Spanned<String>>,
    pub access: Option<Spanned<String>>,
    pub rules: Option<Spanned<Vec<Spanned<RawRule>>>>,
    pub deny_rules: Option<Spanned<Vec<Spanned<RawRuleBody>>>>,
    pub allowed_ips: Option<Spanned<Vec<Spanned<String>>>>,
    pub allow_encoded_slash: Option<Spanned<bool>>,
    // Original OpenShell fields that openshell does not implement yet.
    pub path: Unsupported,
    pub websocket_credential_rewrite: Unsupported,
    pub request_body_credential_rewrite: Unsupported,
    pub allow_uninspected_credentials: Unsupported,
    pub credential_signing: Unsupported,
    pub signing_service: Unsupported,
    pub signing_region: Unsupported,
    pub persisted_queries: Unsupported,
    pub graphql_persisted_queries: Unsupported,
    pub graphql_max_body_bytes: Unsupported,
    pub mcp: Unsupported,
    pub json_rpc: Unsupported,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub allow: Option<Spanned<RawRuleBody>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRuleBody {
    pub method: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub query: Option<Spanned<BTreeMap<String, Spanned<RawQueryMatcher>>>>,
    // GraphQL and MCP rule fields of the original schema.
    pub operation_type: Unsupported,
    pub operation_name: Unsupported,
    pub fields: Unsupported,
    pub tool: Unsupported,
    pub params: Unsupported,
}

/// `key: "glob"` or `key: { any: ["glob", ...] }`.
#[derive(Debug)]
pub(crate) enum RawQueryMatcher {
    Glob(String),
    Any(Vec<String>),
}

impl<'de> Deserialize<'de> for RawQueryMatcher {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MatcherVisitor;

        impl<'de> Visitor<'de> for MatcherVisitor {
            type Value = RawQueryMatcher;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a glob string or a map `{ any: [globs] }`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawQueryMatcher::Glob(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(RawQueryMatcher::Glob(v))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut any: Option<Vec<String>> = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "any" {
                        return Err(de::Error::unknown_field(&key, &["any"]));
                    }
                    if any.is_some() {
                        return Err(de::Error::duplicate_field("any"));
                    }
                    any = Some(map.next_value()?);
                }
                any.map(RawQueryMatcher::Any)
                    .ok_or_else(|| de::Error::missing_field("any"))
            }
        }

        deserializer.deserialize_any(MatcherVisitor)
    }
}
