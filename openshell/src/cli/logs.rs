//! `openshell logs NAME [--tail] [-n N] [--since DURATION] [--source sandbox|gateway|all]
//! [-o text|json|ocsf]`: a sandbox's network decisions and the gateway's events, oldest first.
//!
//! Sources: `sandbox` (the default) is the sandbox's decision log; `gateway` the gateway events
//! that concern it (policy revisions loaded or failed, the sandbox created or deleted) and the
//! gateway-wide ones (global policy set or deleted, gateway started); `all` both, merged by time.
//! `-n` keeps the newest N lines, `--since` those of the last DURATION (`30s`, `5m`, `1h`, `2d`,
//! or sums such as `1h30m`), `--tail` then follows the logs until Ctrl-C (it polls the gateway
//! with a cursor, so nothing is printed twice or skipped; it stops with exit 1 and a message when
//! the gateway goes away or the sandbox is deleted).
//!
//! Text lines are short and greppable:
//! `TIME DENY  BINARY -> HOST:PORT (IP) block=B rev=N pid=P reason="..."` for decisions and
//! `TIME EVENT KIND sandbox=NAME rev=N message="..."` for gateway events (`-` for an absent
//! value, `sandbox=-` for gateway-wide events).
//!
//! JSON output is one object per line. A decision has exactly the keys `time`, `sandbox`,
//! `decision`, `binary`, `pid`, `ancestors`, `host`, `ip`, `port`, `block`, `reason`, `revision`
//! (`time` in RFC 3339 UTC with milliseconds); a gateway event has `time`, `source`
//! (`"gateway"`), `sandbox`, `event`, `revision`, `message`.
//!
//! `-o ocsf` prints each decision as an OCSF 1.3 Network Activity event (class 4001), one per
//! line (see [`ocsf_line`]); gateway events have no Network Activity form, so it needs
//! `--source sandbox`.

use std::{
    io::{self, Write as _},
    os::fd::AsFd as _,
    process::ExitCode,
    time::Duration,
};

use clap::{Args, ValueEnum};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, SigmaskHow, Signal, pthread_sigmask},
        signalfd::{SfdFlags, SignalFd},
    },
};
use serde::Serialize;

use crate::{
    client::{Client, ClientError},
    config::Paths,
    gateway::api::{LogRequest, LogResponse, LogSource},
    store::{DecisionRecord, GatewayEvent},
};

/// Decisions shown when `-n` is not given.
pub const DEFAULT_LINES: usize = 100;
/// Most decisions one request returns.
pub const MAX_LINES: usize = 100_000;
/// How long `--tail` waits between two looks at the logs.
const TAIL_INTERVAL: Duration = Duration::from_millis(250);
/// Most rows of each log one `--tail` request asks for (more are fetched at once).
const TAIL_PAGE: usize = 1000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
    /// OCSF 1.3 Network Activity (class 4001) JSON, one event per line.
    Ocsf,
}

/// `--source`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum SourceArg {
    /// The sandbox's decision log.
    #[default]
    Sandbox,
    /// Gateway events: policy revisions, sandbox created/deleted, global policy, restarts.
    Gateway,
    /// Both, merged by time.
    All,
}

impl From<SourceArg> for LogSource {
    fn from(s: SourceArg) -> Self {
        match s {
            SourceArg::Sandbox => Self::Sandbox,
            SourceArg::Gateway => Self::Gateway,
            SourceArg::All => Self::All,
        }
    }
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Sandbox name.
    pub name: String,
    /// Show the newest N lines.
    #[arg(short = 'n', long = "lines", default_value_t = DEFAULT_LINES)]
    pub lines: usize,
    /// Keep printing new lines as they come, until Ctrl-C.
    #[arg(long, short = 'f')]
    pub tail: bool,
    /// Only lines from the last DURATION: 30s, 5m, 1h, 2d, or a sum such as 1h30m.
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Which log: the sandbox's decisions, the gateway's events, or both.
    #[arg(long, value_enum, default_value_t)]
    pub source: SourceArg,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = LogFormat::Text)]
    pub output: LogFormat,
}

