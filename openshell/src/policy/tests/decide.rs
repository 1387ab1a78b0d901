//! Decisions: everything POLICY.md says a connection or request decision depends on.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::super::{
    CompiledPolicy, ConnectionQuery, Decision, HttpRequestQuery, Inspection, Verdict, parse,
};

pub(super) fn compile(network: &str) -> CompiledPolicy {
    let yaml = format!("version: 1\nnetwork_policies:\n{network}");
    parse("test.yaml", &yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
        .compile()
}

pub(super) fn conn<'a>(host: &'a str, port: u16, binary: &'a str) -> ConnectionQuery<'a> {
    ConnectionQuery {
        host,
        port,
        binary: Path::new(binary),
        ancestors: &[],
        dest_ip: None,
    }
}

fn l4(p: &CompiledPolicy, host: &str, port: u16, binary: &str) -> Decision {
    p.decide_connection(&conn(host, port, binary))
}

pub(super) fn l7(p: &CompiledPolicy, method: &str, target: &str) -> Decision {
    p.decide_request(
        &conn("api.example.com", 443, "/usr/bin/curl"),
        &HttpRequestQuery { method, target },
    )
}

fn allowed(d: &Decision) -> bool {
    d.verdict == Verdict::Allow
}

const GITHUB: &str = include_str!("../../../../policies/github_repos.yaml");
const DOWNLOAD: &str = include_str!("../../../../policies/download_api.yaml");
const PYPI: &str = include_str!("../../../../policies/pypi.yaml");

fn shipped(text: &str) -> CompiledPolicy {
    parse("p.yaml", text)
        .unwrap_or_else(|e| panic!("{e}"))
        .compile()
}

#[test]
fn default_policy_denies_everything() {
    let p = shipped(include_str!("../../../../policies/default.yaml"));
    let d = l4(&p, "pypi.org", 443, "/usr/bin/pip");
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.reason.to_string(), "no endpoint matches pypi.org:443");
    assert!(!p.name_could_be_allowed("pypi.org"));
}

#[test]
fn pypi_example() {
    let p = shipped(PYPI);
    let d = l4(&p, "files.pythonhosted.org", 443, "/usr/bin/pip");
    assert!(allowed(&d));
    assert_eq!(d.inspection, Inspection::None);
    assert_eq!(d.block.as_deref(), Some("pypi"));
    assert!(allowed(&l4(&p, "PyPI.org.", 443, "/usr/local/bin/uv")));
    assert!(!allowed(&l4(&p, "pypi.org", 80, "/usr/bin/pip")));
    let d = l4(&p, "pypi.org", 443, "/usr/bin/curl");
    assert_eq!(
        d.reason.to_string(),
        "endpoint matches in block pypi but binary /usr/bin/curl is not listed (no ancestors)"
    );
    assert!(p.name_could_be_allowed("files.pythonhosted.org."));
    assert!(!p.name_could_be_allowed("evil.pythonhosted.org"));
}

#[test]
fn ancestors_can_match() {
    let p = shipped(PYPI);
    let ancestors = [PathBuf::from("/bin/bash"), PathBuf::from("/usr/bin/pip")];
    let q = ConnectionQuery {
        ancestors: &ancestors,
        ..conn("pypi.org", 443, "/usr/bin/python3.12")
    };
    assert!(allowed(&p.decide_connection(&q)));
    let ancestors = [PathBuf::from("/bin/bash"), PathBuf::from("/sbin/init")];
    let q = ConnectionQuery {
        ancestors: &ancestors,
        ..conn("pypi.org", 443, "/usr/bin/python3.12")
    };
    let d = p.decide_connection(&q);
    assert_eq!(
        d.reason.to_string(),
        "endpoint matches in block pypi but binary /usr/bin/python3.12 is not listed (ancestors: /bin/bash, /sbin/init)"
    );
}

