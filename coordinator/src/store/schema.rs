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
    blocked INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'job'
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
    ready_at INTEGER,
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
-- A session's execs (`berth exec`), numbered from 1 per session; `lease` is the
-- session's lease when the exec started, the fence for its end.
CREATE TABLE IF NOT EXISTS execs(
    job_seq INTEGER NOT NULL,
    exec INTEGER NOT NULL,
    lease TEXT NOT NULL,
    argv TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    exit_code INTEGER,
    timed_out INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    runtime_ms INTEGER,
    PRIMARY KEY(job_seq, exec)
);
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

/// Creates the schema if needed, and brings a database an earlier berth made up to it.
///
/// Upgrades are additive: a column declared in the tables above that an existing table
/// lacks is added with its declared type and default (`cert_fp` of `workers`, the
/// segment columns of `logs`, ...), so a data dir from any earlier version opens
/// without losing a row. A column added later must be nullable or have a default; one
/// that is neither cannot be added to a table with rows, and is refused with a reason.
/// Stored job specs need no rewrite: see [`decode_spec`].
pub fn migrate(db: &mut dyn Db) -> Result<(), StoreError> {
    match db.backend() {
        Backend::Sqlite => {
            db.batch(SQLITE)?;
            db.batch(LOGS)?;
            add_missing_columns(db, &[SQLITE, &LOGS.replace("output.logs", "logs")].concat())
        }
        Backend::Postgres => {
            db.batch(&format!("SELECT pg_advisory_lock({PG_MIGRATE_LOCK})"))?;
            let schema = postgres();
            let r = db.batch(&schema).and_then(|()| add_missing_columns(db, &schema));
            db.batch(&format!("SELECT pg_advisory_unlock({PG_MIGRATE_LOCK})"))?;
            r
        }
    }
}

/// The columns each `CREATE TABLE` of `schema` declares: (table, column, definition).
fn declared_columns(schema: &str) -> Vec<(&str, &str, &str)> {
    let mut out = Vec::new();
    let mut table = None;
    for line in schema.lines() {
        if let Some(rest) = line.strip_prefix("CREATE TABLE IF NOT EXISTS ") {
            table = rest.split('(').next().map(str::trim);
            continue;
        }
        if line.starts_with(')') {
            table = None;
            continue;
        }
        let (Some(t), Some(col)) = (table, line.strip_prefix("    ")) else { continue };
        let col = col.trim_end_matches(',');
        let Some((name, def)) = col.split_once(' ') else { continue };
        if name.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !def.contains("PRIMARY KEY") {
            out.push((t, name, def));
        }
    }
    out
}

fn add_missing_columns(db: &mut dyn Db, schema: &str) -> Result<(), StoreError> {
    let mut have: std::collections::HashMap<String, std::collections::HashSet<String>> = Default::default();
    for (table, column, def) in declared_columns(schema) {
        if !have.contains_key(table) {
            let sql = match db.backend() {
                // Finds the table where SQLite would (a `logs` of an older main database first).
                Backend::Sqlite => "SELECT name FROM pragma_table_info(?1)",
                Backend::Postgres => "SELECT column_name::TEXT FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ?1",
            };
            let names = db.query(sql, &[table.into()])?.iter().map(|r| r.str(0)).collect::<Result<_, _>>()?;
            have.insert(table.to_string(), names);
        }
        if have[table].contains(column) {
            continue;
        }
        if def.contains("NOT NULL") && !def.contains("DEFAULT") {
            return Err(StoreError::Upgrade(format!("its {table} table has no {column} column, which cannot be added (NOT NULL without a default)")));
        }
        tracing::info!(table, column, "upgrading the store: adding a column");
        db.batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))?;
    }
    Ok(())
}

/// Decodes a job spec as the store holds it (bincode, serde mode), including specs an
/// earlier berth wrote: fields are only ever appended to `JobSpec`, each an `Option`
/// whose absence is `None`, so a shorter spec decodes once the missing trailing
/// options are supplied as `None` (one 0 byte each).
pub fn decode_spec(bytes: &[u8]) -> Option<berth_shared::job::JobSpec> {
    /// How many optional fields were appended to `JobSpec` since the first stored
    /// version (`max_output`, `session`).
    const APPENDED_OPTIONS: usize = 2;
    let mut buf = bytes.to_vec();
    for _ in 0..=APPENDED_OPTIONS {
        if let Ok(spec) = berth_shared::codec::decode(&buf) {
            return Some(spec);
        }
        buf.push(0);
    }
    None
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

    #[test]
    fn every_table_declares_its_columns_for_the_upgrade() {
        let cols = super::declared_columns(super::SQLITE);
        assert!(cols.contains(&("workers", "cert_fp", "TEXT")), "{cols:?}");
        assert!(cols.contains(&("jobs", "blocked", "INTEGER NOT NULL DEFAULT 0")), "{cols:?}");
        assert!(!cols.iter().any(|(_, c, _)| *c == "seq" || *c == "unique"), "keys and constraints are not columns: {cols:?}");
        let logs = super::declared_columns(super::LOGS);
        assert_eq!(logs.iter().map(|(_, c, _)| *c).collect::<Vec<_>>(), ["job_seq", "idx", "attempt", "stream", "seq", "data", "seg", "off", "len"]);
    }

    #[test]
    fn a_spec_stored_before_max_output_decodes_without_it() {
        use berth_shared::job::{Command, JobSpec};
        let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
        spec.max_output = Some(1 << 30);
        // Stored as a frame's body, without its length prefix.
        let body = |spec: &JobSpec| berth_shared::codec::encode(spec).expect("encode")[4..].to_vec();
        assert_eq!(super::decode_spec(&body(&spec)), Some(spec.clone()));
        spec.max_output = None;
        let mut before = body(&spec);
        // Before `max_output` and `session`: two None options fewer (one 0 byte each).
        assert_eq!(before.split_off(before.len() - 2), [0, 0]);
        assert_eq!(super::decode_spec(&before), Some(spec));
        assert_eq!(super::decode_spec(&before[..before.len() - 3]), None, "a truncated spec is corrupt, not guessed at");
    }
}
