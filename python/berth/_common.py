"""What the synchronous and the asyncio APIs share: argument conversion, result
types, and the reading of an exec's stream."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import _berth
from .errors import BerthError

Command = Union[str, Sequence[str]]
Duration = Union[str, int, float, None]
Size = Union[str, int, None]

__all__ = ["JobResult", "CommandResult", "OutputLine", "OutputChunk", "CopyStats", "Budget"]


def duration_ms(what: str, d: Duration) -> Optional[int]:
    """A duration: a number of seconds, or text as the CLI takes it (``30s``, ``5m``, ``1h30m``)."""
    if d is None:
        return None
    if isinstance(d, bool):
        raise TypeError(f"{what}: a duration is seconds or text such as '5m'")
    if isinstance(d, (int, float)):
        if d <= 0:
            raise ValueError(f"{what}={d!r} must be more than zero")
        return max(1, int(round(d * 1000)))
    return _berth.parse_duration_ms(str(d))


def size_text(what: str, s: Size) -> Optional[str]:
    """A size: text as the CLI takes it (``512M``, ``4G``) or an int of MiB."""
    if s is None:
        return None
    if isinstance(s, bool):
        raise TypeError(f"{what}: a size is text such as '4G' or an int of MiB")
    if isinstance(s, int):
        return f"{s}M"
    return str(s)


def bytes_text(what: str, s: Size) -> Optional[str]:
    """A size in bytes: text (``100M``) or an int of bytes."""
    if s is None:
        return None
    if isinstance(s, int) and not isinstance(s, bool):
        return str(s)
    return str(s)


def pairs(what: str, m: Optional[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    if not m:
        return []
    if not isinstance(m, Mapping):
        raise TypeError(f"{what} is a mapping of names to values")
    return [(str(k), str(v)) for k, v in m.items()]


def names(v: Union[str, Iterable[str], None]) -> List[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return [str(x) for x in v]


def argv(cmd: Command) -> List[str]:
    """A command: a list of arguments as it is, or a string run by ``sh -c``."""
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    out = [os.fspath(a) if not isinstance(a, str) else a for a in cmd]
    if not out:
        raise ValueError("the command is empty")
    return out


def array_text(a: Any) -> Optional[str]:
    """An array: ``"1-100"``, a (start, end) pair (both included), a ``range``, or N (0 to N-1)."""
    if a is None:
        return None
    if isinstance(a, str):
        return a
    if isinstance(a, range):
        if a.step != 1 or len(a) == 0:
            raise ValueError("an array range steps by 1 and is not empty")
        return f"{a.start}-{a.stop - 1}"
    if isinstance(a, int) and not isinstance(a, bool):
        if a < 1:
            raise ValueError("an array has at least one task")
        return f"0-{a - 1}"
    start, end = a
    return f"{int(start)}-{int(end)}"


def after_text(after: Any) -> List[str]:
    """Parents: a Job, a job id (``ID``, ``ID:ok``, ``ID:any``), or a list of them."""
    if after is None:
        return []
    if isinstance(after, (str,)) or hasattr(after, "id"):
        after = [after]
    return [a if isinstance(a, str) else a.id for a in after]


def loads(text: str) -> Any:
    return json.loads(text)


@dataclass(frozen=True)
class JobResult:
    """How a job ended: its state (``succeeded``, ``failed``, ...), its exit code
    (an array's: 0 when every task succeeded, else the first failing code), and the
    count of tasks in each state."""

    job: str
    state: str
    exit_code: Optional[int]
    counts: Dict[str, int]

    @property
    def ok(self) -> bool:
        """Whether every task succeeded."""
        return self.state == "succeeded"

    @property
    def succeeded(self) -> int:
        return self.counts.get("succeeded", 0)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)


@dataclass(frozen=True)
class CommandResult:
    """An exec's end: ``exit_code`` as ``berth exec`` exits (its own, 124 when it
    timed out, 125 when it could not run), its stdout and stderr (bytes, or str when
    run with ``text=True``), and how long it ran (``duration_s``, measured on the
    worker). ``reason`` says why when it did not simply exit."""

    exit_code: int
    stdout: Any
    stderr: Any
    duration_s: float
    exec_no: int = 0
    timed_out: bool = False
    reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def returncode(self) -> int:
        """As subprocess calls it."""
        return self.exit_code

    def check(self) -> "CommandResult":
        """Raises ``berth.ExecFailed`` unless the command exited 0; returns self."""
        if self.exit_code != 0:
            raise ExecFailed(self)
        return self


class ExecFailed(BerthError):
    """An exec run with ``check=True`` did not exit 0; ``result`` is its CommandResult."""

    def __init__(self, result: CommandResult) -> None:
        why = f" ({result.reason})" if result.reason else ""
        super().__init__(f"exec {result.exec_no} exited {result.exit_code}{why}", 1)
        self.result = result


@dataclass(frozen=True)
class OutputLine:
    """One line of a command's output: ``stream`` is ``"stdout"`` or ``"stderr"``;
    ``data`` holds the line's bytes with its newline (the last line may lack one)."""

    stream: str
    data: bytes

    @property
    def text(self) -> str:
        """The line as text (UTF-8, undecodable bytes replaced), without its newline."""
        return self.data.decode("utf-8", "replace").rstrip("\n")

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class OutputChunk:
    """A piece of output as it was stored: ``stream`` is ``"stdout"`` or ``"stderr"``."""

    stream: str
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class CopyStats:
    """What a copy moved."""

    files: int
    dirs: int
    symlinks: int
    bytes: int


