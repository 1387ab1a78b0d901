//! [`Policy`] → [`CompiledPolicy`]: host tables, glob matchers and CIDR lists built once, so that
//! a decision only looks things up.
//!
//! Host lookup: exact names and IP literals in one hash map; wildcard patterns whose labels after
//! the first are literal (`*.example.com`, `**.example.com`, `*-ai.googleapis.com`) in a second map
//! keyed by that literal suffix, probed once per label of the queried name; the rare patterns with
//! a middle wildcard (`*.s3.*.amazonaws.com`) in a short list checked one by one.
//!
//! When several endpoints match a connection (across blocks), the connection is allowed if any
//! of them allows it, and the most permissive mode wins (passthrough, then `tls: skip`, then
//! inspection). For a request, a deny rule of any matching enforcing endpoint wins over every
//! allow (ours: the safer reading of "a matching deny beats every allow").

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use globset::{GlobMatcher, GlobSet, GlobSetBuilder};
use ipnet::IpNet;

use super::decision::{
    ConnectionQuery, Decision, EndpointRef, HttpRequestQuery, Inspection, Reason, Verdict,
};
use super::glob;
use super::host::{HostKind, HostPattern, Label, normalize_name, parse_ip_literal};
use super::ip;
use super::model::{
    AccessPreset, AllowSet, Enforcement, Policy, QueryMatcher, RequestRule, TlsMode,
};
use super::target::{self, CanonicalTarget, Query, TargetError};

/// A policy ready to answer queries. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct CompiledPolicy {
    blocks: Vec<CBlock>,
    endpoints: Vec<CEndpoint>,
    exact: HashMap<Box<str>, Vec<u32>>,
    by_suffix: HashMap<Box<str>, Vec<u32>>,
    other_wildcards: Vec<u32>,
}

#[derive(Debug)]
struct CBlock {
    name: Arc<str>,
    exact_binaries: Vec<Box<OsStr>>,
    binary_globs: Option<Arc<GlobSet>>,
}

#[derive(Debug)]
struct CEndpoint {
    block: u32,
    index: u32,
    host: HostPattern,
    ports: Box<[u16]>,
    tls: TlsMode,
    rest: Option<CRest>,
    allowed_ips: Box<[IpNet]>,
}

#[derive(Debug)]
struct CRest {
    enforcement: Enforcement,
    allow: CAllow,
    deny: Box<[CRule]>,
    allow_encoded_slash: bool,
}

#[derive(Debug)]
enum CAllow {
    Preset(AccessPreset),
    Rules(Box<[CRule]>),
}

#[derive(Debug)]
enum MethodMatch {
    Any,
    Exact(Box<str>),
}

#[derive(Debug)]
struct CRule {
    method: MethodMatch,
    /// `None` only if a validated glob failed to compile: the rule then never matches.
    path: Option<Arc<GlobMatcher>>,
    query: Box<[QueryCheck]>,
}

/// A query key and the globs one of which each of its values must match.
type QueryCheck = (Box<str>, Box<[Arc<GlobMatcher>]>);

/// Shares identical globs between rules: a 10,000-block policy with `/**` everywhere compiles
/// `/**` once.
#[derive(Default)]
struct GlobCache {
    paths: HashMap<String, Option<Arc<GlobMatcher>>>,
    values: HashMap<String, Option<Arc<GlobMatcher>>>,
    binary_sets: HashMap<Vec<String>, Option<Arc<GlobSet>>>,
}

impl GlobCache {
    fn path(&mut self, pattern: &str) -> Option<Arc<GlobMatcher>> {
        self.paths
            .entry(pattern.to_owned())
            .or_insert_with(|| glob::path_matcher(pattern).ok().map(Arc::new))
            .clone()
    }

    fn value(&mut self, pattern: &str) -> Option<Arc<GlobMatcher>> {
        self.values
            .entry(pattern.to_owned())
            .or_insert_with(|| glob::value_matcher(pattern).ok().map(Arc::new))
            .clone()
    }

    fn binary_set(&mut self, patterns: Vec<String>) -> Option<Arc<GlobSet>> {
        self.binary_sets
            .entry(patterns)
            .or_insert_with_key(|patterns| {
                let mut b = GlobSetBuilder::new();
                for p in patterns {
                    // Validation checked every pattern; one that fails here is left out, which
                    // can only deny more.
                    if let Ok(g) = glob::path_glob(p) {
                        b.add(g);
                    }
                }
                b.build().ok().map(Arc::new)
            })
            .clone()
    }
}

