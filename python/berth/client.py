"""The synchronous API: ``Client``, ``Job``, ``Session``, ``CommandHandle``.

Every network wait releases the GIL, and a ``Client`` is safe to share across
threads: its requests are independent streams on one QUIC connection.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

from . import _berth
from ._common import (
    Budget,
    Command,
    CommandResult,
    CopyStats,
    Duration,
    ExecReader,
    JobResult,
    OutputChunk,
    OutputLine,
    Size,
    STREAMS,
    argv,
    command_result,
    duration_ms,
    exec_kwargs,
    job_result,
    loads,
    session_kwargs,
    submit_kwargs,
)
from .errors import BerthError, InvalidSpec, WaitTimeout

__all__ = ["Client", "Job", "Session", "CommandHandle"]

PathLike = Union[str, "os.PathLike[str]"]


class Client:
    """A connection to a berth coordinator.

    ``profile`` is the profile file; without it the client looks where the CLI does:
    ``$BERTH_PROFILE``, then ``$XDG_CONFIG_HOME/berth/profile.toml`` (or
    ``~/.config/berth/profile.toml``). Raises ``ProfileError`` when there is none,
    ``Unreachable`` when no coordinator of it answers, ``Unauthorized`` when its
    certificate is refused. Use it as a context manager, or call ``close()``.
    """

    def __init__(self, profile: Optional[PathLike] = None) -> None:
        self._core = _berth.Core(None if profile is None else os.fspath(profile))

    @property
    def user(self) -> str:
        """The profile's user."""
        return self._core.user

    def close(self) -> None:
        """Closes the connection; sessions stay open until closed or expired."""
        self._core.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------- jobs

    def submit(
        self,
        command: Optional[Command] = None,
        *,
        script: Optional[str] = None,
        name: Optional[str] = None,
        array: Any = None,
        image: Optional[str] = None,
        network: Optional[str] = None,
        cpus: Optional[float] = None,
        mem: Size = None,
        gpus: Optional[int] = None,
        gpu_model: Optional[str] = None,
        min_vram: Size = None,
        max_runtime: Duration = None,
        attempts: Optional[int] = None,
        env: Optional[Mapping[str, Any]] = None,
        secrets: Optional[Mapping[str, str]] = None,
        account: Optional[str] = None,
        pool: Union[str, Iterable[str], None] = None,
        after: Any = None,
        priority: Optional[int] = None,
        max_output: Size = None,
        constraints: Optional[Mapping[str, str]] = None,
        idempotency_key: Optional[str] = None,
    ) -> "Job":
        """Submits a job (``berth submit``) and returns it once it is stored.

        ``command`` is a list of arguments, or a string run by ``sh -c`` (as
        ``script=`` is). ``array`` is ``"1-100"``, a (start, end) pair, a ``range`` or
        a count N (tasks 0..N-1); each task gets ``BERTH_ARRAY_INDEX``. Durations
        (``max_runtime``) are seconds or text such as ``"5m"``; sizes (``mem``,
        ``min_vram``) are text such as ``"4G"`` or an int of MiB; ``max_output`` is
        text or an int of bytes. ``secrets`` maps a variable to the worker's secret
        name. ``pool`` is a pool or a list; ``after`` a Job, an id (``ID:ok``,
        ``ID:any``) or a list. A retried submission with the same
        ``idempotency_key`` returns the first job instead of making another.

        Raises ``InvalidSpec`` (bad arguments), ``Refused`` (the budget; its window and
        numbers are attributes), ``Unreachable``.
        """
        kw = submit_kwargs(
            command,
            script,
            name=name,
            array=array,
            image=image,
            network=network,
            cpus=cpus,
            mem=mem,
            gpus=gpus,
            gpu_model=gpu_model,
            min_vram=min_vram,
            max_runtime=max_runtime,
            attempts=attempts,
            env=env,
            secrets=secrets,
            account=account,
            pool=pool,
            after=after,
            priority=priority,
            max_output=max_output,
            constraints=constraints,
            idempotency_key=idempotency_key,
        )
        job, tasks, duplicate, warning = self._core.submit(**kw)
        return Job(self, job, tasks, duplicate=duplicate, warning=warning)

    def job(self, job_id: str) -> "Job":
        """A job by its id (or a unique prefix, or ``ID:INDEX`` for one task)."""
        return Job(self, job_id, 0)

    def jobs(self, state: Optional[str] = None, limit: int = 50) -> List[Dict[str, Any]]:
        """Jobs, newest first, as ``berth list --json`` gives them (dicts)."""
        return loads(self._core.jobs(state, limit))

    def status(self, job_id: str) -> Dict[str, Any]:
        """A job's status, as ``berth status JOB --json`` gives it."""
        return loads(self._core.status(job_id))

    def budget(self, account: Optional[str] = None) -> Any:
        """An account's caps and this month's use (a ``Budget``); without
        ``account``, a list of every account this user may see."""
        rows = [Budget.of(d) for d in loads(self._core.budgets(account))]
        if account is None:
            return rows
        for b in rows:
            if b.account == account:
                return b
        return Budget.of({"account": account, "month": "", "run_cap": "0", "month_cap": "0", "reserved": "0", "spent": "0"})

    def set_budget(self, account: str, run: Any, month: Any) -> None:
        """Sets an account's caps in USD (admin): per run and per calendar month."""
        self._core.set_budget(account, str(run), str(month))

    def workers(self) -> List[Dict[str, Any]]:
        """Workers, as ``berth workers --json`` gives them."""
        return loads(self._core.workers())

    # -------------------------------------------------------------- sessions

    def session(
        self,
        *,
        image: Optional[str] = None,
        from_frozen: Optional[str] = None,
        workdir: Optional[PathLike] = None,
        cpus: Optional[float] = None,
        mem: Size = None,
        gpus: Optional[int] = None,
        gpu_model: Optional[str] = None,
        min_vram: Size = None,
        idle_ttl: Duration = None,
        max_lifetime: Duration = None,
        env: Optional[Mapping[str, Any]] = None,
        secrets: Optional[Mapping[str, str]] = None,
        account: Optional[str] = None,
        pool: Union[str, Iterable[str], None] = None,
        constraints: Optional[Mapping[str, str]] = None,
        network: Optional[str] = None,
        name: Optional[str] = None,
        idempotency_key: Optional[str] = None,
    ) -> "Session":
        """Opens a session (``berth session open``) and returns it once its sandbox is
        ready: a process slot and its workspace, or with ``image`` one container.

        With ``workdir``, that directory's contents are uploaded into the workspace
        first (``sync_in``), and ``sync_out()`` brings the workspace back into it.
        ``idle_ttl`` (default 15m) and ``max_lifetime`` (default 4h) are seconds or
        text. Use it as a context manager: ``with client.session(...) as s:`` closes
        it on the way out, whatever happened inside.
        """
        kw = session_kwargs(
            name=name,
            image=image,
            from_frozen=from_frozen,
            network=network,
            cpus=cpus,
            mem=mem,
            gpus=gpus,
            gpu_model=gpu_model,
            min_vram=min_vram,
            constraints=constraints,
            pool=pool,
            account=account,
            env=env,
            secrets=secrets,
            idle_ttl=idle_ttl,
            max_lifetime=max_lifetime,
            idempotency_key=idempotency_key,
        )
        if workdir is not None and not os.path.isdir(workdir):
            raise InvalidSpec(f"workdir {os.fspath(workdir)}: not a directory")
        sid, worker, warning = self._core.open_session(**kw)
        s = Session(self, sid, worker, workdir=workdir, warning=warning)
        if workdir is not None:
            try:
                s.sync_in()
            except BaseException:
                s.close()
                raise
        return s

    def sessions(self, limit: int = 50) -> List[Dict[str, Any]]:
        """Your sessions, newest first, as ``berth session list --json`` gives them."""
        return loads(self._core.sessions(limit))

    def close_session(self, session_id: str) -> bool:
        """Closes a session by id (idempotent); True if it had already ended."""
        return self._core.close_session(session_id)[1]