/// Parses `30s`, `5m`, `1h`, `2d`, `500ms` and sums of them (`1h30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| {
        format!("{text:?}: {why}; write a number and a unit (ms, s, m, h, d), e.g. 30s, 5m, 1h30m")
    };
    if text.is_empty() {
        return Err(bad("empty duration"));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad("expected a number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| bad("number too large"))?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds_per = match &rest[..unit] {
            "ms" => None,
            "s" => Some(1),
            "m" => Some(60),
            "h" => Some(3600),
            "d" => Some(86_400),
            "" => return Err(bad("missing unit")),
            other => return Err(bad(&format!("unknown unit {other:?}"))),
        };
        rest = &rest[unit..];
        let part = match seconds_per {
            None => Some(Duration::from_millis(number)),
            Some(per) => number.checked_mul(per).map(Duration::from_secs),
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| bad("too long"))?;
    }
    Ok(total)
}

/// `n` from an API query string (`n=50`), clamped to [`MAX_LINES`]; [`DEFAULT_LINES`] when
/// absent or malformed.
#[must_use]
pub fn limit_from_query(query: Option<&str>) -> usize {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("n="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(DEFAULT_LINES)
        .min(MAX_LINES)
}

/// One line of `logs` output.
#[derive(Debug, Clone, Copy)]
pub enum Entry<'a> {
    Decision(&'a DecisionRecord),
    Event(&'a GatewayEvent),
}

impl Entry<'_> {
    /// The entry in `format` (without the newline). Gateway events have no OCSF form; they
    /// come out as in `-o json`.
    pub fn render(&self, format: LogFormat) -> serde_json::Result<String> {
        match (self, format) {
            (Self::Decision(d), LogFormat::Text) => Ok(text_line(d)),
            (Self::Decision(d), LogFormat::Json) => json_line(d),
            (Self::Decision(d), LogFormat::Ocsf) => ocsf_line(d),
            (Self::Event(e), LogFormat::Text) => Ok(event_text_line(e)),
            (Self::Event(e), LogFormat::Json | LogFormat::Ocsf) => event_json_line(e),
        }
    }
}

/// The entries of `page` merged by time (ties: gateway events first, then by id), oldest first;
/// only the newest `keep` of them.
#[must_use]
pub fn merged(page: &LogResponse, keep: usize) -> Vec<Entry<'_>> {
    let mut entries: Vec<(i64, u8, i64, Entry<'_>)> = Vec::new();
    if let Some(events) = &page.events {
        entries.extend(
            events
                .rows
                .iter()
                .map(|(id, e)| (e.time_ms, 0, *id, Entry::Event(e))),
        );
    }
    if let Some(decisions) = &page.decisions {
        entries.extend(
            decisions
                .rows
                .iter()
                .map(|(id, d)| (d.time_ms, 1, *id, Entry::Decision(d))),
        );
    }
    entries.sort_by_key(|(time, kind, id, _)| (*time, *kind, *id));
    let skip = entries.len().saturating_sub(keep);
    entries.into_iter().skip(skip).map(|(.., e)| e).collect()
}

/// Writes `entries`; `Ok(false)` when stdout is closed (a pipe reader went away).
fn print(entries: &[Entry<'_>], format: LogFormat) -> anyhow::Result<bool> {
    let mut out = io::stdout().lock();
    for entry in entries {
        let line = entry.render(format)?;
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// SIGINT and SIGTERM as a readable descriptor (blocked for the whole process, so they only
/// end `--tail` through [`wait_or_signal`]).
fn signals() -> anyhow::Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
    Ok(SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)?)
}

/// Sleeps up to `timeout`; `true` when a signal arrived.
fn wait_or_signal(signals: &SignalFd, timeout: Duration) -> anyhow::Result<bool> {
    let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(millis)) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(false),
        Ok(_) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

fn gone(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::NotRunning { .. } | ClientError::Transport { .. }
    )
}

pub fn run(args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let source = LogSource::from(args.source);
    if args.output == LogFormat::Ocsf && source != LogSource::Sandbox {
        eprintln!(
            "error: -o ocsf prints OCSF Network Activity events, which only the decision log has: use --source sandbox (gateway events are in -o text and -o json)"
        );
        return Ok(ExitCode::from(super::policy::EXIT_BAD_ARGS));
    }
    // Blocked before the client exists, so no thread of ours ever takes them.
    let signals = if args.tail { Some(signals()?) } else { None };
    let client = Client::new(Paths::from_env())?;
    client.ensure_running()?;
    let since_ms = args.since.map(|d| {
        crate::proxy::log::now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    });
    let mut req = LogRequest {
        source,
        limit: args.lines.min(MAX_LINES),
        since_ms,
        after_decision: None,
        after_event: None,
    };
    let page = client.log_page(&args.name, &req)?;
    if !print(&merged(&page, req.limit), args.output)? {
        return Ok(ExitCode::SUCCESS);
    }
    let Some(signals) = signals else {
        return Ok(ExitCode::SUCCESS);
    };
    req.limit = TAIL_PAGE;
    let mut full = false;
    let mut cursor = page;
    loop {
        req.after_decision = cursor.decisions.as_ref().map(|p| p.last_id);
        req.after_event = cursor.events.as_ref().map(|p| p.last_id);
        // A full page means more is waiting: fetch it at once.
        if !full && wait_or_signal(&signals, TAIL_INTERVAL)? {
            return Ok(ExitCode::SUCCESS);
        }
        let page = match client.log_page(&args.name, &req) {
            Ok(page) => page,
            Err(e) => {
                if gone(&e) {
                    eprintln!("openshell: the gateway went away ({e}); stopped following");
                } else {
                    eprintln!("openshell: {e}; stopped following");
                }
                return Ok(ExitCode::FAILURE);
            }
        };
        full = [
            page.decisions.as_ref().map(|p| p.rows.len()),
            page.events.as_ref().map(|p| p.rows.len()),
        ]
        .into_iter()
        .flatten()
        .any(|n| n >= TAIL_PAGE);
        if !print(&merged(&page, usize::MAX), args.output)? {
            return Ok(ExitCode::SUCCESS);
        }
        cursor = page;
    }
}

/// The JSON object of one decision (the documented keys, in order).
#[derive(Debug, Serialize)]
struct JsonRecord<'a> {
    time: String,
    sandbox: &'a str,
    decision: &'a str,
    binary: Option<&'a str>,
    pid: Option<i64>,
    ancestors: &'a [String],
    host: Option<&'a str>,
    ip: Option<&'a str>,
    port: Option<u16>,
    block: Option<&'a str>,
    reason: &'a str,
    revision: Option<i64>,
}

