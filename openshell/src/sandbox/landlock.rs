//! Step 4: Landlock from `filesystem_policy`, the baseline paths and the device files, plus the
//! ABI 6 scopes that confine abstract Unix sockets and signals to the sandbox.
//!
//! The ruleset handles every filesystem right of the highest ABI the kernel offers (capped at
//! the newest ABI the `landlock` crate knows), so a path in no rule is inaccessible. It is built
//! with the crate's hard-requirement level: having asked for exactly what the kernel supports,
//! any incompatibility is a bug and must fail loudly instead of degrading silently.
//!
//! Compatibility (POLICY.md): a missing user path is skipped with one warning line under
//! `best_effort` and fails the launch under `hard_requirement`; a kernel below ABI 6 (no scopes)
//! or without Landlock warns or fails the same way. Missing baseline and device paths are
//! skipped silently in both modes. Paths are opened after the identity switch, so a path the
//! sandbox user may not even traverse counts as missing too.

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access as _, AccessFs, BitFlags, CompatLevel, Compatible as _, PathBeneath, PathFd,
    RestrictionStatus, Ruleset, RulesetAttr as _, RulesetCreatedAttr as _, RulesetStatus, Scope,
};
use nix::sys::stat::SFlag;

use super::Compatibility;
use super::error::{SetupError, Step};
use super::report::{
    Access, LandlockReport, LandlockRule, LandlockStatus, RuleOrigin, SkippedPath,
};
use super::spec::{FsRules, SANDBOX_DIR, TMP_DIR};

const STEP: Step = Step::Landlock;

/// The ABI that brings everything openshell asks Landlock for (scopes came with ABI 6).
pub const REQUIRED_ABI: u32 = 6;

/// Baseline paths every sandbox gets; skipped silently when missing.
const BASELINE: &[(&str, Access)] = &[
    ("/usr", Access::ReadOnly),
    ("/lib", Access::ReadOnly),
    ("/etc", Access::ReadOnly),
    ("/var/log", Access::ReadOnly),
    ("/app", Access::ReadOnly),
    (SANDBOX_DIR, Access::ReadWrite),
    (TMP_DIR, Access::ReadWrite),
];

/// Device and process files programs need; skipped silently when missing.
const DEVICES: &[(&str, Access)] = &[
    ("/proc", Access::ReadOnly),
    ("/dev/urandom", Access::ReadOnly),
    ("/dev/random", Access::ReadOnly),
    ("/dev/zero", Access::ReadOnly),
    ("/dev/null", Access::ReadWrite),
    ("/dev/full", Access::ReadWrite),
    ("/dev/tty", Access::ReadWrite),
];

/// Added only where they are real directories, not links into `/usr` (a link's target is
/// covered by `/usr` already).
const REAL_DIRS: &[&str] = &["/bin", "/sbin", "/lib64"];

/// One path to allow, before it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Planned {
    pub path: PathBuf,
    pub access: Access,
    pub origin: RuleOrigin,
}

/// The rules in the order they are reported: the policy's, the baseline, the devices. A path
/// listed twice is kept once with the wider access.
pub(crate) fn plan(fs: &FsRules, cwd: &Path, terminals: &[PathBuf]) -> Vec<Planned> {
    let mut planned: Vec<Planned> = Vec::new();
    let mut push = |path: &Path, access: Access, origin: RuleOrigin| {
        if let Some(existing) = planned.iter_mut().find(|p| p.path == path) {
            existing.access = existing.access.max(access);
        } else {
            planned.push(Planned {
                path: path.to_path_buf(),
                access,
                origin,
            });
        }
    };
    for path in &fs.read_only {
        push(path, Access::ReadOnly, RuleOrigin::Policy);
    }
    for path in &fs.read_write {
        push(path, Access::ReadWrite, RuleOrigin::Policy);
    }
    if fs.include_workdir {
        push(cwd, Access::ReadWrite, RuleOrigin::Policy);
    }
    for (path, access) in BASELINE {
        push(Path::new(path), *access, RuleOrigin::Baseline);
    }
    for dir in REAL_DIRS {
        if std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
            push(Path::new(dir), Access::ReadOnly, RuleOrigin::Baseline);
        }
    }
    for (path, access) in DEVICES {
        push(Path::new(path), *access, RuleOrigin::Device);
    }
    for tty in terminals {
        push(tty, Access::ReadWrite, RuleOrigin::Device);
    }
    planned
}

