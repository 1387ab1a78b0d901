//! The embedded SQLite store.
//!
//! Durability: the database runs in WAL mode with `synchronous = FULL`, so every committed
//! transaction is fsynced to the WAL before `COMMIT` returns; a crash (gateway SIGKILL or power
//! loss) after a call returned loses nothing. Each [`Store`] call is one transaction.
//!
//! Schema changes are numbered migrations applied in order inside a transaction each; the
//! applied number is SQLite's `user_version`. A database newer than this binary is refused.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    DecisionRecord, EventKind, GatewayEvent, LogPage, LogQuery, NewSandbox, Phase, PolicyRevision,
    RevisionInfo, RevisionStatus, SandboxRecord, Store, StoreError,
};

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE sandboxes (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    phase          TEXT NOT NULL CHECK (phase IN ('creating', 'ready', 'deleting')),
    keep           INTEGER NOT NULL,
    policy_source  TEXT NOT NULL,
    static_policy  TEXT NOT NULL,
    report         TEXT,
    created_ms     INTEGER NOT NULL
);
CREATE TABLE policy_revisions (
    id          INTEGER PRIMARY KEY,
    sandbox_id  INTEGER REFERENCES sandboxes(id) ON DELETE CASCADE, -- NULL: the global policy
    version     INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    policy      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'loaded', 'failed', 'superseded')),
    error       TEXT,
    created_ms  INTEGER NOT NULL
);
CREATE UNIQUE INDEX policy_revisions_scope_version ON policy_revisions (ifnull(sandbox_id, 0), version);
CREATE TABLE settings (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE TABLE decisions (
    id          INTEGER PRIMARY KEY,
    time_ms     INTEGER NOT NULL,
    sandbox     TEXT NOT NULL,
    decision    TEXT NOT NULL,
    binary      TEXT,
    pid         INTEGER,
    ancestors   TEXT NOT NULL, -- JSON array, nearest ancestor first
    host        TEXT,
    ip          TEXT,
    port        INTEGER,
    block       TEXT,
    reason      TEXT NOT NULL,
    revision    INTEGER
);
CREATE INDEX decisions_sandbox_time ON decisions (sandbox, time_ms);
",
    r"
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    time_ms     INTEGER NOT NULL,
    sandbox     TEXT, -- NULL: gateway-wide
    kind        TEXT NOT NULL,
    revision    INTEGER,
    message     TEXT NOT NULL
);
CREATE INDEX events_sandbox_id ON events (sandbox, id);
CREATE INDEX decisions_sandbox_id ON decisions (sandbox, id);
",
    // A revision's text in a table of its own: SQLite rewrites a whole row on UPDATE, so a
    // status change of a revision of a 1 MB policy wrote 1 MB (twice: the new revision and the
    // one it supersedes). The index serves the lookups by scope and version.
    r"
CREATE TABLE policy_texts (
    revision_id INTEGER PRIMARY KEY REFERENCES policy_revisions(id) ON DELETE CASCADE,
    policy      TEXT NOT NULL
);
INSERT INTO policy_texts (revision_id, policy) SELECT id, policy FROM policy_revisions;
ALTER TABLE policy_revisions DROP COLUMN policy;
CREATE INDEX policy_revisions_sandbox_version ON policy_revisions (sandbox_id, version);
",
];

const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The settings scope of a sandbox.
fn sandbox_scope(name: &str) -> String {
    format!("sandbox:{name}")
}

