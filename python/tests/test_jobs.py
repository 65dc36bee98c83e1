"""Jobs through the real coordinator and worker: submit, wait, logs, cancel, arrays,
listing, the budget."""

from decimal import Decimal

import pytest

import berth
from conftest import wait_until


def test_submit_wait_and_logs(client):
    job = client.submit(["sh", "-c", "echo out; echo err >&2; exit 7"], name="py-one", max_runtime="1m", env={"X": "1"})
    assert len(job.id) == 36 and job.tasks == 1
    r = job.wait(timeout=30)
    assert (r.state, r.exit_code, r.ok, r.failed) == ("failed", 7, False, 1), r
    chunks = list(job.output())
    assert {(c.stream, c.data) for c in chunks} == {("stdout", b"out\n"), ("stderr", b"err\n")}
    assert sorted(job.lines()) == ["err", "out"]
    st = job.status()
    assert st["name"] == "py-one" and st["exit_code"] == 7


def test_script_env_and_follow_streams_live(client, cluster):
    gate = cluster.dir / "gate-follow"
    job = client.submit(script=f'echo "x=$X"; while [ ! -e {gate} ]; do sleep 0.02; done; echo after', env={"X": "42"}, max_runtime="1m")
    logs = job.logs(follow=True)
    first = next(logs)  # arrives while the job still runs
    assert first == b"x=42\n"
    gate.touch()
    assert b"".join(logs) == b"after\n"
    assert job.wait(timeout=30).ok


def test_an_array_counts_its_tasks(client):
    job = client.submit('echo "task $BERTH_ARRAY_INDEX"; [ "$BERTH_ARRAY_INDEX" != 3 ]', array="1-5", max_runtime="1m")
    assert job.tasks == 5
    r = job.wait(timeout=60)
    assert (r.state, r.succeeded, r.failed, r.exit_code) == ("failed", 4, 1, 1), r
    assert job.text(index=2) == "task 2\n"
    assert client.submit("true", array=range(0, 3)).tasks == 3
    assert client.submit("true", array=(1, 2)).wait(timeout=30).succeeded == 2


def test_cancel_ends_a_running_job(client):
    job = client.submit("echo started; sleep 60", max_runtime="5m")
    logs = job.logs(follow=True)
    assert next(logs) == b"started\n"
    assert job.cancel(reason="test") == 1
    r = job.wait(timeout=30)
    assert r.state == "cancelled", r


def test_wait_times_out_and_the_job_goes_on(client):
    job = client.submit("sleep 30", max_runtime="1m")
    with pytest.raises(berth.WaitTimeout) as e:
        job.wait(timeout=0.3)
    assert isinstance(e.value, TimeoutError) and e.value.code == 124
    job.cancel()


def test_jobs_lists_and_filters(client):
    job = client.submit("true", name="listed", max_runtime="1m")
    job.wait(timeout=30)
    rows = client.jobs(limit=500)
    assert any(r["id"] == job.id and r["name"] == "listed" and r["state"] == "succeeded" for r in rows)
    assert all(r["state"] == "succeeded" for r in client.jobs(state="succeeded", limit=500))
    with pytest.raises(ValueError):
        client.jobs(state="nonsense")


def test_idempotency_key_returns_the_first_job(client):
    key = "0192f3aa-0000-7000-8000-000000000001"
    a = client.submit("true", idempotency_key=key)
    b = client.submit("true", idempotency_key=key)
    assert a.id == b.id and b.duplicate and not a.duplicate


def test_after_runs_a_job_once_its_parent_succeeded(client):
    parent = client.submit("echo parent", max_runtime="1m")
    child = client.submit("echo child", after=parent, max_runtime="1m")
    assert child.wait(timeout=30).ok and parent.wait(timeout=30).ok
    assert child.text() == "child\n"


def test_a_refused_budget_raises_with_its_window_and_numbers(client, admin):
    # No budget at all: the run window, cap 0, the estimate (1 CPU x 100 s x $0.01).
    with pytest.raises(berth.Refused) as e:
        client.submit("true", pool="cloud", cpus=1, max_runtime=100, attempts=1, account="research")
    assert (e.value.window, e.value.account, e.value.cap, e.value.estimate) == ("run", "research", Decimal(0), Decimal("1.00")), e.value.message
    assert e.value.code == 3 and e.value.budget and not isinstance(e.value, berth.Unauthorized)
    # Over the per-run cap.
    admin.set_budget("research", "0.5", "100")
    with pytest.raises(berth.Refused) as e:
        client.submit("true", pool="cloud", cpus=1, max_runtime=100, attempts=1, account="research")
    assert (e.value.window, e.value.cap, e.value.estimate) == ("run", Decimal("0.5"), Decimal("1.00")), e.value.message
    # Over the month: reserved + spent + estimate > cap.
    admin.set_budget("research", "10", "1.5")
    with pytest.raises(berth.Refused) as e:
        client.submit("true", pool="cloud", cpus=1, max_runtime=200, attempts=1, account="research")
    v = e.value
    assert (v.window, v.cap, v.estimate, v.reserved, v.spent) == ("month", Decimal("1.5"), Decimal("2.00"), Decimal(0), Decimal(0)), v.message
    assert v.month and len(v.month) == 7
    b = admin.budget("research")
    assert (b.run_cap, b.month_cap) == (Decimal("10"), Decimal("1.5"))
    assert any(r.account == "research" for r in admin.budget())
    with pytest.raises(berth.NotFound):
        client.budget()  # a submitter sees its own account, which has none


def test_authorisation_is_refused_as_unauthorized(client):
    with pytest.raises(berth.Unauthorized) as e:
        client.set_budget("research", 1, 1)
    assert isinstance(e.value, berth.Refused) and e.value.code == 3 and "submitter" in e.value.message


def test_not_found_and_invalid(client):
    with pytest.raises(berth.NotFound) as e:
        client.job("0000000000").wait(timeout=5)
    assert isinstance(e.value, LookupError) and e.value.code == 5
    with pytest.raises(berth.InvalidSpec) as e2:
        client.submit("true", array="5-1")
    assert e2.value.code == 2 and isinstance(e2.value, ValueError)
    with pytest.raises(berth.InvalidSpec):
        client.submit()
    with pytest.raises(ValueError):
        client.submit("true", max_runtime="forever")
