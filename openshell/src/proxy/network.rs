//! The proxy as the gateway runs it: binds the listeners named in the gateway configuration,
//! loads the eBPF programs pointing at them, serves on the gateway's tokio runtime, writes
//! decisions to the store, and attaches each sandbox's cgroup (with its policy) when the
//! gateway creates or re-adopts it.
//!
//! Start-up is two steps so that no connection is judged before its sandbox is known:
//! [`Network::start`] binds the listeners and points the eBPF programs at them (the kernel
//! queues redirected connections and DNS datagrams from then on), the gateway re-adopts its
//! sandboxes with their loaded policy revisions, and only then does [`Network::serve`] start
//! accepting. A connection that arrives in between waits in the listen backlog and is judged by
//! its sandbox's restored policy, never refused for want of one.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use rustls::pki_types::{CertificateDer, pem::PemObject as _};

use super::{
    CompiledNetwork, Generation, Proxy, ProxyConfig, ProxyError, ProxyListeners, Registry,
    SandboxNet, direct::DirectPath, listener::DIAL_TIMEOUT, log::StoreLog, relay::RelayMode,
};
use crate::{
    config::GatewayConfig,
    ebpf::Interceptor,
    gateway::CgroupAttach,
    store::{RevisionStatus, Store},
    tls::SandboxCa,
};

/// Where pins live: one directory per cgroup base, so that gateways with different bases (tests)
/// never share programs or maps.
const BPFFS_ROOT: &str = "/sys/fs/bpf/openshell";

/// The running proxy and the interceptor feeding it.
pub struct Network {
    interceptor: Arc<Mutex<Interceptor>>,
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    listening: Vec<SocketAddr>,
    /// The proxy and its bound listeners until [`Network::serve`] starts them.
    idle: Mutex<Option<(Arc<Proxy>, ProxyListeners)>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("listening", &self.listening)
            .finish_non_exhaustive()
    }
}

fn v4(what: &'static str, addr: SocketAddr) -> Result<SocketAddrV4, ProxyError> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(_) => Err(ProxyError::Config {
            message: format!("{what} {addr} must be an IPv4 address (IPv6 is served beside it)"),
        }),
    }
}

/// `[::1]` beside a loopback IPv4 listener (same port), so IPv6 clients are served too.
fn v6_beside(addr: SocketAddrV4) -> Option<SocketAddrV6> {
    addr.ip()
        .is_loopback()
        .then(|| SocketAddrV6::new(Ipv6Addr::LOCALHOST, addr.port(), 0, 0))
}

/// The certificates of every `[tls] extra_roots` PEM file.
fn extra_roots(files: &[PathBuf]) -> Result<Vec<CertificateDer<'static>>, ProxyError> {
    let mut roots = Vec::new();
    for file in files {
        let problem = |what: String| ProxyError::Config {
            message: format!(
                "[tls] extra_roots: {}: {what}; name a readable PEM file of CA certificates",
                file.display()
            ),
        };
        let before = roots.len();
        for cert in CertificateDer::pem_file_iter(file).map_err(|e| problem(e.to_string()))? {
            roots.push(cert.map_err(|e| problem(e.to_string()))?);
        }
        if roots.len() == before {
            return Err(problem("no CERTIFICATE block".to_owned()));
        }
    }
    Ok(roots)
}

impl Network {
    /// Binds the listeners of `config` and points the eBPF programs at them; nothing is
    /// accepted until [`Network::serve`].
    pub fn start(config: &GatewayConfig, store: Arc<dyn Store>) -> Result<Arc<Self>, ProxyError> {
        let transparent_v4 = v4(
            "[proxy] transparent_listen",
            config.proxy.transparent_listen,
        )?;
        let dns_v4 = v4("[dns] listen", config.dns.listen)?;
        let proxy_config = ProxyConfig {
            transparent_v4,
            transparent_v6: v6_beside(transparent_v4),
            dns_v4,
            dns_v6: v6_beside(dns_v4),
            upstream_dns: config.dns_upstreams(),
            relay: config.proxy.relay,
            dial_timeout: DIAL_TIMEOUT,
            extra_roots: extra_roots(&config.tls.extra_roots)?,
        };
        let listeners = ProxyListeners::bind(&proxy_config)?;
        let bpffs_dir = PathBuf::from(BPFFS_ROOT).join(&config.gateway.cgroup_base);
        let interceptor = Interceptor::load(&listeners.interceptor_config(&bpffs_dir))
            .map_err(|e| ProxyError::Ebpf(Box::new(e)))?;
        let kernel_relay = interceptor.kernel_relay();
        if let (RelayMode::Kernel, Err(why)) = (proxy_config.relay, &kernel_relay) {
            eprintln!(
                "gateway: [proxy] relay = \"kernel\" is unavailable, relaying with copy instead: {why}"
            );
        }
        let direct = config
            .proxy
            .direct
            .then(|| Arc::new(DirectPath::new(interceptor.fast_path())));
        let interceptor = Arc::new(Mutex::new(interceptor));
        let registry = Arc::new(match &direct {
            Some(d) => Registry::with_direct(Arc::clone(d.kernel())),
            None => Registry::new(),
        });
        let log = StoreLog::spawn(Arc::clone(&store)).map_err(|e| ProxyError::Config {
            message: format!("starting the decision log writer: {e}"),
        })?;
        let listening = listeners.addresses();
        let mut proxy = Proxy::new(
            &proxy_config,
            &listeners,
            Arc::clone(&registry),
            Arc::clone(&interceptor) as _,
            Arc::new(log),
        )?;
        if let Ok(kernel) = kernel_relay {
            proxy = proxy.with_kernel_relay(kernel);
        }
        if let Some(direct) = direct {
            proxy = proxy.with_direct(direct);
        }
        let proxy = Arc::new(proxy);
        Ok(Arc::new(Self {
            interceptor,
            registry,
            store,
            listening,
            idle: Mutex::new(Some((proxy, listeners))),
        }))
    }

