//! The three glob dialects of a policy, all built on `globset`.
//!
//! - binary paths and request paths: `*` and `?` stay within one `/`-separated segment, `**` as a
//!   whole segment spans any number of segments (`/a/**/b` also matches `/a/b`);
//! - query values: `*` matches any characters (a value has no segments).
//!
//! Bracket classes (`[0-9]`, `[!a]`) and alternatives (`{a,b}`) are globset's.

use std::sync::Arc;

use globset::{Glob, GlobBuilder, GlobMatcher};

/// A glob over `/`-separated paths (binaries and request paths).
pub(crate) fn path_glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
}

/// A glob over a query parameter value.
pub(crate) fn value_glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(false)
        .backslash_escape(true)
        .build()
}

pub(crate) fn path_matcher(pattern: &str) -> Result<GlobMatcher, globset::Error> {
    path_glob(pattern).map(|g| g.compile_matcher())
}

/// A compiled path glob. The common shapes (literal segments, whole-segment `*`, a trailing
/// `/**`) are matched segment by segment without building a regex, which keeps compiling a
/// 10,000-block policy fast; anything else falls back to globset's regex. Both give the same
/// answers (checked by a property test).
#[derive(Clone, Debug)]
pub(crate) enum PathGlob {
    Segments {
        segments: Box<[Segment]>,
        /// Ends in `/**`: at least one more (possibly empty) segment of anything.
        tail_any: bool,
    },
    Regex(Arc<GlobMatcher>),
}

#[derive(Clone, Debug)]
pub(crate) enum Segment {
    Literal(Box<str>),
    /// `*`: any one segment, empty included (as globset's `[^/]*`).
    Any,
    /// `pre*post` within one segment.
    Partial(Box<str>, Box<str>),
}

impl PathGlob {
    pub(crate) fn new(pattern: &str) -> Result<Self, globset::Error> {
        if let Some(fast) = Self::segments(pattern) {
            // Validate with globset all the same, so both paths accept the same patterns.
            path_glob(pattern)?;
            return Ok(fast);
        }
        Ok(Self::Regex(Arc::new(path_matcher(pattern)?)))
    }

    fn segments(pattern: &str) -> Option<Self> {
        if pattern.contains(['?', '[', ']', '{', '}', '\\']) {
            return None;
        }
        let rest = pattern.strip_prefix('/')?;
        // `body` holds the segments before a trailing `/**`; `None` for `/**` itself.
        let (body, tail_any) = match rest.strip_suffix("**") {
            Some("") => (None, true),
            Some(body) if body.ends_with('/') => (Some(&body[..body.len() - 1]), true),
            _ => (Some(rest), false),
        };
        let mut segments = Vec::new();
        if let Some(body) = body {
            for seg in body.split('/') {
                segments.push(match seg {
                    "*" => Segment::Any,
                    s if s.contains('*') => {
                        let (pre, post) = s.split_once('*')?;
                        if post.contains('*') {
                            return None;
                        }
                        Segment::Partial(pre.into(), post.into())
                    }
                    s => Segment::Literal(s.into()),
                });
            }
        }
        Some(Self::Segments {
            segments: segments.into_boxed_slice(),
            tail_any,
        })
    }

    pub(crate) fn is_match(&self, path: &str) -> bool {
        match self {
            Self::Regex(m) => m.is_match(path),
            Self::Segments { segments, tail_any } => {
                let Some(rest) = path.strip_prefix('/') else {
                    return false;
                };
                let mut parts = rest.split('/');
                for seg in segments.iter() {
                    let Some(part) = parts.next() else {
                        return false;
                    };
                    let ok = match seg {
                        Segment::Literal(lit) => **lit == *part,
                        Segment::Any => true,
                        Segment::Partial(pre, post) => {
                            part.len() >= pre.len() + post.len()
                                && part.starts_with(&**pre)
                                && part.ends_with(&**post)
                        }
                    };
                    if !ok {
                        return false;
                    }
                }
                // `/**` needs one more segment (`/a/**` matches `/a/` but not `/a`); without it
                // nothing may be left.
                parts.next().is_some() == *tail_any
            }
        }
    }
}

