//! The unprivileged identity a sandboxed program runs as.
//!
//! Resolution runs in the caller before the fork: names become ids, the default `sandbox` user
//! and group are created with `groupadd`/`useradd --system` when missing, and root (by name, by
//! id, or any name that resolves to id 0) is refused. The init process then switches with
//! `setgroups`/`setresgid`/`setresuid` and checks that no capability survived the switch.

use std::process::Command;
use std::sync::Mutex;

use nix::unistd::{Gid, Group, Uid, User};
use serde::{Deserialize, Serialize};

use super::SandboxError;
use super::error::{SetupError, Step};
use super::report::IdentityReport;

/// The user and group a sandbox runs as unless the policy says otherwise.
pub const DEFAULT_ACCOUNT: &str = "sandbox";

/// Serialises account creation between concurrent launches in one process.
static CREATE_LOCK: Mutex<()> = Mutex::new(());

/// A user and group resolved to ids, with names for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
}

/// Resolves `run_as_user` / `run_as_group`, creating the default account when it is missing.
pub(crate) fn resolve(user: &str, group: &str) -> Result<Identity, SandboxError> {
    let (user, uid) = resolve_user(user)?;
    let (group, gid) = resolve_group(group)?;
    Ok(Identity {
        user,
        uid,
        group,
        gid,
    })
}

fn resolve_user(name: &str) -> Result<(String, u32), SandboxError> {
    const FIELD: &str = "run_as_user";
    if name.is_empty() {
        return Err(SandboxError::InvalidSpec {
            field: format!("process.{FIELD}"),
            reason: "empty; name an unprivileged user (the default is `sandbox`)".into(),
        });
    }
    let refuse = || SandboxError::RootRefused {
        field: FIELD,
        value: name.to_owned(),
    };
    if let Ok(uid) = name.parse::<u32>() {
        if uid == 0 {
            return Err(refuse());
        }
        let lookup =
            User::from_uid(Uid::from_raw(uid)).map_err(|source| SandboxError::AccountLookup {
                field: FIELD,
                name: name.into(),
                source,
            })?;
        return Ok((lookup.map_or_else(|| uid.to_string(), |u| u.name), uid));
    }
    if name == "root" {
        return Err(refuse());
    }
    let lookup = || {
        User::from_name(name).map_err(|source| SandboxError::AccountLookup {
            field: FIELD,
            name: name.into(),
            source,
        })
    };
    let user = match lookup()? {
        Some(user) => user,
        None if name == DEFAULT_ACCOUNT => {
            create_default_account()?;
            lookup()?.ok_or_else(|| SandboxError::CreateAccount {
                kind: "user",
                command: "useradd".into(),
                detail: "it reported success but the user still does not exist".into(),
            })?
        }
        None => {
            return Err(SandboxError::UnknownAccount {
                field: FIELD,
                kind: "user",
                name: name.into(),
            });
        }
    };
    if user.uid.is_root() {
        return Err(refuse());
    }
    Ok((user.name, user.uid.as_raw()))
}

fn resolve_group(name: &str) -> Result<(String, u32), SandboxError> {
    const FIELD: &str = "run_as_group";
    if name.is_empty() {
        return Err(SandboxError::InvalidSpec {
            field: format!("process.{FIELD}"),
            reason: "empty; name an unprivileged group (the default is `sandbox`)".into(),
        });
    }
    let refuse = || SandboxError::RootRefused {
        field: FIELD,
        value: name.to_owned(),
    };
    if let Ok(gid) = name.parse::<u32>() {
        if gid == 0 {
            return Err(refuse());
        }
        let lookup =
            Group::from_gid(Gid::from_raw(gid)).map_err(|source| SandboxError::AccountLookup {
                field: FIELD,
                name: name.into(),
                source,
            })?;
        return Ok((lookup.map_or_else(|| gid.to_string(), |g| g.name), gid));
    }
    if name == "root" {
        return Err(refuse());
    }
    let lookup = || {
        Group::from_name(name).map_err(|source| SandboxError::AccountLookup {
            field: FIELD,
            name: name.into(),
            source,
        })
    };
    let group = match lookup()? {
        Some(group) => group,
        None if name == DEFAULT_ACCOUNT => {
            create_default_account()?;
            lookup()?.ok_or_else(|| SandboxError::CreateAccount {
                kind: "group",
                command: "groupadd".into(),
                detail: "it reported success but the group still does not exist".into(),
            })?
        }
        None => {
            return Err(SandboxError::UnknownAccount {
                field: FIELD,
                kind: "group",
                name: name.into(),
            });
        }
    };
    if group.gid.as_raw() == 0 {
        return Err(refuse());
    }
    Ok((group.name, group.gid.as_raw()))
}

