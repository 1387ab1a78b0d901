//! The gateway daemon: one per host, root, owner of every sandbox.
//!
//! It keeps its state in the [`crate::store`], serves an HTTP/1.1 JSON API on a Unix socket
//! (`<run dir>/gateway.sock`, mode 0600: the socket's permissions decide who may drive the
//! gateway), and spawns every sandbox process. A lock file (`<run dir>/gateway.lock`, `flock`)
//! makes it one per state directory; its text is the gateway's pid. `[gateway] socket_group`
//! opens the socket to a group (mode 0660).
//!
//! # API
//!
//! | request | body → response |
//! |---|---|
//! | `GET /v1/status` | → [`api::GatewayStatus`] |
//! | `POST /v1/shutdown` | → `{}`; the gateway exits, sandboxes keep running |
//! | `GET /v1/sandboxes` | → `[`[`api::SandboxInfo`]`]` |
//! | `POST /v1/sandboxes` | [`api::CreateSandbox`] → [`api::SandboxInfo`] |
//! | `GET /v1/sandboxes/{name}` | → [`api::SandboxInfo`] |
//! | `DELETE /v1/sandboxes/{name}` | → `{}` |
//! | `GET /v1/sandboxes/{name}/policy` | → `[`[`crate::store::PolicyRevision`]`]`, newest first |
//! | `GET /v1/sandboxes/{name}/policy/{version}[?wait_ms=N]` | → [`crate::store::PolicyRevision`]; with `wait_ms`, once it is no longer `pending` or N ms passed |
//! | `POST /v1/sandboxes/{name}/policy` | [`api::SetPolicy`] → [`api::SetPolicyResult`] ([`revisions`]) |
//! | `GET /v1/sandboxes/{name}/logs?n=N` | → `[`[`crate::store::DecisionRecord`]`]`, oldest first |
//! | `GET /v1/sandboxes/{name}/log?...` | → [`api::LogResponse`] (query: [`api::LogRequest`]) |
//! | `GET /v1/sandboxes/{name}/settings` | → [`api::SandboxSettings`] |
//! | `GET /v1/policy/global` | → `[`[`crate::store::PolicyRevision`]`]`, newest first |
//! | `PUT /v1/policy/global` | [`api::SetPolicy`] → [`api::SetPolicyResult`] ([`revisions`]) |
//! | `DELETE /v1/policy/global` | → [`api::DeleteGlobalResult`] |
//! | `POST /v1/sandboxes/{name}/exec` | [`api::ExecRequest`] with `Upgrade: openshell-exec/1` → 101 |
//!
//! Errors are 4xx/5xx with an [`api::ErrorBody`].
//!
//! # Exec sessions
//!
//! A command runs over the connection that asked for it. After `101 Switching Protocols` both
//! ends speak newline-delimited JSON [`api::ExecEvent`]s, and file descriptors travel with
//! SCM_RIGHTS on the first byte of a line ([`wire`]):
//!
//! 1. gateway → `{"event":"ready"}`: the gateway reads the raw socket from now on (so no
//!    descriptor can be swallowed by an HTTP read buffer).
//! 2. CLI → `{"event":"stdio"}`, carrying the CLI's stdin, stdout and stderr unless the request
//!    asked for a tty.
//! 3. gateway → `{"event":"started","pid":N}`, carrying the pty master when a tty was asked
//!    for; or `{"event":"error","message":...}` when the command could not start (nothing ran).
//! 4. CLI → `{"event":"signal","signal":N}` any number of times: delivered to the command.
//! 5. gateway → `{"event":"exited","code":N}` (128 + signal number when killed); then both close.
//!
//! With a tty the CLI relays bytes between its terminal (raw mode) and the master and sets the
//! master's window size on SIGWINCH; the kernel then signals the command's foreground group. The
//! gateway never relays bytes. If the gateway goes away mid-session the command keeps running.
//!
//! # Restart
//!
//! Stopping or killing the gateway does not stop sandboxes. A starting gateway reconciles
//! ([`lifecycle`]): it re-adopts ready sandboxes and their cgroups, rolls back half-created ones
//! and removes orphan cgroups under its cgroup base. Each sandbox's certificate authority is kept
//! under `<state dir>/ca` ([`trust`]), so a restarted gateway keeps terminating the TLS of the
//! sandboxes it re-adopts with the CA they already trust.

pub mod api;
pub mod launch;
pub mod lifecycle;
pub mod revisions;
mod server;
pub mod trust;
pub mod wire;

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    cgroup::{CgroupBase, CgroupError},
    config::{GatewayConfig, Paths},
    store::{SqliteStore, StoreError},
};

pub use lifecycle::{CgroupAttach, Sandboxes};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("a gateway is already running for {state_dir} (pid {pid})")]
    AlreadyRunning { state_dir: PathBuf, pid: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gateway config: {0}")]
    Config(String),
    #[error("cgroup base: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("reconciling sandboxes at start: {0}")]
    Reconcile(#[source] lifecycle::LifecycleError),
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("starting the proxy: {0}")]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error("sandbox certificate authorities: {0}")]
    Trust(#[from] trust::TrustError),
}

