//! Lease rules as plain code with `now` passed in: when a lease expires, what an
//! expiry does to its task, and how a coordinator restart resets lease clocks.

use chrono::{DateTime, Duration, Utc};

/// What happens to a task whose lease ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Back to `queued` as attempt `next_attempt`.
    Requeue { next_attempt: u32 },
    /// Out of attempts: `failed` with reason `lease_lost`.
    Fail,
}

/// The decision for a task on its `attempt` (counting from 1) of `max_attempts`.
pub fn on_expiry(attempt: u32, max_attempts: u32) -> Expiry {
    if attempt >= max_attempts {
        Expiry::Fail
    } else {
        Expiry::Requeue { next_attempt: attempt + 1 }
    }
}

/// When a lease granted or renewed at `now` runs out.
pub fn expires_at(now: DateTime<Utc>, ttl: std::time::Duration) -> DateTime<Utc> {
    now + Duration::from_std(ttl).unwrap_or(Duration::days(365))
}

/// Whether a lease that runs out at `expires` has expired at `now`.
pub fn is_expired(expires: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    expires <= now
}

/// What a worker gets on top of a full TTL after a coordinator outage: the time to
/// notice the outage ended and redial (its backoff, the handshake, a loaded machine).
pub const RECONNECT_ALLOWANCE: std::time::Duration = std::time::Duration::from_secs(5);

/// After a coordinator outage every running lease gets a full TTL from `now`, plus
/// the reconnect allowance: the outage was not the workers' fault, so no lease may
/// expire before its worker had time to reconnect. Returns the new expiry for a lease
/// that ran out at `expires`.
pub fn after_restart(expires: DateTime<Utc>, now: DateTime<Utc>, ttl: std::time::Duration) -> DateTime<Utc> {
    expires.max(expires_at(now, ttl + RECONNECT_ALLOWANCE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_requeues_until_attempts_run_out() {
        assert_eq!(on_expiry(1, 3), Expiry::Requeue { next_attempt: 2 });
        assert_eq!(on_expiry(2, 3), Expiry::Requeue { next_attempt: 3 });
        assert_eq!(on_expiry(3, 3), Expiry::Fail);
        assert_eq!(on_expiry(1, 1), Expiry::Fail);
    }

    #[test]
    fn restart_gives_a_full_ttl() {
        let t0 = DateTime::from_timestamp(1_000_000, 0).expect("valid");
        let ttl = std::time::Duration::from_secs(30);
        let old = expires_at(t0, ttl);
        // The coordinator was down for an hour: the lease is long past its expiry.
        let later = t0 + Duration::hours(1);
        assert!(is_expired(old, later));
        let renewed = after_restart(old, later, ttl);
        assert!(!is_expired(renewed, later + Duration::seconds(34)), "a full TTL and the reconnect allowance");
        assert!(is_expired(renewed, later + Duration::seconds(35)));
    }
}
