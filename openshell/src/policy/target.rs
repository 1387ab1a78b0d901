//! HTTP request targets: canonical path and decoded query, in the order POLICY.md gives.
//!
//! 1. reject control bytes (raw, or encoded as `%00`–`%1F`, `%7F`), raw non-ASCII bytes and
//!    fragments (`#`);
//! 2. percent-decode every escape except `%2F`, which is rejected unless `allow_encoded_slash`
//!    (then it stays encoded, is never a separator, and cannot hide a dot segment);
//! 3. strip `;params` from each segment;
//! 4. resolve `.` and `..` (climbing above `/` is rejected);
//! 5. collapse empty segments (`//`).
//!
//! The result has two forms: `matched`, the decoded path that rules are matched against, and
//! `wire`, the same path re-encoded where a byte may not appear in a path; the upstream receives
//! `wire`, so what was checked is what is sent.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;

/// Why a request target was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum TargetError {
    #[error("the target is empty")]
    Empty,
    #[error("the target contains a control character")]
    ControlByte,
    #[error("the target contains a raw non-ASCII byte")]
    NonAscii,
    #[error("the target contains a fragment (`#`)")]
    Fragment,
    #[error("the target contains a malformed percent-escape")]
    MalformedEscape,
    #[error("the path contains an encoded slash (%2F), which this endpoint does not allow")]
    EncodedSlash,
    #[error("the path contains a double-encoded slash (%252F)")]
    DoubleEncodedSlash,
    #[error("an encoded slash (%2F) hides a dot segment")]
    HiddenDotSegment,
    #[error("the path decodes to bytes that are not UTF-8")]
    NotUtf8,
    #[error("the path climbs above `/`")]
    AboveRoot,
    #[error("the target is not an absolute path")]
    NotAbsolute,
    #[error("the absolute-form target names another host than the connection's")]
    ForeignAuthority,
}

/// A checked request target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalTarget {
    /// Decoded canonical path (an encoded slash stays as the three characters `%2F`).
    pub matched: String,
    /// Canonical path as sent upstream, followed by `?` and the raw query when there is one.
    pub wire: String,
    /// Where the query starts in `wire` (after the `?`), if there is one.
    query_start: Option<usize>,
}

