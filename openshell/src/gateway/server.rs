//! The HTTP/JSON API on the Unix socket and the exec sessions (see the module docs of
//! [`super`] for the protocol).

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use nix::{sys::signal::Signal, unistd::Pid};
use serde::Serialize;
use tokio::{
    io::Interest,
    net::{UnixListener, UnixStream},
    sync::watch,
};

use super::{
    api::{
        CreateSandbox, EXEC_UPGRADE, ErrorBody, ExecEvent, ExecRequest, GatewaySettings,
        GatewayStatus, LaunchEnforcement, LogRequest, LogResponse, SandboxSettings, SetPolicy,
        StaticEnforcement,
    },
    launch::{LaunchRequest, LaunchStdio, StaticConfig, launch},
    lifecycle::{LifecycleError, Sandboxes},
    revisions::RevisionError,
    wire::{EventReader, open_pty, send_event},
};
use crate::{
    config::{GatewayConfig, Paths},
    sandbox::EnforcementReport,
    store::{EventKind, LogQuery, RevisionStatus},
};

/// Largest request body (policies are at most 4 MiB).
const MAX_BODY: usize = 8 << 20;

#[derive(Clone)]
pub(super) struct State {
    pub sandboxes: Arc<Sandboxes>,
    pub paths: Paths,
    pub config: GatewayConfig,
    /// The addresses the proxy listens on.
    pub listening: Vec<std::net::SocketAddr>,
}

type Resp = Response<Full<Bytes>>;

pub(super) async fn serve(
    listener: std::os::unix::net::UnixListener,
    state: State,
) -> io::Result<()> {
    let listener = UnixListener::from_std(listener)?;
    let s = Arc::clone(&state.sandboxes);
    let started = tokio::task::spawn_blocking(move || {
        if let Err(e) = s.fail_stale_global() {
            eprintln!("gateway: checking the global policy revisions: {e}");
        }
        s.record_event(
            None,
            EventKind::GatewayStarted,
            None,
            format!(
                "gateway started (pid {}, version {})",
                std::process::id(),
                env!("CARGO_PKG_VERSION")
            ),
        );
    });
    if let Err(e) = started.await {
        eprintln!("gateway: start-up bookkeeping failed: {e}");
    }
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let stop_tx = Arc::new(stop_tx);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("gateway: accept: {e}");
                        continue;
                    }
                };
                let state = state.clone();
                let stop_tx = Arc::clone(&stop_tx);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        let stop_tx = Arc::clone(&stop_tx);
                        async move { Ok::<_, std::convert::Infallible>(route(state, stop_tx, req).await) }
                    });
                    if let Err(e) = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await
                    {
                        eprintln!("gateway: connection: {e}");
                    }
                });
            }
            _ = stop_rx.changed() => break,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    Ok(())
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: u16, kind: &str, message: impl Into<String>) -> Resp {
    json(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &ErrorBody {
            kind: kind.to_owned(),
            error: message.into(),
        },
    )
}

fn lifecycle_error(e: &LifecycleError) -> Resp {
    let (kind, status) = e.kind();
    error(status, kind, e.to_string())
}

async fn body_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Resp> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| error(400, "bad_request", format!("reading request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(400, "bad_request", format!("request body: {e}")))
}

/// Runs a blocking lifecycle call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LifecycleError> + Send + 'static,
) -> Result<T, Resp> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(lifecycle_error(&e)),
        Err(e) => Err(error(500, "internal", format!("gateway task failed: {e}"))),
    }
}