fn sql(action: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sql { action, source }
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Revision `version` of a scope, or its newest loaded one when `version` is `None`: the
    /// `(columns, tables)` given, read by `row` (which leaves the status as text), with the
    /// status checked and set by `with_status`.
    fn one_revision<T>(
        &self,
        sandbox: Option<&str>,
        version: Option<i64>,
        (columns, tables): (&str, &str),
        row: fn(&Row<'_>) -> rusqlite::Result<(T, String)>,
        with_status: fn(T, RevisionStatus) -> T,
    ) -> Result<Option<T>, StoreError> {
        let conn = self.conn();
        let id = sandbox_id(&conn, sandbox)?;
        let found = conn
            .query_row(
                &format!(
                    "SELECT {columns} FROM {tables}
                     WHERE ifnull(r.sandbox_id, 0) = ifnull(?1, 0)
                       AND (r.version = ?2 OR (?2 IS NULL AND r.status = 'loaded'))
                     ORDER BY r.version DESC LIMIT 1"
                ),
                params![id, version],
                row,
            )
            .optional()
            .map_err(sql("reading a policy revision"))?;
        found
            .map(|(value, status)| Ok(with_status(value, revision_status(status)?)))
            .transpose()
    }

    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction behind (rusqlite
        // rolls back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("reading schema version"))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: PathBuf::from(path),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn.transaction().map_err(sql("starting migration"))?;
        tx.execute_batch(migration)
            .map_err(sql("migrating schema"))?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(sql("setting schema version"))?;
        tx.commit().map_err(sql("committing migration"))?;
    }
    Ok(())
}

const SANDBOX_COLUMNS: &str = "name, phase, keep, policy_source, static_policy, report, created_ms";

fn sandbox_row(row: &Row<'_>) -> rusqlite::Result<(SandboxRecord, String)> {
    let phase: String = row.get(1)?;
    Ok((
        SandboxRecord {
            name: row.get(0)?,
            phase: Phase::Creating,
            keep: row.get(2)?,
            policy_source: row.get(3)?,
            static_policy: row.get(4)?,
            report: row.get(5)?,
            created_ms: row.get(6)?,
        },
        phase,
    ))
}

fn with_phase((mut rec, phase): (SandboxRecord, String)) -> Result<SandboxRecord, StoreError> {
    rec.phase = Phase::parse(&phase).ok_or(StoreError::Corrupt {
        what: "sandboxes.phase",
        value: phase,
    })?;
    Ok(rec)
}

const REVISION_COLUMNS: &str =
    "s.name, r.version, r.sha256, t.policy, r.status, r.error, r.created_ms";
/// The tables [`REVISION_COLUMNS`] come from.
const REVISION_TABLES: &str = "policy_revisions r
     JOIN policy_texts t ON t.revision_id = r.id
     LEFT JOIN sandboxes s ON s.id = r.sandbox_id";

/// Inserts a revision (status `pending`) and its text.
fn insert_revision(
    tx: &rusqlite::Transaction<'_>,
    sandbox_id: Option<i64>,
    version: i64,
    sha256: &str,
    policy: &str,
    created_ms: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO policy_revisions (sandbox_id, version, sha256, status, created_ms)
         VALUES (?1, ?2, ?3, 'pending', ?4)",
        params![sandbox_id, version, sha256, created_ms],
    )
    .map_err(sql("inserting policy revision"))?;
    tx.execute(
        "INSERT INTO policy_texts (revision_id, policy) VALUES (?1, ?2)",
        params![tx.last_insert_rowid(), policy],
    )
    .map_err(sql("inserting policy text"))?;
    Ok(())
}

/// [`REVISION_COLUMNS`] without the text.
const INFO_COLUMNS: &str = "s.name, r.version, r.sha256, r.status, r.error, r.created_ms";
/// The tables [`INFO_COLUMNS`] come from.
const INFO_TABLES: &str = "policy_revisions r LEFT JOIN sandboxes s ON s.id = r.sandbox_id";

fn info_row(row: &Row<'_>) -> rusqlite::Result<(RevisionInfo, String)> {
    Ok((
        RevisionInfo {
            sandbox: row.get(0)?,
            version: row.get(1)?,
            sha256: row.get(2)?,
            status: RevisionStatus::Pending,
            error: row.get(4)?,
            created_ms: row.get(5)?,
        },
        row.get(3)?,
    ))
}

/// A revision row's `status` column, checked.
fn revision_status(status: String) -> Result<RevisionStatus, StoreError> {
    RevisionStatus::parse(&status).ok_or(StoreError::Corrupt {
        what: "policy_revisions.status",
        value: status,
    })
}