#[test]
fn binary_globs() {
    let p = compile(
        "  b:\n    endpoints: [{ host: a.example.com, port: 443 }]\n    binaries:\n      - path: /usr/bin/python3*\n      - path: /sandbox/.vscode-server/**\n",
    );
    assert!(allowed(&l4(
        &p,
        "a.example.com",
        443,
        "/usr/bin/python3.12"
    )));
    assert!(allowed(&l4(
        &p,
        "a.example.com",
        443,
        "/sandbox/.vscode-server/bin/abc/node"
    )));
    assert!(!allowed(&l4(
        &p,
        "a.example.com",
        443,
        "/usr/bin/python3/x"
    )));
    assert!(!allowed(&l4(
        &p,
        "a.example.com",
        443,
        "/usr/local/bin/python3"
    )));
    let any = compile(
        "  b:\n    endpoints: [{ host: a.example.com, port: 443 }]\n    binaries: [{ path: \"/**\" }]\n",
    );
    assert!(allowed(&l4(&any, "a.example.com", 443, "/opt/x/y/z")));
}

#[test]
fn host_forms_and_ports() {
    let p = compile(
        r#"  b:
    endpoints:
      - { host: "*.example.com", port: 443 }
      - { host: "**.deep.example.org", ports: [80, 8080] }
      - { host: "*-aiplatform.googleapis.com", port: 443 }
      - { host: "*.s3.*.amazonaws.com", port: 443 }
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    let ok = |h: &str, port: u16| allowed(&l4(&p, h, port, "/usr/bin/curl"));
    assert!(ok("API.Example.com.", 443));
    assert!(!ok("example.com", 443));
    assert!(!ok("a.b.example.com", 443));
    assert!(ok("a.deep.example.org", 8080));
    assert!(ok("a.b.c.deep.example.org", 80));
    assert!(!ok("a.deep.example.org", 443));
    assert!(ok("europe-west4-aiplatform.googleapis.com", 443));
    assert!(!ok("aiplatform.googleapis.com", 443));
    assert!(ok("my-bucket.s3.eu-west-1.amazonaws.com", 443));
    assert!(!ok("my-bucket.s3.amazonaws.com", 443));
    assert!(p.name_could_be_allowed("x.deep.example.org"));
    assert!(!p.name_could_be_allowed("deep.example.org"));
}

#[test]
fn ip_literal_safety() {
    let p = compile(
        r#"  b:
    endpoints:
      - { host: 198.18.0.10, port: 80 }
      - { host: 10.1.2.3, port: 80, allowed_ips: [10.0.0.0/8] }
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    let d = |h: &str| l4(&p, h, 80, "/usr/bin/curl");
    assert!(allowed(&d("198.18.0.10")));
    assert!(allowed(&d("10.1.2.3")));
    assert_eq!(
        d("192.168.1.1").reason.to_string(),
        "no endpoint matches 192.168.1.1:80"
    );
    assert_eq!(
        d("127.0.0.1").reason.to_string(),
        "destination 127.0.0.1 is a loopback address, which is always denied"
    );
    assert_eq!(
        d("169.254.169.254").reason.to_string(),
        "destination 169.254.169.254 is a link-local address, which is always denied"
    );
    assert!(!allowed(&d("::ffff:127.0.0.1")));
    assert!(!allowed(&d("0.0.0.0")));
    assert!(!allowed(&d("[::1]")));
    assert!(!allowed(&d("[fe80::1]")));
    assert!(!allowed(&d("224.0.0.1")));
}

#[test]
fn resolved_addresses_are_checked() {
    let p = compile(
        r#"  b:
    endpoints:
      - { host: public.example.com, port: 443 }
      - { host: internal.example.com, port: 443, allowed_ips: [10.0.0.0/8, "fd00::/8"] }
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    let with_ip = |host: &str, ip: &str| {
        let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{e}"));
        p.decide_connection(&ConnectionQuery {
            dest_ip: Some(ip),
            ..conn(host, 443, "/usr/bin/curl")
        })
    };
    assert!(allowed(&with_ip("public.example.com", "140.82.112.6")));
    assert_eq!(
        with_ip("public.example.com", "10.0.0.5").reason.to_string(),
        "destination 10.0.0.5 is a private address and no matching endpoint lists it in allowed_ips"
    );
    assert!(!allowed(&with_ip("public.example.com", "127.0.0.1")));
    assert!(!allowed(&with_ip("public.example.com", "100.64.1.1")));
    assert!(allowed(&with_ip("internal.example.com", "10.0.0.5")));
    assert!(allowed(&with_ip("internal.example.com", "::ffff:10.0.0.5")));
    assert!(allowed(&with_ip("internal.example.com", "fd12::1")));
    assert!(!allowed(&with_ip("internal.example.com", "192.168.0.1")));
    assert!(!allowed(&with_ip(
        "internal.example.com",
        "169.254.169.254"
    )));
}

#[test]
fn github_granular_rules() {
    let p = shipped(GITHUB);
    let d = p.decide_connection(&conn("api.github.com", 443, "/usr/bin/gh"));
    assert_eq!(
        d.inspection,
        Inspection::Http {
            terminate_tls: true
        }
    );
    let req = |m: &str, t: &str| {
        p.decide_request(
            &conn("api.github.com", 443, "/usr/bin/gh"),
            &HttpRequestQuery {
                method: m,
                target: t,
            },
        )
    };
    assert!(allowed(&req("GET", "/repos/x/y/pulls")));
    assert!(allowed(&req("HEAD", "/")));
    assert!(allowed(&req("OPTIONS", "/user")));
    assert!(allowed(&req("POST", "/graphql")));
    assert!(!allowed(&req("POST", "/graphql/x")));
    assert!(allowed(&req(
        "DELETE",
        "/repos/<org_name>/alpha-repo/git/refs/x"
    )));
    assert!(allowed(&req("POST", "/repos/<org_name>/bravo-repo/issues")));
    assert!(allowed(&req(
        "PATCH",
        "/repos/<org_name>/bravo-repo/issues/12"
    )));
    assert!(!allowed(&req(
        "PATCH",
        "/repos/<org_name>/bravo-repo/issues/12/comments"
    )));
    let d = req("DELETE", "/repos/<org_name>/bravo-repo");
    assert_eq!(
        d.reason.to_string(),
        "request DELETE /repos/<org_name>/bravo-repo not permitted by block github_repos"
    );
    // Canonicalisation happens before matching: no escaping alpha-repo's write access.
    let d = req("DELETE", "/repos/<org_name>/alpha-repo/../bravo-repo");
    assert!(!allowed(&d), "{}", d.reason);
    let d = req("POST", "/repos/<org_name>/alpha-repo/./issues");
    assert!(allowed(&d));
    assert_eq!(
        d.canonical_target.as_deref(),
        Some("/repos/%3Corg_name%3E/alpha-repo/issues")
    );
}

#[test]
fn get_rules_admit_head_and_presets_expand() {
    let p = compile(
        r#"  b:
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        rules:
          - allow: { method: GET, path: "/x" }
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    assert!(allowed(&l7(&p, "GET", "/x")));
    assert!(allowed(&l7(&p, "HEAD", "/x")));
    assert!(!allowed(&l7(&p, "POST", "/x")));
    assert!(!allowed(&l7(&p, "OPTIONS", "/x")));

    let preset = |access: &str| {
        compile(&format!(
            "  b:\n    endpoints:\n      - {{ host: api.example.com, port: 443, protocol: rest, access: {access} }}\n    binaries: [{{ path: /usr/bin/curl }}]\n"
        ))
    };
    let ro = preset("read-only");
    let rw = preset("read-write");
    let full = preset("full");
    for (m, r, w, f) in [
        ("GET", true, true, true),
        ("HEAD", true, true, true),
        ("OPTIONS", true, true, true),
        ("POST", false, true, true),
        ("PUT", false, true, true),
        ("PATCH", false, true, true),
        ("DELETE", false, false, true),
        ("PROPFIND", false, false, true),
    ] {
        assert_eq!(allowed(&l7(&ro, m, "/a/b")), r, "read-only {m}");
        assert_eq!(allowed(&l7(&rw, m, "/a/b")), w, "read-write {m}");
        assert_eq!(allowed(&l7(&full, m, "/a/b")), f, "full {m}");
    }
}

#[test]
fn query_matching() {
    let p = shipped(DOWNLOAD);
    let ok = |t: &str| allowed(&l7(&p, "GET", t));
    assert!(ok("/api/v1/download?slug=skill-a&version=1.2"));
    assert!(ok("/api/v1/download?version=2.0&slug=skill-x&extra=1"));
    // Every value of a repeated key must match.
    assert!(ok("/api/v1/download?slug=skill-a&slug=skill-b&version=1.0"));
    assert!(!ok("/api/v1/download?slug=skill-a&slug=other&version=1.0"));
    // A missing key fails the allow.
    assert!(!ok("/api/v1/download?slug=skill-a"));
    assert!(!ok("/api/v1/download"));
    assert!(!ok("/api/v1/download?version=3.0&slug=skill-a"));
    // Decoded before matching; `+` is a space; case-sensitive.
    assert!(ok("/api/v1/download?slug=skill%2Da&version=1%2E0"));
    assert!(ok("/api/v1/download?slug=skill-a+b&version=1.0"));
    assert!(!ok("/api/v1/download?slug=SKILL-a&version=1.0"));
    // A malformed escape denies.
    assert!(!ok("/api/v1/download?slug=skill-%zz&version=1.0"));
    // A key without `=` is present with an empty value.
    let p = compile(
        r#"  b:
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        rules:
          - allow: { method: GET, path: /f, query: { flag: "" } }
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    assert!(allowed(&l7(&p, "GET", "/f?flag")));
    assert!(!allowed(&l7(&p, "GET", "/f?flag=1")));
}

#[test]
fn deny_rules_beat_allows() {
    let p = compile(
        r#"  b:
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        access: full
        deny_rules:
          - { method: GET, path: "/admin/**" }
          - { method: "*", path: "/repos/*/rulesets" }
          - method: POST
            path: /search
            query:
              q: "secret*"
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    let d = l7(&p, "GET", "/admin/users");
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(
        d.reason.to_string(),
        "request GET /admin/users matches a deny rule of block b"
    );
    // A GET deny also blocks HEAD.
    assert!(!allowed(&l7(&p, "HEAD", "/admin/users")));
    assert!(allowed(&l7(&p, "POST", "/admin/users")));
    assert!(!allowed(&l7(&p, "DELETE", "/repos/a/rulesets")));
    assert!(allowed(&l7(&p, "DELETE", "/repos/a/b/rulesets")));
    // Canonicalised before the deny rule is checked.
    assert!(!allowed(&l7(&p, "GET", "/public/..%3B/admin/x")));
    assert!(!allowed(&l7(&p, "GET", "//admin//x")));
    assert!(!allowed(&l7(&p, "GET", "/Admin/../admin/x")));
    // A deny fires if any value of a repeated key matches; a malformed query denies.
    assert!(allowed(&l7(&p, "POST", "/search?q=public")));
    assert!(!allowed(&l7(&p, "POST", "/search?q=public&q=secret-plans")));
    assert!(!allowed(&l7(&p, "POST", "/search?q=%zz")));
    assert!(allowed(&l7(&p, "POST", "/search")));
}

#[test]
fn audit_allows_but_marks() {
    let p = compile(
        r#"  b:
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        enforcement: audit
        access: read-only
        deny_rules:
          - { method: GET, path: /secret }
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    let d = l7(&p, "GET", "/ok");
    assert!(allowed(&d) && !d.audit);
    let d = l7(&p, "POST", "/ok");
    assert!(allowed(&d) && d.audit);
    assert_eq!(
        d.reason.to_string(),
        "request POST /ok not permitted by block b"
    );
    let d = l7(&p, "GET", "/secret");
    assert!(allowed(&d) && d.audit);
    // Audit never lets a different binary or host through.
    let d = p.decide_request(
        &conn("api.example.com", 443, "/usr/bin/wget"),
        &HttpRequestQuery {
            method: "GET",
            target: "/ok",
        },
    );
    assert_eq!(d.verdict, Verdict::Deny);
}

#[test]
fn bad_targets_are_denied() {
    let p = compile(
        r#"  b:
    endpoints:
      - { host: api.example.com, port: 443, protocol: rest, access: full }
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    for t in [
        "/a%00b",
        "/a%2Fb",
        "/../etc/passwd",
        "/a#b",
        "/caf\u{e9}",
        "http://evil.example.com/x",
        "/a%252Fb",
    ] {
        let d = l7(&p, "GET", t);
        assert_eq!(d.verdict, Verdict::Deny, "{t}: {}", d.reason);
    }
    assert!(allowed(&l7(&p, "GET", "http://api.example.com/x")));
    assert_eq!(
        l7(&p, "GET", "/a%2Fb").reason.to_string(),
        "request rejected on an endpoint of block b: the path contains an encoded slash (%2F), which this endpoint does not allow"
    );
}

#[test]
fn encoded_slash_when_allowed() {
    let p = compile(
        r#"  npm:
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        allow_encoded_slash: true
        rules:
          - allow: { method: GET, path: "/@scope*" }
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    let d = l7(&p, "GET", "/@scope%2fname");
    assert!(allowed(&d), "{}", d.reason);
    assert_eq!(d.canonical_target.as_deref(), Some("/@scope%2Fname"));
    assert!(!allowed(&l7(&p, "GET", "/@scope%2F..%2F..%2Fadmin")));
}

#[test]
fn passthrough_and_tls_skip_modes() {
    let p = compile(
        r#"  b:
    endpoints:
      - { host: api.example.com, port: 443, protocol: rest, tls: skip, access: read-only }
      - { host: raw.example.com, port: 443 }
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    assert_eq!(
        l4(&p, "api.example.com", 443, "/usr/bin/curl").inspection,
        Inspection::Http {
            terminate_tls: false
        }
    );
    assert_eq!(
        l4(&p, "raw.example.com", 443, "/usr/bin/curl").inspection,
        Inspection::None
    );
    let d = p.decide_request(
        &conn("raw.example.com", 443, "/usr/bin/curl"),
        &HttpRequestQuery {
            method: "DELETE",
            target: "/x",
        },
    );
    assert!(allowed(&d));
    assert_eq!(
        d.reason.to_string(),
        "endpoint of block b is TCP passthrough; requests are not inspected"
    );
}

#[test]
fn one_block_must_match_both_endpoint_and_binary() {
    let p = compile(
        r#"  a:
    endpoints: [{ host: a.example.com, port: 443 }]
    binaries: [{ path: /usr/bin/curl }]
  b:
    endpoints: [{ host: b.example.com, port: 443 }]
    binaries: [{ path: /usr/bin/wget }]
"#,
    );
    assert!(allowed(&l4(&p, "a.example.com", 443, "/usr/bin/curl")));
    assert!(!allowed(&l4(&p, "a.example.com", 443, "/usr/bin/wget")));
    assert!(allowed(&l4(&p, "b.example.com", 443, "/usr/bin/wget")));
}

#[test]
fn a_deny_rule_in_any_matching_block_wins() {
    let p = compile(
        r#"  open:
    endpoints: [{ host: api.example.com, port: 443, protocol: rest, access: full }]
    binaries: [{ path: /usr/bin/curl }]
  guarded:
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        access: full
        deny_rules: [{ method: DELETE, path: "/**" }]
    binaries: [{ path: /usr/bin/curl }]
"#,
    );
    let d = l7(&p, "DELETE", "/x");
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.block.as_deref(), Some("guarded"));
    assert!(allowed(&l7(&p, "GET", "/x")));
}

#[test]
fn decision_json_shape() {
    let p = shipped(DOWNLOAD);
    let d = l7(&p, "GET", "/api/v1/download?slug=skill-a&version=1.0");
    insta::assert_json_snapshot!("decision_allow", d);
    let d = l7(&p, "POST", "/api/v1/download");
    insta::assert_json_snapshot!("decision_deny", d);
}
