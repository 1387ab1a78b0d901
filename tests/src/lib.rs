//! Shared helpers for openshell's end-to-end and privileged tests.
#![expect(
    clippy::expect_used,
    reason = "test helpers fail the calling test loudly when the machine is not as expected"
)]

use std::path::PathBuf;

pub mod dns;
pub mod gateway;
pub mod netns;
pub mod sandbox;
pub mod upstream;

/// Path of the `openshell` binary under test: `$OPENSHELL_BIN`, else `target/<profile>/openshell`
/// beside this test executable (`cargo xtask test` builds it first).
pub fn openshell_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OPENSHELL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-binary>
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("openshell"));
    match candidate {
        Some(p) if p.is_file() => p,
        _ => panic!(
            "openshell binary not found next to {}: run `cargo build -p openshell` first \
             (`cargo xtask test` does), or set OPENSHELL_BIN",
            exe.display()
        ),
    }
}

/// True when running as root; privileged tests need it and say so when it is missing.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A throw-away cgroup `<cgroup2>/openshell-test-<tag>-<pid>/<name>`, killed and removed on drop
/// (also when the test panics).
pub struct TestCgroup {
    base: Option<openshell::cgroup::CgroupBase>,
    cgroup: Option<openshell::cgroup::SandboxCgroup>,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        let base = openshell::cgroup::CgroupBase::open(&format!(
            "openshell-test-{tag}-{}",
            std::process::id()
        ))
        .expect("create test cgroup base");
        let cgroup = base.sandbox("sb").expect("create test cgroup");
        Self {
            base: Some(base),
            cgroup: Some(cgroup),
        }
    }

    pub fn cgroup(&self) -> &openshell::cgroup::SandboxCgroup {
        self.cgroup.as_ref().expect("cgroup present until drop")
    }

    pub fn path(&self) -> &std::path::Path {
        self.cgroup().path()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Some(Err(e)) = self.cgroup.take().map(|cg| cg.remove()) {
            eprintln!("warning: removing test cgroup: {e}");
        }
        if let Some(Err(e)) = self.base.take().map(|base| base.remove()) {
            eprintln!("warning: removing test cgroup base: {e}");
        }
    }
}

/// Ends the calling test early (it passes, with a note on stderr) when not running as root.
/// For tests returning `Result`.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipped: needs root (cgroups, sandbox processes)");
            return Ok(());
        }
    };
}

/// The `name` of every sandbox in a `sandbox list -o json` answer.
pub fn sandbox_names(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Makes `cmd` move its process into `cgroup` (a cgroup v2 directory) between fork and exec, so
/// the program runs in it from its first instruction.
pub fn in_cgroup(
    mut cmd: std::process::Command,
    cgroup: &std::path::Path,
) -> std::process::Command {
    use std::os::unix::{ffi::OsStrExt as _, process::CommandExt as _};
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup path has no NUL");
    // SAFETY: the closure only calls async-signal-safe functions (open, write, close) on data
    // prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}
