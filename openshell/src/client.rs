//! The CLI's side of the gateway API: JSON requests over the Unix socket, starting a gateway in
//! the background when none runs, and exec sessions (terminal relay, signals, exit code).

use std::{
    fs::OpenOptions,
    io::{self, Read as _, Write as _},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::{net::UnixStream as StdUnixStream, process::CommandExt as _},
    },
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::TokioIo;
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, SigmaskHow, Signal, pthread_sigmask},
        signalfd::{SfdFlags, SignalFd},
        termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use crate::{
    config::Paths,
    gateway::{
        GatewayLock,
        api::{
            CreateSandbox, EXEC_UPGRADE, ErrorBody, ExecEvent, ExecRequest, GatewayStatus,
            SandboxInfo,
        },
        wire::{EventReader, send_event, set_window_size, window_size},
    },
};

/// How long the CLI waits for a gateway it started (or that is starting) to answer.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `gateway stop` waits for the gateway to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// After the command exited, how long to keep copying pty output that is still buffered.
const DRAIN_IDLE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no gateway is running for {state_dir} (start one with `openshell gateway start`)")]
    NotRunning { state_dir: PathBuf },
    #[error("starting the gateway: {message}")]
    Start { message: String },
    #[error("{message}")]
    Api {
        status: u16,
        kind: String,
        message: String,
    },
    #[error("talking to the gateway at {socket}: {message}")]
    Transport { socket: PathBuf, message: String },
    #[error("the command did not start: {0}")]
    Launch(String),
    #[error("lost the connection to the gateway; the command's exit code is unknown")]
    GatewayLost,
    #[error("terminal: {0}")]
    Terminal(#[source] io::Error),
}

impl ClientError {
    /// True for a 404 from the API.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api { status: 404, .. })
    }
}

/// A connection factory for one gateway.
pub struct Client {
    paths: Paths,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("paths", &self.paths)
            .finish()
    }
}