async fn route(state: State, stop: Arc<watch::Sender<bool>>, req: Request<Incoming>) -> Resp {
    let path: Vec<String> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let result = match (&method, path.as_slice()) {
        (&Method::GET, ["v1", "status"]) => status(&state).await,
        (&Method::POST, ["v1", "shutdown"]) => {
            let _ = stop.send(true);
            Ok(json(StatusCode::OK, &serde_json::json!({})))
        }
        (&Method::GET, ["v1", "sandboxes"]) => {
            let s = Arc::clone(&state.sandboxes);
            blocking(move || s.list())
                .await
                .map(|list| json(StatusCode::OK, &list))
        }
        (&Method::POST, ["v1", "sandboxes"]) => match body_json::<CreateSandbox>(req).await {
            Ok(body) => {
                let s = Arc::clone(&state.sandboxes);
                blocking(move || {
                    let info = s.create(&body)?;
                    s.record_event(
                        Some(&info.name),
                        EventKind::SandboxCreated,
                        None,
                        format!("sandbox created (policy from {})", info.policy_source),
                    );
                    Ok(info)
                })
                .await
                .map(|info| json(StatusCode::CREATED, &info))
            }
            Err(resp) => Err(resp),
        },
        (&Method::GET, ["v1", "sandboxes", name]) => {
            let (s, name) = (Arc::clone(&state.sandboxes), (*name).to_owned());
            blocking(move || s.get(&name))
                .await
                .map(|info| json(StatusCode::OK, &info))
        }
        (&Method::DELETE, ["v1", "sandboxes", name]) => {
            let (s, name) = (Arc::clone(&state.sandboxes), (*name).to_owned());
            blocking(move || {
                s.delete(&name)?;
                s.record_event(
                    Some(&name),
                    EventKind::SandboxDeleted,
                    None,
                    "sandbox deleted",
                );
                Ok(())
            })
            .await
            .map(|()| json(StatusCode::OK, &serde_json::json!({})))
        }
        (&Method::GET, ["v1", "sandboxes", name, "logs"]) => {
            let (s, name) = (Arc::clone(&state.sandboxes), (*name).to_owned());
            let limit = crate::cli::logs::limit_from_query(req.uri().query());
            blocking(move || s.decisions(&name, limit))
                .await
                .map(|records| json(StatusCode::OK, &records))
        }
        (&Method::GET, ["v1", "sandboxes", name, "log"]) => {
            let name = (*name).to_owned();
            log(&state, name, req.uri().query().unwrap_or("")).await
        }
        (&Method::GET, ["v1", "sandboxes", name, "settings"]) => {
            let name = (*name).to_owned();
            settings(&state, name).await
        }
        (&Method::GET, ["v1", "policy", "global"]) => {
            let s = Arc::clone(&state.sandboxes);
            revision_call(move || s.global_revisions())
                .await
                .map(|revisions| json(StatusCode::OK, &revisions))
        }
        (&Method::PUT, ["v1", "policy", "global"]) => set_global_policy(&state, req).await,
        (&Method::DELETE, ["v1", "policy", "global"]) => {
            let s = Arc::clone(&state.sandboxes);
            revision_call(move || s.delete_global_policy())
                .await
                .map(|result| json(StatusCode::OK, &result))
        }
        (&Method::GET, ["v1", "sandboxes", name, "policy"]) => {
            let (s, name) = (Arc::clone(&state.sandboxes), (*name).to_owned());
            revision_call(move || s.policy_revisions(&name))
                .await
                .map(|revisions| json(StatusCode::OK, &revisions))
        }
        (&Method::GET, ["v1", "sandboxes", name, "policy", version]) => {
            match version.parse::<i64>() {
                Ok(version) => {
                    let (s, name) = (Arc::clone(&state.sandboxes), (*name).to_owned());
                    revision_call(move || s.policy_revision(&name, version))
                        .await
                        .map(|revision| json(StatusCode::OK, &revision))
                }
                Err(_) => Err(bad_version(version)),
            }
        }
        (&Method::GET, ["v1", "sandboxes", name, "policy", version, "status"]) => {
            let wait = wait_from_query(req.uri().query());
            revision_status(&state, name, version, wait).await
        }
        (&Method::POST, ["v1", "sandboxes", name, "policy"]) => {
            let name = (*name).to_owned();
            set_policy(&state, name, req).await
        }
        (&Method::POST, ["v1", "sandboxes", name, "exec"]) => {
            let name = (*name).to_owned();
            exec(state, name, req).await
        }
        _ => Err(error(
            404,
            "not_found",
            format!("no API route {method} {}", path.join("/")),
        )),
    };
    result.unwrap_or_else(|resp| resp)
}

fn revision_error(e: &RevisionError) -> Resp {
    let (kind, status) = e.kind();
    error(status, kind, e.to_string())
}

/// Runs a blocking policy-revision call off the async workers.
async fn revision_call<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RevisionError> + Send + 'static,
) -> Result<T, Resp> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(revision_error(&e)),
        Err(e) => Err(error(500, "internal", format!("gateway task failed: {e}"))),
    }
}

