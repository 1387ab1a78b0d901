//! `openshell policy validate` and `openshell policy check`: the offline way to answer "is this
//! policy valid?" and "would this connection or request be allowed?".

use std::fs::File;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};

use crate::policy::{
    self, ConnectionQuery, Decision, HttpRequestQuery, MAX_POLICY_BYTES, Policy, PolicyErrors,
};

/// Exit code of `policy check` for a denied connection or request.
pub const EXIT_DENY: u8 = 3;
/// Exit code for bad arguments (clap uses it too).
pub const EXIT_BAD_ARGS: u8 = 2;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file; exit 0 when it is valid, 1 when it is not.
    Validate(ValidateArgs),
    /// Decide a connection (and optionally one HTTP request) against a policy file; exit 0 for
    /// allow (audit included), 3 for deny, 1 for an invalid policy, 2 for bad arguments.
    Check(CheckArgs),
    /// Put a new network policy in force on a running sandbox (or, with --global, on every
    /// sandbox); with --wait, exit 0 when it is loaded, 1 when it is invalid or failed to load,
    /// 124 on timeout.
    Set(super::revisions::SetArgs),
    /// Print a sandbox's policy or the global one (the one in force, or --rev N).
    Get(super::revisions::GetArgs),
    /// List a sandbox's (or the global) policy revisions, newest first.
    List(super::revisions::ListArgs),
    /// Print the network_policies blocks that would allow a sandbox's recent denials.
    Suggest(super::suggest::SuggestArgs),
    /// Delete the global policy (--global); every sandbox returns to its own.
    Delete(super::revisions::DeleteArgs),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The policy file.
    pub file: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The policy file.
    pub file: PathBuf,
    /// Absolute path of the executable that connects.
    #[arg(long)]
    pub binary: PathBuf,
    /// An ancestor executable (parent first); repeat for each.
    #[arg(long = "ancestor")]
    pub ancestors: Vec<PathBuf>,
    /// Destination host name or IP address.
    #[arg(long)]
    pub host: String,
    /// Destination TCP port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// The address the connection would go to (checked against destination safety and
    /// `allowed_ips`).
    #[arg(long)]
    pub ip: Option<IpAddr>,
    /// HTTP method of a request to check (needs --path).
    #[arg(long, requires = "path")]
    pub method: Option<String>,
    /// Request target as sent, query included, e.g. `/api/v1/download?slug=skill-a` (needs
    /// --method).
    #[arg(long, requires = "method")]
    pub path: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Validate(args) => validate(&args),
        PolicyCommand::Check(args) => check(&args),
        PolicyCommand::Set(args) => super::revisions::set(&args),
        PolicyCommand::Get(args) => super::revisions::get(&args),
        PolicyCommand::List(args) => super::revisions::list(&args),
        PolicyCommand::Suggest(args) => super::suggest::run(&args),
        PolicyCommand::Delete(args) => super::revisions::delete(&args),
    }
}

/// Reads and parses a policy file. Errors reading the file become a [`PolicyErrors`] too, so
/// they are printed the same way.
pub fn load(path: &Path) -> Result<Policy, PolicyErrors> {
    let name = path.display().to_string();
    let unreadable = |e: std::io::Error| {
        PolicyErrors::whole_file(
            &name,
            format!("cannot read the policy file: {e}"),
            "check the path and its permissions",
        )
    };
    let file = File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    // Read one byte past the limit so that an oversized file is detected without reading it all.
    file.take(MAX_POLICY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() > MAX_POLICY_BYTES {
        let len = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(policy::too_large(&name, len));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        PolicyErrors::whole_file(
            &name,
            format!(
                "the file is not UTF-8 (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
            "save the policy as UTF-8 text",
        )
    })?;
    policy::parse(&name, &text)
}

/// What `policy validate` prints.
pub fn render_validation(
    file: &str,
    result: &Result<Policy, PolicyErrors>,
    format: OutputFormat,
) -> anyhow::Result<String> {
    Ok(match (format, result) {
        (OutputFormat::Text, Ok(p)) => {
            let blocks = p.network.len();
            let noun = if blocks == 1 { "block" } else { "blocks" };
            format!("{file}: valid ({blocks} network {noun})\n")
        }
        (OutputFormat::Text, Err(errors)) => format!("{errors}\n"),
        (OutputFormat::Json, Ok(_)) => "[]\n".to_owned(),
        (OutputFormat::Json, Err(errors)) => {
            let mut s = serde_json::to_string_pretty(errors).context("encoding errors as JSON")?;
            s.push('\n');
            s
        }
    })
}

/// What `policy check` prints for a decision.
pub fn render_decision(decision: &Decision, format: OutputFormat) -> anyhow::Result<String> {
    Ok(match format {
        OutputFormat::Text => {
            let verdict = match (decision.is_allowed(), decision.audit) {
                (true, false) => "allow",
                (true, true) => "allow (audit: violation logged, not blocked)",
                (false, _) => "deny",
            };
            format!(
                "decision: {verdict}\nblock:    {}\nreason:   {}\n",
                decision.block.as_deref().unwrap_or("-"),
                decision.reason
            )
        }
        OutputFormat::Json => {
            let mut s = serde_json::to_string(decision).context("encoding the decision as JSON")?;
            s.push('\n');
            s
        }
    })
}

fn validate(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let result = load(&args.file);
    let name = args.file.display().to_string();
    print!("{}", render_validation(&name, &result, args.output)?);
    Ok(if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    if !args.binary.is_absolute() || args.ancestors.iter().any(|a| !a.is_absolute()) {
        eprintln!("error: --binary and --ancestor take absolute paths");
        return Ok(ExitCode::from(EXIT_BAD_ARGS));
    }
    let policy = match load(&args.file) {
        Ok(p) => p,
        Err(errors) => {
            let name = args.file.display().to_string();
            print!("{}", render_validation(&name, &Err(errors), args.output)?);
            return Ok(ExitCode::FAILURE);
        }
    };
    let compiled = policy.compile();
    let conn = ConnectionQuery {
        host: &args.host,
        port: args.port,
        binary: &args.binary,
        ancestors: &args.ancestors,
        dest_ip: args.ip,
    };
    let decision = match (&args.method, &args.path) {
        (Some(method), Some(target)) => {
            compiled.decide_request(&conn, &HttpRequestQuery { method, target })
        }
        _ => compiled.decide_connection(&conn),
    };
    print!("{}", render_decision(&decision, args.output)?);
    Ok(if decision.is_allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DENY)
    })
}
