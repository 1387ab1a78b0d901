//! Where the gateway keeps its state and how it is configured.
//!
//! Paths: state (database, sandbox working directories, log) under `/var/lib/openshell`, the
//! API socket and the lock file under `/run/openshell`. `OPENSHELL_STATE_DIR=DIR` moves both:
//! state to `DIR`, runtime files to `DIR/run` (tests give every gateway its own directory).
//!
//! Settings come from the TOML file named by `OPENSHELL_GATEWAY_CONFIG` (none: defaults). Unknown
//! keys are errors, so a misspelt key never silently falls back to a default:
//!
//! ```toml
//! [gateway]
//! cgroup_base = "openshell"            # directory under the cgroup2 mount holding sandboxes
//! socket_group = "openshell"           # optional: members of this group may drive the gateway
//!
//! [dns]
//! upstream = ["198.18.0.10:53"]        # default: the nameservers of /etc/resolv.conf
//! listen = "127.0.0.1:15053"           # the proxy's DNS listener
//!
//! [tls]
//! extra_roots = ["/path/to/test-ca.pem"]   # CA files trusted for upstream TLS besides webpki roots
//!
//! [proxy]
//! transparent_listen = "127.0.0.1:15001"   # where intercepted connect()s are redirected
//! http_listen = "127.0.0.1:3128"           # explicit HTTP proxy (CONNECT)
//! relay = "copy"                           # allowed L4 streams: "copy" (default), "splice" or
//!                                          # "kernel" (sockmap: lowest round trip, less bulk
//!                                          # throughput; see BENCHMARKS.md "Proxy L4")
//! direct = true                            # allowed L4 connections the proxy judged before
//!                                          # go direct on its verdict (default true; see
//!                                          # README "Direct connections")
//! ```

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::proxy::relay::RelayMode;

/// Environment variable that moves the state and runtime directories.
pub const STATE_DIR_ENV: &str = "OPENSHELL_STATE_DIR";
/// Environment variable naming the gateway's TOML settings file.
pub const CONFIG_ENV: &str = "OPENSHELL_GATEWAY_CONFIG";

const DEFAULT_STATE_DIR: &str = "/var/lib/openshell";
const DEFAULT_RUN_DIR: &str = "/run/openshell";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading gateway config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "gateway config {path}: {message}\n  (the file is named by {CONFIG_ENV}; see `openshell gateway --help` for the keys)"
    )]
    Parse { path: PathBuf, message: String },
    #[error("gateway config {path}: [dns] upstream {addr:?} is not an IP:PORT address")]
    BadUpstream { path: PathBuf, addr: String },
}

/// The gateway's file locations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Database, sandbox directories, background gateway log.
    pub state_dir: PathBuf,
    /// API socket, lock file.
    pub run_dir: PathBuf,
}

impl Paths {
    /// Paths from the environment (`OPENSHELL_STATE_DIR`) or the defaults.
    pub fn from_env() -> Self {
        match std::env::var_os(STATE_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(dir) => Self::under(PathBuf::from(dir)),
            None => Self {
                state_dir: PathBuf::from(DEFAULT_STATE_DIR),
                run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            },
        }
    }

    /// Everything under one directory (runtime files in `DIR/run`).
    pub fn under(dir: PathBuf) -> Self {
        Self {
            run_dir: dir.join("run"),
            state_dir: dir,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("gateway.sock")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.run_dir.join("gateway.lock")
    }

    pub fn database(&self) -> PathBuf {
        self.state_dir.join("openshell.db")
    }

    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join("gateway.log")
    }

    pub fn sandboxes_dir(&self) -> PathBuf {
        self.state_dir.join("sandboxes")
    }

    /// The sandboxes' certificate authorities (root only, never mounted into a sandbox).
    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }
}

/// The gateway's settings (`OPENSHELL_GATEWAY_CONFIG`). None of these is a policy field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub gateway: GatewaySection,
    pub dns: DnsSection,
    pub tls: TlsSection,
    pub proxy: ProxySection,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// Directory under the cgroup2 mount that holds one cgroup per sandbox. Every cgroup in it
    /// belongs to this gateway: unknown ones are removed at start.
    pub cgroup_base: String,
    /// Group that may use the API socket (mode 0660). Unset: root only (mode 0600).
    pub socket_group: Option<String>,
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self {
            cgroup_base: crate::cgroup::DEFAULT_BASE.to_owned(),
            socket_group: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSection {
    /// Upstream resolvers; empty means the host's `/etc/resolv.conf` nameservers.
    pub upstream: Vec<String>,
    /// The proxy's DNS listener.
    pub listen: SocketAddr,
}

impl Default for DnsSection {
    fn default() -> Self {
        Self {
            upstream: Vec::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 15053)),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM files with CA certificates trusted for upstream TLS in addition to the built-in roots.
    pub extra_roots: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// Where intercepted connections are redirected.
    pub transparent_listen: SocketAddr,
    /// The explicit HTTP proxy listener (CONNECT and absolute-form requests).
    pub http_listen: SocketAddr,
    /// How allowed L4 streams are relayed.
    pub relay: RelayMode,
    /// Whether allowed L4 connections that the proxy has judged before go direct on its
    /// verdicts (`crate::proxy::direct`).
    pub direct: bool,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            transparent_listen: SocketAddr::from(([127, 0, 0, 1], 15001)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 3128)),
            relay: RelayMode::default(),
            direct: true,
        }
    }
}

