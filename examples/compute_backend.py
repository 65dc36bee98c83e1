"""A compute backend for an evaluation harness, on berth: ``run(workdir, command)``
runs one command over a directory and returns its result; ``session(workdir)`` keeps
a sandbox for many commands. Profile: $BERTH_PROFILE (or the CLI's default place)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import berth


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float


class BerthBackend:
    def __init__(self, profile: Optional[str] = None, *, cpus: float = 1, mem: str = "2G", image: Optional[str] = None, pool: Optional[str] = None):
        self.client = berth.Client(profile)
        self.options = dict(cpus=cpus, mem=mem, image=image, pool=pool)

    def run(self, workdir: str, command: str, timeout: float = 600) -> Result:
        """Uploads workdir, runs command in it, brings the changed files back."""
        with self.session(workdir) as s:
            r = s.exec(command, timeout=timeout, text=True)
            s.sync_out()
            return Result(r.exit_code, r.stdout, r.stderr, r.duration_s)

    @contextlib.contextmanager
    def session(self, workdir: str, idle_ttl: str = "15m") -> Iterator[berth.Session]:
        """A sandbox holding workdir's contents; closed on the way out, even on error."""
        with self.client.session(workdir=workdir, idle_ttl=idle_ttl, **self.options) as s:
            yield s

    def close(self) -> None:
        self.client.close()


if __name__ == "__main__":
    import sys
    import tempfile

    backend = BerthBackend(pool=sys.argv[1] if len(sys.argv) > 1 else None)
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/input.txt", "w") as f:
            f.write("3 4\n")
        r = backend.run(d, "read a b < input.txt; echo $((a * b)) | tee product.txt")
        print(f"exit {r.exit_code} in {r.duration_s:.3f}s: {r.stdout.strip()}; product.txt={open(f'{d}/product.txt').read().strip()}")
    backend.close()
