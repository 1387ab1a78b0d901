//! The proxy: every TCP connection and DNS query of a sandbox ends up here, is judged against
//! the sandbox's network policy, and is relayed, answered or refused.
//!
//! - [`listener`]: the transparent TCP listener (connections the eBPF programs redirected) and
//!   the DNS listener; per connection: eBPF record → sandbox → binary and ancestors → name →
//!   decision → RST or dial + relay, and a decision-log entry either way.
//! - [`dns`]: the policy DNS (no leak of denied names, answers filtered, answers remembered).
//! - [`names`]: per-sandbox address → name memory.
//! - [`identity`]: executables as paths, with SHA-256 trust on first use.
//! - [`relay`]: splice(2) relay with half-close and revocation.
//! - [`direct`]: the proxy's allow verdicts handed to the kernel, so that later connections
//!   like an allowed one go direct (logged, and judged again on every policy change).
//! - [`registry`]: the sandboxes the proxy serves and their policy generations.
//! - [`sockdiag`]: which cgroup sent a UDP datagram; aborting one TCP connection.
//! - [`network`]: the proxy as the gateway runs it (listeners, interceptor, sandbox attach).
//!
//! An allowed connection to a `protocol: rest` endpoint is handed to [`crate::inspect::serve`]
//! (TLS terminated with the sandbox's CA), which decides every request on it by the generation
//! current when the request arrives and logs each decision beside the connection decisions.
//!
//! Relies on the eBPF interceptor ([`crate::ebpf`]) for redirection and connect records, and on
//! root (reading `/proc/<pid>/exe` of sandboxed processes, `NETLINK_SOCK_DIAG`).
//! Limits: IPv4 and IPv6 TCP; HTTP inspection as [`crate::inspect`] describes it.

pub mod direct;
pub mod dns;
pub mod generation;
pub mod identity;
pub mod listener;
pub mod log;
pub mod names;
pub mod network;
pub mod registry;
pub mod relay;
pub mod sockdiag;

pub use generation::{CompiledNetwork, Generation};
pub use listener::{Proxy, ProxyConfig, ProxyListeners};
pub use registry::{Registry, SandboxNet};

/// Errors of the proxy's setup and of loading policies into it.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{message}")]
    InvalidPolicy { message: String },
    #[error("proxy configuration: {message}")]
    Config { message: String },
    #[error("loading the eBPF interceptor: {0}")]
    Ebpf(#[source] Box<crate::ebpf::EbpfError>),
    #[error("upstream TLS configuration: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("binding the proxy's {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}