fn revision_row(row: &Row<'_>) -> rusqlite::Result<(PolicyRevision, String)> {
    Ok((
        PolicyRevision {
            sandbox: row.get(0)?,
            version: row.get(1)?,
            sha256: row.get(2)?,
            policy: row.get(3)?,
            status: RevisionStatus::Pending,
            error: row.get(5)?,
            created_ms: row.get(6)?,
        },
        row.get(4)?,
    ))
}

fn sandbox_id(conn: &Connection, name: Option<&str>) -> Result<Option<i64>, StoreError> {
    let Some(name) = name else { return Ok(None) };
    conn.query_row("SELECT id FROM sandboxes WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()
    .map_err(sql("looking up sandbox"))?
    .map(Some)
    .ok_or_else(|| StoreError::NoSuchSandbox {
        name: name.to_owned(),
    })
}

impl Store for SqliteStore {
    fn insert_sandbox(&self, new: &NewSandbox) -> Result<SandboxRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting transaction"))?;
        let inserted = tx.execute(
            "INSERT INTO sandboxes (name, phase, keep, policy_source, static_policy, created_ms)
             VALUES (?1, 'creating', ?2, ?3, ?4, ?5)",
            params![
                new.name,
                new.keep,
                new.policy_source,
                new.static_policy,
                new.created_ms
            ],
        );
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                return Err(StoreError::SandboxExists {
                    name: new.name.clone(),
                });
            }
            Err(e) => return Err(sql("inserting sandbox")(e)),
        }
        let id = tx.last_insert_rowid();
        insert_revision(
            &tx,
            Some(id),
            1,
            &new.policy_sha256,
            &new.policy_text,
            new.created_ms,
        )?;
        tx.commit().map_err(sql("committing sandbox"))?;
        Ok(SandboxRecord {
            name: new.name.clone(),
            phase: Phase::Creating,
            keep: new.keep,
            policy_source: new.policy_source.clone(),
            static_policy: new.static_policy.clone(),
            report: None,
            created_ms: new.created_ms,
        })
    }

    fn set_phase(&self, name: &str, phase: Phase) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE sandboxes SET phase = ?2 WHERE name = ?1",
                params![name, phase.as_str()],
            )
            .map_err(sql("updating sandbox phase"))?;
        if n == 0 {
            return Err(StoreError::NoSuchSandbox {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn set_report(&self, name: &str, report_json: &str) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE sandboxes SET report = ?2 WHERE name = ?1",
                params![name, report_json],
            )
            .map_err(sql("updating enforcement report"))?;
        if n == 0 {
            return Err(StoreError::NoSuchSandbox {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn sandbox(&self, name: &str) -> Result<Option<SandboxRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE name = ?1"),
                [name],
                sandbox_row,
            )
            .optional()
            .map_err(sql("reading sandbox"))?
            .map(with_phase)
            .transpose()
    }

    fn sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY name"
            ))
            .map_err(sql("listing sandboxes"))?;
        let rows = stmt
            .query_map([], sandbox_row)
            .map_err(sql("listing sandboxes"))?;
        rows.map(|r| with_phase(r.map_err(sql("listing sandboxes"))?))
            .collect()
    }

    fn delete_sandbox(&self, name: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting transaction"))?;
        tx.execute("DELETE FROM sandboxes WHERE name = ?1", [name])
            .map_err(sql("deleting sandbox"))?;
        tx.execute(
            "DELETE FROM settings WHERE scope = ?1",
            [sandbox_scope(name)],
        )
        .map_err(sql("deleting sandbox settings"))?;
        tx.execute("DELETE FROM decisions WHERE sandbox = ?1", [name])
            .map_err(sql("deleting decision log"))?;
        tx.commit().map_err(sql("committing delete"))
    }

    fn add_revision(
        &self,
        sandbox: Option<&str>,
        policy: &str,
        sha256: &str,
        created_ms: i64,
    ) -> Result<RevisionInfo, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting transaction"))?;
        let id = sandbox_id(&tx, sandbox)?;
        let version: i64 = tx
            .query_row(
                "SELECT ifnull(max(version), 0) + 1 FROM policy_revisions WHERE sandbox_id IS ?1",
                [id],
                |r| r.get(0),
            )
            .map_err(sql("numbering policy revision"))?;
        insert_revision(&tx, id, version, sha256, policy, created_ms)?;
        tx.commit().map_err(sql("committing policy revision"))?;
        Ok(RevisionInfo {
            sandbox: sandbox.map(str::to_owned),
            version,
            sha256: sha256.to_owned(),
            status: RevisionStatus::Pending,
            error: None,
            created_ms,
        })
    }

    fn set_revision_status(
        &self,
        sandbox: Option<&str>,
        version: i64,
        status: RevisionStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting transaction"))?;
        let id = sandbox_id(&tx, sandbox)?;
        if status == RevisionStatus::Loaded {
            tx.execute(
                "UPDATE policy_revisions SET status = 'superseded'
                 WHERE sandbox_id IS ?1 AND version < ?2 AND status IN ('loaded', 'pending')",
                params![id, version],
            )
            .map_err(sql("superseding policy revisions"))?;
        }
        tx.execute(
            "UPDATE policy_revisions SET status = ?3, error = ?4 WHERE sandbox_id IS ?1 AND version = ?2",
            params![id, version, status.as_str(), error],
        )
        .map_err(sql("updating policy revision"))?;
        tx.commit().map_err(sql("committing policy revision"))
    }

    fn revisions(&self, sandbox: Option<&str>) -> Result<Vec<PolicyRevision>, StoreError> {
        let conn = self.conn();
        let id = sandbox_id(&conn, sandbox)?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {REVISION_COLUMNS} FROM {REVISION_TABLES}
                 WHERE r.sandbox_id IS ?1 ORDER BY r.version DESC"
            ))
            .map_err(sql("listing policy revisions"))?;
        let rows = stmt
            .query_map([id], revision_row)
            .map_err(sql("listing policy revisions"))?;
        rows.map(|r| {
            let (mut rev, status) = r.map_err(sql("listing policy revisions"))?;
            rev.status = revision_status(status)?;
            Ok(rev)
        })
        .collect()
    }

    fn revision(
        &self,
        sandbox: Option<&str>,
        version: Option<i64>,
    ) -> Result<Option<PolicyRevision>, StoreError> {
        self.one_revision(
            sandbox,
            version,
            (REVISION_COLUMNS, REVISION_TABLES),
            revision_row,
            |rev, status| PolicyRevision { status, ..rev },
        )
    }

    fn revision_info(
        &self,
        sandbox: Option<&str>,
        version: Option<i64>,
    ) -> Result<Option<RevisionInfo>, StoreError> {
        self.one_revision(
            sandbox,
            version,
            (INFO_COLUMNS, INFO_TABLES),
            info_row,
            |info, status| RevisionInfo { status, ..info },
        )
    }

    fn setting(&self, scope: &str, key: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row(
                "SELECT value FROM settings WHERE scope = ?1 AND key = ?2",
                [scope, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("reading setting"))
    }

    fn put_setting(&self, scope: &str, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO settings (scope, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
                [scope, key, value],
            )
            .map_err(sql("writing setting"))?;
        Ok(())
    }

    fn delete_setting(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "DELETE FROM settings WHERE scope = ?1 AND key = ?2",
                [scope, key],
            )
            .map_err(sql("deleting setting"))?;
        Ok(())
    }

    fn append_decisions(&self, decisions: &[DecisionRecord]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting transaction"))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO decisions (time_ms, sandbox, decision, binary, pid, ancestors,
                                            host, ip, port, block, reason, revision)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .map_err(sql("logging decisions"))?;
            for d in decisions {
                let ancestors =
                    serde_json::to_string(&d.ancestors).unwrap_or_else(|_| "[]".to_owned());
                stmt.execute(params![
                    d.time_ms, d.sandbox, d.decision, d.binary, d.pid, ancestors, d.host, d.ip,
                    d.port, d.block, d.reason, d.revision
                ])
                .map_err(sql("logging decisions"))?;
            }
        }
        tx.commit().map_err(sql("committing decisions"))
    }

    fn decisions(&self, sandbox: &str, limit: usize) -> Result<Vec<DecisionRecord>, StoreError> {
        let page = self.decision_page(
            sandbox,
            &LogQuery {
                limit,
                ..LogQuery::default()
            },
        )?;
        Ok(page.rows.into_iter().map(|(_, d)| d).collect())
    }

    fn decision_page(
        &self,
        sandbox: &str,
        query: &LogQuery,
    ) -> Result<LogPage<DecisionRecord>, StoreError> {
        let conn = self.conn();
        page(
            &conn,
            "SELECT id, time_ms, sandbox, decision, binary, pid, ancestors, host, ip, port, block,
                    reason, revision
             FROM decisions WHERE sandbox = ?1",
            "SELECT ifnull(max(id), 0) FROM decisions WHERE sandbox = ?1",
            sandbox,
            query,
            |r| {
                let ancestors: String = r.get(6)?;
                Ok(DecisionRecord {
                    time_ms: r.get(1)?,
                    sandbox: r.get(2)?,
                    decision: r.get(3)?,
                    binary: r.get(4)?,
                    pid: r.get(5)?,
                    ancestors: serde_json::from_str(&ancestors).unwrap_or_default(),
                    host: r.get(7)?,
                    ip: r.get(8)?,
                    port: r.get(9)?,
                    block: r.get(10)?,
                    reason: r.get(11)?,
                    revision: r.get(12)?,
                })
            },
            "reading decision log",
        )
    }

    fn append_event(&self, event: &GatewayEvent) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO events (time_ms, sandbox, kind, revision, message)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    event.time_ms,
                    event.sandbox,
                    event.kind.as_str(),
                    event.revision,
                    event.message
                ],
            )
            .map_err(sql("logging gateway event"))?;
        Ok(())
    }

    fn event_page(
        &self,
        sandbox: &str,
        query: &LogQuery,
    ) -> Result<LogPage<GatewayEvent>, StoreError> {
        let conn = self.conn();
        let page = page(
            &conn,
            "SELECT id, time_ms, sandbox, kind, revision, message
             FROM events WHERE (sandbox = ?1 OR sandbox IS NULL)",
            "SELECT ifnull(max(id), 0) FROM events WHERE (sandbox = ?1 OR sandbox IS NULL)",
            sandbox,
            query,
            |r| {
                Ok((
                    GatewayEvent {
                        time_ms: r.get(1)?,
                        sandbox: r.get(2)?,
                        kind: EventKind::GatewayStarted,
                        revision: r.get(4)?,
                        message: r.get(5)?,
                    },
                    r.get::<_, String>(3)?,
                ))
            },
            "reading gateway events",
        )?;
        let rows = page
            .rows
            .into_iter()
            .map(|(id, (mut event, kind))| {
                event.kind = EventKind::parse(&kind).ok_or(StoreError::Corrupt {
                    what: "events.kind",
                    value: kind,
                })?;
                Ok((id, event))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(LogPage {
            rows,
            last_id: page.last_id,
        })
    }
}

/// Reads a page of a log table: `select` must return the id first and end in a `WHERE` clause
/// on `?1` (the sandbox); `max_id` returns the newest id of the same rows.
fn page<T>(
    conn: &Connection,
    select: &str,
    max_id: &str,
    sandbox: &str,
    query: &LogQuery,
    row: impl Fn(&Row<'_>) -> rusqlite::Result<T>,
    action: &'static str,
) -> Result<LogPage<T>, StoreError> {
    let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
    let since = query.since_ms.unwrap_or(i64::MIN);
    let map = |r: &Row<'_>| Ok((r.get::<_, i64>(0)?, row(r)?));
    let mut rows = match query.after_id {
        Some(after) => conn
            .prepare_cached(&format!(
                "{select} AND time_ms >= ?2 AND id > ?3 ORDER BY id ASC LIMIT ?4"
            ))
            .and_then(|mut stmt| {
                stmt.query_map(params![sandbox, since, after, limit], map)?
                    .collect::<Result<Vec<_>, _>>()
            }),
        None => conn
            .prepare_cached(&format!(
                "{select} AND time_ms >= ?2 ORDER BY id DESC LIMIT ?3"
            ))
            .and_then(|mut stmt| {
                stmt.query_map(params![sandbox, since, limit], map)?
                    .collect::<Result<Vec<_>, _>>()
            }),
    }
    .map_err(sql(action))?;
    if query.after_id.is_none() {
        rows.reverse();
    }
    let last_id = match (rows.last(), query.after_id) {
        (Some((id, _)), _) => *id,
        (None, Some(after)) => after,
        (None, None) => conn
            .query_row(max_id, [sandbox], |r| r.get(0))
            .map_err(sql(action))?,
    };
    Ok(LogPage { rows, last_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(name: &str) -> NewSandbox {
        NewSandbox {
            name: name.to_owned(),
            keep: true,
            policy_source: "default".to_owned(),
            static_policy: "{}".to_owned(),
            policy_text: "version: 1\n".to_owned(),
            policy_sha256: "ab".to_owned(),
            created_ms: 1,
        }
    }

    fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        (dir, store)
    }

    #[test]
    fn sandbox_round_trip_survives_reopen() {
        let (dir, store) = open();
        store.insert_sandbox(&new("a")).unwrap();
        store.set_phase("a", Phase::Ready).unwrap();
        store.set_report("a", "{\"x\":1}").unwrap();
        drop(store);
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let a = store.sandbox("a").unwrap().unwrap();
        assert_eq!(a.phase, Phase::Ready);
        assert_eq!(a.report.as_deref(), Some("{\"x\":1}"));
        assert_eq!(store.revisions(Some("a")).unwrap().len(), 1);
        let mode: String = store
            .conn()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn duplicate_name_is_refused() {
        let (_dir, store) = open();
        store.insert_sandbox(&new("a")).unwrap();
        assert!(matches!(
            store.insert_sandbox(&new("a")),
            Err(StoreError::SandboxExists { .. })
        ));
    }

    #[test]
    fn delete_removes_everything_of_the_sandbox() {
        let (_dir, store) = open();
        store.insert_sandbox(&new("a")).unwrap();
        store.insert_sandbox(&new("b")).unwrap();
        store.put_setting("sandbox:a", "k", "v").unwrap();
        let d = DecisionRecord {
            time_ms: 5,
            sandbox: "a".into(),
            decision: "deny".into(),
            binary: Some("/usr/bin/curl".into()),
            pid: Some(7),
            ancestors: vec!["/usr/bin/bash".into()],
            host: Some("example.com".into()),
            ip: None,
            port: Some(443),
            block: None,
            reason: "no block matched".into(),
            revision: Some(1),
        };
        store.append_decisions(std::slice::from_ref(&d)).unwrap();
        assert_eq!(store.decisions("a", 10).unwrap(), vec![d]);
        store.delete_sandbox("a").unwrap();
        assert!(store.sandbox("a").unwrap().is_none());
        assert!(store.setting("sandbox:a", "k").unwrap().is_none());
        assert!(store.decisions("a", 10).unwrap().is_empty());
        assert!(matches!(
            store.revisions(Some("a")),
            Err(StoreError::NoSuchSandbox { .. })
        ));
        assert_eq!(store.revisions(Some("b")).unwrap().len(), 1);
    }

    #[test]
    fn one_revision_by_version_or_the_loaded_one() {
        let (_dir, store) = open();
        store.insert_sandbox(&new("a")).unwrap();
        assert_eq!(store.revision(Some("a"), None).unwrap(), None);
        store
            .set_revision_status(Some("a"), 1, RevisionStatus::Loaded, None)
            .unwrap();
        store.add_revision(Some("a"), "v2", "s2", 3).unwrap();
        store.add_revision(None, "global", "g1", 4).unwrap();
        let loaded = store.revision(Some("a"), None).unwrap().unwrap();
        assert_eq!((loaded.version, loaded.status), (1, RevisionStatus::Loaded));
        let two = store.revision(Some("a"), Some(2)).unwrap().unwrap();
        assert_eq!(
            (two.policy.as_str(), two.status),
            ("v2", RevisionStatus::Pending)
        );
        assert_eq!(store.revision(Some("a"), Some(3)).unwrap(), None);
        let global = store.revision(None, Some(1)).unwrap().unwrap();
        assert_eq!(global.policy, "global");
        assert!(matches!(
            store.revision(Some("nope"), Some(1)),
            Err(StoreError::NoSuchSandbox { .. })
        ));
        // The same selection without the text.
        for (scope, version) in [(Some("a"), None), (Some("a"), Some(2)), (None, Some(1))] {
            assert_eq!(
                store.revision_info(scope, version).unwrap(),
                store.revision(scope, version).unwrap().map(|r| r.info()),
                "{scope:?} {version:?}"
            );
        }
        assert_eq!(store.revision_info(Some("a"), Some(3)).unwrap(), None);
        assert!(matches!(
            store.revision_info(Some("nope"), Some(1)),
            Err(StoreError::NoSuchSandbox { .. })
        ));
    }

    #[test]
    fn revisions_number_and_supersede_per_scope() {
        let (_dir, store) = open();
        store.insert_sandbox(&new("a")).unwrap();
        store
            .set_revision_status(Some("a"), 1, RevisionStatus::Loaded, None)
            .unwrap();
        let g = store.add_revision(None, "global", "g1", 2).unwrap();
        assert_eq!(g.version, 1);
        let r2 = store.add_revision(Some("a"), "v2", "s2", 3).unwrap();
        assert_eq!(r2.version, 2);
        store
            .set_revision_status(Some("a"), 2, RevisionStatus::Loaded, None)
            .unwrap();
        let r3 = store.add_revision(Some("a"), "v3", "s3", 4).unwrap();
        store
            .set_revision_status(Some("a"), r3.version, RevisionStatus::Failed, Some("bad"))
            .unwrap();
        let statuses: Vec<_> = store
            .revisions(Some("a"))
            .unwrap()
            .into_iter()
            .map(|r| (r.version, r.status, r.error))
            .collect();
        assert_eq!(
            statuses,
            vec![
                (3, RevisionStatus::Failed, Some("bad".to_owned())),
                (2, RevisionStatus::Loaded, None),
                (1, RevisionStatus::Superseded, None),
            ]
        );
        assert_eq!(store.revisions(None).unwrap().len(), 1);
    }

    fn decision(sandbox: &str, time_ms: i64, reason: &str) -> DecisionRecord {
        DecisionRecord {
            time_ms,
            sandbox: sandbox.into(),
            decision: "deny".into(),
            binary: None,
            pid: None,
            ancestors: vec![],
            host: Some("example.com".into()),
            ip: None,
            port: Some(443),
            block: None,
            reason: reason.into(),
            revision: Some(1),
        }
    }

    fn reasons<T>(page: &LogPage<T>, f: impl Fn(&T) -> &str) -> Vec<String> {
        page.rows.iter().map(|(_, r)| f(r).to_owned()).collect()
    }

    #[test]
    fn decision_pages_newest_since_and_after_a_cursor() {
        let (_dir, store) = open();
        store.insert_sandbox(&new("a")).unwrap();
        store.insert_sandbox(&new("b")).unwrap();
        let all: Vec<_> = (1..=5)
            .map(|i| decision("a", i * 1000, &format!("a{i}")))
            .chain([decision("b", 2500, "b1")])
            .collect();
        store.append_decisions(&all).unwrap();
        let q = |after_id, since_ms, limit| LogQuery {
            after_id,
            since_ms,
            limit,
        };
        let reason = |d: &DecisionRecord| d.reason.clone();
        let newest = store.decision_page("a", &q(None, None, 2)).unwrap();
        assert_eq!(reasons(&newest, |d| &d.reason), ["a4", "a5"]);
        assert_eq!(newest.last_id, newest.rows[1].0);
        let since = store.decision_page("a", &q(None, Some(3000), 100)).unwrap();
        assert_eq!(reasons(&since, |d| &d.reason), ["a3", "a4", "a5"]);
        // Following: oldest first after the cursor, at most `limit`.
        let first_id = store.decision_page("a", &q(None, None, 5)).unwrap().rows[0].0;
        let after = store
            .decision_page("a", &q(Some(first_id), None, 2))
            .unwrap();
        assert_eq!(reasons(&after, |d| &d.reason), ["a2", "a3"]);
        let rest = store
            .decision_page("a", &q(Some(after.last_id), None, 100))
            .unwrap();
        assert_eq!(reasons(&rest, |d| &d.reason), ["a4", "a5"]);
        // Nothing new: the cursor stays; an empty log answers its newest id.
        let none = store
            .decision_page("a", &q(Some(rest.last_id), None, 100))
            .unwrap();
        assert!(none.rows.is_empty());
        assert_eq!(none.last_id, rest.last_id);
        let zero = store
            .decision_page("a", &q(None, Some(99_999), 10))
            .unwrap();
        assert!(zero.rows.is_empty());
        assert_eq!(zero.last_id, rest.last_id);
        assert_eq!(
            store
                .decisions("b", 10)
                .unwrap()
                .iter()
                .map(reason)
                .collect::<Vec<_>>(),
            ["b1"]
        );
    }

    #[test]
    fn events_of_a_sandbox_include_gateway_wide_ones_and_outlive_it() {
        let (_dir, store) = open();
        store.insert_sandbox(&new("a")).unwrap();
        let event = |time_ms, sandbox: Option<&str>, kind, message: &str| GatewayEvent {
            time_ms,
            sandbox: sandbox.map(str::to_owned),
            kind,
            revision: None,
            message: message.into(),
        };
        store
            .append_event(&event(1, None, EventKind::GatewayStarted, "up"))
            .unwrap();
        store
            .append_event(&event(2, Some("a"), EventKind::SandboxCreated, "a created"))
            .unwrap();
        store
            .append_event(&event(3, Some("b"), EventKind::SandboxCreated, "b created"))
            .unwrap();
        let all = LogQuery {
            limit: 10,
            ..LogQuery::default()
        };
        let page = store.event_page("a", &all).unwrap();
        assert_eq!(reasons(&page, |e| &e.message), ["up", "a created"]);
        assert_eq!(page.rows[1].1.kind, EventKind::SandboxCreated);
        store.delete_sandbox("a").unwrap();
        assert_eq!(store.event_page("a", &all).unwrap().rows.len(), 2);
    }

    #[test]
    fn revisions_of_a_first_schema_database_keep_their_text_and_lose_it_with_their_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute_batch(
                "INSERT INTO sandboxes (id, name, phase, keep, policy_source, static_policy, created_ms)
                 VALUES (7, 'a', 'ready', 0, 'p.yaml', '{}', 1);
                 INSERT INTO policy_revisions (sandbox_id, version, sha256, policy, status, created_ms)
                 VALUES (7, 1, 'h1', 'version: 1\n', 'superseded', 1),
                        (7, 2, 'h2', 'version: 1\nnetwork_policies: {}\n', 'loaded', 2),
                        (NULL, 1, 'g1', 'global', 'loaded', 3);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let revs = store.revisions(Some("a")).unwrap();
        assert_eq!(
            revs.iter()
                .map(|r| (r.version, r.sha256.as_str(), r.policy.as_str(), r.status))
                .collect::<Vec<_>>(),
            [
                (
                    2,
                    "h2",
                    "version: 1\nnetwork_policies: {}\n",
                    RevisionStatus::Loaded
                ),
                (1, "h1", "version: 1\n", RevisionStatus::Superseded),
            ]
        );
        assert_eq!(
            store.revision(None, None).unwrap().unwrap().policy,
            "global"
        );
        let three = store.add_revision(Some("a"), "three", "h3", 4).unwrap();
        assert_eq!(three.version, 3);
        store
            .set_revision_status(Some("a"), 3, RevisionStatus::Loaded, None)
            .unwrap();
        let current = store.revision(Some("a"), None).unwrap().unwrap();
        assert_eq!((current.version, current.policy.as_str()), (3, "three"));
        store.delete_sandbox("a").unwrap();
        let texts: i64 = store
            .conn()
            .query_row("SELECT count(*) FROM policy_texts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(texts, 1, "only the global revision's text is left");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
