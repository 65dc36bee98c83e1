"""The exceptions of the berth client, one per exit code of the ``berth`` CLI.

``BerthError`` is the base of them all; each carries ``code`` (the exit code the CLI
would end with) and ``message`` (the words the CLI would print after ``error:``).

======================  ====  ==================================================
class                   code  when
======================  ====  ==================================================
``InvalidSpec``         2     a job, session or exec the coordinator (or the
                              client, before sending) refuses as invalid
``Refused``             3     refused by the budget (``window`` and the numbers),
                              or a session that could not open, a copy refused
``Unauthorized``        3, 4  refused by authorisation (a role, another user's
                              session), or a certificate the coordinator refuses
``Unreachable``         4     no coordinator answered, or the connection was lost
``ProfileError``        4     no profile, or one that cannot be read
``NotFound``            5     no such job or session (or an attempt it never had)
``WaitTimeout``         124   ``wait(timeout=...)`` passed before the job ended
``BerthError``          1     anything else (the coordinator broke, ...)
======================  ====  ==================================================
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Optional

__all__ = [
    "BerthError",
    "InvalidSpec",
    "Refused",
    "Unauthorized",
    "Unreachable",
    "ProfileError",
    "NotFound",
    "WaitTimeout",
]


class BerthError(Exception):
    """A berth operation failed; ``code`` is the CLI's exit code for it."""

    code: int = 1

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidSpec(BerthError, ValueError):
    """The request names something invalid (exit code 2): fix the arguments."""

    code = 2


class Refused(BerthError):
    """Refused by the budget or by authorisation (exit code 3).

    A budget refusal says which window refused and its numbers, as Decimals:

    - ``window``: ``"run"`` (one submission's cap) or ``"month"`` (the calendar
      month's, UTC), or None when no window applies (a job without a max runtime
      cannot go to a paid pool);
    - ``account``; ``cap`` (the window's cap in USD); ``estimate`` (what this
      submission may cost at most); for the month window also ``month``
      (``YYYY-MM``), ``reserved`` and ``spent``.
    """

    code = 3

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message, code)
        self.window: Optional[str] = None
        self.account: Optional[str] = None
        self.month: Optional[str] = None
        self.cap: Optional[Decimal] = None
        self.estimate: Optional[Decimal] = None
        self.reserved: Optional[Decimal] = None
        self.spent: Optional[Decimal] = None
        _parse_budget(self)

    @property
    def budget(self) -> bool:
        """Whether the budget (not authorisation) refused."""
        return self.message.startswith("refused by the budget")


class Unauthorized(Refused):
    """Refused by authorisation (a role that may not, another user's session), or
    a certificate the coordinator does not accept."""


class Unreachable(BerthError, ConnectionError):
    """No coordinator of the profile answered, or the connection was lost (exit 4)."""

    code = 4


class ProfileError(BerthError):
    """No profile where the CLI looks, or one that cannot be read (exit 4)."""

    code = 4


class NotFound(BerthError, LookupError):
    """No such job or session, as far as this user can see (exit 5)."""

    code = 5


class WaitTimeout(BerthError, TimeoutError):
    """``wait(timeout=...)`` passed before the job ended; the job goes on."""

    code = 124


_NUM = r"\$(-?[0-9.]+)"
_RUN = re.compile(r"run window of account `(?P<account>[^`]*)`: this submission may cost up to " + _NUM + r", over the per-run cap of " + _NUM)
_NO_BUDGET = re.compile(r"account `(?P<account>[^`]*)` has no budget for paid pools \(this job may cost up to " + _NUM + r"\)")
_MONTH = re.compile(
    r"month window (?P<month>\S+) of account `(?P<account>[^`]*)`: cap " + _NUM + r", reserved " + _NUM + r", spent " + _NUM + r", this submission up to " + _NUM
)


def _parse_budget(e: Refused) -> None:
    m = _RUN.search(e.message)
    if m:
        e.window, e.account = "run", m.group("account")
        e.estimate, e.cap = Decimal(m.group(2)), Decimal(m.group(3))
        return
    m = _NO_BUDGET.search(e.message)
    if m:
        e.window, e.account = "run", m.group("account")
        e.estimate, e.cap = Decimal(m.group(2)), Decimal(0)
        return
    m = _MONTH.search(e.message)
    if m:
        e.window, e.month, e.account = "month", m.group("month"), m.group("account")
        e.cap, e.reserved, e.spent, e.estimate = (Decimal(m.group(i)) for i in (3, 4, 5, 6))


def _from_fail(code: int, message: str, lost: bool, hint: str) -> BerthError:
    """The exception for a failure of the Rust client (its exit code and message)."""
    if hint == "profile" or (code == 4 and not lost and ("profile" in message and "berth-coordinator user add" in message)):
        return ProfileError(message, code)
    if code == 2:
        return InvalidSpec(message)
    if code == 3:
        if message.startswith("role ") or ("belongs to" in message and "only its owner" in message):
            return Unauthorized(message)
        return Refused(message)
    if code == 4:
        if lost:
            return Unreachable(message)
        return Unauthorized(message, 4)
    if code == 5:
        return NotFound(message)
    if code == 124:
        return WaitTimeout(message)
    return BerthError(message, code)
