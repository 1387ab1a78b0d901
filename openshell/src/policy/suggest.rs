//! Suggestions: from denied connections and requests to the `network_policies` blocks that
//! would allow them. Pure like the rest of the module: the caller hands in the policy in force
//! and the denials (read from the decision log), and gets blocks in the seed's format back.
//!
//! Each denial is decided again against the policy in force (so a denial that a later revision
//! already allows is not suggested twice) and the reason picks the fix:
//! - no endpoint matches: a new block for the host with exactly the denied ports and binaries
//!   (a private destination gets `allowed_ips` for its address, as POLICY.md requires);
//! - an endpoint matches but the binary is not listed: that block with the binary added;
//! - a private address without `allowed_ips`: the matching endpoint with the address added;
//! - an inspected request no rule allows: the endpoint with an allow rule for that method and
//!   exact path (an `access` preset becomes the equivalent rules first).
//!
//! Fixes repeat until every denial is allowed or cannot be (loopback and other forbidden
//! addresses, deny rules, malformed request targets: these are reported with the reason). Every
//! suggested block is then rendered, parsed back with [`super::parse`] and checked with
//! [`CompiledPolicy::decide_connection`]/[`CompiledPolicy::decide_request`]: what is returned
//! is known to allow what it claims to cover.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;

use super::decision::{ConnectionQuery, Decision, HttpRequestQuery, Reason};
use super::host::HostPattern;
use super::model::{
    AccessPreset, AllowSet, Endpoint, NetworkBlock, Policy, QueryMatcher, RequestRule, TlsMode,
};
use super::{CompiledPolicy, canonicalize, ip};

/// Fix rounds before giving up on a denial (a denial needs at most three: binary, address,
/// request rule; one more confirms).
const MAX_ROUNDS: usize = 6;

/// One denied connection (or inspected request), as the decision log recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Denial {
    /// The executable that connected.
    pub binary: PathBuf,
    /// Its parent, grandparent, ... executables.
    pub ancestors: Vec<PathBuf>,
    /// The name the program asked for, or the IP literal it dialled.
    pub host: String,
    /// The address the connection went to, when known.
    pub ip: Option<IpAddr>,
    pub port: u16,
    /// For a denied request on an inspected endpoint: its method and target.
    pub request: Option<DeniedRequest>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeniedRequest {
    pub method: String,
    /// The request target as logged (`/path?query`).
    pub target: String,
}

/// What a suggested block does to the policy in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A block to add under `network_policies:`.
    New,
    /// A replacement for the block of the same key; each entry says what was added.
    Amended(Vec<String>),
}

/// Denials with the same binary, destination and request, counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Covered {
    pub count: usize,
    pub denial: Denial,
}

/// One block to paste.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suggestion {
    /// Its key under `network_policies:`.
    pub key: String,
    pub block: NetworkBlock,
    pub change: Change,
    /// The denials it allows, most frequent first.
    pub covers: Vec<Covered>,
}

/// Denials no block can allow, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub count: usize,
    pub denial: Denial,
    pub why: String,
}

/// The answer of [`suggest`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suggestions {
    /// Blocks in key order.
    pub blocks: Vec<Suggestion>,
    pub unresolved: Vec<Unresolved>,
    /// Denials that the policy in force allows already (a later revision fixed them).
    pub already_allowed: usize,
}

impl Suggestions {
    /// `current` with every suggested block added or replaced.
    #[must_use]
    pub fn apply(&self, current: &Policy) -> Policy {
        let mut merged = current.clone();
        for s in &self.blocks {
            merged
                .network
                .insert(s.key.clone(), Arc::new(s.block.clone()));
        }
        merged
    }

    /// Whether there is nothing to paste.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The blocks as YAML to paste under `network_policies:`, each preceded by comment lines
    /// saying whether it is new or replaces a block and which denials it covers; then the
    /// denials no block can allow, as comments.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.blocks {
            match &s.change {
                Change::New => {
                    let _ = writeln!(out, "  # new block {}", s.key);
                }
                Change::Amended(notes) => {
                    let _ = writeln!(out, "  # replaces block {}: {}", s.key, notes.join("; "));
                }
            }
            for c in &s.covers {
                let _ = writeln!(out, "  # covers {}", describe(c.count, &c.denial));
            }
            out.push_str(&render_block(&s.key, &s.block));
        }
        for u in &self.unresolved {
            let _ = writeln!(
                out,
                "  # not covered: {}: {}",
                describe(u.count, &u.denial),
                u.why
            );
        }
        out
    }
}

