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

use ipnet::IpNet;

use super::decision::{
    ConnectionQuery, Decision, EndpointRef, HttpRequestQuery, Inspection, Reason, Verdict,
};
use super::glob::{self, PathGlob, ValueGlob};
use super::host::{self, HostKind, Label, normalize_name, parse_ip_literal};
use super::ip;
use super::model::{
    AccessPreset, AllowSet, Enforcement, Policy, QueryMatcher, RequestRule, TlsMode,
};
use super::target::{self, CanonicalTarget, Query, TargetError};

/// Host tables are keyed by names from the policy, so a fast non-cryptographic hash is safe:
/// a sandboxed program chooses only the names looked up, never the keys stored.
type FastHash = foldhash::fast::RandomState;

/// A policy ready to answer queries. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct CompiledPolicy {
    blocks: Vec<CBlock>,
    endpoints: Vec<CEndpoint>,
    exact: HashMap<Box<str>, Vec<u32>, FastHash>,
    by_suffix: HashMap<Box<str>, Vec<u32>, FastHash>,
    other_wildcards: Vec<u32>,
}

#[derive(Debug)]
struct CBlock {
    name: Arc<str>,
    exact_binaries: Vec<Box<OsStr>>,
    binary_globs: Arc<[PathGlob]>,
}

#[derive(Debug)]
struct CEndpoint {
    block: u32,
    index: u32,
    /// The labels of a wildcard host; exact hosts are matched by the table lookup alone.
    wildcard: Option<Box<[Label]>>,
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
    path: Option<Arc<PathGlob>>,
    query: Box<[QueryCheck]>,
}

/// A query key and the globs one of which each of its values must match.
type QueryCheck = (Box<str>, Box<[Arc<ValueGlob>]>);

/// Shares identical globs between rules: a 10,000-block policy with `/**` everywhere compiles
/// `/**` once.
#[derive(Default)]
struct GlobCache {
    paths: HashMap<String, Option<Arc<PathGlob>>>,
    values: HashMap<String, Option<Arc<ValueGlob>>>,
    binaries: HashMap<Vec<String>, Arc<[PathGlob]>>,
}

impl GlobCache {
    fn path(&mut self, pattern: &str) -> Option<Arc<PathGlob>> {
        if let Some(g) = self.paths.get(pattern) {
            return g.clone();
        }
        let g = PathGlob::new(pattern).ok().map(Arc::new);
        self.paths.insert(pattern.to_owned(), g.clone());
        g
    }

    fn value(&mut self, pattern: &str) -> Option<Arc<ValueGlob>> {
        if let Some(g) = self.values.get(pattern) {
            return g.clone();
        }
        let g = ValueGlob::new(pattern).ok().map(Arc::new);
        self.values.insert(pattern.to_owned(), g.clone());
        g
    }