/// The terminals among the standard fds (the sandbox's own pty), to allow them read-write.
pub(crate) fn terminals() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for fd in 0..=2 {
        // SAFETY: fds 0-2 stay open for the whole life of the init process.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if !nix::unistd::isatty(borrowed).unwrap_or(false) {
            continue;
        }
        if let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            && path.starts_with("/dev/")
            && !found.contains(&path)
        {
            found.push(path);
        }
    }
    found
}

/// What the Landlock step produced: the report and the warning lines to print.
pub(crate) struct Applied {
    pub report: LandlockReport,
    pub warnings: Vec<String>,
}

/// The kernel's Landlock ABI version, 0 without Landlock.
pub(crate) fn kernel_abi() -> u32 {
    // SAFETY: with a NULL attribute, size 0 and LANDLOCK_CREATE_RULESET_VERSION the call only
    // returns the ABI version (or -1); it reads and writes no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    u32::try_from(v).unwrap_or(0)
}

/// Builds the ruleset and restricts the calling (single-threaded) process with it.
pub(crate) fn apply(
    planned: &[Planned],
    compatibility: Compatibility,
    kernel: u32,
) -> Result<Applied, SetupError> {
    let hard = compatibility == Compatibility::HardRequirement;
    let mut warnings = Vec::new();
    let mut skipped = Vec::new();
    let mut opened = Vec::new();
    for rule in planned {
        match PathFd::new(&rule.path) {
            Ok(fd) => opened.push((rule, fd)),
            Err(err) if rule.origin == RuleOrigin::Policy => {
                let reason = open_failure(&err);
                let field = match rule.access {
                    Access::ReadOnly => "read_only",
                    Access::ReadWrite => "read_write",
                };
                if hard {
                    return Err(SetupError::new(
                        STEP,
                        format!(
                            "this filesystem_policy.{field} path {reason}, and \
                             landlock.compatibility is hard_requirement. Create the path, remove it \
                             from the policy, or set landlock.compatibility: best_effort"
                        ),
                    )
                    .at(&rule.path));
                }
                warnings.push(format!(
                    "landlock: skipping filesystem_policy.{field} path {}: {reason} (best_effort)",
                    rule.path.display()
                ));
                skipped.push(SkippedPath {
                    path: rule.path.clone(),
                    access: rule.access,
                    reason,
                });
            }
            // Baseline and device paths that are missing are skipped silently (POLICY.md).
            Err(_) => {}
        }
    }

    let Some(abi) = usable_abi(kernel) else {
        if hard {
            return Err(SetupError::new(
                STEP,
                "the kernel has no Landlock, and landlock.compatibility is hard_requirement. Boot a \
                 kernel with Landlock enabled (lsm=landlock,...) or set best_effort",
            ));
        }
        warnings.push(
            "landlock: the kernel has no Landlock; filesystem_policy is NOT enforced (best_effort)"
                .to_owned(),
        );
        return Ok(Applied {
            report: LandlockReport {
                abi: 0,
                status: LandlockStatus::NotEnforced,
                compatibility,
                scoped: Vec::new(),
                rules: Vec::new(),
                skipped,
            },
            warnings,
        });
    };
    if kernel < REQUIRED_ABI {
        if hard {
            return Err(SetupError::new(
                STEP,
                format!(
                    "the kernel offers Landlock ABI {kernel}, openshell needs ABI {REQUIRED_ABI} to \
                     confine abstract Unix sockets and signals, and landlock.compatibility is \
                     hard_requirement. Use Linux 6.12 or later, or set best_effort"
                ),
            ));
        }
        warnings.push(format!(
            "landlock: the kernel offers ABI {kernel} < {REQUIRED_ABI}; abstract Unix sockets and \
             signals are NOT confined to the sandbox (best_effort)"
        ));
    }

    let status = restrict(abi, &opened)?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(SetupError::new(
            STEP,
            format!(
                "the kernel enforced the ruleset only as {:?}",
                status.ruleset
            ),
        ));
    }
    let scoped = if abi >= ABI::V6 {
        vec!["abstract_unix_socket".to_owned(), "signal".to_owned()]
    } else {
        Vec::new()
    };
    Ok(Applied {
        report: LandlockReport {
            abi: abi as u32,
            status: if kernel >= REQUIRED_ABI {
                LandlockStatus::FullyEnforced
            } else {
                LandlockStatus::PartiallyEnforced
            },
            compatibility,
            scoped,
            rules: opened
                .iter()
                .map(|(rule, _)| LandlockRule {
                    path: rule.path.clone(),
                    access: rule.access,
                    origin: rule.origin,
                })
                .collect(),
            skipped,
        },
        warnings,
    })
}

