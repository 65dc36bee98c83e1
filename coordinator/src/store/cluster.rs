//! What several coordinators on one PostgreSQL database need of each other:
//!
//! - change notifications: each coordinator's writer publishes what a commit changed
//!   (`NOTIFY`), and each coordinator listens, so a worker connected to one is woken by
//!   a submission made through another, and a client waiting on one sees progress
//!   made through another;
//! - lease-recovery leadership: exactly one coordinator at a time holds a session
//!   advisory lock and runs LeaseRecovery. PostgreSQL drops the lock with the
//!   holder's session, so a coordinator that dies (even by `kill -9`) hands it over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_shared::ids::JobId;
use berth_shared::job::JobState;
use fallible_iterator::FallibleIterator;

use super::engine::CHANNEL;
use super::sql::{p, pg_message, Db, PgDb};
use super::{Notice, StoreHandle};

/// The advisory lock whose holder runs lease recovery.
const LEASE_RECOVERY_LOCK: i64 = 0x6265_7274_6802;

/// Listens for other coordinators' changes and replays them locally: a work
/// wake-up, and each changed job's counts as a `Notice::Job`.
pub fn spawn_listener(url: String, me: String, handle: StoreHandle) {
    let spawned = std::thread::Builder::new().name("store-listen".into()).spawn(move || {
        let mut backoff = Duration::from_millis(200);
        loop {
            match listen(&url, &me, &handle) {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "lost the store's change notifications; reconnecting");
                    // Whatever was missed may include work: look for it.
                    handle.work.send_modify(|g| *g += 1);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the store listener thread");
    }
}

fn listen(url: &str, me: &str, handle: &StoreHandle) -> Result<(), String> {
    let mut db = PgDb::connect(url).map_err(|e| e.to_string())?;
    db.batch(&format!("LISTEN {CHANNEL}")).map_err(|e| e.to_string())?;
    // Nothing was heard while we were not listening: wake the claimers once.
    handle.work.send_modify(|g| *g += 1);
    loop {
        let mut payloads = Vec::new();
        {
            let mut n = db.client().notifications();
            let first = n.timeout_iter(Duration::from_secs(5)).next();
            match first {
                Ok(Some(first)) => payloads.push(first.payload().to_string()),
                Ok(None) => {}
                Err(e) => return Err(pg_message(&e)),
            }
            // Take whatever else has already arrived.
            let mut rest = n.iter();
            while let Ok(Some(more)) = rest.next() {
                payloads.push(more.payload().to_string());
            }
        }
        if payloads.is_empty() {
            // Quiet: make sure the connection still works.
            db.batch("SELECT 1").map_err(|e| e.to_string())?;
            continue;
        }
        if handle.notices.receiver_count() == 0 && handle.work.receiver_count() == 0 {
            continue;
        }
        let mut work = false;
        let mut jobs: Vec<JobId> = Vec::new();
        for p in &payloads {
            let mut parts = p.splitn(3, '|');
            let (from, w, list) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if from == me {
                continue;
            }
            work |= w == "w";
            jobs.extend(list.split(',').filter_map(|j| j.parse::<JobId>().ok()));
        }
        if work {
            handle.work.send_modify(|g| *g += 1);
        }
        jobs.sort();
        jobs.dedup();
        for job in jobs {
            let row = db
                .query_opt(
                    "SELECT n_pending, n_queued, n_running, n_succeeded, n_failed, n_cancelled, n_timed_out, n_rejected, n_frozen FROM jobs WHERE id = ?1",
                    p![job.to_string()],
                )
                .map_err(|e| e.to_string())?;
            if let Some(row) = row {
                let mut counts = berth_shared::job::Counts::default();
                for (i, s) in JobState::ALL.iter().enumerate() {
                    *counts.slot(*s) = row.u64(i).unwrap_or(0);
                }
                let _ = handle.notices.send(Arc::new(Notice::Job { job, counts, state: counts.aggregate() }));
            }
        }
    }
}

/// Whether this coordinator runs lease recovery now. With SQLite it always does.
#[derive(Clone)]
pub struct Leadership {
    leader: Arc<AtomicBool>,
}

impl Leadership {
    pub fn always() -> Leadership {
        Leadership { leader: Arc::new(AtomicBool::new(true)) }
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    /// Campaigns for the advisory lock on its own connection, checking every `every`;
    /// keeps it while the session lives, and campaigns again after losing it.
    pub fn campaign(url: String, name: String, every: Duration) -> Leadership {
        let me = Leadership { leader: Arc::new(AtomicBool::new(false)) };
        let flag = me.leader.clone();
        let spawned = std::thread::Builder::new().name("lease-leader".into()).spawn(move || loop {
            let mut db = match PgDb::connect(&url) {
                Ok(db) => db,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the store to campaign for lease recovery");
                    std::thread::sleep(every.max(Duration::from_secs(1)));
                    continue;
                }
            };
            loop {
                let held = flag.load(Ordering::Acquire);
                let r = if held {
                    db.batch("SELECT 1").map(|_| true)
                } else {
                    db.query_one(&format!("SELECT pg_try_advisory_lock({LEASE_RECOVERY_LOCK})"), p![]).and_then(|r| r.bool(0))
                };
                match r {
                    Ok(now_held) => {
                        if now_held && !held {
                            tracing::info!(coordinator = %name, "this coordinator now runs lease recovery");
                        }
                        flag.store(now_held, Ordering::Release);
                    }
                    Err(e) => {
                        if held {
                            tracing::warn!(error = %e, "lost the store connection: no longer running lease recovery");
                        } else {
                            tracing::warn!(error = %e, "cannot campaign for lease recovery");
                        }
                        flag.store(false, Ordering::Release);
                        break;
                    }
                }
                std::thread::sleep(every);
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the lease leadership thread");
        }
        me
    }
}
