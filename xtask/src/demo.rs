//! The main job shown by `cargo xtask demo`.

use std::path::Path;

use anyhow::Result;

pub fn run(_root: &Path, bin: &Path) -> Result<()> {
    crate::status(std::process::Command::new(bin).arg("--help"))
}
