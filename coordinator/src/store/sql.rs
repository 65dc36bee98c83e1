//! The small seam between the store's logic and its two databases: a value type, a row
//! type, and a `Db` trait with one implementation per backend. The store's SQL is
//! written once, with `?N` placeholders and constructs both SQLite and PostgreSQL
//! accept; the few differences (locking clauses, transaction start) are asked of the
//! backend by name.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::StoreError;

/// A bound parameter or a column value.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Null,
    I64(i64),
    Text(String),
    Blob(Vec<u8>),
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Val {
            fn from(v: $t) -> Val {
                Val::I64(v as i64)
            }
        }
    )*};
}
from_int!(i64, i32, u32, u64, usize);

impl From<bool> for Val {
    fn from(v: bool) -> Val {
        Val::I64(i64::from(v))
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Text(v.to_string())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Val {
        Val::Text(v)
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Val {
        Val::Text(v.clone())
    }
}
impl From<Vec<u8>> for Val {
    fn from(v: Vec<u8>) -> Val {
        Val::Blob(v)
    }
}
impl From<&[u8]> for Val {
    fn from(v: &[u8]) -> Val {
        Val::Blob(v.to_vec())
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Val {
        v.map_or(Val::Null, Into::into)
    }
}

/// Parameters: `p![a, b, c]`.
#[macro_export]
macro_rules! p {
    ($($v:expr),* $(,)?) => { &[$($crate::store::sql::Val::from($v)),*][..] };
}
pub use crate::p;

/// One result row.
#[derive(Debug)]
pub struct Row(pub Vec<Val>);

fn bad_column(i: usize, want: &str, got: &Val) -> StoreError {
    StoreError::Corrupt { job: format!("(column {i}: wanted {want}, found {got:?})") }
}

impl Row {
    fn at(&self, i: usize) -> &Val {
        self.0.get(i).unwrap_or(&Val::Null)
    }
    pub fn i64(&self, i: usize) -> Result<i64, StoreError> {
        match self.at(i) {
            Val::I64(v) => Ok(*v),
            other => Err(bad_column(i, "an integer", other)),
        }
    }
    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.at(i) {
            Val::Null => Ok(None),
            Val::I64(v) => Ok(Some(*v)),
            other => Err(bad_column(i, "an integer", other)),
        }
    }
    pub fn u32(&self, i: usize) -> Result<u32, StoreError> {
        let v = self.i64(i)?;
        u32::try_from(v).map_err(|_| bad_column(i, "a u32", &Val::I64(v)))
    }
    pub fn u64(&self, i: usize) -> Result<u64, StoreError> {
        Ok(self.i64(i)?.max(0) as u64)
    }
    pub fn opt_i32(&self, i: usize) -> Result<Option<i32>, StoreError> {
        Ok(self.opt_i64(i)?.map(|v| v as i32))
    }
    pub fn bool(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.i64(i)? != 0)
    }
    pub fn str(&self, i: usize) -> Result<String, StoreError> {
        match self.at(i) {
            Val::Text(s) => Ok(s.clone()),
            other => Err(bad_column(i, "text", other)),
        }
    }
    pub fn opt_str(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.at(i) {
            Val::Null => Ok(None),
            Val::Text(s) => Ok(Some(s.clone())),
            other => Err(bad_column(i, "text", other)),
        }
    }
    pub fn blob(&mut self, i: usize) -> Result<Vec<u8>, StoreError> {
        match self.0.get_mut(i) {
            Some(Val::Blob(b)) => Ok(std::mem::take(b)),
            Some(other) => Err(bad_column(i, "bytes", other)),
            None => Err(bad_column(i, "bytes", &Val::Null)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database connection the store can run its SQL on.
pub trait Db: Send {
    fn backend(&self) -> Backend;
    /// Runs a statement, returning the number of rows changed.
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, StoreError>;
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StoreError>;
    /// Runs statements without parameters (transaction control, schema).
    fn batch(&mut self, sql: &str) -> Result<(), StoreError>;

    fn query_opt(&mut self, sql: &str, params: &[Val]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
    fn query_one(&mut self, sql: &str, params: &[Val]) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?.ok_or(StoreError::Missing)
    }
    /// The statement that starts a write transaction.
    fn begin(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }
    /// Appended to a claim's SELECT so that two coordinators never take the same rows
    /// and never wait on each other (SQLite has one writer and needs nothing).
    fn skip_locked(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
    /// As `skip_locked`, naming the table to lock in a join.
    fn skip_locked_of(&self, table: &str) -> String {
        match self.backend() {
            Backend::Sqlite => String::new(),
            Backend::Postgres => format!(" FOR UPDATE OF {table} SKIP LOCKED"),
        }
    }
    /// Appended to a read of a row the transaction will change.
    fn for_update(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }
}

// ---------------------------------------------------------------- SQLite

pub struct SqliteDb {
    pub conn: rusqlite::Connection,
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Val::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Val::I64(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Val::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

fn sqlite_row(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Row> {
    use rusqlite::types::ValueRef;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(match r.get_ref(i)? {
            ValueRef::Null => Val::Null,
            ValueRef::Integer(v) => Val::I64(v),
            ValueRef::Real(v) => Val::I64(v as i64),
            ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Val::Blob(b.to_vec()),
        });
    }
    Ok(Row(out))
}

/// The file that holds output chunks beside the database at `path`:
/// `berth.db` → `berth-output.db`.
pub fn output_path(path: &Path) -> std::path::PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "berth".into());
    let name = match path.extension() {
        Some(ext) => format!("{stem}-output.{}", ext.to_string_lossy()),
        None => format!("{stem}-output"),
    };
    path.with_file_name(name)
}

impl SqliteDb {
    /// Opens (and creates) the database file with the settings every connection uses:
    /// WAL, and `synchronous=FULL` so an acknowledged commit survives power loss.
    pub fn open(path: &Path) -> Result<SqliteDb, StoreError> {
        let conn = rusqlite::Connection::open(path).map_err(|source| StoreError::Open { path: path.display().to_string(), message: source.to_string() })?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Output goes to a file of its own with large pages (see schema::LOGS).
        let output = output_path(path);
        let output_str = output.to_str().ok_or_else(|| StoreError::Open { path: output.display().to_string(), message: "the path is not UTF-8".into() })?;
        conn.execute("ATTACH DATABASE ?1 AS output", [output_str])
            .map_err(|e| StoreError::Open { path: output.display().to_string(), message: e.to_string() })?;
        conn.pragma_update(Some(rusqlite::DatabaseName::Attached("output")), "page_size", 65536)?;
        conn.pragma_update(Some(rusqlite::DatabaseName::Attached("output")), "journal_mode", "WAL")?;
        conn.pragma_update(Some(rusqlite::DatabaseName::Attached("output")), "synchronous", "FULL")?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(SqliteDb { conn })
    }
}

/// The WAL size past which the checkpointer stops being polite: a checkpoint that
/// waits for the writer and restarts the log, so a writer that never pauses cannot
/// grow it without bound (frames of 4 KiB: 64 MiB).
const WAL_RESTART_FRAMES: i64 = 16 * 1024;

/// The least time between two checkpoints: each ends with an fsync of the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

impl SqliteDb {
    /// The writer's connection: as `open`, but it never checkpoints itself. Copying
    /// the WAL into the database (and syncing it) took most of the writer's time when
    /// output poured in; the checkpointer thread does it beside the writer instead.
    pub fn open_writer(path: &Path) -> Result<SqliteDb, StoreError> {
        let db = SqliteDb::open(path)?;
        db.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        db.conn.pragma_update(None, "journal_size_limit", WAL_RESTART_FRAMES * 4096)?;
        Ok(db)
    }

    /// Starts the checkpointer: a thread with its own connection that copies committed
    /// WAL frames into the database after commits (at most every `CHECKPOINT_EVERY`),
    /// without blocking the writer, and restarts the WAL once it is large. Returns the
    /// signal the writer gives after each commit; it never blocks.
    pub fn spawn_checkpointer(path: &Path) -> Result<std::sync::mpsc::SyncSender<()>, StoreError> {
        let db = SqliteDb::open(path)?;
        db.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                while rx.recv().is_ok() {
                    // Let commits gather: one checkpoint (one fsync) for many of them.
                    if let Some(rest) = CHECKPOINT_EVERY.checked_sub(last.elapsed()) {
                        std::thread::sleep(rest);
                    }
                    while rx.try_recv().is_ok() {}
                    last = std::time::Instant::now();
                    let frames = db.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
                    let result = match frames {
                        Ok(n) if n >= WAL_RESTART_FRAMES => db.conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0)).map(|_| ()),
                        other => other.map(|_| ()),
                    };
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "WAL checkpoint failed; it is tried again after the next commit");
                    }
                }
                // The writer is gone: leave a small WAL behind.
                let _ = db.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            })
            .map_err(|e| StoreError::Open { path: path.display().to_string(), message: format!("cannot start the checkpointer: {e}") })?;
        Ok(tx)
    }
}