/// Longest `wait_ms` a revision request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// `wait_ms=N` from a query string, at most [`MAX_WAIT`]; zero when absent.
fn wait_from_query(query: Option<&str>) -> Duration {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("wait_ms="))
        .and_then(|v| v.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis)
        .min(MAX_WAIT)
}

fn bad_version(version: &str) -> Resp {
    error(
        400,
        "bad_request",
        format!("policy revision {version:?} is not a version number"),
    )
}

/// One revision's state, without its text. With a wait, a `pending` revision is answered as
/// soon as it settles (`loaded` or `failed`), or when the wait is over, whichever comes first.
async fn revision_status(
    state: &State,
    name: &str,
    version: &str,
    wait: Duration,
) -> Result<Resp, Resp> {
    let version: i64 = version.parse().map_err(|_| bad_version(version))?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut settled = state.sandboxes.revisions_settled();
    loop {
        settled.mark_unchanged();
        let (s, n) = (Arc::clone(&state.sandboxes), name.to_owned());
        let rev = revision_call(move || s.policy_revision_info(&n, version)).await?;
        if rev.status != RevisionStatus::Pending
            || !matches!(
                tokio::time::timeout_at(deadline, settled.changed()).await,
                Ok(Ok(()))
            )
        {
            return Ok(json(StatusCode::OK, &rev));
        }
    }
}

/// Answers as soon as the new revision is recorded (`pending`); loading continues after the
/// response.
async fn set_policy(state: &State, name: String, req: Request<Incoming>) -> Result<Resp, Resp> {
    let body: SetPolicy = body_json(req).await?;
    let s = Arc::clone(&state.sandboxes);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::task::spawn_blocking(move || {
        let result = s.set_policy(&name, &body, |recorded| {
            let _ = tx.send(recorded);
        });
        if let Err(e) = &result {
            eprintln!("gateway: sandbox {name:?}: policy update: {e}");
        }
        result
    });
    if let Ok(recorded) = rx.await {
        return Ok(json(StatusCode::OK, &recorded));
    }
    match task.await {
        Ok(Err(e)) => Err(revision_error(&e)),
        Ok(Ok(())) => Err(error(500, "internal", "the policy update recorded nothing")),
        Err(e) => Err(error(500, "internal", format!("gateway task failed: {e}"))),
    }
}

/// Like [`set_policy`], for the global policy.
async fn set_global_policy(state: &State, req: Request<Incoming>) -> Result<Resp, Resp> {
    let body: SetPolicy = body_json(req).await?;
    let s = Arc::clone(&state.sandboxes);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::task::spawn_blocking(move || {
        let result = s.set_global_policy(&body, |recorded| {
            let _ = tx.send(recorded);
        });
        if let Err(e) = &result {
            eprintln!("gateway: global policy update: {e}");
        }
        result
    });
    if let Ok(recorded) = rx.await {
        return Ok(json(StatusCode::OK, &recorded));
    }
    match task.await {
        Ok(Err(e)) => Err(revision_error(&e)),
        Ok(Ok(())) => Err(error(500, "internal", "the policy update recorded nothing")),
        Err(e) => Err(error(500, "internal", format!("gateway task failed: {e}"))),
    }
}

/// Most rows of each log one `log` request returns.
const MAX_LOG_ROWS: usize = crate::cli::logs::MAX_LINES;

async fn log(state: &State, name: String, query: &str) -> Result<Resp, Resp> {
    let req =
        LogRequest::from_query(query, MAX_LOG_ROWS).map_err(|e| error(400, "bad_request", e))?;
    let s = Arc::clone(&state.sandboxes);
    blocking(move || {
        if s.store().sandbox(&name)?.is_none() {
            return Err(LifecycleError::NotFound { name });
        }
        let query = |after_id| LogQuery {
            after_id,
            since_ms: req.since_ms,
            limit: req.limit,
        };
        let decisions = if req.source.decisions() {
            Some(s.store().decision_page(&name, &query(req.after_decision))?)
        } else {
            None
        };
        let events = if req.source.events() {
            Some(s.store().event_page(&name, &query(req.after_event))?)
        } else {
            None
        };
        Ok(LogResponse { decisions, events })
    })
    .await
    .map(|page| json(StatusCode::OK, &page))
}