/// One decision as a JSON object on one line.
pub fn json_line(r: &DecisionRecord) -> serde_json::Result<String> {
    serde_json::to_string(&JsonRecord {
        time: rfc3339_ms(r.time_ms),
        sandbox: &r.sandbox,
        decision: &r.decision,
        binary: r.binary.as_deref(),
        pid: r.pid,
        ancestors: &r.ancestors,
        host: r.host.as_deref(),
        ip: r.ip.as_deref(),
        port: r.port,
        block: r.block.as_deref(),
        reason: &r.reason,
        revision: r.revision,
    })
}

/// A gateway event as a JSON object on one line.
pub fn event_json_line(e: &GatewayEvent) -> serde_json::Result<String> {
    #[derive(Serialize)]
    struct JsonEvent<'a> {
        time: String,
        source: &'static str,
        sandbox: Option<&'a str>,
        event: &'static str,
        revision: Option<i64>,
        message: &'a str,
    }
    serde_json::to_string(&JsonEvent {
        time: rfc3339_ms(e.time_ms),
        source: "gateway",
        sandbox: e.sandbox.as_deref(),
        event: e.kind.as_str(),
        revision: e.revision,
        message: &e.message,
    })
}

/// `text` in double quotes, with `"`, `\` and control characters escaped, so that a line
/// stays one line and a value can be cut out with a regex.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// One decision as a line of text:
/// `TIME DECISION BINARY -> HOST:PORT (IP) block=B rev=N pid=P reason="..."`.
#[must_use]
pub fn text_line(r: &DecisionRecord) -> String {
    let port = r.port.map_or_else(String::new, |p| format!(":{p}"));
    let dest = match (&r.host, &r.ip) {
        (Some(h), Some(ip)) if h != ip => format!("{h}{port} ({ip})"),
        (Some(h), _) => format!("{h}{port}"),
        (None, Some(ip)) if ip.contains(':') => format!("[{ip}]{port}"),
        (None, Some(ip)) => format!("{ip}{port}"),
        (None, None) => format!("-{port}"),
    };
    format!(
        "{} {:<5} {} -> {dest} block={} rev={} pid={} reason={}",
        rfc3339_ms(r.time_ms),
        r.decision.to_uppercase(),
        r.binary.as_deref().unwrap_or("-"),
        r.block.as_deref().unwrap_or("-"),
        or_dash(r.revision),
        or_dash(r.pid),
        quoted(&r.reason)
    )
}

