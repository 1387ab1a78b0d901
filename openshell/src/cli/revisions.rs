//! `openshell policy set|get|list NAME`: iterate on the network policy of a running sandbox.
//!
//! `policy get --full` prints a metadata header as YAML comments (`# Version: 3`,
//! `# Hash: sha256:...`, `# Status: loaded`) before the policy, so its output can be edited and
//! fed back to `policy set` as it is. `policy set` also accepts the original OpenShell header
//! style (plain `Version:`/`Hash:`/`Status:` lines, optionally followed by `---`): it turns
//! those lines into comments, which keeps every line number of the file.
//!
//! Exit codes of `policy set --wait`: 0 loaded, 1 invalid or failed to load, 124 timed out or
//! no gateway reachable.
//!
//! `--global` instead of a sandbox name works on the global policy (see
//! [`crate::gateway::revisions`]): `policy set --global` asks for confirmation on a terminal
//! and, without a terminal, refuses unless `--yes` is given; `policy delete --global` removes
//! it.

use std::{
    fmt::Write as _,
    fs::File,
    io::{BufRead as _, IsTerminal as _, Read as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use super::{logs::rfc3339_ms, policy::OutputFormat};
use crate::{
    client::{Client, ClientError},
    config::Paths,
    gateway::{
        api::{DeleteGlobalResult, SetPolicy, SetPolicyResult},
        revisions::parse_global,
    },
    policy::{self, MAX_POLICY_BYTES, PolicyErrors},
    store::{PolicyRevision, RevisionInfo, RevisionStatus},
};

/// Exit code of `policy set --wait` when the revision did not load in time or the gateway is
/// unreachable.
pub const EXIT_TIMEOUT: u8 = 124;
/// Longest single wait of `policy set --wait` for the gateway to settle the revision.
const MAX_POLL: Duration = Duration::from_secs(10);
/// How often `policy set --global --wait` asks whether its revision has settled.
const GLOBAL_POLL: Duration = Duration::from_millis(20);
/// Keys of the metadata header of `policy get --full`.
const HEADER_KEYS: [&str; 3] = ["Version", "Hash", "Status"];

#[derive(Debug, Args)]
pub struct SetArgs {
    /// Sandbox name.
    #[arg(required_unless_present = "global", conflicts_with = "global")]
    pub name: Option<String>,
    /// Set the global policy: it replaces the network policy of every sandbox, existing and
    /// new, until `policy delete --global` (the file may hold only `network_policies`).
    #[arg(long)]
    pub global: bool,
    /// With --global: do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, requires = "global")]
    pub yes: bool,
    /// The policy file (static sections may be omitted; if present they must be unchanged).
    #[arg(long)]
    pub policy: PathBuf,
    /// Wait until the gateway loaded the revision (exit 0) or failed to (exit 1).
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait with --wait before giving up (exit 124).
    #[arg(long, default_value_t = 60, requires = "wait")]
    pub timeout: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum GetFormat {
    #[default]
    Yaml,
    Json,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Sandbox name.
    #[arg(required_unless_present = "global", conflicts_with = "global")]
    pub name: Option<String>,
    /// Print the global policy instead.
    #[arg(long)]
    pub global: bool,
    /// Print the metadata header (version, hash, status) as YAML comments before the policy.
    #[arg(long)]
    pub full: bool,
    /// The revision to show (default: the one in force).
    #[arg(long)]
    pub rev: Option<i64>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: GetFormat,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Sandbox name.
    #[arg(required_unless_present = "global", conflicts_with = "global")]
    pub name: Option<String>,
    /// List the global policy's revisions instead.
    #[arg(long)]
    pub global: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Delete the global policy (the only policy that can be deleted; a sandbox's revisions
    /// are its history). Every sandbox returns to its own latest loaded policy.
    #[arg(long, required = true)]
    pub global: bool,
}

/// What a policy command works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope<'a> {
    Sandbox(&'a str),
    Global,
}

impl<'a> Scope<'a> {
    fn new(name: Option<&'a str>, global: bool) -> Self {
        match (name, global) {
            (Some(name), false) => Self::Sandbox(name),
            // clap makes NAME and --global exclusive and one of them required.
            _ => Self::Global,
        }
    }

    /// Prefix of the messages about this scope.
    fn label(self) -> String {
        match self {
            Self::Sandbox(name) => format!("sandbox {name}"),
            Self::Global => "global".to_owned(),
        }
    }

    fn revisions(self, client: &Client) -> Result<Vec<PolicyRevision>, ClientError> {
        match self {
            Self::Sandbox(name) => client.policy_revisions(name),
            Self::Global => client.global_revisions(),
        }
    }

    /// Revision `version` once it is no longer pending or `wait` has passed. The gateway holds a
    /// sandbox's request until then; the global revisions are polled.
    fn revision_settled(
        self,
        client: &Client,
        version: i64,
        wait: Duration,
    ) -> Result<Option<RevisionInfo>, ClientError> {
        match self {
            Self::Sandbox(name) => client.revision_status(name, version, wait).map(Some),
            Self::Global => {
                std::thread::sleep(GLOBAL_POLL.min(wait));
                Ok(client
                    .global_revisions()?
                    .into_iter()
                    .find(|r| r.version == version)
                    .map(|r| r.info()))
            }
        }
    }

    fn submit(self, client: &Client, req: &SetPolicy) -> Result<SetPolicyResult, ClientError> {
        match self {
            Self::Sandbox(name) => client.set_policy(name, req),
            Self::Global => client.set_global_policy(req),
        }
    }
}

fn is_header_line(line: &str) -> bool {
    let line = line.trim_start_matches('#').trim();
    HEADER_KEYS.iter().any(|k| {
        line.strip_prefix(k)
            .is_some_and(|rest| rest.starts_with(':'))
    })
}

/// Turns a leading metadata header (commented or not, optionally ended by `---`) into YAML
/// comments, line for line.
#[must_use]
pub fn comment_out_header(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    while let Some(line) = rest.split_inclusive('\n').next() {
        if !is_header_line(line) {
            break;
        }
        if !line.starts_with('#') {
            out.push_str("# ");
        }
        out.push_str(line);
        rest = &rest[line.len()..];
    }
    // The header is over; the rest (from a `---` ending it, kept as a YAML document start) is
    // copied as it is.
    out.push_str(rest);
    out
}

/// `text` without its leading metadata header (and the `---` that may end it).
#[must_use]
pub fn strip_header(text: &str) -> &str {
    let mut rest = text;
    let mut stripped = false;
    while let Some(line) = rest.split_inclusive('\n').next() {
        if is_header_line(line) {
            rest = &rest[line.len()..];
            stripped = true;
        } else {
            if stripped && line.trim_end() == "---" {
                rest = &rest[line.len()..];
            }
            break;
        }
    }
    rest
}

fn hash(sha256: &str) -> String {
    format!("sha256:{sha256}")
}

/// What `policy get --full` prints.
#[must_use]
pub fn render_full(rev: &PolicyRevision) -> String {
    let mut out = format!(
        "# Version: {}\n# Hash: {}\n# Status: {}\n",
        rev.version,
        hash(&rev.sha256),
        rev.status.as_str()
    );
    if let Some(error) = &rev.error {
        for line in error.lines() {
            let _ = writeln!(out, "# Error: {line}");
        }
    }
    out.push_str(strip_header(&rev.policy));
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// What `policy list` prints: newest first, one revision a line.
#[must_use]
pub fn render_list(revisions: &[PolicyRevision]) -> String {
    let mut out = format!(
        "{:<8} {:<20} {:<11} {:<25} ERROR\n",
        "VERSION", "HASH", "STATUS", "CREATED"
    );
    for rev in revisions {
        let short: String = hash(&rev.sha256).chars().take(19).collect();
        let error = rev.error.as_deref().map_or_else(
            || "-".to_owned(),
            |e| e.lines().collect::<Vec<_>>().join("; "),
        );
        let _ = writeln!(
            out,
            "{:<8} {:<20} {:<11} {:<25} {error}",
            rev.version,
            short,
            rev.status.as_str(),
            rfc3339_ms(rev.created_ms)
        );
    }
    out
}

/// Reads a policy file as text, with the limits and messages of `policy validate`.
fn read_policy(path: &std::path::Path) -> Result<String, PolicyErrors> {
    let name = path.display().to_string();
    let unreadable = |e: std::io::Error| {
        PolicyErrors::whole_file(
            &name,
            format!("cannot read the policy file: {e}"),
            "check the path and its permissions",
        )
    };
    let file = File::open(path).map_err(unreadable)?;
    // Sized up front (`take` hides the size from `read_to_end`, which would then grow the
    // buffer a doubling at a time); the limit still bounds what is read.
    let size = file
        .metadata()
        .map_or(0, |m| m.len())
        .min(MAX_POLICY_BYTES as u64 + 1);
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0) + 1);
    file.take(MAX_POLICY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() > MAX_POLICY_BYTES {
        let len = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(policy::too_large(&name, len));
    }
    String::from_utf8(bytes).map_err(|e| {
        PolicyErrors::whole_file(
            &name,
            format!(
                "the file is not UTF-8 (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
            "save the policy as UTF-8 text",
        )
    })
}

fn unreachable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::NotRunning { .. } | ClientError::Transport { .. }
    )
}

/// Asks on the terminal whether to replace every sandbox's network policy; refuses without a
/// terminal. `Ok(true)` to go on.
fn confirm_global(client: &Client, file: &str) -> std::io::Result<bool> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        eprintln!(
            "error: refusing to set the global policy without confirmation (stdin is not a terminal): it replaces the network policy of every sandbox; pass --yes to confirm"
        );
        return Ok(false);
    }
    let count = client
        .list()
        .map_or_else(|_| "every".to_owned(), |l| format!("all {}", l.len()));
    let mut err = std::io::stderr().lock();
    write!(
        err,
        "The global policy from {file} replaces the network policy of {count} sandbox(es), and of every new one, until `openshell policy delete --global`. Continue? [y/N] "
    )?;
    err.flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

pub fn set(args: &SetArgs) -> anyhow::Result<ExitCode> {
    let scope = Scope::new(args.name.as_deref(), args.global);
    let source = args.policy.display().to_string();
    let text = match read_policy(&args.policy) {
        Ok(text) => comment_out_header(&text),
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let invalid = |errors: &dyn std::fmt::Display| {
        eprintln!("{errors}");
        match scope {
            Scope::Sandbox(name) => eprintln!("the policy of sandbox {name:?} is unchanged"),
            Scope::Global => eprintln!("the global policy is unchanged"),
        }
        ExitCode::FAILURE
    };
    // A sandbox's policy is validated by the gateway alone, which answers with the same
    // `FILE:LINE:COL` errors (parsing a large file is most of a reload's time, so it is done
    // once). A global policy is validated here first, before asking for confirmation.
    if scope == Scope::Global
        && let Err(errors) = parse_global(&source, &text)
    {
        return Ok(invalid(&errors));
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let client = Client::new(Paths::from_env())?;
    if scope == Scope::Global && !args.yes && !confirm_global(&client, &source)? {
        eprintln!("the global policy is unchanged");
        return Ok(ExitCode::FAILURE);
    }
    let request = SetPolicy {
        policy_source: source,
        policy: text,
    };
    let label = scope.label();
    let result = match scope.submit(&client, &request) {
        Ok(r) => r,
        // Validation errors are already complete `FILE:LINE:COL: error: ...` lines.
        Err(ClientError::Api { kind, message, .. }) if kind == "invalid_policy" => {
            return Ok(invalid(&message));
        }
        Err(e) => {
            // Without a gateway the file is still checked, so that an invalid one says why and
            // exits 1 as it would with a gateway.
            if unreachable(&e)
                && let Err(errors) = policy::parse(&request.policy_source, &request.policy)
            {
                return Ok(invalid(&errors));
            }
            eprintln!("error: {e}");
            let code = if args.wait && unreachable(&e) {
                EXIT_TIMEOUT
            } else {
                1
            };
            return Ok(ExitCode::from(code));
        }
    };
    let rev = result.revision;
    if result.unchanged {
        println!(
            "{label}: policy unchanged (version {} {}, {})",
            rev.version,
            hash(&rev.sha256),
            rev.status.as_str()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{label}: policy version {} {} {}",
        rev.version,
        hash(&rev.sha256),
        rev.status.as_str()
    );
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        // The gateway answers as soon as the revision settles (or after the wait).
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(MAX_POLL);
        let current = match scope.revision_settled(&client, rev.version, wait) {
            Ok(r) => r,
            Err(e) if unreachable(&e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(EXIT_TIMEOUT));
            }
            Err(e) => return Err(e).context("asking for the revision's status"),
        };
        match current.as_ref().map(|r| (r.status, r.error.as_deref())) {
            Some((RevisionStatus::Loaded | RevisionStatus::Superseded, _)) => {
                println!("{label}: policy version {} loaded", rev.version);
                return Ok(ExitCode::SUCCESS);
            }
            Some((RevisionStatus::Failed, error)) => {
                eprintln!(
                    "{label}: policy version {} failed to load; the previous policy stays in force:\n{}",
                    rev.version,
                    error.unwrap_or("(no error recorded)")
                );
                return Ok(ExitCode::FAILURE);
            }
            Some((RevisionStatus::Pending, _)) | None => {}
        }
        if Instant::now() >= deadline {
            eprintln!(
                "{label}: policy version {} still pending after {} s",
                rev.version, args.timeout
            );
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
    }
}

fn revisions(scope: Scope<'_>) -> anyhow::Result<Vec<PolicyRevision>> {
    let client = Client::new(Paths::from_env())?;
    client.ensure_running()?;
    Ok(scope.revisions(&client)?)
}

pub fn get(args: &GetArgs) -> anyhow::Result<ExitCode> {
    let scope = Scope::new(args.name.as_deref(), args.global);
    let revs = revisions(scope)?;
    let rev = match (args.rev, scope) {
        (Some(v), _) => revs.iter().find(|r| r.version == v),
        (None, Scope::Sandbox(_)) => revs
            .iter()
            .find(|r| r.status == RevisionStatus::Loaded)
            .or_else(|| revs.first()),
        (None, Scope::Global) => revs.iter().find(|r| r.status == RevisionStatus::Loaded),
    };
    let Some(rev) = rev else {
        match (scope, args.rev) {
            (Scope::Sandbox(name), v) => anyhow::bail!(
                "sandbox {name:?} has no policy revision {} (see `openshell policy list {name}`)",
                v.unwrap_or(1),
            ),
            (Scope::Global, Some(v)) => anyhow::bail!(
                "the global policy has no revision {v} (see `openshell policy list --global`)"
            ),
            (Scope::Global, None) => anyhow::bail!(
                "no global policy is in force (see `openshell policy list --global` for past ones)"
            ),
        }
    };
    match (args.output, args.full) {
        (GetFormat::Json, _) => println!("{}", serde_json::to_string_pretty(rev)?),
        (GetFormat::Yaml, true) => print!("{}", render_full(rev)),
        (GetFormat::Yaml, false) => print!("{}", strip_header(&rev.policy)),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let revs = revisions(Scope::new(args.name.as_deref(), args.global))?;
    match args.output {
        OutputFormat::Text => print!("{}", render_list(&revs)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&revs)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// What `policy delete --global` prints.
#[must_use]
pub fn render_delete(result: &DeleteGlobalResult) -> String {
    let Some(version) = result.deleted else {
        return "no global policy is in force; nothing changed\n".to_owned();
    };
    let mut out = format!("global: policy version {version} deleted\n");
    for (name, revision) in &result.restored {
        let _ = writeln!(
            out,
            "sandbox {name}: back on its own policy version {revision}"
        );
    }
    for (name, error) in &result.failed {
        let _ = writeln!(
            out,
            "sandbox {name}: its own policy could not be put back (it keeps the deleted global policy until the gateway restarts): {error}"
        );
    }
    out
}

/// `policy delete --global` (clap makes the flag required, so there is nothing else to read).
pub fn delete(_args: &DeleteArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(Paths::from_env())?;
    client.ensure_running()?;
    let result = client.delete_global_policy()?;
    print!("{}", render_delete(&result));
    Ok(if result.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(version: i64, status: RevisionStatus, error: Option<&str>) -> PolicyRevision {
        PolicyRevision {
            sandbox: Some("demo".to_owned()),
            version,
            sha256: format!("{version}").repeat(64),
            policy: "# Version: 1\n# Hash: sha256:x\n# Status: loaded\nversion: 1\nnetwork_policies: {}\n".to_owned(),
            status,
            error: error.map(str::to_owned),
            created_ms: 1_795_000_000_000 + version * 60_000,
        }
    }

    #[test]
    fn full_output_replaces_a_stored_header() {
        insta::assert_snapshot!(render_full(&rev(3, RevisionStatus::Loaded, None)), @r"
        # Version: 3
        # Hash: sha256:3333333333333333333333333333333333333333333333333333333333333333
        # Status: loaded
        version: 1
        network_policies: {}
        ");
    }

    #[test]
    fn list_output() {
        let revs = [
            rev(
                3,
                RevisionStatus::Failed,
                Some("p.yaml:5:9: error: bad\np.yaml:7:1: error: worse"),
            ),
            rev(2, RevisionStatus::Loaded, None),
            rev(1, RevisionStatus::Superseded, None),
        ];
        insta::assert_snapshot!(render_list(&revs), @r"
        VERSION  HASH                 STATUS      CREATED                   ERROR
        3        sha256:333333333333  failed      2026-11-18T11:09:40.000Z  p.yaml:5:9: error: bad; p.yaml:7:1: error: worse
        2        sha256:222222222222  loaded      2026-11-18T11:08:40.000Z  -
        1        sha256:111111111111  superseded  2026-11-18T11:07:40.000Z  -
        ");
    }

    #[test]
    fn delete_global_output() {
        let nothing = DeleteGlobalResult {
            deleted: None,
            restored: vec![],
            failed: vec![],
        };
        let done = DeleteGlobalResult {
            deleted: Some(2),
            restored: vec![("a".into(), 3), ("b".into(), 1)],
            failed: vec![(
                "c".into(),
                "sandbox \"c\" is not attached to the proxy".into(),
            )],
        };
        insta::assert_snapshot!(format!("{}{}", render_delete(&nothing), render_delete(&done)), @r#"
            no global policy is in force; nothing changed
            global: policy version 2 deleted
            sandbox a: back on its own policy version 3
            sandbox b: back on its own policy version 1
            sandbox c: its own policy could not be put back (it keeps the deleted global policy until the gateway restarts): sandbox "c" is not attached to the proxy
        "#);
    }

    #[test]
    fn original_header_style_becomes_comments_keeping_lines() {
        let original = "Version: 3\nHash: sha256:abc\nStatus: Loaded\n---\nversion: 1\n";
        let commented = comment_out_header(original);
        assert_eq!(
            commented,
            "# Version: 3\n# Hash: sha256:abc\n# Status: Loaded\n---\nversion: 1\n"
        );
        assert_eq!(commented.lines().count(), original.lines().count());
        policy::parse("p.yaml", &commented).unwrap();
        assert_eq!(strip_header(original), "version: 1\n");
        assert_eq!(strip_header(&commented), "version: 1\n");
        // A policy without a header is left alone.
        let plain = "# my notes\nversion: 1\n";
        assert_eq!(comment_out_header(plain), plain);
        assert_eq!(strip_header(plain), plain);
    }
}