fn compile_rule(rule: &RequestRule, cache: &mut GlobCache) -> CRule {
    let method = if rule.method == "*" {
        MethodMatch::Any
    } else {
        MethodMatch::Exact(rule.method.as_str().into())
    };
    let query = rule
        .query
        .iter()
        .map(|(k, m): (&String, &QueryMatcher)| {
            let globs: Vec<Arc<GlobMatcher>> =
                m.globs().iter().filter_map(|g| cache.value(g)).collect();
            (k.as_str().into(), globs.into_boxed_slice())
        })
        .collect();
    CRule {
        method,
        path: cache.path(&rule.path),
        query,
    }
}

impl Policy {
    /// Builds the lookup structures. Done once per policy revision, off the hot path.
    pub fn compile(&self) -> CompiledPolicy {
        let mut cache = GlobCache::default();
        let mut compiled = CompiledPolicy {
            blocks: Vec::with_capacity(self.network.len()),
            endpoints: Vec::new(),
            exact: HashMap::new(),
            by_suffix: HashMap::new(),
            other_wildcards: Vec::new(),
        };
        for (bi, block) in self.network.values().enumerate() {
            let bi = u32::try_from(bi).unwrap_or(u32::MAX);
            let (exact, globs): (Vec<&String>, Vec<&String>) =
                block.binaries.iter().partition(|b| glob::is_literal(b));
            compiled.blocks.push(CBlock {
                name: block.name.as_str().into(),
                exact_binaries: exact
                    .into_iter()
                    .map(|b| OsStr::new(b.as_str()).into())
                    .collect(),
                binary_globs: if globs.is_empty() {
                    None
                } else {
                    cache.binary_set(globs.into_iter().cloned().collect())
                },
            });
            for (ei, ep) in block.endpoints.iter().enumerate() {
                let idx = u32::try_from(compiled.endpoints.len()).unwrap_or(u32::MAX);
                let rest = ep.rest.as_ref().map(|r| CRest {
                    enforcement: r.enforcement,
                    allow: match &r.allow {
                        AllowSet::Access(p) => CAllow::Preset(*p),
                        AllowSet::Rules(rules) => CAllow::Rules(
                            rules.iter().map(|r| compile_rule(r, &mut cache)).collect(),
                        ),
                    },
                    deny: r
                        .deny_rules
                        .iter()
                        .map(|r| compile_rule(r, &mut cache))
                        .collect(),
                    allow_encoded_slash: r.allow_encoded_slash,
                });
                match ep.host.kind() {
                    HostKind::Name | HostKind::Ip(_) => compiled
                        .exact
                        .entry(ep.host.as_str().into())
                        .or_default()
                        .push(idx),
                    HostKind::Wildcard(labels) => match literal_suffix(labels) {
                        Some(suffix) => compiled
                            .by_suffix
                            .entry(suffix.into())
                            .or_default()
                            .push(idx),
                        None => compiled.other_wildcards.push(idx),
                    },
                }
                compiled.endpoints.push(CEndpoint {
                    block: bi,
                    index: u32::try_from(ei).unwrap_or(u32::MAX),
                    host: ep.host.clone(),
                    ports: ep.ports.clone().into_boxed_slice(),
                    tls: ep.tls,
                    rest,
                    allowed_ips: ep.allowed_ips.clone().into_boxed_slice(),
                });
            }
        }
        compiled
    }
}

/// The labels after the first, joined, when they are all literal.
fn literal_suffix(labels: &[Label]) -> Option<String> {
    let mut parts = Vec::with_capacity(labels.len());
    for l in labels.get(1..)? {
        match l {
            Label::Literal(s) => parts.push(s.as_str()),
            _ => return None,
        }
    }
    Some(parts.join("."))
}

/// The queried host in the form the tables use.
enum QueryHost<'a> {
    Name(Cow<'a, str>),
    Ip(IpAddr, String),
}

impl<'a> QueryHost<'a> {
    fn new(host: &'a str) -> Self {
        match parse_ip_literal(host) {
            Some(ip) => Self::Ip(ip, ip.to_string()),
            None => Self::Name(normalize_name(host)),
        }
    }