/// The crate's ABI for the kernel's version, capped at the newest the crate knows.
fn usable_abi(kernel: u32) -> Option<ABI> {
    let abi = ABI::from(i32::try_from(kernel).unwrap_or(i32::MAX));
    (abi != ABI::Unsupported).then_some(abi)
}

fn restrict(abi: ABI, opened: &[(&Planned, PathFd)]) -> Result<RestrictionStatus, SetupError> {
    let fail =
        |what: &str, e: landlock::RulesetError| SetupError::new(STEP, format!("{what}: {e}"));
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| fail("handling the filesystem rights", e))?;
    if abi >= ABI::V6 {
        ruleset = ruleset
            .scope(Scope::from_all(abi))
            .map_err(|e| fail("scoping abstract Unix sockets and signals", e))?;
    }
    let mut created = ruleset
        .create()
        .map_err(|e| fail("creating the ruleset", e))?;
    for (rule, fd) in opened {
        let access = rights(abi, rule.access, is_dir(fd));
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| fail(&format!("adding a rule for {}", rule.path.display()), e))?;
    }
    created
        .restrict_self()
        .map_err(|e| fail("landlock_restrict_self", e))
}

fn rights(abi: ABI, access: Access, dir: bool) -> BitFlags<AccessFs> {
    let rights = match access {
        Access::ReadOnly => AccessFs::from_read(abi),
        Access::ReadWrite => AccessFs::from_all(abi),
    };
    // Directory-only rights on a file make the kernel reject the rule.
    if dir {
        rights
    } else {
        rights & AccessFs::from_file(abi)
    }
}

fn is_dir(fd: &PathFd) -> bool {
    nix::sys::stat::fstat(fd.as_fd())
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
}