    fn binaries(&mut self, patterns: Vec<String>) -> Arc<[PathGlob]> {
        if patterns.is_empty() {
            return Arc::from([]);
        }
        self.binaries
            .entry(patterns)
            .or_insert_with_key(|patterns| {
                // Validation checked every pattern; one that fails here is left out, which can
                // only deny more.
                patterns
                    .iter()
                    .filter_map(|p| PathGlob::new(p).ok())
                    .collect()
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
            let globs: Vec<Arc<ValueGlob>> =
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
            exact: HashMap::default(),
            by_suffix: HashMap::default(),
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
                binary_globs: cache.binaries(globs.into_iter().cloned().collect()),
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
                let wildcard = match ep.host.kind() {
                    HostKind::Name | HostKind::Ip(_) => {
                        compiled
                            .exact
                            .entry(ep.host.as_str().into())
                            .or_default()
                            .push(idx);
                        None
                    }
                    HostKind::Wildcard(labels) => {
                        match literal_suffix(labels) {
                            Some(suffix) => compiled
                                .by_suffix
                                .entry(suffix.into())
                                .or_default()
                                .push(idx),
                            None => compiled.other_wildcards.push(idx),
                        }
                        Some(labels.clone().into_boxed_slice())
                    }
                };
                compiled.endpoints.push(CEndpoint {
                    block: bi,
                    index: u32::try_from(ei).unwrap_or(u32::MAX),
                    wildcard,
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
        // Only IP literals start with a digit, `:` or `[`; skip the parse for other names.
        let maybe_ip = host
            .as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_digit() || *b == b':' || *b == b'[');
        match maybe_ip.then(|| parse_ip_literal(host)).flatten() {
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
                    || p.to_str()
                        .is_some_and(|p| self.binary_globs.iter().any(|g| g.is_match(p)))
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
    parsed: Option<Result<Query<'a>, target::MalformedQuery>>,
}

impl<'a> LazyQuery<'a> {
    fn get(&mut self) -> &Result<Query<'a>, target::MalformedQuery> {
        let raw = self.raw.unwrap_or("");
        self.parsed.get_or_insert_with(|| Query::parse(raw))
    }
}

fn any_glob(globs: &[Arc<ValueGlob>], value: &str) -> bool {
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

/// Why no endpoint admitted a connection (filled while matching, read only on a deny).
#[derive(Default)]
struct Misses {
    binary: Option<u32>,
    private: bool,
}

impl CompiledPolicy {
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Calls `f` with every endpoint whose host pattern matches, in a fixed order: exact names
    /// first, then wildcards by longest literal suffix, then middle wildcards.
    fn for_each_host_match(&self, host: &QueryHost<'_>, mut f: impl FnMut(u32, &CEndpoint)) {
        let text = host.text();
        let mut visit = |list: Option<&Vec<u32>>| {
            for &i in list.into_iter().flatten() {
                if let Some(ep) = self.endpoints.get(i as usize)
                    && ep
                        .wildcard
                        .as_deref()
                        .is_none_or(|labels| host::wildcard_matches(labels, text))
                {
                    f(i, ep);
                }
            }
        };
        visit(self.exact.get(text));
        if let QueryHost::Name(name) = host {
            let mut rest: &str = name;
            while let Some((_, tail)) = rest.split_once('.') {
                visit(self.by_suffix.get(tail));
                rest = tail;
            }
            visit(Some(&self.other_wildcards));
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

    /// Calls `f` with every endpoint that admits the connection (host, port, binary, address);
    /// returns the deny decision when there is none.
    fn match_connection(
        &self,
        q: &ConnectionQuery<'_>,
        host: &QueryHost<'_>,
        mut f: impl FnMut(u32, &CEndpoint),
    ) -> Result<(), Reason> {
        let dest_ip = match host {
            QueryHost::Ip(ip, _) => Some(*ip),
            QueryHost::Name(_) => q.dest_ip,
        };
        if let Some(ip) = dest_ip
            && let Some(class) = ip::classify_forbidden(ip)
        {
            return Err(Reason::ForbiddenAddress { ip, class });
        }
        let private_ip = dest_ip.filter(|ip| ip::is_private(*ip)).map(ip::unmap);
        let mut found = false;
        let mut misses = Misses::default();
        self.for_each_host_match(host, |i, ep| {
            if !ep.ports.contains(&q.port) {
                return;
            }
            let Some(block) = self.blocks.get(ep.block as usize) else {
                return;
            };
            if !block.allows_binary(q.binary, q.ancestors) {
                misses.binary.get_or_insert(ep.block);
                return;
            }
            if let Some(ip) = private_ip
                && !ep.allowed_ips.iter().any(|n| n.contains(&ip))
            {
                misses.private = true;
                return;
            }
            found = true;
            f(i, ep);
        });
        if found {
            return Ok(());
        }
        let reason = if let (true, Some(ip)) = (misses.private, private_ip) {
            Reason::PrivateAddress { ip }
        } else if let Some(block) = misses.binary.and_then(|b| self.blocks.get(b as usize)) {
            Reason::BinaryNotListed {
                block: block.name.clone(),
                binary: q.binary.to_path_buf(),
                ancestors: q.ancestors.to_vec(),
            }
        } else {
            Reason::NoEndpoint {
                host: host.text().to_owned(),
                port: q.port,
            }
        };
        Err(reason)
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
            endpoint: Some(ep.reference()),
            canonical_target: None,
        }
    }

    /// L4: may this binary open this connection, and must its requests be inspected?
    pub fn decide_connection(&self, q: &ConnectionQuery<'_>) -> Decision {
        let host = QueryHost::new(q.host);
        // Most permissive first: passthrough, then `tls: skip`, then full inspection.
        let rank = |ep: &CEndpoint| match (&ep.rest, ep.tls) {
            (None, _) => 0,
            (Some(_), TlsMode::Skip) => 1,
            (Some(_), TlsMode::Auto) => 2,
        };
        let mut best: Option<(u8, u32)> = None;
        if let Err(deny) = self.match_connection(q, &host, |i, ep| {
            let r = rank(ep);
            if best.is_none_or(|(b, _)| r < b) {
                best = Some((r, i));
            }
        }) {
            return Decision::deny(deny);
        }
        let Some(ep) = best.and_then(|(_, i)| self.endpoints.get(i as usize)) else {
            return Decision::deny(Reason::NoEndpoint {
                host: host.text().to_owned(),
                port: q.port,
            });
        };
        let reason = Reason::ConnectionAllowed {
            block: self.block_name(ep),
        };
        match ep.rest {
            None => self.allow(ep, reason, Inspection::None),
            Some(_) => self.allow(ep, reason, Inspection::http(ep.tls)),
        }
    }

    /// L7: may this request be sent on this connection?
    pub fn decide_request(&self, q: &ConnectionQuery<'_>, req: &HttpRequestQuery<'_>) -> Decision {
        let host = QueryHost::new(q.host);
        let mut matched: Vec<u32> = Vec::new();
        if let Err(deny) = self.match_connection(q, &host, |i, _| matched.push(i)) {
            return Decision::deny(deny);
        }
        // Canonical targets by `allow_encoded_slash` (false, true), computed when first needed.
        let mut canon: [Option<Result<CanonicalTarget, TargetError>>; 2] = [None, None];
        // The query is the same whichever way the path is canonicalised; it is only read when
        // the path was accepted.
        let mut lazy = LazyQuery {
            raw: req.target.split_once('?').map(|(_, q)| q),
            parsed: None,
        };

        let mut allowed: Option<&CEndpoint> = None;
        let mut passthrough: Option<&CEndpoint> = None;
        let mut violation: Option<(&CEndpoint, Reason)> = None;
        let mut refusal: Option<(&CEndpoint, Reason)> = None;

        for &i in &matched {
            let Some(ep) = self.endpoints.get(i as usize) else {
                continue;
            };
            let Some(rest) = &ep.rest else {
                passthrough.get_or_insert(ep);
                continue;
            };
            let audit = rest.enforcement == Enforcement::Audit;
            let slot = usize::from(rest.allow_encoded_slash);
            let target = canon[slot].get_or_insert_with(|| {
                target::canonicalize(req.target, rest.allow_encoded_slash, host.text(), q.port)
            });
            let target = match target {
                Ok(t) => &*t,
                Err(error) => {
                    let reason = Reason::BadTarget {
                        block: self.block_name(ep),
                        error: error.clone(),
                    };
                    if audit {
                        violation.get_or_insert((ep, reason));
                    } else {
                        refusal.get_or_insert((ep, reason));
                    }
                    continue;
                }
            };
            let path = target.matched.as_str();
            // For reasons: the checked path with the query as sent.
            let shown = || match target.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
            if rest
                .deny
                .iter()
                .any(|r| r.denies(req.method, path, &mut lazy))
            {
                let reason = Reason::DeniedByRule {
                    block: self.block_name(ep),
                    method: req.method.to_owned(),
                    path: shown(),
                };
                if audit {
                    violation.get_or_insert((ep, reason));
                    continue;
                }
                let mut d = Decision::deny(reason);
                d.endpoint = Some(ep.reference());
                return d;
            }
            let ok = match &rest.allow {
                CAllow::Preset(p) => preset_allows(*p, req.method),
                CAllow::Rules(rules) => rules.iter().any(|r| r.allows(req.method, path, &mut lazy)),
            };
            if ok {
                allowed.get_or_insert(ep);
            } else {
                let reason = Reason::RequestNotPermitted {
                    block: self.block_name(ep),
                    method: req.method.to_owned(),
                    path: shown(),
                };
                if audit {
                    violation.get_or_insert((ep, reason));
                } else {
                    refusal.get_or_insert((ep, reason));
                }
            }
        }

        let mut take_canonical = |ep: &CEndpoint| -> Option<String> {
            let slot = ep
                .rest
                .as_ref()
                .map_or(0, |r| usize::from(r.allow_encoded_slash));
            canon[slot].take().and_then(Result::ok).map(|t| t.wire)
        };

        if let Some(ep) = allowed {
            let reason = Reason::RequestAllowed {
                block: self.block_name(ep),
            };
            let mut d = self.allow(ep, reason, Inspection::http(ep.tls));
            d.canonical_target = take_canonical(ep);
            return d;
        }
        if let Some(ep) = passthrough {
            let reason = Reason::Passthrough {
                block: self.block_name(ep),
            };
            return self.allow(ep, reason, Inspection::None);
        }
        if let Some((ep, reason)) = violation {
            let mut d = self.allow(ep, reason, Inspection::http(ep.tls));
            d.audit = true;
            d.canonical_target = take_canonical(ep);
            return d;
        }
        match refusal {
            Some((ep, reason)) => {
                let mut d = Decision::deny(reason);
                d.endpoint = Some(ep.reference());
                d
            }
            None => Decision::deny(Reason::NoEndpoint {
                host: host.text().to_owned(),
                port: q.port,
            }),
        }
    }
}

impl CEndpoint {
    fn reference(&self) -> EndpointRef {
        EndpointRef {
            block: self.block,
            endpoint: self.index,
        }
    }
}