    fn text(&self) -> &str {
        match self {
            Self::Name(n) => n,
            Self::Ip(_, s) => s,
        }
    }
}

impl CBlock {
    fn allows_binary(&self, binary: &Path, ancestors: &[PathBuf]) -> bool {
        std::iter::once(binary)
            .chain(ancestors.iter().map(PathBuf::as_path))
            .any(|p| {
                self.exact_binaries.iter().any(|b| **b == *p.as_os_str())
                    || self.binary_globs.as_ref().is_some_and(|g| g.is_match(p))
            })
    }
}

fn method_matches(rule: &MethodMatch, method: &str) -> bool {
    match rule {
        MethodMatch::Any => true,
        MethodMatch::Exact(m) => {
            m.eq_ignore_ascii_case(method) || (&**m == "GET" && method.eq_ignore_ascii_case("HEAD"))
        }
    }
}

fn preset_allows(preset: AccessPreset, method: &str) -> bool {
    let is = |m: &str| method.eq_ignore_ascii_case(m);
    match preset {
        AccessPreset::Full => true,
        AccessPreset::ReadOnly => is("GET") || is("HEAD") || is("OPTIONS"),
        AccessPreset::ReadWrite => {
            is("GET") || is("HEAD") || is("OPTIONS") || is("POST") || is("PUT") || is("PATCH")
        }
    }
}

/// The request's query, decoded on first use.
struct LazyQuery<'a> {
    raw: Option<&'a str>,
    parsed: Option<Result<Query, target::MalformedQuery>>,
}

impl LazyQuery<'_> {
    fn get(&mut self) -> &Result<Query, target::MalformedQuery> {
        let raw = self.raw.unwrap_or("");
        self.parsed.get_or_insert_with(|| Query::parse(raw))
    }
}

fn any_glob(globs: &[Arc<GlobMatcher>], value: &str) -> bool {
    globs.iter().any(|g| g.is_match(value))
}

impl CRule {
    fn path_and_method(&self, method: &str, path: &str) -> bool {
        method_matches(&self.method, method) && self.path.as_ref().is_some_and(|g| g.is_match(path))
    }

    /// Allow semantics: every configured key present, and every one of its values matches.
    fn allows(&self, method: &str, path: &str, query: &mut LazyQuery<'_>) -> bool {
        if !self.path_and_method(method, path) {
            return false;
        }
        if self.query.is_empty() {
            return true;
        }
        let Ok(q) = query.get() else {
            return false;
        };
        self.query.iter().all(|(key, globs)| {
            let mut values = q.values(key).peekable();
            values.peek().is_some() && values.all(|v| any_glob(globs, v))
        })
    }

    /// Deny semantics: every configured key has at least one matching value; a malformed query
    /// counts as a match.
    fn denies(&self, method: &str, path: &str, query: &mut LazyQuery<'_>) -> bool {
        if !self.path_and_method(method, path) {
            return false;
        }
        if self.query.is_empty() {
            return true;
        }
        let Ok(q) = query.get() else {
            return true;
        };
        self.query
            .iter()
            .all(|(key, globs)| q.values(key).any(|v| any_glob(globs, v)))
    }
}

/// Outcome of matching host, port, binary and address for one connection.
enum L4 {
    Allowed(Vec<u32>),
    Denied(Reason),
}

impl CompiledPolicy {
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Calls `f` with every endpoint whose host pattern matches, in a fixed order.
    fn for_each_host_match(&self, host: &QueryHost<'_>, mut f: impl FnMut(u32, &CEndpoint)) {
        let text = host.text();
        let mut visit = |list: Option<&Vec<u32>>, check: bool| {
            for &i in list.into_iter().flatten() {
                if let Some(ep) = self.endpoints.get(i as usize)
                    && (!check || ep.host.matches_normalized(text))
                {
                    f(i, ep);
                }
            }
        };
        visit(self.exact.get(text), false);
        if let QueryHost::Name(name) = host {
            let mut rest: &str = name;
            while let Some((_, tail)) = rest.split_once('.') {
                visit(self.by_suffix.get(tail), true);
                rest = tail;
            }
            visit(Some(&self.other_wildcards), true);
        }
    }