/// `3 denials: /usr/bin/curl -> pypi.org:443 [POST /upload]`.
#[must_use]
pub fn describe(count: usize, d: &Denial) -> String {
    let noun = if count == 1 { "denial" } else { "denials" };
    let mut s = format!(
        "{count} {noun}: {} -> {}",
        d.binary.display(),
        host_port(&d.host, d.port)
    );
    if let Some(r) = &d.request {
        let _ = write!(s, " {} {}", r.method, r.target);
    }
    s
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// What to change for one denial, decided against the working policy.
enum Fix {
    Allowed,
    NewEndpoint,
    AddBinary {
        key: String,
    },
    AllowIp {
        key: String,
        endpoint: usize,
        ip: IpAddr,
    },
    AddRule {
        key: String,
        endpoint: usize,
        rule: RequestRule,
    },
    Impossible(String),
}

/// The working copy: the policy's blocks plus what was changed so far.
struct Work {
    blocks: BTreeMap<String, Arc<NetworkBlock>>,
    changes: BTreeMap<String, Change>,
    /// Keys and display names that a new block may not take.
    taken: BTreeSet<String>,
}

impl Work {
    fn compile(&self, current: &Policy) -> CompiledPolicy {
        let mut p = current.clone();
        p.network.clone_from(&self.blocks);
        p.compile()
    }

    fn amend(&mut self, key: &str, note: String) -> Option<&mut NetworkBlock> {
        let change = self
            .changes
            .entry(key.to_owned())
            .or_insert_with(|| Change::Amended(Vec::new()));
        if let Change::Amended(notes) = change
            && !notes.contains(&note)
        {
            notes.push(note);
        }
        self.blocks.get_mut(key).map(Arc::make_mut)
    }

    /// A fresh key derived from `host`: `pypi.org` → `pypi_org`, `10.0.0.5` → `ip_10_0_0_5`.
    fn fresh_key(&mut self, host: &HostPattern) -> String {
        let mut base = String::new();
        if host.ip().is_some() {
            base.push_str("ip_");
        }
        for ch in host.as_str().chars() {
            let ch = ch.to_ascii_lowercase();
            if ch.is_ascii_alphanumeric() {
                base.push(ch);
            } else if !base.ends_with('_') {
                base.push('_');
            }
        }
        let base = base.trim_matches('_').to_owned();
        let mut key = base.clone();
        let mut n = 2;
        while self.taken.contains(&key) {
            key = format!("{base}_{n}");
            n += 1;
        }
        self.taken.insert(key.clone());
        key
    }
}

fn query<'a>(d: &'a Denial) -> ConnectionQuery<'a> {
    ConnectionQuery {
        host: &d.host,
        port: d.port,
        binary: &d.binary,
        ancestors: &d.ancestors,
        dest_ip: d.ip,
    }
}

fn decide(compiled: &CompiledPolicy, d: &Denial) -> Decision {
    let q = query(d);
    match &d.request {
        None => compiled.decide_connection(&q),
        Some(r) => compiled.decide_request(
            &q,
            &HttpRequestQuery {
                method: &r.method,
                target: &r.target,
            },
        ),
    }
}

/// `pattern` with globset's special characters escaped, so it matches itself only.
fn escape_glob(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    for ch in pattern.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '{' | '}' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip::unmap(ip))
}

