"""A real cluster for the tests: ``berth-coordinator`` and ``berth-worker`` (the
workspace's debug builds, or ``$BERTH_BIN_DIR``) on loopback, port 0, in a temporary
directory with its own CA, a submitter's profile and an admin's. Every wait polls a
condition with a deadline; the processes are killed when the session's tests end, and
their logs are printed when a test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

import berth

ROOT = Path(__file__).resolve().parents[2]

# One paid pool (`cloud`, $0.01 per vCPU-second) beside the free `default` the worker joins.
POOLS = """
[[pool]]
name = "cloud"
kind = "cloud"
vcpu_usd_per_s = "0.01"
"""


def bin_dir() -> Path:
    d = Path(os.environ.get("BERTH_BIN_DIR", ROOT / "target" / "debug"))
    for b in ("berth-coordinator", "berth-worker"):
        if not (d / b).exists():
            raise RuntimeError(f"{d / b} is not built: run `cargo build -p berth-coordinator -p berth-worker` first (or set BERTH_BIN_DIR)")
    return d


def wait_until(what: str, cond: Callable[[], object], timeout: float = 30.0, every: float = 0.02) -> object:
    """Polls ``cond`` until it returns something true; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - a condition that cannot be checked yet
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))
        time.sleep(every)


class Cluster:
    def __init__(self, slots: int = 40) -> None:
        self.bins = bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="berth-py-"))
        os.chmod(self.dir, 0o1777)  # jobs run as slot users of their own
        self.data = self.dir / "coord"
        self.procs: List[subprocess.Popen] = []
        self.logs: Dict[str, Path] = {}
        self.run([self.bins / "berth-coordinator", "init", "--data-dir", self.data])
        (self.dir / "pools.toml").write_text(POOLS)
        self.addr = self.start_coordinator()
        self.profile = self.dir / "alice.toml"
        self.admin_profile = self.dir / "admin.toml"
        self.user("alice", "submitter", self.profile)
        self.user("root", "admin", self.admin_profile)
        self.start_worker("w1", slots)

    def run(self, argv: List[object]) -> str:
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{argv} exited {r.returncode}: {r.stderr}")
        return r.stdout

    def start_coordinator(self) -> str:
        log = self.dir / "coordinator.log"
        self.logs["coordinator"] = log
        env = dict(os.environ, BERTH_LOG="info", NO_COLOR="1")
        p = subprocess.Popen(
            [str(self.bins / "berth-coordinator"), "run", "--data-dir", str(self.data), "--listen", "127.0.0.1:0", "--lease-ttl", "30s", "--pools", str(self.dir / "pools.toml")],
            stdout=subprocess.PIPE,
            stderr=open(log, "wb"),
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.procs.append(p)
        found: Dict[str, str] = {}

        def read() -> None:
            assert p.stdout is not None
            for line in p.stdout:
                if line.startswith("ready addr=") and "addr" not in found:
                    found["addr"] = line.strip()[len("ready addr=") :]

        threading.Thread(target=read, daemon=True).start()
        wait_until("the coordinator's ready line", lambda: found.get("addr") or (p.poll() is not None and _raise(f"the coordinator exited {p.returncode}: {log.read_text()}")))
        return found["addr"]

    def user(self, name: str, role: str, out: Path) -> None:
        self.run([self.bins / "berth-coordinator", "user", "add", name, "--role", role, "--coordinator", self.addr, "--data-dir", self.data, "--out", out])

    def start_worker(self, name: str, slots: int) -> None:
        token = self.run([self.bins / "berth-coordinator", "token", "create", "--role", "worker", "--data-dir", self.data]).strip()
        log = self.dir / f"worker-{name}.log"
        self.logs[f"worker {name}"] = log
        env = dict(os.environ, BERTH_LOG="info", NO_COLOR="1")
        p = subprocess.Popen(
            [str(self.bins / "berth-worker"), "--coordinator", self.addr, "--ca", str(self.data / "ca.pem"), "--work-dir", str(self.dir / f"w-{name}"),
             "--slots", str(slots), "--name", name, "--join-token", token],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self.procs.append(p)
        with berth.Client(self.profile) as c:
            wait_until(f"worker {name} connected", lambda: any(w["name"] == name and w["connected"] for w in c.workers()) or (p.poll() is not None and _raise(f"worker exited: {log.read_text()}")))

    def log_text(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.read_text(errors='replace')[-20000:]}" for n, p in self.logs.items() if p.exists())

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _raise(msg: str) -> bool:
    raise RuntimeError(msg)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[berth.Client]:
    with berth.Client(cluster.profile) as c:
        yield c


@pytest.fixture
def admin(cluster: Cluster) -> Iterator[berth.Client]:
    with berth.Client(cluster.admin_profile) as c:
        yield c


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and call.when == "call":
        c = item.funcargs.get("cluster")
        if c is not None:
            rep.sections.append(("berth logs", c.log_text()))