class Job:
    """A submitted job (or array): wait for it, read its output, cancel it."""

    def __init__(self, client: Client, job_id: str, tasks: int, *, duplicate: bool = False, warning: Optional[str] = None) -> None:
        self.client = client
        self.id = job_id
        self.tasks = tasks
        #: True when the idempotency key had been used: this is the first submission's job.
        self.duplicate = duplicate
        #: Why it may wait (no connected worker could run it now), or None.
        self.warning = warning

    def __repr__(self) -> str:
        return f"Job({self.id!r}, tasks={self.tasks})"

    def wait(self, timeout: Duration = None) -> JobResult:
        """Waits until every task has ended; ``WaitTimeout`` after ``timeout`` seconds
        (the job goes on)."""
        return job_result(self.id, self.client._core.wait(self.id, duration_ms("timeout", timeout)))

    def status(self) -> Dict[str, Any]:
        """As ``berth status JOB --json``."""
        return self.client.status(self.id)

    def cancel(self, reason: Optional[str] = None) -> int:
        """Cancels every unfinished task; returns how many tasks were cancelled."""
        return self.client._core.cancel(self.id, reason)[1]

    def output(self, follow: bool = False, *, index: Optional[int] = None, attempt: Optional[int] = None) -> Iterator[OutputChunk]:
        """One task's output as it was stored, stdout and stderr apart (an array's
        first task unless ``index``); with ``follow``, live until the task ends."""
        sel = self.id if index is None else f"{self.id}:{index}"
        stream = self.client._core.logs(sel, attempt, follow)
        try:
            while True:
                items = stream.next()
                if not items:
                    return
                for it in items:
                    if it[0] == "out":
                        yield OutputChunk(STREAMS[it[1]], it[2])
                    elif it[0] == "error":
                        raise it[1]
        finally:
            stream.close()

    def logs(self, follow: bool = False, *, index: Optional[int] = None, attempt: Optional[int] = None) -> Iterator[bytes]:
        """One task's output (stdout and stderr together, in order) as bytes chunks,
        as they arrive; with ``follow``, until the task ends. ``text()`` and
        ``lines()`` give it as text."""
        for c in self.output(follow, index=index, attempt=attempt):
            yield c.data

    def text(self, follow: bool = False, *, index: Optional[int] = None, attempt: Optional[int] = None) -> str:
        """All of one task's output as text (UTF-8, undecodable bytes replaced)."""
        return b"".join(self.logs(follow, index=index, attempt=attempt)).decode("utf-8", "replace")

    def lines(self, follow: bool = False, *, index: Optional[int] = None, attempt: Optional[int] = None) -> Iterator[str]:
        """One task's output line by line, as text without newlines."""
        buf = b""
        for data in self.logs(follow, index=index, attempt=attempt):
            buf += data
            *whole, buf = buf.split(b"\n")
            for line in whole:
                yield line.decode("utf-8", "replace")
        if buf:
            yield buf.decode("utf-8", "replace")


