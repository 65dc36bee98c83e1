"""Sessions through the real coordinator and worker: exec exit codes, streams, stdin,
env, cwd and timeouts; started commands streamed, fed and cancelled; copies in and
out; close (idempotent, and on the way out of a ``with`` that raised)."""

import os
import threading
import time

import pytest

import berth
from conftest import wait_until

FREE = {"pool": "default"}  # the paid pool would need a budget


def test_exec_exit_codes_streams_env_cwd(client):
    with client.session(cpus=1, idle_ttl="5m", env={"S": "session"}, **FREE) as s:
        assert s.worker == "w1"
        r = s.exec("echo out; echo err >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, b"out\n", b"err\n", False)
        assert r.exec_no == 1 and 0 <= r.duration_s < 10
        r = s.exec(["sh", "-c", 'echo "$S $E"'], env={"E": "exec"}, text=True)
        assert r.stdout == "session exec\n" and r.ok
        s.exec("mkdir -p sub && echo here > sub/f", check=True)
        assert s.exec(["cat", "f"], cwd="sub").stdout == b"here\n"
        missing = s.exec(["no-such-program-xyz"])
        assert missing.exit_code == 127, missing
        t = s.exec("sleep 30", timeout=0.5)
        assert (t.exit_code, t.timed_out) == (124, True), t
        with pytest.raises(berth.ExecFailed) as e:
            s.exec("exit 9", check=True)
        assert e.value.result.exit_code == 9
        with pytest.raises(berth.InvalidSpec):
            s.exec("true", cwd="../out")
        assert s.exec("echo ok", input=b"ignored").stdout == b"ok\n"
        st = s.status()
        assert st["state"] in ("ready", "executing") and len(st["execs"]) >= 8


def test_stdin(client):
    with client.session(**FREE) as s:
        r = s.exec(["wc", "-c"], input=b"x" * 100_000)
        assert r.stdout.strip() == b"100000"
        h = s.start(["cat"], stdin=True)
        h.write(b"hello\n")
        lines = h.stream()
        assert next(lines) == berth.OutputLine("stdout", b"hello\n")
        h.write("world\n")
        assert next(lines).text == "world"
        h.close_stdin()
        assert list(lines) == []
        r = h.wait()
        assert (r.exit_code, r.stdout) == (0, b"hello\nworld\n")


def test_start_streams_lines_apart_as_they_arrive(client, cluster):
    gate = cluster.dir / "gate-stream"
    with client.session(**FREE) as s:
        h = s.start(f"echo one; echo two >&2; while [ ! -e {gate} ]; do sleep 0.02; done; printf 'three\\nfour'; exit 5")
        assert h.exec_no >= 1 and not h.done
        it = h.stream()
        first_two = {next(it), next(it)}  # before the gate: they arrived live
        assert first_two == {berth.OutputLine("stdout", b"one\n"), berth.OutputLine("stderr", b"two\n")}
        gate.touch()
        rest = list(it)
        assert [(l.stream, l.data) for l in rest] == [("stdout", b"three\n"), ("stdout", b"four")]
        r = h.wait()
        assert (r.exit_code, r.stdout, r.stderr) == (5, b"one\nthree\nfour", b"two\n")


def test_several_execs_at_once_and_cancel(client):
    with client.session(**FREE) as s:
        ticking = s.start("while :; do echo tick; sleep 0.05; done")
        quick = s.exec("echo quick")
        assert quick.stdout == b"quick\n"
        assert next(ticking.stream()).text == "tick"
        ticking.cancel()
        r = ticking.wait()
        assert r.exit_code != 0 and r.stdout.startswith(b"tick\n"), r
        execs = {e["exec"]: e for e in s.status()["execs"]}
        assert execs[ticking.exec_no]["ended_at"] is not None


def test_cancel_ends_a_command_that_prints_nothing(client):
    with client.session(**FREE) as s:
        silent = s.start("sleep 300")
        with pytest.raises(berth.WaitTimeout):
            silent.wait(timeout=0.3)
        started = time.monotonic()
        silent.cancel()
        r = silent.wait()
        assert r.exit_code != 0, r
        assert time.monotonic() - started < 30
        execs = {e["exec"]: e for e in s.status()["execs"]}
        assert execs[silent.exec_no]["ended_at"] is not None
        assert s.exec("echo still").stdout == b"still\n"


def test_upload_download_and_syncs(client, tmp_path):
    src = tmp_path / "proj"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.txt").write_text("alpha\n")
    (src / "run.sh").write_text("#!/bin/sh\necho ran > out.txt\n")
    os.chmod(src / "run.sh", 0o755)
    os.symlink("pkg/a.txt", src / "link")
    with client.session(workdir=src, **FREE) as s:
        assert s.exec("cat pkg/a.txt link && ./run.sh").stdout == b"alpha\nalpha\n"
        one = tmp_path / "one.txt"
        one.write_text("single\n")
        st = s.upload(one, "data/")  # not there yet: saved as data/
        assert st.files == 1
        s.exec("mkdir -p into")
        s.upload(one, "into")
        assert s.exec("cat data into/one.txt").stdout == b"single\nsingle\n"
        got = tmp_path / "got.txt"
        s.download("out.txt", got)
        assert got.read_text() == "ran\n"
        s.sync_out()
        assert (src / "out.txt").read_text() == "ran\n" and os.readlink(src / "link") == "pkg/a.txt"
        assert os.access(src / "run.sh", os.X_OK)
        with pytest.raises(berth.InvalidSpec):
            s.download("../etc/passwd", tmp_path / "x")
        with pytest.raises(berth.BerthError):
            s.download("no/such/file", tmp_path / "y")


def test_close_is_idempotent_and_exit_closes_on_an_exception(client):
    with pytest.raises(RuntimeError, match="boom"):
        with client.session(**FREE) as s:
            s.exec("true")
            raise RuntimeError("boom")
    assert s.closed
    st = wait_until("the session closed", lambda: (lambda st: st if st["state"] == "closed" else None)(s.status()))
    assert st["state"] == "closed"
    assert s.close() is True  # again: nothing to do
    assert client.close_session(s.id) is True  # and by id, from the coordinator's side
    with pytest.raises(berth.BerthError):
        s.exec("true")


def test_another_users_session_is_not_found(client, cluster, tmp_path):
    cluster.user("bob", "submitter", tmp_path / "bob.toml")
    with berth.Client(tmp_path / "bob.toml") as bob, client.session(**FREE) as s:
        with pytest.raises(berth.NotFound):
            bob._core.exec(s.id, ["true"])
        with pytest.raises(berth.NotFound):
            bob.close_session(s.id)


def test_threads_share_one_client(client):
    with client.session(**FREE) as s:
        results = {}
        errors = []

        def work(i: int) -> None:
            try:
                for j in range(5):
                    r = s.exec(["sh", "-c", f"echo {i}-{j}"])
                    results[(i, j)] = r.stdout
                job = client.submit(f"echo job{i}")
                results[("job", i)] = job.wait(timeout=60).ok and job.text() == f"job{i}\n"
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert all(results[(i, j)] == f"{i}-{j}\n".encode() for i in range(8) for j in range(5))
        assert all(results[("job", i)] for i in range(8))