    /// Whether any endpoint of any block could match this name (for any port and binary). The
    /// policy DNS resolver refuses names for which this is false.
    pub fn name_could_be_allowed(&self, host: &str) -> bool {
        let host = QueryHost::new(host);
        let mut found = false;
        self.for_each_host_match(&host, |_, _| found = true);
        found
    }

    fn match_connection(&self, q: &ConnectionQuery<'_>) -> L4 {
        let host = QueryHost::new(q.host);
        let dest_ip = match &host {
            QueryHost::Ip(ip, _) => Some(*ip),
            QueryHost::Name(_) => q.dest_ip,
        };
        if let Some(ip) = dest_ip
            && let Some(class) = ip::classify_forbidden(ip)
        {
            return L4::Denied(Reason::ForbiddenAddress { ip, class });
        }
        let private_ip = dest_ip.filter(|ip| ip::is_private(*ip));
        let mut matched = Vec::new();
        let mut binary_miss: Option<u32> = None;
        let mut private_miss = false;
        self.for_each_host_match(&host, |i, ep| {
            if !ep.ports.contains(&q.port) {
                return;
            }
            let Some(block) = self.blocks.get(ep.block as usize) else {
                return;
            };
            if !block.allows_binary(q.binary, q.ancestors) {
                binary_miss.get_or_insert(ep.block);
                return;
            }
            if let Some(ip) = private_ip {
                let unmapped = ip::unmap(ip);
                if !ep.allowed_ips.iter().any(|n| n.contains(&unmapped)) {
                    private_miss = true;
                    return;
                }
            }
            matched.push(i);
        });
        if !matched.is_empty() {
            return L4::Allowed(matched);
        }
        if let (true, Some(ip)) = (private_miss, private_ip) {
            return L4::Denied(Reason::PrivateAddress { ip });
        }
        if let Some(block) = binary_miss.and_then(|b| self.blocks.get(b as usize)) {
            return L4::Denied(Reason::BinaryNotListed {
                block: block.name.clone(),
                binary: q.binary.to_path_buf(),
                ancestors: q.ancestors.to_vec(),
            });
        }
        L4::Denied(Reason::NoEndpoint {
            host: host.text().to_owned(),
            port: q.port,
        })
    }

    fn block_name(&self, ep: &CEndpoint) -> Arc<str> {
        self.blocks
            .get(ep.block as usize)
            .map_or_else(|| Arc::from(""), |b| b.name.clone())
    }

    fn allow(&self, ep: &CEndpoint, reason: Reason, inspection: Inspection) -> Decision {
        Decision {
            verdict: Verdict::Allow,
            audit: false,
            block: Some(self.block_name(ep)),
            reason,
            inspection,
            endpoint: Some(EndpointRef {
                block: ep.block,
                endpoint: ep.index,
            }),
            canonical_target: None,
        }
    }

    /// L4: may this binary open this connection, and must its requests be inspected?
    pub fn decide_connection(&self, q: &ConnectionQuery<'_>) -> Decision {
        let matched = match self.match_connection(q) {
            L4::Allowed(m) => m,
            L4::Denied(reason) => return Decision::deny(reason),
        };
        // Most permissive first: passthrough, then `tls: skip`, then full inspection.
        let rank = |ep: &CEndpoint| match (&ep.rest, ep.tls) {
            (None, _) => 0,
            (Some(_), TlsMode::Skip) => 1,
            (Some(_), TlsMode::Auto) => 2,
        };
        let best = matched
            .iter()
            .filter_map(|&i| self.endpoints.get(i as usize).map(|ep| (i, ep)))
            .min_by_key(|(_, ep)| rank(ep));
        let Some((_, ep)) = best else {
            return Decision::deny(Reason::NoEndpoint {
                host: q.host.to_owned(),
                port: q.port,
            });
        };
        let block = self.block_name(ep);
        match ep.rest {
            None => self.allow(ep, Reason::ConnectionAllowed { block }, Inspection::None),
            Some(_) => self.allow(
                ep,
                Reason::ConnectionAllowed { block },
                Inspection::http(ep.tls),
            ),
        }
    }

