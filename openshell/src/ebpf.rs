//! Loader for the eBPF programs built from `openshell-ebpf`.
//!
//! Requires root (CAP_BPF, CAP_NET_ADMIN) and a cgroup v2 hierarchy.

/// The compiled eBPF object, built by `build.rs` through aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/openshell"));
