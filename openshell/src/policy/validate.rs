//! Text → [`RawPolicy`] → [`Policy`]: parse the YAML, then check every field and collect every
//! error with its position, field path and a fix hint.
//!
//! Errors of the YAML reader itself (syntax, unknown field, duplicate key, a value of the wrong
//! type) end the reading at the first one; every other error is collected.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use serde_saphyr::{Location, Spanned};

use super::error::{Collector, PolicyError, PolicyErrors, SourcePos};
use super::host::HostPattern;
use super::ip::{Forbidden, classify_forbidden};
use super::model::{
    AccessPreset, AllowSet, Compatibility, Endpoint, Enforcement, FilesystemPolicy, LandlockPolicy,
    NetworkBlock, Policy, ProcessPolicy, QueryMatcher, RequestRule, RestPolicy, StaticSections,
    TlsMode,
};
use super::raw::{
    RawBinary, RawBlock, RawEndpoint, RawFilesystem, RawPolicy, RawProcess, RawQueryMatcher,
    RawRuleBody, RawScalar, Unsupported,
};
use super::{MAX_POLICY_BYTES, glob};

/// Most paths in `filesystem_policy` (ours; the original allows 256).
pub const MAX_FILESYSTEM_PATHS: usize = 4096;
/// Longest path in `filesystem_policy`.
pub const MAX_PATH_LEN: usize = 4096;
/// Bound on events replayed through YAML aliases (a "billion laughs" file stops here).
const MAX_ALIAS_REPLAYED_EVENTS: usize = 100_000;

/// Parses and validates a policy. `source_name` (usually the file path) appears in every error.
pub fn parse(source_name: &str, text: &str) -> Result<Policy, PolicyErrors> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(too_large(source_name, text.len() as u64));
    }
    let raw = read_yaml(source_name, text)?;
    validate_raw(source_name, &raw)
}

/// Validates a policy read by [`read_yaml`] (or an equivalent reader).
pub(crate) fn validate_raw(source_name: &str, raw: &RawPolicy) -> Result<Policy, PolicyErrors> {
    let mut c = Collector::new(source_name);
    let policy = validate(raw, &mut c);
    c.finish()?;
    Ok(policy)
}

/// The error for a policy of `len` bytes, over [`MAX_POLICY_BYTES`] (for callers that check the
/// size before reading the whole file).
pub fn too_large(source_name: &str, len: u64) -> PolicyErrors {
    PolicyErrors::whole_file(
        source_name,
        format!("the policy is {len} bytes; the limit is {MAX_POLICY_BYTES} bytes (4 MiB)"),
        "remove unused blocks or use wildcard hosts and globs to shorten it",
    )
}

/// The YAML reader's settings: duplicate keys are errors, alias expansion is bounded, the
/// default resource budget applies.
pub(crate) fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options.duplicate_keys = serde_saphyr::options::DuplicateKeyPolicy::Error;
    options.alias_limits.max_total_replayed_events = MAX_ALIAS_REPLAYED_EVENTS;
    options
}

fn read_yaml(source_name: &str, text: &str) -> Result<RawPolicy, PolicyErrors> {
    // Tracking the field path costs a third of the parse; it is only needed for an error, so a
    // file that reads cleanly is read once without it, and one that does not is read again.
    if let Ok(raw) = serde_saphyr::from_str_with_options::<RawPolicy>(text, yaml_options()) {
        return Ok(raw);
    }
    read_yaml_tracking_path(source_name, text)
}

/// Reads the YAML while tracking the field path, so that an error names it. Slower than a plain
/// read; used once a plain read has failed.
pub(crate) fn read_yaml_tracking_path(
    source_name: &str,
    text: &str,
) -> Result<RawPolicy, PolicyErrors> {
    let options = yaml_options();
    let mut field_path = String::new();
    let result = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize::<_, RawPolicy>(de).map_err(|err| {
            field_path = clean_path(&err.path().to_string());
            err.into_inner()
        })
    });
    let err = match result {
        Ok(raw) => return Ok(raw),
        Err(err) => err,
    };
    let pos = err
        .location()
        .map(SourcePos::from_location)
        .unwrap_or_default();
    let message = err.without_snippet().to_string();
    let message = strip_location_suffix(&message);
    let message = tidy_yaml_message(message);
    let hint = yaml_error_hint(&message);
    Err(PolicyErrors::new(vec![PolicyError {
        file: source_name.to_owned(),
        line: pos.line,
        column: pos.column,
        path: field_path,
        message,
        hint: hint.map(str::to_owned),
    }]))
}

