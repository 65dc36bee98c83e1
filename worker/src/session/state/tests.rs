//! Unit tests of the session state machine: no connection, no executor, time paused
//! where it matters.

use std::time::Duration;

use berth_shared::ids::{JobId, LeaseId};
use berth_shared::job::{Command, JobSpec};
use berth_shared::wire::OutStream;
use tokio::time::{advance, Instant};

use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    s: State,
}

fn free() -> FreeResources {
    FreeResources { millicpus: 4000, mem_mib: 4096, gpus: Vec::new() }
}

fn fixture(slots: usize, prefetch: usize) -> Fixture {
    Fixture { dir: tempfile::tempdir().expect("tempdir"), s: State::new(slots, prefetch, free()) }
}

fn task(millicpus: u32) -> Assignment {
    let mut spec = JobSpec::new(Command::Argv(vec!["true".into()]));
    spec.resources.millicpus = millicpus;
    Assignment { lease: LeaseId::new(), job: JobId::new(), index: None, attempt: 1, spec, owner: "alice".into() }
}

fn done() -> Ended {
    Ended { outcome: Outcome { exit_code: Some(0), signal: None, timed_out: false, killed: false, runtime_ms: 1, error: None }, frozen: None }
}

impl Fixture {
    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.s.poll_action()).collect()
    }

    fn frame(&mut self, m: CoordMsg) -> Vec<Action> {
        let dir = self.dir.path().to_path_buf();
        self.s
            .frame(Instant::now(), m, |lease, exec| Some(Arc::new(Spool::create(&dir.join(format!("{lease}-{exec}.spool"))).expect("spool"))))
            .expect("frame");
        self.actions()
    }

    fn assign(&mut self, list: Vec<Assignment>) -> Vec<Action> {
        self.frame(CoordMsg::Assign(list))
    }

    fn connect(&mut self) -> Vec<Action> {
        self.s.registered(Instant::now(), 3000, Vec::new());
        self.actions()
    }

    /// The executor's side of an attempt ending: its spool closed, then its report.
    fn end(&mut self, lease: LeaseId) -> Vec<Action> {
        self.s.attempt(lease).expect("held").spool.close();
        self.s.report(Instant::now(), Report::Ended(lease, done()));
        self.actions()
    }
}

/// A connected worker with one slot and one prefetched task: one attempt running, one waiting.
fn running_and_waiting() -> (Fixture, Assignment, Assignment) {
    let mut f = fixture(1, 1);
    f.connect();
    let (run, wait) = (task(0), task(0));
    f.assign(vec![run.clone(), wait.clone()]);
    (f, run, wait)
}

fn sent(actions: &[Action]) -> Vec<&WorkerMsg> {
    actions.iter().filter_map(|a| if let Action::Send(m) = a { Some(m) } else { None }).collect()
}

fn started(actions: &[Action]) -> Vec<(LeaseId, usize)> {
    actions.iter().filter_map(|a| if let Action::Start { lease, slot } = a { Some((*lease, *slot)) } else { None }).collect()
}

fn wants(actions: &[Action]) -> Vec<u32> {
    sent(actions).into_iter().filter_map(|m| if let WorkerMsg::WantFit { n, .. } = m { Some(*n) } else { None }).collect()
}

/// The free resources the last `WantFit` said.
fn free_said(actions: &[Action]) -> Option<FreeResources> {
    sent(actions).into_iter().rev().find_map(|m| if let WorkerMsg::WantFit { free, .. } = m { Some(free.clone()) } else { None })
}

fn finished(actions: &[Action]) -> Vec<LeaseId> {
    sent(actions).into_iter().filter_map(|m| if let WorkerMsg::Finished { lease, .. } = m { Some(*lease) } else { None }).collect()
}

fn forgotten(actions: &[Action]) -> Vec<LeaseId> {
    actions.iter().filter_map(|a| if let Action::Forget { lease, .. } = a { Some(*lease) } else { None }).collect()
}

