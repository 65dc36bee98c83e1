//! Tests of the scheduler as plain code: fit, fair share, spill delay, and that the
//! reason given for an unrunnable job is the check the scheduler applied.

use super::*;
use berth_shared::job::{Command, Executor, Resources};
use proptest::prelude::*;

fn spec(millicpus: u32, mem_mib: u64, gpus: u32) -> Arc<JobSpec> {
    let mut s = JobSpec::new(Command::Argv(vec!["true".into()]));
    s.resources = Resources { millicpus, mem_mib, gpus, gpu_model: None, min_vram_mib: None };
    s.max_runtime_ms = Some(60_000);
    Arc::new(s)
}

fn gpu(index: u32, model: &str, vram_mib: u64) -> GpuInfo {
    GpuInfo { index, uuid: format!("GPU-{index}"), model: model.into(), vram_mib }
}

fn caps(pool: &str) -> WorkerCaps {
    WorkerCaps {
        executors: vec!["process".into()],
        cpus: 64,
        mem_mib: 1 << 20,
        gpus: 8,
        pool: pool.into(),
        pool_free: true,
        labels: vec![],
        gpu_list: (0..8).map(|i| gpu(i, "NVIDIA H100 80GB HBM3", 81_559)).collect(),
        secrets: vec![],
    }
}

#[test]
fn secrets_run_only_where_declared_for_the_account() {
    use berth_shared::wire::SecretGrant;
    let mut spec = JobSpec::new(berth_shared::job::Command::Argv(vec!["true".into()]));
    spec.secrets = vec![("T".into(), "HF".into())];
    spec.account = Some("research".into());
    let none = caps("default");
    let any = WorkerCaps { secrets: vec![SecretGrant { name: "HF".into(), accounts: vec![] }], ..caps("default") };
    let theirs = WorkerCaps { secrets: vec![SecretGrant { name: "HF".into(), accounts: vec!["evals".into()] }], ..caps("default") };
    assert!(!none.can_run(&spec) && !theirs.can_run(&spec) && any.can_run(&spec));
    let why = explain_unrunnable(&spec, &[none, theirs]).expect("unrunnable");
    assert!(why.contains("no connected worker holds secret `HF` for account research"), "{why}");
}

fn cursor(job_seq: i64, account: &str, spec: Arc<JobSpec>, next: i64, end: i64) -> Candidate {
    Candidate { job_seq, account: account.into(), spec, queued_at_ms: 0, kind: Kind::Cursor { next, end } }
}

/// Runs a round to its end, placing every pick (as the store does when each insert
/// succeeds).
fn run(round: &mut Round<'_>) -> Vec<Pick> {
    let mut picks = Vec::new();
    while let Some(p) = round.next_pick() {
        round.placed(&p);
        picks.push(p);
    }
    picks
}

#[test]
fn a_cursor_hands_out_its_indices_in_order_and_says_where_it_stopped() {
    let pools = Pools::default();
    let c = caps("default");
    let mut round = Round::new(&c, &pools, None, 3, vec![cursor(7, "alice", spec(0, 0, 0), 10, 99)], &[], 0);
    let picks = run(&mut round);
    assert_eq!(picks.iter().map(|p| p.idx).collect::<Vec<_>>(), vec![10, 11, 12]);
    assert!(picks.iter().all(|p| p.attempt == 1 && !p.requeued));
    assert_eq!(round.finish(), RoundEnd { cursors: vec![(7, 13)], retry_in: None });
    // A cursor that reaches its end is written past it.
    let mut round = Round::new(&c, &pools, None, 10, vec![cursor(7, "alice", spec(0, 0, 0), 98, 99)], &[], 0);
    assert_eq!(run(&mut round).len(), 2);
    assert_eq!(round.finish().cursors, vec![(7, 100)]);
}

#[test]
fn a_pick_the_store_could_not_place_takes_no_resources_and_no_turn() {
    let pools = Pools::default();
    let c = caps("default");
    let free = FreeResources { millicpus: 1000, mem_mib: 1024, gpus: vec![] };
    let mut round = Round::new(&c, &pools, Some(free), 1, vec![cursor(1, "a", spec(1000, 0, 0), 0, 5)], &[], 0);
    let first = round.next_pick().expect("a pick");
    // Not placed (its task row existed already): the next index is offered instead.
    let second = round.next_pick().expect("the CPU is still free");
    assert_eq!((first.idx, second.idx), (0, 1));
    round.placed(&second);
    assert!(round.next_pick().is_none(), "one wanted, one placed");
    assert_eq!(round.finish().cursors, vec![(1, 2)]);
}

