//! `openshell sandbox ...`: create, exec, list, get and delete sandboxes through the gateway.

use std::{
    fmt::Write as _,
    io::IsTerminal as _,
    path::PathBuf,
    process::ExitCode,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};

use crate::{
    client::{Client, ClientError},
    config::Paths,
    gateway::api::{CreateSandbox, ExecRequest, SandboxInfo},
};

/// Environment variable naming the policy file used when `--policy` is not given.
pub const POLICY_ENV: &str = "OPENSHELL_SANDBOX_POLICY";

/// The built-in default policy (`policies/default.yaml`).
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.yaml");

/// Output format of the listing commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct OutputArg {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and run a command in it, attached to this terminal.
    Create {
        /// Sandbox name (generated and printed when omitted).
        #[arg(long)]
        name: Option<String>,
        /// Policy file (default: $OPENSHELL_SANDBOX_POLICY, else the built-in default policy).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Delete the sandbox when the command exits.
        #[arg(long)]
        no_keep: bool,
        #[command(flatten)]
        output: OutputArg,
        /// Command to run (default: your shell).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run another command in an existing sandbox.
    Exec {
        name: String,
        /// Command to run.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List sandboxes.
    List {
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show a sandbox, its static policy and its enforcement report.
    Get {
        name: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Delete sandboxes: kill every process, remove the cgroup and all state.
    Delete {
        /// Sandboxes to delete.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        names: Vec<String>,
        /// Delete every sandbox.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        output: OutputArg,
    },
}

fn client() -> anyhow::Result<Client> {
    let client = Client::new(Paths::from_env())?;
    client.ensure_running()?;
    Ok(client)
}

pub fn run(cmd: SandboxCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SandboxCommand::Create {
            name,
            policy,
            no_keep,
            output,
            command,
        } => create(name, policy, no_keep, output.output, command),
        SandboxCommand::Exec { name, command } => {
            let client = client()?;
            let code = exec(&client, &name, command)?;
            Ok(exit_code(code))
        }
        SandboxCommand::List { output } => {
            let list = client()?.list()?;
            match output.output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                OutputFormat::Table => print!("{}", render_list(&list, now_ms())),
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Get { name, output } => {
            let info = client()?.get(&name)?;
            match output.output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&info)?),
                OutputFormat::Table => print!("{}", render_get(&info)),
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Delete { names, all, output } => delete(names, all, output.output),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(255))
}

/// Reads the policy: `--policy`, else `$OPENSHELL_SANDBOX_POLICY`, else the built-in default.
/// Returns (source name for messages, text).
fn read_policy(flag: Option<PathBuf>) -> anyhow::Result<(String, String)> {
    let (path, origin) = match flag {
        Some(p) => (p, "--policy"),
        None => match std::env::var_os(POLICY_ENV).filter(|v| !v.is_empty()) {
            Some(p) => (PathBuf::from(p), POLICY_ENV),
            None => {
                return Ok((
                    "policies/default.yaml".to_owned(),
                    DEFAULT_POLICY.to_owned(),
                ));
            }
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the policy file {} (from {origin})", path.display()))?;
    Ok((path.display().to_string(), text))
}

fn create(
    name: Option<String>,
    policy: Option<PathBuf>,
    no_keep: bool,
    output: OutputFormat,
    command: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let (policy_source, policy) = read_policy(policy)?;
    let client = client()?;
    let created = client.create(&CreateSandbox {
        name,
        policy_source,
        policy,
        keep: !no_keep,
    });
    let info = match created {
        Ok(info) => info,
        // Validation errors are already complete `FILE:LINE:COL: error: ...` lines.
        Err(ClientError::Api { kind, message, .. }) if kind == "invalid_policy" => {
            eprintln!("{message}");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    let name = info.name.clone();
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&info)?),
        OutputFormat::Table => eprintln!("Created sandbox {name}"),
    }
    let command = if command.is_empty() {
        vec![
            std::env::var("SHELL")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "/bin/sh".to_owned()),
        ]
    } else {
        command
    };
    let result = exec(&client, &name, command);
    if let Err(ClientError::Launch(message)) = &result {
        // Nothing ran: the sandbox never became usable, so do not leave it behind.
        let _ = client.delete(&name);
        bail!("sandbox create failed: {message}");
    }
    let code = result?;
    if no_keep {
        client
            .delete(&name)
            .with_context(|| format!("deleting sandbox {name} (--no-keep)"))?;
        eprintln!("Deleted sandbox {name} (--no-keep)");
    }
    Ok(exit_code(code))
}

fn exec(client: &Client, name: &str, argv: Vec<String>) -> Result<i32, ClientError> {
    let tty = std::io::stdin().is_terminal();
    let (rows, cols) = if tty {
        crate::gateway::wire::window_size(std::os::fd::AsFd::as_fd(&std::io::stdin()))
            .unwrap_or((24, 80))
    } else {
        (0, 0)
    };
    let mut env = Vec::new();
    for key in ["TERM", "LANG", "LC_ALL", "COLORTERM"] {
        if let Ok(v) = std::env::var(key) {
            env.push((key.to_owned(), v));
        }
    }
    client.exec(
        name,
        &ExecRequest {
            argv,
            env,
            tty,
            rows,
            cols,
        },
    )
}

fn delete(names: Vec<String>, all: bool, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let client = client()?;
    let names = if all {
        client.list()?.into_iter().map(|s| s.name).collect()
    } else {
        names
    };
    let mut deleted = Vec::new();
    let mut failed = false;
    for name in names {
        match client.delete(&name) {
            Ok(()) => {
                if output == OutputFormat::Table {
                    println!("Deleted sandbox {name}");
                }
                deleted.push(name);
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
        }
    }
    if output == OutputFormat::Json {
        println!("{}", serde_json::json!({ "deleted": deleted }));
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `YYYY-MM-DD HH:MM:SS` UTC for a Unix time in milliseconds.
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn age(now_ms: i64, then_ms: i64) -> String {
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The `sandbox list` table.
pub fn render_list(list: &[SandboxInfo], now_ms: i64) -> String {
    let mut rows = vec![[
        "NAME".to_owned(),
        "STATUS".to_owned(),
        "PROCESSES".to_owned(),
        "POLICY".to_owned(),
        "AGE".to_owned(),
    ]];
    for s in list {
        rows.push([
            s.name.clone(),
            s.status.clone(),
            s.processes.to_string(),
            s.policy_source.clone(),
            age(now_ms, s.created_ms),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}   ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn paths_of(v: &serde_json::Value) -> String {
    match v.as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|p| p.as_str().unwrap_or("?").to_owned())
            .collect::<Vec<_>>()
            .join(", "),
        _ => "(none)".to_owned(),
    }
}

/// Renders a JSON value as indented `key: value` lines.
fn render_value(out: &mut String, indent: usize, key: &str, v: &serde_json::Value) {
    let pad = " ".repeat(indent);
    match v {
        serde_json::Value::Object(map) => {
            let _ = writeln!(out, "{pad}{key}:");
            for (k, v) in map {
                render_value(out, indent + 2, k, v);
            }
        }
        serde_json::Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            let items: Vec<String> = a.iter().map(scalar).collect();
            let shown = if items.is_empty() {
                "(none)".to_owned()
            } else {
                items.join(", ")
            };
            let _ = writeln!(out, "{pad}{key}: {shown}");
        }
        serde_json::Value::Array(a) => {
            let _ = writeln!(out, "{pad}{key}:");
            for (i, x) in a.iter().enumerate() {
                render_value(out, indent + 2, &format!("[{i}]"), x);
            }
        }
        other => {
            let _ = writeln!(out, "{pad}{key}: {}", scalar(other));
        }
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// The `sandbox get` text.
pub fn render_get(s: &SandboxInfo) -> String {
    let mut out = String::new();
    let p = &s.static_policy;
    let _ = writeln!(out, "Name:       {}", s.name);
    let _ = writeln!(
        out,
        "Status:     {} ({} process{})",
        s.status,
        s.processes,
        if s.processes == 1 { "" } else { "es" }
    );
    let _ = writeln!(out, "Created:    {} UTC", format_time(s.created_ms));
    let _ = writeln!(
        out,
        "Keep:       {}",
        if s.keep {
            "yes"
        } else {
            "no (deleted when its first command exits)"
        }
    );
    let _ = writeln!(out, "Policy:     {}", s.policy_source);
    let _ = writeln!(out, "Workdir:    {} (at /sandbox)", s.workdir);
    let _ = writeln!(out, "Cgroup:     {}", s.cgroup);
    let _ = writeln!(
        out,
        "Network:    {}",
        if s.network_enforced {
            "enforced (eBPF interceptor attached)"
        } else {
            "NOT enforced (no network interceptor attached)"
        }
    );
    let _ = writeln!(out, "Static policy:");
    let _ = writeln!(out, "  read_only:        {}", paths_of(&p["read_only"]));
    let _ = writeln!(out, "  read_write:       {}", paths_of(&p["read_write"]));
    let _ = writeln!(out, "  include_workdir:  {}", scalar(&p["include_workdir"]));
    let _ = writeln!(out, "  landlock:         {}", scalar(&p["compatibility"]));
    let _ = writeln!(
        out,
        "  run as:           {}:{}",
        scalar(&p["run_as_user"]),
        scalar(&p["run_as_group"])
    );
    match &s.report {
        Some(report) => render_value(&mut out, 0, "Enforcement (last launch)", report),
        None => {
            let _ = writeln!(out, "Enforcement (last launch): nothing launched yet");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, status: &str, processes: usize) -> SandboxInfo {
        SandboxInfo {
            name: name.to_owned(),
            status: status.to_owned(),
            processes,
            keep: true,
            policy_source: "policies/default.yaml".to_owned(),
            created_ms: 1_764_190_000_000,
            workdir: format!("/var/lib/openshell/sandboxes/{name}/work"),
            cgroup: format!("/sys/fs/cgroup/openshell/{name}"),
            static_policy: serde_json::json!({
                "read_only": ["/usr", "/lib", "/etc"],
                "read_write": ["/sandbox", "/tmp"],
                "include_workdir": false,
                "compatibility": "best_effort",
                "run_as_user": "sandbox",
                "run_as_group": "sandbox",
            }),
            report: Some(serde_json::json!({
                "landlock": {"status": "fully_enforced", "abi": 7},
                "seccomp": {"enforced": true},
                "warnings": [],
            })),
            network_enforced: false,
        }
    }

    #[test]
    fn list_table() {
        let list = [info("calm-otter-1a2b", "running", 2), info("x", "idle", 0)];
        insta::assert_snapshot!(render_list(&list, 1_764_190_125_000));
    }

    #[test]
    fn get_table() {
        insta::assert_snapshot!(render_get(&info("calm-otter-1a2b", "running", 1)));
    }

    #[test]
    fn time_format() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_764_190_125_000), "2025-11-26 20:48:45");
    }

    #[test]
    fn default_policy_is_embedded() {
        assert!(DEFAULT_POLICY.contains("version: 1"));
    }
}