/// One gateway event as a line of text: `TIME EVENT KIND sandbox=NAME rev=N message="..."`.
#[must_use]
pub fn event_text_line(e: &GatewayEvent) -> String {
    format!(
        "{} EVENT {} sandbox={} rev={} message={}",
        rfc3339_ms(e.time_ms),
        e.kind.as_str(),
        e.sandbox.as_deref().unwrap_or("-"),
        or_dash(e.revision),
        quoted(&e.message)
    )
}

/// The OCSF version the `-o ocsf` events follow.
pub const OCSF_VERSION: &str = "1.3.0";

#[derive(Debug, Serialize)]
struct OcsfProduct {
    name: &'static str,
    vendor_name: &'static str,
    version: &'static str,
}

#[derive(Debug, Serialize)]
struct OcsfMetadata {
    version: &'static str,
    product: OcsfProduct,
    log_name: &'static str,
}

#[derive(Debug, Serialize)]
struct OcsfSrc<'a> {
    /// The sandbox the connection came from.
    name: &'a str,
}

#[derive(Debug, Serialize)]
struct OcsfDst<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

#[derive(Debug, Serialize)]
struct OcsfFile<'a> {
    path: &'a str,
    name: &'a str,
    /// 1: Regular File.
    type_id: u8,
}

impl<'a> OcsfFile<'a> {
    fn new(path: &'a str) -> Self {
        Self {
            path,
            name: path.rsplit('/').next().unwrap_or(path),
            type_id: 1,
        }
    }
}

#[derive(Debug, Serialize)]
struct OcsfParent<'a> {
    file: OcsfFile<'a>,
}

#[derive(Debug, Serialize)]
struct OcsfProcess<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<OcsfFile<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_process: Option<OcsfParent<'a>>,
}

#[derive(Debug, Serialize)]
struct OcsfActor<'a> {
    process: OcsfProcess<'a>,
}

#[derive(Debug, Serialize)]
struct OcsfConnection {
    /// 2: Outbound.
    direction_id: u8,
    direction: &'static str,
}

#[derive(Debug, Serialize)]
struct OcsfRule<'a> {
    /// The policy block that decided.
    name: &'a str,
    /// The policy revision in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
}

#[derive(Debug, Serialize)]
struct OcsfUnmapped<'a> {
    sandbox: &'a str,
    decision: &'a str,
    revision: Option<i64>,
    ancestors: &'a [String],
}

#[derive(Debug, Serialize)]
struct OcsfNetworkActivity<'a> {
    class_uid: u32,
    class_name: &'static str,
    category_uid: u8,
    category_name: &'static str,
    activity_id: u8,
    activity_name: &'static str,
    type_uid: u32,
    type_name: String,
    time: i64,
    time_dt: String,
    severity_id: u8,
    severity: &'static str,
    action_id: u8,
    action: &'static str,
    disposition_id: u8,
    disposition: &'static str,
    status_id: u8,
    status: &'static str,
    message: &'a str,
    src_endpoint: OcsfSrc<'a>,
    dst_endpoint: OcsfDst<'a>,
    connection_info: OcsfConnection,
    /// Absent for DNS refusals (no process is known).
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<OcsfActor<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    firewall_rule: Option<OcsfRule<'a>>,
    metadata: OcsfMetadata,
    unmapped: OcsfUnmapped<'a>,
}

