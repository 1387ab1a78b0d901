//! The incremental reparse gives exactly what a full parse gives: unit tests of the fast path
//! and of every reason to fall back, and a property over random edits of varied documents.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::super::reparse::{Fallback, Outcome, Unqualified, plan};
use super::super::{Parsed, PolicyErrors, parse, parse_keeping, reparse};

fn keep(text: &str) -> Parsed {
    parse_keeping("p.yaml", text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn block(key: &str, port: u16) -> String {
    format!(
        "  {key}:\n    endpoints:\n      - {{ host: {key}.example.com, port: {port} }}\n    binaries:\n      - {{ path: /usr/bin/curl }}\n"
    )
}

const HEADER: &str = "version: 1\nprocess:\n  run_as_user: agent\nnetwork_policies:\n";

fn file(blocks: &[(&str, u16)]) -> String {
    let mut t = String::from(HEADER);
    for (k, p) in blocks {
        t.push_str(&block(k, *p));
    }
    t
}

/// Reparses `new` from `old` and checks the result against a full parse; returns the outcome.
fn outcome(old: &str, new: &str) -> Outcome {
    let prev = keep(old);
    let got = reparse(&prev, "p.yaml", new);
    let want = parse_keeping("p.yaml", new);
    match (&got, &want) {
        (Ok(g), Ok(w)) => assert!(g.same_as(w), "{g:#?}\n{w:#?}"),
        (Err(g), Err(w)) => assert_eq!(g.to_string(), w.to_string()),
        _ => panic!("reparse {got:?}\nfull parse {want:?}"),
    }
    match got {
        Ok(g) => g.outcome(),
        Err(e) => panic!("expected a policy, got {e}"),
    }
}

/// The reason `plan` gives up, checked to lead to the full parse's result.
fn fallback(old: &str, new: &str) -> Fallback {
    let prev = keep(old);
    let reason = match plan(&prev, "p.yaml", new) {
        Ok(p) => panic!("expected a fallback, got {p:?}"),
        Err(reason) => reason,
    };
    let got = reparse(&prev, "p.yaml", new);
    let want = parse_keeping("p.yaml", new);
    match (got, want) {
        (Ok(g), Ok(w)) => {
            assert!(g.same_as(&w));
            assert_eq!(g.outcome(), Outcome::Fallback(reason));
        }
        (Err(g), Err(w)) => assert_eq!(g.to_string(), w.to_string()),
        (g, w) => panic!("reparse {g:?}\nfull parse {w:?}"),
    }
    reason
}

const ABC: &[(&str, u16)] = &[("a", 1), ("b", 2), ("c", 3), ("d", 4)];

#[test]
fn one_edited_block_is_read_alone() {
    let old = file(ABC);
    let new = file(&[("a", 1), ("b", 22), ("c", 3), ("d", 4)]);
    assert_eq!(
        outcome(&old, &new),
        Outcome::Reused {
            reused: 3,
            parsed: 1
        }
    );
    // The edited block's positions are those of a full parse.
    let p = reparse(&keep(&old), "p.yaml", &new).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.policy(),
        &parse("p.yaml", &new).unwrap_or_else(|e| panic!("{e}"))
    );
    assert_eq!(p.reused_blocks(), 3);
}

#[test]
fn update_works_in_place_and_keeps_the_last_good_parse() {
    let old = file(ABC);
    let mut live = keep(&old);
    let new = file(&[("a", 1), ("b", 22), ("c", 3), ("d", 4)]);
    live.update("p.yaml", &new)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        live.outcome(),
        Outcome::Reused {
            reused: 3,
            parsed: 1
        }
    );
    assert!(live.same_as(&keep(&new)));
    let bad = new.replace("port: 22", "port: 0");
    let err = live.update("p.yaml", &bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        parse("p.yaml", &bad).map(|_| ()).unwrap_err().to_string()
    );
    assert!(live.same_as(&keep(&new)), "the last good parse stays");
    live.update("p.yaml", &old)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(live.same_as(&keep(&old)));
    assert_eq!(live.reused_blocks(), 3);
}

