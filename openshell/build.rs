//! Builds the eBPF programs in `openshell-ebpf` with aya-build (nightly + bpf-linker) and leaves
//! the object in `OUT_DIR`, where `ebpf` includes it. `cargo xtask setup` installs what this needs.
//!
//! aya-build gives the nested BPF build a target directory inside `OUT_DIR`, which differs between
//! `cargo build`, `cargo test` and `cargo clippy`; each would rebuild `core` and the programs from
//! scratch. We point that directory at one shared `<target>/bpf` instead, so the nested cargo
//! reuses its own fingerprints and rebuilds only when the eBPF sources change.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "openshell-ebpf";
const COMMON_PACKAGE: &str = "openshell-common";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR")
            .ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    let out_dir =
        PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    share_nested_target_dir(&out_dir)?;

    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("openshell crate has no parent directory"))?;
    // aya-build only watches the eBPF package itself; the programs also compile in the shared
    // types and decisions, so a change there must rebuild them too.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join(COMMON_PACKAGE).display()
    );
    let ebpf_dir = workspace.join(EBPF_PACKAGE);
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", ebpf_dir.display()))?;
    let package = aya_build::Package {
        name: EBPF_PACKAGE,
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the nightly \
         rust-src component and bpf-linker, then build again",
    )
}

/// Makes `OUT_DIR/aya-build/target/openshell-ebpf` (the directory aya-build passes as
/// `--target-dir`) a link to `<cargo target dir>/bpf`. The cargo target directory is the nearest
/// ancestor of `OUT_DIR` holding cargo's `CACHEDIR.TAG`; without one, aya-build's default stays.
fn share_nested_target_dir(out_dir: &Path) -> anyhow::Result<()> {
    let Some(target_dir) = out_dir
        .ancestors()
        .skip(1)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
    else {
        return Ok(());
    };
    let shared = target_dir.join("bpf");
    fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    let parent = out_dir.join("aya-build").join("target");
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let link = parent.join(EBPF_PACKAGE);
    if fs::read_link(&link).is_ok_and(|t| t == shared) {
        return Ok(());
    }
    if link.is_dir() && !link.is_symlink() {
        fs::remove_dir_all(&link).with_context(|| format!("removing {}", link.display()))?;
    } else if link.is_symlink() {
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&shared, &link)
        .with_context(|| format!("linking {} to {}", link.display(), shared.display()))
}
