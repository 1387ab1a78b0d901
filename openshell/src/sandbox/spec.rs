//! What to launch and under which static restrictions, plus the checks that run before anything
//! is forked.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SandboxError;
// The policy language's limits, checked again for specs that do not come from a policy file.
use crate::policy::{MAX_FILESYSTEM_PATHS as MAX_PATHS, MAX_PATH_LEN};

/// Mount point of the sandbox's working directory inside the sandbox.
pub const SANDBOX_DIR: &str = "/sandbox";
/// Mount point of the sandbox's private temporary directory inside the sandbox.
pub const TMP_DIR: &str = "/tmp";

/// A program to run in a sandbox and the static restrictions it runs under.
///
/// Every path except `workdir`, `tmpdir`, `cgroup_dir` and `init_program` is seen from inside the
/// sandbox, where `workdir` is mounted at `/sandbox` and `tmpdir` at `/tmp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// Program and arguments. A program without a `/` is looked up in the `PATH` of `env`
    /// (default `/usr/local/bin:/usr/bin:/bin`), inside the sandbox.
    pub argv: Vec<OsString>,
    /// The complete environment of the program; nothing is inherited from the caller.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory inside the sandbox, normally `/sandbox`.
    pub cwd: PathBuf,
    /// cgroup v2 directory that the process joins before anything else.
    pub cgroup_dir: Option<PathBuf>,
    /// Host directory mounted at `/sandbox`. The launcher makes it owned by the sandbox user.
    pub workdir: PathBuf,
    /// Host directory mounted at `/tmp`. The launcher makes it `root:root` with mode 1777.
    pub tmpdir: PathBuf,
    /// `filesystem_policy`: what Landlock lets the program read and write.
    pub filesystem: FsRules,
    /// `landlock.compatibility`.
    pub compatibility: Compatibility,
    /// `process.run_as_user`: a name or a numeric uid; root is refused.
    pub run_as_user: String,
    /// `process.run_as_group`: a name or a numeric gid; root is refused.
    pub run_as_group: String,
    /// The openshell binary, re-executed as `openshell __sandbox-init` to apply the restrictions.
    pub init_program: PathBuf,
    /// A host file shown read-only over an existing file inside the sandbox (the gateway puts
    /// the sandbox's CA bundle over the distro's default CA path).
    #[serde(default)]
    pub read_only_bind: Option<ReadOnlyBind>,
}

/// A host file bind-mounted read-only (`nosuid,nodev`) over an existing file in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOnlyBind {
    /// The host file.
    pub source: PathBuf,
    /// The file it covers, seen from inside the sandbox.
    pub target: PathBuf,
}

/// `filesystem_policy` as the launcher applies it (paths inside the sandbox).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRules {
    /// Readable and executable.
    pub read_only: Vec<PathBuf>,
    /// Readable, writable and executable.
    pub read_write: Vec<PathBuf>,
    /// Add the program's working directory (`cwd`) to `read_write`.
    pub include_workdir: bool,
}

/// `landlock.compatibility`: what happens when a user path or a kernel feature is missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compatibility {
    /// Skip missing user paths with a warning; run with the Landlock ABI the kernel offers.
    #[default]
    BestEffort,
    /// Fail before the program runs if a user path is missing or the kernel lacks the ABI.
    HardRequirement,
}

impl std::fmt::Display for Compatibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::BestEffort => "best_effort",
            Self::HardRequirement => "hard_requirement",
        })
    }
}

impl From<crate::policy::Compatibility> for Compatibility {
    fn from(value: crate::policy::Compatibility) -> Self {
        match value {
            crate::policy::Compatibility::BestEffort => Self::BestEffort,
            crate::policy::Compatibility::HardRequirement => Self::HardRequirement,
        }
    }
}

impl From<&crate::policy::FilesystemPolicy> for FsRules {
    fn from(policy: &crate::policy::FilesystemPolicy) -> Self {
        Self {
            read_only: policy.read_only.clone(),
            read_write: policy.read_write.clone(),
            include_workdir: policy.include_workdir,
        }
    }
}

