"""The asyncio API: many sessions and execs on one event loop and one connection."""

import asyncio
import time

import pytest

import berth
import berth.aio


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


def test_32_concurrent_sessions_on_one_loop(cluster):
    async def main():
        client = await berth.aio.connect(cluster.profile)
        try:

            async def trajectory(i: int):
                async with client.session(pool="default", idle_ttl="2m") as s:
                    outs = []
                    for step in range(3):
                        r = await s.exec(["sh", "-c", f"echo {i}:{step}; echo e >&2"])
                        assert (r.exit_code, r.stderr) == (0, b"e\n"), r
                        outs.append(r.stdout)
                    h = await s.start(f"echo a{i}; echo b{i} >&2; exit {i % 4}")
                    lines = [(l.stream, l.text) async for l in h.stream()]
                    r = await h.wait()
                    return outs, lines, r.exit_code, s

            t = time.monotonic()
            results = await asyncio.gather(*(trajectory(i) for i in range(32)))
            elapsed = time.monotonic() - t
            for i, (outs, lines, code, s) in enumerate(results):
                assert outs == [f"{i}:{k}\n".encode() for k in range(3)]
                assert sorted(lines) == sorted([("stdout", f"a{i}"), ("stderr", f"b{i}")])
                assert code == i % 4 and s.closed
            return elapsed
        finally:
            client.close()

    elapsed = run(main())
    assert elapsed < 120


def test_jobs_stdin_copies_and_errors(cluster, tmp_path):
    async def main():
        async with berth.aio.Client(cluster.profile) as client:
            job = await client.submit("echo async-job", max_runtime="1m")
            r = await job.wait(timeout=30)
            assert r.ok
            assert await job.text() == "async-job\n"
            assert [c async for c in job.logs()] == [b"async-job\n"]
            with pytest.raises(berth.NotFound):
                await client.job("00000000").wait()
            (tmp_path / "in.txt").write_text("data\n")
            s = await client.session(pool="default")
            try:
                await s.upload(tmp_path / "in.txt", "in.txt")
                h = await s.start(["sh", "-c", "cat in.txt -"], stdin=True)
                await h.write(b"more\n")
                await h.close_stdin()
                r = await h.wait()
                assert r.stdout == b"data\nmore\n"
                await s.exec("echo x > made.txt")
                await s.download("made.txt", tmp_path / "made.txt")
                assert (tmp_path / "made.txt").read_text() == "x\n"
                assert (await s.exec("exit 4")).exit_code == 4
            finally:
                assert await s.close() is False
                assert await s.close() is True

            # The body raising still closes the session.
            with pytest.raises(ValueError):
                async with client.session(pool="default") as s2:
                    raise ValueError("inside")
            assert s2.closed

            # A cancelled await drops the request and the loop goes on.
            job = await client.submit("sleep 30", max_runtime="1m")
            task = asyncio.ensure_future(job.wait())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await job.cancel()
            assert (await job.wait(timeout=30)).state == "cancelled"

    run(main())
