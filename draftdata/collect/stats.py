"""Run counts shared by `collect` and `synthesize`: what the end-of-run summary and summary.json say."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any


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
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])))
        return [f"{title} summary ({self.seconds:,.1f} s)",
                f"  read       {self.read:,} records" + (f" from {input}" if input else ""),
                *written,
                f"  skipped    {skipped:,}" + (f": {reasons}" if reasons else "")]

    @staticmethod
    def where_lines(output: str, rejects: str | None) -> list[str]:
        return [f"  output     {output}"] + ([f"  rejects    {rejects}"] if rejects else [])