fn io_err(action: &'static str, path: &std::path::Path) -> impl FnOnce(io::Error) -> GatewayError {
    let path = path.to_path_buf();
    move |source| GatewayError::Io {
        action,
        path,
        source,
    }
}

/// Holds the per-state-directory lock for the gateway's lifetime.
#[derive(Debug)]
pub struct GatewayLock {
    _lock: Flock<File>,
}

impl GatewayLock {
    /// Takes the lock or reports the running gateway's pid.
    pub fn acquire(paths: &Paths) -> Result<Self, GatewayError> {
        let path = paths.lock_file();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("opening lock file", &path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0)
                    .map_err(io_err("writing lock file", &path))?;
                writeln!(&mut *lock, "{}", std::process::id())
                    .map_err(io_err("writing lock file", &path))?;
                Ok(Self { _lock: lock })
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(GatewayError::AlreadyRunning {
                state_dir: paths.state_dir.clone(),
                pid: fs::read_to_string(&path)
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            }),
            Err((_, e)) => Err(io_err("locking", &path)(e.into())),
        }
    }

    /// True when some process holds the lock of `paths` (a gateway is running or starting).
    pub fn is_held(paths: &Paths) -> bool {
        let Ok(file) = File::open(paths.lock_file()) else {
            return false;
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_) => false,
            Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
        }
    }
}

fn create_dir(path: &std::path::Path, mode: u32) -> Result<(), GatewayError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_err("creating", path))
}

/// Runs the gateway in the foreground until `POST /v1/shutdown`, SIGTERM or SIGINT.
pub fn run(paths: &Paths, config: &GatewayConfig) -> Result<(), GatewayError> {
    create_dir(&paths.state_dir, 0o700)?;
    create_dir(&paths.run_dir, 0o755)?;
    create_dir(&paths.sandboxes_dir(), 0o755)?;
    let _lock = GatewayLock::acquire(paths)?;

    let store = Arc::new(SqliteStore::open(&paths.database())?);
    let cgroups = CgroupBase::open(&config.gateway.cgroup_base)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(GatewayError::Runtime)?;
    // The listeners and the eBPF programs are up before any sandbox is (re-)attached, and the
    // proxy accepts only once every re-adopted sandbox has its policy in force: a connection
    // that arrives in between waits in the listen backlog instead of finding no sandbox.
    let network = crate::proxy::network::Network::start(config, store.clone())?;
    let listening = network.listening().to_vec();
    let cas = trust::CaStore::open(paths.ca_dir())?;
    let sandboxes = Arc::new(Sandboxes::new(
        store,
        paths.clone(),
        cgroups,
        cas,
        Some(Arc::clone(&network) as Arc<dyn CgroupAttach>),
    ));
    sandboxes.pause("start-before-reconcile");
    let done = sandboxes.reconcile().map_err(GatewayError::Reconcile)?;
    network.serve(&runtime);
    eprintln!(
        "gateway: pid {}, state {}, cgroups {}; re-adopted {:?}, rolled back {:?}, removed orphan cgroups {:?}",
        std::process::id(),
        paths.state_dir.display(),
        sandboxes.cgroup_base().display(),
        done.adopted,
        done.rolled_back,
        done.orphan_cgroups
    );

    let socket = paths.socket();
    // We hold the lock, so a socket file left here belongs to a dead gateway.
    match fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing stale socket", &socket)(e)),
    }
    // Bind under a restrictive umask so the socket is never reachable by others, even briefly.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = std::os::unix::net::UnixListener::bind(&socket);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(io_err("binding", &socket))?;
    // The socket's permissions decide who may drive the gateway.
    let mode = match &config.gateway.socket_group {
        None => 0o600,
        Some(group) => {
            let gid = nix::unistd::Group::from_name(group)
                .map_err(|e| GatewayError::Config(format!("[gateway] socket_group {group:?}: {e}")))?
                .ok_or_else(|| {
                    GatewayError::Config(format!(
                        "[gateway] socket_group {group:?}: no such group (create it with `groupadd {group}`)"
                    ))
                })?
                .gid;
            nix::unistd::chown(&socket, None, Some(gid))
                .map_err(|e| io_err("changing the group of", &socket)(e.into()))?;
            0o660
        }
    };
    fs::set_permissions(&socket, fs::Permissions::from_mode(mode))
        .map_err(io_err("setting permissions of", &socket))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("configuring", &socket))?;

    let state = server::State {
        sandboxes,
        paths: paths.clone(),
        config: config.clone(),
        listening,
    };
    let served = runtime.block_on(server::serve(listener, state));
    let _ = fs::remove_file(&socket);
    // Sessions still waiting for their command keep a blocking thread; do not wait for them.
    runtime.shutdown_timeout(Duration::from_millis(200));
    eprintln!("gateway: stopped");
    served.map_err(io_err("serving", &socket))
}