async fn settings(state: &State, name: String) -> Result<Resp, Resp> {
    let s = Arc::clone(&state.sandboxes);
    let n = name.clone();
    let policy = revision_call(move || s.effective_policy(&n)).await?;
    let s = Arc::clone(&state.sandboxes);
    let n = name.clone();
    let record = blocking(move || {
        s.store()
            .sandbox(&n)?
            .ok_or(LifecycleError::NotFound { name: n })
    })
    .await?;
    let config: StaticConfig = serde_json::from_str(&record.static_policy).map_err(|e| {
        error(
            500,
            "internal",
            format!("sandbox {name:?}: stored static policy does not parse: {e}"),
        )
    })?;
    let launch = record
        .report
        .as_deref()
        .and_then(|r| serde_json::from_str::<EnforcementReport>(r).ok())
        .map(|r| LaunchEnforcement {
            landlock_abi: r.landlock.abi,
            landlock_status: r.landlock.status,
            landlock_scoped: r.landlock.scoped,
            landlock_skipped: r
                .landlock
                .skipped
                .iter()
                .map(|p| format!("{}: {}", p.path.display(), p.reason))
                .collect(),
            seccomp_enabled: r.seccomp.enabled,
            seccomp_blocked: r.seccomp.blocked.len(),
            seccomp_foreign_arch: r.seccomp.foreign_arch,
            no_new_privs: r.no_new_privs,
            uid: r.identity.uid,
            gid: r.identity.gid,
            warnings: r.warnings,
        });
    Ok(json(
        StatusCode::OK,
        &SandboxSettings {
            sandbox: name,
            policy,
            static_enforcement: StaticEnforcement {
                landlock_compatibility: config.compatibility,
                run_as_user: config.run_as_user,
                run_as_group: config.run_as_group,
                launch,
            },
            gateway: gateway_settings(state),
        },
    ))
}

fn gateway_settings(state: &State) -> GatewaySettings {
    let config = &state.config;
    GatewaySettings {
        state_dir: state.paths.state_dir.display().to_string(),
        socket: state.paths.socket().display().to_string(),
        socket_group: config.gateway.socket_group.clone(),
        cgroup_base: state.sandboxes.cgroup_base().display().to_string(),
        dns_upstream: config
            .dns_upstreams()
            .iter()
            .map(ToString::to_string)
            .collect(),
        dns_upstream_from: if config.dns.upstream.is_empty() {
            "/etc/resolv.conf".to_owned()
        } else {
            "config".to_owned()
        },
        dns_listen: config.dns.listen.to_string(),
        transparent_listen: config.proxy.transparent_listen.to_string(),
        relay: config.proxy.relay.name().to_owned(),
        listening: state.listening.iter().map(ToString::to_string).collect(),
        extra_roots: config
            .tls
            .extra_roots
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    }
}

async fn status(state: &State) -> Result<Resp, Resp> {
    let s = Arc::clone(&state.sandboxes);
    let count = blocking(move || s.list()).await?.len();
    Ok(json(
        StatusCode::OK,
        &GatewayStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            state_dir: state.paths.state_dir.display().to_string(),
            socket: state.paths.socket().display().to_string(),
            cgroup: state.sandboxes.cgroup_base().display().to_string(),
            sandboxes: count,
        },
    ))
}

async fn exec(state: State, name: String, mut req: Request<Incoming>) -> Result<Resp, Resp> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        == Some(EXEC_UPGRADE);
    if !wants {
        return Err(error(
            400,
            "bad_request",
            format!("exec needs `Upgrade: {EXEC_UPGRADE}`"),
        ));
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let body: ExecRequest = body_json(req).await?;
    if body.argv.is_empty() {
        return Err(error(400, "bad_request", "exec: no command given"));
    }
    let s = Arc::clone(&state.sandboxes);
    let (argv, env, n) = (body.argv.clone(), body.env.clone(), name.clone());
    let launch_req = blocking(move || s.launch_request(&n, argv, &env)).await?;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => match upgraded.downcast::<TokioIo<UnixStream>>() {
                Ok(parts) => {
                    let stream = parts.io.into_inner();
                    let reader = EventReader::with_prefix(&parts.read_buf);
                    if let Err(e) = session(&state, &name, body, launch_req, stream, reader).await {
                        eprintln!("gateway: exec in {name:?}: {e}");
                    }
                }
                Err(_) => eprintln!("gateway: exec in {name:?}: upgraded stream of unknown type"),
            },
            Err(e) => eprintln!("gateway: exec in {name:?}: upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    resp.headers_mut().insert(
        header::UPGRADE,
        header::HeaderValue::from_static(EXEC_UPGRADE),
    );
    Ok(resp)
}