/// A compiled query value glob: exact, one `*` (prefix and suffix), or globset's regex.
#[derive(Clone, Debug)]
pub(crate) enum ValueGlob {
    Literal(Box<str>),
    PrefixSuffix(Box<str>, Box<str>),
    Regex(Arc<GlobMatcher>),
}

impl ValueGlob {
    pub(crate) fn new(pattern: &str) -> Result<Self, globset::Error> {
        let glob = value_glob(pattern)?;
        if is_literal(pattern) {
            return Ok(Self::Literal(pattern.into()));
        }
        if !pattern.contains(['?', '[', ']', '{', '}', '\\'])
            && let Some((prefix, suffix)) = pattern.split_once('*')
            && !suffix.contains('*')
        {
            return Ok(Self::PrefixSuffix(prefix.into(), suffix.into()));
        }
        Ok(Self::Regex(Arc::new(glob.compile_matcher())))
    }

    pub(crate) fn is_match(&self, value: &str) -> bool {
        match self {
            Self::Literal(l) => **l == *value,
            Self::PrefixSuffix(p, s) => {
                value.len() >= p.len() + s.len() && value.starts_with(&**p) && value.ends_with(&**s)
            }
            Self::Regex(m) => m.is_match(value),
        }
    }
}

/// Whether a pattern contains glob syntax (otherwise it is compared as an exact string).
pub(crate) fn is_literal(pattern: &str) -> bool {
    !pattern.contains(['*', '?', '[', ']', '{', '}', '\\'])
}

/// globset's own message without the pattern repeated (we print the field path instead).
pub(crate) fn describe(err: &globset::Error) -> String {
    err.kind().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str) -> PathGlob {
        PathGlob::new(p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    #[test]
    fn common_shapes_avoid_regex() {
        for p in ["/**", "/a/**", "/a/*/b", "/a/x*y/c", "/exact", "/"] {
            assert!(matches!(m(p), PathGlob::Segments { .. }), "{p}");
        }
        for p in ["/a/**/b", "**/x", "/a/?", "/{a,b}", "/[ab]", "/a*b*c"] {
            assert!(matches!(m(p), PathGlob::Regex(_)), "{p}");
        }
    }

    #[test]
    fn star_stays_in_one_segment() {
        let g = m("/usr/bin/*");
        assert!(g.is_match("/usr/bin/curl"));
        assert!(!g.is_match("/usr/bin/x/curl"));
        let g = m("/repos/*/issues");
        assert!(g.is_match("/repos/a/issues"));
        assert!(!g.is_match("/repos/a/b/issues"));
    }

    #[test]
    fn double_star_spans_segments() {
        let g = m("/**");
        assert!(g.is_match("/"));
        assert!(g.is_match("/a/b/c"));
        let g = m("/a/**/b");
        assert!(g.is_match("/a/b"));
        assert!(g.is_match("/a/x/y/b"));
        let g = m("/sandbox/.vscode-server/**");
        assert!(g.is_match("/sandbox/.vscode-server/bin/node"));
        assert!(!g.is_match("/sandbox/other/node"));
    }

    #[test]
    fn value_star_crosses_slashes() {
        let g = ValueGlob::new("skill-*").unwrap_or_else(|e| panic!("{e}"));
        assert!(g.is_match("skill-a/b"));
        assert!(!g.is_match("Skill-a"));
        assert!(matches!(g, ValueGlob::PrefixSuffix(..)));
        let g = ValueGlob::new("v[12].*").unwrap_or_else(|e| panic!("{e}"));
        assert!(g.is_match("v2.0") && !g.is_match("v3.0"));
    }
}
