//! Workers as the store knows them: join tokens (stored hashed) and drain.

use super::*;

impl<D: Db> Store<D> {
    /// Enrols `worker` with a one-time token, recording the fingerprint of the
    /// certificate it is issued: from then on only that certificate is the worker's.
    /// A name another certificate holds is refused (and the token kept) while that
    /// worker may be alive: `held` (the registry saw it connected or within the TTL), an
    /// enrolment within the TTL (it may not have connected yet), or a running lease that
    /// has not expired (it survives a coordinator restart). Only a name whose holder has
    /// been gone for a TTL may be enrolled again.
    pub(super) fn use_token(
        &mut self,
        token: &str,
        worker: &str,
        cert_fp: &str,
        held: Option<&str>,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let in_use = |why: &str| {
            StoreError::Api(ApiError::new(
                ErrorKind::Refused,
                format!(
                    "worker name {worker} is in use by another worker ({why}); start with --name to give this one a name of its own \
                     (or wait until that worker has been gone for the lease TTL, {} s)",
                    ttl.as_secs().max(1)
                ),
            ))
        };
        if let Some(why) = held {
            return Err(in_use(why));
        }
        let enrolled = self.db.query_opt("SELECT enrolled_at FROM workers WHERE name = ?1 AND cert_fp IS NOT NULL", p![worker])?;
        if let Some(row) = enrolled {
            let ago = ms(now) - row.i64(0)?;
            if ago < ttl.as_millis() as i64 {
                return Err(in_use(&format!("enrolled {} s ago", (ago.max(0) / 1000))));
            }
        }
        let leased = self.db.query_opt("SELECT COUNT(*) FROM tasks WHERE worker = ?1 AND state = 'running' AND lease_expires > ?2", p![worker, ms(now)])?;
        if let Some(n) = leased.map(|r| r.i64(0)).transpose()?.filter(|n| *n > 0) {
            return Err(in_use(&format!("it holds {n} running lease(s)")));
        }
        let hash = token_hash(token);
        let sql = format!("SELECT role, expires_at, used_at FROM tokens WHERE hash = ?1{}", self.db.for_update());
        let row = self.db.query_opt(&sql, p![hash.as_str()])?;
        let refuse = |m: String| StoreError::Api(ApiError::new(ErrorKind::Refused, m));
        let Some(row) = row else {
            return Err(refuse("the join token is not valid: create one with `berth-coordinator token create --role worker`".into()));
        };
        let (role, exp, used) = (row.str(0)?, row.i64(1)?, row.opt_i64(2)?);
        if used.is_some() {
            return Err(refuse("the join token has already been used: a token enrols one worker; create a new one".into()));
        }
        if exp <= ms(now) {
            return Err(refuse(format!("the join token expired at {}: create a new one", from_ms(exp).to_rfc3339())));
        }
        if role != "worker" {
            return Err(refuse(format!("the join token is for role {role}, not worker")));
        }
        self.db.exec("UPDATE tokens SET used_at = ?1, used_by = ?2 WHERE hash = ?3", p![ms(now), worker, hash.as_str()])?;
        self.db.exec(
            "INSERT INTO workers(name, enrolled_at, cert_fp) VALUES (?1, ?2, ?3) \
             ON CONFLICT(name) DO UPDATE SET enrolled_at = excluded.enrolled_at, cert_fp = excluded.cert_fp",
            p![worker, ms(now), cert_fp],
        )?;
        Ok(())
    }

    pub(super) fn set_drain(&mut self, worker: &str, drained: bool, s: &mut Scratch) -> Result<bool, StoreError> {
        let n = self.db.exec("UPDATE workers SET drained = ?1 WHERE name = ?2", p![drained, worker])?;
        if n == 0 {
            return Err(StoreError::Api(ApiError::new(ErrorKind::NotFound, format!("no worker named `{worker}`: `berth workers` lists them"))));
        }
        // An undrained worker may claim again: wake it.
        s.work |= !drained;
        Ok(drained)
    }
}

/// Tokens are stored hashed: the database never holds a usable token.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.trim().as_bytes()))
}

/// Creates a one-time join token (the `token create` command), returning it.
pub fn create_token(db: &mut dyn Db, role: &str, ttl: Duration, now: DateTime<Utc>) -> Result<String, StoreError> {
    use rand::RngCore;
    let mut raw = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut raw);
    let token = format!("bjt_{}", hex::encode(raw));
    db.exec(
        "INSERT INTO tokens(hash, role, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
        p![token_hash(&token), role, ms(now), ms(lease::expires_at(now, ttl))],
    )?;
    Ok(token)
}