impl CanonicalTarget {
    /// The raw query (without `?`), not decoded.
    pub fn query(&self) -> Option<&str> {
        self.query_start.and_then(|i| self.wire.get(i..))
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits an origin-form or absolute-form target into path and query, checking the authority
/// of an absolute-form target against the connection's host (already normalised) and port.
fn split_target<'a>(
    target: &'a str,
    host: &str,
    port: u16,
) -> Result<(&'a str, Option<&'a str>), TargetError> {
    if target.is_empty() {
        return Err(TargetError::Empty);
    }
    if target.contains('#') {
        return Err(TargetError::Fragment);
    }
    let (before_query, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if before_query.starts_with('/') {
        return Ok((before_query, query));
    }
    let lower_scheme = before_query.get(..8).map(str::to_ascii_lowercase);
    let rest = match lower_scheme.as_deref() {
        Some(s) if s.starts_with("http://") => &before_query[7..],
        Some("https://") => &before_query[8..],
        _ => return Err(TargetError::NotAbsolute),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(TargetError::ForeignAuthority);
    }
    let (auth_host, auth_port) = match authority.rsplit_once(':') {
        Some((h, _)) if h.contains(':') && !h.ends_with(']') => (authority, None),
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let same_host = match super::host::parse_ip_literal(auth_host) {
        Some(ip) => super::host::parse_ip_literal(host) == Some(ip),
        None => super::host::normalize_name(auth_host) == host,
    };
    let same_port = auth_port.is_none_or(|p| p.parse::<u16>().ok() == Some(port));
    if !same_host || !same_port {
        return Err(TargetError::ForeignAuthority);
    }
    Ok((path, query))
}

/// Bytes that may appear unencoded in a canonical path (RFC 3986 `pchar` minus `%` and `;`,
/// plus `/`).
fn path_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

/// Canonicalises a request target. `host` must be normalised (lower case, no trailing dot).
pub fn canonicalize(
    target: &str,
    allow_encoded_slash: bool,
    host: &str,
    port: u16,
) -> Result<CanonicalTarget, TargetError> {
    let bytes = target.as_bytes();
    if bytes.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(TargetError::ControlByte);
    }
    if !target.is_ascii() {
        return Err(TargetError::NonAscii);
    }
    let (path, query) = split_target(target, host, port)?;

    // Segment by raw `/`; each segment is decoded on its own so an encoded slash stays inside it.
    let mut segments: Vec<Cow<'_, str>> = Vec::new();
    let mut trailing_slash = false;
    let mut raw_segments = path[1..].split('/').peekable();
    while let Some(raw) = raw_segments.next() {
        let is_last = raw_segments.peek().is_none();
        let decoded = decode_segment(raw, allow_encoded_slash)?;
        // Step 3: strip `;params`.
        let seg = match decoded.find(';') {
            Some(j) => match decoded {
                Cow::Borrowed(d) => Cow::Borrowed(&d[..j]),
                Cow::Owned(mut d) => {
                    d.truncate(j);
                    Cow::Owned(d)
                }
            },
            None => decoded,
        };
        // A dot segment behind an encoded slash would become real if any hop decoded it.
        if allow_encoded_slash
            && seg.contains("%2F")
            && seg.split("%2F").any(|part| part == "." || part == "..")
        {
            return Err(TargetError::HiddenDotSegment);
        }
        // Step 4: resolve dot segments.
        match &*seg {
            "." => trailing_slash = is_last,
            ".." => {
                if segments.pop().is_none() {
                    return Err(TargetError::AboveRoot);
                }
                trailing_slash = is_last;
            }
            "" => trailing_slash = is_last,
            // Step 5 (collapsing `//`) drops the empty segments above.
            _ => {
                trailing_slash = false;
                segments.push(seg);
            }
        }
    }

    let mut matched = String::with_capacity(path.len());
    for s in &segments {
        matched.push('/');
        matched.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        matched.push('/');
    }
    let mut wire = String::with_capacity(matched.len() + query.map_or(0, |q| q.len() + 1));
    encode_path(&matched, &mut wire);
    let mut query_start = None;
    if let Some(q) = query {
        wire.push('?');
        query_start = Some(wire.len());
        wire.push_str(q);
    }
    Ok(CanonicalTarget {
        matched,
        wire,
        query_start,
    })
}

fn decode_segment(raw: &str, allow_encoded_slash: bool) -> Result<Cow<'_, str>, TargetError> {
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut literal_percents = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(TargetError::MalformedEscape);
        };
        let byte = h * 16 + l;
        if byte < 0x20 || byte == 0x7f {
            return Err(TargetError::ControlByte);
        }
        if byte == b'%' {
            literal_percents.push(out.len());
        }
        if byte == b'/' {
            if !allow_encoded_slash {
                return Err(TargetError::EncodedSlash);
            }
            out.extend_from_slice(b"%2F");
        } else {
            out.push(byte);
        }
        i += 3;
    }
    // A decoded `%` followed by `2F` (from `%252F`, `%25%32%46`, ...) would read as an encoded
    // slash in the matched form; no reading of it is safe.
    for p in literal_percents {
        if out.get(p + 1) == Some(&b'2') && matches!(out.get(p + 2), Some(b'f' | b'F')) {
            return Err(TargetError::DoubleEncodedSlash);
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| TargetError::NotUtf8)
}

/// Re-encodes a decoded canonical path for the wire. A `%` that starts `%2F` is the kept
/// encoded slash; every other `%` is a literal percent sign and becomes `%25`.
fn encode_path(matched: &str, out: &mut String) {
    let b = matched.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' && b.get(i + 1..i + 3) == Some(b"2F") {
            out.push_str("%2F");
            i += 3;
            continue;
        }
        if c == b'/' || path_safe(c) {
            out.push(char::from(c));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(c >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(c & 15)]));
        }
        i += 1;
    }
}

/// A query string decoded into key/value pairs (`+` is a space, `%XX` decoded; a key without
/// `=` has an empty value). Borrows from the raw query where nothing needs decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

/// A query escape that does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedQuery;

impl fmt::Display for MalformedQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the query contains a malformed percent-escape")
    }
}

fn decode_component(s: &str) -> Result<Cow<'_, str>, MalformedQuery> {
    if !s.contains(['%', '+']) {
        return Ok(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(MalformedQuery);
                };
                out.push(h * 16 + l);
                i += 3;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| MalformedQuery)
}