/// Creates the `sandbox` group and user (system ids, no home directory, no login shell).
/// Another process may win the race; what counts is that both exist afterwards.
fn create_default_account() -> Result<(), SandboxError> {
    let _guard = CREATE_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let exists = |r: nix::Result<bool>| r.unwrap_or(false);
    if !exists(Group::from_name(DEFAULT_ACCOUNT).map(|g| g.is_some())) {
        run_account_tool("group", "groupadd", &["--system", DEFAULT_ACCOUNT], || {
            exists(Group::from_name(DEFAULT_ACCOUNT).map(|g| g.is_some()))
        })?;
    }
    if !exists(User::from_name(DEFAULT_ACCOUNT).map(|u| u.is_some())) {
        run_account_tool(
            "user",
            "useradd",
            &[
                "--system",
                "--gid",
                DEFAULT_ACCOUNT,
                "--no-create-home",
                "--home-dir",
                super::spec::SANDBOX_DIR,
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "openshell sandbox",
                DEFAULT_ACCOUNT,
            ],
            || exists(User::from_name(DEFAULT_ACCOUNT).map(|u| u.is_some())),
        )?;
    }
    Ok(())
}

fn run_account_tool(
    kind: &'static str,
    tool: &str,
    args: &[&str],
    created: impl Fn() -> bool,
) -> Result<(), SandboxError> {
    // A daemon's PATH may lack the sbin directories.
    let program = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| std::path::Path::new(dir).join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| tool.into());
    let command = format!("{} {}", program.display(), args.join(" "));
    let output =
        Command::new(&program)
            .args(args)
            .output()
            .map_err(|err| SandboxError::CreateAccount {
                kind,
                command: command.clone(),
                detail: err.to_string(),
            })?;
    if output.status.success() || created() {
        return Ok(());
    }
    Err(SandboxError::CreateAccount {
        kind,
        command,
        detail: format!(
            "{}: {}; create the {kind} by hand or name another one in process.run_as_{kind}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    })
}

/// Switches the calling process to `identity` for good (real, effective and saved ids, one
/// supplementary group) and checks that the switch left no capability behind.
pub(crate) fn switch(identity: &Identity) -> Result<IdentityReport, SetupError> {
    let uid = Uid::from_raw(identity.uid);
    let gid = Gid::from_raw(identity.gid);
    nix::unistd::setgroups(&[gid])
        .map_err(|e| SetupError::sys(Step::Identity, format!("setgroups([{gid}])"), e))?;
    nix::unistd::setresgid(gid, gid, gid)
        .map_err(|e| SetupError::sys(Step::Identity, format!("setresgid({gid})"), e))?;
    nix::unistd::setresuid(uid, uid, uid)
        .map_err(|e| SetupError::sys(Step::Identity, format!("setresuid({uid})"), e))?;
    let ids =
        nix::unistd::getresuid().map_err(|e| SetupError::sys(Step::Identity, "getresuid", e))?;
    let gids =
        nix::unistd::getresgid().map_err(|e| SetupError::sys(Step::Identity, "getresgid", e))?;
    if [ids.real, ids.effective, ids.saved] != [uid; 3]
        || [gids.real, gids.effective, gids.saved] != [gid; 3]
    {
        return Err(SetupError::new(
            Step::Identity,
            format!("the switch to uid {uid} gid {gid} did not take effect"),
        ));
    }
    // Leaving uid 0 clears the permitted and effective sets unless SECBIT_KEEP_CAPS was set;
    // check rather than trust that nobody set it.
    let mut leftover = Vec::new();
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted] {
        let held = caps::read(None, set).map_err(|e| {
            SetupError::new(Step::Capabilities, format!("reading the {set:?} set: {e}"))
        })?;
        leftover.extend(held);
    }
    if !leftover.is_empty() {
        return Err(SetupError::new(
            Step::Capabilities,
            format!("capabilities survived the switch to uid {uid}: {leftover:?}"),
        ));
    }
    Ok(IdentityReport {
        user: identity.user.clone(),
        uid: identity.uid,
        group: identity.group.clone(),
        gid: identity.gid,
        groups: vec![identity.gid],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_by_name_and_id() {
        for (user, group, field) in [
            ("root", "sandbox", "run_as_user"),
            ("0", "sandbox", "run_as_user"),
            ("nobody", "root", "run_as_group"),
            ("nobody", "0", "run_as_group"),
        ] {
            match resolve(user, group) {
                Err(SandboxError::RootRefused { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{user}/{group}: expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn root_refusal_says_how_to_fix() {
        let err = SandboxError::RootRefused {
            field: "run_as_user",
            value: "0".into(),
        };
        assert_eq!(
            err.to_string(),
            "process.run_as_user: \"0\" is root, and sandboxes never run as root. Set \
             process.run_as_user to an unprivileged account (the default is `sandbox`)"
        );
    }

    #[test]
    fn unknown_non_default_accounts_are_not_created() {
        match resolve("openshell-no-such-user", "sandbox") {
            Err(SandboxError::UnknownAccount { kind: "user", .. }) => {}
            other => panic!("expected an unknown-user error, got {other:?}"),
        }
    }

    #[test]
    fn numeric_ids_need_no_account() {
        let id = resolve("4242424", "4242425").unwrap();
        assert_eq!(
            id,
            Identity {
                user: "4242424".into(),
                uid: 4_242_424,
                group: "4242425".into(),
                gid: 4_242_425
            }
        );
    }
}
