//! `openshell policy validate` and `openshell policy check`, run as the real binary: output
//! (snapshots) and exit codes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// Runs `openshell ARGS` from the repository root (so file names in the output are relative and
/// stable) and returns (exit code, stdout, stderr).
fn openshell(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openshell"))
        .args(args)
        .current_dir(policies().join(".."))
        .output()
        .unwrap_or_else(|e| panic!("running openshell: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A policy file in a fresh temporary directory, removed on drop.
struct TempPolicy {
    dir: PathBuf,
    file: PathBuf,
}

impl TempPolicy {
    fn new(name: &str, contents: &[u8]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "openshell-cli-policy-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join(name);
        std::fs::write(&file, contents).unwrap_or_else(|e| panic!("{e}"));
        Self { dir, file }
    }

    fn path(&self) -> &str {
        self.file
            .to_str()
            .unwrap_or_else(|| panic!("non-UTF-8 temp path"))
    }
}

impl Drop for TempPolicy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn validate_accepts_every_shipped_policy() {
    for name in ["default", "pypi", "github_repos", "download_api", "my_api"] {
        let file = format!("policies/{name}.yaml");
        let (code, out, err) = openshell(&["policy", "validate", &file]);
        assert_eq!(code, 0, "{file}: {out}{err}");
        let (code, out, _) = openshell(&["policy", "validate", &file, "-o", "json"]);
        assert_eq!((code, out.as_str()), (0, "[]\n"));
    }
    let (_, out, _) = openshell(&["policy", "validate", "policies/github_repos.yaml"]);
    insta::assert_snapshot!("validate_ok", out);
}

const INVALID: &str = r#"version: 1
process:
  run_as_user: root
network_policies:
  api:
    endpoints:
      - host: "*.com"
        port: 0
        ports: [443]
      - host: api.example.com
        port: 443
        protocol: rest
        rules:
          - allow: {}
    binaries: []
"#;

#[test]
fn validate_reports_every_error() {
    let policy = TempPolicy::new("invalid.yaml", INVALID.as_bytes());
    let (code, out, _) = openshell(&["policy", "validate", policy.path()]);
    assert_eq!(code, 1);
    let out = out.replace(policy.path(), "invalid.yaml");
    insta::assert_snapshot!("validate_invalid_text", out);
    let (code, out, _) = openshell(&["policy", "validate", policy.path(), "--output", "json"]);
    assert_eq!(code, 1);
    let out = out.replace(policy.path(), "invalid.yaml");
    insta::assert_snapshot!("validate_invalid_json", out);
}

#[test]
fn validate_rejects_unreadable_oversized_and_binary_files() {
    let (code, out, _) = openshell(&["policy", "validate", "policies/missing.yaml"]);
    assert_eq!(code, 1);
    insta::assert_snapshot!("validate_missing", out);

    let mut big = b"version: 1\n#".to_vec();
    big.resize(4 * 1024 * 1024 + 10, b'x');
    let policy = TempPolicy::new("big.yaml", &big);
    let (code, out, _) = openshell(&["policy", "validate", policy.path()]);
    assert_eq!(code, 1);
    insta::assert_snapshot!("validate_too_large", out.replace(policy.path(), "big.yaml"));

    let policy = TempPolicy::new("latin1.yaml", b"version: 1\n# caf\xe9\n");
    let (code, out, _) = openshell(&["policy", "validate", policy.path()]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(
        "validate_not_utf8",
        out.replace(policy.path(), "latin1.yaml")
    );
}

#[test]
fn check_allows_and_denies_connections() {
    let (code, out, _) = openshell(&[
        "policy",
        "check",
        "policies/pypi.yaml",
        "--binary",
        "/usr/bin/pip",
        "--host",
        "pypi.org",
        "--port",
        "443",
    ]);
    assert_eq!(code, 0);
    insta::assert_snapshot!("check_l4_allow", out);

    let (code, out, _) = openshell(&[
        "policy",
        "check",
        "policies/pypi.yaml",
        "--binary",
        "/usr/bin/python3",
        "--ancestor",
        "/bin/bash",
        "--ancestor",
        "/usr/bin/tmux",
        "--host",
        "pypi.org",
        "--port",
        "443",
    ]);
    assert_eq!(code, 3);
    insta::assert_snapshot!("check_l4_binary_not_listed", out);

    let (code, out, _) = openshell(&[
        "policy",
        "check",
        "policies/pypi.yaml",
        "--binary",
        "/usr/bin/pip",
        "--host",
        "evil.example.com",
        "--port",
        "443",
        "-o",
        "json",
    ]);
    assert_eq!(code, 3);
    insta::assert_snapshot!("check_l4_no_endpoint_json", out);

    let (code, out, _) = openshell(&[
        "policy",
        "check",
        "policies/pypi.yaml",
        "--binary",
        "/usr/bin/pip",
        "--host",
        "pypi.org",
        "--port",
        "443",
        "--ip",
        "169.254.169.254",
    ]);
    assert_eq!(code, 3);
    insta::assert_snapshot!("check_l4_metadata_address", out);
}

#[test]
fn check_decides_requests() {
    let download = |target: &str, format: &str| {
        openshell(&[
            "policy",
            "check",
            "policies/download_api.yaml",
            "--binary",
            "/usr/bin/curl",
            "--host",
            "api.example.com",
            "--port",
            "443",
            "--method",
            "GET",
            "--path",
            target,
            "-o",
            format,
        ])
    };
    let (code, out, _) = download("/api/v1/download?slug=skill-a&version=1.2", "json");
    assert_eq!(code, 0);
    insta::assert_snapshot!("check_l7_allow_json", out);
    let (code, out, _) = download(
        "/api/v1/download?slug=skill-a&slug=other&version=1.2",
        "text",
    );
    assert_eq!(code, 3);
    insta::assert_snapshot!("check_l7_deny_text", out);

    let audit = r#"version: 1
network_policies:
  api:
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        enforcement: audit
        access: read-only
    binaries: [{ path: /usr/bin/curl }]
"#;
    let policy = TempPolicy::new("audit.yaml", audit.as_bytes());
    for format in ["text", "json"] {
        let (code, out, _) = openshell(&[
            "policy",
            "check",
            policy.path(),
            "--binary",
            "/usr/bin/curl",
            "--host",
            "api.example.com",
            "--port",
            "443",
            "--method",
            "DELETE",
            "--path",
            "/x",
            "-o",
            format,
        ]);
        assert_eq!(code, 0, "audit is allowed");
        insta::assert_snapshot!(format!("check_l7_audit_{format}"), out);
    }
}

#[test]
fn check_exit_codes_for_invalid_policy_and_bad_arguments() {
    let policy = TempPolicy::new("invalid.yaml", INVALID.as_bytes());
    let (code, out, _) = openshell(&[
        "policy",
        "check",
        policy.path(),
        "--binary",
        "/usr/bin/curl",
        "--host",
        "a.example.com",
        "--port",
        "443",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("error:"), "{out}");

    for args in [
        // --port out of range
        &[
            "--binary",
            "/usr/bin/curl",
            "--host",
            "pypi.org",
            "--port",
            "0",
        ][..],
        &[
            "--binary",
            "/usr/bin/curl",
            "--host",
            "pypi.org",
            "--port",
            "70000",
        ][..],
        // --method without --path
        &[
            "--binary",
            "/usr/bin/curl",
            "--host",
            "pypi.org",
            "--port",
            "443",
            "--method",
            "GET",
        ][..],
        // missing --host
        &["--binary", "/usr/bin/curl", "--port", "443"][..],
        // relative binary
        &["--binary", "curl", "--host", "pypi.org", "--port", "443"][..],
        // unknown output format
        &[
            "--binary",
            "/usr/bin/curl",
            "--host",
            "pypi.org",
            "--port",
            "443",
            "-o",
            "xml",
        ][..],
    ] {
        let mut full = vec!["policy", "check", "policies/pypi.yaml"];
        full.extend_from_slice(args);
        let (code, out, err) = openshell(&full);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
    }
}
