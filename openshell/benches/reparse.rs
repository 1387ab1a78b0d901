//! Full parse versus incremental reparse of the 10,000-block policy that the reload benchmark
//! (`tests/benches/reload.rs`) sets: the same text, two variants that differ in one block.
//!
//! - `parse`: `policy::parse` of the whole file (what a reload costs without the reparse);
//! - `parse_keeping`: the same plus the layout a reparse needs (must cost about the same);
//! - `reparse/first`, `reparse/middle`, `reparse/last`: `policy::reparse` from the parse of one
//!   variant to the text of another, which differs in the first, a middle or the last block
//!   (it copies the previous policy);
//! - `update/...`: `Parsed::update`, the same in place, alternating between the two variants as
//!   the reload benchmark does.
//!
//! Then `parse` and `parse_keeping` once more, interleaved (thread CPU time, least and median of
//! 21 runs each), so that load from other processes hits both alike.
//!
//! Run: `cargo bench -p openshell --bench reparse`. Results are in BENCHMARKS.md.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use openshell::policy::reparse::Outcome;
use openshell::policy::{parse, parse_keeping, reparse};

const BLOCKS: usize = 10_000;

/// The reload benchmark's policy file (its `policy_file`), with `variant` changing the port of
/// filler block `variant`.
fn policy_file(filler: usize, variant: Option<usize>) -> String {
    let ip = "198.18.0.10";
    let mut text = format!(
        "version: 1
network_policies:
  echo:
    endpoints:
      - {{ host: \"{ip}\", port: 7000 }}
    binaries:
      - {{ path: \"/**\" }}
  api:
    endpoints:
      - host: \"{ip}\"
        port: 80
        protocol: rest
        rules:
          - allow: {{ method: GET, path: \"/**\" }}
    binaries:
      - {{ path: \"/**\" }}
"
    );
    for i in 0..filler {
        let port = if Some(i) == variant { 8443 } else { 443 };
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "  block_{i}:\n    endpoints:\n      - {{ host: h{i}.example.com, port: {port} }}\n    binaries:\n      - {{ path: /usr/bin/curl }}\n"
        );
    }
    text
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("reparse_10000");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let base = policy_file(BLOCKS, None);
    println!("policy: {BLOCKS} blocks, {} bytes", base.len());

    group.bench_function("parse", |b| {
        b.iter(|| parse("bench.yaml", black_box(&base)));
    });
    group.bench_function("parse_keeping", |b| {
        b.iter(|| parse_keeping("bench.yaml", black_box(&base)));
    });

    let prev = parse_keeping("bench.yaml", &base).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(prev.unqualified(), None);
    for (name, block) in [("first", 0), ("middle", BLOCKS / 2), ("last", BLOCKS - 1)] {
        let edited = policy_file(BLOCKS, Some(block));
        let once = reparse(&prev, "bench.yaml", &edited).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(once.outcome(), Outcome::Reused { parsed: 1 | 2, .. }),
            "{:?}",
            once.outcome()
        );
        group.bench_with_input(BenchmarkId::new("reparse", name), &edited, |b, edited| {
            b.iter(|| reparse(&prev, "bench.yaml", black_box(edited)));
        });
        let mut live = prev.clone();
        live.update("bench.yaml", &edited)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            live.outcome(),
            Outcome::Reused { parsed: 1 | 2, .. }
        ));
        let texts = [&base, &edited];
        let mut next = 0;
        group.bench_function(BenchmarkId::new("update", name), |b| {
            b.iter(|| {
                let result = live.update("bench.yaml", black_box(texts[next]));
                next = 1 - next;
                result
            });
        });
    }
    group.finish();
    interleaved(&base);
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`): less disturbed than wall time
/// when other processes compete for the CPU.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// `parse` and `parse_keeping` alternately: the least and the median thread CPU time of each
/// (the least is the one other processes disturbed least).
fn interleaved(text: &str) {
    const RUNS: usize = 21;
    let (mut plain, mut keeping) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        // Each goes first in every other pair, so that neither always finds the heap as the
        // other left it.
        for keep in [run % 2 == 0, run % 2 != 0] {
            let t = thread_cpu();
            if keep {
                black_box(parse_keeping("bench.yaml", black_box(text)).is_ok());
                keeping.push(thread_cpu() - t);
            } else {
                black_box(parse("bench.yaml", black_box(text)).is_ok());
                plain.push(thread_cpu() - t);
            }
        }
    }
    plain.sort_unstable();
    keeping.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |k: Duration, p: Duration| (k.as_secs_f64() / p.as_secs_f64() - 1.0) * 100.0;
    let (p_min, k_min) = (plain[0], keeping[0]);
    let (p_med, k_med) = (plain[RUNS / 2], keeping[RUNS / 2]);
    println!(
        "interleaved thread CPU time, {RUNS} runs: least parse {:.1} ms, parse_keeping {:.1} ms ({:+.1}%); median parse {:.1} ms, parse_keeping {:.1} ms ({:+.1}%)",
        ms(p_min),
        ms(k_min),
        pct(k_min, p_min),
        ms(p_med),
        ms(k_med),
        pct(k_med, p_med)
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
