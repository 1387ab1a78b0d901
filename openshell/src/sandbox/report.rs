//! What each enforcement step did, as the init process reports it before exec. `sandbox get`
//! shows it (JSON via serde, text via `Display`).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Compatibility;

/// The static enforcement in force for a sandboxed process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcementReport {
    /// cgroup v2 directory joined first, if any.
    pub cgroup: Option<PathBuf>,
    pub mount_namespace: MountReport,
    /// `PR_SET_NO_NEW_PRIVS` is set.
    pub no_new_privs: bool,
    pub capabilities: CapabilityReport,
    pub identity: IdentityReport,
    pub landlock: LandlockReport,
    pub seccomp: SeccompReport,
    /// Every warning printed on the program's stderr during setup, one line each.
    pub warnings: Vec<String>,
}

/// The private mount namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountReport {
    /// Mount events do not propagate between the sandbox and the host.
    pub private: bool,
    /// Host directory mounted at `/sandbox`.
    pub sandbox: PathBuf,
    /// Host directory mounted at `/tmp`.
    pub tmp: PathBuf,
}

/// Capability sets after the identity switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityReport {
    /// Capabilities dropped from the bounding set (all the kernel knows).
    pub bounding_dropped: u32,
    /// The bounding, ambient and inheritable sets are empty.
    pub bounding_ambient_inheritable_empty: bool,
    /// The effective and permitted sets are empty (checked after the uid switch).
    pub effective_permitted_empty: bool,
}

/// The user and group the program runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityReport {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
    /// Supplementary groups (only the primary group).
    pub groups: Vec<u32>,
}

/// How completely the Landlock ruleset is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockStatus {
    /// Every requested restriction is in force, including the ABI 6 scopes.
    FullyEnforced,
    /// The filesystem rules are in force but the kernel lacks part of what openshell asks for.
    PartiallyEnforced,
    /// The kernel has no Landlock; no filesystem restriction is in force.
    NotEnforced,
}

impl fmt::Display for LandlockStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FullyEnforced => "fully enforced",
            Self::PartiallyEnforced => "partially enforced",
            Self::NotEnforced => "not enforced",
        })
    }
}

/// Read-only or read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// Where a rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleOrigin {
    /// `filesystem_policy` of the user's policy.
    Policy,
    /// The baseline every sandbox gets (`/usr`, `/sandbox`, ...).
    Baseline,
    /// Device and process files programs need (`/dev/null`, `/proc`, the pty).
    Device,
}

/// One path Landlock allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockRule {
    pub path: PathBuf,
    pub access: Access,
    pub origin: RuleOrigin,
}

/// A user path that is not in the ruleset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedPath {
    pub path: PathBuf,
    pub access: Access,
    pub reason: String,
}

/// The Landlock step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockReport {
    /// The ABI the ruleset was built for (the kernel's, capped at what openshell knows); 0 when
    /// the kernel has no Landlock.
    pub abi: u32,
    pub status: LandlockStatus,
    pub compatibility: Compatibility,
    /// Abstract Unix sockets and signals are confined to the sandbox (ABI 6 and later).
    pub scoped: Vec<String>,
    /// The effective rules, user paths first.
    pub rules: Vec<LandlockRule>,
    /// User paths left out (best effort only), each with the reason.
    pub skipped: Vec<SkippedPath>,
}

/// The seccomp step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompReport {
    pub enabled: bool,
    /// System calls that always fail with EPERM.
    pub blocked: Vec<String>,
    /// System calls allowed only with some arguments (EPERM otherwise), with the rule.
    pub restricted: Vec<String>,
    /// System calls that fail with ENOSYS so that libc falls back to an older, filtered call.
    pub enosys: Vec<String>,
    /// What happens to a system call made through another ABI (x32, 32-bit).
    pub foreign_arch: String,
}

