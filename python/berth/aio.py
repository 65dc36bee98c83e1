"""The asyncio API: the same shapes as ``berth.Client``, awaited.

::

    import asyncio, berth.aio

    async def main():
        async with berth.aio.Client() as client:
            async with client.session(cpus=1) as s:
                r = await s.exec("make test")
                h = await s.start(["./server"])
                async for line in h.stream():
                    print(line.stream, line.text)

Every request runs on the Rust client's own runtime threads and settles an asyncio
future through ``loop.call_soon_threadsafe``: the event loop never blocks, and any
number of sessions and execs share one event loop and one QUIC connection.
Cancelling an awaiting task drops its request.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator, Callable, Dict, Iterable, List, Mapping, Optional, Union

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
from .errors import BerthError, InvalidSpec

__all__ = ["Client", "Job", "Session", "CommandHandle", "connect"]

PathLike = Union[str, "os.PathLike[str]"]


def _settle(fut: "asyncio.Future[Any]", err: Optional[BaseException], value: Any) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(value)


async def _call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Runs one native operation with a completion callback, awaiting its result."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def done(err: Optional[BaseException], value: Any) -> None:
        try:
            loop.call_soon_threadsafe(_settle, fut, err, value)
        except RuntimeError:
            pass  # the loop has closed: nobody waits any more

    pending = fn(*args, done=done, **kw)
    try:
        return await fut
    except asyncio.CancelledError:
        pending.cancel()
        raise


async def connect(profile: Optional[PathLike] = None) -> "Client":
    """Connects without blocking the event loop (the handshake runs on a thread)."""
    loop = asyncio.get_running_loop()
    core = await loop.run_in_executor(None, _berth.Core, None if profile is None else os.fspath(profile))
    return Client(_core=core)


class Client:
    """A connection to a berth coordinator, for asyncio code; see ``berth.Client``.

    ``Client(profile)`` connects at once (a loopback or LAN handshake is a few
    milliseconds); ``await berth.aio.connect(profile)`` does it off the event loop.
    """

    def __init__(self, profile: Optional[PathLike] = None, *, _core: Any = None) -> None:
        self._core = _core if _core is not None else _berth.Core(None if profile is None else os.fspath(profile))

    @property
    def user(self) -> str:
        return self._core.user

    def close(self) -> None:
        self._core.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    async def submit(self, command: Optional[Command] = None, *, script: Optional[str] = None, **options: Any) -> "Job":
        """Submits a job; the options are those of ``berth.Client.submit``."""
        keys = (
            "name array image network cpus mem gpus gpu_model min_vram max_runtime attempts env secrets account pool after "
            "priority max_output constraints idempotency_key"
        ).split()
        unknown = set(options) - set(keys)
        if unknown:
            raise TypeError(f"submit() got unexpected options: {', '.join(sorted(unknown))}")
        kw = submit_kwargs(command, script, **{k: options.get(k) for k in keys})
        job, tasks, duplicate, warning = await _call(self._core.submit, **kw)
        return Job(self, job, tasks, duplicate=duplicate, warning=warning)

    def job(self, job_id: str) -> "Job":
        return Job(self, job_id, 0)

    async def jobs(self, state: Optional[str] = None, limit: int = 50) -> List[Dict[str, Any]]:
        return loads(await _call(self._core.jobs, state, limit))

    async def status(self, job_id: str) -> Dict[str, Any]:
        return loads(await _call(self._core.status, job_id))

    async def budget(self, account: Optional[str] = None) -> Any:
        rows = [Budget.of(d) for d in loads(await _call(self._core.budgets, account))]
        if account is None:
            return rows
        for b in rows:
            if b.account == account:
                return b
        return Budget.of({"account": account, "month": "", "run_cap": "0", "month_cap": "0", "reserved": "0", "spent": "0"})

    async def set_budget(self, account: str, run: Any, month: Any) -> None:
        await _call(self._core.set_budget, account, str(run), str(month))

    async def workers(self) -> List[Dict[str, Any]]:
        return loads(await _call(self._core.workers))

    def session(self, *, workdir: Optional[PathLike] = None, **options: Any) -> "_Opening":
        """Opens a session; the options are those of ``berth.Client.session``.
        ``await client.session(...)`` gives the ``Session``; ``async with
        client.session(...) as s:`` also closes it on the way out."""
        keys = (
            "name image from_frozen network cpus mem gpus gpu_model min_vram constraints pool account env secrets idle_ttl "
            "max_lifetime idempotency_key"
        ).split()
        unknown = set(options) - set(keys)
        if unknown:
            raise TypeError(f"session() got unexpected options: {', '.join(sorted(unknown))}")
        return _Opening(self, workdir, session_kwargs(**{k: options.get(k) for k in keys}))

    async def sessions(self, limit: int = 50) -> List[Dict[str, Any]]:
        return loads(await _call(self._core.sessions, limit))

    async def close_session(self, session_id: str) -> bool:
        return (await _call(self._core.close_session, session_id))[1]


class _Opening:
    """A session being opened: awaitable, and an async context manager."""

    def __init__(self, client: Client, workdir: Optional[PathLike], kw: Dict[str, Any]) -> None:
        self._client, self._workdir, self._kw = client, workdir, kw
        self._session: Optional[Session] = None

    async def _open(self) -> "Session":
        if self._workdir is not None and not os.path.isdir(self._workdir):
            raise InvalidSpec(f"workdir {os.fspath(self._workdir)}: not a directory")
        sid, worker, warning = await _call(self._client._core.open_session, **self._kw)
        s = Session(self._client, sid, worker, workdir=self._workdir, warning=warning)
        if self._workdir is not None:
            try:
                await s.sync_in()
            except BaseException:
                await asyncio.shield(s.close())
                raise
        return s

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> "Session":
        self._session = await self._open()
        return self._session

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            # Closed even when the body was cancelled.
            await asyncio.shield(self._session.close())


class Job:
    """A submitted job, for asyncio code; see ``berth.Job``."""

    def __init__(self, client: Client, job_id: str, tasks: int, *, duplicate: bool = False, warning: Optional[str] = None) -> None:
        self.client, self.id, self.tasks, self.duplicate, self.warning = client, job_id, tasks, duplicate, warning

    def __repr__(self) -> str:
        return f"Job({self.id!r}, tasks={self.tasks})"

    async def wait(self, timeout: Duration = None) -> JobResult:
        return job_result(self.id, await _call(self.client._core.wait, self.id, duration_ms("timeout", timeout)))

    async def status(self) -> Dict[str, Any]:
        return await self.client.status(self.id)

    async def cancel(self, reason: Optional[str] = None) -> int:
        return (await _call(self.client._core.cancel, self.id, reason))[1]

    async def output(self, follow: bool = False, *, index: Optional[int] = None, attempt: Optional[int] = None) -> AsyncIterator[OutputChunk]:
        sel = self.id if index is None else f"{self.id}:{index}"
        stream = await _call(self.client._core.logs, sel, attempt, follow)
        try:
            while True:
                items = await _call(stream.next)
                if not items:
                    return
                for it in items:
                    if it[0] == "out":
                        yield OutputChunk(STREAMS[it[1]], it[2])
                    elif it[0] == "error":
                        raise it[1]
        finally:
            stream.close()

    async def logs(self, follow: bool = False, *, index: Optional[int] = None, attempt: Optional[int] = None) -> AsyncIterator[bytes]:
        async for c in self.output(follow, index=index, attempt=attempt):
            yield c.data

    async def text(self, follow: bool = False, *, index: Optional[int] = None, attempt: Optional[int] = None) -> str:
        parts = [d async for d in self.logs(follow, index=index, attempt=attempt)]
        return b"".join(parts).decode("utf-8", "replace")


class Session:
    """An open session, for asyncio code; see ``berth.Session``."""

    def __init__(self, client: Client, session_id: str, worker: str, *, workdir: Optional[PathLike] = None, warning: Optional[str] = None) -> None:
        self.client, self.id, self.worker, self.warning = client, session_id, worker, warning
        self.workdir = None if workdir is None else os.fspath(workdir)
        self._closed = False
        self._closing: Optional[asyncio.Future[Any]] = None

    def __repr__(self) -> str:
        return f"Session({self.id!r}, worker={self.worker!r})"

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.shield(self.close())

    @property
    def closed(self) -> bool:
        return self._closed

    async def exec(
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
        data = input.encode() if isinstance(input, str) else input
        t = await _call(self.client._core.exec, self.id, argv(cmd), input=data, **exec_kwargs(env, timeout, cwd))
        r = command_result(t, text)
        return r.check() if check else r

    async def start(
        self,
        cmd: Command,
        *,
        env: Optional[Mapping[str, Any]] = None,
        timeout: Duration = None,
        cwd: Optional[PathLike] = None,
        stdin: bool = False,
        text: bool = False,
    ) -> "CommandHandle":
        native = await _call(self.client._core.start, self.id, argv(cmd), stdin=stdin, **exec_kwargs(env, timeout, cwd))
        h = CommandHandle(self, native, text=text)
        await h._started()
        return h

    async def upload(self, src: PathLike, dst: str = ".") -> CopyStats:
        return CopyStats(*await _call(self.client._core.copy_in, self.id, os.fspath(src), dst))

    async def download(self, src: str, dst: PathLike) -> CopyStats:
        return CopyStats(*await _call(self.client._core.copy_out, self.id, src, os.fspath(dst)))

    async def sync_in(self, workdir: Optional[PathLike] = None) -> CopyStats:
        return await self.upload(os.path.join(self._workdir(workdir), "."), ".")

    async def sync_out(self, workdir: Optional[PathLike] = None) -> CopyStats:
        d = self._workdir(workdir)
        os.makedirs(d, exist_ok=True)
        return await self.download(".", d)

    def _workdir(self, workdir: Optional[PathLike]) -> str:
        d = os.fspath(workdir) if workdir is not None else self.workdir
        if d is None:
            raise InvalidSpec("this session has no workdir: pass one, or open it with workdir=")
        return d

    async def freeze(self, tag: Optional[str] = None) -> str:
        image = await _call(self.client._core.freeze, self.id, tag)
        self._closed = True
        return image

    async def status(self) -> Dict[str, Any]:
        return loads(await _call(self.client._core.session_status, self.id))

    async def close(self) -> bool:
        """Closes the session (idempotent: True when it had already ended; concurrent
        calls share one close)."""
        if self._closed:
            return True
        if self._closing is None:
            self._closing = asyncio.ensure_future(_call(self.client._core.close_session, self.id))
        try:
            _, already = await asyncio.shield(self._closing)
        except BaseException:
            self._closing = None
            raise
        self._closed = True
        return already


class CommandHandle:
    """A command started by ``Session.start``, for asyncio code; see ``berth.CommandHandle``."""

    def __init__(self, session: Session, native: Any, *, text: bool = False) -> None:
        self.session = session
        self._native = native
        self._stream = native.stream
        self._reader = ExecReader(text)
        self._pending: List[OutputLine] = []
        self._lock = asyncio.Lock()
        self._cancelled = False

    async def _started(self) -> None:
        while not self._reader.exec_no and self._reader.end is None:
            items = await _call(self._stream.next)
            if not items:
                raise BerthError("the coordinator ended the exec's stream before it started")
            self._reader.feed(items, self._pending)

    @property
    def exec_no(self) -> int:
        return self._reader.exec_no

    @property
    def done(self) -> bool:
        return self._reader.end is not None

    async def _more(self, lines: Optional[List[OutputLine]]) -> None:
        items = await _call(self._stream.next)
        if not items:
            if self._reader.end is None:
                raise BerthError(f"the exec's stream ended before it did (exec {self.exec_no})")
            return
        self._reader.feed(items, lines)

    async def stream(self) -> AsyncIterator[OutputLine]:
        """Lines as they arrive (``async for line in h.stream()``), until the command ends."""
        lines, self._pending = self._pending, []
        while True:
            async with self._lock:
                while not lines and self._reader.end is None:
                    await self._more(lines)
            for line in lines:
                yield line
            if self._reader.end is not None and not lines:
                return
            lines = []

    async def write(self, data: Union[bytes, str]) -> int:
        b = data.encode() if isinstance(data, str) else bytes(data)
        return await _call(self._native.write, b)

    async def close_stdin(self) -> None:
        await _call(self._native.close_stdin)

    async def wait(self) -> CommandResult:
        async with self._lock:
            while self._reader.end is None:
                await self._more(None)
        return self._reader.result()

    async def cancel(self) -> None:
        """As ``berth.CommandHandle.cancel``."""
        async with self._lock:
            if self._cancelled or self._reader.end is not None:
                return
            self._cancelled = True
            self._stream.close()
            try:
                await _call(self._native.close_stdin)
            except BerthError:
                pass
            self._stream = await _call(self.session.client._core.exec_output, self.session.id, self.exec_no, True, tuple(self._reader.chunks))
