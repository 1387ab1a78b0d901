//! Developer tasks for openshell: `cargo xtask <task>`.
//!
//! - `setup`  installs or checks everything a fresh machine needs (idempotent).
//! - `test`   runs setup, builds the workspace and runs every test (root runs the privileged ones).
//! - `demo`   runs setup and the main job: a sandbox whose policy allows one thing and denies another.
//! - `bench`  runs the benchmarks whose figures go to BENCHMARKS.md.
//! - `lint`   rustfmt check, clippy for the user-space crates and for the eBPF crate.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "openshell developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install or check the toolchain and packages (apt packages, nightly rust-src, bpf-linker).
    Setup {
        /// Only check; install nothing and fail if something is missing.
        #[arg(long)]
        check: bool,
    },
    /// Run setup, build the workspace and run all tests. Extra arguments go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run setup and the demo: a sandbox whose policy allows one request and denies another.
    Demo,
    /// Run the benchmarks (criterion and whole-system ones).
    Bench {
        /// Only run benchmarks whose name contains this.
        filter: Option<String>,
    },
    /// rustfmt check and clippy (user-space crates, then the eBPF crate on nightly).
    Lint,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root()?;
    match cli.task {
        Task::Setup { check } => setup::run(check),
        Task::Test { args } => {
            setup::run(false)?;
            test(&root, &args)
        }
        Task::Demo => {
            setup::run(false)?;
            demo(&root)
        }
        Task::Bench { filter } => {
            setup::run(false)?;
            bench(&root, filter.as_deref())
        }
        Task::Lint => lint(&root),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Runs `cmd`, failing with its command line when it does not succeed.
pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

const HOST_CRATES: &[&str] = &["--workspace", "--exclude", "openshell-ebpf"];

fn test(root: &Path, args: &[String]) -> Result<()> {
    if !setup::is_root() {
        eprintln!(
            "xtask: warning: not running as root: the privileged tests (eBPF, cgroups, Landlock, \
             network namespaces) will report that they skip. Run as root to run them."
        );
    }
    // The end-to-end tests run the real `openshell` binary, which `cargo test` does not build for
    // another package's tests.
    status(
        cargo(root)
            .args(["build", "--all-targets"])
            .args(HOST_CRATES),
    )?;
    status(
        cargo(root)
            .args(["test", "--no-fail-fast"])
            .args(HOST_CRATES)
            .args(args)
            .env("OPENSHELL_BIN", root.join("target/debug/openshell")),
    )
}

fn demo(root: &Path) -> Result<()> {
    if !setup::is_root() {
        bail!("the demo creates cgroups, eBPF programs and a network namespace: run it as root");
    }
    status(
        cargo(root)
            .args(["build", "-p", "openshell", "-p", "openshell-tests"])
            .args(["--bin", "openshell", "--bin", "openshell-demo"]),
    )?;
    status(
        Command::new(root.join("target/debug/openshell-demo"))
            .env("OPENSHELL_BIN", root.join("target/debug/openshell"))
            .current_dir(root),
    )
}

fn bench(root: &Path, filter: Option<&str>) -> Result<()> {
    let mut cmd = cargo(root);
    cmd.args(["bench"]).args(HOST_CRATES);
    if let Some(filter) = filter {
        cmd.args(["--", filter]);
    }
    status(&mut cmd)
}

fn lint(root: &Path) -> Result<()> {
    status(cargo(root).args(["fmt", "--all", "--", "--check"]))?;
    status(
        cargo(root)
            .args(["clippy", "--all-targets"])
            .args(HOST_CRATES)
            .args(["--", "-D", "warnings"]),
    )?;
    status(
        Command::new("rustup")
            .args(["run", "nightly", "cargo", "clippy", "-p", "openshell-ebpf"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"])
            .current_dir(root)
            .env("CARGO_TARGET_DIR", root.join("target/bpf-clippy")),
    )
}