/// Drops advice aimed at programmers using serde-saphyr rather than at policy authors.
fn tidy_yaml_message(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest);
        return format!("duplicate key `{key}`");
    }
    message.to_owned()
}

/// serde_path_to_error prints `?` for positions it cannot name and `value` for the field inside
/// `Spanned`; neither helps a reader of the policy.
fn clean_path(path: &str) -> String {
    let cleaned: Vec<&str> = path
        .split('.')
        .map(|seg| {
            seg.strip_prefix("value")
                .filter(|s| s.starts_with('['))
                .unwrap_or(seg)
        })
        .filter(|seg| !seg.is_empty() && *seg != "?" && *seg != "value")
        .collect();
    cleaned.join(".").replace(".[", "[")
}

/// serde-saphyr appends " at line L column C" to some messages; we print the position first.
fn strip_location_suffix(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    }
}

fn yaml_error_hint(message: &str) -> Option<&'static str> {
    if message.contains("unknown field") {
        Some("remove the field or fix its spelling; see POLICY.md for the fields of each section")
    } else if message.contains("duplicate") {
        Some("each key may appear once per mapping; merge the two entries")
    } else if message.contains("alias") {
        Some("the file expands YAML aliases too many times; write the values out")
    } else if message.contains("invalid type") {
        Some("check the value's type against POLICY.md")
    } else {
        None
    }
}

fn pos<T>(s: &Spanned<T>) -> SourcePos {
    loc(s.referenced)
}

fn loc(l: Location) -> SourcePos {
    SourcePos::from_location(l)
}

const ROOT: SourcePos = SourcePos { line: 1, column: 1 };

fn validate(raw: &RawPolicy, c: &mut Collector<'_>) -> Policy {
    match &raw.version {
        None => c.push(
            ROOT,
            "version",
            "`version` is missing",
            Some("add `version: 1` at the top of the file"),
        ),
        Some(v) if matches!(v.value, RawScalar::Int(1)) => {}
        Some(v) => c.push(
            pos(v),
            "version",
            format!("unsupported policy version {}", scalar_text(&v.value)),
            Some("write `version: 1`; it is the only version openshell reads"),
        ),
    }
    unsupported(
        c,
        &raw.network_middlewares,
        "network_middlewares",
        "network_middlewares",
        "remove the section; HTTP middleware is not implemented",
    );

    let mut present = StaticSections::default();
    let filesystem = match &raw.filesystem_policy {
        Some(fs) => {
            present.filesystem_policy = true;
            validate_filesystem(&fs.value, c)
        }
        None => FilesystemPolicy::default(),
    };
    let landlock = match &raw.landlock {
        Some(l) => {
            present.landlock = true;
            let compatibility = match &l.value.compatibility {
                None => Compatibility::default(),
                Some(v) => match v.value.as_str() {
                    "best_effort" => Compatibility::BestEffort,
                    "hard_requirement" => Compatibility::HardRequirement,
                    other => {
                        c.push(
                            pos(v),
                            "landlock.compatibility",
                            format!("unknown compatibility `{other}`"),
                            Some("use `best_effort` or `hard_requirement`"),
                        );
                        Compatibility::default()
                    }
                },
            };
            LandlockPolicy { compatibility }
        }
        None => LandlockPolicy::default(),
    };
    let process = match &raw.process {
        Some(p) => {
            present.process = true;
            validate_process(&p.value, c)
        }
        None => ProcessPolicy::default(),
    };

    let mut network = BTreeMap::new();
    if let Some(Spanned {
        value: Some(blocks),
        ..
    }) = &raw.network_policies
    {
        for (key, block) in blocks {
            network.insert(key.clone(), Arc::new(validate_block(key, block, c)));
        }
    }

    Policy {
        filesystem,
        landlock,
        process,
        present,
        network,
    }
}

