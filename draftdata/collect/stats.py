"""Run counts shared by `collect` and `synthesize`: what the end-of-run summary and summary.json say,
and the writing of those reports."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any


def format_counts(counts: dict[str, int]) -> str:
    """"reason 12, other 3": the most frequent first (ties by name), for summaries and messages."""
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class RunStats:
    """Counts of one run; `merge` adds up those of several Ray workers (every number but `seconds`,
    the run's wall clock, which the driver measures)."""

    read: int = 0  # input records read (valid or not)
    written: int = 0  # conversations this run wrote
    tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (already written + reject reasons)
    seconds: float = 0.0

    def merge(self, other: RunStats) -> None:
        for f in fields(self):
            if f.name not in ("skipped", "seconds"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.skipped.update(other.skipped)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = dict(sorted(self.skipped.items()))
        return d

    def summary_lines(self, title: str, written: list[str], input: str | None) -> list[str]:
        """The head of the summary: title, records read, `written` (the command's own lines), skips."""
        skipped = sum(self.skipped.values())
        reasons = format_counts(self.skipped)
        return [f"{title} summary ({self.seconds:,.1f} s)",
                f"  read       {self.read:,} records" + (f" from {input}" if input else ""),
                *written,
                f"  skipped    {skipped:,}" + (f": {reasons}" if reasons else "")]

    @staticmethod
    def where_lines(output: str, rejects: str | None) -> list[str]:
        return [f"  output     {output}"] + ([f"  rejects    {rejects}"] if rejects else [])


def write_run_reports(command: str, folder: str, summary_name: str, rejects_name: str, stats: RunStats,
                      settings: dict[str, Any], rejects: Any, rejects_path: str | None = None,
                      storage_options: dict[str, Any] | None = None) -> str | None:
    """Write the run's summary JSON (always) and its rejects JSONL (when there are any; to
    `rejects_path` if given) and return where the rejects went.

    `folder`, `summary_name` and `rejects_name` may hold `{stamp}` (UTC time) and `{pid}`. Any
    fsspec URL works (collect keeps its reports with the dataset, also on object storage). A failure
    is a warning: a finished run never fails on its report, and a failed rejects file never keeps
    the summary from being written."""
    import fsspec

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

    def fill(template: str) -> str:  # not str.format: a URL may hold braces of its own
        return template.replace("{stamp}", stamp).replace("{pid}", str(os.getpid()))

    folder = fill(folder).rstrip("/")

    from draftdata.store.fs import is_local  # (here: importing the store loads torch)

    def opts(url: str) -> dict[str, Any]:
        return {} if is_local(url) else dict(storage_options or {})

    summary: dict[str, Any] = {"stats": stats.to_dict(), "settings": settings, "finished_at": stamp}
    where = None
    if rejects.rejects:
        target = rejects_path or f"{folder}/{fill(rejects_name)}"
        try:
            with fsspec.open(target, "wb", auto_mkdir=True, **opts(target)) as f:
                f.write(rejects.to_jsonl())
            where = summary["rejects"] = target
        except Exception as e:  # noqa: BLE001 - a report failure must not fail a finished run
            summary["rejects_error"] = f"{target}: {e}"
            print(f"draftdata {command}: warning: could not write the {len(rejects.rejects):,} rejected records to "
                  f"{target}: {e}", file=sys.stderr)
    target = f"{folder}/{fill(summary_name)}"
    try:
        with fsspec.open(target, "wb", auto_mkdir=True, **opts(target)) as f:
            f.write((json.dumps(summary, indent=2) + "\n").encode())
    except Exception as e:  # noqa: BLE001 - a report failure must not fail a finished run
        print(f"draftdata {command}: warning: could not write the run summary to {folder}: {e}", file=sys.stderr)
    return where
