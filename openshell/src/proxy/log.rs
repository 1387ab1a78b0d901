//! Where the proxy writes its decisions: one [`DecisionRecord`] per connection (allowed or
//! denied), per DNS refusal, and per connection closed by a policy change.
//!
//! [`StoreLog`] appends to the gateway's store in batches from a background thread, so a burst
//! of connections costs one transaction per batch rather than one per connection, and the proxy
//! never waits for the disk.

use std::{
    sync::{Arc, Mutex, PoisonError, mpsc},
    time::{Duration, SystemTime, UNIX_EPOCH},
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
#[derive(Debug)]
pub struct StoreLog {
    tx: Mutex<mpsc::Sender<DecisionRecord>>,
}

impl StoreLog {
    /// Starts the writer thread. It ends when the `StoreLog` is dropped, after writing what was
    /// queued.
    pub fn spawn(store: Arc<dyn Store>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<DecisionRecord>();
        std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    let deadline = std::time::Instant::now() + LINGER;
                    while batch.len() < BATCH {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = store.append_decisions(&batch) {
                        eprintln!("gateway: writing {} decisions to the log: {e}", batch.len());
                    }
                }
            })?;
        Ok(Self { tx: Mutex::new(tx) })
    }
}

impl DecisionLog for StoreLog {
    fn record(&self, record: DecisionRecord) {
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        // The writer only stops when this StoreLog is dropped.
        let _ = tx.send(record);
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