#[test]
fn requeued_tasks_keep_their_attempt_and_a_job_that_does_not_fit_is_skipped_whole() {
    let pools = Pools::default();
    let c = caps("default");
    let big = spec(0, 0, 9);
    let cands = vec![
        Candidate { job_seq: 1, account: "a".into(), spec: big.clone(), queued_at_ms: 0, kind: Kind::Requeued { idx: 3, attempt: 2 } },
        Candidate { job_seq: 1, account: "a".into(), spec: big, queued_at_ms: 0, kind: Kind::Requeued { idx: 4, attempt: 2 } },
        Candidate { job_seq: 2, account: "a".into(), spec: spec(0, 0, 1), queued_at_ms: 0, kind: Kind::Requeued { idx: 0, attempt: 3 } },
    ];
    let mut round = Round::new(&c, &pools, None, 5, cands, &[], 0);
    let picks = run(&mut round);
    assert_eq!(picks.len(), 1, "nine GPUs never fit an eight-GPU worker");
    assert_eq!((picks[0].job_seq, picks[0].idx, picks[0].attempt, picks[0].requeued), (2, 0, 3, true));
}

#[test]
fn accounts_take_turns_by_weight() {
    let pools = Pools::parse("[[account]]\nname = \"big\"\nweight = 3\n[[account]]\nname = \"small\"\nweight = 1\n").expect("weights");
    let c = caps("default");
    // Many claims of one task each, the running counts growing as they are placed.
    let mut running: Vec<(String, u64)> = vec![("big".into(), 0), ("small".into(), 0)];
    for _ in 0..400 {
        let cands = vec![cursor(1, "big", spec(0, 0, 0), 0, 1_000_000), cursor(2, "small", spec(0, 0, 0), 0, 1_000_000)];
        let mut round = Round::new(&c, &pools, None, 1, cands, &running, 0);
        let p = run(&mut round).pop().expect("one pick");
        running.iter_mut().find(|(a, _)| *a == p.account).expect("known account").1 += 1;
    }
    let (big, small) = (running[0].1, running[1].1);
    assert_eq!(big + small, 400);
    assert!(big.abs_diff(3 * small) <= 3, "weights 3:1 give {big}:{small}");
}

#[test]
fn a_costlier_pool_waits_for_the_spill_delay() {
    let pools =
        Pools::parse("[[pool]]\nname = \"lab\"\nkind = \"lan\"\n[[pool]]\nname = \"cloud\"\nkind = \"cloud\"\ngpu_usd_per_s = \"0.001\"\nspill_after_s = 30\n")
            .expect("pools");
    let c = WorkerCaps { pool: "cloud".into(), pool_free: false, ..caps("cloud") };
    let queued_at = 1_000_000;
    let early = Round::new(&c, &pools, None, 1, vec![Candidate { queued_at_ms: queued_at, ..cursor(1, "a", spec(0, 0, 1), 0, 0) }], &[], queued_at + 10_000);
    let mut early = early;
    assert!(early.next_pick().is_none(), "the lan pool has the first claim for 30 s");
    assert_eq!(early.finish().retry_in, Some(Duration::from_secs(20)));
    let mut late = Round::new(&c, &pools, None, 1, vec![Candidate { queued_at_ms: queued_at, ..cursor(1, "a", spec(0, 0, 1), 0, 0) }], &[], queued_at + 30_000);
    let p = late.next_pick().expect("past the spill delay");
    assert!(p.reason.contains("pool cloud (cloud): waited 30.0s"), "{}", p.reason);
    // A pool with no spill delay takes it at once.
    let lab = WorkerCaps { pool: "lab".into(), ..caps("lab") };
    let mut now = Round::new(&lab, &pools, None, 1, vec![cursor(1, "a", spec(0, 0, 1), 0, 0)], &[], 0);
    assert!(now.next_pick().expect("at once").reason.starts_with("pool lab (lan)"));
}

