//! `openshell logs NAME [-n N] [-o text|json]`: a sandbox's network decisions, oldest first.
//!
//! JSON output is one object per line with exactly the keys `time`, `sandbox`, `decision`,
//! `binary`, `pid`, `ancestors`, `host`, `ip`, `port`, `block`, `reason`, `revision` (`time` in
//! RFC 3339 UTC with milliseconds). Following and filters come with the hot-reload issue.

use std::{io::Write as _, process::ExitCode};

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::{client::Client, config::Paths, store::DecisionRecord};

/// Decisions shown when `-n` is not given.
pub const DEFAULT_LINES: usize = 100;
/// Most decisions one request returns.
pub const MAX_LINES: usize = 100_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Sandbox name.
    pub name: String,
    /// Show the newest N decisions.
    #[arg(short = 'n', long = "lines", default_value_t = DEFAULT_LINES)]
    pub lines: usize,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = LogFormat::Text)]
    pub output: LogFormat,
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

pub fn run(args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(Paths::from_env())?;
    client.ensure_running()?;
    let records = client.logs(&args.name, args.lines.min(MAX_LINES))?;
    let mut out = std::io::stdout().lock();
    for r in &records {
        let line = match args.output {
            LogFormat::Text => text_line(r),
            LogFormat::Json => json_line(r)?,
        };
        writeln!(out, "{line}")?;
    }
    Ok(ExitCode::SUCCESS)
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

/// One decision as a line of text: time, decision, binary (pid), destination, block, reason.
#[must_use]
pub fn text_line(r: &DecisionRecord) -> String {
    let dest = match (&r.host, &r.ip) {
        (Some(h), Some(ip)) if h != ip => format!("{h} ({ip})"),
        (Some(h), _) => h.clone(),
        (None, Some(ip)) => ip.clone(),
        (None, None) => "-".to_owned(),
    };
    let port = r.port.map_or_else(String::new, |p| format!(":{p}"));
    let binary = match (&r.binary, r.pid) {
        (Some(b), Some(pid)) => format!("{b} [{pid}]"),
        (Some(b), None) => b.clone(),
        (None, Some(pid)) => format!("? [{pid}]"),
        (None, None) => "-".to_owned(),
    };
    let mut line = format!(
        "{} {:<5} {binary} -> {dest}{port}",
        rfc3339_ms(r.time_ms),
        r.decision.to_uppercase()
    );
    if !r.ancestors.is_empty() {
        line.push_str(&format!(" (ancestors: {})", r.ancestors.join(", ")));
    }
    if let Some(block) = &r.block {
        line.push_str(&format!(" block={block}"));
    }
    if let Some(rev) = r.revision {
        line.push_str(&format!(" rev={rev}"));
    }
    line.push_str(&format!(": {}", r.reason));
    line
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
        insta::assert_snapshot!(text_line(&denied()), @"2026-11-26T21:08:00.123Z DENY  /usr/bin/python3.11 [4242] -> pypi.org (198.18.0.10):443 (ancestors: /usr/bin/bash) block=pypi rev=1: endpoint matches in block pypi but binary /usr/bin/python3.11 is not listed (ancestors: /usr/bin/bash)");
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
        insta::assert_snapshot!(text_line(&dns), @"2026-11-26T21:08:00.123Z DENY  - -> evil.example.com:53 rev=1: DNS query for evil.example.com: no block of the policy allows this name; answered NXDOMAIN without asking upstream");
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