/// One decision as an OCSF Network Activity event (class 4001) on one line.
///
/// Mapping: an allowed connection is activity 1 (Open), action Allowed, disposition Allowed,
/// status Success, severity Informational; a denied one is activity 5 (Refuse), action Denied,
/// disposition Blocked, status Failure, severity Medium; `audit` (allowed but logged as a
/// violation) is Open, Allowed, disposition Logged, severity Low. `type_uid` is
/// `class_uid * 100 + activity_id`. The calling binary is `actor.process` (pid, `file.path`,
/// its nearest ancestor as `parent_process`), the sandbox is `src_endpoint.name`, the
/// destination `dst_endpoint` (hostname, ip, port), the deciding block `firewall_rule.name`
/// with the revision as its `version`, the reason `message`. What OCSF has no field for is in
/// `unmapped`.
pub fn ocsf_line(r: &DecisionRecord) -> serde_json::Result<String> {
    struct Outcome {
        activity: (u8, &'static str),
        severity: (u8, &'static str),
        action: (u8, &'static str),
        disposition: (u8, &'static str),
        status: (u8, &'static str),
    }
    let o = match r.decision.as_str() {
        "allow" => Outcome {
            activity: (1, "Open"),
            severity: (1, "Informational"),
            action: (1, "Allowed"),
            disposition: (1, "Allowed"),
            status: (1, "Success"),
        },
        "audit" => Outcome {
            activity: (1, "Open"),
            severity: (2, "Low"),
            action: (1, "Allowed"),
            disposition: (17, "Logged"),
            status: (1, "Success"),
        },
        "deny" => Outcome {
            activity: (5, "Refuse"),
            severity: (3, "Medium"),
            action: (2, "Denied"),
            disposition: (2, "Blocked"),
            status: (2, "Failure"),
        },
        _ => Outcome {
            activity: (99, "Other"),
            severity: (0, "Unknown"),
            action: (0, "Unknown"),
            disposition: (0, "Unknown"),
            status: (0, "Unknown"),
        },
    };
    const CLASS_UID: u32 = 4001;
    serde_json::to_string(&OcsfNetworkActivity {
        class_uid: CLASS_UID,
        class_name: "Network Activity",
        category_uid: 4,
        category_name: "Network Activity",
        activity_id: o.activity.0,
        activity_name: o.activity.1,
        type_uid: CLASS_UID * 100 + u32::from(o.activity.0),
        type_name: format!("Network Activity: {}", o.activity.1),
        time: r.time_ms,
        time_dt: rfc3339_ms(r.time_ms),
        severity_id: o.severity.0,
        severity: o.severity.1,
        action_id: o.action.0,
        action: o.action.1,
        disposition_id: o.disposition.0,
        disposition: o.disposition.1,
        status_id: o.status.0,
        status: o.status.1,
        message: &r.reason,
        src_endpoint: OcsfSrc { name: &r.sandbox },
        dst_endpoint: OcsfDst {
            hostname: r.host.as_deref().filter(|h| Some(*h) != r.ip.as_deref()),
            ip: r.ip.as_deref(),
            port: r.port,
        },
        connection_info: OcsfConnection {
            direction_id: 2,
            direction: "Outbound",
        },
        actor: (r.pid.is_some() || r.binary.is_some()).then(|| OcsfActor {
            process: OcsfProcess {
                pid: r.pid,
                file: r.binary.as_deref().map(OcsfFile::new),
                parent_process: r.ancestors.first().map(|a| OcsfParent {
                    file: OcsfFile::new(a),
                }),
            },
        }),
        firewall_rule: r.block.as_deref().map(|name| OcsfRule {
            name,
            version: r.revision.map(|v| v.to_string()),
        }),
        metadata: OcsfMetadata {
            version: OCSF_VERSION,
            product: OcsfProduct {
                name: "openshell",
                vendor_name: "openshell",
                version: env!("CARGO_PKG_VERSION"),
            },
            log_name: "decisions",
        },
        unmapped: OcsfUnmapped {
            sandbox: &r.sandbox,
            decision: &r.decision,
            revision: r.revision,
            ancestors: &r.ancestors,
        },
    })
}

/// `2026-11-26T21:08:00.123Z` for milliseconds since the epoch (UTC, proleptic Gregorian).
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EventKind;

    fn denied() -> DecisionRecord {
        DecisionRecord {
            time_ms: 1_795_727_280_123,
            sandbox: "agent".into(),
            decision: "deny".into(),
            binary: Some("/usr/bin/python3.11".into()),
            pid: Some(4242),
            ancestors: vec!["/usr/bin/bash".into()],
            host: Some("pypi.org".into()),
            ip: Some("198.18.0.10".into()),
            port: Some(443),
            block: Some("pypi".into()),
            reason: "endpoint matches in block pypi but binary /usr/bin/python3.11 is not listed \
                     (ancestors: /usr/bin/bash)"
                .into(),
            revision: Some(1),
        }
    }

    #[test]
    fn json_has_exactly_the_documented_keys() {
        let line = json_line(&denied()).unwrap();
        insta::assert_snapshot!(line, @r#"{"time":"2026-11-26T21:08:00.123Z","sandbox":"agent","decision":"deny","binary":"/usr/bin/python3.11","pid":4242,"ancestors":["/usr/bin/bash"],"host":"pypi.org","ip":"198.18.0.10","port":443,"block":"pypi","reason":"endpoint matches in block pypi but binary /usr/bin/python3.11 is not listed (ancestors: /usr/bin/bash)","revision":1}"#);
        // The snapshot fixes the order; this fixes the set (serde_json's map sorts keys).
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        let mut expected = [
            "time",
            "sandbox",
            "decision",
            "binary",
            "pid",
            "ancestors",
            "host",
            "ip",
            "port",
            "block",
            "reason",
            "revision",
        ];
        keys.sort();
        expected.sort_unstable();
        assert_eq!(keys, expected);
    }

    #[test]
    fn text_lines() {
        insta::assert_snapshot!(text_line(&denied()), @r#"2026-11-26T21:08:00.123Z DENY  /usr/bin/python3.11 -> pypi.org:443 (198.18.0.10) block=pypi rev=1 pid=4242 reason="endpoint matches in block pypi but binary /usr/bin/python3.11 is not listed (ancestors: /usr/bin/bash)""#);
        let dns = DecisionRecord {
            binary: None,
            pid: None,
            ancestors: vec![],
            host: Some("evil.example.com".into()),
            ip: None,
            port: Some(53),
            block: None,
            reason: "DNS query for evil.example.com: no block of the policy allows this name; \
                     answered NXDOMAIN without asking upstream"
                .into(),
            ..denied()
        };
        insta::assert_snapshot!(text_line(&dns), @r#"2026-11-26T21:08:00.123Z DENY  - -> evil.example.com:53 block=- rev=1 pid=- reason="DNS query for evil.example.com: no block of the policy allows this name; answered NXDOMAIN without asking upstream""#);
        let by_ip = DecisionRecord {
            decision: "allow".into(),
            host: None,
            ip: Some("2001:db8::1".into()),
            block: Some("v6".into()),
            reason: "allowed by block v6 \"quoted\"\nsecond line".into(),
            ..denied()
        };
        insta::assert_snapshot!(text_line(&by_ip), @r#"2026-11-26T21:08:00.123Z ALLOW /usr/bin/python3.11 -> [2001:db8::1]:443 block=v6 rev=1 pid=4242 reason="allowed by block v6 \"quoted\"\nsecond line""#);
    }

    fn event(sandbox: Option<&str>, kind: EventKind, revision: Option<i64>) -> GatewayEvent {
        GatewayEvent {
            time_ms: 1_795_727_281_000,
            sandbox: sandbox.map(str::to_owned),
            kind,
            revision,
            message: format!("{} happened", kind.as_str()),
        }
    }

    #[test]
    fn gateway_event_lines() {
        let loaded = event(Some("agent"), EventKind::PolicyLoaded, Some(2));
        let global = event(None, EventKind::GlobalPolicyDeleted, Some(1));
        insta::assert_snapshot!(
            format!("{}\n{}", event_text_line(&loaded), event_text_line(&global)),
            @r#"
                2026-11-26T21:08:01.000Z EVENT policy_loaded sandbox=agent rev=2 message="policy_loaded happened"
                2026-11-26T21:08:01.000Z EVENT global_policy_deleted sandbox=- rev=1 message="global_policy_deleted happened"
            "#
        );
        insta::assert_snapshot!(
            format!("{}\n{}", event_json_line(&loaded).unwrap(), event_json_line(&global).unwrap()),
            @r#"
                {"time":"2026-11-26T21:08:01.000Z","source":"gateway","sandbox":"agent","event":"policy_loaded","revision":2,"message":"policy_loaded happened"}
                {"time":"2026-11-26T21:08:01.000Z","source":"gateway","sandbox":null,"event":"global_policy_deleted","revision":1,"message":"global_policy_deleted happened"}
            "#
        );
    }

    #[test]
    fn ocsf_network_activity() {
        let deny = ocsf_line(&denied()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&deny).unwrap();
        insta::assert_json_snapshot!(v, @r#"
            {
              "action": "Denied",
              "action_id": 2,
              "activity_id": 5,
              "activity_name": "Refuse",
              "actor": {
                "process": {
                  "file": {
                    "name": "python3.11",
                    "path": "/usr/bin/python3.11",
                    "type_id": 1
                  },
                  "parent_process": {
                    "file": {
                      "name": "bash",
                      "path": "/usr/bin/bash",
                      "type_id": 1
                    }
                  },
                  "pid": 4242
                }
              },
              "category_name": "Network Activity",
              "category_uid": 4,
              "class_name": "Network Activity",
              "class_uid": 4001,
              "connection_info": {
                "direction": "Outbound",
                "direction_id": 2
              },
              "disposition": "Blocked",
              "disposition_id": 2,
              "dst_endpoint": {
                "hostname": "pypi.org",
                "ip": "198.18.0.10",
                "port": 443
              },
              "firewall_rule": {
                "name": "pypi",
                "version": "1"
              },
              "message": "endpoint matches in block pypi but binary /usr/bin/python3.11 is not listed (ancestors: /usr/bin/bash)",
              "metadata": {
                "log_name": "decisions",
                "product": {
                  "name": "openshell",
                  "vendor_name": "openshell",
                  "version": "0.1.0"
                },
                "version": "1.3.0"
              },
              "severity": "Medium",
              "severity_id": 3,
              "src_endpoint": {
                "name": "agent"
              },
              "status": "Failure",
              "status_id": 2,
              "time": 1795727280123,
              "time_dt": "2026-11-26T21:08:00.123Z",
              "type_name": "Network Activity: Refuse",
              "type_uid": 400105,
              "unmapped": {
                "ancestors": [
                  "/usr/bin/bash"
                ],
                "decision": "deny",
                "revision": 1,
                "sandbox": "agent"
              }
            }
        "#);
        let allow = DecisionRecord {
            decision: "allow".into(),
            host: Some("198.18.0.10".into()),
            ancestors: vec![],
            reason: "allowed by block pypi".into(),
            ..denied()
        };
        let v: serde_json::Value = serde_json::from_str(&ocsf_line(&allow).unwrap()).unwrap();
        assert_eq!(v["activity_id"], 1);
        assert_eq!(v["type_uid"], 400_101);
        assert_eq!(v["disposition_id"], 1);
        assert_eq!(v["status_id"], 1);
        // A host that is the address itself is not repeated as a hostname.
        assert_eq!(
            v["dst_endpoint"],
            serde_json::json!({"ip": "198.18.0.10", "port": 443})
        );
        assert!(v["actor"]["process"].get("parent_process").is_none());
        let dns = DecisionRecord {
            binary: None,
            pid: None,
            ancestors: vec![],
            ..denied()
        };
        let v: serde_json::Value = serde_json::from_str(&ocsf_line(&dns).unwrap()).unwrap();
        assert!(v.get("actor").is_none(), "{v}");
        // One line per event.
        assert!(!deny.contains('\n'));
    }

    #[test]
    fn merged_by_time_keeping_the_newest() {
        let page = LogResponse {
            decisions: Some(crate::store::LogPage {
                rows: vec![
                    (
                        7,
                        DecisionRecord {
                            time_ms: 10,
                            ..denied()
                        },
                    ),
                    (
                        8,
                        DecisionRecord {
                            time_ms: 30,
                            ..denied()
                        },
                    ),
                ],
                last_id: 8,
            }),
            events: Some(crate::store::LogPage {
                rows: vec![
                    (
                        1,
                        GatewayEvent {
                            time_ms: 20,
                            ..event(None, EventKind::GatewayStarted, None)
                        },
                    ),
                    (
                        2,
                        GatewayEvent {
                            time_ms: 30,
                            ..event(None, EventKind::PolicyLoaded, None)
                        },
                    ),
                ],
                last_id: 2,
            }),
        };
        let times = |entries: Vec<Entry<'_>>| -> Vec<String> {
            entries
                .iter()
                .map(|e| match e {
                    Entry::Decision(d) => format!("d{}", d.time_ms),
                    Entry::Event(e) => format!("e{}", e.time_ms),
                })
                .collect()
        };
        assert_eq!(times(merged(&page, 10)), ["d10", "e20", "e30", "d30"]);
        assert_eq!(times(merged(&page, 2)), ["e30", "d30"]);
    }

    #[test]
    fn durations() {
        let secs = |s: &str| parse_duration(s).map(|d| d.as_millis());
        assert_eq!(secs("30s"), Ok(30_000));
        assert_eq!(secs("5m"), Ok(300_000));
        assert_eq!(secs("1h30m"), Ok(5_400_000));
        assert_eq!(secs("2d"), Ok(172_800_000));
        assert_eq!(secs("250ms"), Ok(250));
        insta::assert_snapshot!(
            ["", "5", "m", "5x", "1h-", "99999999999999999999s", "9999999999999999d"]
                .iter()
                .map(|s| parse_duration(s).unwrap_err())
                .collect::<Vec<_>>()
                .join("\n"),
            @r#"
                "": empty duration; write a number and a unit (ms, s, m, h, d), e.g. 30s, 5m, 1h30m
                "5": missing unit; write a number and a unit (ms, s, m, h, d), e.g. 30s, 5m, 1h30m
                "m": expected a number; write a number and a unit (ms, s, m, h, d), e.g. 30s, 5m, 1h30m
                "5x": unknown unit "x"; write a number and a unit (ms, s, m, h, d), e.g. 30s, 5m, 1h30m
                "1h-": unknown unit "h-"; write a number and a unit (ms, s, m, h, d), e.g. 30s, 5m, 1h30m
                "99999999999999999999s": number too large; write a number and a unit (ms, s, m, h, d), e.g. 30s, 5m, 1h30m
                "9999999999999999d": too long; write a number and a unit (ms, s, m, h, d), e.g. 30s, 5m, 1h30m
            "#
        );
    }

    #[test]
    fn log_requests_round_trip_through_the_query() {
        let req = LogRequest {
            source: LogSource::All,
            limit: 50,
            since_ms: Some(1_000),
            after_decision: Some(7),
            after_event: None,
        };
        assert_eq!(
            req.to_query(),
            "source=all&n=50&since_ms=1000&after_decision=7"
        );
        assert_eq!(LogRequest::from_query(&req.to_query(), MAX_LINES), Ok(req));
        assert_eq!(
            LogRequest::from_query("n=999999999", MAX_LINES).map(|r| (r.limit, r.source)),
            Ok((MAX_LINES, LogSource::Sandbox))
        );
        assert!(
            LogRequest::from_query("source=bogus", 10)
                .unwrap_err()
                .contains("sandbox, gateway or all")
        );
        assert!(LogRequest::from_query("after_event=x", 10).is_err());
        assert!(LogRequest::from_query("tail=1", 10).is_err());
    }

    #[test]
    fn limits_from_queries() {
        assert_eq!(limit_from_query(None), DEFAULT_LINES);
        assert_eq!(limit_from_query(Some("n=7")), 7);
        assert_eq!(limit_from_query(Some("x=1&n=9")), 9);
        assert_eq!(limit_from_query(Some("n=abc")), DEFAULT_LINES);
        assert_eq!(limit_from_query(Some("n=999999999")), MAX_LINES);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }
}
