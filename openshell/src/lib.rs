//! openshell: a sandbox runtime for AI agents and other untrusted programs on Linux.
//!
//! See DESIGN.md for the architecture. `policy` is pure (text in, decisions out); every other
//! module wraps it with IO.

pub mod cgroup;
pub mod cli;
pub mod client;
pub mod config;
pub mod ebpf;
pub mod gateway;
pub mod inspect;
pub mod policy;
pub mod proxy;
pub mod sandbox;
pub mod store;
pub mod tls;