impl SqliteDb {
    /// Whether the main database has a `logs` table of its own (made before output moved
    /// to the attached database): queries find that one, with chunks in its rows.
    pub fn has_legacy_logs(&mut self) -> Result<bool, StoreError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM main.sqlite_master WHERE type = 'table' AND name = 'logs'", [], |r| r.get::<_, i64>(0))? > 0)
    }
}

impl Db for SqliteDb {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, StoreError> {
        let mut st = self.conn.prepare_cached(sql)?;
        Ok(st.execute(rusqlite::params_from_iter(params.iter()))? as u64)
    }
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StoreError> {
        let mut st = self.conn.prepare_cached(sql)?;
        let n = st.column_count();
        let rows = st.query_map(rusqlite::params_from_iter(params.iter()), |r| sqlite_row(r, n))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        // One statement (BEGIN, SAVEPOINT, RELEASE, COMMIT: several per batch of
        // operations) is prepared once and kept, not parsed again each time.
        if !sql.contains(';') {
            self.conn.prepare_cached(sql)?.raw_execute()?;
            return Ok(());
        }
        Ok(self.conn.execute_batch(sql)?)
    }
}

// ---------------------------------------------------------------- PostgreSQL

pub struct PgDb {
    client: postgres::Client,
    statements: HashMap<String, postgres::Statement>,
}

