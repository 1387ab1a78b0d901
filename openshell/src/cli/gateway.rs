//! `openshell gateway start|stop|status`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use super::sandbox::{OutputArg, OutputFormat};
use crate::{
    client::Client,
    config::{GatewayConfig, Paths},
    gateway::{GatewayError, GatewayLock},
};

#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Start the gateway (in the background unless --foreground).
    ///
    /// State lives in /var/lib/openshell and the socket in /run/openshell; OPENSHELL_STATE_DIR
    /// moves both. Settings come from the TOML file named by OPENSHELL_GATEWAY_CONFIG
    /// ([gateway] cgroup_base, [dns] upstream/listen, [tls] extra_roots,
    /// [proxy] transparent_listen/http_listen).
    Start {
        /// Run in this process instead of detaching.
        #[arg(long)]
        foreground: bool,
    },
    /// Stop the gateway. Sandboxes and their processes keep running.
    Stop,
    /// Show whether the gateway runs, and where.
    Status {
        #[command(flatten)]
        output: OutputArg,
    },
}

pub fn run(cmd: GatewayCommand) -> anyhow::Result<ExitCode> {
    let paths = Paths::from_env();
    match cmd {
        GatewayCommand::Start { foreground: true } => {
            let config = GatewayConfig::from_env()?;
            match crate::gateway::run(&paths, &config) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(GatewayError::AlreadyRunning { pid, .. }) => {
                    eprintln!("gateway already running (pid {pid})");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        GatewayCommand::Start { foreground: false } => {
            // Check the settings here so that a mistake is reported to the user, not the log.
            GatewayConfig::from_env()?;
            let client = Client::new(paths)?;
            if client.is_running() || GatewayLock::is_held(client.paths()) {
                eprintln!("gateway already running");
                return Ok(ExitCode::SUCCESS);
            }
            let pid = client.start_background()?;
            eprintln!(
                "gateway started (pid {pid}); socket {}, log {}",
                client.paths().socket().display(),
                client.paths().log_file().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        GatewayCommand::Stop => {
            let client = Client::new(paths)?;
            if !client.is_running() {
                eprintln!("gateway is not running");
                return Ok(ExitCode::SUCCESS);
            }
            client.shutdown().context("stopping the gateway")?;
            eprintln!("gateway stopped");
            Ok(ExitCode::SUCCESS)
        }
        GatewayCommand::Status { output } => {
            let client = Client::new(paths)?;
            if !client.is_running() {
                match output.output {
                    OutputFormat::Json => println!("{}", serde_json::json!({ "running": false })),
                    OutputFormat::Table => println!("gateway is not running"),
                }
                return Ok(ExitCode::FAILURE);
            }
            let s = client.status()?;
            match output.output {
                OutputFormat::Json => {
                    let mut v = serde_json::to_value(&s)?;
                    v["running"] = serde_json::Value::Bool(true);
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                OutputFormat::Table => {
                    println!("gateway is running");
                    println!("  pid:        {}", s.pid);
                    println!("  version:    {}", s.version);
                    println!("  state:      {}", s.state_dir);
                    println!("  socket:     {}", s.socket);
                    println!("  cgroups:    {}", s.cgroup);
                    println!("  sandboxes:  {}", s.sandboxes);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
