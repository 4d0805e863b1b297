"""Exceptions that the CLI prints as one line (no traceback), and the CLI's stop signals."""

import signal
import threading
from typing import Any


class DraftdataError(Exception):
    """Base class: a problem the user can act on; the message says what and where."""


class DatasetNotFoundError(DraftdataError):
    """The URL holds no dataset.json."""


class SchemaMismatchError(DraftdataError):
    """A writer's schema, or a part's arrays, disagree with dataset.json."""


class CorruptDataError(DraftdataError):
    """Stored bytes fail their checksum or structure check; the message names part and array/sample."""


class MissingPartsError(DraftdataError):
    """Parts a reader was asked for (a run's pinned snapshot) are not committed in the dataset."""


class StorageAccessError(DraftdataError):
    """The storage backend refused access (credentials, permissions, unknown scheme)."""


def name_some(names: list[str], limit: int = 5) -> str:
    """`a, b, c, d, e, ... (N entries)`: what a directory holds, short enough for a one-line error."""
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `timeout`, `docker stop`, `kill`), raised in the main
    thread so that a run stops as on Ctrl-C: it keeps what it finished and writes its reports."""


# Set once SIGTERM reached the CLI: it then exits 143, also when a command stopped gracefully.
TERMINATED = threading.Event()


def raise_terminated(signum: int, frame: Any) -> None:
    """The CLI's SIGTERM handler (main thread)."""
    TERMINATED.set()
    raise Terminated()


_CLI_HANDLES_SIGTERM = threading.Event()


def stop_on_sigterm() -> Any:
    """Make SIGTERM stop a command as Ctrl-C does; returns the handler to restore (None: left as
    it was, outside the main thread or where SIGTERM is already handled or ignored)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    _CLI_HANDLES_SIGTERM.set()
    return signal.signal(signal.SIGTERM, raise_terminated)


def release_sigterm() -> None:
    """The command is over: `reclaim_sigterm` no longer applies."""
    _CLI_HANDLES_SIGTERM.clear()


def reclaim_sigterm() -> None:
    """After `ray.init`, which installs its own SIGTERM handler (an exit with status 1 and a dump):
    SIGTERM stops the command as Ctrl-C does again, where the CLI had made it so."""
    if _CLI_HANDLES_SIGTERM.is_set() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