impl<'a> Query<'a> {
    pub fn parse(raw: &'a str) -> Result<Self, MalformedQuery> {
        let mut pairs = Vec::new();
        for part in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            pairs.push((decode_component(k)?, decode_component(v)?));
        }
        Ok(Self { pairs })
    }

    /// Every value given for `key`, in order.
    pub fn values<'q>(&'q self, key: &'q str) -> impl Iterator<Item = &'q str> + 'q {
        self.pairs
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| &**v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(t: &str) -> Result<String, TargetError> {
        canonicalize(t, false, "api.example.com", 443).map(|c| c.matched)
    }

    #[test]
    fn policy_md_examples() {
        assert_eq!(canon("/public/..%3B/secret").as_deref(), Ok("/secret"));
        assert_eq!(canon("/a/./b/../c").as_deref(), Ok("/a/c"));
        assert_eq!(canon("/a//b").as_deref(), Ok("/a/b"));
        assert_eq!(canon("/a;x=1/b;y").as_deref(), Ok("/a/b"));
        assert_eq!(canon("/%61%62c").as_deref(), Ok("/abc"));
        assert_eq!(canon("/").as_deref(), Ok("/"));
        assert_eq!(canon("/a/b/").as_deref(), Ok("/a/b/"));
        assert_eq!(canon("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(canon("/x?y=1").as_deref(), Ok("/x"));
    }

    #[test]
    fn rejections() {
        assert_eq!(canon("/.."), Err(TargetError::AboveRoot));
        assert_eq!(canon("/a/../../b"), Err(TargetError::AboveRoot));
        assert_eq!(canon("/a%00"), Err(TargetError::ControlByte));
        assert_eq!(canon("/a%1f"), Err(TargetError::ControlByte));
        assert_eq!(canon("/a%7F"), Err(TargetError::ControlByte));
        assert_eq!(canon("/a\tb"), Err(TargetError::ControlByte));
        assert_eq!(canon("/caf\u{e9}"), Err(TargetError::NonAscii));
        assert_eq!(canon("/a#frag"), Err(TargetError::Fragment));
        assert_eq!(canon("/a%2Fb"), Err(TargetError::EncodedSlash));
        assert_eq!(canon("/a%2fb"), Err(TargetError::EncodedSlash));
        assert_eq!(canon("/a%zz"), Err(TargetError::MalformedEscape));
        assert_eq!(canon("/a%4"), Err(TargetError::MalformedEscape));
        assert_eq!(canon("/a%ff"), Err(TargetError::NotUtf8));
        assert_eq!(canon("*"), Err(TargetError::NotAbsolute));
        assert_eq!(canon(""), Err(TargetError::Empty));
    }

    #[test]
    fn encoded_slash_kept_when_allowed() {
        let c = canonicalize("/@scope%2fname", true, "registry.npmjs.org", 443)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.matched, "/@scope%2Fname");
        assert_eq!(c.wire, "/@scope%2Fname");
        assert_eq!(
            canonicalize("/a/..%2F..%2Fetc", true, "h", 443),
            Err(TargetError::HiddenDotSegment)
        );
        assert_eq!(
            canonicalize("/a/x%2F..", true, "h", 443),
            Err(TargetError::HiddenDotSegment)
        );
    }

    #[test]
    fn wire_form_reencodes() {
        let c = canonicalize("/a%20b/%25/c%3Fd?x=%41", false, "h", 443)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.matched, "/a b/%/c?d");
        assert_eq!(c.wire, "/a%20b/%25/c%3Fd?x=%41");
        assert_eq!(c.query(), Some("x=%41"));
    }

    #[test]
    fn absolute_form() {
        let c = canonicalize(
            "http://API.example.com./a/../b?q",
            false,
            "api.example.com",
            80,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.matched, "/b");
        assert_eq!(c.wire, "/b?q");
        assert!(canonicalize("http://api.example.com:80/x", false, "api.example.com", 80).is_ok());
        assert_eq!(
            canonicalize("http://api.example.com:81/x", false, "api.example.com", 80),
            Err(TargetError::ForeignAuthority)
        );
        assert_eq!(
            canonicalize("http://evil.com/x", false, "api.example.com", 80),
            Err(TargetError::ForeignAuthority)
        );
        assert_eq!(
            canonicalize(
                "http://api.example.com@evil.com/x",
                false,
                "api.example.com",
                80
            ),
            Err(TargetError::ForeignAuthority)
        );
        assert_eq!(
            canonicalize("https://api.example.com", false, "api.example.com", 443)
                .map(|c| c.matched)
                .as_deref(),
            Ok("/")
        );
    }

    #[test]
    fn query_decoding() {
        let q = Query::parse("a=1&a=x+y&b&c=%41%2B&&d=").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(q.values("a").collect::<Vec<_>>(), ["1", "x y"]);
        assert_eq!(q.values("b").collect::<Vec<_>>(), [""]);
        assert_eq!(q.values("c").collect::<Vec<_>>(), ["A+"]);
        assert_eq!(q.values("d").collect::<Vec<_>>(), [""]);
        assert_eq!(q.values("e").count(), 0);
        assert_eq!(Query::parse("a=%zz"), Err(MalformedQuery));
        assert_eq!(Query::parse("a=%4"), Err(MalformedQuery));
    }
}
