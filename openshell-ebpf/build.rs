//! Rebuild the eBPF object when bpf-linker changes (for example after `cargo xtask setup`
//! rebuilt it against a new nightly LLVM).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
