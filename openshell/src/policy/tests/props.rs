//! Property tests: canonicalisation is idempotent, `**` matches everything `*` matches, and a
//! matching deny rule always wins.

use proptest::prelude::*;

use super::super::glob::{PathGlob, ValueGlob, path_matcher, value_glob};
use super::super::{HttpRequestQuery, Verdict, canonicalize};
use super::decide::{compile, conn};

fn target_piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/", "//", ".", "..", "a", "b", "%2F", "%2f", "%2e", "%2E%2E", "%25", "%252F", ";", ";x=1",
        "%3B", "%20", "+", "?", "&", "=", "%41", "%zz", "%", "~", "@", "<", "*",
    ])
}

fn target() -> impl Strategy<Value = String> {
    prop::collection::vec(target_piece(), 0..12).prop_map(|pieces| format!("/{}", pieces.concat()))
}

proptest! {
    #[test]
    fn canonicalisation_is_idempotent(t in target(), allow_slash in any::<bool>()) {
        if let Ok(first) = canonicalize(&t, allow_slash, "h.example.com", 443) {
            let second = canonicalize(&first.wire, allow_slash, "h.example.com", 443);
            prop_assert_eq!(second.as_ref().map(|c| &c.wire), Ok(&first.wire), "{}", t);
            prop_assert_eq!(second.as_ref().map(|c| &c.matched), Ok(&first.matched), "{}", t);
        }
    }

    #[test]
    fn double_star_matches_whatever_star_matches(
        pattern in prop::collection::vec(prop::sample::select(vec!["a", "b", "*", "a*", "*b", "**"]), 1..5),
        which in any::<prop::sample::Index>(),
        path in prop::collection::vec(prop::sample::select(vec!["a", "b", "ab", "ba", "x", "bb"]), 0..6),
    ) {
        let stars: Vec<usize> = pattern.iter().enumerate().filter(|(_, s)| **s == "*").map(|(i, _)| i).collect();
        prop_assume!(!stars.is_empty());
        let mut wider = pattern.clone();
        wider[stars[which.index(stars.len())]] = "**";
        let narrow = format!("/{}", pattern.join("/"));
        let wide = format!("/{}", wider.join("/"));
        let path = format!("/{}", path.join("/"));
        let n = PathGlob::new(&narrow).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let w = PathGlob::new(&wide).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if n.is_match(&path) {
            prop_assert!(w.is_match(&path), "{} matches {} but {} does not", narrow, path, wide);
        }
    }

    /// The segment matcher (no regex) agrees with globset on every pattern it accepts.
    #[test]
    fn fast_path_globs_agree_with_globset(
        pattern in prop::collection::vec(prop::sample::select(vec!["a", "b", "", "*", "a*", "*b", "a*b", "**"]), 0..5),
        path in prop::collection::vec(prop::sample::select(vec!["a", "b", "ab", "", "ba", "aab"]), 0..6),
        value in "[ab*.-]{0,6}",
        value_pattern in "[ab*.-]{0,5}",
    ) {
        let pattern = format!("/{}", pattern.join("/"));
        let path = format!("/{}", path.join("/"));
        let fast = PathGlob::new(&pattern).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let slow = path_matcher(&pattern).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(fast.is_match(&path), slow.is_match(&path), "{} vs {}", pattern, path);

        let fast = ValueGlob::new(&value_pattern).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let slow = value_glob(&value_pattern).map_err(|e| TestCaseError::fail(e.to_string()))?.compile_matcher();
        prop_assert_eq!(fast.is_match(&value), slow.is_match(&value), "{} vs {}", value_pattern, value);
    }

    #[test]
    fn a_matching_deny_rule_always_wins(
        deny in prop::collection::vec(prop::sample::select(vec!["a", "b", "*", "**", "a*"]), 1..4),
        deny_method in prop::sample::select(vec!["GET", "POST", "*"]),
        method in prop::sample::select(vec!["GET", "HEAD", "POST", "DELETE"]),
        t in target(),
    ) {
        let deny_path = format!("/{}", deny.join("/"));
        let p = compile(&format!(
            r#"  b:
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        rules:
          - allow: {{ method: "*", path: "/**" }}
          - allow: {{ method: GET, path: "{deny_path}" }}
        deny_rules:
          - {{ method: "{deny_method}", path: "{deny_path}" }}
    binaries: [{{ path: /usr/bin/curl }}]
"#
        ));
        let d = p.decide_request(
            &conn("api.example.com", 443, "/usr/bin/curl"),
            &HttpRequestQuery { method, target: &t },
        );
        let Ok(canon) = canonicalize(&t, false, "api.example.com", 443) else {
            prop_assert_eq!(d.verdict, Verdict::Deny);
            return Ok(());
        };
        let glob = path_matcher(&deny_path).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let method_hit = match deny_method {
            "*" => true,
            "GET" => method == "GET" || method == "HEAD",
            m => m == method,
        };
        if method_hit && glob.is_match(&canon.matched) {
            prop_assert_eq!(d.verdict, Verdict::Deny, "{} {} vs deny {} {}", method, t, deny_method, deny_path);
        } else {
            prop_assert_eq!(d.verdict, Verdict::Allow, "{} {}: {}", method, t, d.reason);
        }
    }
}
