//! The `openshell` command line. Each command group lives in its own module.
//!
//! Exit codes are part of the interface (the seed's `policy set --wait` contract and
//! `policy check`): 0 success/allow, 1 failure/invalid, 2 bad arguments, 3 deny, 124 timeout.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod gateway;
pub mod logs;
pub mod policy;
pub mod revisions;
pub mod sandbox;
pub mod settings;
pub mod suggest;
pub mod term;

pub use policy::PolicyCommand;

/// Sandbox runtime for AI agents: network policy enforced with eBPF, filesystem and process
/// limits with Landlock and seccomp.
#[derive(Debug, Parser)]
#[command(name = "openshell", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start, stop and inspect the gateway daemon.
    #[command(subcommand)]
    Gateway(gateway::GatewayCommand),
    /// Show a sandbox's network decisions and the gateway's events; --tail follows them.
    Logs(logs::LogsArgs),
    /// Validate, check, get and set policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Create, run commands in, list, inspect and delete sandboxes.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
    /// A live dashboard: sandboxes, denials as they happen, and the block that would allow each.
    Term(term::TermArgs),
    /// Show what governs a sandbox: policy source and revision, static enforcement, gateway
    /// settings.
    #[command(subcommand)]
    Settings(settings::SettingsCommand),
    /// Internal: applies a sandbox's static restrictions and execs its program (started by the
    /// gateway; must stay single-threaded, so it runs before anything starts a runtime).
    #[command(name = "__sandbox-init", hide = true)]
    SandboxInit(crate::sandbox::InitArgs),
}

/// Runs the parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Gateway(cmd) => gateway::run(cmd),
        Command::Logs(args) => logs::run(&args),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Sandbox(cmd) => sandbox::run(cmd),
        Command::Term(args) => term::run(&args),
        Command::Settings(cmd) => settings::run(cmd),
        Command::SandboxInit(args) => Ok(crate::sandbox::init::main(&args)),
    }
}