impl LaunchSpec {
    /// A spec with the defaults of the policy language: cwd `/sandbox`, user and group `sandbox`,
    /// best effort, no extra filesystem rules, no cgroup.
    pub fn new(
        argv: Vec<OsString>,
        workdir: PathBuf,
        tmpdir: PathBuf,
        init_program: PathBuf,
    ) -> Self {
        Self {
            argv,
            env: Vec::new(),
            cwd: PathBuf::from(SANDBOX_DIR),
            cgroup_dir: None,
            workdir,
            tmpdir,
            filesystem: FsRules::default(),
            compatibility: Compatibility::default(),
            run_as_user: super::identity::DEFAULT_ACCOUNT.to_owned(),
            run_as_group: super::identity::DEFAULT_ACCOUNT.to_owned(),
            init_program,
            read_only_bind: None,
        }
    }

    /// Checks everything that can be checked without touching the sandbox: shapes of paths,
    /// strings that cannot reach `execve`, rule combinations Landlock cannot express.
    pub fn validate(&self) -> Result<(), SandboxError> {
        let Some(program) = self.argv.first() else {
            return Err(invalid("argv", "no program given; pass the program to run"));
        };
        if program.is_empty() {
            return Err(invalid("argv[0]", "the program name is empty"));
        }
        for (i, arg) in self.argv.iter().enumerate() {
            if arg.as_bytes().contains(&0) {
                return Err(invalid(format!("argv[{i}]"), "contains a NUL byte"));
            }
        }
        for (key, value) in &self.env {
            let shown = key.to_string_lossy();
            if key.is_empty() || key.as_bytes().contains(&b'=') || key.as_bytes().contains(&0) {
                return Err(invalid(
                    format!("env[{shown:?}]"),
                    "the name must be non-empty without `=` or NUL",
                ));
            }
            if value.as_bytes().contains(&0) {
                return Err(invalid(
                    format!("env[{shown:?}]"),
                    "the value contains a NUL byte",
                ));
            }
        }
        check_path("cwd", &self.cwd)?;
        for (field, dir) in [("workdir", &self.workdir), ("tmpdir", &self.tmpdir)] {
            check_path(field, dir)?;
            if !dir.is_dir() {
                return Err(invalid(
                    field,
                    format!("{} is not an existing directory on the host", dir.display()),
                ));
            }
        }
        if let Some(cgroup) = &self.cgroup_dir {
            check_path("cgroup_dir", cgroup)?;
        }
        check_path("init_program", &self.init_program)?;
        if let Some(bind) = &self.read_only_bind {
            check_path("read_only_bind.source", &bind.source)?;
            check_path("read_only_bind.target", &bind.target)?;
        }
        let fs = &self.filesystem;
        let total = fs.read_only.len() + fs.read_write.len();
        if total > MAX_PATHS {
            return Err(invalid(
                "filesystem_policy",
                format!("{total} paths listed; at most {MAX_PATHS} are allowed"),
            ));
        }
        for (i, path) in fs.read_only.iter().enumerate() {
            check_path(&format!("filesystem_policy.read_only[{i}]"), path)?;
        }
        for (i, path) in fs.read_write.iter().enumerate() {
            let field = format!("filesystem_policy.read_write[{i}]");
            check_path(&field, path)?;
            if path == Path::new("/") {
                return Err(invalid(
                    field,
                    "`/` may not be read-write; list the directories the program writes to",
                ));
            }
        }
        self.check_nesting()
    }

