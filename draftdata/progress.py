"""Progress of a long job: a tqdm bar on a terminal, a plain line every `interval` seconds
otherwise (log files, `nohup`, `ray job logs`), also when no update arrives (its own clock), so a
run whose stderr is not a terminal is never silent for minutes. The environment variable DRAFTDATA_PROGRESS_INTERVAL sets those seconds.

    progress = JobProgress(total=2102, desc="collect", unit="conv")
    progress.update(items=8, size=1900)      # from any thread
    progress.close()                         # a last line with the totals

A line reads `collect: 512/2,102 convs (24%), 120,350 tok, 964 tok/s, elapsed 2m05s, ETA 6m28s`.
More fields come from an `extra` callable or a subclass's `extra()` (the Ray pool adds units and
workers; eval the acceptance length so far).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from draftdata.errors import DraftdataError

INTERVAL_ENV = "DRAFTDATA_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class JobProgress:
    """Items done out of `total` (with ETA when known) and a size count (tokens) with its rate.

    Thread-safe. `interval` is the seconds between plain lines when the file is not a terminal
    (0: a line on every update); default $DRAFTDATA_PROGRESS_INTERVAL, else 30.
    """

    def __init__(self, *, total: int | None = None, desc: str = "", unit: str = "item",
                 size_unit: str = "tok", interval: float | None = None, file: Any = None,
                 extra: Callable[[], str] | None = None):
        from tqdm import tqdm

        if interval is None:
            raw = os.environ.get(INTERVAL_ENV) or str(DEFAULT_INTERVAL)
            try:
                interval = float(raw)
            except ValueError:
                raise DraftdataError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds, e.g. 30") from None

        self._file = file or sys.stderr
        self._lock = threading.Lock()
        self._tty = bool(getattr(self._file, "isatty", lambda: False)())
        self._interval = interval
        self.desc, self.unit, self.size_unit = desc, unit, size_unit
        self._extra = extra
        self.total = total
        self.items = 0
        self.size = 0
        self._t0 = self._last_shown = time.perf_counter()
        self._printed: tuple[int, int] | None = None  # (items, size) of the last plain line
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=self._file, dynamic_ncols=True,
                         disable=not self._tty)
        # Updates may be minutes apart (a Ray work unit is tens of batches): a clock of its own shows
        # the elapsed time anyway, a line every `interval` (the bar's clock on a terminal every second).
        self._closed = threading.Event()
        beat = 1.0 if self._tty else interval
        if beat > 0:
            threading.Thread(target=self._beat, args=(beat,), name="draftdata-progress", daemon=True).start()

    def _beat(self, seconds: float) -> None:
        while not self._closed.wait(seconds):
            with self._lock:
                if self._closed.is_set():
                    return
                if self._tty:
                    self._bar.refresh()
                elif time.perf_counter() - self._last_shown >= self._interval:
                    self._last_shown = time.perf_counter()
                    self._print_line()

    def start(self) -> None:
        """Restart the clock (call when the work itself begins, after setup such as model loads)."""
        with self._lock:
            self._t0 = self._last_shown = time.perf_counter()

    def update(self, items: int = 0, size: int = 0) -> None:
        """Count `items` finished and `size` more units of work (tokens) done."""
        with self._lock:
            self._count(items, size)

    def _count(self, items: int, size: int) -> None:
        """Add to the counters and refresh; the caller holds the lock."""
        self.items += items
        self.size += size
        if items:
            self._bar.update(items)
        now = time.perf_counter()
        if now - self._last_shown < (0.5 if self._tty else self._interval):
            return
        self._last_shown = now
        if self._tty:
            self._bar.set_postfix_str(self.summary(), refresh=False)
        else:
            self._print_line()

    def rate(self) -> float:
        """Size units per second since `start`."""
        dt = time.perf_counter() - self._t0
        return self.size / dt if dt > 0 else 0.0

    def eta_known(self) -> bool:
        """Whether the items done so far say how long the rest takes (a subclass may know better)."""
        return True

    def extra(self) -> str:
        """More fields for the summary: the `extra` callable's, or a subclass's."""
        return self._extra() if self._extra is not None else ""

    def summary(self) -> str:
        s = f"{self.size:,} {self.size_unit}, {self.rate():,.0f} {self.size_unit}/s"
        extra = self.extra()
        return f"{s}, {extra}" if extra else s

    def _print_line(self) -> None:
        self._printed = (self.items, self.size)
        elapsed = time.perf_counter() - self._t0
        done = f"{self.items:,}"
        eta = ""
        if self.total:
            done += f"/{self.total:,} {self.unit}s ({100 * self.items / self.total:.0f}%)"
            if self.items and self.items < self.total and self.eta_known():
                eta = f", ETA {format_duration(elapsed * (self.total - self.items) / self.items)}"
        else:
            done += f" {self.unit}s"
        print(f"{self.desc}: {done}, {self.summary()}, elapsed {format_duration(elapsed)}{eta}",
              file=self._file, flush=True)

    def write(self, message: str) -> None:
        """A message line that does not break the bar."""
        with self._lock:
            if self._tty:
                self._bar.write(message, file=self._file)
            else:
                print(message, file=self._file, flush=True)

    def close(self) -> None:
        """Show the final counts (a last line when not on a terminal) and release the bar."""
        with self._lock:
            self._closed.set()
            if self._tty:
                self._bar.set_postfix_str(self.summary(), refresh=True)
            elif self._printed != (self.items, self.size):  # not the line just printed again
                self._print_line()
            self._bar.close()
