//! Endpoint host patterns: a DNS name, an IP literal, or a name with wildcards.
//!
//! Names are compared in lower case without a trailing dot. Wildcards:
//! - `*` as the whole first label: exactly one label;
//! - `*` inside the first label: any characters within that label (`*-aiplatform.googleapis.com`);
//! - `**` as the whole first label: one or more labels;
//! - `*` as a whole middle label: exactly one label (`*.s3.*.amazonaws.com`).
//!
//! The last two labels are always literal, so a pattern never spans a whole top-level domain.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

/// A validated host pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPattern {
    /// Normalised text: lower case, no trailing dot (IP literals in their canonical form).
    text: String,
    kind: HostKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum HostKind {
    Name,
    Ip(IpAddr),
    /// Labels, first label possibly a wildcard, middle labels possibly `*`.
    Wildcard(Vec<Label>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Label {
    Literal(String),
    /// `*`: exactly one label.
    Any,
    /// `**` (first label only): one or more labels.
    AnyMany,
    /// `pre*post` (first label only): one label with that prefix and suffix.
    Partial {
        prefix: String,
        suffix: String,
    },
}

/// Why a host pattern is invalid, with how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostError {
    pub message: String,
    pub hint: &'static str,
}

const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

fn err(message: impl Into<String>, hint: &'static str) -> HostError {
    HostError {
        message: message.into(),
        hint,
    }
}

/// Lower case without a trailing dot; borrows when the name is already in that form.
pub(crate) fn normalize_name(host: &str) -> Cow<'_, str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Parses an IP literal, with or without the brackets of an IPv6 URL authority.
pub(crate) fn parse_ip_literal(host: &str) -> Option<IpAddr> {
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    inner.parse().ok()
}

fn valid_label_chars(label: &str) -> bool {
    label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl HostPattern {
    pub fn parse(input: &str) -> Result<Self, HostError> {
        if let Some(ip) = parse_ip_literal(input) {
            return Ok(Self {
                text: ip.to_string(),
                kind: HostKind::Ip(ip),
            });
        }
        let text = normalize_name(input).into_owned();
        if text.is_empty() {
            return Err(err(
                "host is empty",
                "write a DNS name such as `api.example.com` or an IP address",
            ));
        }
        if text == "*" || text == "**" {
            return Err(err(
                format!("host `{input}` would match every name"),
                "name the domain, e.g. `*.example.com`; a policy cannot allow every host",
            ));
        }
        if text.len() > MAX_NAME_LEN {
            return Err(err(
                format!(
                    "host is {} characters long; a DNS name has at most {MAX_NAME_LEN}",
                    text.len()
                ),
                "shorten the host name",
            ));
        }
        let raw_labels: Vec<&str> = text.split('.').collect();
        let count = raw_labels.len();
        let mut labels = Vec::with_capacity(count);
        let mut wildcard = false;
        for (i, raw) in raw_labels.iter().enumerate() {
            if raw.is_empty() || raw.len() > MAX_LABEL_LEN {
                return Err(err(
                    format!("host `{input}` has a label of {} characters", raw.len()),
                    "each dot-separated label has 1 to 63 characters",
                ));
            }
            let stars = raw.matches('*').count();
            if stars == 0 {
                if !valid_label_chars(raw) {
                    return Err(err(
                        format!("host `{input}` contains a character not allowed in a DNS name"),
                        "use letters, digits, `-` and `_` in each label, or `*` as a wildcard",
                    ));
                }
                labels.push(Label::Literal((*raw).to_owned()));
                continue;
            }
            wildcard = true;
            if i + 2 >= count {
                return Err(err(
                    format!("host `{input}` has a wildcard in its last two labels"),
                    "wildcards are allowed only before the registered domain, e.g. `*.example.com`",
                ));
            }
            if *raw == "**" {
                if i != 0 {
                    return Err(err(
                        format!("host `{input}` has `**` after the first label"),
                        "`**` is allowed only as the whole first label, e.g. `**.example.com`",
                    ));
                }
                labels.push(Label::AnyMany);
            } else if *raw == "*" {
                labels.push(Label::Any);
            } else if i != 0 {
                return Err(err(
                    format!("host `{input}` has a partial wildcard in a middle label"),
                    "a middle label may only be a whole `*`, e.g. `*.s3.*.amazonaws.com`",
                ));
            } else if stars > 1 {
                return Err(err(
                    format!("host `{input}` has more than one `*` in its first label"),
                    "use one `*` inside the first label, e.g. `*-aiplatform.googleapis.com`",
                ));
            } else {
                let (prefix, suffix) = raw.split_once('*').unwrap_or((raw, ""));
                if !valid_label_chars(prefix) || !valid_label_chars(suffix) {
                    return Err(err(
                        format!("host `{input}` contains a character not allowed in a DNS name"),
                        "use letters, digits, `-` and `_` in each label, or `*` as a wildcard",
                    ));
                }
                labels.push(Label::Partial {
                    prefix: prefix.to_owned(),
                    suffix: suffix.to_owned(),
                });
            }
        }
        let kind = if wildcard {
            HostKind::Wildcard(labels)
        } else {
            HostKind::Name
        };
        Ok(Self { text, kind })
    }

    /// The normalised pattern text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_wildcard(&self) -> bool {
        matches!(self.kind, HostKind::Wildcard(_))
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self.kind {
            HostKind::Ip(ip) => Some(ip),
            _ => None,
        }
    }

    pub(crate) fn kind(&self) -> &HostKind {
        &self.kind
    }

    /// Whether `host` (already normalised with [`normalize_name`], or a canonical IP literal)
    /// matches.
    pub fn matches_normalized(&self, host: &str) -> bool {
        match &self.kind {
            HostKind::Name | HostKind::Ip(_) => self.text == host,
            HostKind::Wildcard(labels) => wildcard_matches(labels, host),
        }
    }

    /// Whether any host name matches (normalises `host` first).
    pub fn matches(&self, host: &str) -> bool {
        match parse_ip_literal(host) {
            Some(ip) => self.ip() == Some(ip),
            None => self.matches_normalized(&normalize_name(host)),
        }
    }
}

pub(crate) fn wildcard_matches(labels: &[Label], host: &str) -> bool {
    let Some((first, rest)) = labels.split_first() else {
        return false;
    };
    // Match the fixed labels after the first from the right.
    let mut remaining = host;
    for label in rest.iter().rev() {
        let (head, last) = match remaining.rsplit_once('.') {
            Some((head, last)) => (Some(head), last),
            None => (None, remaining),
        };
        let ok = match label {
            Label::Literal(lit) => last == lit,
            Label::Any => !last.is_empty(),
            Label::AnyMany | Label::Partial { .. } => false,
        };
        if !ok {
            return false;
        }
        match head {
            Some(head) => remaining = head,
            None => return false,
        }
    }
    // `remaining` is what the first pattern label must cover.
    match first {
        Label::Literal(lit) => remaining == lit,
        Label::Any => !remaining.is_empty() && !remaining.contains('.'),
        Label::AnyMany => !remaining.is_empty() && remaining.split('.').all(|l| !l.is_empty()),
        Label::Partial { prefix, suffix } => {
            !remaining.contains('.')
                && remaining.len() >= prefix.len() + suffix.len()
                && remaining.starts_with(prefix.as_str())
                && remaining.ends_with(suffix.as_str())
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    #[test]
    fn exact_names_ignore_case_and_trailing_dot() {
        let p = pat("API.GitHub.com.");
        assert_eq!(p.as_str(), "api.github.com");
        assert!(p.matches("api.github.com"));
        assert!(p.matches("Api.GITHUB.com."));
        assert!(!p.matches("github.com"));
        assert!(!p.matches("xapi.github.com"));
    }

    #[test]
    fn single_label_wildcard() {
        let p = pat("*.example.com");
        assert!(p.matches("a.example.com"));
        assert!(p.matches("A.Example.COM."));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.b.example.com"));
        assert!(!p.matches("aexample.com"));
    }

    #[test]
    fn multi_label_wildcard() {
        let p = pat("**.example.com");
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.c.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.example.org"));
    }

    #[test]
    fn partial_first_label() {
        let p = pat("*-aiplatform.googleapis.com");
        assert!(p.matches("us-central1-aiplatform.googleapis.com"));
        assert!(p.matches("-aiplatform.googleapis.com"));
        assert!(!p.matches("aiplatform.googleapis.com"));
        assert!(!p.matches("x.us-aiplatform.googleapis.com"));
        let p = pat("api-*.example.com");
        assert!(p.matches("api-eu.example.com"));
        assert!(!p.matches("web-eu.example.com"));
    }

    #[test]
    fn middle_label_wildcard() {
        let p = pat("*.s3.*.amazonaws.com");
        assert!(p.matches("bucket.s3.eu-west-1.amazonaws.com"));
        assert!(!p.matches("bucket.s3.amazonaws.com"));
        assert!(!p.matches("bucket.s4.eu-west-1.amazonaws.com"));
        assert!(!p.matches("a.bucket.s3.eu-west-1.amazonaws.com"));
    }

    #[test]
    fn ip_literals() {
        let p = pat("10.0.0.1");
        assert!(p.matches("10.0.0.1"));
        assert!(!p.matches("10.0.0.2"));
        let p = pat("[2001:DB8::1]");
        assert_eq!(p.as_str(), "2001:db8::1");
        assert!(p.matches("2001:db8:0::1"));
        assert!(p.matches("[2001:db8::1]"));
    }

    #[test]
    fn rejected_patterns() {
        for bad in [
            "*",
            "**",
            "*.com",
            "example.*",
            "a.**.example.com",
            "a.b*c.example.com",
            "*a*.example.com",
            "",
            "a..example.com",
            "exa mple.com",
        ] {
            assert!(
                HostPattern::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        let long_label = format!("{}.example.com", "a".repeat(64));
        assert!(HostPattern::parse(&long_label).is_err());
    }
}