#[test]
fn credit_is_slots_plus_prefetch_and_a_freed_slot_takes_the_prefetched_task() {
    let mut f = fixture(2, 1);
    let a = f.connect();
    assert_eq!(wants(&a), [3], "slots + prefetch: {a:?}");
    let (t1, t2, t3) = (task(1000), task(1000), task(1000));
    let a = f.assign(vec![t1.clone(), t2.clone()]);
    assert_eq!(started(&a), [(t1.lease, 0), (t2.lease, 1)]);
    assert!(wants(&a).is_empty(), "one is still asked for");
    assert!(a.iter().any(|x| matches!(x, Action::Stream(l) if *l == t1.lease)), "output streams while connected");
    let a = f.assign(vec![t3.clone()]);
    assert!(started(&a).is_empty(), "no free slot: it waits");
    assert!(wants(&a).is_empty(), "credit spent: running 2 + waiting 1");
    let a = f.end(t1.lease);
    assert!(matches!(a.first(), Some(Action::CleanSlot(0))), "{a:?}");
    assert_eq!(started(&a), [(t3.lease, 0)], "the prefetched task takes the freed slot");
    assert_eq!(wants(&a), [1]);
    assert_eq!(finished(&a), [t1.lease], "no output: the result goes at once");
}

#[test]
fn freed_resources_are_announced_even_when_no_task_is_wanted() {
    let mut f = fixture(1, 0);
    f.connect();
    let t = task(1500);
    let a = f.assign(vec![t.clone()]);
    assert_eq!(started(&a).len(), 1);
    let a = f.end(t.lease);
    let free_now = free_said(&a);
    assert_eq!(free_now, Some(free()), "what the task held is given back and said");
}

#[test]
fn an_assignment_seen_twice_runs_once_and_sets_aside_once() {
    let mut f = fixture(2, 0);
    f.connect();
    let t = task(3000);
    let a = f.assign(vec![t.clone()]);
    assert_eq!(started(&a), [(t.lease, 0)]);
    let a = f.assign(vec![t.clone()]);
    assert!(started(&a).is_empty(), "{a:?}");
    assert_eq!(f.s.running(), 1);
    // Its resources were set aside once: ending it gives all of them back.
    let a = f.end(t.lease);
    let free_now = free_said(&a);
    assert_eq!(free_now, Some(free()));
}

#[test]
fn acks_for_unknown_attempts_or_unsent_results_change_nothing() {
    let mut f = fixture(1, 0);
    f.connect();
    let stranger = LeaseId::new();
    assert!(f.frame(CoordMsg::FinishedAck { lease: stranger, accepted: true }).is_empty());
    assert!(f.frame(CoordMsg::OutputAck { lease: stranger, stream: OutStream::Stdout, seq: 1 }).is_empty());
    assert!(f.frame(CoordMsg::Kill { lease: stranger, reason: KillReason::Cancelled }).is_empty());
    let t = task(0);
    f.assign(vec![t.clone()]);
    // An acknowledgement of a result before it was sent: the attempt is still held.
    let a = f.frame(CoordMsg::FinishedAck { lease: t.lease, accepted: true });
    assert!(forgotten(&a).is_empty(), "{a:?}");
    assert_eq!(f.s.held(), [t.lease]);
    assert_eq!(f.s.running(), 1);
    let a = f.end(t.lease);
    assert_eq!(finished(&a), [t.lease]);
    let a = f.frame(CoordMsg::FinishedAck { lease: t.lease, accepted: true });
    assert_eq!(forgotten(&a), [t.lease]);
    assert!(f.s.held().is_empty());
    // The same acknowledgement again, now for an attempt gone.
    assert!(f.frame(CoordMsg::FinishedAck { lease: t.lease, accepted: true }).is_empty());
}

