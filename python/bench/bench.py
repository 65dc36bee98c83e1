"""Python client against the Rust client, side by side in one run on one cluster.

    python python/bench/bench.py [--bins target/release] [--execs 500] [--submits 1000] [--log-mib 1024]

Starts a coordinator and worker (the binaries in --bins) as the tests do, then measures:
- exec round trip of `true` on an open session: Python (berth.Session.exec) against the
  Rust client library on the same connection (Core.bench_exec: the loop in Rust) and
  against the `berth exec` CLI (a process per exec, for scale);
- single submissions per second from one Python process over one connection (sync in a
  thread pool, and asyncio);
- reading one job's output of --log-mib MiB: Job.logs() against the Rust library
  (Core.bench_logs) and `berth logs` to /dev/null.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import berth  # noqa: E402
import berth.aio  # noqa: E402
from conftest import Cluster  # noqa: E402


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def ms(x):
    return f"{x * 1000:.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bins", default=str(HERE.parents[1] / "target" / "release"))
    ap.add_argument("--execs", type=int, default=500)
    ap.add_argument("--submits", type=int, default=1000)
    ap.add_argument("--log-mib", type=int, default=1024)
    a = ap.parse_args()
    os.environ["BERTH_BIN_DIR"] = a.bins
    berth_cli = Path(a.bins) / "berth"
    c = Cluster(slots=8)
    rows = []
    try:
        client = berth.Client(c.profile)
        # --- exec round trip
        with client.session(pool="default") as s:
            for _ in range(20):
                s.exec(["true"])
            py = []
            for _ in range(a.execs):
                t = time.perf_counter()
                s.exec(["true"])
                py.append(time.perf_counter() - t)
            rust = client._core.bench_exec(s.id, ["true"], a.execs)
            py2 = []
            for _ in range(a.execs):
                t = time.perf_counter()
                s.exec(["true"])
                py2.append(time.perf_counter() - t)
            py = py + py2  # before and after the Rust loop, against drift
            rows.append(("exec round trip p50", ms(statistics.median(py)), ms(statistics.median(rust)), f"{(statistics.median(py) - statistics.median(rust)) * 1000:+.3f} ms", "within 0.5 ms"))
            rows.append(("exec round trip p99", ms(pct(py, 0.99)), ms(pct(rust, 0.99)), "", ""))
            if berth_cli.exists():
                env = dict(os.environ, BERTH_PROFILE=str(c.profile))
                cli = []
                for _ in range(min(50, a.execs)):
                    t = time.perf_counter()
                    subprocess.run([str(berth_cli), "exec", s.id, "--", "true"], env=env, check=True)
                    cli.append(time.perf_counter() - t)
                rows.append(("exec via `berth exec` (a process each) p50", "", ms(statistics.median(cli)), "", "for scale"))
        # --- submissions per second over one connection
        n = a.submits
        with ThreadPoolExecutor(16) as pool:
            t = time.perf_counter()
            list(pool.map(lambda i: client.submit(["true"], name=f"b{i}"), range(n)))
            sync_rate = n / (time.perf_counter() - t)

        async def submit_all():
            ac = berth.aio.Client(c.profile)
            sem = asyncio.Semaphore(30)  # the coordinator takes 32 requests at once per connection

            async def one(i):
                async with sem:
                    await ac.submit(["true"], name=f"a{i}")

            t = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            r = n / (time.perf_counter() - t)
            ac.close()
            return r

        aio_rate = asyncio.run(submit_all())
        rows.append(("single submissions/s, threads (16)", f"{sync_rate:.0f}/s", "", "", ">= 1000/s"))
        rows.append(("single submissions/s, asyncio", f"{aio_rate:.0f}/s", "", "", ">= 1000/s"))
        # --- logs of a large output
        mib = a.log_mib
        job = client.submit(["sh", "-c", f"head -c {mib}M /dev/zero | tr '\\0' x"], max_output=f"{mib + 16}M", max_runtime="30m")
        assert job.wait(timeout=1800).ok, job.status()
        t = time.perf_counter()
        got = sum(len(d) for d in job.logs())
        py_s = time.perf_counter() - t
        t = time.perf_counter()
        got_rust = client._core.bench_logs(job.id)
        rust_s = time.perf_counter() - t
        assert got == got_rust == mib << 20, (got, got_rust)
        rows.append((f"logs of {mib} MiB: Python / Rust library", f"{mib / py_s:.0f} MiB/s", f"{mib / rust_s:.0f} MiB/s", f"{rust_s / py_s:.0%}", ">= 80%"))
        if berth_cli.exists():
            env = dict(os.environ, BERTH_PROFILE=str(c.profile))
            t = time.perf_counter()
            subprocess.run([str(berth_cli), "logs", job.id], env=env, check=True, stdout=subprocess.DEVNULL)
            cli_s = time.perf_counter() - t
            rows.append((f"logs of {mib} MiB: Python / `berth logs`", f"{mib / py_s:.0f} MiB/s", f"{mib / cli_s:.0f} MiB/s", f"{cli_s / py_s:.0%}", ">= 80%"))
        client.close()
    finally:
        c.stop()
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'python':>14}  {'rust':>14}  {'diff/ratio':>11}  target")
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:>14}  {r[2]:>14}  {r[3]:>11}  {r[4]}")
    print(f"binaries: {a.bins}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
