//! Builds the eBPF programs in `openshell-ebpf` with aya-build (nightly + bpf-linker) and leaves
//! the object in `OUT_DIR`, where `ebpf` includes it. `cargo xtask setup` installs what this needs.
use std::path::PathBuf;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR")
            .ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("openshell crate has no parent directory"))?
        .join("openshell-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", ebpf_dir.display()))?;
    let package = aya_build::Package {
        name: "openshell-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the nightly \
         rust-src component and bpf-linker, then build again",
    )
}