class Session:
    """An open session: a sandbox for many commands. Made by ``Client.session``."""

    def __init__(self, client: Client, session_id: str, worker: str, *, workdir: Optional[PathLike] = None, warning: Optional[str] = None) -> None:
        self.client = client
        self.id = session_id
        self.worker = worker
        self.workdir = None if workdir is None else os.fspath(workdir)
        self.warning = warning
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Session({self.id!r}, worker={self.worker!r})"

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def exec(
        self,
        cmd: Command,
        *,
        env: Optional[Mapping[str, Any]] = None,
        timeout: Duration = None,
        cwd: Optional[PathLike] = None,
        input: Union[bytes, str, None] = None,
        text: bool = False,
        check: bool = False,
    ) -> CommandResult:
        """Runs a command to its end (``berth exec``): a list of arguments, or a string
        run by ``sh -c``. ``input`` is sent to its stdin (otherwise it reads nothing);
        ``timeout`` kills its process tree (exit code 124); ``cwd`` is relative to the
        workspace. ``text=True`` gives stdout and stderr as str; ``check=True`` raises
        ``ExecFailed`` unless it exited 0."""
        data = input.encode() if isinstance(input, str) else input
        t = self.client._core.exec(self.id, argv(cmd), input=data, **exec_kwargs(env, timeout, cwd))
        r = command_result(t, text)
        return r.check() if check else r

    def start(
        self,
        cmd: Command,
        *,
        env: Optional[Mapping[str, Any]] = None,
        timeout: Duration = None,
        cwd: Optional[PathLike] = None,
        stdin: bool = False,
        text: bool = False,
    ) -> "CommandHandle":
        """Starts a command and returns at once, once it is numbered: a
        ``CommandHandle`` to stream its output, feed its stdin (with ``stdin=True``),
        wait for it or cancel it. Several may run at once in one session."""
        h = self.client._core.start(self.id, argv(cmd), stdin=stdin, **exec_kwargs(env, timeout, cwd))
        return CommandHandle(self, h, text=text)

    def upload(self, src: PathLike, dst: str = ".") -> CopyStats:
        """Copies a local file or directory into the workspace (modes, mtimes and
        symlinks kept): into ``dst`` when it is a directory there, else saved as
        ``dst``. ``src`` ending in ``/.`` copies a directory's contents."""
        return CopyStats(*self.client._core.copy_in(self.id, os.fspath(src), dst))

    def download(self, src: str, dst: PathLike) -> CopyStats:
        """Copies ``src`` of the workspace (``.`` for all of it) to a local path: into
        ``dst`` when it is an existing directory, else saved as ``dst``."""
        return CopyStats(*self.client._core.copy_out(self.id, src, os.fspath(dst)))

    def sync_in(self, workdir: Optional[PathLike] = None) -> CopyStats:
        """Uploads the workdir's contents into the workspace."""
        d = self._workdir(workdir)
        return self.upload(os.path.join(d, "."), ".")

    def sync_out(self, workdir: Optional[PathLike] = None) -> CopyStats:
        """Downloads the workspace into the workdir (made if missing, merged into)."""
        d = self._workdir(workdir)
        os.makedirs(d, exist_ok=True)
        return self.download(".", d)

    def _workdir(self, workdir: Optional[PathLike]) -> str:
        d = os.fspath(workdir) if workdir is not None else self.workdir
        if d is None:
            raise InvalidSpec("this session has no workdir: pass one, or open it with workdir=")
        return d

    def freeze(self, tag: Optional[str] = None) -> str:
        """Commits a container session's filesystem and workspace into
        ``berth-frozen:TAG`` (not its processes' memory); the session ends. Returns
        the image; ``Client.session(from_frozen=TAG)`` opens a new one from it."""
        image = self.client._core.freeze(self.id, tag)
        self._closed = True
        return image

    def status(self) -> Dict[str, Any]:
        """As ``berth session status SID --json``: state, worker, execs, money."""
        return loads(self.client._core.session_status(self.id))

    def close(self) -> bool:
        """Closes the session (idempotent): its sandbox and what runs in it end.
        Returns True if it had already ended."""
        with self._lock:
            if self._closed:
                return True
            already = self.client._core.close_session(self.id)[1]
            self._closed = True
            return already