impl Client {
    /// A client for the gateway of `paths`; nothing is contacted yet.
    pub fn new(paths: Paths) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Start {
                message: format!("async runtime: {e}"),
            })?;
        Ok(Self { paths, runtime })
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// True when a gateway holds the lock and answers a status request. (A socket that merely
    /// accepts connections may belong to a gateway that was just killed and is being torn down.)
    pub fn is_running(&self) -> bool {
        GatewayLock::is_held(&self.paths)
            && StdUnixStream::connect(self.paths.socket()).is_ok()
            && self.status().is_ok()
    }

    /// Makes sure a gateway runs, starting one in the background (and saying so on stderr)
    /// when none does.
    pub fn ensure_running(&self) -> Result<(), ClientError> {
        let start = Instant::now();
        loop {
            if self.is_running() {
                return Ok(());
            }
            // A held lock without a socket is a gateway starting up (or one that was just
            // killed and is still being torn down): wait for it, bounded.
            if !GatewayLock::is_held(&self.paths) {
                let pid = self.start_background()?;
                eprintln!(
                    "openshell: no gateway was running; started one in the background (pid {pid}, log {})",
                    self.paths.log_file().display()
                );
                return Ok(());
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(ClientError::Start {
                    message: format!(
                        "a gateway holds {} but does not answer on {}",
                        self.paths.lock_file().display(),
                        self.paths.socket().display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `openshell gateway start --foreground` detached, logging to the state directory,
    /// and waits until it answers. Returns its pid.
    pub fn start_background(&self) -> Result<u32, ClientError> {
        let start_err = |message: String| ClientError::Start { message };
        std::fs::create_dir_all(&self.paths.state_dir)
            .map_err(|e| start_err(format!("creating {}: {e}", self.paths.state_dir.display())))?;
        let log_path = self.paths.log_file();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| start_err(format!("opening {}: {e}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| start_err(format!("opening {}: {e}", log_path.display())))?;
        let exe = std::env::current_exe()
            .map_err(|e| start_err(format!("finding the openshell binary: {e}")))?;
        let mut command = Command::new(exe);
        command
            .args(["gateway", "start", "--foreground"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .current_dir("/");
        // SAFETY: setsid is async-signal-safe; it detaches the gateway from our terminal and
        // session so that it outlives this CLI.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| start_err(format!("spawning the gateway: {e}")))?;
        self.wait_until_up(&mut child)?;
        Ok(child.id())
    }

    fn wait_until_up(&self, child: &mut std::process::Child) -> Result<(), ClientError> {
        let start = Instant::now();
        while start.elapsed() < START_TIMEOUT {
            if self.is_running() {
                return Ok(());
            }
            // Our gateway exited: fine if another one (started concurrently) holds the lock.
            if let Ok(Some(status)) = child.try_wait()
                && !GatewayLock::is_held(&self.paths)
            {
                return Err(ClientError::Start {
                    message: format!(
                        "the gateway exited ({status}); see {}:\n{}",
                        self.paths.log_file().display(),
                        log_tail(&self.paths.log_file())
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ClientError::Start {
            message: format!(
                "the gateway did not answer on {} within {START_TIMEOUT:?}; see {}",
                self.paths.socket().display(),
                self.paths.log_file().display()
            ),
        })
    }

    /// Asks the gateway to exit and waits until it has. Sandboxes keep running.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        let _: serde_json::Value = self.call(Method::POST, "/v1/shutdown", None::<&()>)?;
        let start = Instant::now();
        while start.elapsed() < STOP_TIMEOUT {
            if !GatewayLock::is_held(&self.paths) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ClientError::Start {
            message: format!("the gateway did not exit within {STOP_TIMEOUT:?}"),
        })
    }

    pub fn status(&self) -> Result<GatewayStatus, ClientError> {
        self.call(Method::GET, "/v1/status", None::<&()>)
    }

    pub fn list(&self) -> Result<Vec<SandboxInfo>, ClientError> {
        self.call(Method::GET, "/v1/sandboxes", None::<&()>)
    }

    pub fn get(&self, name: &str) -> Result<SandboxInfo, ClientError> {
        self.call(Method::GET, &format!("/v1/sandboxes/{name}"), None::<&()>)
    }

    pub fn create(&self, req: &CreateSandbox) -> Result<SandboxInfo, ClientError> {
        self.call(Method::POST, "/v1/sandboxes", Some(req))
    }

    /// The newest `limit` network decisions of sandbox `name`, oldest first.
    pub fn logs(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<Vec<crate::store::DecisionRecord>, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/sandboxes/{name}/logs?n={limit}"),
            None::<&()>,
        )
    }

    /// Every policy revision of sandbox `name`, newest first.
    pub fn policy_revisions(
        &self,
        name: &str,
    ) -> Result<Vec<crate::store::PolicyRevision>, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/sandboxes/{name}/policy"),
            None::<&()>,
        )
    }

    /// The state of revision `version` of sandbox `name` (without its text); if it is
    /// `pending`, the gateway answers once it is loaded or failed, or after `wait`.
    pub fn revision_status(
        &self,
        name: &str,
        version: i64,
        wait: std::time::Duration,
    ) -> Result<crate::store::RevisionInfo, ClientError> {
        self.call(
            Method::GET,
            &format!(
                "/v1/sandboxes/{name}/policy/{version}/status?wait_ms={}",
                wait.as_millis()
            ),
            None::<&()>,
        )
    }

    /// Submits a new policy for sandbox `name`; the answer comes once it is recorded.
    pub fn set_policy(
        &self,
        name: &str,
        req: &crate::gateway::api::SetPolicy,
    ) -> Result<crate::gateway::api::SetPolicyResult, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{name}/policy"),
            Some(req),
        )
    }

    /// A page of sandbox `name`'s decision log and/or gateway events (see
    /// [`crate::gateway::api::LogRequest`]).
    pub fn log_page(
        &self,
        name: &str,
        req: &crate::gateway::api::LogRequest,
    ) -> Result<crate::gateway::api::LogResponse, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/sandboxes/{name}/log?{}", req.to_query()),
            None::<&()>,
        )
    }

    /// What governs sandbox `name`: policy source and revision, static enforcement, gateway
    /// settings.
    pub fn settings(
        &self,
        name: &str,
    ) -> Result<crate::gateway::api::SandboxSettings, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/sandboxes/{name}/settings"),
            None::<&()>,
        )
    }

    /// Every revision of the global policy, newest first.
    pub fn global_revisions(&self) -> Result<Vec<crate::store::PolicyRevision>, ClientError> {
        self.call(Method::GET, "/v1/policy/global", None::<&()>)
    }

    /// Submits a new global policy; the answer comes once it is recorded.
    pub fn set_global_policy(
        &self,
        req: &crate::gateway::api::SetPolicy,
    ) -> Result<crate::gateway::api::SetPolicyResult, ClientError> {
        self.call(Method::PUT, "/v1/policy/global", Some(req))
    }

    /// Removes the global policy; every sandbox returns to its own.
    pub fn delete_global_policy(
        &self,
    ) -> Result<crate::gateway::api::DeleteGlobalResult, ClientError> {
        self.call(Method::DELETE, "/v1/policy/global", None::<&()>)
    }

    pub fn delete(&self, name: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self.call(
            Method::DELETE,
            &format!("/v1/sandboxes/{name}"),
            None::<&()>,
        )?;
        Ok(())
    }

    fn transport(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport {
            socket: self.paths.socket(),
            message: e.to_string(),
        }
    }

    fn request<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        upgrade: bool,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| self.transport(e))?,
            None => Vec::new(),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "openshell")
            .header(header::CONTENT_TYPE, "application/json");
        if upgrade {
            builder = builder
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, EXEC_UPGRADE);
        }
        builder
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| self.transport(e))
    }

    async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let stream = UnixStream::connect(self.paths.socket())
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning {
                        state_dir: self.paths.state_dir.clone(),
                    }
                }
                _ => self.transport(e),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.transport(e))?;
        tokio::spawn(conn.with_upgrades());
        sender
            .send_request(req)
            .await
            .map_err(|e| self.transport(e))
    }

    async fn api_error(&self, resp: hyper::Response<Incoming>) -> ClientError {
        let status = resp.status().as_u16();
        let bytes = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return self.transport(e),
        };
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => ClientError::Api {
                status,
                kind: body.kind,
                message: body.error,
            },
            Err(_) => ClientError::Api {
                status,
                kind: "unknown".to_owned(),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            },
        }
    }

    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let req = self.request(method, path, body, false)?;
        self.runtime.block_on(async {
            let resp = self.send(req).await?;
            if !resp.status().is_success() {
                return Err(self.api_error(resp).await);
            }
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.transport(e))?
                .to_bytes();
            serde_json::from_slice(&bytes).map_err(|e| self.transport(e))
        })
    }

    /// Runs a command in sandbox `name` attached to this process's stdio (a pty relay when
    /// `req.tty`) and returns its exit code.
    pub fn exec(&self, name: &str, req: &ExecRequest) -> Result<i32, ClientError> {
        let http = self.request(
            Method::POST,
            &format!("/v1/sandboxes/{name}/exec"),
            Some(req),
            true,
        )?;
        let (stream, prefix) = self.runtime.block_on(async {
            let resp = self.send(http).await?;
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                return Err(self.api_error(resp).await);
            }
            let upgraded = hyper::upgrade::on(resp)
                .await
                .map_err(|e| self.transport(e))?;
            let parts = upgraded
                .downcast::<TokioIo<UnixStream>>()
                .map_err(|_| self.transport("upgraded stream of unknown type"))?;
            let stream = parts
                .io
                .into_inner()
                .into_std()
                .map_err(|e| self.transport(e))?;
            Ok((stream, parts.read_buf.to_vec()))
        })?;
        stream
            .set_nonblocking(false)
            .map_err(|e| self.transport(e))?;
        Session {
            stream,
            reader: EventReader::with_prefix(&prefix),
            socket: self.paths.socket(),
        }
        .run(req.tty)
    }
}

fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// The CLI's end of an exec session (after the upgrade).
struct Session {
    stream: StdUnixStream,
    reader: EventReader,
    socket: PathBuf,
}

/// Signals the CLI forwards to the command (or, for SIGWINCH, turns into a window size).
const FORWARDED: [Signal; 5] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGWINCH,
];

/// Restores the terminal mode on drop.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> io::Result<Self> {
        let stdin = io::stdin();
        let saved = tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

fn write_all_fd(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

impl Session {
    fn lost(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport {
            socket: self.socket.clone(),
            message: e.to_string(),
        }
    }

    fn send(&self, event: &ExecEvent, fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        send_event(self.stream.as_fd(), event, fds).map_err(|e| self.lost(e))
    }

    /// Blocks for the next event; `None` when the gateway closed the stream.
    fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        loop {
            if let Some(ev) = self.reader.next_buffered().map_err(|e| self.lost(e))? {
                return Ok(Some(ev));
            }
            if self.reader.at_eof() {
                return Ok(None);
            }
            self.reader
                .fill(self.stream.as_fd())
                .map_err(|e| self.lost(e))?;
        }
    }

    fn run(mut self, tty: bool) -> Result<i32, ClientError> {
        // Signals become events on a signalfd. Block them before the command can start (so
        // none is lost in between) and before any thread exists (threads inherit the mask).
        let mut mask = SigSet::empty();
        for s in FORWARDED {
            mask.add(s);
        }
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
            .map_err(|e| ClientError::Terminal(e.into()))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)
            .map_err(|e| ClientError::Terminal(e.into()))?;
        match self.next_event()? {
            Some(ExecEvent::Ready) => {}
            other => return Err(self.lost(format!("expected ready, got {other:?}"))),
        }
        if tty {
            self.send(&ExecEvent::Stdio, &[])?;
        } else {
            let (i, o, e) = (io::stdin(), io::stdout(), io::stderr());
            self.send(&ExecEvent::Stdio, &[i.as_fd(), o.as_fd(), e.as_fd()])?;
        }
        match self.next_event()? {
            Some(ExecEvent::Started { .. }) => {}
            Some(ExecEvent::Error { message }) => return Err(ClientError::Launch(message)),
            Some(other) => return Err(self.lost(format!("expected started, got {other:?}"))),
            None => return Err(ClientError::GatewayLost),
        }
        let master = if tty {
            match self.reader.take_fds().pop() {
                Some(m) => Some(m),
                None => return Err(self.lost("no pty master received")),
            }
        } else {
            None
        };
        match master {
            Some(master) => self.relay(master, &signals),
            None => self.wait(&signals),
        }
    }

    fn forward_signal(
        &self,
        signals: &SignalFd,
        master: Option<&OwnedFd>,
    ) -> Result<(), ClientError> {
        let Ok(Some(info)) = signals.read_signal() else {
            return Ok(());
        };
        let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
        if signo == Signal::SIGWINCH as i32 {
            if let Some(master) = master
                && let Ok((rows, cols)) = window_size(io::stdin().as_fd())
            {
                let _ = set_window_size(master.as_fd(), rows, cols);
            }
            return Ok(());
        }
        self.send(&ExecEvent::Signal { signal: signo }, &[])
    }

    /// Non-interactive: the command writes to our stdio directly; wait for its exit.
    fn wait(mut self, signals: &SignalFd) -> Result<i32, ClientError> {
        loop {
            let (sock_ready, sig_ready) = {
                let mut fds = [
                    PollFd::new(self.stream.as_fd(), PollFlags::POLLIN),
                    PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(self.lost(e)),
                }
                (fds[0].any().unwrap_or(false), fds[1].any().unwrap_or(false))
            };
            if sig_ready {
                self.forward_signal(signals, None)?;
            }
            if sock_ready {
                self.reader
                    .fill(self.stream.as_fd())
                    .map_err(|e| self.lost(e))?;
                while let Some(ev) = self.reader.next_buffered().map_err(|e| self.lost(e))? {
                    if let ExecEvent::Exited { code } = ev {
                        return Ok(code);
                    }
                }
                if self.reader.at_eof() {
                    return Err(ClientError::GatewayLost);
                }
            }
        }
    }

    /// Interactive: raw mode, copy terminal ⇄ pty master, until the command exits.
    fn relay(mut self, master: OwnedFd, signals: &SignalFd) -> Result<i32, ClientError> {
        let raw = RawMode::enter().map_err(ClientError::Terminal)?;
        if let Ok((rows, cols)) = window_size(io::stdin().as_fd()) {
            let _ = set_window_size(master.as_fd(), rows, cols);
        }
        let to_master = master.try_clone().map_err(ClientError::Terminal)?;
        // stdin → master on its own thread: a blocking read of the user's terminal that ends
        // with the process (we never set O_NONBLOCK on a terminal shared with the user's shell).
        std::thread::spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = [0u8; 4096];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if write_all_fd(to_master.as_fd(), &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stdout = io::stdout();
        let mut buf = [0u8; 16384];
        let mut master_open = true;
        let mut exit_code = None;
        let mut gateway_open = true;
        let mut drain_since: Option<Instant> = None;
        loop {
            if exit_code.is_some() && !master_open {
                break;
            }
            if !gateway_open && !master_open {
                break;
            }
            let timeout = if exit_code.is_some() {
                PollTimeout::from(DRAIN_IDLE.as_millis() as u16)
            } else {
                PollTimeout::NONE
            };
            let (m, s, g) = {
                let mut fds = vec![
                    PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                    PollFd::new(
                        self.stream.as_fd(),
                        if gateway_open {
                            PollFlags::POLLIN
                        } else {
                            PollFlags::empty()
                        },
                    ),
                    PollFd::new(
                        master.as_fd(),
                        if master_open {
                            PollFlags::POLLIN
                        } else {
                            PollFlags::empty()
                        },
                    ),
                ];
                match poll(&mut fds, timeout) {
                    Ok(0) => break, // draining after exit and nothing more came
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(self.lost(e)),
                }
                let ready = |f: &PollFd<'_>| f.any().unwrap_or(false);
                (ready(&fds[2]), ready(&fds[0]), ready(&fds[1]))
            };
            if s {
                self.forward_signal(signals, Some(&master))?;
            }
            if m {
                match nix::unistd::read(&master, &mut buf) {
                    Ok(0) | Err(nix::errno::Errno::EIO) => master_open = false,
                    Ok(n) => {
                        let mut out = stdout.lock();
                        if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                            master_open = false;
                        }
                    }
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                    Err(_) => master_open = false,
                }
            }
            if g {
                match self.reader.fill(self.stream.as_fd()) {
                    Ok(_) => {}
                    Err(_) => gateway_open = false,
                }
                while let Ok(Some(ev)) = self.reader.next_buffered() {
                    if let ExecEvent::Exited { code } = ev {
                        exit_code = Some(code);
                        drain_since = Some(Instant::now());
                    }
                }
                if self.reader.at_eof() {
                    gateway_open = false;
                }
            }
            // Background processes may keep the pty open after the command exited: stop
            // copying once it has been quiet for a moment, and in any case after a while.
            if drain_since.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
                break;
            }
        }
        drop(raw);
        exit_code.ok_or(ClientError::GatewayLost)
    }
}
