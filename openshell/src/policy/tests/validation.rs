//! Parsing and validation: the shipped policies, every error of the issue's list (snapshots of
//! the messages), several errors in one file, the YAML reader's guarantees.

use super::super::{Compatibility, MAX_POLICY_BYTES, parse};

fn errors(yaml: &str) -> String {
    match parse("policy.yaml", yaml) {
        Ok(_) => panic!("expected errors for:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

/// Wraps endpoint lines (indented by 6) in a block with a binary.
fn endpoint(lines: &str) -> String {
    format!(
        "version: 1\nnetwork_policies:\n  b:\n    endpoints:\n      - {}\n    binaries:\n      - path: /usr/bin/curl\n",
        lines.trim_start()
    )
}

#[test]
fn shipped_policies_are_valid() {
    for (name, text) in [
        (
            "default.yaml",
            include_str!("../../../../policies/default.yaml"),
        ),
        ("pypi.yaml", include_str!("../../../../policies/pypi.yaml")),
        (
            "github_repos.yaml",
            include_str!("../../../../policies/github_repos.yaml"),
        ),
        (
            "download_api.yaml",
            include_str!("../../../../policies/download_api.yaml"),
        ),
        (
            "my_api.yaml",
            include_str!("../../../../policies/my_api.yaml"),
        ),
    ] {
        let policy = parse(name, text).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            policy.present.filesystem_policy && policy.present.landlock && policy.present.process
        );
        assert_eq!(policy.process.run_as_user, "sandbox");
    }
    let default = parse(
        "default.yaml",
        include_str!("../../../../policies/default.yaml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        default.network.is_empty(),
        "the default policy allows no network"
    );
}

#[test]
fn static_sections_have_defaults_and_presence() {
    let p = parse("p.yaml", "version: 1\n").unwrap_or_else(|e| panic!("{e}"));
    assert!(!p.present.filesystem_policy && !p.present.landlock && !p.present.process);
    assert_eq!(p.process.run_as_user, "sandbox");
    assert_eq!(p.process.run_as_group, "sandbox");
    assert_eq!(p.landlock.compatibility, Compatibility::BestEffort);
    assert!(!p.filesystem.include_workdir);
    let p = parse(
        "p.yaml",
        "version: 1\nlandlock: { compatibility: hard_requirement }\nprocess: { run_as_user: 1500 }\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(p.present.landlock && p.present.process && !p.present.filesystem_policy);
    assert_eq!(p.landlock.compatibility, Compatibility::HardRequirement);
    assert_eq!(p.process.run_as_user, "1500");
    assert_eq!(p.process.run_as_group, "sandbox");
}

#[test]
fn canonical_yaml_round_trips() {
    for text in [
        include_str!("../../../../policies/github_repos.yaml"),
        include_str!("../../../../policies/download_api.yaml"),
        include_str!("../../../../policies/pypi.yaml"),
    ] {
        let p = parse("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        let canon = p.to_canonical_yaml().unwrap_or_else(|e| panic!("{e}"));
        let again = parse("canon.yaml", &canon).unwrap_or_else(|e| panic!("{e}\n{canon}"));
        assert_eq!(
            again.to_canonical_yaml().ok().as_deref(),
            Some(canon.as_str())
        );
        assert!(p.same_static_sections(&again));
    }
    let p = parse(
        "p.yaml",
        include_str!("../../../../policies/download_api.yaml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    insta::assert_snapshot!(
        "canonical_download_api",
        p.to_canonical_yaml().unwrap_or_else(|e| panic!("{e}"))
    );
}

#[test]
fn accepts_every_documented_field() {
    let yaml = r#"
version: 1
filesystem_policy:
  include_workdir: true
  read_only: [/usr, /lib, /proc, /dev/urandom, /etc]
  read_write: [/sandbox, /tmp, /dev/null]
landlock:
  compatibility: hard_requirement
process:
  run_as_user: "1500"
  run_as_group: "1500"
network_policies:
  everything:
    name: every field
    endpoints:
      - host: "*-aiplatform.googleapis.com"
        ports: [443, 8443]
        protocol: rest
        tls: skip
        enforcement: audit
        access: read-write
        deny_rules:
          - method: POST
            path: "/repos/*/pulls/*/reviews"
            query:
              force: "true"
        allowed_ips: [10.0.0.0/8, "fd00::/8", 100.64.0.1]
        allow_encoded_slash: true
      - host: "**.example.com"
        port: 22
        protocol: tcp
      - host: "*.s3.*.amazonaws.com"
        port: 443
        tls: passthrough
      - host: 198.18.0.10
        port: 80
    binaries:
      - path: /usr/bin/*
      - path: /sandbox/.vscode-server/**
"#;
    let p = parse("p.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    let block = &p.network["everything"];
    assert_eq!(block.name, "every field");
    assert_eq!(block.endpoints.len(), 4);
    assert_eq!(block.endpoints[0].ports, vec![443, 8443]);
    assert_eq!(block.endpoints[0].allowed_ips.len(), 3);
}

/// One case per validation error named in the issue, each with its message snapshot.
#[test]
fn every_listed_error_has_a_precise_message() {
    let cases: Vec<(&str, String)> = vec![
        ("version_missing", "network_policies: {}\n".to_owned()),
        ("version_wrong", "version: 2\n".to_owned()),
        ("version_string", "version: \"one\"\n".to_owned()),
        ("unknown_field_top", "version: 1\nnetwork_policy: {}\n".to_owned()),
        (
            "unknown_field_endpoint",
            endpoint("host: a.example.com\n        port: 443\n        hots: b.example.com"),
        ),
        ("duplicate_key_top", "version: 1\nversion: 1\n".to_owned()),
        (
            "duplicate_key_nested",
            endpoint("host: a.example.com\n        port: 443\n        port: 80"),
        ),
        (
            "port_and_ports",
            endpoint("host: a.example.com\n        port: 443\n        ports: [80]"),
        ),
        ("port_missing", endpoint("host: a.example.com")),
        ("port_zero", endpoint("host: a.example.com\n        port: 0")),
        ("port_too_big", endpoint("host: a.example.com\n        port: 65536")),
        ("ports_empty", endpoint("host: a.example.com\n        ports: []")),
        ("host_star", endpoint("host: \"*\"\n        port: 443")),
        ("host_double_star", endpoint("host: \"**\"\n        port: 443")),
        ("host_tld_wildcard", endpoint("host: \"*.com\"\n        port: 443")),
        ("host_last_label_wildcard", endpoint("host: \"example.*\"\n        port: 443")),
        ("host_double_star_middle", endpoint("host: \"a.**.example.com\"\n        port: 443")),
        ("host_partial_middle", endpoint("host: \"a.b*c.example.com\"\n        port: 443")),
        ("host_missing", endpoint("port: 443")),
        (
            "rest_without_rules_or_access",
            endpoint("host: a.example.com\n        port: 443\n        protocol: rest"),
        ),
        (
            "empty_allow",
            endpoint("host: a.example.com\n        port: 443\n        protocol: rest\n        rules:\n          - allow: {}"),
        ),
        (
            "l7_fields_without_rest",
            endpoint("host: a.example.com\n        port: 443\n        access: full\n        enforcement: audit\n        deny_rules:\n          - { method: GET, path: /x }"),
        ),
        (
            "access_and_rules",
            endpoint("host: a.example.com\n        port: 443\n        protocol: rest\n        access: full\n        rules:\n          - allow: { method: GET, path: /x }"),
        ),
        (
            "rules_empty",
            endpoint("host: a.example.com\n        port: 443\n        protocol: rest\n        rules: []"),
        ),
        (
            "deny_rules_empty",
            endpoint("host: a.example.com\n        port: 443\n        protocol: rest\n        access: full\n        deny_rules: []"),
        ),
        (
            "unknown_protocol",
            endpoint("host: a.example.com\n        port: 443\n        protocol: http"),
        ),
        (
            "unknown_enforcement",
            endpoint("host: a.example.com\n        port: 443\n        protocol: rest\n        access: full\n        enforcement: block"),
        ),
        (
            "unknown_access",
            endpoint("host: a.example.com\n        port: 443\n        protocol: rest\n        access: write-only"),
        ),
        (
            "query_any_empty",
            endpoint("host: a.example.com\n        port: 443\n        protocol: rest\n        rules:\n          - allow:\n              method: GET\n              path: /x\n              query:\n                v: { any: [] }"),
        ),
        (
            "rule_without_path",
            endpoint("host: a.example.com\n        port: 443\n        protocol: rest\n        rules:\n          - allow: { method: GET }"),
        ),
        (
            "allowed_ips_loopback",
            endpoint("host: a.example.com\n        port: 443\n        allowed_ips: [127.0.0.0/8, 169.254.169.254, not-an-ip]"),
        ),
        (
            "ip_literal_hosts",
            "version: 1\nnetwork_policies:\n  b:\n    endpoints:\n      - { host: 127.0.0.1, port: 80 }\n      - { host: \"[fe80::1]\", port: 80 }\n      - { host: 10.0.0.5, port: 80 }\n      - { host: 10.0.0.6, port: 80, allowed_ips: [10.0.0.0/24] }\n    binaries: [{ path: /usr/bin/curl }]\n".to_owned(),
        ),
        (
            "binaries_empty",
            "version: 1\nnetwork_policies:\n  b:\n    endpoints:\n      - { host: a.example.com, port: 443 }\n    binaries: []\n".to_owned(),
        ),
        (
            "binaries_missing",
            "version: 1\nnetwork_policies:\n  b:\n    endpoints:\n      - { host: a.example.com, port: 443 }\n".to_owned(),
        ),
        (
            "binary_relative",
            "version: 1\nnetwork_policies:\n  b:\n    endpoints:\n      - { host: a.example.com, port: 443 }\n    binaries:\n      - path: curl\n      - path: /usr/../bin/curl\n".to_owned(),
        ),
        (
            "filesystem_paths",
            "version: 1\nfilesystem_policy:\n  read_only: [usr, /a/../b, /sandbox/docs]\n  read_write: [/, /sandbox]\n".to_owned(),
        ),
        (
            "root_user_and_group",
            "version: 1\nprocess:\n  run_as_user: root\n  run_as_group: 0\n".to_owned(),
        ),
        (
            "unknown_compatibility",
            "version: 1\nlandlock:\n  compatibility: strict\n".to_owned(),
        ),
    ];
    for (name, yaml) in cases {
        insta::assert_snapshot!(name, errors(&yaml), &yaml);
    }
}

#[test]
fn unsupported_original_fields_say_not_supported_yet() {
    let yaml = r#"
version: 1
network_middlewares:
  redact: { middleware: openshell/regex, order: 10 }
network_policies:
  b:
    endpoints:
      - host: api.github.com
        port: 443
        protocol: graphql
        persisted_queries: deny
      - host: mcp.example.com
        port: 443
        path: /mcp
        protocol: mcp
        mcp: { max_body_bytes: 131072 }
      - host: s3.amazonaws.com
        port: 443
        protocol: rest
        access: full
        credential_signing: sigv4
        signing_service: s3
        request_body_credential_rewrite: true
        websocket_credential_rewrite: true
        allow_uninspected_credentials: true
      - host: api.example.com
        port: 443
        protocol: rest
        rules:
          - allow:
              operation_type: query
              fields: [viewer]
          - allow:
              method: tools/call
              tool: search_web
      - host: rt.example.com
        port: 443
        protocol: websocket
        access: full
      - host: rpc.example.com
        port: 443
        protocol: json-rpc
        json_rpc: { max_body_bytes: 1 }
    binaries:
      - path: /usr/bin/curl
"#;
    let text = errors(yaml);
    assert!(!text.contains("unknown field"), "{text}");
    insta::assert_snapshot!("unsupported_fields", text);
}

#[test]
fn several_errors_in_one_file_are_all_reported() {
    let yaml = r#"version: 1
filesystem_policy:
  read_write: [/]
process:
  run_as_user: root
network_policies:
  one:
    endpoints:
      - host: "*.com"
        port: 0
      - host: api.example.com
        port: 443
        protocol: rest
    binaries: []
  two:
    endpoints:
      - host: a.example.com
        ports: [443, 70000]
        protocol: rest
        rules: []
    binaries:
      - path: relative/bin
"#;
    let err = parse("many.yaml", yaml)
        .err()
        .unwrap_or_else(|| panic!("expected errors"));
    assert_eq!(err.len(), 9, "{err}");
    insta::assert_snapshot!("several_errors", err.to_string());
    insta::assert_json_snapshot!("several_errors_json", err);
}

#[test]
fn positions_point_at_the_offending_value() {
    // serde-saphyr claim 1: node positions for errors found after parsing.
    let yaml = "version: 1\nnetwork_policies:\n  b:\n    endpoints:\n      - host: a.example.com\n        port:    70000\n    binaries: [{ path: /x }]\n";
    let err = parse("p.yaml", yaml)
        .err()
        .unwrap_or_else(|| panic!("expected an error"));
    let e = &err.errors()[0];
    assert_eq!((e.line, e.column), (6, 18), "{e}");
    assert_eq!(e.path, "network_policies.b.endpoints[0].port");
}

#[test]
fn duplicate_keys_are_rejected_at_any_depth() {
    // serde-saphyr claim 2: duplicate keys are errors, not "last one wins".
    for yaml in [
        "version: 1\nversion: 1\n",
        "version: 1\nnetwork_policies:\n  a: { endpoints: [{host: x.example.com, port: 1}], binaries: [{path: /x}] }\n  a: { endpoints: [{host: y.example.com, port: 1}], binaries: [{path: /x}] }\n",
        "version: 1\nnetwork_policies:\n  a:\n    endpoints:\n      - host: x.example.com\n        host: y.example.com\n        port: 1\n    binaries: [{path: /x}]\n",
        "version: 1\nnetwork_policies:\n  a:\n    endpoints:\n      - host: x.example.com\n        port: 1\n        protocol: rest\n        rules:\n          - allow:\n              method: GET\n              path: /x\n              query: { a: \"1\", a: \"2\" }\n    binaries: [{path: /x}]\n",
    ] {
        let text = errors(yaml);
        assert!(text.contains("duplicate key"), "{text}");
    }
}

#[test]
fn alias_expansion_is_bounded() {
    // serde-saphyr claim 3: a "billion laughs" file fails fast instead of exhausting memory.
    // Nine levels of ten-fold aliasing would expand to 10^9 scalars. The document sits under a
    // field whose value is consumed whole (`network_middlewares`), so every alias is replayed
    // unless the reader stops.
    let mut yaml = String::from("version: 1\nnetwork_middlewares:\n  x0: &a0 [\"lol\"]\n");
    for i in 1..=9 {
        let prev = i - 1;
        let refs = vec![format!("*a{prev}"); 10].join(", ");
        yaml.push_str(&format!("  x{i}: &a{i} [{refs}]\n"));
    }
    let err = parse("laughs.yaml", &yaml)
        .err()
        .unwrap_or_else(|| panic!("expected an error"));
    assert_eq!(err.len(), 1, "{err}");
    let text = err.to_string();
    assert!(text.contains("alias"), "{text}");

    // Ordinary aliases keep working.
    let yaml = "version: 1\nnetwork_policies:\n  a:\n    endpoints: [{ host: a.example.com, port: 443 }]\n    binaries: &bins [{ path: /usr/bin/curl }]\n  b:\n    endpoints: [{ host: b.example.com, port: 443 }]\n    binaries: *bins\n";
    let p = parse("aliases.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.network["b"].binaries, vec!["/usr/bin/curl".to_owned()]);
}

#[test]
fn files_over_four_mib_are_rejected() {
    let mut yaml = String::from("version: 1\n# ");
    yaml.push_str(&"x".repeat(MAX_POLICY_BYTES));
    yaml.push('\n');
    insta::assert_snapshot!("too_large", errors(&yaml));
    // Exactly at the limit is still read.
    let mut at_limit = String::from("version: 1\n# ");
    at_limit.push_str(&"x".repeat(MAX_POLICY_BYTES - at_limit.len() - 1));
    at_limit.push('\n');
    assert_eq!(at_limit.len(), MAX_POLICY_BYTES);
    assert!(parse("p.yaml", &at_limit).is_ok());
}
