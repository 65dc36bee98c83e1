//! The link's state machine driven by hand, with tokio's paused clock where time
//! matters: claims and their credit, a silent worker, stale and resent results,
//! duplicated and out-of-order frames, spill-delay retries.

use super::*;
use berth_shared::ids::JobId;
use berth_shared::job::{Command, JobSpec};
use berth_shared::wire::Assignment;

const TTL: Duration = Duration::from_secs(30);

fn assignment(millicpus: u32) -> Assignment {
    let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
    spec.resources.millicpus = millicpus;
    Assignment { lease: LeaseId::new(), job: JobId::new(), index: None, attempt: 1, spec, owner: "alice".into() }
}

fn outcome() -> Outcome {
    Outcome { exit_code: Some(0), signal: None, timed_out: false, killed: false, runtime_ms: 3, error: None }
}

fn feed(link: &mut Link, input: Input) -> Vec<Action> {
    let mut out = Vec::new();
    link.handle(input, Instant::now(), &mut out);
    out
}

fn claimed(tasks: Vec<Assignment>, retry_in: Option<Duration>) -> Result<Claimed, StoreError> {
    Ok(Claimed { tasks, retry_in, more: false })
}

#[tokio::test(start_paused = true)]
async fn one_claim_at_a_time_for_no_more_than_was_asked() {
    let mut link = Link::new(TTL, Instant::now());
    assert_eq!(link.claim_due(Instant::now(), true), None, "nothing asked for yet");
    feed(&mut link, Input::Frame(WorkerMsg::Want { n: 3 }));
    assert_eq!(link.claim_due(Instant::now(), true), Some(Action::Claim { n: 3, free: None }));
    // More credit while the claim is out: no second claim until it answers.
    feed(&mut link, Input::Frame(WorkerMsg::Want { n: 2 }));
    assert_eq!(link.claim_due(Instant::now(), true), None);
    let (a, b) = (assignment(0), assignment(0));
    let out = feed(&mut link, Input::Claimed { asked: 3, result: claimed(vec![a.clone(), b.clone()], None) });
    assert_eq!(out, vec![Action::Leases { added: vec![a.lease, b.lease], removed: vec![], heartbeat: false }, Action::Send(CoordMsg::Assign(vec![a, b])),]);
    // 5 asked, 2 given: 3 left, claimed again (the Want after the claim re-armed the hint).
    assert_eq!(link.claim_due(Instant::now(), true), Some(Action::Claim { n: 3, free: None }));
    // A partial answer means the queue is empty: wait for the work signal.
    feed(&mut link, Input::Claimed { asked: 3, result: claimed(vec![assignment(0)], None) });
    assert_eq!(link.claim_due(Instant::now(), true), None);
    feed(&mut link, Input::Work);
    assert_eq!(link.claim_due(Instant::now(), true), Some(Action::Claim { n: 2, free: None }));
    // Unless the store says it looked at part of the queue only: claimed again at once.
    let more = Ok(Claimed { tasks: vec![assignment(0)], retry_in: None, more: true });
    feed(&mut link, Input::Claimed { asked: 2, result: more });
    assert_eq!(link.claim_due(Instant::now(), true), Some(Action::Claim { n: 1, free: None }));
    // A closed connection claims nothing.
    feed(&mut link, Input::Claimed { asked: 1, result: Err(StoreError::Stopped) });
    feed(&mut link, Input::Work);
    assert_eq!(link.claim_due(Instant::now(), false), None);
    assert_eq!(link.claim_due(Instant::now(), true), Some(Action::Claim { n: 1, free: None }), "a failed claim is tried again");
}

#[tokio::test(start_paused = true)]
async fn what_is_handed_out_is_taken_from_what_the_worker_has_free() {
    let mut link = Link::new(TTL, Instant::now());
    let free = Free { millicpus: 4000, mem_mib: 1024, gpus: vec![] };
    feed(&mut link, Input::Frame(WorkerMsg::WantFit { n: 4, free: free.clone() }));
    assert_eq!(link.claim_due(Instant::now(), true), Some(Action::Claim { n: 4, free: Some(free) }));
    feed(&mut link, Input::Claimed { asked: 4, result: claimed(vec![assignment(1500), assignment(1000)], None) });
    feed(&mut link, Input::Work);
    assert_eq!(link.claim_due(Instant::now(), true), Some(Action::Claim { n: 2, free: Some(Free { millicpus: 1500, mem_mib: 1024, gpus: vec![] }) }));
}