impl postgres::types::ToSql for Val {
    fn to_sql(&self, ty: &postgres::types::Type, out: &mut bytes::BytesMut) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{IsNull, Type};
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::I64(v) => match *ty {
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Val::Text(s) => s.as_str().to_sql(ty, out),
            Val::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }
    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }
    postgres::types::to_sql_checked!();
}

fn pg_row(r: &postgres::Row) -> Result<Row, StoreError> {
    use postgres::types::Type;
    let mut out = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let v = match *c.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map_or(Val::Null, Val::I64),
            Type::INT4 => r.try_get::<_, Option<i32>>(i)?.map_or(Val::Null, |v| Val::I64(v.into())),
            Type::INT2 => r.try_get::<_, Option<i16>>(i)?.map_or(Val::Null, |v| Val::I64(v.into())),
            Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map_or(Val::Null, |v| Val::I64(v.into())),
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map_or(Val::Null, Val::Blob),
            Type::VOID => Val::Null,
            _ => r.try_get::<_, Option<String>>(i)?.map_or(Val::Null, Val::Text),
        };
        out.push(v);
    }
    Ok(Row(out))
}

/// `?N` → `$N` (the store's SQL has no `?` inside string literals).
pub fn pg_placeholders(sql: &str) -> String {
    sql.replace('?', "$")
}

impl PgDb {
    pub fn connect(url: &str) -> Result<PgDb, StoreError> {
        let mut client = postgres::Client::connect(url, postgres::NoTls).map_err(|e| StoreError::Open { path: redact(url), message: pg_message(&e) })?;
        client.batch_execute("SET client_min_messages TO warning")?;
        Ok(PgDb { client, statements: HashMap::new() })
    }

    pub fn client(&mut self) -> &mut postgres::Client {
        &mut self.client
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let st = self.client.prepare(&pg_placeholders(sql))?;
        if self.statements.len() > 256 {
            self.statements.clear();
        }
        self.statements.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    fn params(params: &[Val]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
        params.iter().map(|v| v as &(dyn postgres::types::ToSql + Sync)).collect()
    }
}

impl Db for PgDb {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, StoreError> {
        let st = self.statement(sql)?;
        Ok(self.client.execute(&st, &Self::params(params))?)
    }
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StoreError> {
        let st = self.statement(sql)?;
        self.client.query(&st, &Self::params(params))?.iter().map(pg_row).collect()
    }
    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        Ok(self.client.batch_execute(sql)?)
    }
}

/// A PostgreSQL error in one line (the server's message, not the driver's wrapper).
pub fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => d.message().to_string(),
        None => {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(e);
            while let Some(c) = cur {
                s.push_str(": ");
                s.push_str(&c.to_string());
                cur = c.source();
            }
            s
        }
    }
}

/// A connection URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(a), Some(b)) if b > a => {
            let creds = &url[a + 3..b];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..a + 3], &url[b..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_redaction() {
        assert_eq!(pg_placeholders("SELECT a FROM t WHERE b = ?1 AND c = ?12"), "SELECT a FROM t WHERE b = $1 AND c = $12");
        assert_eq!(redact("postgres://berth:s3cret@db:5432/berth"), "postgres://berth:***@db:5432/berth");
        assert_eq!(redact("postgres://berth@db/berth"), "postgres://berth@db/berth");
    }
}