#[test]
fn a_result_waits_for_its_output_to_be_acknowledged() {
    let mut f = fixture(1, 0);
    f.connect();
    let t = task(0);
    f.assign(vec![t.clone()]);
    let spool = f.s.attempt(t.lease).expect("held").spool.clone();
    spool.append(OutStream::Stdout, b"one").expect("append");
    spool.append(OutStream::Stdout, b"two").expect("append");
    let a = f.end(t.lease);
    assert!(finished(&a).is_empty(), "output not acknowledged yet");
    // An ack past what was written, and one out of order: neither settles it.
    assert!(finished(&f.frame(CoordMsg::OutputAck { lease: t.lease, stream: OutStream::Stdout, seq: 9 })).is_empty());
    assert!(finished(&f.frame(CoordMsg::OutputAck { lease: t.lease, stream: OutStream::Stderr, seq: 1 })).is_empty());
    assert!(finished(&f.frame(CoordMsg::OutputAck { lease: t.lease, stream: OutStream::Stdout, seq: 1 })).is_empty());
    assert_eq!(finished(&f.frame(CoordMsg::OutputAck { lease: t.lease, stream: OutStream::Stdout, seq: 2 })), [t.lease]);
    // Acked again (duplicated frame): the result is not sent twice on one connection.
    assert!(finished(&f.frame(CoordMsg::OutputAck { lease: t.lease, stream: OutStream::Stdout, seq: 2 })).is_empty());
}

#[test]
fn a_stale_lease_kills_its_attempt_and_it_is_forgotten_without_a_result() {
    let mut f = fixture(2, 0);
    f.connect();
    let (run, wait) = (task(0), task(0));
    f.assign(vec![run.clone()]);
    let a = f.frame(CoordMsg::HeartbeatAck { stale: vec![run.lease] });
    assert!(a.iter().any(|x| matches!(x, Action::Kill { lease, reason: KillReason::StaleLease } if *lease == run.lease)), "{a:?}");
    assert!(f.s.held().is_empty(), "a stale lease is no longer reported as held");
    let a = f.end(run.lease);
    assert!(finished(&a).is_empty(), "{a:?}");
    assert_eq!(forgotten(&a), [run.lease]);
    assert!(f.s.attempt(run.lease).is_none());
    // Its freed slot takes the next task.
    let a = f.assign(vec![wait.clone()]);
    assert_eq!(started(&a), [(wait.lease, 0)]);
}

#[test]
fn a_stale_lease_of_a_waiting_task_is_dropped_at_registration() {
    let (mut f, run, wait) = running_and_waiting();
    f.s.disconnected();
    f.s.registered(Instant::now(), 3000, vec![wait.lease]);
    let a = f.actions();
    assert_eq!(forgotten(&a), [wait.lease]);
    assert!(!a.iter().any(|x| matches!(x, Action::Kill { .. })), "nothing runs to kill: {a:?}");
    assert_eq!(f.s.held(), [run.lease]);
}

#[test]
fn a_cancelled_waiting_task_reports_killed() {
    let (mut f, run, wait) = running_and_waiting();
    let a = f.frame(CoordMsg::Kill { lease: wait.lease, reason: KillReason::Cancelled });
    let outcome = sent(&a).into_iter().find_map(|m| match m {
        WorkerMsg::Finished { lease, outcome } if *lease == wait.lease => Some(outcome.clone()),
        _ => None,
    });
    assert!(outcome.is_some_and(|o| o.killed), "{a:?}");
    let a = f.end(run.lease);
    assert!(started(&a).is_empty(), "the cancelled task does not start");
}

#[test]
fn results_not_acknowledged_are_sent_again_after_a_reconnect() {
    let mut f = fixture(1, 0);
    f.connect();
    let t = task(0);
    f.assign(vec![t.clone()]);
    assert_eq!(finished(&f.end(t.lease)), [t.lease]);
    f.s.disconnected();
    assert_eq!(f.s.held(), [t.lease], "held until acknowledged");
    let a = f.connect();
    assert_eq!(finished(&a), [t.lease]);
    assert!(a.iter().any(|x| matches!(x, Action::Stream(l) if *l == t.lease)), "its output is resent from the first unacknowledged chunk");
}

#[test]
fn nothing_is_sent_or_asked_while_disconnected() {
    let (mut f, t1, t2) = running_and_waiting();
    f.s.disconnected();
    let a = f.end(t1.lease);
    assert!(sent(&a).is_empty(), "{a:?}");
    assert_eq!(started(&a), [(t2.lease, 0)], "waiting tasks still start");
    assert!(!a.iter().any(|x| matches!(x, Action::Stream(_))), "no output stream without a connection");
}

