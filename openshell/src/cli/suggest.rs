//! `openshell policy suggest NAME [-n N] [--since DURATION]`: the `network_policies` blocks that
//! would allow a sandbox's recent denials, ready to paste under `network_policies:` (see
//! [`crate::policy::suggest`] for how they are found).
//!
//! The denials come from the decision log (`Client::logs`), the policy from the revision in
//! force (`Client::policy_revisions`). DNS refusals carry no binary or port, so they are listed
//! by name only: a block for the name lets it resolve.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use clap::Args;

use super::{logs::MAX_LINES, revisions::comment_out_header};
use crate::{
    client::{Client, ClientError},
    config::Paths,
    policy::{self, Denial, DeniedRequest, Policy, Suggestions},
    store::{DecisionRecord, PolicyRevision, RevisionStatus},
};

/// Decisions read when `-n` is not given.
pub const DEFAULT_DECISIONS: usize = 1000;

#[derive(Debug, Args)]
pub struct SuggestArgs {
    /// Sandbox name.
    pub name: String,
    /// Look at the newest N decisions of the log.
    #[arg(short = 'n', long = "lines", default_value_t = DEFAULT_DECISIONS)]
    pub lines: usize,
    /// Only decisions younger than this (`30s`, `10m`, `2h`, `1d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
}

/// The revision in force: the loaded one, else the newest.
#[must_use]
pub fn in_force(revisions: &[PolicyRevision]) -> Option<&PolicyRevision> {
    revisions
        .iter()
        .find(|r| r.status == RevisionStatus::Loaded)
        .or_else(|| revisions.first())
}

/// The global policy's revision when one is in force: it then governs every sandbox, whatever
/// the sandbox's own revisions say.
pub fn global_in_force(client: &Client) -> Result<Option<PolicyRevision>, ClientError> {
    Ok(client
        .global_revisions()?
        .into_iter()
        .find(|r| r.status == RevisionStatus::Loaded))
}