#[test]
fn every_unrunnable_reason_is_a_check_the_scheduler_applies() {
    let c = caps("default");
    let cases: Vec<(JobSpec, &str)> = vec![
        (
            {
                let mut s = (*spec(0, 0, 0)).clone();
                s.executor = Executor::Docker { image: "img:1".into(), network: None };
                s
            },
            "docker executor",
        ),
        ((*spec(0, 0, 9)).clone(), "asks for 9 GPUs; the most any connected worker has is 8"),
        (
            {
                let mut s = (*spec(0, 0, 1)).clone();
                s.resources.gpu_model = Some("A100".into());
                s
            },
            "(model `A100`); the most any connected worker has is 0",
        ),
        ((*spec(65_000, 0, 0)).clone(), "asks for 65 CPUs"),
        ((*spec(0, 2 << 20, 0)).clone(), "MiB of memory"),
        (
            {
                let mut s = (*spec(0, 0, 0)).clone();
                s.constraints = vec![("rack".into(), "b".into())];
                s
            },
            "label rack=b",
        ),
        (
            {
                let mut s = (*spec(0, 0, 0)).clone();
                s.pools = vec!["mars".into()];
                s
            },
            "in pool mars",
        ),
    ];
    for (s, want) in cases {
        assert!(!c.can_run(&s));
        let why = explain_unrunnable(&s, std::slice::from_ref(&c)).expect("unrunnable");
        assert!(why.contains(want), "{why} should say {want}");
        // The scheduler refuses it too.
        let pools = Pools::default();
        let mut round = Round::new(&c, &pools, None, 1, vec![cursor(1, "a", Arc::new(s), 0, 0)], &[], 0);
        assert!(round.next_pick().is_none());
    }
    assert_eq!(explain_unrunnable(&spec(0, 0, 0), &[]).as_deref(), Some("no worker is connected"));
}

fn arb_gpu() -> impl Strategy<Value = GpuInfo> {
    (0u32..16, prop::sample::select(vec!["NVIDIA H100", "NVIDIA A100", "RTX 4090"]), prop::sample::select(vec![24_000u64, 40_000, 80_000]))
        .prop_map(|(i, m, v)| gpu(i, m, v))
}

fn arb_spec() -> impl Strategy<Value = JobSpec> {
    (
        0u32..4000,
        0u64..8192,
        0u32..3,
        prop::option::of(prop::sample::select(vec!["H100", "A100", "4090"])),
        prop::option::of(prop::sample::select(vec![30_000u64, 60_000])),
    )
        .prop_map(|(millicpus, mem_mib, gpus, model, vram)| {
            let mut s = (*spec(millicpus, mem_mib, gpus)).clone();
            s.resources.gpu_model = model.map(str::to_string);
            s.resources.min_vram_mib = vram;
            s
        })
}

proptest! {
    #[test]
    fn a_round_never_over_commits_what_the_worker_has_free(
        specs in prop::collection::vec(arb_spec(), 1..12),
        millicpus in 0u32..16_000,
        mem_mib in 0u64..32_768,
        gpu_list in prop::collection::vec(arb_gpu(), 0..6),
        want in 1u32..40,
    ) {
        let mut gpu_list = gpu_list;
        gpu_list.sort_by_key(|g| g.index);
        gpu_list.dedup_by_key(|g| g.index);
        let c = WorkerCaps { cpus: 16, mem_mib: 32_768, gpus: gpu_list.len() as u32, gpu_list: gpu_list.clone(), ..caps("default") };
        let free = FreeResources { millicpus, mem_mib, gpus: gpu_list };
        let cands: Vec<Candidate> = specs.into_iter().enumerate().map(|(i, s)| cursor(i as i64, if i % 2 == 0 { "a" } else { "b" }, Arc::new(s), 0, 3)).collect();
        let pools = Pools::default();
        let mut round = Round::new(&c, &pools, Some(free.clone()), want, cands, &[], 0);
        let picks = run(&mut round);
        prop_assert!(picks.len() as u32 <= want);
        // Replaying the picks against what was free always succeeds: never over-committed.
        let mut left = free;
        for p in &picks {
            prop_assert!(left.take(&p.spec.resources).is_some(), "pick {:?} did not fit what was left", p.spec.resources);
        }
    }

    #[test]
    fn a_job_is_explained_unrunnable_exactly_when_no_worker_can_run_it(
        s in arb_spec(),
        gpu_lists in prop::collection::vec(prop::collection::vec(arb_gpu(), 0..3), 0..3),
    ) {
        let workers: Vec<WorkerCaps> = gpu_lists.into_iter().map(|g| WorkerCaps { cpus: 2, mem_mib: 4096, gpus: g.len() as u32, gpu_list: g, ..caps("default") }).collect();
        let runnable = workers.iter().any(|w| w.can_run(&s));
        let why = explain_unrunnable(&s, &workers);
        prop_assert_eq!(why.is_none(), runnable);
        // With one worker, whatever refused the job is named: never the catch-all.
        if let (Some(why), [_]) = (&why, workers.as_slice()) {
            prop_assert!(!why.contains("everything it asks for at once"), "{}", why);
        }
    }
}