#[test]
fn a_refusal_ends_the_session() {
    let mut f = fixture(1, 0);
    f.connect();
    let r = f.s.frame(Instant::now(), CoordMsg::Refused { reason: "no".into() }, |_, _| None);
    assert!(matches!(r, Err(WorkerError::Refused(_))));
}

#[test]
fn stopping_kills_what_runs_and_starts_nothing_more() {
    let (mut f, t1, t2) = running_and_waiting();
    f.s.stop();
    let a = f.actions();
    assert!(matches!(a.as_slice(), [Action::Kill { lease, reason: KillReason::Cancelled }] if *lease == t1.lease), "{a:?}");
    let a = f.end(t1.lease);
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(f.s.running(), 0);
    assert!(matches!(f.s.attempt(t2.lease).map(|a| &a.phase), Some(Phase::Queued)), "the waiting task never starts");
}

#[tokio::test(start_paused = true)]
async fn started_is_said_only_of_an_attempt_still_running_after_50ms() {
    let mut f = fixture(2, 0);
    f.connect();
    f.s.timeout(Instant::now()).expect("first heartbeat");
    f.actions();
    let (long, short) = (task(0), task(0));
    f.assign(vec![long.clone(), short.clone()]);
    f.s.report(Instant::now(), Report::Started(long.lease));
    f.s.report(Instant::now(), Report::Started(short.lease));
    let due = f.s.next_timeout().expect("a timer");
    assert_eq!(due, Instant::now() + STARTED_AFTER);
    advance(Duration::from_millis(20)).await;
    f.end(short.lease);
    advance(Duration::from_millis(29)).await;
    f.s.timeout(Instant::now()).expect("timeout");
    assert!(sent(&f.actions()).is_empty(), "not yet");
    advance(Duration::from_millis(1)).await;
    f.s.timeout(Instant::now()).expect("timeout");
    let a = f.actions();
    assert_eq!(sent(&a), [&WorkerMsg::Started { lease: long.lease }], "only the one still running");
}

#[tokio::test(start_paused = true)]
async fn three_unanswered_heartbeats_lose_the_link_and_any_frame_answers() {
    let mut f = fixture(1, 0);
    f.connect();
    let every = Duration::from_millis(1000);
    // The first heartbeat goes at once, then one every third of the TTL.
    for i in 0..3 {
        assert_eq!(f.s.next_timeout(), Some(Instant::now()), "beat {i}");
        f.s.timeout(Instant::now()).expect("beat");
        assert!(matches!(sent(&f.actions()).as_slice(), [WorkerMsg::Heartbeat { .. }, WorkerMsg::Slots { .. }]));
        advance(every).await;
    }
    // An answer resets the count.
    f.frame(CoordMsg::HeartbeatAck { stale: Vec::new() });
    for _ in 0..3 {
        f.s.timeout(Instant::now()).expect("beat");
        f.actions();
        advance(every).await;
    }
    let lost = f.s.timeout(Instant::now()).expect_err("no answer to three heartbeats");
    assert!(lost.contains("3 heartbeats"), "{lost}");
}

#[tokio::test(start_paused = true)]
async fn reconnects_back_off_doubling_to_a_cap_and_start_over_after_a_connection() {
    let mut f = fixture(1, 0);
    let ms = Duration::from_millis;
    let mut waits = Vec::new();
    for _ in 0..8 {
        let at = f.s.retry_at(Instant::now(), 0);
        let wait = at - Instant::now();
        tokio::time::sleep_until(at).await;
        waits.push(wait);
    }
    assert_eq!(waits, [ms(100), ms(200), ms(400), ms(800), ms(1600), ms(3200), ms(5000), ms(5000)], "no TTL known: capped at 5 s");
    // Once a coordinator said its TTL, the cap is an eighth of it.
    f.connect();
    f.s.disconnected();
    let waits: Vec<Duration> = (0..4).map(|_| f.s.retry_at(Instant::now(), 0) - Instant::now()).collect();
    assert_eq!(waits, [ms(100), ms(200), ms(375), ms(375)]);
    // Jitter adds less than a quarter of the wait.
    f.s.disconnected();
    let jittered = f.s.retry_at(Instant::now(), 24) - Instant::now();
    assert_eq!(jittered, ms(124));
    f.s.disconnected();
    assert_eq!(f.s.retry_at(Instant::now(), 25) - Instant::now(), ms(100), "25 % 25 = 0");
}