#[tokio::test(start_paused = true)]
async fn a_silent_worker_gets_nothing_until_it_speaks() {
    let mut link = Link::new(TTL, Instant::now());
    feed(&mut link, Input::Frame(WorkerMsg::Want { n: 1 }));
    tokio::time::advance(TTL / 2 + Duration::from_millis(1)).await;
    assert_eq!(link.claim_due(Instant::now(), true), None, "silent for over half a TTL");
    feed(&mut link, Input::Frame(WorkerMsg::Heartbeat { leases: vec![] }));
    assert_eq!(link.claim_due(Instant::now(), true), Some(Action::Claim { n: 1, free: None }));
}

#[tokio::test(start_paused = true)]
async fn a_stale_result_is_refused_and_its_attempt_killed_a_resent_one_acknowledged() {
    let mut link = Link::new(TTL, Instant::now());
    let lease = LeaseId::new();
    // The worker sends the same result twice (a resend after a reconnect): both go to
    // the store, which records the first and calls the second already recorded.
    for _ in 0..2 {
        assert_eq!(feed(&mut link, Input::Frame(WorkerMsg::Finished { lease, outcome: outcome() })), vec![Action::Finish { lease, outcome: outcome() }]);
    }
    for verdict in [FinishVerdict::Recorded, FinishVerdict::AlreadyRecorded] {
        let out = feed(&mut link, Input::Finished { lease, result: Ok(verdict) });
        assert_eq!(out[1], Action::Send(CoordMsg::FinishedAck { lease, accepted: true }));
    }
    let stale = LeaseId::new();
    let out = feed(&mut link, Input::Finished { lease: stale, result: Ok(FinishVerdict::Stale) });
    assert_eq!(
        out,
        vec![
            Action::Leases { added: vec![], removed: vec![stale], heartbeat: false },
            Action::Send(CoordMsg::FinishedAck { lease: stale, accepted: false }),
            Action::Send(CoordMsg::Kill { lease: stale, reason: KillReason::StaleLease }),
        ]
    );
    // A result the store could not record is not acknowledged: the worker resends it.
    let out = feed(&mut link, Input::Finished { lease, result: Err(StoreError::Stopped) });
    assert_eq!(out, vec![Action::Leases { added: vec![], removed: vec![lease], heartbeat: false }]);
}

#[tokio::test(start_paused = true)]
async fn heartbeats_report_stale_leases_back() {
    let mut link = Link::new(TTL, Instant::now());
    let (held, stale) = (LeaseId::new(), LeaseId::new());
    assert_eq!(feed(&mut link, Input::Frame(WorkerMsg::Heartbeat { leases: vec![held, stale] })), vec![Action::Heartbeat { leases: vec![held, stale] }]);
    let out = feed(&mut link, Input::Renewed(Ok(vec![stale])));
    assert_eq!(out, vec![Action::Leases { added: vec![], removed: vec![stale], heartbeat: true }, Action::Send(CoordMsg::HeartbeatAck { stale: vec![stale] })]);
}

#[tokio::test(start_paused = true)]
async fn register_twice_closes_the_link() {
    let mut link = Link::new(TTL, Instant::now());
    let out = feed(
        &mut link,
        Input::Frame(WorkerMsg::Register {
            name: "w".into(),
            slots: 1,
            pool: "default".into(),
            labels: vec![],
            host: Default::default(),
            held: vec![],
            instance: uuid::Uuid::nil(),
        }),
    );
    assert_eq!(out, vec![Action::Close("Register sent twice")]);
}

#[tokio::test(start_paused = true)]
async fn a_spill_delay_arms_one_retry_at_a_time() {
    let mut link = Link::new(TTL, Instant::now());
    feed(&mut link, Input::Frame(WorkerMsg::Want { n: 1 }));
    link.claim_due(Instant::now(), true);
    let wait = Duration::from_secs(5);
    assert_eq!(feed(&mut link, Input::Claimed { asked: 1, result: claimed(vec![], Some(wait)) }), vec![Action::RetryIn(wait + RETRY_SLACK)]);
    // Claimed again on new work before the timer fires: no second timer.
    feed(&mut link, Input::Work);
    link.claim_due(Instant::now(), true);
    assert_eq!(feed(&mut link, Input::Claimed { asked: 1, result: claimed(vec![], Some(wait)) }), vec![]);
    assert_eq!(link.claim_due(Instant::now(), true), None);
    tokio::time::advance(wait + RETRY_SLACK).await;
    feed(&mut link, Input::Retry);
    assert_eq!(link.claim_due(Instant::now(), true), Some(Action::Claim { n: 1, free: None }));
    assert_eq!(feed(&mut link, Input::Claimed { asked: 1, result: claimed(vec![], Some(wait)) }), vec![Action::RetryIn(wait + RETRY_SLACK)]);
}