#[test]
fn added_and_removed_blocks_are_read_with_their_neighbours() {
    let old = file(ABC);
    // A block added in the middle: read with the block before it.
    let new = file(&[("a", 1), ("b", 2), ("bb", 7), ("c", 3), ("d", 4)]);
    assert_eq!(
        outcome(&old, &new),
        Outcome::Reused {
            reused: 3,
            parsed: 2
        }
    );
    let p = reparse(&keep(&old), "p.yaml", &new).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.policy(), keep(&new).policy());
    // A block added at the end.
    let new = file(&[("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)]);
    assert!(matches!(
        outcome(&old, &new),
        Outcome::Reused { parsed: 1 | 2, .. }
    ));
    // A block removed.
    let new = file(&[("a", 1), ("c", 3), ("d", 4)]);
    assert!(matches!(
        outcome(&old, &new),
        Outcome::Reused { reused: 2 | 3, .. }
    ));
    // The last block removed.
    let new = file(&[("a", 1), ("b", 2), ("c", 3)]);
    assert!(matches!(
        outcome(&old, &new),
        Outcome::Reused { reused: 2 | 3, .. }
    ));
    // The same text.
    assert_eq!(
        outcome(&old, &old),
        Outcome::Reused {
            reused: 4,
            parsed: 0
        }
    );
}

#[test]
fn comments_blank_lines_and_crlf_are_kept_in_the_fast_path() {
    let old = format!(
        "{HEADER}  # the first block\n{}\n# column-0 comment\n{}  # between\n{}",
        block("a", 1),
        block("b", 2),
        block("c", 3)
    );
    let new = old.replace("port: 2", "port: 2222");
    assert_eq!(
        outcome(&old, &new),
        Outcome::Reused {
            reused: 2,
            parsed: 1
        }
    );
    let new = old.replace("# between\n", "# between\n\n\n# more\n");
    assert!(matches!(outcome(&old, &new), Outcome::Reused { .. }));
    let (old, new) = (old.replace('\n', "\r\n"), new.replace('\n', "\r\n"));
    assert!(matches!(outcome(&old, &new), Outcome::Reused { .. }));
}

#[test]
fn sections_after_network_policies_stay_fast_for_inner_blocks() {
    let old = format!("{}process:\n  run_as_group: agent\n", file(ABC));
    let old = old.replacen("process:\n  run_as_user: agent\n", "", 1);
    let new = old.replace("port: 2", "port: 9");
    assert!(matches!(
        outcome(&old, &new),
        Outcome::Reused { parsed: 1, .. }
    ));
    // The last block's edit reaches the tail: read in full.
    let new = old.replace("port: 4", "port: 9");
    assert_eq!(fallback(&old, &new), Fallback::ChunkText);
    // So does an edit of the tail itself.
    let new = old.replace("run_as_group: agent", "run_as_group: other");
    assert_eq!(fallback(&old, &new), Fallback::ChunkText);
    // And deleting the last block together with the tail (the new text has no line at column 0
    // after the blocks, but the text it replaces had): found by the property test below.
    let last = old.find("  d:\n").unwrap();
    let new = old[..last].to_owned();
    assert_eq!(fallback(&old, &new), Fallback::ChunkText);
    assert!(!keep(&new).policy().present.process);
}

#[test]
fn block_scalars_quoted_and_flow_values_span_lines() {
    let old = format!(
        "{HEADER}  a:\n    name: |+\n      kept\n\n\n{}  b:\n    name: \"two\n      lines\"\n    endpoints: [ {{ host: b.example.com,\n        port: 2 }} ]\n    binaries:\n      - {{ path: /usr/bin/curl }}\n{}",
        &block("a", 1)["  a:\n".len()..],
        block("c", 3)
    );
    for new in [
        old.replace("kept", "kept\n      more"),
        old.replace("two\n", "two\n\n"),
        old.replace("port: 2 }", "port: 3 }"),
        old.replace("port: 3", "port: 4"),
    ] {
        assert!(
            matches!(outcome(&old, &new), Outcome::Reused { .. }),
            "{new}"
        );
    }
}

#[test]
fn qualifying_needs_a_plain_layout() {
    let unqualified = |text: &str| keep(text).unqualified();
    assert_eq!(unqualified(&file(ABC)), None);
    assert_eq!(unqualified("version: 1\n"), Some(Unqualified::NoBlocks));
    assert_eq!(
        unqualified("version: 1\nnetwork_policies:\n"),
        Some(Unqualified::NoBlocks)
    );
    let aliases = file(ABC).replace("{ path: /usr/bin/curl }", "&p { path: /usr/bin/curl }");
    let aliases = aliases.replacen("&p { path: /usr/bin/curl }", "*p", 4);
    let aliases = aliases.replacen("*p", "&p { path: /usr/bin/curl }", 1);
    assert_eq!(unqualified(&aliases), Some(Unqualified::Aliases));
    // Anchors without aliases are fine.
    let anchors = file(ABC).replace("{ path: /usr/bin/curl }", "&p { path: /usr/bin/curl }");
    assert_eq!(unqualified(&anchors), None);
    let quoted = file(ABC).replace("  b:\n", "  \"b\":\n");
    assert_eq!(unqualified(&quoted), Some(Unqualified::Keys));
    let numeric = file(&[("a", 1), ("b", 2)]).replace("  b:\n", "  2b:\n");
    assert_eq!(unqualified(&numeric), Some(Unqualified::Keys));
    let flow = format!(
        "{HEADER}  a: {{ endpoints: [{{ host: a.example.com, port: 1 }}], binaries: [{{ path: /x }}] }}\n"
    );
    assert_eq!(unqualified(&flow), None);
    let in_flow = format!(
        "{HEADER}  {{\n  a: {{ endpoints: [{{ host: a.example.com, port: 1 }}], binaries: [{{ path: /x }}] }}\n  }}\n"
    );
    assert_ne!(
        parse_keeping("p.yaml", &in_flow)
            .map(|p| p.unqualified())
            .ok(),
        Some(None)
    );
    let commented = file(ABC).replace("network_policies:\n", "network_policies: # blocks\n");
    assert_eq!(unqualified(&commented), Some(Unqualified::Header));
    let directive = format!("%YAML 1.2\n---\n{}", file(ABC));
    assert_eq!(unqualified(&directive), Some(Unqualified::Header));
    let lone_cr = file(ABC).replace("version: 1\n", "version: 1 #\r\n# x\r# y\n");
    assert_eq!(unqualified(&lone_cr), Some(Unqualified::Text));
    let deeper = file(ABC).replace("\n  ", "\n    ");
    assert_eq!(unqualified(&deeper), None);
    // Comments between a key and its value are fine; an anchor or a tag on a block is not.
    let noted = file(ABC).replace("  b:\n", "  b:   # note\n\n    # more\n");
    assert_eq!(unqualified(&noted), None);
    let anchored = file(ABC).replace("  b:\n", "  b: &blk\n");
    assert_eq!(unqualified(&anchored), Some(Unqualified::Keys));
    let tagged = file(ABC).replace("  b:\n", "  b: !!map\n");
    assert_eq!(unqualified(&tagged), Some(Unqualified::Keys));
    let underscore = file(ABC).replace("  b:\n", "  _b-1.x:\n");
    assert_eq!(unqualified(&underscore), None);
}

#[test]
fn parsed_can_be_kept_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Parsed>();
}

#[test]
fn every_fallback_reason() {
    let old = file(ABC);
    // The previous file does not qualify.
    let quoted = old.replace("  b:\n", "  \"b\":\n");
    assert_eq!(
        fallback(&quoted, &quoted.replace("port: 3", "port: 5")),
        Fallback::Unqualified(Unqualified::Keys)
    );
    // The new file is too large.
    let huge = format!("{old}#{}\n", "x".repeat(super::super::MAX_POLICY_BYTES));
    assert_eq!(fallback(&old, &huge), Fallback::TooLarge);
    // An edit of the header, or of the first key's indentation.
    assert_eq!(
        fallback(
            &old,
            &old.replace("run_as_user: agent", "run_as_user: other")
        ),
        Fallback::BeforeBlocks
    );
    assert_eq!(
        fallback(&old, &old.replacen("  a:\n", "   a:\n", 1)),
        Fallback::BeforeBlocks
    );
    // A changed line at column 0: a document marker, a top-level key, a tab.
    for inserted in ["---\n", "...\n", "process: {}\n", "\t\n", "x\n"] {
        let new = old.replace("  c:\n", &format!("{inserted}  c:\n"));
        assert_eq!(fallback(&old, &new), Fallback::ChunkText, "{inserted:?}");
    }
    // A lone CR or a missing line break before the next block.
    assert_eq!(
        fallback(&old, &old.replace("port: 2 }", "port: 2 } #\r#")),
        Fallback::ChunkText
    );
    assert_eq!(
        fallback(&old, &old.replace("curl }\n  c:", "curl }  c:")),
        Fallback::ChunkText
    );
    // The changed block does not validate, or does not read alone (an alias to an unchanged
    // block's anchor).
    assert_eq!(
        fallback(&old, &old.replace("port: 2", "port: 0")),
        Fallback::ChunkInvalid
    );
    assert_eq!(
        fallback(&old, &old.replace("port: 2 }", "port: 2")),
        Fallback::ChunkInvalid
    );
    let anchored = old.replacen("{ path: /usr/bin/curl }", "&p { path: /usr/bin/curl }", 1);
    let aliased = anchored.replacen("{ path: /usr/bin/curl }", "*p", 2);
    let aliased = aliased.replacen("*p", "&p { path: /usr/bin/curl }", 1);
    assert_eq!(fallback(&anchored, &aliased), Fallback::ChunkInvalid);
    // A changed key that is quoted, or a duplicate of an unchanged one.
    assert_eq!(
        fallback(&old, &old.replace("  b:\n", "  \"b\":\n")),
        Fallback::ChunkKeys
    );
    assert_eq!(
        fallback(&old, &old.replace("  c:\n", "  a:\n")),
        Fallback::DuplicateKey
    );
}

#[test]
fn budget_bound_falls_back() {
    // 130,000 ports are 130,000 nodes: the previous file's count plus the changed block's
    // would exceed the reader's 250,000-node budget, although the new file does not. (Only the
    // plan is checked: full parses of this file are slow in a debug build.)
    let ports = vec!["1"; 130_000].join(",");
    let big = format!(
        "  big:\n    endpoints:\n      - {{ host: big.example.com, ports: [{ports}] }}\n    binaries:\n      - {{ path: /usr/bin/curl }}\n"
    );
    let old = format!("{}{big}", file(ABC));
    let new = old.replace("big.example.com", "bigger.example.com");
    let reason = plan(&keep(&old), "p.yaml", &new).map(|_| ()).unwrap_err();
    assert_eq!(reason, Fallback::Budget);
}

// The property: random edits of varied documents.

const DOCS: &[&str] = &[
    // Static sections first, several blocks, comments.
    "version: 1\nfilesystem_policy:\n  read_only: [/usr, /etc]\n  read_write: [/sandbox]\nlandlock:\n  compatibility: best_effort\nnetwork_policies:\n  # GitHub\n  github:\n    name: GitHub API\n    endpoints:\n      - host: api.github.com\n        port: 443\n        protocol: rest\n        access: read-only\n      - { host: \"*.githubusercontent.com\", ports: [80, 443] }\n    binaries:\n      - path: /usr/bin/git\n      - { path: \"/usr/lib/git-core/**\" }\n\n  pypi:\n    endpoints:\n      - { host: pypi.org, port: 443 }\n      - { host: files.pythonhosted.org, port: 443 }\n    binaries:\n      - { path: /usr/bin/pip* }\n# column-0 comment\n  npm:\n    endpoints:\n      - host: registry.npmjs.org\n        port: 443\n        protocol: rest\n        rules:\n          - allow: { method: GET, path: \"/**\" }\n          - allow:\n              method: GET\n              path: /-/v1/search\n              query:\n                text: \"*\"\n        deny_rules:\n          - { method: \"*\", path: \"/-/admin/**\" }\n    binaries:\n      - { path: /usr/bin/node }\n  last:\n    endpoints:\n      - { host: last.example.com, port: 22 }\n    binaries:\n      - { path: \"/**\" }\n",
    // A tail section after network_policies, keys at column 4.
    "version: 1\nnetwork_policies:\n    a:\n        endpoints:\n            - { host: a.example.com, port: 1 }\n        binaries:\n            - { path: /usr/bin/a }\n    b:\n        endpoints:\n            - { host: b.example.com, port: 2 }\n        binaries:\n            - { path: /usr/bin/b }\n    c:\n        endpoints:\n            - { host: c.example.com, port: 3 }\n        binaries:\n            - { path: /usr/bin/c }\nprocess:\n  run_as_user: agent\n  run_as_group: agent\n",
    // Block scalars (keep chomping with trailing blank lines), multi-line quoted strings, flow
    // collections spanning lines.
    "version: 1\nnetwork_policies:\n  a:\n    endpoints:\n      - { host: a.example.com, port: 1 }\n    binaries:\n      - { path: /usr/bin/a }\n    name: |+\n      kept\n\n\n  b:\n    name: \"two\n      lines\"\n    endpoints: [ { host: b.example.com,\n        port: 2 } ]\n    binaries:\n      - { path: /usr/bin/curl }\n  c:\n    name: >-\n      folded\n      text\n    endpoints:\n      - { host: c.example.com, port: 3 }\n    binaries: [ { path: '/usr/bin/c',\n      } ]\n  d:\n    name: 'single\n      quoted'\n    endpoints:\n      - { host: d.example.com, port: 4 }\n    binaries:\n      - { path: /usr/bin/d }\n",
    // Anchors and aliases.
    "version: 1\nnetwork_policies:\n  a:\n    endpoints:\n      - &ep { host: a.example.com, port: 1 }\n    binaries: &bins\n      - { path: /usr/bin/curl }\n  b:\n    endpoints:\n      - { host: b.example.com, port: 2 }\n    binaries: *bins\n  c:\n    endpoints:\n      - { host: c.example.com, port: 3 }\n    binaries:\n      - { path: /usr/bin/c }\n",
    // Anchors without aliases, CRLF line ends.
    "version: 1\r\nnetwork_policies:\r\n  a:\r\n    endpoints:\r\n      - &ep { host: a.example.com, port: 1 }\r\n    binaries:\r\n      - { path: /usr/bin/curl }\r\n  b:\r\n    endpoints:\r\n      - { host: b.example.com, port: 2 }\r\n    binaries:\r\n      - { path: /usr/bin/b }\r\n  c:\r\n    endpoints:\r\n      - { host: c.example.com, port: 3 }\r\n    binaries:\r\n      - { path: /usr/bin/c }\r\n",
    // Comments between keys and values, keys with `_`, `-` and `.`, an anchor and a tag on a
    // block.
    "version: 1\nnetwork_policies:\n  _a-1.x:   # note\n\n    # more\n    endpoints:\n      - { host: a.example.com, port: 1 }\n    binaries:\n      - { path: /usr/bin/a }\n  b: &blk\n    endpoints:\n      - { host: b.example.com, port: 2 }\n    binaries:\n      - { path: /usr/bin/b }\n  c: !!map\n    endpoints:\n      - { host: c.example.com, port: 3 }\n    binaries:\n      - { path: /usr/bin/c }\n  d:\n    endpoints:\n      - { host: d.example.com, port: 4 }\n    binaries:\n      - { path: /usr/bin/d }\n",
    // Empty-looking values, trailing comments, no final line break.
    "version: 1\nnetwork_policies:\n\n  a:\n    endpoints:\n      - { host: a.example.com, port: 1 } # one\n    binaries:\n      - { path: /usr/bin/a }\n  b:\n    name:\n    endpoints:\n      - { host: b.example.com, port: 2 }\n    binaries:\n      - { path: /usr/bin/b }\n# end\n  c:\n    endpoints:\n      - { host: c.example.com, port: 3 }\n    binaries:\n      - { path: /usr/bin/c }",
];

const SNIPPETS: &[&str] = &[
    "\"",
    "'",
    "|",
    "|+",
    "|-",
    ">-",
    ">",
    "{",
    "}",
    "[",
    "]",
    ",",
    "&a ",
    "*a",
    "&ep ",
    "*ep",
    "*bins",
    "*blk",
    "&blk ",
    "Null",
    "---\n",
    "...\n",
    "#",
    " #c",
    "\t",
    "\n",
    "\r\n",
    "\r",
    "  ",
    ":",
    ": ",
    "- ",
    "? ",
    "!",
    "!!str ",
    "%YAML 1.2\n",
    "\0",
    "\u{feff}",
    "\u{85}",
    "\u{2028}",
    "é",
    "<<: ",
    "null",
    "~",
    "\"\n",
    "'\n",
    "x",
    "1",
    "9",
    "\n\n",
    "  z:\n",
    "\n  k2:\n",
    "  new_blk:\n    endpoints:\n      - { host: new.example.com, port: 1 }\n    binaries:\n      - { path: /usr/bin/new }\n",
    "process:\n  run_as_user: x\n",
    "network_policies:\n",
    "    name: n\n",
    "      - { path: /x }\n",
];

#[derive(Clone, Debug)]
enum Edit {
    Insert(prop::sample::Index, usize),
    Delete(prop::sample::Index, usize),
    Replace(prop::sample::Index, usize, usize),
    DeleteLine(prop::sample::Index),
    DuplicateLine(prop::sample::Index),
    Indent(prop::sample::Index, usize),
    Dedent(prop::sample::Index),
    ReplaceLine(prop::sample::Index, usize),
    /// Change a digit or a letter into another.
    Retype(prop::sample::Index, u8),
    /// Change a digit into another (mostly keeps the file valid).
    RetypeDigit(prop::sample::Index, u8),
    /// Add a valid block with a new key before a block, at that block's column.
    AddBlock(prop::sample::Index, u16),
    CopyBlock(prop::sample::Index, prop::sample::Index),
    DeleteBlock(prop::sample::Index),
    RenameKey(prop::sample::Index, prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = any::<prop::sample::Index>;
    let snippet = || 0..SNIPPETS.len();
    prop_oneof![
        2 => (at(), snippet()).prop_map(|(a, s)| Edit::Insert(a, s)),
        1 => (at(), 1usize..40).prop_map(|(a, n)| Edit::Delete(a, n)),
        1 => (at(), 1usize..8, snippet()).prop_map(|(a, n, s)| Edit::Replace(a, n, s)),
        1 => at().prop_map(Edit::DeleteLine),
        1 => at().prop_map(Edit::DuplicateLine),
        1 => (at(), 1usize..3).prop_map(|(a, n)| Edit::Indent(a, n)),
        1 => at().prop_map(Edit::Dedent),
        1 => (at(), snippet()).prop_map(|(a, s)| Edit::ReplaceLine(a, s)),
        2 => (at(), any::<u8>()).prop_map(|(a, b)| Edit::Retype(a, b)),
        12 => (at(), any::<u8>()).prop_map(|(a, b)| Edit::RetypeDigit(a, b)),
        8 => (at(), any::<u16>()).prop_map(|(a, n)| Edit::AddBlock(a, n)),
        2 => (at(), at()).prop_map(|(a, b)| Edit::CopyBlock(a, b)),
        4 => at().prop_map(Edit::DeleteBlock),
        1 => (at(), at()).prop_map(|(a, b)| Edit::RenameKey(a, b)),
    ]
}

fn floor_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Byte ranges of the lines of `text`, each with its line break.
fn lines(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, b) in text.bytes().enumerate() {
        if b == b'\n' {
            out.push((start, i + 1));
            start = i + 1;
        }
    }
    if start < text.len() {
        out.push((start, text.len()));
    }
    out
}

/// Byte ranges of the blocks: from a line with a key after 2 or 4 spaces to the next such line.
fn blocks(text: &str) -> Vec<(usize, usize)> {
    let starts: Vec<usize> = lines(text)
        .into_iter()
        .filter(|&(s, _)| {
            let l = &text.as_bytes()[s..];
            let spaces = l.iter().take_while(|&&b| b == b' ').count();
            matches!(spaces, 2 | 4) && l.get(spaces).is_some_and(u8::is_ascii_alphabetic)
        })
        .map(|(s, _)| s)
        .collect();
    let mut out = Vec::new();
    for (k, &s) in starts.iter().enumerate() {
        out.push((s, starts.get(k + 1).copied().unwrap_or(text.len())));
    }
    out
}

fn apply(text: &str, e: &Edit) -> String {
    let mut t = text.to_owned();
    let len = t.len();
    match e {
        Edit::Insert(a, s) => {
            let at = floor_boundary(&t, a.index(len + 1));
            t.insert_str(at, SNIPPETS[*s]);
        }
        Edit::Delete(a, n) => {
            let from = floor_boundary(&t, a.index(len + 1));
            let to = floor_boundary(&t, (from + n).min(len));
            t.replace_range(from..to, "");
        }
        Edit::Replace(a, n, s) => {
            let from = floor_boundary(&t, a.index(len + 1));
            let to = floor_boundary(&t, (from + n).min(len));
            t.replace_range(from..to, SNIPPETS[*s]);
        }
        Edit::DeleteLine(a) | Edit::DuplicateLine(a) | Edit::Dedent(a) => {
            let ls = lines(&t);
            if ls.is_empty() {
                return t;
            }
            let (s, end) = ls[a.index(ls.len())];
            match e {
                Edit::DeleteLine(_) => t.replace_range(s..end, ""),
                Edit::DuplicateLine(_) => {
                    let line = t[s..end].to_owned();
                    t.insert_str(s, &line);
                }
                _ => {
                    let n = t[s..].bytes().take(2).take_while(|&b| b == b' ').count();
                    t.replace_range(s..s + n, "");
                }
            }
        }
        Edit::Indent(a, n) => {
            let ls = lines(&t);
            if let Some(&(s, _)) = ls.get(a.index(ls.len().max(1))) {
                t.insert_str(s, &" ".repeat(*n));
            }
        }
        Edit::ReplaceLine(a, snip) => {
            let ls = lines(&t);
            if let Some(&(s, end)) = ls.get(a.index(ls.len().max(1))) {
                t.replace_range(s..end, SNIPPETS[*snip]);
            }
        }
        Edit::Retype(a, b) => {
            let candidates: Vec<usize> = t
                .bytes()
                .enumerate()
                .filter(|(_, c)| c.is_ascii_alphanumeric())
                .map(|(i, _)| i)
                .collect();
            if let Some(&i) = candidates.get(a.index(candidates.len().max(1))) {
                let c = t.as_bytes()[i];
                let new = if c.is_ascii_digit() {
                    b'0' + b % 10
                } else {
                    b'a' + b % 26
                };
                t.replace_range(i..=i, &(new as char).to_string());
            }
        }
        Edit::RetypeDigit(a, b) => {
            // Digits of ports, so that the file mostly stays valid.
            let digits: Vec<usize> = lines(&t)
                .into_iter()
                .filter(|&(s, end)| t[s..end].contains("port"))
                .flat_map(|(s, end)| (s..end).filter(|&i| t.as_bytes()[i].is_ascii_digit()))
                .collect();
            if let Some(&i) = digits.get(a.index(digits.len().max(1))) {
                t.replace_range(i..=i, &((b'1' + b % 9) as char).to_string());
            }
        }
        Edit::AddBlock(a, n) => {
            let bs = blocks(&t);
            if !bs.is_empty() {
                let at = bs[a.index(bs.len())].0;
                let indent = t[at..].bytes().take_while(|&b| b == b' ').count();
                let (k, i2, i3) = (
                    " ".repeat(indent),
                    " ".repeat(2 * indent),
                    " ".repeat(3 * indent),
                );
                let port = n % 60_000 + 1;
                t.insert_str(
                    at,
                    &format!("{k}added_{n}:\n{i2}endpoints:\n{i3}- {{ host: n{n}.example.com, port: {port} }}\n{i2}binaries:\n{i3}- {{ path: /usr/bin/n{n} }}\n"),
                );
            }
        }
        Edit::CopyBlock(from, to) => {
            let bs = blocks(&t);
            if !bs.is_empty() {
                let (s, end) = bs[from.index(bs.len())];
                let copy = t[s..end].to_owned();
                let copy = if copy.ends_with('\n') {
                    copy
                } else {
                    format!("{copy}\n")
                };
                let at = bs[to.index(bs.len())].0;
                t.insert_str(at, &copy);
            }
        }
        Edit::DeleteBlock(a) => {
            let bs = blocks(&t);
            if !bs.is_empty() {
                let (s, end) = bs[a.index(bs.len())];
                t.replace_range(s..end, "");
            }
        }
        Edit::RenameKey(a, b) => {
            let bs = blocks(&t);
            if !bs.is_empty() {
                let key_of = |s: usize| {
                    let line = &t[s..];
                    let line = &line[..line.find('\n').unwrap_or(line.len())];
                    let k = line.trim_start();
                    (
                        s + line.len() - k.len(),
                        k.find(':').map_or("", |c| &k[..c]).to_owned(),
                    )
                };
                let (at, old) = key_of(bs[a.index(bs.len())].0);
                let (_, new) = key_of(bs[b.index(bs.len())].0);
                t.replace_range(at..at + old.len(), &new);
            }
        }
    }
    t
}

fn render(r: &Result<Parsed, PolicyErrors>) -> Result<&Parsed, String> {
    r.as_ref().map_err(ToString::to_string)
}

#[derive(Default)]
struct Counts {
    reused: usize,
    fallback: usize,
    errors: usize,
}

/// Applies each edit in turn; after each, the reparse from the last good result must equal the
/// full parse (and the full parse must equal `parse`). After an error the next edit applies to
/// the last good text if `revert`, else to the bad one (the reparse then starts from an older
/// text).
fn check_chain(
    doc: &str,
    edits: &[Edit],
    revert: bool,
    counts: &mut Counts,
) -> Result<(), TestCaseError> {
    let mut prev = keep(doc);
    let mut live = prev.clone();
    let mut text = doc.to_owned();
    for e in edits {
        text = apply(&text, e);
        let before = live.clone();
        let updated = live.update("p.yaml", &text);
        let got = reparse(&prev, "p.yaml", &text);
        let want = parse_keeping("p.yaml", &text);
        let plain = parse("p.yaml", &text);
        prop_assert_eq!(
            want.as_ref()
                .map(Parsed::policy)
                .map_err(ToString::to_string),
            plain.as_ref().map_err(ToString::to_string)
        );
        match (render(&got), render(&want)) {
            (Ok(g), Ok(w)) => {
                prop_assert!(
                    g.same_as(w),
                    "after {:?}\nold:\n{}\nnew:\n{}\nreparse {:#?}\nfull {:#?}",
                    e,
                    prev.text(),
                    text,
                    g,
                    w
                );
            }
            (Err(g), Err(w)) => prop_assert_eq!(g, w, "after {:?}\n{}", e, text),
            (g, w) => prop_assert!(
                false,
                "after {:?}\nold:\n{}\nnew:\n{}\nreparse {:?}\nfull {:?}",
                e,
                prev.text(),
                text,
                g.map(Parsed::policy),
                w.map(Parsed::policy)
            ),
        }
        // In place, the same result; after an error, the last good parse is kept.
        match (&updated, render(&want)) {
            (Ok(()), Ok(w)) => prop_assert!(live.same_as(w), "update after {:?}\n{}", e, text),
            (Err(u), Err(w)) => {
                prop_assert_eq!(u.to_string(), w);
                prop_assert!(live.same_as(&before));
            }
            _ => prop_assert!(false, "update {:?} after {:?}\n{}", updated, e, text),
        }
        match got {
            Ok(p) => {
                match p.outcome() {
                    Outcome::Reused { .. } => counts.reused += 1,
                    _ => counts.fallback += 1,
                }
                prev = p;
            }
            Err(_) => {
                counts.errors += 1;
                if revert {
                    prev.text().clone_into(&mut text);
                }
            }
        }
    }
    Ok(())
}

#[test]
fn reparse_equals_a_full_parse_after_random_edits() {
    let mut runner = TestRunner::new(Config {
        // About 2,000 edits in all (each checked against two full parses): under 20 s in a
        // debug build.
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let counts = std::cell::RefCell::new(Counts::default());
    let strategy = (
        0..DOCS.len(),
        prop::collection::vec(edit(), 1..8),
        any::<bool>(),
    );
    let result = runner.run(&strategy, |(doc, edits, revert)| {
        check_chain(DOCS[doc], &edits, revert, &mut counts.borrow_mut())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let counts = counts.into_inner();
    // The property must exercise the fast path, not only the fallback.
    let total = counts.reused + counts.fallback + counts.errors;
    eprintln!(
        "{total} edits: {} read incrementally, {} in full after trying, {} invalid",
        counts.reused, counts.fallback, counts.errors
    );
    assert!(
        counts.reused * 6 > total,
        "reused {} fallback {} errors {}",
        counts.reused,
        counts.fallback,
        counts.errors
    );
}