#[tokio::test(start_paused = true)]
async fn a_process_refused_while_another_holds_the_name_waits_what_it_was_told() {
    let mut f = fixture(1, 0);
    f.connect();
    f.s.disconnected();
    // Longer than any backoff cap: it is the coordinator's to say, not doubled from 100 ms.
    f.s.in_use(Duration::from_secs(15));
    assert_eq!(f.s.retry_at(Instant::now(), 0) - Instant::now(), Duration::from_secs(15));
    assert!(sent(&f.actions()).is_empty(), "nothing is sent while refused");
}

#[test]
fn a_freeze_is_passed_on_for_an_attempt_not_done_and_ignored_after() {
    let (mut f, run, wait) = running_and_waiting();
    let a = f.frame(CoordMsg::Freeze { lease: wait.lease, tag: "t1".into() });
    assert!(matches!(a.as_slice(), [Action::Freeze { lease, tag }] if *lease == wait.lease && tag == "t1"), "a waiting attempt freezes once it runs: {a:?}");
    f.end(run.lease);
    assert!(f.frame(CoordMsg::Freeze { lease: run.lease, tag: "t2".into() }).is_empty(), "an attempt that ended is not frozen");
    assert!(f.frame(CoordMsg::Freeze { lease: LeaseId::new(), tag: "t3".into() }).is_empty());
}

#[test]
fn a_rejected_freeze_has_its_image_removed() {
    let mut f = fixture(1, 0);
    f.connect();
    let t = task(0);
    f.assign(vec![t.clone()]);
    f.s.attempt(t.lease).expect("held").spool.close();
    f.s.report(Instant::now(), Report::Ended(t.lease, Ended { frozen: Some("berth-frozen:x".into()), ..done() }));
    let a = f.actions();
    assert!(sent(&a).iter().any(|m| matches!(m, WorkerMsg::Frozen { lease, .. } if *lease == t.lease)), "{a:?}");
    let a = f.frame(CoordMsg::FinishedAck { lease: t.lease, accepted: false });
    assert!(matches!(a.as_slice(), [Action::RemoveImage { image, report: false }, Action::Forget { .. }] if image == "berth-frozen:x"), "{a:?}");
}

#[test]
fn output_the_coordinator_could_not_store_is_sent_again_when_asked_and_the_result_waits_for_it() {
    let (mut f, run, wait) = running_and_waiting();
    // Not for an attempt that has not started (it has sent nothing), nor one not held.
    assert!(f.frame(CoordMsg::Resend { lease: wait.lease }).iter().all(|a| !matches!(a, Action::Restream(_))));
    assert!(f.frame(CoordMsg::Resend { lease: LeaseId::new() }).is_empty());
    let spool = f.s.attempt(run.lease).expect("held").spool.clone();
    spool.append(OutStream::Stdout, b"one\n").expect("append");
    spool.append(OutStream::Stdout, b"two\n").expect("append");
    f.frame(CoordMsg::OutputAck { lease: run.lease, stream: OutStream::Stdout, seq: 1 });
    let a = f.end(run.lease);
    assert!(finished(&a).is_empty(), "chunk 2 is not acknowledged: no result yet");
    // The coordinator could not store chunk 2 and now can: stream again from it.
    let a = f.frame(CoordMsg::Resend { lease: run.lease });
    assert!(matches!(a.as_slice(), [Action::Restream(l)] if *l == run.lease), "{a:?}");
    assert_eq!(spool.first_unacked(), 1, "the stream starts at the first chunk not acknowledged");
    let a = f.frame(CoordMsg::OutputAck { lease: run.lease, stream: OutStream::Stdout, seq: 2 });
    assert_eq!(finished(&a), [run.lease], "everything acknowledged: the result goes");
}

