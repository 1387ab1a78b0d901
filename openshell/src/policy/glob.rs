//! The three glob dialects of a policy, all built on `globset`.
//!
//! - binary paths and request paths: `*` and `?` stay within one `/`-separated segment, `**` as a
//!   whole segment spans any number of segments (`/a/**/b` also matches `/a/b`);
//! - query values: `*` matches any characters (a value has no segments).
//!
//! Bracket classes (`[0-9]`, `[!a]`) and alternatives (`{a,b}`) are globset's.

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

pub(crate) fn value_matcher(pattern: &str) -> Result<GlobMatcher, globset::Error> {
    value_glob(pattern).map(|g| g.compile_matcher())
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

    fn m(p: &str) -> GlobMatcher {
        path_matcher(p).unwrap_or_else(|e| panic!("{p}: {e}"))
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
        let g = value_matcher("skill-*").unwrap_or_else(|e| panic!("{e}"));
        assert!(g.is_match("skill-a/b"));
        assert!(!g.is_match("Skill-a"));
    }
}