@dataclass(frozen=True)
class Budget:
    """An account's caps and this month's use, in USD (exact Decimals)."""

    account: str
    month: str
    run_cap: Decimal
    month_cap: Decimal
    reserved: Decimal
    spent: Decimal

    @property
    def remaining(self) -> Decimal:
        """What the month's cap still allows."""
        return max(Decimal(0), self.month_cap - self.reserved - self.spent)

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> "Budget":
        return cls(
            d["account"], d["month"], Decimal(d["run_cap"]), Decimal(d["month_cap"]), Decimal(d["reserved"]), Decimal(d["spent"])
        )


STREAMS = {1: "stdout", 2: "stderr"}


class ExecReader:
    """Reads one exec's stream items: gathers its output (for ``wait``), splits it into
    lines per stream (for ``stream``), counts chunks (to pick up after a cancel), and
    keeps its end."""

    def __init__(self, text: bool = False) -> None:
        self.exec_no = 0
        self.chunks = [0, 0]
        self.out: List[bytearray] = [bytearray(), bytearray()]
        self.partial: List[bytearray] = [bytearray(), bytearray()]
        self.end: Optional[Tuple[Any, ...]] = None
        self.text = text

    def feed(self, items: List[Tuple[Any, ...]], lines: Optional[List[OutputLine]] = None) -> None:
        """Takes a batch of items; with ``lines``, appends the whole lines they complete."""
        for it in items:
            kind = it[0]
            if kind == "out":
                i = it[1] - 1
                data = it[2]
                self.chunks[i] += 1
                self.out[i] += data
                if lines is not None:
                    buf = self.partial[i]
                    buf += data
                    start = 0
                    while True:
                        nl = buf.find(b"\n", start)
                        if nl < 0:
                            break
                        lines.append(OutputLine(STREAMS[it[1]], bytes(buf[start : nl + 1])))
                        start = nl + 1
                    del buf[:start]
            elif kind == "started":
                self.exec_no = it[1]
            elif kind == "ended":
                self.end = it
                if lines is not None:
                    for i, buf in enumerate(self.partial):
                        if buf:
                            lines.append(OutputLine(STREAMS[i + 1], bytes(buf)))
                            buf.clear()
            elif kind == "error":
                raise it[1]

    def result(self) -> CommandResult:
        assert self.end is not None
        _, n, code, _raw, timed_out, runtime_ms, reason = self.end
        out, err = bytes(self.out[0]), bytes(self.out[1])
        if self.text:
            return CommandResult(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), runtime_ms / 1000.0, n, timed_out, reason)
        return CommandResult(code, out, err, runtime_ms / 1000.0, n, timed_out, reason)


