"""berth: the Python client of the berth batch scheduler.

Jobs::

    import berth
    client = berth.Client()                      # the profile, found as the CLI finds it
    job = client.submit(["python", "train.py"], cpus=2, max_runtime="2h")
    for chunk in job.logs(follow=True):          # bytes, as they arrive
        print(chunk.decode(), end="")
    result = job.wait()                          # JobResult(state, exit_code, counts)

Sessions (a sandbox kept for many commands)::

    with client.session(cpus=2, idle_ttl="15m", workdir="proj/") as s:
        r = s.exec("make test")                  # CommandResult(exit_code, stdout, stderr, duration_s)
        h = s.start(["./server"])
        for line in h.stream():                  # stdout and stderr told apart
            print(line.stream, line.text)

``berth.aio`` has the same API for asyncio. Failures raise the exceptions of
``berth.errors`` (``Refused``, ``NotFound``, ``Unreachable``, ``InvalidSpec``, ...),
all ``BerthError``. The wire protocol, TLS and profile lookup are the Rust client's
own (the extension ``berth._berth``).
"""

from . import _berth, aio, errors
from ._common import Budget, CommandResult, CopyStats, ExecFailed, JobResult, OutputChunk, OutputLine
from .client import Client, CommandHandle, Job, Session
from .errors import BerthError, InvalidSpec, NotFound, ProfileError, Refused, Unauthorized, Unreachable, WaitTimeout

__version__ = _berth.__version__


def profile_path(profile=None) -> str:  # type: ignore[no-untyped-def]
    """Where the client looks for its profile (``profile``, ``$BERTH_PROFILE``, then
    ``$XDG_CONFIG_HOME/berth/profile.toml``)."""
    return str(_berth.profile_path(profile))


__all__ = [
    "Client",
    "Job",
    "JobResult",
    "Session",
    "CommandResult",
    "CommandHandle",
    "OutputLine",
    "OutputChunk",
    "CopyStats",
    "Budget",
    "BerthError",
    "InvalidSpec",
    "Refused",
    "Unauthorized",
    "Unreachable",
    "ProfileError",
    "NotFound",
    "WaitTimeout",
    "ExecFailed",
    "aio",
    "errors",
    "profile_path",
]
