//! `openshell settings get NAME [-o text|json]`: what governs a sandbox. The network policy in
//! force and where it comes from (the global policy or the sandbox's own revisions), the static
//! enforcement (Landlock ABI and status, seccomp, identity, as the launcher reported them at
//! the most recent launch) and the gateway settings that apply to every sandbox.

use std::{fmt::Write as _, process::ExitCode};

use clap::{Args, Subcommand};

use super::policy::OutputFormat;
use crate::{
    client::Client,
    config::Paths,
    gateway::api::{PolicySource, SandboxSettings},
};

#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// Show the effective policy source and revision, the static enforcement status and the
    /// gateway settings of a sandbox.
    Get(GetArgs),
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Sandbox name.
    pub name: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn run(cmd: SettingsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SettingsCommand::Get(args) => {
            let client = Client::new(Paths::from_env())?;
            client.ensure_running()?;
            let settings = client.settings(&args.name)?;
            match args.output {
                OutputFormat::Text => print!("{}", render_text(&settings)),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&settings)?),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(" ")
    }
}

/// What `settings get` prints.
#[must_use]
pub fn render_text(s: &SandboxSettings) -> String {
    let mut out = String::new();
    let p = &s.policy;
    let _ = writeln!(out, "sandbox:          {}", s.sandbox);
    let source = match p.source {
        PolicySource::Global => "global",
        PolicySource::Sandbox => "sandbox",
    };
    let _ = writeln!(
        out,
        "policy:           {source} revision {} ({}), sha256:{}",
        p.revision,
        p.status.as_str(),
        p.sha256
    );
    match (p.source, p.sandbox_revision) {
        (PolicySource::Global, Some(own)) => {
            let _ = writeln!(
                out,
                "  own revision    {own}, in force again after `openshell policy delete --global`"
            );
        }
        (PolicySource::Global, None) => {
            let _ = writeln!(out, "  own revision    -");
        }
        (PolicySource::Sandbox, _) => {}
    }
    let st = &s.static_enforcement;
    let _ = writeln!(
        out,
        "static:           landlock.compatibility {}, run as {}:{}",
        st.landlock_compatibility, st.run_as_user, st.run_as_group
    );
    match &st.launch {
        None => {
            let _ = writeln!(
                out,
                "  launch          not yet: Landlock and seccomp are reported at the first command"
            );
        }
        Some(l) => {
            let abi = if l.landlock_abi == 0 {
                "no Landlock in this kernel".to_owned()
            } else {
                format!("ABI {}", l.landlock_abi)
            };
            let _ = writeln!(
                out,
                "  landlock        {} ({abi}); scoped: {}",
                l.landlock_status,
                list_or_dash(&l.landlock_scoped)
            );
            for skipped in &l.landlock_skipped {
                let _ = writeln!(out, "  skipped         {skipped}");
            }
            if l.seccomp_enabled {
                let _ = writeln!(
                    out,
                    "  seccomp         enabled; {} calls blocked (EPERM); other ABIs: {}",
                    l.seccomp_blocked, l.seccomp_foreign_arch
                );
            } else {
                let _ = writeln!(out, "  seccomp         NOT enabled");
            }
            let _ = writeln!(
                out,
                "  no_new_privs    {}; uid {}, gid {}",
                if l.no_new_privs { "yes" } else { "NO" },
                l.uid,
                l.gid
            );
            for warning in &l.warnings {
                let _ = writeln!(out, "  warning         {warning}");
            }
        }
    }
    let g = &s.gateway;
    let _ = writeln!(out, "gateway:");
    let _ = writeln!(out, "  state dir       {}", g.state_dir);
    let access = g
        .socket_group
        .as_ref()
        .map_or_else(|| "root only".to_owned(), |grp| format!("group {grp}"));
    let _ = writeln!(out, "  socket          {} ({access})", g.socket);
    let _ = writeln!(out, "  cgroup base     {}", g.cgroup_base);
    let _ = writeln!(
        out,
        "  dns upstream    {} (from {})",
        list_or_dash(&g.dns_upstream),
        g.dns_upstream_from
    );
    let _ = writeln!(out, "  dns listen      {}", g.dns_listen);
    let _ = writeln!(out, "  proxy listen    {}", g.transparent_listen);
    let _ = writeln!(out, "  listening       {}", list_or_dash(&g.listening));
    let _ = writeln!(out, "  relay           {}", g.relay);
    let _ = writeln!(out, "  extra roots     {}", list_or_dash(&g.extra_roots));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        gateway::api::{EffectivePolicy, GatewaySettings, LaunchEnforcement, StaticEnforcement},
        sandbox::{Compatibility, LandlockStatus},
        store::RevisionStatus,
    };

    fn sample() -> SandboxSettings {
        SandboxSettings {
            sandbox: "agent".into(),
            policy: EffectivePolicy {
                source: PolicySource::Global,
                revision: 3,
                sha256: "ab".repeat(32),
                status: RevisionStatus::Loaded,
                created_ms: 1_795_727_280_123,
                sandbox_revision: Some(2),
            },
            static_enforcement: StaticEnforcement {
                landlock_compatibility: Compatibility::BestEffort,
                run_as_user: "sandbox".into(),
                run_as_group: "sandbox".into(),
                launch: Some(LaunchEnforcement {
                    landlock_abi: 7,
                    landlock_status: LandlockStatus::FullyEnforced,
                    landlock_scoped: vec!["abstract_unix_socket".into(), "signal".into()],
                    landlock_skipped: vec!["/data/models: does not exist".into()],
                    seccomp_enabled: true,
                    seccomp_blocked: 42,
                    seccomp_foreign_arch: "kill the process".into(),
                    no_new_privs: true,
                    uid: 999,
                    gid: 995,
                    warnings: vec!["landlock: skipping /data/models: does not exist".into()],
                }),
            },
            gateway: GatewaySettings {
                state_dir: "/var/lib/openshell".into(),
                socket: "/run/openshell/gateway.sock".into(),
                socket_group: None,
                cgroup_base: "/sys/fs/cgroup/openshell".into(),
                dns_upstream: vec!["198.18.0.10:53".into()],
                dns_upstream_from: "config".into(),
                dns_listen: "127.0.0.1:15053".into(),
                transparent_listen: "127.0.0.1:15001".into(),
                relay: "copy".into(),
                listening: vec![
                    "127.0.0.1:15001".into(),
                    "[::1]:15001".into(),
                    "127.0.0.1:15053".into(),
                    "[::1]:15053".into(),
                ],
                extra_roots: vec![],
            },
        }
    }

    #[test]
    fn text_under_a_global_policy_after_a_launch() {
        insta::assert_snapshot!(render_text(&sample()), @r"
            sandbox:          agent
            policy:           global revision 3 (loaded), sha256:abababababababababababababababababababababababababababababababab
              own revision    2, in force again after `openshell policy delete --global`
            static:           landlock.compatibility best_effort, run as sandbox:sandbox
              landlock        fully enforced (ABI 7); scoped: abstract_unix_socket signal
              skipped         /data/models: does not exist
              seccomp         enabled; 42 calls blocked (EPERM); other ABIs: kill the process
              no_new_privs    yes; uid 999, gid 995
              warning         landlock: skipping /data/models: does not exist
            gateway:
              state dir       /var/lib/openshell
              socket          /run/openshell/gateway.sock (root only)
              cgroup base     /sys/fs/cgroup/openshell
              dns upstream    198.18.0.10:53 (from config)
              dns listen      127.0.0.1:15053
              proxy listen    127.0.0.1:15001
              listening       127.0.0.1:15001 [::1]:15001 127.0.0.1:15053 [::1]:15053
              relay           copy
              extra roots     -
        ");
    }

    #[test]
    fn text_of_a_sandbox_policy_before_any_launch() {
        let mut s = sample();
        s.policy.source = PolicySource::Sandbox;
        s.policy.revision = 2;
        s.static_enforcement.launch = None;
        s.gateway.socket_group = Some("openshell".into());
        s.gateway.extra_roots = vec!["/etc/openshell/test-ca.pem".into()];
        insta::assert_snapshot!(render_text(&s), @r"
            sandbox:          agent
            policy:           sandbox revision 2 (loaded), sha256:abababababababababababababababababababababababababababababababab
            static:           landlock.compatibility best_effort, run as sandbox:sandbox
              launch          not yet: Landlock and seccomp are reported at the first command
            gateway:
              state dir       /var/lib/openshell
              socket          /run/openshell/gateway.sock (group openshell)
              cgroup base     /sys/fs/cgroup/openshell
              dns upstream    198.18.0.10:53 (from config)
              dns listen      127.0.0.1:15053
              proxy listen    127.0.0.1:15001
              listening       127.0.0.1:15001 [::1]:15001 127.0.0.1:15053 [::1]:15053
              relay           copy
              extra roots     /etc/openshell/test-ca.pem
        ");
    }

    #[test]
    fn json() {
        insta::assert_json_snapshot!(sample(), @r#"
            {
              "sandbox": "agent",
              "policy": {
                "source": "global",
                "revision": 3,
                "sha256": "abababababababababababababababababababababababababababababababab",
                "status": "loaded",
                "created_ms": 1795727280123,
                "sandbox_revision": 2
              },
              "static_enforcement": {
                "landlock_compatibility": "best_effort",
                "run_as_user": "sandbox",
                "run_as_group": "sandbox",
                "launch": {
                  "landlock_abi": 7,
                  "landlock_status": "fully_enforced",
                  "landlock_scoped": [
                    "abstract_unix_socket",
                    "signal"
                  ],
                  "landlock_skipped": [
                    "/data/models: does not exist"
                  ],
                  "seccomp_enabled": true,
                  "seccomp_blocked": 42,
                  "seccomp_foreign_arch": "kill the process",
                  "no_new_privs": true,
                  "uid": 999,
                  "gid": 995,
                  "warnings": [
                    "landlock: skipping /data/models: does not exist"
                  ]
                }
              },
              "gateway": {
                "state_dir": "/var/lib/openshell",
                "socket": "/run/openshell/gateway.sock",
                "socket_group": null,
                "cgroup_base": "/sys/fs/cgroup/openshell",
                "dns_upstream": [
                  "198.18.0.10:53"
                ],
                "dns_upstream_from": "config",
                "dns_listen": "127.0.0.1:15053",
                "transparent_listen": "127.0.0.1:15001",
                "listening": [
                  "127.0.0.1:15001",
                  "[::1]:15001",
                  "127.0.0.1:15053",
                  "[::1]:15053"
                ],
                "relay": "copy",
                "extra_roots": []
              }
            }
        "#);
    }
}
