//! Where the proxy writes its decisions: one [`DecisionRecord`] per connection (allowed or
//! denied), per DNS refusal, and per connection closed by a policy change.
//!
//! [`StoreLog`] appends to the gateway's store in batches from a background thread, so a burst
//! of connections costs one transaction per batch rather than one per connection, and the proxy
//! never waits for the disk.

use std::{
    sync::{Arc, Condvar, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub use crate::store::DecisionRecord;
use crate::store::Store;

/// Most records written in one transaction.
const BATCH: usize = 512;
/// Longest a record waits for its batch.
const LINGER: Duration = Duration::from_millis(50);

/// Receives the proxy's decisions.
pub trait DecisionLog: Send + Sync {
    fn record(&self, record: DecisionRecord);
}

/// Milliseconds since the Unix epoch, as records carry them.
#[must_use]
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Appends decisions to a [`Store`] from a background thread.
///
/// Recording is a push onto a shared queue. The writer thread is woken only when the queue
/// becomes non-empty (and again if it fills a batch while the writer lingers), not once per
/// record: a burst of connections costs the proxy no thread wake-up per connection.
#[derive(Debug)]
pub struct StoreLog {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    records: Vec<DecisionRecord>,
    closed: bool,
}

impl StoreLog {
    /// Starts the writer thread. It ends when the `StoreLog` is dropped, after writing what was
    /// queued.
    pub fn spawn(store: Arc<dyn Store>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let queue = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || write_until_closed(&queue, &*store))?;
        Ok(Self {
            shared,
            writer: Some(writer),
        })
    }
}

/// The writer thread: waits for a first record, lets a batch gather for at most [`LINGER`],
/// writes it, and so on; after the close, writes what is left and returns.
fn write_until_closed(shared: &Shared, store: &dyn Store) {
    let lock = || shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    let mut spare = Vec::new();
    let mut queue = lock();
    loop {
        queue = shared
            .ready
            .wait_while(queue, |q| q.records.is_empty() && !q.closed)
            .unwrap_or_else(PoisonError::into_inner);
        if queue.records.is_empty() {
            return;
        }
        let deadline = Instant::now() + LINGER;
        while queue.records.len() < BATCH && !queue.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            queue = shared
                .ready
                .wait_timeout(queue, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        std::mem::swap(&mut queue.records, &mut spare);
        drop(queue);
        for batch in spare.chunks(BATCH) {
            if let Err(e) = store.append_decisions(batch) {
                eprintln!("gateway: writing {} decisions to the log: {e}", batch.len());
            }
        }
        spare.clear();
        queue = lock();
    }
}

impl DecisionLog for StoreLog {
    fn record(&self, record: DecisionRecord) {
        let queued = {
            let mut queue = self
                .shared
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            queue.records.push(record);
            queue.records.len()
        };
        // The writer waits for a first record, or lingers until a batch is full.
        if queued == 1 || queued == BATCH {
            self.shared.ready.notify_one();
        }
    }
}

impl Drop for StoreLog {
    fn drop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.shared.ready.notify_one();
        if let Some(writer) = self.writer.take() {
            // Written in full before the gateway goes on shutting down.
            let _ = writer.join();
        }
    }
}

/// Keeps decisions in memory (tests, benchmarks).
#[derive(Debug, Default)]
pub struct MemoryLog {
    records: Mutex<Vec<DecisionRecord>>,
}

impl MemoryLog {
    /// Everything recorded so far.
    #[must_use]
    pub fn records(&self) -> Vec<DecisionRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl DecisionLog for MemoryLog {
    fn record(&self, record: DecisionRecord) {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewSandbox, SqliteStore};

    fn record(sandbox: &str, n: u32) -> DecisionRecord {
        DecisionRecord {
            time_ms: i64::from(n),
            sandbox: sandbox.into(),
            decision: "allow".into(),
            binary: Some("/usr/bin/curl".into()),
            pid: Some(i64::from(n)),
            ancestors: Vec::new(),
            host: Some("pypi.org".into()),
            ip: None,
            port: Some(443),
            block: Some("pypi".into()),
            reason: "allowed by block pypi".into(),
            revision: Some(1),
        }
    }

    #[test]
    fn every_record_from_many_threads_is_written_by_the_time_the_log_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        store
            .insert_sandbox(&NewSandbox {
                name: "a".into(),
                keep: true,
                policy_source: "test".into(),
                static_policy: "{}".into(),
                policy_text: "version: 1\n".into(),
                policy_sha256: "ab".into(),
                created_ms: 1,
            })
            .unwrap();
        let log = Arc::new(StoreLog::spawn(Arc::clone(&store) as Arc<dyn Store>).unwrap());
        // More than two batches, from four threads at once.
        let threads: Vec<_> = (0..4_u32)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..300 {
                        log.record(record("a", t * 1_000 + i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // A lone record after a pause is written too (the writer went back to waiting).
        std::thread::sleep(LINGER * 2);
        log.record(record("a", 99_999));
        drop(Arc::into_inner(log).unwrap());
        let mut pids: Vec<i64> = store
            .decisions("a", 10_000)
            .unwrap()
            .iter()
            .filter_map(|d| d.pid)
            .collect();
        pids.sort_unstable();
        let mut expected: Vec<i64> = (0..4_i64)
            .flat_map(|t| (0..300).map(move |i| t * 1_000 + i))
            .chain([99_999])
            .collect();
        expected.sort_unstable();
        assert_eq!(pids, expected);
    }
}
