//! The proxy: every TCP connection and DNS query of a sandbox ends up here, is judged against
//! the sandbox's network policy, and is relayed, answered or refused.

pub mod dns;
pub mod identity;
pub mod names;
pub mod relay;
pub mod sockdiag;
