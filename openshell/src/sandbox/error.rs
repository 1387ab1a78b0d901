//! Errors of the launcher: those found before the fork ([`SandboxError`]) and those the init
//! process reports from a setup step ([`SetupError`]).

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Why a sandboxed process could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The launch spec is malformed; nothing was started.
    #[error("invalid sandbox spec: {field}: {reason}")]
    InvalidSpec { field: String, reason: String },

    /// `run_as_user` or `run_as_group` names root.
    #[error(
        "process.{field}: {value:?} is root, and sandboxes never run as root. Set \
         process.{field} to an unprivileged account (the default is `sandbox`)"
    )]
    RootRefused { field: &'static str, value: String },

    /// A user or group other than the default `sandbox` does not exist.
    #[error(
        "process.{field}: no {kind} named {name:?} exists on this host; create it first or use the \
         default `sandbox`, which openshell creates itself"
    )]
    UnknownAccount {
        field: &'static str,
        kind: &'static str,
        name: String,
    },

    /// Looking a user or group up failed (an unreadable /etc/passwd, for example).
    #[error("process.{field}: could not look up {name:?}: {source}")]
    AccountLookup {
        field: &'static str,
        name: String,
        #[source]
        source: nix::Error,
    },

    /// `groupadd` or `useradd` for the default `sandbox` account failed.
    #[error("could not create the `sandbox` {kind} with `{command}`: {detail}")]
    CreateAccount {
        kind: &'static str,
        command: String,
        detail: String,
    },

    /// The init program could not be started at all.
    #[error("could not start the sandbox init process {}: {source}", .program.display())]
    SpawnInit {
        program: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A setup step inside the init process failed; the program did not run.
    #[error(transparent)]
    Setup(#[from] SetupError),

    /// The init process ended without saying why (killed, or the wrong binary).
    #[error(
        "the sandbox init process ended before running the program and reported nothing ({status}); \
         check that init_program is an openshell binary of the same version"
    )]
    InitDied { status: String },

    /// The init process did not finish its setup in time and was killed.
    #[error("the sandbox init process did not finish its setup within {seconds} s and was killed")]
    InitTimeout { seconds: u64 },

    /// An IO error in the launcher itself.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl SandboxError {
    pub(crate) fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Self::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// The setup steps of the init process, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Reading the request from the launcher and preparing the process (fds, signals).
    Spec,
    /// Joining the sandbox's cgroup.
    Cgroup,
    /// New session and controlling terminal.
    Terminal,
    /// Private mount namespace with `/sandbox` and `/tmp`.
    MountNamespace,
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// Clearing the capability sets.
    Capabilities,
    /// Switching to the sandbox user and group.
    Identity,
    /// Landlock ruleset.
    Landlock,
    /// seccomp filter.
    Seccomp,
    /// Changing to the working directory.
    WorkingDirectory,
    /// Executing the program.
    Exec,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Spec => "spec",
            Self::Cgroup => "cgroup",
            Self::Terminal => "terminal",
            Self::MountNamespace => "mount namespace",
            Self::NoNewPrivs => "no_new_privs",
            Self::Capabilities => "capabilities",
            Self::Identity => "identity",
            Self::Landlock => "landlock",
            Self::Seccomp => "seccomp",
            Self::WorkingDirectory => "working directory",
            Self::Exec => "exec",
        })
    }
}

/// A setup step that failed inside the init process. It crosses the status pipe as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct SetupError {
    /// The step that failed.
    pub step: Step,
    /// The path the step was working on, if any.
    pub path: Option<PathBuf>,
    /// What went wrong and how to fix it.
    pub message: String,
    /// The errno of the failing system call, if one failed.
    pub errno: Option<i32>,
}

impl SetupError {
    pub(crate) fn new(step: Step, message: impl Into<String>) -> Self {
        Self {
            step,
            path: None,
            message: message.into(),
            errno: None,
        }
    }

    pub(crate) fn at(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// A failed system call: the message gets the errno's text appended.
    pub(crate) fn sys(step: Step, what: impl fmt::Display, errno: nix::Error) -> Self {
        Self {
            step,
            path: None,
            message: format!("{what}: {}", errno.desc()),
            errno: Some(errno as i32),
        }
    }

    pub(crate) fn io(step: Step, what: impl fmt::Display, err: &io::Error) -> Self {
        Self {
            step,
            path: None,
            message: format!("{what}: {err}"),
            errno: err.raw_os_error(),
        }
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sandbox setup failed at step `{}`", self.step)?;
        if let Some(path) = &self.path {
            write!(f, " ({})", path.display())?;
        }
        write!(f, ": {}", self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_error_names_step_and_path() {
        let err = SetupError::new(Step::Landlock, "does not exist").at("/data");
        assert_eq!(
            err.to_string(),
            "sandbox setup failed at step `landlock` (/data): does not exist"
        );
        let err = SetupError::sys(Step::Cgroup, "writing cgroup.procs", nix::Error::ENOENT);
        assert_eq!(
            err.to_string(),
            "sandbox setup failed at step `cgroup`: writing cgroup.procs: No such file or directory"
        );
        assert_eq!(err.errno, Some(libc::ENOENT));
    }
}