fn scalar_text(v: &RawScalar) -> String {
    match v {
        RawScalar::Int(i) => i.to_string(),
        RawScalar::Str(s) => format!("\"{s}\""),
        RawScalar::Other => "(a value of the wrong type)".to_owned(),
    }
}

fn unsupported(c: &mut Collector<'_>, field: &Unsupported, name: &str, path: &str, hint: &str) {
    if let Some(f) = field {
        c.push(
            pos(f),
            path,
            format!("`{name}` is not supported yet by openshell"),
            Some(hint),
        );
    }
}

fn validate_filesystem(fs: &RawFilesystem, c: &mut Collector<'_>) -> FilesystemPolicy {
    let mut check = |list: &Option<Vec<Spanned<String>>>, field: &str| -> Vec<(PathBuf, usize)> {
        let mut out = Vec::new();
        for (i, p) in list.iter().flatten().enumerate() {
            let path = format!("filesystem_policy.{field}[{i}]");
            if let Some((message, hint)) = filesystem_path_problem(&p.value) {
                c.push(pos(p), path, message, Some(hint));
            } else {
                out.push((PathBuf::from(&p.value), i));
            }
        }
        out
    };
    let read_only = check(&fs.read_only, "read_only");
    let read_write = check(&fs.read_write, "read_write");

    let total =
        fs.read_only.as_ref().map_or(0, Vec::len) + fs.read_write.as_ref().map_or(0, Vec::len);
    if total > MAX_FILESYSTEM_PATHS {
        c.push(
            ROOT,
            "filesystem_policy",
            format!("{total} paths listed; the limit is {MAX_FILESYSTEM_PATHS}"),
            Some("list parent directories instead of many single files"),
        );
    }
    for (rw, i) in &read_write {
        if rw == Path::new("/") {
            let at = fs
                .read_write
                .as_ref()
                .and_then(|l| l.get(*i))
                .map_or(ROOT, pos);
            c.push(
                at,
                format!("filesystem_policy.read_write[{i}]"),
                "`/` cannot be read-write: that would open the whole filesystem",
                Some("list the directories the program writes to, e.g. `/sandbox` and `/tmp`"),
            );
        }
    }
    for (ro, i) in &read_only {
        if let Some((rw, _)) = read_write.iter().find(|(rw, _)| ro.starts_with(rw)) {
            let at = fs
                .read_only
                .as_ref()
                .and_then(|l| l.get(*i))
                .map_or(ROOT, pos);
            c.push(
                at,
                format!("filesystem_policy.read_only[{i}]"),
                format!(
                    "read-only path `{}` lies inside read-write path `{}`; Landlock rights only add up, so it would stay writable",
                    ro.display(),
                    rw.display()
                ),
                Some("remove it from read_only, or list narrower read-write paths"),
            );
        }
    }
    FilesystemPolicy {
        read_only: read_only.into_iter().map(|(p, _)| p).collect(),
        read_write: read_write.into_iter().map(|(p, _)| p).collect(),
        include_workdir: fs.include_workdir.unwrap_or(false),
    }
}

fn filesystem_path_problem(p: &str) -> Option<(String, &'static str)> {
    if !p.starts_with('/') {
        return Some((
            format!("path `{p}` is relative"),
            "write an absolute path starting with `/`",
        ));
    }
    if p.len() > MAX_PATH_LEN {
        return Some((
            format!(
                "path is {} characters long; the limit is {MAX_PATH_LEN}",
                p.len()
            ),
            "shorten the path",
        ));
    }
    if p.contains('\0') {
        return Some(("path contains a NUL byte".to_owned(), "remove the NUL byte"));
    }
    if Path::new(p).components().any(|c| c == Component::ParentDir) {
        return Some((
            format!("path `{p}` contains `..`"),
            "write the path without `..` components",
        ));
    }
    None
}