/// The endpoints of `block` that match host and port.
fn matching_endpoints<'a>(
    block: &'a NetworkBlock,
    host: &'a str,
    port: u16,
) -> impl Iterator<Item = (usize, &'a Endpoint)> + 'a {
    block
        .endpoints
        .iter()
        .enumerate()
        .filter(move |(_, ep)| ep.ports.contains(&port) && ep.host.matches(host))
}

fn classify(work: &Work, compiled: &CompiledPolicy, d: &Denial) -> Fix {
    let decision = decide(compiled, d);
    if decision.is_allowed() {
        return Fix::Allowed;
    }
    // Block key of a compiled endpoint reference (blocks are compiled in key order).
    let key_of = |index: u32| work.blocks.keys().nth(index as usize).cloned();
    match decision.reason {
        Reason::NoEndpoint { .. } => Fix::NewEndpoint,
        Reason::BinaryNotListed { block, .. } => {
            let mut candidates = work
                .blocks
                .iter()
                .filter(|(_, b)| matching_endpoints(b, &d.host, d.port).next().is_some());
            let by_name = candidates.clone().find(|(_, b)| *b.name == *block);
            match by_name.or_else(|| candidates.next()) {
                Some((key, _)) => Fix::AddBinary { key: key.clone() },
                None => Fix::Impossible(format!("no block named {block} matches the endpoint")),
            }
        }
        Reason::PrivateAddress { ip } => {
            // The endpoints that admit the binary but not the address.
            let found = work.blocks.iter().find_map(|(key, b)| {
                let listed = b.binaries.iter().any(|pattern| {
                    super::glob::path_matcher(pattern).is_ok_and(|m| {
                        std::iter::once(&d.binary)
                            .chain(&d.ancestors)
                            .any(|p| m.is_match(p))
                    })
                });
                let (i, _) = matching_endpoints(b, &d.host, d.port).next()?;
                listed.then(|| (key.clone(), i))
            });
            match found {
                Some((key, endpoint)) => Fix::AllowIp { key, endpoint, ip },
                None => Fix::NewEndpoint,
            }
        }
        Reason::RequestNotPermitted { .. } => {
            let (Some(r), Some(ep)) = (&d.request, decision.endpoint) else {
                return Fix::Impossible(
                    "the request was denied without a matching endpoint".into(),
                );
            };
            let Some(key) = key_of(ep.block) else {
                return Fix::Impossible("the deciding block is gone".into());
            };
            let endpoint = ep.endpoint as usize;
            let encoded_slash = work
                .blocks
                .get(&key)
                .and_then(|b| b.endpoints.get(endpoint))
                .and_then(|e| e.rest.as_ref())
                .is_some_and(|r| r.allow_encoded_slash);
            match canonicalize(&r.target, encoded_slash, &d.host, d.port) {
                Ok(target) => Fix::AddRule {
                    key,
                    endpoint,
                    rule: RequestRule {
                        method: r.method.to_ascii_uppercase(),
                        path: escape_glob(&target.matched),
                        query: BTreeMap::new(),
                    },
                },
                Err(e) => Fix::Impossible(format!(
                    "the request target is rejected before any rule is read ({e}); no rule can allow it"
                )),
            }
        }
        Reason::DeniedByRule {
            block,
            method,
            path,
        } => Fix::Impossible(format!(
            "{method} {path} matches a deny rule of block {block}, and deny rules beat every allow \
             rule: narrow or remove that deny rule"
        )),
        Reason::BadTarget { error, .. } => Fix::Impossible(format!(
            "the request target is rejected before any rule is read ({error}); no rule can allow it"
        )),
        Reason::ForbiddenAddress { ip, class } => Fix::Impossible(format!(
            "{ip} is a {class} address, which no policy can allow"
        )),
        other => Fix::Impossible(format!("denied: {other}")),
    }
}

/// The rules equivalent to an `access` preset (every path).
fn preset_rules(preset: AccessPreset) -> Vec<RequestRule> {
    let methods: &[&str] = match preset {
        AccessPreset::ReadOnly => &["GET", "HEAD", "OPTIONS"],
        AccessPreset::ReadWrite => &["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH"],
        AccessPreset::Full => &["*"],
    };
    methods
        .iter()
        .map(|m| RequestRule {
            method: (*m).to_owned(),
            path: "/**".to_owned(),
            query: BTreeMap::new(),
        })
        .collect()
}

/// New blocks for the denials no endpoint matched: per host, one block per distinct set of
/// binaries, with exactly the ports those binaries were denied.
fn add_new_blocks(work: &mut Work, denials: &[&Denial], impossible: &mut Vec<(Denial, String)>) {
    // host → port → binaries; host → private addresses seen.
    let mut by_host: BTreeMap<String, (HostPattern, BTreeMap<u16, BTreeSet<PathBuf>>)> =
        BTreeMap::new();
    let mut private: BTreeMap<String, BTreeSet<IpNet>> = BTreeMap::new();
    for d in denials {
        let host = match HostPattern::parse(&d.host) {
            Ok(h) if !h.is_wildcard() => h,
            Ok(_) => {
                impossible.push(((*d).clone(), "the host is not a single name".into()));
                continue;
            }
            Err(e) => {
                impossible.push((
                    (*d).clone(),
                    format!("the host cannot be an endpoint: {}", e.message),
                ));
                continue;
            }
        };
        let text = host.as_str().to_owned();
        let ips = host.ip().into_iter().chain(d.ip);
        for addr in ips.filter(|a| ip::is_private(*a)) {
            private
                .entry(text.clone())
                .or_default()
                .insert(host_net(addr));
        }
        by_host
            .entry(text)
            .or_insert_with(|| (host, BTreeMap::new()))
            .1
            .entry(d.port)
            .or_default()
            .insert(d.binary.clone());
    }
    for (text, (host, ports)) in by_host {
        let mut by_binaries: BTreeMap<BTreeSet<PathBuf>, Vec<u16>> = BTreeMap::new();
        for (port, binaries) in ports {
            by_binaries.entry(binaries).or_default().push(port);
        }
        for (binaries, ports) in by_binaries {
            let key = work.fresh_key(&host);
            let block = NetworkBlock {
                name: key.clone(),
                endpoints: vec![Endpoint {
                    host: host.clone(),
                    ports,
                    tls: TlsMode::Auto,
                    rest: None,
                    allowed_ips: private
                        .get(&text)
                        .map(|s| s.iter().copied().collect())
                        .unwrap_or_default(),
                }],
                binaries: binaries
                    .iter()
                    .map(|b| escape_glob(&b.display().to_string()))
                    .collect(),
            };
            work.blocks.insert(key.clone(), Arc::new(block));
            work.changes.insert(key, Change::New);
        }
    }
}

fn apply_fix(work: &mut Work, d: &Denial, fix: Fix, impossible: &mut Vec<(Denial, String)>) {
    match fix {
        Fix::Allowed | Fix::NewEndpoint => {}
        Fix::Impossible(why) => impossible.push((d.clone(), why)),
        Fix::AddBinary { key } => {
            let path = escape_glob(&d.binary.display().to_string());
            let note = format!("adds binary {}", d.binary.display());
            if let Some(block) = work.amend(&key, note)
                && !block.binaries.contains(&path)
            {
                block.binaries.push(path);
            }
        }
        Fix::AllowIp { key, endpoint, ip } => {
            let net = host_net(ip);
            let note = format!("adds allowed_ips {net} to {}", host_port(&d.host, d.port));
            if let Some(ep) = work
                .amend(&key, note)
                .and_then(|b| b.endpoints.get_mut(endpoint))
                && !ep.allowed_ips.contains(&net)
            {
                ep.allowed_ips.push(net);
            }
        }
        Fix::AddRule {
            key,
            endpoint,
            rule,
        } => {
            let note = format!(
                "adds rule {} {} to {}",
                rule.method,
                rule.path,
                host_port(&d.host, d.port)
            );
            let Some(rest) = work
                .amend(&key, note)
                .and_then(|b| b.endpoints.get_mut(endpoint))
                .and_then(|ep| ep.rest.as_mut())
            else {
                return;
            };
            if let AllowSet::Access(preset) = rest.allow {
                rest.allow = AllowSet::Rules(preset_rules(preset));
            }
            if let AllowSet::Rules(rules) = &mut rest.allow
                && !rules.contains(&rule)
            {
                rules.push(rule);
            }
        }
    }
}

/// The blocks that would allow `denials` on top of `current` (see the module docs).
#[must_use]
pub fn suggest(current: &Policy, denials: &[Denial]) -> Suggestions {
    let mut counts: BTreeMap<&Denial, usize> = BTreeMap::new();
    for d in denials {
        *counts.entry(d).or_default() += 1;
    }
    let mut work = Work {
        blocks: current.network.clone(),
        changes: BTreeMap::new(),
        taken: current
            .network
            .iter()
            .flat_map(|(k, b)| [k.clone(), b.name.clone()])
            .collect(),
    };
    let mut out = Suggestions::default();
    let mut impossible: Vec<(Denial, String)> = Vec::new();
    let mut pending: Vec<&Denial> = counts.keys().copied().collect();
    for round in 0..MAX_ROUNDS {
        if pending.is_empty() {
            break;
        }
        let compiled = work.compile(current);
        let mut unmatched = Vec::new();
        let mut next = Vec::new();
        for d in pending {
            match classify(&work, &compiled, d) {
                Fix::Allowed if round == 0 => {
                    out.already_allowed += counts.get(d).copied().unwrap_or(0);
                }
                Fix::Allowed => {}
                Fix::NewEndpoint => {
                    unmatched.push(d);
                    next.push(d);
                }
                Fix::Impossible(why) => impossible.push((d.clone(), why)),
                fix => {
                    apply_fix(&mut work, d, fix, &mut impossible);
                    next.push(d);
                }
            }
        }
        add_new_blocks(&mut work, &unmatched, &mut impossible);
        let failed: BTreeSet<&Denial> = impossible.iter().map(|(d, _)| d).collect();
        next.retain(|d| !failed.contains(d));
        pending = next;
    }
    for d in pending {
        impossible.push((d.clone(), "no block found that allows it".into()));
    }
    verify(current, &mut work, &counts, &mut out, &mut impossible);
    for (denial, why) in impossible {
        let count = counts.get(&denial).copied().unwrap_or(1);
        if !out.unresolved.iter().any(|u| u.denial == denial) {
            out.unresolved.push(Unresolved { count, denial, why });
        }
    }
    out.unresolved
        .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.denial.cmp(&b.denial)));
    out
}