class CommandHandle:
    """A command started by ``Session.start``. Iterate ``stream()`` for its lines as
    they arrive, ``write()`` to its stdin, ``wait()`` for its ``CommandResult`` (which
    holds all of its output, streamed or not), ``cancel()`` to stop it."""

    def __init__(self, session: Session, native: Any, *, text: bool = False) -> None:
        self.session = session
        self._native = native
        self._stream = native.stream
        self._reader = ExecReader(text)
        self._lock = threading.RLock()
        self._cancelled = False
        self._pending: List[OutputLine] = []
        # The first item is the exec's number (or why it could not start).
        while not self._reader.exec_no and self._reader.end is None:
            items = self._stream.next()
            if not items:
                raise BerthError("the coordinator ended the exec's stream before it started")
            self._reader.feed(items, self._pending)

    @property
    def exec_no(self) -> int:
        """The exec's number in its session (from 1)."""
        return self._reader.exec_no

    @property
    def done(self) -> bool:
        return self._reader.end is not None

    def _more(self, lines: Optional[List[OutputLine]], timeout_ms: Optional[int] = None) -> bool:
        items = self._stream.next(None, timeout_ms)
        if items and items[0][0] == "timeout":
            return False
        if not items:
            if self._reader.end is None:
                raise BerthError(f"the exec's stream ended before it did (exec {self.exec_no}: Client.sessions shows it)")
            return False
        self._reader.feed(items, lines)
        return True

    def stream(self) -> Iterator[OutputLine]:
        """Lines as they arrive, each an ``OutputLine`` (``stream`` is ``"stdout"`` or
        ``"stderr"``, ``data`` its bytes, ``text`` its text), until the command ends."""
        lines: List[OutputLine] = self._pending
        self._pending = []
        while True:
            with self._lock:
                while not lines and self._reader.end is None:
                    self._more(lines)
            for line in lines:
                yield line
            if self._reader.end is not None and not lines:
                return
            lines = []

    def write(self, data: Union[bytes, str]) -> int:
        """Sends bytes (or UTF-8 text) to the command's stdin; needs ``stdin=True``."""
        b = data.encode() if isinstance(data, str) else bytes(data)
        return self._native.write(b)

    def close_stdin(self) -> None:
        """Closes the command's stdin: it reads end of file."""
        self._native.close_stdin()

    def wait(self, timeout: Duration = None) -> CommandResult:
        """Waits for the command's end and returns its ``CommandResult``;
        ``WaitTimeout`` after ``timeout`` seconds (the command goes on)."""
        limit = duration_ms("timeout", timeout)
        deadline = None if limit is None else time.monotonic() + limit / 1000
        with self._lock:
            while self._reader.end is None:
                left = None if deadline is None else int((deadline - time.monotonic()) * 1000)
                if left is not None and left <= 0:
                    raise WaitTimeout(f"exec {self.exec_no} did not end within {timeout} (it goes on)")
                self._more(None, left)
        return self._reader.result()

    def cancel(self) -> None:
        """Stops following the command and closes its stdin; the coordinator then
        kills its process tree. ``wait()`` afterwards gives its end."""
        with self._lock:
            if self._cancelled or self._reader.end is not None:
                return
            self._cancelled = True
            self._stream.close()
            try:
                self._native.close_stdin()
            except BerthError:
                pass
            # What is left is read from the record, after the chunks seen here.
            self._stream = self.session.client._core.exec_output(self.session.id, self.exec_no, True, tuple(self._reader.chunks))
