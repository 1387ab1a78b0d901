//! Shared helpers for openshell's end-to-end and privileged tests.

use std::path::PathBuf;

pub mod netns;

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