fn open_failure(err: &landlock::PathFdError) -> String {
    let landlock::PathFdError::OpenCall { source, .. } = err else {
        return err.to_string();
    };
    match source.raw_os_error() {
        Some(libc::ENOENT) => "does not exist".to_owned(),
        Some(libc::ENOTDIR) => "does not exist (a parent is not a directory)".to_owned(),
        Some(libc::EACCES) => "is not reachable by the sandbox user (permission denied)".to_owned(),
        _ => format!("cannot be opened ({source})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_merges_duplicates_and_keeps_the_wider_access() {
        let fs = FsRules {
            read_only: vec!["/usr".into(), "/data".into()],
            read_write: vec!["/sandbox".into(), "/data".into()],
            include_workdir: false,
        };
        let planned = plan(&fs, Path::new("/sandbox"), &["/dev/pts/3".into()]);
        let find = |p: &str| planned.iter().find(|r| r.path == Path::new(p)).cloned();
        assert_eq!(
            find("/data"),
            Some(Planned {
                path: "/data".into(),
                access: Access::ReadWrite,
                origin: RuleOrigin::Policy
            })
        );
        // The policy names /usr itself, so it counts as the policy's.
        assert_eq!(find("/usr").map(|r| r.origin), Some(RuleOrigin::Policy));
        assert_eq!(find("/etc").map(|r| r.origin), Some(RuleOrigin::Baseline));
        assert_eq!(
            find("/dev/pts/3").map(|r| r.access),
            Some(Access::ReadWrite)
        );
        assert_eq!(
            planned
                .iter()
                .filter(|r| r.path == Path::new("/sandbox"))
                .count(),
            1
        );
        // User paths come first.
        assert_eq!(planned[0].path, Path::new("/usr"));
    }

    #[test]
    fn include_workdir_adds_cwd() {
        let fs = FsRules {
            include_workdir: true,
            ..FsRules::default()
        };
        let planned = plan(&fs, Path::new("/work/project"), &[]);
        assert_eq!(planned[0].path, Path::new("/work/project"));
        assert_eq!(planned[0].access, Access::ReadWrite);
    }

    #[test]
    fn links_into_usr_are_not_added() {
        let planned = plan(&FsRules::default(), Path::new("/sandbox"), &[]);
        for dir in REAL_DIRS {
            let real = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
            assert_eq!(
                planned.iter().any(|r| r.path == Path::new(dir)),
                real,
                "{dir}"
            );
        }
    }

    fn applied_error(kernel: u32) -> SetupError {
        match apply(&[], Compatibility::HardRequirement, kernel) {
            Ok(_) => panic!("hard_requirement accepted kernel ABI {kernel}"),
            Err(err) => err,
        }
    }

    // These never reach landlock_restrict_self: the checks come first.
    #[test]
    fn hard_requirement_refuses_an_old_or_missing_landlock() {
        let err = applied_error(5);
        assert_eq!(err.step, Step::Landlock);
        assert!(
            err.message
                .starts_with("the kernel offers Landlock ABI 5, openshell needs ABI 6"),
            "{err}"
        );
        let err = applied_error(0);
        assert!(
            err.message.starts_with("the kernel has no Landlock"),
            "{err}"
        );
    }

    #[test]
    fn best_effort_without_landlock_warns_and_reports_not_enforced() {
        let planned = plan(&FsRules::default(), Path::new("/sandbox"), &[]);
        let applied = apply(&planned, Compatibility::BestEffort, 0).unwrap();
        assert_eq!(applied.report.status, LandlockStatus::NotEnforced);
        assert_eq!(applied.report.abi, 0);
        assert_eq!(
            applied.warnings,
            [
                "landlock: the kernel has no Landlock; filesystem_policy is NOT enforced (best_effort)"
            ]
        );
    }

    #[test]
    fn hard_requirement_names_the_missing_user_path() {
        let fs = FsRules {
            read_only: vec!["/openshell-no-such-dir".into()],
            ..FsRules::default()
        };
        let planned = plan(&fs, Path::new("/sandbox"), &[]);
        let err = match apply(&planned, Compatibility::HardRequirement, 7) {
            Ok(_) => panic!("a missing path was accepted"),
            Err(err) => err,
        };
        assert_eq!(
            err.path.as_deref(),
            Some(Path::new("/openshell-no-such-dir"))
        );
        assert!(
            err.message
                .starts_with("this filesystem_policy.read_only path does not exist")
        );
    }

    #[test]
    fn file_rules_get_file_rights_only() {
        let abi = ABI::V5;
        assert_eq!(
            rights(abi, Access::ReadWrite, false),
            AccessFs::from_file(abi)
        );
        assert_eq!(
            rights(abi, Access::ReadOnly, true),
            AccessFs::from_read(abi)
        );
        assert!(!rights(abi, Access::ReadOnly, false).contains(AccessFs::ReadDir));
    }
}