/// Renders and re-parses every changed block, then decides every denial against the result:
/// only blocks that parse back to themselves are kept, and each denial they allow is listed as
/// covered by the block that allowed it.
fn verify(
    current: &Policy,
    work: &mut Work,
    counts: &BTreeMap<&Denial, usize>,
    out: &mut Suggestions,
    impossible: &mut Vec<(Denial, String)>,
) {
    let mut bad: BTreeMap<String, String> = BTreeMap::new();
    for key in work.changes.keys() {
        let Some(block) = work.blocks.get(key) else {
            continue;
        };
        let text = format!(
            "version: 1\nnetwork_policies:\n{}",
            render_block(key, block)
        );
        match super::parse("suggestion", &text) {
            Ok(p)
                if p.network
                    .get(key)
                    .is_some_and(|b| NetworkBlock::eq(b, block)) => {}
            Ok(_) => {
                bad.insert(
                    key.clone(),
                    "the block does not read back as written".into(),
                );
            }
            Err(e) => {
                bad.insert(key.clone(), format!("the block would be invalid: {e}"));
            }
        }
    }
    // Which dropped block would have allowed what, to say why a denial stays uncovered.
    let drafted = (!bad.is_empty()).then(|| {
        let keys: Vec<String> = work.blocks.keys().cloned().collect();
        (work.compile(current), keys)
    });
    let why_uncovered = |d: &Denial| -> String {
        let dropped = drafted.as_ref().and_then(|(compiled, keys)| {
            let key = keys.get(decide(compiled, d).endpoint?.block as usize)?;
            Some(format!(
                "the suggested block {key} was dropped: {}",
                bad.get(key)?
            ))
        });
        dropped.unwrap_or_else(|| "no block found that allows it".to_owned())
    };
    for key in bad.keys() {
        work.changes.remove(key);
        match current.network.get(key) {
            Some(original) => work.blocks.insert(key.clone(), original.clone()),
            None => work.blocks.remove(key),
        };
    }
    let before = current.compile();
    let compiled = work.compile(current);
    let keys: Vec<&String> = work.blocks.keys().collect();
    let mut covers: BTreeMap<String, Vec<Covered>> = BTreeMap::new();
    let failed: BTreeSet<Denial> = impossible.iter().map(|(d, _)| d.clone()).collect();
    for (d, &count) in counts {
        if failed.contains(*d) {
            continue;
        }
        if decide(&before, d).is_allowed() {
            continue;
        }
        let decision = decide(&compiled, d);
        let key = decision
            .endpoint
            .and_then(|e| keys.get(e.block as usize))
            .map(|k| (*k).clone());
        match key {
            Some(key) if decision.is_allowed() && work.changes.contains_key(&key) => {
                covers.entry(key).or_default().push(Covered {
                    count,
                    denial: (*d).clone(),
                });
            }
            _ => impossible.push(((*d).clone(), why_uncovered(d))),
        }
    }
    for (key, change) in std::mem::take(&mut work.changes) {
        let Some(block) = work.blocks.get(&key) else {
            continue;
        };
        let mut covered = covers.remove(&key).unwrap_or_default();
        if covered.is_empty() {
            // A change that ended up allowing nothing (another block covered its denials).
            continue;
        }
        covered.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.denial.cmp(&b.denial)));
        out.blocks.push(Suggestion {
            key,
            block: NetworkBlock::clone(block),
            change,
            covers: covered,
        });
    }
}

/// Whether `s` can be written as a plain YAML scalar inside a flow or block context without
/// changing its meaning.
fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    (first.is_ascii_alphabetic() || first == '/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '+'))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n" | "~"
        )
}

/// A YAML scalar: plain when that is safe, double-quoted (JSON escapes are YAML's) otherwise.
fn scalar(s: &str) -> String {
    if plain_ok(s) { s.to_owned() } else { quoted(s) }
}

fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn render_query(out: &mut String, indent: &str, query: &BTreeMap<String, QueryMatcher>) {
    if query.is_empty() {
        return;
    }
    let _ = writeln!(out, "{indent}query:");
    for (k, m) in query {
        match m {
            QueryMatcher::Glob(g) => {
                let _ = writeln!(out, "{indent}  {}: {}", scalar(k), quoted(g));
            }
            QueryMatcher::Any { any } => {
                let list: Vec<String> = any.iter().map(|g| quoted(g)).collect();
                let _ = writeln!(out, "{indent}  {}:", scalar(k));
                let _ = writeln!(out, "{indent}    any: [{}]", list.join(", "));
            }
        }
    }
}

fn render_endpoint(out: &mut String, ep: &Endpoint) {
    let _ = writeln!(out, "      - host: {}", scalar(ep.host.as_str()));
    match ep.ports.as_slice() {
        [one] => {
            let _ = writeln!(out, "        port: {one}");
        }
        many => {
            let list: Vec<String> = many.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "        ports: [{}]", list.join(", "));
        }
    }
    if ep.rest.is_some() {
        out.push_str("        protocol: rest\n");
    }
    if ep.tls == TlsMode::Skip {
        out.push_str("        tls: skip\n");
    }
    if let Some(rest) = &ep.rest {
        let enforcement = match rest.enforcement {
            super::Enforcement::Enforce => "enforce",
            super::Enforcement::Audit => "audit",
        };
        let _ = writeln!(out, "        enforcement: {enforcement}");
        match &rest.allow {
            AllowSet::Access(preset) => {
                let name = match preset {
                    AccessPreset::ReadOnly => "read-only",
                    AccessPreset::ReadWrite => "read-write",
                    AccessPreset::Full => "full",
                };
                let _ = writeln!(out, "        access: {name}");
            }
            AllowSet::Rules(rules) => {
                out.push_str("        rules:\n");
                for r in rules {
                    out.push_str("          - allow:\n");
                    let _ = writeln!(out, "              method: {}", scalar(&r.method));
                    let _ = writeln!(out, "              path: {}", quoted(&r.path));
                    render_query(out, "              ", &r.query);
                }
            }
        }
        if !rest.deny_rules.is_empty() {
            out.push_str("        deny_rules:\n");
            for r in &rest.deny_rules {
                let _ = writeln!(out, "          - method: {}", scalar(&r.method));
                let _ = writeln!(out, "            path: {}", quoted(&r.path));
                render_query(out, "            ", &r.query);
            }
        }
        if rest.allow_encoded_slash {
            out.push_str("        allow_encoded_slash: true\n");
        }
    }
    if !ep.allowed_ips.is_empty() {
        let list: Vec<String> = ep
            .allowed_ips
            .iter()
            .map(|n| quoted(&n.to_string()))
            .collect();
        let _ = writeln!(out, "        allowed_ips: [{}]", list.join(", "));
    }
}