def command_result(t: Tuple[Any, ...], text: bool) -> CommandResult:
    n, code, out, err, runtime_ms, timed_out, reason = t
    if text:
        out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    return CommandResult(code, out, err, runtime_ms / 1000.0, n, timed_out, reason)


def shell_join(cmd: Command) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(list(cmd))


def submit_kwargs(
    command: Optional[Command],
    script: Optional[str],
    *,
    name: Optional[str],
    array: Any,
    image: Optional[str],
    network: Optional[str],
    cpus: Optional[float],
    mem: Size,
    gpus: Optional[int],
    gpu_model: Optional[str],
    min_vram: Size,
    max_runtime: Duration,
    attempts: Optional[int],
    env: Optional[Mapping[str, Any]],
    secrets: Optional[Mapping[str, str]],
    account: Optional[str],
    pool: Union[str, Iterable[str], None],
    after: Any,
    priority: Optional[int],
    max_output: Size,
    constraints: Optional[Mapping[str, str]],
    idempotency_key: Optional[str],
) -> Dict[str, Any]:
    """The native ``submit``'s arguments from the Python ones."""
    argv_: Optional[List[str]] = None
    if command is not None:
        if isinstance(command, str):
            if script is not None:
                raise ValueError("give either a command or script=, not both")
            script = command
        else:
            argv_ = argv(command)
    return dict(
        command=argv_,
        script=script,
        name=name,
        array=array_text(array),
        image=image,
        network=network,
        cpus=None if cpus is None else float(cpus),
        mem=size_text("mem", mem),
        gpus=gpus,
        gpu_model=gpu_model,
        min_vram=size_text("min_vram", min_vram),
        max_runtime_ms=duration_ms("max_runtime", max_runtime),
        attempts=attempts,
        env=pairs("env", env),
        secrets=pairs("secrets", secrets),
        account=account,
        pools=names(pool),
        after=after_text(after),
        priority=priority,
        max_output=bytes_text("max_output", max_output),
        constraints=pairs("constraints", constraints),
        idempotency_key=None if idempotency_key is None else str(idempotency_key),
    )


def session_kwargs(
    *,
    name: Optional[str],
    image: Optional[str],
    from_frozen: Optional[str],
    network: Optional[str],
    cpus: Optional[float],
    mem: Size,
    gpus: Optional[int],
    gpu_model: Optional[str],
    min_vram: Size,
    constraints: Optional[Mapping[str, str]],
    pool: Union[str, Iterable[str], None],
    account: Optional[str],
    env: Optional[Mapping[str, Any]],
    secrets: Optional[Mapping[str, str]],
    idle_ttl: Duration,
    max_lifetime: Duration,
    idempotency_key: Optional[str],
) -> Dict[str, Any]:
    """The native ``open_session``'s arguments from the Python ones."""
    return dict(
        name=name,
        image=image,
        from_frozen=from_frozen,
        network=network,
        cpus=None if cpus is None else float(cpus),
        mem=size_text("mem", mem),
        gpus=gpus,
        gpu_model=gpu_model,
        min_vram=size_text("min_vram", min_vram),
        constraints=pairs("constraints", constraints),
        pools=names(pool),
        account=account,
        env=pairs("env", env),
        secrets=pairs("secrets", secrets),
        idle_ttl_ms=duration_ms("idle_ttl", idle_ttl),
        max_lifetime_ms=duration_ms("max_lifetime", max_lifetime),
        idempotency_key=None if idempotency_key is None else str(idempotency_key),
    )


def exec_kwargs(env: Optional[Mapping[str, Any]], timeout: Duration, cwd: Optional[str]) -> Dict[str, Any]:
    return dict(env=pairs("env", env), timeout_ms=duration_ms("timeout", timeout), cwd=None if cwd is None else os.fspath(cwd))


def job_result(job: str, t: Tuple[str, Optional[int], str]) -> JobResult:
    state, code, counts = t
    return JobResult(job, state, code, {k: v for k, v in json.loads(counts).items()})