/// Parses a stored revision (its metadata header, if any, is a comment).
pub fn revision_policy(sandbox: &str, rev: &PolicyRevision) -> anyhow::Result<Policy> {
    let source = format!("sandbox {sandbox} policy version {}", rev.version);
    policy::parse(&source, &comment_out_header(&rev.policy)).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `METHOD TARGET` at the start of an inspected request's reason (`POST /upload: ...` or
/// `POST /upload not permitted by block api`).
fn request_in_reason(reason: &str) -> Option<DeniedRequest> {
    let (method, rest) = reason.split_once(' ')?;
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    // `{request}: {reason}` puts a colon after the target (targets never contain a space).
    let target = match rest.split_once(' ') {
        Some((t, _)) => t.strip_suffix(':').unwrap_or(t),
        None => rest,
    };
    (target.starts_with('/') || target.contains("://")).then(|| DeniedRequest {
        method: method.to_owned(),
        target: target.to_owned(),
    })
}

/// The denial a decision-log entry records, if it is a denied connection or request with a
/// known binary and destination.
#[must_use]
pub fn denial_from_record(r: &DecisionRecord) -> Option<Denial> {
    if r.decision != "deny" {
        return None;
    }
    Some(Denial {
        binary: PathBuf::from(r.binary.as_ref()?),
        ancestors: r.ancestors.iter().map(PathBuf::from).collect(),
        host: r.host.clone().or_else(|| r.ip.clone())?,
        ip: r.ip.as_deref().and_then(|i| i.parse::<IpAddr>().ok()),
        port: r.port?,
        request: request_in_reason(&r.reason),
    })
}

/// What `policy suggest` prints.
#[must_use]
pub fn render(
    sandbox: &str,
    version: i64,
    records: &[DecisionRecord],
    suggestions: &Suggestions,
) -> String {
    let denied = records.iter().filter(|r| r.decision == "deny").count();
    let mut dns: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records {
        if r.decision == "deny"
            && r.binary.is_none()
            && let Some(host) = &r.host
        {
            *dns.entry(host).or_default() += 1;
        }
    }
    let mut out = format!(
        "# openshell policy suggest {sandbox}: {denied} denied of the {} decisions read, policy version {version}\n",
        records.len()
    );
    if suggestions.is_empty() {
        out.push_str("# no block to suggest\n");
    } else {
        out.push_str(
            "# Paste the blocks under `network_policies:`; a block marked \"replaces\" takes the place of the block with the same key.\n",
        );
        out.push_str(&suggestions.render());
    }
    if suggestions.already_allowed > 0 {
        let _ = writeln!(
            out,
            "# {} of the denials are allowed by policy version {version} already",
            suggestions.already_allowed
        );
    }
    for (host, count) in dns {
        let noun = if count == 1 { "refusal" } else { "refusals" };
        let _ = writeln!(
            out,
            "# {count} DNS {noun} for {host}: no binary or port is known until a block names the host"
        );
    }
    if suggestions.is_empty() && !suggestions.unresolved.is_empty() {
        // Already rendered as "not covered" lines by `Suggestions::render` otherwise.
        out.push_str(&suggestions.render());
    }
    out
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What `policy suggest` works from.
pub struct Loaded {
    /// The newest decisions, oldest first.
    pub records: Vec<DecisionRecord>,
    /// The revision in force and its policy.
    pub revision: PolicyRevision,
    pub policy: Policy,
    /// The revision is the global policy's (it governs every sandbox).
    pub global: bool,
}

/// The newest `lines` decisions of `name` younger than `since`, and the revision in force: the
/// global one while it is set, else the sandbox's own.
pub fn load(
    client: &Client,
    name: &str,
    lines: usize,
    since: Option<Duration>,
) -> anyhow::Result<Loaded> {
    let mut records = client
        .logs(name, lines.min(MAX_LINES))
        .with_context(|| format!("reading the decision log of sandbox {name:?}"))?;
    if let Some(since) = since {
        let cutoff = now_ms().saturating_sub(i64::try_from(since.as_millis()).unwrap_or(i64::MAX));
        records.retain(|r| r.time_ms >= cutoff);
    }
    let revisions = client
        .policy_revisions(name)
        .with_context(|| format!("reading the policy of sandbox {name:?}"))?;
    let global = global_in_force(client).context("reading the global policy")?;
    let is_global = global.is_some();
    let Some(revision) = global.or_else(|| in_force(&revisions).cloned()) else {
        anyhow::bail!("sandbox {name:?} has no policy revision");
    };
    let policy = revision_policy(name, &revision)?;
    Ok(Loaded {
        records,
        revision,
        policy,
        global: is_global,
    })
}

pub fn run(args: &SuggestArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(Paths::from_env())?;
    client.ensure_running()?;
    let Loaded {
        records,
        revision: rev,
        policy: current,
        global,
    } = load(&client, &args.name, args.lines, args.since)?;
    if global {
        eprintln!(
            "note: the global policy (version {}) governs every sandbox; add these blocks to it \
             (`openshell policy get --global --full`, then `openshell policy set --global`)",
            rev.version
        );
    }
    let denials: Vec<Denial> = records.iter().filter_map(denial_from_record).collect();
    let suggestions = policy::suggest(&current, &denials);
    print!(
        "{}",
        render(&args.name, rev.version, &records, &suggestions)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(binary: Option<&str>, host: &str, port: u16, reason: &str) -> DecisionRecord {
        DecisionRecord {
            time_ms: 1_795_727_280_123,
            sandbox: "agent".into(),
            decision: "deny".into(),
            binary: binary.map(str::to_owned),
            pid: Some(4242),
            ancestors: vec!["/usr/bin/bash".into()],
            host: Some(host.into()),
            ip: Some("198.18.0.10".into()),
            port: Some(port),
            block: None,
            reason: reason.into(),
            revision: Some(2),
        }
    }

    #[test]
    fn requests_are_read_from_inspected_reasons_only() {
        let req =
            |reason: &str| request_in_reason(reason).map(|r| format!("{} {}", r.method, r.target));
        assert_eq!(
            req("POST /upload not permitted by block api").as_deref(),
            Some("POST /upload")
        );
        assert_eq!(
            req("GET /a?b=1: request rejected on an endpoint of block api: bad").as_deref(),
            Some("GET /a?b=1")
        );
        assert_eq!(
            req("GET http://other.example/x: misdirected").as_deref(),
            Some("GET http://other.example/x")
        );
        assert_eq!(req("no endpoint matches pypi.org:443"), None);
        assert_eq!(
            req("CONNECT inside an inspected endpoint is not permitted"),
            None
        );
        assert_eq!(
            req("endpoint matches in block pypi but binary /usr/bin/curl is not listed"),
            None
        );
    }

    #[test]
    fn output_for_recent_denials() {
        let current = policy::parse(
            "p.yaml",
            "version: 1
network_policies:
  pypi:
    name: pypi
    endpoints:
      - host: pypi.org
        port: 443
    binaries:
      - { path: /usr/bin/pip }
  api:
    name: api
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        access: read-only
    binaries:
      - { path: /usr/bin/curl }
",
        )
        .unwrap();
        let mut allowed = record(
            Some("/usr/bin/pip"),
            "pypi.org",
            443,
            "endpoint and binary allowed by block pypi",
        );
        allowed.decision = "allow".into();
        let records = vec![
            record(
                Some("/usr/bin/curl"),
                "pypi.org",
                443,
                "endpoint matches in block pypi but binary /usr/bin/curl is not listed (ancestors: /usr/bin/bash)",
            ),
            record(
                Some("/usr/bin/curl"),
                "pypi.org",
                443,
                "endpoint matches in block pypi but binary /usr/bin/curl is not listed (ancestors: /usr/bin/bash)",
            ),
            record(
                Some("/usr/bin/git"),
                "github.com",
                443,
                "no endpoint matches github.com:443",
            ),
            record(
                Some("/usr/bin/curl"),
                "api.example.com",
                443,
                "POST /v1/items?draft=1 not permitted by block api",
            ),
            record(
                Some("/usr/bin/curl"),
                "127.0.0.1",
                8080,
                "destination 127.0.0.1 is a loopback address, which is always denied",
            ),
            record(
                None,
                "evil.example.net",
                53,
                "DNS query for evil.example.net: no block of the policy allows this name; answered NXDOMAIN without asking upstream",
            ),
            allowed,
        ];
        let denials: Vec<Denial> = records.iter().filter_map(denial_from_record).collect();
        assert_eq!(denials.len(), 5);
        let s = policy::suggest(&current, &denials);
        insta::assert_snapshot!(render("agent", 2, &records, &s));

        // Nothing denied.
        let none = policy::suggest(&current, &[]);
        insta::assert_snapshot!(render("agent", 2, &records[6..], &none), @r"
        # openshell policy suggest agent: 0 denied of the 1 decisions read, policy version 2
        # no block to suggest
        ");
    }
}