    /// L7: may this request be sent on this connection?
    pub fn decide_request(&self, q: &ConnectionQuery<'_>, req: &HttpRequestQuery<'_>) -> Decision {
        let matched = match self.match_connection(q) {
            L4::Allowed(m) => m,
            L4::Denied(reason) => return Decision::deny(reason),
        };
        let host = QueryHost::new(q.host);
        let mut canon: [Option<Result<CanonicalTarget, TargetError>>; 2] = [None, None];
        // The query is the same whichever way the path is canonicalised; it is only read when
        // the path was accepted.
        let mut lazy = LazyQuery {
            raw: req.target.split_once('?').map(|(_, q)| q),
            parsed: None,
        };

        let mut allowed: Option<u32> = None;
        let mut passthrough: Option<u32> = None;
        let mut violation: Option<(u32, Reason)> = None;
        let mut refusal: Option<(u32, Reason)> = None;

        for &i in &matched {
            let Some(ep) = self.endpoints.get(i as usize) else {
                continue;
            };
            let Some(rest) = &ep.rest else {
                passthrough.get_or_insert(i);
                continue;
            };
            let block = self.block_name(ep);
            let audit = rest.enforcement == Enforcement::Audit;
            let slot = usize::from(rest.allow_encoded_slash);
            let target = canon[slot].get_or_insert_with(|| {
                target::canonicalize(req.target, rest.allow_encoded_slash, host.text(), q.port)
            });
            let target = match target {
                Ok(t) => t,
                Err(error) => {
                    let reason = Reason::BadTarget {
                        block,
                        error: error.clone(),
                    };
                    if audit {
                        violation.get_or_insert((i, reason));
                    } else {
                        refusal.get_or_insert((i, reason));
                    }
                    continue;
                }
            };
            let path = target.matched.as_str();
            // For reasons: the checked path with the query as sent.
            let shown = || match &target.query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
            if rest
                .deny
                .iter()
                .any(|r| r.denies(req.method, path, &mut lazy))
            {
                let reason = Reason::DeniedByRule {
                    block,
                    method: req.method.to_owned(),
                    path: shown(),
                };
                if audit {
                    violation.get_or_insert((i, reason));
                    continue;
                }
                let mut d = Decision::deny(reason);
                d.endpoint = Some(EndpointRef {
                    block: ep.block,
                    endpoint: ep.index,
                });
                return d;
            }
            let ok = match &rest.allow {
                CAllow::Preset(p) => preset_allows(*p, req.method),
                CAllow::Rules(rules) => rules.iter().any(|r| r.allows(req.method, path, &mut lazy)),
            };
            if ok {
                allowed.get_or_insert(i);
            } else {
                let reason = Reason::RequestNotPermitted {
                    block,
                    method: req.method.to_owned(),
                    path: shown(),
                };
                if audit {
                    violation.get_or_insert((i, reason));
                } else {
                    refusal.get_or_insert((i, reason));
                }
            }
        }

        let canonical = |ep: &CEndpoint| -> Option<String> {
            let slot = ep
                .rest
                .as_ref()
                .map_or(0, |r| usize::from(r.allow_encoded_slash));
            canon[slot]
                .as_ref()
                .and_then(|r| r.as_ref().ok())
                .map(|t| t.wire.clone())
        };
        let get = |i: u32| self.endpoints.get(i as usize);

        if let Some(ep) = allowed.and_then(get) {
            let mut d = self.allow(
                ep,
                Reason::RequestAllowed {
                    block: self.block_name(ep),
                },
                Inspection::http(ep.tls),
            );
            d.canonical_target = canonical(ep);
            return d;
        }
        if let Some(ep) = passthrough.and_then(get) {
            return self.allow(
                ep,
                Reason::Passthrough {
                    block: self.block_name(ep),
                },
                Inspection::None,
            );
        }
        if let Some((i, reason)) = violation
            && let Some(ep) = get(i)
        {
            let mut d = self.allow(ep, reason, Inspection::http(ep.tls));
            d.audit = true;
            d.canonical_target = canonical(ep);
            return d;
        }
        match refusal {
            Some((i, reason)) => {
                let mut d = Decision::deny(reason);
                d.endpoint = get(i).map(|ep| EndpointRef {
                    block: ep.block,
                    endpoint: ep.index,
                });
                d
            }
            None => Decision::deny(Reason::NoEndpoint {
                host: host.text().to_owned(),
                port: q.port,
            }),
        }
    }
}