    /// Landlock rights only add up, so a read-only path below a read-write one stays writable.
    /// Saying so is better than silently granting more than the policy reads as.
    fn check_nesting(&self) -> Result<(), SandboxError> {
        let writable: Vec<&Path> = self
            .filesystem
            .read_write
            .iter()
            .map(PathBuf::as_path)
            .chain(
                self.filesystem
                    .include_workdir
                    .then_some(self.cwd.as_path()),
            )
            .chain([Path::new(SANDBOX_DIR), Path::new(TMP_DIR)])
            .collect();
        for (i, ro) in self.filesystem.read_only.iter().enumerate() {
            if let Some(rw) = writable.iter().find(|rw| ro.starts_with(rw)) {
                return Err(invalid(
                    format!("filesystem_policy.read_only[{i}]"),
                    format!(
                        "{} lies inside the read-write path {}; Landlock cannot make part of a \
                         writable tree read-only. Remove one of the two or move the read-only data \
                         out of {}",
                        ro.display(),
                        rw.display(),
                        rw.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SandboxError {
    SandboxError::InvalidSpec {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Absolute, no `..`, not too long, UTF-8 (it travels as JSON and shows up in reports).
fn check_path(field: &str, path: &Path) -> Result<(), SandboxError> {
    let shown = path.display();
    if path.to_str().is_none() {
        return Err(invalid(field, format!("{shown} is not valid UTF-8")));
    }
    if !path.is_absolute() {
        return Err(invalid(field, format!("{shown} is not an absolute path")));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(
            field,
            format!("{shown} contains `..`; write the path without it"),
        ));
    }
    if path.as_os_str().len() > MAX_PATH_LEN {
        return Err(invalid(field, format!("longer than {MAX_PATH_LEN} bytes")));
    }
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(invalid(field, "contains a NUL byte"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec::new(
            vec!["true".into()],
            std::env::temp_dir(),
            std::env::temp_dir(),
            PathBuf::from("/usr/bin/openshell"),
        )
    }

    fn error(spec: &LaunchSpec) -> String {
        match spec.validate() {
            Ok(()) => panic!("spec was accepted: {spec:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn policy_sections_convert() {
        let policy = crate::policy::FilesystemPolicy {
            read_only: vec!["/usr".into()],
            read_write: vec!["/data".into()],
            include_workdir: true,
        };
        let rules = FsRules::from(&policy);
        assert_eq!(rules.read_only, policy.read_only);
        assert_eq!(rules.read_write, policy.read_write);
        assert!(rules.include_workdir);
        assert_eq!(
            Compatibility::from(crate::policy::Compatibility::HardRequirement),
            Compatibility::HardRequirement
        );
    }

    #[test]
    fn defaults_are_valid() {
        spec().validate().unwrap();
    }

    #[test]
    fn empty_argv_is_rejected() {
        let mut s = spec();
        s.argv.clear();
        assert_eq!(
            error(&s),
            "invalid sandbox spec: argv: no program given; pass the program to run"
        );
    }

    #[test]
    fn relative_and_dotdot_paths_are_rejected() {
        let mut s = spec();
        s.filesystem.read_only = vec![PathBuf::from("usr")];
        assert!(error(&s).contains("filesystem_policy.read_only[0]: usr is not an absolute path"));
        s.filesystem.read_only = vec![PathBuf::from("/usr/../etc")];
        assert!(error(&s).contains("contains `..`"));
    }

    #[test]
    fn root_read_write_is_rejected() {
        let mut s = spec();
        s.filesystem.read_write = vec![PathBuf::from("/data"), PathBuf::from("/")];
        assert!(
            error(&s).starts_with("invalid sandbox spec: filesystem_policy.read_write[1]: `/`")
        );
    }

    #[test]
    fn read_only_inside_read_write_is_rejected() {
        let mut s = spec();
        s.filesystem.read_write = vec![PathBuf::from("/data")];
        s.filesystem.read_only = vec![PathBuf::from("/usr"), PathBuf::from("/data/models")];
        let msg = error(&s);
        assert!(msg.contains("read_only[1]: /data/models lies inside the read-write path /data"));
        // The baseline's read-write paths count too.
        s.filesystem.read_only = vec![PathBuf::from("/tmp/x")];
        assert!(error(&s).contains("inside the read-write path /tmp"));
        // A sibling with a common prefix is not nested.
        s.filesystem.read_only = vec![PathBuf::from("/database")];
        s.validate().unwrap();
    }

    #[test]
    fn env_names_must_be_usable() {
        let mut s = spec();
        s.env = vec![("A=B".into(), "c".into())];
        assert!(error(&s).contains("the name must be non-empty"));
    }

    #[test]
    fn too_many_paths_are_rejected() {
        let mut s = spec();
        s.filesystem.read_only = (0..=MAX_PATHS)
            .map(|i| PathBuf::from(format!("/p{i}")))
            .collect();
        assert!(error(&s).contains("at most 4096 are allowed"));
    }
}