/// One block in the seed's format, indented to sit under `network_policies:`.
#[must_use]
pub fn render_block(key: &str, block: &NetworkBlock) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "  {}:", scalar(key));
    let _ = writeln!(out, "    name: {}", scalar(&block.name));
    out.push_str("    endpoints:\n");
    for ep in &block.endpoints {
        render_endpoint(&mut out, ep);
    }
    out.push_str("    binaries:\n");
    for b in &block.binaries {
        let _ = writeln!(out, "      - {{ path: {} }}", scalar(b));
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::policy::parse;

    const PIP: &str = "  pypi:
    name: pypi
    endpoints:
      - host: pypi.org
        port: 443
    binaries:
      - { path: /usr/bin/pip }
";

    const GITHUB: &str = "  github_repos:
    name: github_repos
    endpoints:
      - host: api.github.com
        port: 443
        protocol: rest
        enforcement: enforce
        rules:
          - allow:
              method: GET
              path: \"/**\"
          - allow:
              method: \"*\"
              path: \"/repos/acme/alpha-repo/**\"
        deny_rules:
          - method: DELETE
            path: \"/repos/**\"
    binaries:
      - { path: /usr/local/bin/claude }
      - { path: /usr/bin/gh }
";

    fn policy(network: &str) -> Policy {
        let yaml = format!("version: 1\nnetwork_policies:\n{network}");
        parse("current.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    fn denial(binary: &str, host: &str, port: u16) -> Denial {
        Denial {
            binary: PathBuf::from(binary),
            ancestors: Vec::new(),
            host: host.to_owned(),
            ip: None,
            port,
            request: None,
        }
    }

    fn request(binary: &str, host: &str, method: &str, target: &str) -> Denial {
        Denial {
            request: Some(DeniedRequest {
                method: method.to_owned(),
                target: target.to_owned(),
            }),
            ..denial(binary, host, 443)
        }
    }

    fn allows(p: &Policy, d: &Denial) -> bool {
        decide(&p.compile(), d).is_allowed()
    }

    /// The suggestion allows every covered denial, and everything it allows beyond the
    /// current policy is one of the denials (or, for an amended block, the new binary on that
    /// block's other endpoints).
    fn check(current: &Policy, denials: &[Denial]) -> Suggestions {
        let s = suggest(current, denials);
        let merged = s.apply(current);
        for b in &s.blocks {
            for c in &b.covers {
                assert!(!allows(current, &c.denial), "{c:?} was already allowed");
                assert!(
                    allows(&merged, &c.denial),
                    "{c:?} not allowed by\n{}",
                    s.render()
                );
            }
        }
        for u in &s.unresolved {
            assert!(!allows(&merged, &u.denial), "{u:?}");
        }
        // Pasting the output under `network_policies:` of the current policy (with amended
        // blocks replacing theirs) gives a valid policy equal to `merged`.
        let mut text = String::new();
        for (key, block) in &merged.network {
            text.push_str(&render_block(key, block));
        }
        let reparsed = policy(&text);
        assert_eq!(reparsed.network.len(), merged.network.len());
        for (key, block) in &merged.network {
            assert_eq!(&reparsed.network[key], block, "{key}");
        }
        s
    }

    #[test]
    fn an_unmatched_endpoint_gets_a_new_block_named_after_the_host() {
        let current = policy(PIP);
        let d = denial("/usr/bin/curl", "files.pythonhosted.org", 443);
        let s = check(&current, &[d.clone(), d.clone(), d]);
        insta::assert_snapshot!(s.render(), @r"
          # new block files_pythonhosted_org
          # covers 3 denials: /usr/bin/curl -> files.pythonhosted.org:443
          files_pythonhosted_org:
            name: files_pythonhosted_org
            endpoints:
              - host: files.pythonhosted.org
                port: 443
            binaries:
              - { path: /usr/bin/curl }
        ");
        let merged = s.apply(&current);
        // Not another binary, not another port, not another host.
        assert!(!allows(
            &merged,
            &denial("/usr/bin/wget", "files.pythonhosted.org", 443)
        ));
        assert!(!allows(
            &merged,
            &denial("/usr/bin/curl", "files.pythonhosted.org", 80)
        ));
        assert!(!allows(
            &merged,
            &denial("/usr/bin/curl", "example.org", 443)
        ));
    }

    #[test]
    fn ports_are_grouped_by_the_binaries_denied_on_them() {
        let s = check(
            &policy(PIP),
            &[
                denial("/usr/bin/curl", "Mirror.Example.com.", 80),
                denial("/usr/bin/curl", "mirror.example.com", 8080),
                denial("/usr/bin/curl", "mirror.example.com", 443),
                denial("/usr/bin/python3", "mirror.example.com", 443),
            ],
        );
        insta::assert_snapshot!(s.render(), @r"
          # new block mirror_example_com
          # covers 1 denial: /usr/bin/curl -> Mirror.Example.com.:80
          # covers 1 denial: /usr/bin/curl -> mirror.example.com:8080
          mirror_example_com:
            name: mirror_example_com
            endpoints:
              - host: mirror.example.com
                ports: [80, 8080]
            binaries:
              - { path: /usr/bin/curl }
          # new block mirror_example_com_2
          # covers 1 denial: /usr/bin/curl -> mirror.example.com:443
          # covers 1 denial: /usr/bin/python3 -> mirror.example.com:443
          mirror_example_com_2:
            name: mirror_example_com_2
            endpoints:
              - host: mirror.example.com
                port: 443
            binaries:
              - { path: /usr/bin/curl }
              - { path: /usr/bin/python3 }
        ");
    }

    #[test]
    fn keys_avoid_existing_keys_and_names() {
        let current = policy(
            "  mirror_example_com:
    name: other
    endpoints:
      - host: a.example.com
        port: 443
    binaries:
      - { path: /usr/bin/pip }
  x:
    name: mirror_example_com_2
    endpoints:
      - host: b.example.com
        port: 443
    binaries:
      - { path: /usr/bin/pip }
",
        );
        let s = check(
            &current,
            &[denial("/usr/bin/curl", "mirror.example.com", 443)],
        );
        assert_eq!(s.blocks[0].key, "mirror_example_com_3");
        assert_eq!(s.blocks[0].change, Change::New);
    }

    #[test]
    fn a_binary_not_listed_is_added_to_the_block_that_matches() {
        let current = policy(PIP);
        let d = Denial {
            ancestors: vec![PathBuf::from("/usr/bin/bash")],
            ..denial("/usr/bin/curl", "pypi.org", 443)
        };
        let s = check(&current, &[d]);
        insta::assert_snapshot!(s.render(), @r"
          # replaces block pypi: adds binary /usr/bin/curl
          # covers 1 denial: /usr/bin/curl -> pypi.org:443
          pypi:
            name: pypi
            endpoints:
              - host: pypi.org
                port: 443
            binaries:
              - { path: /usr/bin/pip }
              - { path: /usr/bin/curl }
        ");
        assert!(!allows(
            &s.apply(&current),
            &denial("/usr/bin/wget", "pypi.org", 443)
        ));
    }

    #[test]
    fn binaries_with_glob_characters_match_only_themselves() {
        let current = policy(PIP);
        let s = check(&current, &[denial("/opt/a*b/tool", "pypi.org", 443)]);
        assert_eq!(
            s.blocks[0].block.binaries,
            ["/usr/bin/pip", "/opt/a\\*b/tool"]
        );
        assert!(!allows(
            &s.apply(&current),
            &denial("/opt/axxb/tool", "pypi.org", 443)
        ));
    }

    #[test]
    fn a_private_ip_literal_gets_allowed_ips() {
        let current = policy(PIP);
        let d = denial("/usr/bin/psql", "10.1.2.3", 5432);
        let s = check(&current, &[d]);
        insta::assert_snapshot!(s.render(), @r#"
          # new block ip_10_1_2_3
          # covers 1 denial: /usr/bin/psql -> 10.1.2.3:5432
          ip_10_1_2_3:
            name: ip_10_1_2_3
            endpoints:
              - host: "10.1.2.3"
                port: 5432
                allowed_ips: ["10.1.2.3/32"]
            binaries:
              - { path: /usr/bin/psql }
        "#);
        let merged = s.apply(&current);
        assert!(!allows(&merged, &denial("/usr/bin/psql", "10.1.2.4", 5432)));
        // A public literal needs no allowed_ips; IPv6 literals are quoted.
        let s = check(
            &current,
            &[
                denial("/usr/bin/curl", "198.51.100.7", 443),
                denial("/usr/bin/curl", "fd00::7", 443),
            ],
        );
        insta::assert_snapshot!(s.render(), @r#"
          # new block ip_198_51_100_7
          # covers 1 denial: /usr/bin/curl -> 198.51.100.7:443
          ip_198_51_100_7:
            name: ip_198_51_100_7
            endpoints:
              - host: "198.51.100.7"
                port: 443
            binaries:
              - { path: /usr/bin/curl }
          # new block ip_fd00_7
          # covers 1 denial: /usr/bin/curl -> [fd00::7]:443
          ip_fd00_7:
            name: ip_fd00_7
            endpoints:
              - host: "fd00::7"
                port: 443
                allowed_ips: ["fd00::7/128"]
            binaries:
              - { path: /usr/bin/curl }
        "#);
    }

    #[test]
    fn a_private_address_behind_a_name_is_added_to_the_endpoint() {
        let current = policy(
            "  db:
    name: db
    endpoints:
      - host: db.corp.example
        port: 5432
    binaries:
      - { path: /usr/bin/psql }
",
        );
        let d = Denial {
            ip: Some("10.0.0.7".parse().unwrap()),
            ..denial("/usr/bin/psql", "db.corp.example", 5432)
        };
        let s = check(&current, std::slice::from_ref(&d));
        insta::assert_snapshot!(s.render(), @r#"
          # replaces block db: adds allowed_ips 10.0.0.7/32 to db.corp.example:5432
          # covers 1 denial: /usr/bin/psql -> db.corp.example:5432
          db:
            name: db
            endpoints:
              - host: db.corp.example
                port: 5432
                allowed_ips: ["10.0.0.7/32"]
            binaries:
              - { path: /usr/bin/psql }
        "#);
        let other = Denial {
            ip: Some("10.0.0.8".parse().unwrap()),
            ..d
        };
        assert!(!allows(&s.apply(&current), &other));
    }

    #[test]
    fn a_denied_request_gets_a_rule_for_its_method_and_path() {
        let current = policy(GITHUB);
        let d = request(
            "/usr/bin/gh",
            "api.github.com",
            "POST",
            "/repos/acme/bravo-repo/issues?x=1",
        );
        let s = check(&current, &[d]);
        insta::assert_snapshot!(s.render(), @r#"
          # replaces block github_repos: adds rule POST /repos/acme/bravo-repo/issues to api.github.com:443
          # covers 1 denial: /usr/bin/gh -> api.github.com:443 POST /repos/acme/bravo-repo/issues?x=1
          github_repos:
            name: github_repos
            endpoints:
              - host: api.github.com
                port: 443
                protocol: rest
                enforcement: enforce
                rules:
                  - allow:
                      method: GET
                      path: "/**"
                  - allow:
                      method: "*"
                      path: "/repos/acme/alpha-repo/**"
                  - allow:
                      method: POST
                      path: "/repos/acme/bravo-repo/issues"
                deny_rules:
                  - method: DELETE
                    path: "/repos/**"
            binaries:
              - { path: /usr/local/bin/claude }
              - { path: /usr/bin/gh }
        "#);
        let merged = s.apply(&current);
        for (method, target) in [
            ("PUT", "/repos/acme/bravo-repo/issues"),
            ("POST", "/repos/acme/bravo-repo"),
        ] {
            assert!(!allows(
                &merged,
                &request("/usr/bin/gh", "api.github.com", method, target)
            ));
        }
    }

    #[test]
    fn an_access_preset_becomes_rules_before_a_rule_is_added() {
        let current = policy(
            "  api:
    name: api
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        access: read-only
    binaries:
      - { path: /usr/bin/curl }
",
        );
        let s = check(
            &current,
            &[request(
                "/usr/bin/curl",
                "api.example.com",
                "DELETE",
                "/items/a%2A[1]",
            )],
        );
        let Some(Endpoint {
            rest: Some(rest), ..
        }) = s.blocks[0].block.endpoints.first()
        else {
            panic!("{s:?}")
        };
        let AllowSet::Rules(rules) = &rest.allow else {
            panic!("{rest:?}")
        };
        let shown: Vec<String> = rules
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert_eq!(
            shown,
            [
                "GET /**",
                "HEAD /**",
                "OPTIONS /**",
                "DELETE /items/a\\*\\[1\\]"
            ]
        );
        let merged = s.apply(&current);
        assert!(!allows(
            &merged,
            &request("/usr/bin/curl", "api.example.com", "DELETE", "/items/ax[1]")
        ));
        assert!(allows(
            &merged,
            &request("/usr/bin/curl", "api.example.com", "GET", "/x")
        ));
    }

    #[test]
    fn fixes_combine_binary_then_request_rule() {
        let current = policy(GITHUB);
        let s = check(
            &current,
            &[request(
                "/usr/bin/curl",
                "api.github.com",
                "PATCH",
                "/repos/acme/bravo-repo/issues/7",
            )],
        );
        assert_eq!(
            s.blocks[0].change,
            Change::Amended(vec![
                "adds binary /usr/bin/curl".into(),
                "adds rule PATCH /repos/acme/bravo-repo/issues/7 to api.github.com:443".into(),
            ])
        );
    }

    #[test]
    fn what_no_block_can_allow_is_reported_with_the_reason() {
        let current = policy(GITHUB);
        let s = check(
            &current,
            &[
                request(
                    "/usr/bin/gh",
                    "api.github.com",
                    "DELETE",
                    "/repos/acme/alpha-repo",
                ),
                request("/usr/bin/gh", "api.github.com", "GET", "/a/../../etc"),
                denial("/usr/bin/curl", "127.0.0.1", 8080),
                Denial {
                    ip: Some("169.254.169.254".parse().unwrap()),
                    ..denial("/usr/bin/curl", "metadata.example.com", 80)
                },
                denial("/usr/bin/curl", "*.example.com", 443),
                denial("/usr/bin/curl", "bad_host!", 443),
                denial("relative/bin", "example.org", 443),
            ],
        );
        assert!(s.blocks.is_empty(), "{s:?}");
        insta::assert_snapshot!(s.render());
    }

    #[test]
    fn denials_the_policy_already_allows_are_counted_not_suggested() {
        let s = check(
            &policy(PIP),
            &[
                denial("/usr/bin/pip", "pypi.org", 443),
                denial("/usr/bin/pip", "pypi.org", 443),
            ],
        );
        assert!(s.is_empty());
        assert_eq!(s.already_allowed, 2);
        assert_eq!(s.render(), "");
    }

    #[test]
    fn every_field_of_a_block_renders_back_to_itself() {
        let current = policy(&format!(
            "{GITHUB}  download_api:
    name: Download API
    endpoints:
      - host: \"*.example.com\"
        ports: [443, 8443]
        protocol: rest
        tls: skip
        enforcement: audit
        allow_encoded_slash: true
        rules:
          - allow:
              method: GET
              path: \"/api/v1/download\"
              query:
                slug: \"skill-*\"
                version:
                  any: [\"1.*\", \"2.*\"]
        deny_rules:
          - method: POST
            path: \"/admin\"
            query:
              \"a b\": \"x\"
      - host: internal.corp.example
        port: 80
        tls: skip
        allowed_ips: [10.0.0.0/8, \"fd00::/8\"]
    binaries:
      - path: \"/usr/bin/*\"
      - path: \"/opt/**/yes\"
"
        ));
        for (key, block) in &current.network {
            let again = policy(&render_block(key, block));
            assert_eq!(&again.network[key], block, "{}", render_block(key, block));
        }
    }

    fn arb_denial() -> impl Strategy<Value = Denial> {
        let host = prop::sample::select(vec![
            "pypi.org",
            "api.github.com",
            "a.example.com",
            "new.test",
            "db.corp.example",
            "10.1.2.3",
            "198.51.100.7",
            "127.0.0.1",
        ]);
        let ip = prop::sample::select(vec![None, Some("198.18.0.9"), Some("10.0.0.7")]);
        let binary = prop::sample::select(vec![
            "/usr/bin/pip",
            "/usr/bin/curl",
            "/usr/bin/gh",
            "/usr/bin/python3",
        ]);
        let ancestors = prop::sample::select(vec![vec![], vec!["/usr/bin/bash"]]);
        let req = prop::option::of((
            prop::sample::select(vec!["GET", "POST", "DELETE", "PATCH"]),
            prop::sample::select(vec![
                "/",
                "/repos/acme/x",
                "/upload?x=1",
                "/repos/acme/alpha-repo/y",
            ]),
        ));
        (
            host,
            ip,
            prop::sample::select(vec![443u16, 80, 5432]),
            binary,
            ancestors,
            req,
        )
            .prop_map(|(host, ip, port, binary, ancestors, req)| Denial {
                binary: binary.into(),
                ancestors: ancestors.into_iter().map(PathBuf::from).collect(),
                host: host.to_owned(),
                ip: ip.map(|i: &str| i.parse().unwrap()),
                port,
                request: req.map(|(m, t)| DeniedRequest {
                    method: m.to_owned(),
                    target: t.to_owned(),
                }),
            })
    }

    fn base_policy() -> Policy {
        policy(&format!(
            "{PIP}{GITHUB}  wild:
    name: wild
    endpoints:
      - host: \"*.example.com\"
        port: 443
    binaries:
      - {{ path: /usr/bin/curl }}
  db:
    name: db
    endpoints:
      - host: db.corp.example
        port: 5432
        protocol: rest
        access: read-only
    binaries:
      - {{ path: /usr/bin/python3 }}
"
        ))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn suggestions_allow_the_denials_and_nothing_unrelated(
            denials in prop::collection::vec(arb_denial(), 1..8),
        ) {
            let current = base_policy();
            let s = check(&current, &denials);
            let merged = s.apply(&current);
            let before = current.compile();
            let after = merged.compile();
            // Every denial is allowed now, or reported.
            for d in &denials {
                let reported = s.unresolved.iter().any(|u| &u.denial == d);
                prop_assert!(decide(&after, d).is_allowed() || reported, "{:?}\n{}", d, s.render());
            }
            // An unrelated binary, and an unrelated host, are decided as before.
            for host in ["pypi.org", "api.github.com", "a.example.com", "new.test", "10.1.2.3", "unrelated.test"] {
                for port in [443u16, 80, 5432] {
                    for binary in ["/usr/bin/unrelated", "/usr/bin/curl", "/usr/bin/pip"] {
                        let probe = Denial { ..denial(binary, host, port) };
                        let related_binary = binary != "/usr/bin/unrelated";
                        if related_binary && host != "unrelated.test" {
                            continue;
                        }
                        prop_assert_eq!(
                            decide(&before, &probe).is_allowed(),
                            decide(&after, &probe).is_allowed(),
                            "{:?}\n{}", probe, s.render()
                        );
                    }
                }
            }
        }
    }
}