impl GatewayConfig {
    /// Reads the file named by `OPENSHELL_GATEWAY_CONFIG`, or the defaults when it is unset.
    pub fn from_env() -> Result<Self, ConfigError> {
        match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            Some(path) => Self::load(Path::new(&path)),
            None => Ok(Self::default()),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        for addr in &config.dns.upstream {
            if addr.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::BadUpstream {
                    path: path.to_path_buf(),
                    addr: addr.clone(),
                });
            }
        }
        Ok(config)
    }

    /// The DNS upstreams in force: the configured ones, else the host's resolv.conf servers.
    pub fn dns_upstreams(&self) -> Vec<SocketAddr> {
        if self.dns.upstream.is_empty() {
            let text = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            resolv_conf_servers(&text)
        } else {
            self.dns
                .upstream
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect()
        }
    }
}

/// `nameserver` lines of a resolv.conf, as port-53 socket addresses.
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: std::net::IpAddr = words.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documented_keys() {
        let text = r#"
            [gateway]
            cgroup_base = "openshell-test"
            [dns]
            upstream = ["198.18.0.10:53"]
            [tls]
            extra_roots = ["/path/to/test-ca.pem"]
            [proxy]
            transparent_listen = "127.0.0.1:16001"
        "#;
        let c = GatewayConfig::parse(Path::new("g.toml"), text).unwrap();
        assert_eq!(c.gateway.cgroup_base, "openshell-test");
        assert_eq!(c.dns_upstreams(), vec!["198.18.0.10:53".parse().unwrap()]);
        assert_eq!(
            c.tls.extra_roots,
            vec![PathBuf::from("/path/to/test-ca.pem")]
        );
        assert_eq!(
            c.proxy.transparent_listen,
            "127.0.0.1:16001".parse().unwrap()
        );
        assert_eq!(c.proxy.http_listen, ProxySection::default().http_listen);
        assert_eq!(c.proxy.relay, RelayMode::Copy);
        assert!(c.proxy.direct, "direct connections are on by default");
    }

    #[test]
    fn direct_connections_can_be_turned_off() {
        let c = GatewayConfig::parse(Path::new("g.toml"), "[proxy]\ndirect = false\n").unwrap();
        assert!(!c.proxy.direct);
        let err = GatewayConfig::parse(Path::new("g.toml"), "[proxy]\ndirect = \"no\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("direct"), "{err}");
    }

    #[test]
    fn relay_mode_is_chosen_by_name_and_a_wrong_one_is_an_error_naming_the_choices() {
        for (name, mode) in [
            ("copy", RelayMode::Copy),
            ("splice", RelayMode::Splice),
            ("kernel", RelayMode::Kernel),
        ] {
            let text = format!("[proxy]\nrelay = \"{name}\"\n");
            let c = GatewayConfig::parse(Path::new("g.toml"), &text).unwrap();
            assert_eq!(c.proxy.relay, mode);
            assert_eq!(mode.name(), name);
        }
        let err = GatewayConfig::parse(Path::new("g.toml"), "[proxy]\nrelay = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("g.toml") && err.contains("fast") && err.contains("kernel"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = GatewayConfig::parse(Path::new("g.toml"), "[dns]\nupstreams = []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("g.toml") && err.contains("upstreams"), "{err}");
    }

    #[test]
    fn bad_upstream_is_an_error() {
        let err = GatewayConfig::parse(Path::new("g.toml"), "[dns]\nupstream = [\"dns.local\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("dns.local"), "{err}");
    }

    #[test]
    fn resolv_conf() {
        let text =
            "# c\nnameserver 10.0.0.2\nsearch x\nnameserver fe80::1%eth0\nnameserver bogus\n";
        assert_eq!(
            resolv_conf_servers(text),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn state_dir_moves_everything() {
        let p = Paths::under(PathBuf::from("/tmp/x"));
        assert_eq!(p.socket(), PathBuf::from("/tmp/x/run/gateway.sock"));
        assert_eq!(p.database(), PathBuf::from("/tmp/x/openshell.db"));
    }
}