    /// Starts accepting on `runtime`. Call it once the sandboxes are attached (re-adopted
    /// after a restart), so every connection finds its sandbox and policy; later calls do
    /// nothing.
    pub fn serve(&self, runtime: &tokio::runtime::Runtime) {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((proxy, listeners)) = idle {
            runtime.spawn(async move {
                if let Err(e) = proxy.serve(listeners, std::future::pending()).await {
                    eprintln!("gateway: proxy stopped: {e}");
                }
            });
        }
    }

    /// The addresses the proxy listens on.
    #[must_use]
    pub fn listening(&self) -> &[SocketAddr] {
        &self.listening
    }

    /// The policy generation for sandbox `name`: the global policy when one is in force, else
    /// its newest loaded revision (a restarted
    /// gateway restores what was in force), else its newest revision that did not fail (the
    /// creation policy). A revision loaded for the first time is marked `loaded`, or `failed`
    /// with the error.
    fn generation(&self, name: &str) -> Result<Generation, String> {
        // A global policy in force governs every sandbox, new or re-adopted.
        if let Some(global) = crate::gateway::revisions::global_in_force(self.store.as_ref())
            .map_err(|e| e.to_string())?
        {
            return Generation::from_text(
                crate::gateway::revisions::GLOBAL_SOURCE,
                &global.policy,
                global.version,
            )
            .map_err(|e| e.to_string());
        }
        let revisions = self
            .store
            .revisions(Some(name))
            .map_err(|e| e.to_string())?;
        let revision = revisions
            .iter()
            .find(|r| r.status == RevisionStatus::Loaded)
            .or_else(|| {
                revisions
                    .iter()
                    .find(|r| r.status != RevisionStatus::Failed)
            })
            .ok_or_else(|| format!("sandbox {name:?} has no policy revision"))?;
        let source = self
            .store
            .sandbox(name)
            .ok()
            .flatten()
            .map_or_else(|| format!("sandbox {name} policy"), |s| s.policy_source);
        let generation = Generation::from_text(&source, &revision.policy, revision.version)
            .map_err(|e| e.to_string());
        let status = match &generation {
            Ok(_) if revision.status == RevisionStatus::Loaded => None,
            Ok(_) => Some((RevisionStatus::Loaded, None)),
            Err(e) => Some((RevisionStatus::Failed, Some(e.as_str()))),
        };
        if let Some((status, error)) = status {
            self.store
                .set_revision_status(Some(name), revision.version, status, error)
                .map_err(|e| e.to_string())?;
        }
        generation
    }
}

impl CgroupAttach for Network {
    fn attach(&self, cgroup_dir: &Path, ca: Arc<SandboxCa>) -> Result<(), String> {
        let name = cgroup_dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("{} names no sandbox", cgroup_dir.display()))?;
        let generation = self.generation(name)?;
        let sandbox =
            SandboxNet::new(name, cgroup_dir, generation, ca).map_err(|e| e.to_string())?;
        // Register before attaching: the first redirected connect must find its sandbox.
        self.registry.insert(Arc::new(sandbox));
        let attachment = self
            .interceptor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .attach(cgroup_dir)
            .map_err(|e| e.to_string())?;
        // Pinned: the programs stay attached after the handle is dropped (and after a restart).
        drop(attachment);
        Ok(())
    }

    fn load_compiled(
        &self,
        name: &str,
        compiled: CompiledNetwork,
        revision: i64,
    ) -> Result<(), String> {
        let sandbox = self
            .registry
            .by_name(name)
            .ok_or_else(|| format!("sandbox {name:?} is not attached to the proxy"))?;
        let old = sandbox.set_generation(Generation::from_compiled(compiled, revision));
        // Freeing a large policy takes milliseconds; the caller is waiting to report the new
        // one loaded. (Open connections may still hold the old one; the last holder frees it.)
        std::thread::spawn(move || drop(old));
        Ok(())
    }

    fn detach(&self, cgroup_dir: &Path) {
        if let Ok(meta) = std::fs::metadata(cgroup_dir) {
            self.registry.remove(meta.ino());
        }
        let detached = self
            .interceptor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .detach(cgroup_dir);
        if let Err(e) = detached {
            eprintln!("gateway: detaching {}: {e}", cgroup_dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_extra_roots_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let shown = |file: &Path| {
            extra_roots(&[file.to_path_buf()])
                .unwrap_err()
                .to_string()
                .replace(&dir.path().display().to_string(), "DIR")
        };
        insta::assert_snapshot!(format!("{}\n{}", shown(&missing), shown(&empty)), @"
        proxy configuration: [tls] extra_roots: DIR/missing.pem: I/O error: No such file or directory (os error 2); name a readable PEM file of CA certificates
        proxy configuration: [tls] extra_roots: DIR/empty.pem: no CERTIFICATE block; name a readable PEM file of CA certificates
        ");
        let ca = crate::tls::SandboxCa::generate("t").unwrap();
        let good = dir.path().join("good.pem");
        std::fs::write(&good, ca.cert_pem()).unwrap();
        assert_eq!(extra_roots(&[good]).unwrap(), vec![ca.cert_der().clone()]);
    }
}