/// A session: its slot is held (acquired) once it starts, executing while an exec
/// runs, and its end waits for every exec's end to be acknowledged.
#[tokio::test(start_paused = true)]
async fn a_session_holds_its_slot_and_ends_after_its_execs() {
    let mut f = fixture(1, 0);
    f.connect();
    let mut t = task(0);
    t.spec.session = Some(berth_shared::session::SessionSpec { idle_ttl_ms: 60_000, max_lifetime_ms: 3_600_000 });
    let lease = t.lease;
    f.assign(vec![t]);
    f.actions();
    assert_eq!(f.s.slot_states(), ["acquired"]);
    f.s.report(Instant::now(), Report::Started(lease));
    assert!(sent(&f.actions()).contains(&&WorkerMsg::Started { lease }), "ready is said at once");
    let spec = berth_shared::session::ExecSpec { argv: vec!["true".into()], env: vec![], timeout_ms: None, cwd: None, stdin: false };
    let a = f.frame(CoordMsg::Exec { lease, exec: 1, spec });
    assert!(a.iter().any(|a| matches!(a, Action::Exec { exec: 1, .. })), "{a:?}");
    assert_eq!(f.s.slot_states(), ["executing"]);
    let done = Outcome { exit_code: Some(0), signal: None, timed_out: false, killed: false, runtime_ms: 1, error: None };
    if let Some(s) = f.s.attempt(lease).and_then(|a| a.session.as_ref()) {
        s.execs[&1].spool.close();
    }
    f.s.report(Instant::now(), Report::ExecEnded(lease, 1, done.clone()));
    let a = f.actions();
    assert!(sent(&a).iter().any(|m| matches!(m, WorkerMsg::ExecFinished { exec: 1, .. })), "{a:?}");
    assert_eq!(f.s.slot_states(), ["acquired"]);
    // Closed while its exec's end is not yet acknowledged: the session's result waits.
    f.frame(CoordMsg::Kill { lease, reason: KillReason::Cancelled });
    assert_eq!(f.s.slot_states(), ["releasing"]);
    if let Some(a) = f.s.attempt(lease) {
        a.spool.close();
    }
    f.s.report(Instant::now(), Report::Ended(lease, Ended { outcome: done.clone(), frozen: None }));
    assert!(!sent(&f.actions()).iter().any(|m| matches!(m, WorkerMsg::Finished { .. })), "not before the exec's end is acknowledged");
    assert_eq!(f.s.slot_states(), ["available"]);
    let a = f.frame(CoordMsg::ExecFinishedAck { lease, exec: 1 });
    assert!(sent(&a).iter().any(|m| matches!(m, WorkerMsg::Finished { .. })), "{a:?}");
}

/// An idle session closes by itself after its idle TTL, as `expired`.
#[tokio::test(start_paused = true)]
async fn an_idle_session_expires() {
    let mut f = fixture(1, 0);
    f.connect();
    let mut t = task(0);
    t.spec.session = Some(berth_shared::session::SessionSpec { idle_ttl_ms: 2_000, max_lifetime_ms: 3_600_000 });
    let lease = t.lease;
    f.assign(vec![t]);
    f.s.report(Instant::now(), Report::Started(lease));
    f.actions();
    advance(Duration::from_millis(1_999)).await;
    f.s.timeout(Instant::now()).expect("timeout");
    assert!(!f.actions().iter().any(|a| matches!(a, Action::Kill { .. })));
    advance(Duration::from_millis(1)).await;
    assert!(f.s.next_timeout().is_some_and(|t| t <= Instant::now()));
    f.s.timeout(Instant::now()).expect("timeout");
    assert!(f.actions().iter().any(|a| matches!(a, Action::Kill { reason: KillReason::TimedOut, .. })));
    if let Some(a) = f.s.attempt(lease) {
        a.spool.close();
    }
    let killed = Outcome { exit_code: None, signal: None, timed_out: true, killed: false, runtime_ms: 2_000, error: None };
    f.s.report(Instant::now(), Report::Ended(lease, Ended { outcome: killed, frozen: None }));
    let a = f.actions();
    let finished = sent(&a).into_iter().find_map(|m| match m {
        WorkerMsg::Finished { outcome, .. } => Some(outcome.clone()),
        _ => None,
    });
    let o = finished.expect("the session's end");
    assert!(o.timed_out && o.error.as_deref().is_some_and(|e| e.starts_with("expired: ") && e.contains("idle TTL")), "{o:?}");
}
