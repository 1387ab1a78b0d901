//! Cost of a policy decision as the policy grows: L4 (connection) and L7 (request) decisions at
//! 10, 1,000 and 10,000 blocks, and the time to compile the 10,000-block policy.
//!
//! Every block looks like a realistic one: an exact host with a REST endpoint (five rules, one with
//! query matchers, one deny rule), a wildcard host, and two binaries, one of them a glob.
//! Results are in BENCHMARKS.md.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use openshell::policy::{ConnectionQuery, HttpRequestQuery, Policy, parse};

/// Blocks `range` as a policy file.
fn policy_yaml(range: std::ops::Range<usize>) -> String {
    let mut y = String::from("version: 1\nnetwork_policies:\n");
    for i in range {
        y.push_str(&format!(
            r#"  svc{i}:
    endpoints:
      - host: api{i}.example{m}.com
        port: 443
        protocol: rest
        rules:
          - allow: {{ method: GET, path: "/v1/items/**" }}
          - allow: {{ method: POST, path: "/v1/items/*/comments" }}
          - allow: {{ method: PATCH, path: "/v1/items/*" }}
          - allow:
              method: GET
              path: /v1/download
              query:
                slug: "skill-*"
                version: {{ any: ["1.*", "2.*"] }}
          - allow: {{ method: "*", path: "/v1/sandbox/{i}/**" }}
        deny_rules:
          - {{ method: "*", path: "/v1/items/*/admin/**" }}
      - host: "*.cdn{i}.example{m}.net"
        ports: [80, 443]
    binaries:
      - path: /usr/bin/tool{i}
      - path: /opt/agent{m}/bin/*
"#,
            m = i % 97
        ));
    }
    y
}

/// A policy of `blocks` blocks. 10,000 such blocks exceed the 4 MiB file limit, so the policy
/// is parsed in files of at most 1,000 blocks whose network sections are then merged.
fn build(blocks: usize) -> Policy {
    let mut policy = parse("bench.yaml", "version: 1\n").unwrap_or_else(|e| panic!("{e}"));
    for start in (0..blocks).step_by(1_000) {
        let part = parse("bench.yaml", &policy_yaml(start..blocks.min(start + 1_000)))
            .unwrap_or_else(|e| panic!("{e}"));
        policy.network.extend(part.network);
    }
    policy
}

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let ancestors = [PathBuf::from("/bin/bash"), PathBuf::from("/sbin/init")];
    for blocks in [10_usize, 1_000, 10_000] {
        let compiled = build(blocks).compile();
        // A block in the middle; the binary is matched through its parent (an ancestor).
        let i = blocks / 2;
        let host = format!("api{i}.example{}.com", i % 97);
        let binary = PathBuf::from("/usr/lib/tool-helper");
        let ancestors = [
            PathBuf::from(format!("/usr/bin/tool{i}")),
            ancestors[0].clone(),
        ];
        let conn = ConnectionQuery {
            host: &host,
            port: 443,
            binary: &binary,
            ancestors: &ancestors,
            dest_ip: None,
        };
        assert!(compiled.decide_connection(&conn).is_allowed());
        group.bench_with_input(BenchmarkId::new("l4", blocks), &conn, |b, conn| {
            b.iter(|| compiled.decide_connection(black_box(conn)));
        });

        let cdn = format!("img.cdn{i}.example{}.net", i % 97);
        let glob_binary = format!("/opt/agent{}/bin/node", i % 97);
        let wildcard = ConnectionQuery {
            host: &cdn,
            port: 80,
            binary: Path::new(&glob_binary),
            ancestors: &[],
            dest_ip: None,
        };
        assert!(compiled.decide_connection(&wildcard).is_allowed());
        group.bench_with_input(
            BenchmarkId::new("l4_wildcard_host_glob_binary", blocks),
            &wildcard,
            |b, conn| b.iter(|| compiled.decide_connection(black_box(conn))),
        );

        let req = HttpRequestQuery {
            method: "GET",
            target: "/v1/download?slug=skill-bench&version=2.1",
        };
        assert!(compiled.decide_request(&conn, &req).is_allowed());
        group.bench_with_input(BenchmarkId::new("l7", blocks), &req, |b, req| {
            b.iter(|| compiled.decide_request(black_box(&conn), black_box(req)));
        });

        let denied = HttpRequestQuery {
            method: "DELETE",
            target: "/v1/items/42/admin/./users",
        };
        assert!(!compiled.decide_request(&conn, &denied).is_allowed());
        group.bench_with_input(
            BenchmarkId::new("l7_deny_rule", blocks),
            &denied,
            |b, req| {
                b.iter(|| compiled.decide_request(black_box(&conn), black_box(req)));
            },
        );
    }
    group.finish();
}

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let policy = build(10_000);
    group.bench_function("compile_10000_blocks", |b| {
        b.iter(|| black_box(&policy).compile())
    });
    let yaml = policy_yaml(0..1_000);
    group.bench_function("parse_and_validate_1000_blocks", |b| {
        b.iter(|| parse("bench.yaml", black_box(&yaml)))
    });
    group.finish();
}

criterion_group!(benches, decide, compile);
criterion_main!(benches);
