//! Types shared by the openshell eBPF programs (`openshell-ebpf`) and user space (`openshell`).
//!
//! Everything here is `#[repr(C)]` with explicit padding and a compile-time size check, because
//! the kernel side and the user side must agree on the layout byte for byte. Logic that both
//! sides need and that can be tested on the host lives here too.
#![no_std]
#![forbid(unsafe_code)]