fn validate_process(p: &RawProcess, c: &mut Collector<'_>) -> ProcessPolicy {
    let mut id = |v: &Option<Spanned<RawScalar>>, field: &str| -> String {
        let Some(v) = v else {
            return "sandbox".to_owned();
        };
        let path = format!("process.{field}");
        let text = match &v.value {
            RawScalar::Int(i) => i.to_string(),
            RawScalar::Str(s) => s.clone(),
            RawScalar::Other => {
                c.push(
                    pos(v),
                    path,
                    format!("`{field}` must be a name or a numeric id"),
                    Some("write e.g. `sandbox` or `1500`"),
                );
                return "sandbox".to_owned();
            }
        };
        let numeric = text.bytes().all(|b| b.is_ascii_digit());
        if text == "root" || (numeric && text.trim_start_matches('0').is_empty()) {
            c.push(
                pos(v),
                path,
                format!("`{field}` may not be root"),
                Some("run the sandbox as an unprivileged user such as `sandbox`"),
            );
        } else if text.is_empty()
            || text.starts_with('-')
            || !text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'))
            || (numeric && text.parse::<u32>().is_err())
        {
            c.push(
                pos(v),
                path,
                format!("`{text}` is not a valid user or group name or id"),
                Some("use a name of letters, digits, `_`, `-`, `.`, or a numeric id below 2^32"),
            );
        }
        text
    };
    ProcessPolicy {
        run_as_user: id(&p.run_as_user, "run_as_user"),
        run_as_group: id(&p.run_as_group, "run_as_group"),
    }
}

pub(crate) fn validate_block(
    key: &str,
    block: &Spanned<RawBlock>,
    c: &mut Collector<'_>,
) -> NetworkBlock {
    let base = format!("network_policies.{key}");
    let raw = &block.value;
    let name = raw
        .name
        .as_ref()
        .map_or_else(|| key.to_owned(), |n| n.value.clone());
    if name.trim().is_empty() {
        let at = raw.name.as_ref().map_or(pos(block), pos);
        c.push(
            at,
            format!("{base}.name"),
            "the block name is empty",
            Some("remove `name` to use the key, or write a display name"),
        );
    }

    let mut endpoints = Vec::new();
    match &raw.endpoints {
        None => c.push(
            pos(block),
            format!("{base}.endpoints"),
            "`endpoints` is missing",
            Some("list at least one endpoint, e.g. `endpoints: [{ host: api.example.com, port: 443 }]`"),
        ),
        Some(list) if list.value.is_empty() => c.push(
            pos(list),
            format!("{base}.endpoints"),
            "`endpoints` is empty",
            Some("list at least one endpoint, or remove the block"),
        ),
        Some(list) => {
            for (i, ep) in list.value.iter().enumerate() {
                if let Some(ep) = validate_endpoint(&format!("{base}.endpoints[{i}]"), ep, c) {
                    endpoints.push(ep);
                }
            }
        }
    }

    let mut binaries = Vec::new();
    const ANY_BINARY_HINT: &str =
        "list the programs allowed to connect; write `- path: \"/**\"` to allow any binary";
    match &raw.binaries {
        None => c.push(
            pos(block),
            format!("{base}.binaries"),
            "`binaries` is missing",
            Some(ANY_BINARY_HINT),
        ),
        Some(list) if list.value.is_empty() => c.push(
            pos(list),
            format!("{base}.binaries"),
            "`binaries` is empty, so no program could use this block",
            Some(ANY_BINARY_HINT),
        ),
        Some(list) => {
            for (i, b) in list.value.iter().enumerate() {
                if let Some(path) = validate_binary(&format!("{base}.binaries[{i}]"), b, c) {
                    binaries.push(path);
                }
            }
        }
    }

    NetworkBlock {
        name,
        endpoints,
        binaries,
    }
}

fn validate_binary(path: &str, b: &Spanned<RawBinary>, c: &mut Collector<'_>) -> Option<String> {
    let Some(p) = &b.value.path else {
        c.push(
            pos(b),
            format!("{path}.path"),
            "binary entry has no `path`",
            Some("write `- path: /usr/bin/curl`"),
        );
        return None;
    };
    let field = format!("{path}.path");
    let text = &p.value;
    if !text.starts_with('/') {
        c.push(
            pos(p),
            field,
            format!("binary path `{text}` is relative"),
            Some("write the absolute path of the executable, e.g. `/usr/bin/curl`, or a glob such as `/usr/bin/*`"),
        );
        return None;
    }
    if text.split('/').any(|seg| seg == ".." || seg == ".") {
        c.push(
            pos(p),
            field,
            format!("binary path `{text}` contains `.` or `..`"),
            Some("write the executable's canonical absolute path"),
        );
        return None;
    }
    if let Err(e) = glob::path_glob(text) {
        c.push(
            pos(p),
            field,
            format!(
                "binary path `{text}` is not a valid glob: {}",
                glob::describe(&e)
            ),
            Some("use `*` within one path segment and `**` across segments"),
        );
        return None;
    }
    Some(text.clone())
}

