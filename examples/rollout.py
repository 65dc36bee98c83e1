"""A rollout: 200 trajectories through 16 concurrent sessions on one event loop and one
connection (berth.aio). Each trajectory takes a session from the pool, runs a few steps
in its hot workspace, and gives it back; a summary is printed at the end.

    BERTH_PROFILE=/tmp/berth/profile.toml python examples/rollout.py [--pool default]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import berth
import berth.aio


async def trajectory(i: int, pool: asyncio.Queue, steps: int) -> dict:
    s = await pool.get()  # a slot acquired by this trajectory
    try:
        t0 = time.monotonic()
        await s.exec(["sh", "-c", f"rm -rf traj && mkdir traj && echo {i} > traj/seed"], check=True)
        reward = 0
        for step in range(steps):
            r = await s.exec(["sh", "-c", f"echo $(( $(cat traj/seed) * {step + 1} % 7 )) | tee -a traj/log"], text=True)
            reward += int(r.stdout.strip() or 0) if r.ok else 0
        return {"i": i, "reward": reward, "seconds": time.monotonic() - t0, "ok": True}
    except berth.BerthError as e:
        return {"i": i, "reward": 0, "seconds": 0.0, "ok": False, "error": str(e)}
    finally:
        pool.put_nowait(s)


async def main(n: int, width: int, steps: int, pool_name: str | None, cpus: float | None) -> None:
    t0 = time.monotonic()
    client = await berth.aio.connect()
    sessions = await asyncio.gather(*(client.session(cpus=cpus, idle_ttl="5m", pool=pool_name) for _ in range(width)))
    opened = time.monotonic() - t0
    pool: asyncio.Queue = asyncio.Queue()
    for s in sessions:
        pool.put_nowait(s)
    try:
        results = await asyncio.gather(*(trajectory(i, pool, steps) for i in range(n)))
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
        client.close()
    wall = time.monotonic() - t0
    ok = [r for r in results if r["ok"]]
    secs = sorted(r["seconds"] for r in ok)
    print(f"trajectories: {len(results)} ({len(ok)} ok, {len(results) - len(ok)} failed) through {width} sessions")
    print(f"execs: {len(ok) * (steps + 1)} in {wall:.2f}s wall ({len(ok) * (steps + 1) / wall:.0f}/s); sessions opened in {opened:.2f}s")
    if secs:
        print(f"trajectory seconds: p50 {statistics.median(secs):.3f}, p90 {secs[int(len(secs) * 0.9) - 1]:.3f}, max {secs[-1]:.3f}")
        print(f"mean reward: {statistics.mean(r['reward'] for r in ok):.2f}")
    for r in results:
        if not r["ok"]:
            print(f"  trajectory {r['i']} failed: {r['error']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trajectories", type=int, default=200)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pool", default=None, help="only this pool (e.g. default, to stay on free workers)")
    ap.add_argument("--cpus", type=float, default=None, help="CPUs set aside for each session (default: none)")
    a = ap.parse_args()
    asyncio.run(main(a.trajectories, a.sessions, a.steps, a.pool, a.cpus))
