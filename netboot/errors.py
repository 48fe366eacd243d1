"""The one exception tree of netboot.

Everything netboot raises on purpose derives from :class:`NetbootError`; the edges (HTTP API,
CLI, UDP servers) translate these into status codes, exit codes or log lines. Anything else
that escapes is a bug and is logged as one.
"""

from __future__ import annotations

from typing import TypeVar

_Error = TypeVar("_Error", bound=BaseException)


def caused(error: _Error, cause: BaseException | None) -> _Error:
    """``error`` with ``cause`` as its cause (None: no cause, and the exception being handled
    not shown either), as ``raise error from cause`` sets it. mypyc compiles ``raise … from``
    without its ``from`` part, in the modules setup.py's ``NETBOOT_MYPYC=1`` build compiles: a
    traceback, and a caller that reads ``__cause__``, would miss the cause there, or show the
    exception that was being handled as if this one had failed while handling it."""
    error.__cause__ = cause  # also sets __suppress_context__, as raise ... from does
    return error


class NetbootError(Exception):
    """Base of every error netboot raises deliberately."""


class ConfigError(NetbootError):
    """A configuration file, flag or environment value is wrong.

    ``source`` names the file (or ``env``/``flag``), ``line`` the 1-based line when known,
    ``key`` the dotted key and ``fix`` what to write instead.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        key: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.key = key
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source or ""
        if self.line is not None:
            where += f":{self.line}"
        parts = [f"{where}: " if where else ""]
        if self.key:
            parts.append(f"{self.key}: ")
        parts.append(self.message)
        if self.fix:
            parts.append(f" (fix: {self.fix})")
        return "".join(parts)


class DecodeError(NetbootError):
    """Bytes on the wire (or text in a request) could not be decoded.

    ``field`` names the field and ``offset`` the byte offset when known, so that a log line
    says exactly where a packet went wrong.
    """

    def __init__(self, message: str, *, field: str | None = None, offset: int | None = None):
        self.message = message
        self.field = field
        self.offset = offset
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.field:
            where.append(self.field)
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class ValidationError(NetbootError):
    """A value given by a user (API body, import row, CLI argument) is not acceptable.

    ``field`` names the offending field so that the API can answer 400 naming it.
    """

    def __init__(self, field: str, message: str, *, line: int | None = None) -> None:
        self.field = field
        # ``line``: the line of a file it is about (an import file's), which ``message``
        # names too (the API's answer is the message); ``reason``: the message without it,
        # for a caller that names the line its own way (the CLI's FILE:LINE:).
        self.line = line
        self.reason = message
        self.message = message if line is None else f"line {line}: {message}"
        super().__init__(f"{field}: {self.message}")


class NotFound(NetbootError):
    """The named object does not exist."""


class Conflict(NetbootError):
    """The change conflicts with what exists (a MAC or hostname already used, ...).

    ``field`` names the contested field and ``holder`` the machine that has it, when the
    conflict is about one (the API reports both so a script can act on them);
    ``candidates`` the machines a name could mean, when it names several.
    """

    def __init__(self, message: str, *, field: str | None = None,
                 holder: str | None = None, candidates: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.holder = holder
        self.candidates = candidates


class StateChanged(Conflict):
    """A compare-and-set write found the machine in another state than its writer read:
    another writer (another server sharing the inventory) moved it meanwhile. Nothing was
    written; read the machine again and decide again."""


class PreconditionFailed(Conflict):
    """The caller's condition on the object's version (the API's If-Match) does not hold:
    another writer changed it since the caller read it. Nothing was written (HTTP 412)."""


# Times in all a step refused with StateChanged is made again from the machine as stored now:
# the boot path's decisions, the installer's writes (enroll), a config fetch, the API's edit
# (core). Each retry reads what the other writer committed, so more than a few means a bug,
# not a race; then the refusal is the caller's 409.
DECIDE_ATTEMPTS = 3


class TransitionRefused(Conflict):
    """A machine's lifecycle does not allow this step in its current state (netboot.lifecycle).

    ``state`` is the current state (None: not in the inventory), ``event`` what was refused,
    ``allowed`` the steps the state accepts and ``fix`` what an operator does from it (the
    lifecycle's :data:`~netboot.lifecycle.WAY_ON`): the list alone was read as states an
    operator could ask for ("'approve' is not allowed (allowed: installed, register,
    reinstall)", s47-review).
    """

    def __init__(self, subject: str, state: str | None, event: str,
                 allowed: tuple[str, ...], fix: str = "") -> None:
        self.subject = subject
        self.state = state
        self.event = event
        self.allowed = allowed
        where = "is not in the inventory" if state is None else f"is {state}"
        choices = ", ".join(allowed) or "nothing"
        super().__init__(f"{subject} {where}; {str(event)!r} is not allowed"
                         + (f": {fix}" if fix else "")
                         + f" (steps allowed {'there' if state is None else 'in ' + state}: "
                           f"{choices})")


class RenderError(NetbootError):
    """A template failed to render, or its output failed validation."""


class StoreError(NetbootError):
    """The inventory failed (I/O, corruption, lock timeout). Never reported as "not found"."""


class UnreadableRow(StoreError):
    """A stored row netboot cannot read (a document that is not JSON: hand SQL, a damaged
    copy), found at start-up: the message names the table, the row and the fix. The data's
    to put right, not a setting (never a ConfigError naming the inventory's path)."""


class WritesRefused(StoreError):
    """The inventory answers reads but refuses writes (its disk is full, its writes are stuck
    behind a lock holder): nothing was written. Not "unreachable": the network is not it."""


class StoreFull(WritesRefused):
    """The inventory's filesystem is full (SQLite's SQLITE_FULL): nothing was written, reads
    still answer, and writes succeed again once space is freed. Told apart from an outage so
    that a client and an operator are sent to the disk, not to the network."""


class OutcomeUnknown(StoreError):
    """A write whose commit was under way when the inventory's connection failed (the
    database restarted or failed over, the connection reset), and the database could not
    say since whether it committed: it may or may not be there. Not "nothing was changed",
    as another StoreError is: read it back before doing it again."""


class AuthError(NetbootError):
    """Missing or wrong credentials (401)."""


class Forbidden(NetbootError):
    """Credentials are valid but do not allow this (403)."""


class PlainHttpRefused(Forbidden):
    """A request for the API or the dashboard (or one carrying a credential) that came over
    plain HTTP from a peer that must use HTTPS (403, or a redirect for a page); ``https_url``
    is where to send it instead (None when HTTPS is off)."""

    def __init__(self, message: str, https_url: str | None) -> None:
        self.https_url = https_url
        super().__init__(message)


class Busy(NetbootError):
    """A bounded resource is full right now (503): try again later."""


class RateLimited(NetbootError):
    """A client asked more often than its budget allows (429): ``retry_after`` seconds
    until it may again. ``told``: not the first refusal of its run, whose log line, event
    and audit entry said so for the run (a flood of refusals writes nothing each)."""

    def __init__(self, message: str, *, retry_after: int, told: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.told = told


class ScopeRequired(Forbidden):
    """A valid token whose scope does not grant this (403); ``scope`` names one that would."""

    def __init__(self, scope: str, message: str) -> None:
        self.scope = scope
        super().__init__(message)