impl fmt::Display for EnforcementReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes_no = |b: bool| if b { "yes" } else { "NO" };
        if let Some(cgroup) = &self.cgroup {
            writeln!(f, "cgroup:           {}", cgroup.display())?;
        }
        let m = &self.mount_namespace;
        writeln!(
            f,
            "mount namespace:  {}; /sandbox <- {}, /tmp <- {}",
            if m.private { "private" } else { "shared" },
            m.sandbox.display(),
            m.tmp.display()
        )?;
        writeln!(f, "no_new_privs:     {}", yes_no(self.no_new_privs))?;
        let c = &self.capabilities;
        writeln!(
            f,
            "capabilities:     {} dropped from the bounding set; bounding/ambient/inheritable \
             empty: {}; effective/permitted empty: {}",
            c.bounding_dropped,
            yes_no(c.bounding_ambient_inheritable_empty),
            yes_no(c.effective_permitted_empty)
        )?;
        let i = &self.identity;
        let groups: Vec<String> = i.groups.iter().map(u32::to_string).collect();
        writeln!(
            f,
            "identity:         uid {} ({}), gid {} ({}), groups {}",
            i.uid,
            i.user,
            i.gid,
            i.group,
            groups.join(",")
        )?;
        let l = &self.landlock;
        let abi = if l.abi == 0 {
            "no Landlock in this kernel".to_owned()
        } else {
            format!("ABI {}", l.abi)
        };
        write!(
            f,
            "landlock:         {} ({abi}, {})",
            l.status, l.compatibility
        )?;
        if l.scoped.is_empty() {
            writeln!(f)?;
        } else {
            writeln!(f, "; scoped: {}", l.scoped.join(", "))?;
        }
        for (label, access) in [
            ("read-only", Access::ReadOnly),
            ("read-write", Access::ReadWrite),
        ] {
            let paths: Vec<String> = l
                .rules
                .iter()
                .filter(|r| r.access == access)
                .map(|r| r.path.display().to_string())
                .collect();
            writeln!(
                f,
                "  {label:<16}{}",
                if paths.is_empty() {
                    "-".into()
                } else {
                    paths.join(" ")
                }
            )?;
        }
        for skipped in &l.skipped {
            writeln!(
                f,
                "  skipped         {}: {}",
                skipped.path.display(),
                skipped.reason
            )?;
        }
        let s = &self.seccomp;
        if s.enabled {
            writeln!(
                f,
                "seccomp:          enabled; other ABIs: {}",
                s.foreign_arch
            )?;
            let blocked = s.blocked.join(" ");
            writeln!(
                f,
                "  blocked         {} calls (EPERM): {blocked}",
                s.blocked.len()
            )?;
            for rule in &s.restricted {
                writeln!(f, "  restricted      {rule}")?;
            }
            writeln!(f, "  ENOSYS          {}", s.enosys.join(" "))?;
        } else {
            writeln!(f, "seccomp:          NOT enabled")?;
        }
        for warning in &self.warnings {
            writeln!(f, "warning:          {warning}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(path: &str, access: Access, origin: RuleOrigin) -> LandlockRule {
        LandlockRule {
            path: path.into(),
            access,
            origin,
        }
    }

    /// A report as the init process produces it for the seed's static sections plus one missing
    /// user path under best effort.
    fn sample() -> EnforcementReport {
        EnforcementReport {
            cgroup: Some("/sys/fs/cgroup/openshell/sandboxes/demo".into()),
            mount_namespace: MountReport {
                private: true,
                sandbox: "/var/lib/openshell/sandboxes/demo/work".into(),
                tmp: "/var/lib/openshell/sandboxes/demo/tmp".into(),
            },
            no_new_privs: true,
            capabilities: CapabilityReport {
                bounding_dropped: 41,
                bounding_ambient_inheritable_empty: true,
                effective_permitted_empty: true,
            },
            identity: IdentityReport {
                user: "sandbox".into(),
                uid: 999,
                group: "sandbox".into(),
                gid: 995,
                groups: vec![995],
            },
            landlock: LandlockReport {
                abi: 7,
                status: LandlockStatus::FullyEnforced,
                compatibility: Compatibility::BestEffort,
                scoped: vec!["abstract_unix_socket".into(), "signal".into()],
                rules: vec![
                    rule("/usr", Access::ReadOnly, RuleOrigin::Policy),
                    rule("/sandbox", Access::ReadWrite, RuleOrigin::Policy),
                    rule("/etc", Access::ReadOnly, RuleOrigin::Baseline),
                    rule("/tmp", Access::ReadWrite, RuleOrigin::Baseline),
                    rule("/dev/null", Access::ReadWrite, RuleOrigin::Device),
                    rule("/dev/pts/3", Access::ReadWrite, RuleOrigin::Device),
                ],
                skipped: vec![SkippedPath {
                    path: "/data/models".into(),
                    access: Access::ReadOnly,
                    reason: "does not exist".into(),
                }],
            },
            seccomp: super::super::seccomp::describe(),
            warnings: vec![
                "landlock: skipping filesystem_policy.read_only path /data/models: does not exist \
                 (best_effort)"
                    .into(),
            ],
        }
    }

    #[test]
    fn text_rendering() {
        insta::assert_snapshot!(sample().to_string());
    }

    #[test]
    fn json_rendering() {
        insta::assert_json_snapshot!(sample());
    }

    #[test]
    fn text_rendering_without_landlock_or_seccomp() {
        let mut report = sample();
        report.cgroup = None;
        report.landlock.status = LandlockStatus::NotEnforced;
        report.landlock.abi = 0;
        report.landlock.scoped.clear();
        report.landlock.rules.clear();
        report.landlock.skipped.clear();
        report.seccomp.enabled = false;
        report.warnings = vec![
            "landlock: the kernel has no Landlock; filesystem_policy is NOT enforced (best_effort)"
                .into(),
        ];
        insta::assert_snapshot!(report.to_string());
    }
}
