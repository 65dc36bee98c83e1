"""The examples run against the real cluster as a user would run them."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(cluster, *args):
    env = dict(os.environ, BERTH_PROFILE=str(cluster.profile))
    return subprocess.run([sys.executable, str(EXAMPLES / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=300)


def test_compute_backend(cluster):
    r = run_example(cluster, "compute_backend.py", "default")
    assert r.returncode == 0, r.stderr
    assert "exit 0" in r.stdout and ": 12; product.txt=12" in r.stdout, r.stdout


def test_rollout_of_200_trajectories_through_16_sessions(cluster):
    r = run_example(cluster, "rollout.py", "--pool", "default")
    assert r.returncode == 0, r.stderr
    assert "trajectories: 200 (200 ok, 0 failed) through 16 sessions" in r.stdout, r.stdout
    print(r.stdout)