async fn send(stream: &UnixStream, event: &ExecEvent, fds: &[&OwnedFd]) -> io::Result<()> {
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    stream
        .async_io(Interest::WRITABLE, || {
            send_event(stream.as_fd(), event, &borrowed)
        })
        .await
}

/// The next event from the CLI, or `None` when it closed its end.
async fn recv(stream: &UnixStream, reader: &mut EventReader) -> io::Result<Option<ExecEvent>> {
    loop {
        if let Some(ev) = reader.next_buffered()? {
            return Ok(Some(ev));
        }
        if reader.at_eof() {
            return Ok(None);
        }
        stream
            .async_io(Interest::READABLE, || reader.fill(stream.as_fd()))
            .await?;
    }
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

async fn session(
    state: &State,
    name: &str,
    req: ExecRequest,
    launch_req: LaunchRequest,
    stream: UnixStream,
    mut reader: EventReader,
) -> io::Result<()> {
    send(&stream, &ExecEvent::Ready, &[]).await?;
    match recv(&stream, &mut reader).await? {
        Some(ExecEvent::Stdio) => {}
        _ => return Err(protocol_error("expected the stdio message")),
    }
    let mut fds = reader.take_fds().into_iter();
    let (stdio, master) = if req.tty {
        let pty = open_pty(req.rows, req.cols)?;
        let stdio = LaunchStdio {
            stdin: pty.slave.try_clone()?,
            stdout: pty.slave.try_clone()?,
            stderr: pty.slave,
            controlling_tty: true,
        };
        (stdio, Some(pty.master))
    } else {
        match (fds.next(), fds.next(), fds.next()) {
            (Some(stdin), Some(stdout), Some(stderr)) => (
                LaunchStdio {
                    stdin,
                    stdout,
                    stderr,
                    controlling_tty: false,
                },
                None,
            ),
            _ => return Err(protocol_error("expected stdin, stdout and stderr")),
        }
    };
    let launched = tokio::task::spawn_blocking(move || launch(&launch_req, stdio))
        .await
        .map_err(io::Error::other)?;
    let launched = match launched {
        Ok(l) => l,
        Err(e) => {
            let message = format!("sandbox {name:?}: {e}");
            return send(&stream, &ExecEvent::Error { message }, &[]).await;
        }
    };
    let pid = launched.pid;
    let s = Arc::clone(&state.sandboxes);
    let (n, report) = (name.to_owned(), launched.report);
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.record_report(&n, &report)).await {
        eprintln!("gateway: recording the enforcement report of {name:?}: {e}");
    }
    let started = send(
        &stream,
        &ExecEvent::Started { pid },
        &master.iter().collect::<Vec<_>>(),
    )
    .await;
    drop(master);
    let mut exit = tokio::task::spawn_blocking(move || wait_exit(pid));
    let mut client_open = started.is_ok();
    loop {
        tokio::select! {
            code = &mut exit => {
                let code = code.map_err(io::Error::other)?;
                if client_open {
                    send(&stream, &ExecEvent::Exited { code }, &[]).await?;
                }
                return Ok(());
            }
            ev = recv(&stream, &mut reader), if client_open => match ev {
                Ok(Some(ExecEvent::Signal { signal })) => {
                    // The child is not reaped before `exit` completes, so `pid` is still ours.
                    if let Ok(sig) = Signal::try_from(signal) {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
                    }
                }
                Ok(Some(_)) => {}
                // The CLI went away; the command keeps running and is still reaped here.
                Ok(None) | Err(_) => client_open = false,
            },
        }
    }
}

/// Waits for `pid` (a child of this process) and returns its exit code, 128 + signal if killed.
fn wait_exit(pid: i32) -> i32 {
    use nix::sys::wait::{WaitStatus, waitpid};
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return 255,
        }
    }
}
