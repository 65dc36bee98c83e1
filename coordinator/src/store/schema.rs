//! The store's tables, once per backend. The shapes are the same; the types differ
//! only where the databases do (row ids, byte strings).
//!
//! Layout: a submission is one `jobs` row holding its spec once. An array's tasks are
//! not stored until they are claimed: `next_idx` is a cursor over the unclaimed
//! indices, so a 1,000,000-task array is one row until it runs. A claimed (or
//! individually cancelled) task gets a `tasks` row; every transition appends an
//! `events` row; output chunks go to `logs`. A Docker task frozen into an image gets an
//! `images` row (`freezing` from the request until the worker reports it, then `ready`),
//! which says which worker's engine holds it.

use super::sql::{Backend, Db};
use super::StoreError;

const SQLITE: &str = r#"
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs(
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT,
    owner TEXT NOT NULL,
    account TEXT,
    idem TEXT,
    spec BLOB NOT NULL,
    is_array INTEGER NOT NULL,
    idx_start INTEGER NOT NULL,
    idx_end INTEGER NOT NULL,
    next_idx INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    state TEXT NOT NULL,
    n_pending INTEGER NOT NULL DEFAULT 0,
    n_queued INTEGER NOT NULL DEFAULT 0,
    n_running INTEGER NOT NULL DEFAULT 0,
    n_succeeded INTEGER NOT NULL DEFAULT 0,
    n_failed INTEGER NOT NULL DEFAULT 0,
    n_cancelled INTEGER NOT NULL DEFAULT 0,
    n_timed_out INTEGER NOT NULL DEFAULT 0,
    n_rejected INTEGER NOT NULL DEFAULT 0,
    n_frozen INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    ended_at INTEGER,
    month TEXT NOT NULL DEFAULT '',
    attempt_estimate TEXT NOT NULL DEFAULT '0',
    held INTEGER NOT NULL DEFAULT 0,
    decision TEXT,
    blocked INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(owner, idem) WHERE idem IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
-- `berth list` of a submitter: its own jobs, newest first.
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs(account, priority DESC, seq) WHERE next_idx <= idx_end AND held = 0 AND blocked = 0;
CREATE INDEX IF NOT EXISTS jobs_running ON jobs(account) WHERE n_running > 0;
CREATE TABLE IF NOT EXISTS tasks(
    job_seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    lease TEXT,
    worker TEXT,
    lease_expires INTEGER,
    exit_code INTEGER,
    started_at INTEGER,
    ended_at INTEGER,
    runtime_ms INTEGER,
    reason TEXT,
    charged TEXT NOT NULL DEFAULT '0',
    queued_at INTEGER,
    PRIMARY KEY(job_seq, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_queued ON tasks(job_seq, idx) WHERE state = 'queued';
CREATE UNIQUE INDEX IF NOT EXISTS tasks_lease ON tasks(lease) WHERE lease IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_running ON tasks(lease_expires) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tasks_worker ON tasks(worker) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY,
    job_seq INTEGER NOT NULL,
    idx INTEGER,
    time INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_seq, idx);
CREATE TABLE IF NOT EXISTS tokens(
    hash TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    used_by TEXT
);
-- `cert_fp`: the fingerprint of the certificate the name's latest enrolment was issued
-- (NULL for a worker certificate made without one, as `berth dev` makes its own).
CREATE TABLE IF NOT EXISTS workers(
    name TEXT PRIMARY KEY,
    enrolled_at INTEGER NOT NULL,
    drained INTEGER NOT NULL DEFAULT 0,
    pool TEXT NOT NULL DEFAULT 'default',
    cert_fp TEXT
);
CREATE TABLE IF NOT EXISTS deps(
    child_seq INTEGER NOT NULL,
    parent_seq INTEGER NOT NULL,
    cond TEXT NOT NULL,
    PRIMARY KEY(child_seq, parent_seq)
);
CREATE INDEX IF NOT EXISTS deps_parent ON deps(parent_seq);
CREATE TABLE IF NOT EXISTS budgets(
    account TEXT PRIMARY KEY,
    run_cap TEXT NOT NULL,
    month_cap TEXT NOT NULL,
    set_by TEXT NOT NULL,
    set_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger(
    account TEXT NOT NULL,
    month TEXT NOT NULL,
    reserved TEXT NOT NULL,
    spent TEXT NOT NULL,
    PRIMARY KEY(account, month)
);
CREATE TABLE IF NOT EXISTS images(
    name TEXT NOT NULL,
    job_seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    worker TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY(name)
);
CREATE INDEX IF NOT EXISTS images_task ON images(job_seq, idx);
CREATE INDEX IF NOT EXISTS images_owner ON images(owner, created_at);
INSERT INTO meta(key, value) VALUES ('schema', '3') ON CONFLICT DO NOTHING;
"#;

/// Output chunks. On SQLite they live in a database file of their own beside the main
/// one (attached as `output`, with 64 KiB pages), and a large chunk's bytes in a segment
/// file (`seg`, `off`, `len`; `data` empty: see `segments`). Unqualified
/// queries find it there; a database from before keeps its own `logs` table, which
/// SQLite finds first.
const LOGS: &str = r#"
CREATE TABLE IF NOT EXISTS output.logs(
    id INTEGER PRIMARY KEY,
    job_seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    seg INTEGER,
    off INTEGER,
    len INTEGER,
    UNIQUE(job_seq, idx, attempt, stream, seq)
);
"#;

/// The PostgreSQL tables, derived from the SQLite ones: the same shapes with
/// PostgreSQL's types (64-bit integers, `BYTEA`, sequences for row ids).
fn postgres() -> String {
    [SQLITE, &LOGS.replace("output.logs", "logs")]
        .concat()
        .replace("seq INTEGER PRIMARY KEY", "seq BIGSERIAL PRIMARY KEY")
        .replace("id INTEGER PRIMARY KEY", "id BIGSERIAL PRIMARY KEY")
        .replace("INTEGER", "BIGINT")
        .replace("BLOB", "BYTEA")
        .replace(") WITHOUT ROWID;", ");")
}

/// The advisory lock that serialises schema creation among coordinators starting at
/// once on one PostgreSQL database.
const PG_MIGRATE_LOCK: i64 = 0x6265_7274_6801;

/// Creates the schema if needed.
pub fn migrate(db: &mut dyn Db) -> Result<(), StoreError> {
    match db.backend() {
        Backend::Sqlite => {
            db.batch(SQLITE)?;
            db.batch(LOGS)
        }
        Backend::Postgres => {
            db.batch(&format!("SELECT pg_advisory_lock({PG_MIGRATE_LOCK})"))?;
            let r = db.batch(&postgres());
            db.batch(&format!("SELECT pg_advisory_unlock({PG_MIGRATE_LOCK})"))?;
            r
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_postgres_schema_has_only_postgres_types() {
        let pg = super::postgres();
        for sqlite_only in ["INTEGER", "BLOB", "WITHOUT ROWID", "output."] {
            assert!(!pg.contains(sqlite_only), "{sqlite_only} left in:\n{pg}");
        }
        assert_eq!(pg.matches("BIGSERIAL PRIMARY KEY").count(), 3, "jobs, events and logs have row ids");
    }
}