fn validate_port(v: &Spanned<RawScalar>, field: &str, c: &mut Collector<'_>) -> Option<u16> {
    match &v.value {
        RawScalar::Int(p) if (1..=65535).contains(p) => u16::try_from(*p).ok(),
        RawScalar::Int(p) => {
            c.push(
                pos(v),
                field,
                format!("port {p} is out of range"),
                Some("use a TCP port from 1 to 65535"),
            );
            None
        }
        other => {
            c.push(
                pos(v),
                field,
                format!("port {} is not a number", scalar_text(other)),
                Some("write the port as a bare number, e.g. `port: 443`"),
            );
            None
        }
    }
}

const UNSUPPORTED_ENDPOINT_FIELDS: &str = "remove the field; openshell implements host, port(s), protocol: rest, tls, enforcement, access, rules, deny_rules, allowed_ips and allow_encoded_slash";

fn validate_endpoint(
    base: &str,
    ep: &Spanned<RawEndpoint>,
    c: &mut Collector<'_>,
) -> Option<Endpoint> {
    let raw = &ep.value;
    // Set when the endpoint uses something unsupported: its L7 fields are then not judged.
    let mut failed = false;

    for (field, name) in [
        (&raw.path, "path"),
        (
            &raw.websocket_credential_rewrite,
            "websocket_credential_rewrite",
        ),
        (
            &raw.request_body_credential_rewrite,
            "request_body_credential_rewrite",
        ),
        (
            &raw.allow_uninspected_credentials,
            "allow_uninspected_credentials",
        ),
        (&raw.credential_signing, "credential_signing"),
        (&raw.signing_service, "signing_service"),
        (&raw.signing_region, "signing_region"),
        (&raw.persisted_queries, "persisted_queries"),
        (&raw.graphql_persisted_queries, "graphql_persisted_queries"),
        (&raw.graphql_max_body_bytes, "graphql_max_body_bytes"),
        (&raw.mcp, "mcp"),
        (&raw.json_rpc, "json_rpc"),
    ] {
        if field.is_some() {
            failed = true;
        }
        unsupported(
            c,
            field,
            name,
            &format!("{base}.{name}"),
            UNSUPPORTED_ENDPOINT_FIELDS,
        );
    }

    let host = match &raw.host {
        None => {
            c.push(
                pos(ep),
                format!("{base}.host"),
                "endpoint has no `host`",
                Some(
                    "write `host: api.example.com` (a DNS name, a wildcard name or an IP address)",
                ),
            );
            None
        }
        Some(h) => match HostPattern::parse(&h.value) {
            Ok(p) => Some(p),
            Err(e) => {
                c.push(pos(h), format!("{base}.host"), e.message, Some(e.hint));
                None
            }
        },
    };

    let mut ports = Vec::new();
    match (&raw.port, &raw.ports) {
        (Some(p), Some(list)) => {
            c.push(
                pos(list),
                format!("{base}.ports"),
                "both `port` and `ports` are set",
                Some("keep exactly one: `port: 443` or `ports: [80, 443]`"),
            );
            // Still report bad values in either, so one run shows every error.
            let _ = validate_port(p, &format!("{base}.port"), c);
            for (i, p) in list.value.iter().enumerate() {
                let _ = validate_port(p, &format!("{base}.ports[{i}]"), c);
            }
        }
        (None, None) => c.push(
            pos(ep),
            format!("{base}.port"),
            "endpoint has no `port`",
            Some("write `port: 443` or `ports: [80, 443]`"),
        ),
        (Some(p), None) => ports.extend(validate_port(p, &format!("{base}.port"), c)),
        (None, Some(list)) => {
            if list.value.is_empty() {
                c.push(
                    pos(list),
                    format!("{base}.ports"),
                    "`ports` is empty",
                    Some("list at least one port, e.g. `ports: [443]`"),
                );
            }
            for (i, p) in list.value.iter().enumerate() {
                ports.extend(validate_port(p, &format!("{base}.ports[{i}]"), c));
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();

    let tls = match &raw.tls {
        None => TlsMode::Auto,
        Some(t) => match t.value.as_str() {
            "skip" => TlsMode::Skip,
            // Deprecated in the original and without effect there; accepted for compatibility.
            "terminate" | "passthrough" => TlsMode::Auto,
            other => {
                c.push(
                    pos(t),
                    format!("{base}.tls"),
                    format!("unknown tls mode `{other}`"),
                    Some("use `tls: skip` or remove the field (TLS is detected automatically)"),
                );
                TlsMode::Auto
            }
        },
    };

    let is_rest = match &raw.protocol {
        None => false,
        Some(p) => match p.value.as_str() {
            "tcp" => false,
            "rest" => true,
            "websocket" | "graphql" | "mcp" | "json-rpc" | "sql" => {
                c.push(
                    pos(p),
                    format!("{base}.protocol"),
                    format!("`protocol: {}` is not supported yet by openshell", p.value),
                    Some("use `protocol: rest` for HTTP inspection, or omit `protocol` for TCP passthrough"),
                );
                failed = true;
                false
            }
            other => {
                c.push(
                    pos(p),
                    format!("{base}.protocol"),
                    format!("unknown protocol `{other}`"),
                    Some("use `protocol: rest`, or omit `protocol` for TCP passthrough"),
                );
                failed = true;
                false
            }
        },
    };

    let mut allowed_ips = Vec::new();
    for (i, ip) in raw
        .allowed_ips
        .iter()
        .flat_map(|l| l.value.iter())
        .enumerate()
    {
        let field = format!("{base}.allowed_ips[{i}]");
        let net = ip
            .value
            .parse::<IpNet>()
            .ok()
            .or_else(|| ip.value.parse::<IpAddr>().ok().map(IpNet::from));
        let Some(net) = net else {
            c.push(
                pos(ip),
                field,
                format!("`{}` is not an IP address or CIDR", ip.value),
                Some("write e.g. `10.0.0.0/8` or `192.168.1.10`"),
            );
            continue;
        };
        if let Some(class) = net_overlaps_forbidden(&net) {
            c.push(
                pos(ip),
                field,
                format!("`{net}` overlaps {class} addresses, which are always denied"),
                Some("list only private networks (RFC 1918, 100.64.0.0/10, fc00::/7)"),
            );
            continue;
        }
        allowed_ips.push(net.trunc());
    }

    // An IP-literal host that destination safety would always refuse is a mistake to report.
    if let (Some(h), Some(ip)) = (&raw.host, host.as_ref().and_then(HostPattern::ip)) {
        if let Some(class) = classify_forbidden(ip) {
            c.push(
                pos(h),
                format!("{base}.host"),
                format!("host {ip} is a {class} address; connections to it are always denied"),
                Some("remove the endpoint; loopback, link-local, multicast and unspecified addresses are never reachable from a sandbox"),
            );
        } else if super::ip::is_private(ip)
            && !allowed_ips
                .iter()
                .any(|n: &IpNet| n.contains(&super::ip::unmap(ip)))
        {
            c.push(
                pos(h),
                format!("{base}.host"),
                format!("host {ip} is a private address, reachable only through `allowed_ips`"),
                Some("add `allowed_ips: [<the address or its network>]` to this endpoint"),
            );
        }
    }

    let rest = if is_rest {
        validate_rest(base, raw, c)
    } else {
        if !failed {
            for (present, name) in [
                (raw.access.as_ref().map(pos), "access"),
                (raw.rules.as_ref().map(pos), "rules"),
                (raw.deny_rules.as_ref().map(pos), "deny_rules"),
                (raw.enforcement.as_ref().map(pos), "enforcement"),
                (
                    raw.allow_encoded_slash.as_ref().map(pos),
                    "allow_encoded_slash",
                ),
            ] {
                if let Some(at) = present {
                    c.push(
                        at,
                        format!("{base}.{name}"),
                        format!("`{name}` applies only to HTTP inspection"),
                        Some("add `protocol: rest` to the endpoint, or remove the field"),
                    );
                }
            }
        }
        None
    };

    // With errors the whole policy is rejected; what is returned here no longer matters.
    Some(Endpoint {
        host: host?,
        ports,
        tls,
        rest,
        allowed_ips,
    })
}

fn net_overlaps_forbidden(net: &IpNet) -> Option<Forbidden> {
    // A network overlaps a forbidden range if its first or last address is forbidden, or if it
    // contains one of the forbidden ranges entirely.
    classify_forbidden(net.network())
        .or_else(|| classify_forbidden(net.broadcast()))
        .or_else(|| {
            super::ip::FORBIDDEN_NETS
                .iter()
                .find(|(f, _)| net.contains(f))
                .map(|(_, class)| *class)
        })
}

fn validate_rest(base: &str, raw: &RawEndpoint, c: &mut Collector<'_>) -> Option<RestPolicy> {
    let enforcement = match &raw.enforcement {
        None => Enforcement::Enforce,
        Some(e) => match e.value.as_str() {
            "enforce" => Enforcement::Enforce,
            "audit" => Enforcement::Audit,
            other => {
                c.push(
                    pos(e),
                    format!("{base}.enforcement"),
                    format!("unknown enforcement `{other}`"),
                    Some("use `enforce` (block violations) or `audit` (log and allow them)"),
                );
                Enforcement::Enforce
            }
        },
    };
    let access = raw.access.as_ref().and_then(|a| match a.value.as_str() {
        "read-only" => Some(AccessPreset::ReadOnly),
        "read-write" => Some(AccessPreset::ReadWrite),
        "full" => Some(AccessPreset::Full),
        other => {
            c.push(
                pos(a),
                format!("{base}.access"),
                format!("unknown access preset `{other}`"),
                Some("use `read-only`, `read-write` or `full`"),
            );
            None
        }
    });

    let mut rules = Vec::new();
    if let Some(list) = &raw.rules {
        if list.value.is_empty() {
            c.push(
                pos(list),
                format!("{base}.rules"),
                "`rules: []` allows nothing",
                Some("use `access: full` to allow every request, or list at least one rule"),
            );
        }
        for (i, rule) in list.value.iter().enumerate() {
            let path = format!("{base}.rules[{i}]");
            match &rule.value.allow {
                None => c.push(
                    pos(rule),
                    format!("{path}.allow"),
                    "rule has no `allow`",
                    Some("write `- allow: { method: GET, path: \"/**\" }`"),
                ),
                Some(allow) => {
                    if let Some(r) = validate_rule(&format!("{path}.allow"), allow, c) {
                        rules.push(r);
                    }
                }
            }
        }
    }

    let mut deny_rules = Vec::new();
    if let Some(list) = &raw.deny_rules {
        if list.value.is_empty() {
            c.push(
                pos(list),
                format!("{base}.deny_rules"),
                "`deny_rules: []` is empty",
                Some("remove `deny_rules` if nothing needs denying"),
            );
        }
        for (i, rule) in list.value.iter().enumerate() {
            if let Some(r) = validate_rule(&format!("{base}.deny_rules[{i}]"), rule, c) {
                deny_rules.push(r);
            }
        }
    }

    let allow = match (&raw.access, &raw.rules) {
        (Some(a), Some(_)) => {
            c.push(
                pos(a),
                format!("{base}.access"),
                "`access` and `rules` are both set",
                Some("keep one: a preset (`access`) or explicit `rules`"),
            );
            return None;
        }
        (None, None) => {
            c.push(
                raw.protocol.as_ref().map_or(ROOT, pos),
                format!("{base}.protocol"),
                "`protocol: rest` needs `rules` or `access`",
                Some("add `access: read-only` (or `read-write`, `full`) or a `rules` list"),
            );
            return None;
        }
        (Some(_), None) => AllowSet::Access(access?),
        (None, Some(_)) => AllowSet::Rules(rules),
    };

    Some(RestPolicy {
        enforcement,
        allow,
        deny_rules,
        allow_encoded_slash: raw.allow_encoded_slash.as_ref().is_some_and(|b| b.value),
    })
}

fn validate_rule(
    base: &str,
    rule: &Spanned<RawRuleBody>,
    c: &mut Collector<'_>,
) -> Option<RequestRule> {
    let raw = &rule.value;
    let mut failed = false;
    for (field, name) in [
        (&raw.operation_type, "operation_type"),
        (&raw.operation_name, "operation_name"),
        (&raw.fields, "fields"),
        (&raw.tool, "tool"),
        (&raw.params, "params"),
    ] {
        if field.is_some() {
            failed = true;
        }
        unsupported(
            c,
            field,
            name,
            &format!("{base}.{name}"),
            "GraphQL and MCP rules are not implemented; match HTTP requests with `method`, `path` and `query`",
        );
    }
    if failed {
        return None;
    }
    if raw.method.is_none() && raw.path.is_none() && raw.query.is_none() {
        c.push(
            pos(rule),
            base,
            "empty rule `{}` matches nothing",
            Some("write at least `method` and `path`, e.g. `{ method: GET, path: \"/**\" }`"),
        );
        return None;
    }

    let method = match &raw.method {
        None => {
            c.push(
                pos(rule),
                format!("{base}.method"),
                "rule has no `method`",
                Some("write a method such as `GET`, or `\"*\"` for any method"),
            );
            None
        }
        Some(m) if m.value == "*" => Some("*".to_owned()),
        Some(m)
            if !m.value.is_empty()
                && m.value
                    .bytes()
                    .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_') =>
        {
            Some(m.value.to_ascii_uppercase())
        }
        Some(m) => {
            c.push(
                pos(m),
                format!("{base}.method"),
                format!("`{}` is not an HTTP method", m.value),
                Some("write a method such as `GET` or `POST`, or `\"*\"` for any method"),
            );
            None
        }
    };

    let path = match &raw.path {
        None => {
            c.push(
                pos(rule),
                format!("{base}.path"),
                "rule has no `path`",
                Some("write a path glob such as `\"/**\"` (any path) or `/api/v1/*`"),
            );
            None
        }
        Some(p) if !p.value.starts_with('/') && !p.value.starts_with('*') => {
            c.push(
                pos(p),
                format!("{base}.path"),
                format!("path `{}` does not start with `/`", p.value),
                Some("request paths are absolute, e.g. `/api/**`"),
            );
            None
        }
        Some(p) => match glob::path_glob(&p.value) {
            Ok(_) => Some(p.value.clone()),
            Err(e) => {
                c.push(
                    pos(p),
                    format!("{base}.path"),
                    format!(
                        "path `{}` is not a valid glob: {}",
                        p.value,
                        glob::describe(&e)
                    ),
                    Some("use `*` within one segment and `**` across segments"),
                );
                None
            }
        },
    };

    let mut query = BTreeMap::new();
    let mut query_ok = true;
    for (key, m) in raw.query.iter().flat_map(|q| q.value.iter()) {
        let field = format!("{base}.query.{key}");
        if key.is_empty() {
            c.push(
                pos(m),
                field,
                "empty query parameter name",
                Some("name the parameter"),
            );
            query_ok = false;
            continue;
        }
        let globs: &[String] = match &m.value {
            RawQueryMatcher::Glob(g) => std::slice::from_ref(g),
            RawQueryMatcher::Any(list) => {
                if list.is_empty() {
                    c.push(
                        pos(m),
                        format!("{field}.any"),
                        "`any: []` matches no value",
                        Some("list at least one glob, e.g. `any: [\"1.*\", \"2.*\"]`"),
                    );
                    query_ok = false;
                    continue;
                }
                list
            }
        };
        for g in globs {
            if let Err(e) = glob::value_glob(g) {
                c.push(
                    pos(m),
                    field.clone(),
                    format!("`{g}` is not a valid glob: {}", glob::describe(&e)),
                    Some("use `*` for any characters, `?` for one"),
                );
                query_ok = false;
            }
        }
        let matcher = match &m.value {
            RawQueryMatcher::Glob(g) => QueryMatcher::Glob(g.clone()),
            RawQueryMatcher::Any(list) => QueryMatcher::Any { any: list.clone() },
        };
        query.insert(key.clone(), matcher);
    }

    match (method, path, query_ok) {
        (Some(method), Some(path), true) => Some(RequestRule {
            method,
            path,
            query,
        }),
        _ => None,
    }
}
