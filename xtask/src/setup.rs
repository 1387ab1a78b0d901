//! `cargo xtask setup`: installs or checks what building and testing openshell needs.
//!
//! Idempotent: every step first checks, and only installs what is missing. When a step cannot
//! install (not root, no apt, no network to the registries), it says what is missing and how to
//! get it, and setup fails.
//!
//! Steps:
//! 1. Debian packages: `libseccomp-dev` (the libseccomp crate), `pkg-config`, and the tools the
//!    tests drive (iproute2, curl, git, python3, util-linux, passwd, ca-certificates).
//! 2. The nightly toolchain with `rust-src` (the eBPF crate builds `core` for the BPF target).
//! 3. `bpf-linker` built against the nightly's own LLVM (DESIGN.md): the LLVM shared library that
//!    ships with the nightly is linked into a prefix directory and bpf-linker is built with the
//!    matching `llvm-NN` feature. It runs under `rustup run nightly`, which puts that library on
//!    the loader path.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::status;

/// Debian packages, each with the command or file that proves it is installed.
const APT_PACKAGES: &[&str] = &[
    "build-essential",
    "ca-certificates",
    "curl",
    "git",
    "iproute2",
    "libseccomp-dev",
    "passwd",
    "pkg-config",
    "python3",
    "util-linux",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn run(check_only: bool) -> Result<()> {
    let mut missing = Vec::new();
    apt(check_only, &mut missing)?;
    nightly(check_only, &mut missing)?;
    if missing.is_empty() {
        bpf_linker(check_only, &mut missing)?;
    }
    if missing.is_empty() {
        eprintln!("xtask setup: everything needed is installed");
        return Ok(());
    }
    eprintln!("xtask setup: missing:");
    for item in &missing {
        eprintln!("  - {item}");
    }
    bail!("setup is incomplete; see the list above")
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt(check_only: bool, missing: &mut Vec<String>) -> Result<()> {
    if which::which("dpkg-query").is_err() {
        eprintln!(
            "xtask setup: not a Debian-based system; make sure these are installed: {}",
            APT_PACKAGES.join(" ")
        );
        return Ok(());
    }
    let absent: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if absent.is_empty() {
        return Ok(());
    }
    let how = format!("apt-get update && apt-get install -y {}", absent.join(" "));
    if check_only || !is_root() {
        missing.push(format!(
            "Debian packages {} (as root: {how})",
            absent.join(", ")
        ));
        return Ok(());
    }
    eprintln!("xtask setup: installing {}", absent.join(" "));
    let installed = status(Command::new("apt-get").args(["update", "-qq"])).and_then(|()| {
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&absent)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    });
    if let Err(err) = installed {
        missing.push(format!(
            "Debian packages {} ({err:#}; try: {how})",
            absent.join(", ")
        ));
    }
    Ok(())
}

fn rustup(args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(args);
    // Do not let the toolchain that runs xtask leak into the nightly commands.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn nightly(check_only: bool, missing: &mut Vec<String>) -> Result<()> {
    if which::which("rustup").is_err() {
        missing.push("rustup (install it from your distribution or rustup.rs)".into());
        return Ok(());
    }
    let toolchains = output(&mut rustup(&["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        if check_only {
            missing.push(
                "the nightly toolchain (rustup toolchain install nightly --component rust-src)"
                    .into(),
            );
            return Ok(());
        }
        eprintln!("xtask setup: installing the nightly toolchain");
        if let Err(err) = status(&mut rustup(&[
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ])) {
            missing.push(format!("the nightly toolchain ({err:#})"));
            return Ok(());
        }
    }
    let components = output(&mut rustup(&[
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        if check_only {
            missing.push(
                "rust-src for nightly (rustup component add rust-src --toolchain nightly)".into(),
            );
            return Ok(());
        }
        eprintln!("xtask setup: adding rust-src to the nightly toolchain");
        if let Err(err) = status(&mut rustup(&[
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ])) {
            missing.push(format!("rust-src for nightly ({err:#})"));
        }
    }
    Ok(())
}

/// The nightly's LLVM major version and the path of its shared library.
fn nightly_llvm() -> Result<(u32, PathBuf)> {
    let vv = output(&mut rustup(&["run", "nightly", "rustc", "-vV"]))
        .context("running `rustup run nightly rustc -vV`")?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse::<u32>().ok())
        .context("nightly rustc -vV does not report an LLVM version")?;
    let sysroot = output(&mut rustup(&[
        "run", "nightly", "rustc", "--print", "sysroot",
    ]))
    .context("running `rustup run nightly rustc --print sysroot`")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib_dir.display()))?;
    Ok((major, lib))
}

/// True when bpf-linker runs under the nightly. It links the nightly's LLVM library by its full
/// versioned name (`libLLVM.so.NN.N-rust-<nightly>`), which `rustup run nightly` puts on the loader
/// path; a bpf-linker built against any other LLVM fails to start there.
fn bpf_linker_ok() -> bool {
    output(&mut rustup(&["run", "nightly", "bpf-linker", "--version"]))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn bpf_linker(check_only: bool, missing: &mut Vec<String>) -> Result<()> {
    let (major, lib) = match nightly_llvm() {
        Ok(found) => found,
        Err(err) => {
            missing.push(format!("the nightly's LLVM library ({err:#})"));
            return Ok(());
        }
    };
    if bpf_linker_ok() {
        return Ok(());
    }
    let prefix = home::cache_dir().join(format!("openshell/llvm-{major}"));
    let how = format!(
        "mkdir -p {p}/lib && ln -sf {lib} {p}/lib/libLLVM.so && LLVM_PREFIX={p} cargo +nightly \
         install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-{major} --force",
        p = prefix.display(),
        lib = lib.display(),
    );
    if check_only {
        missing.push(format!(
            "bpf-linker {BPF_LINKER_VERSION} built against LLVM {major} ({how})"
        ));
        return Ok(());
    }
    eprintln!(
        "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} \
         (a few minutes, once)"
    );
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let link = lib_dir.join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)
        .with_context(|| format!("linking {} to {}", link.display(), lib.display()))?;
    let built = status(
        rustup(&["run", "nightly", "cargo", "install", "bpf-linker"])
            .args([
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--force",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    );
    match built {
        Ok(()) if bpf_linker_ok() => Ok(()),
        Ok(()) => {
            missing.push(format!(
                "bpf-linker built but does not run under the nightly ({how})"
            ));
            Ok(())
        }
        Err(err) => {
            missing.push(format!("bpf-linker ({err:#}; try: {how})"));
            Ok(())
        }
    }
}

mod home {
    use std::path::PathBuf;

    /// `$XDG_CACHE_HOME`, else `$HOME/.cache`, else /var/cache.
    pub fn cache_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(home).join(".cache");
        }
        PathBuf::from("/var/cache")
    }
}
