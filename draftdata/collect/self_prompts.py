"""`draftdata prompts`: user prompts written by the base model itself, for `synthesize` to answer.

A draft learns what its base model writes in reply to the prompts it was trained on; a draft
trained on math and QA prompts guesses poorly on open chat (bench/quality/results.md, Run 4).
When no broad prompt set is at hand, the base model can write one: a chat model fed its
template up to the point where a user message begins continues with something a user would
write, in the styles and topics of its own instruction tuning, and stops at the end-of-turn
token (the "Magpie" recipe: Xu et al. 2024, arXiv:2406.08464).

What a run does: renders the chat template around a sentinel user message (with
`--system-prompt` when given, else the template's default), keeps the text before the sentinel
as the prefix, and samples continuations of it with continuous batching (`RunningBatch`), each
from its own seed (--seed, index). A continuation becomes a record `{"conversation_id":
"self-<seed>-<index>", "conversations": [{"role": "user", "content": TEXT}]}` unless it is cut
at --max-new-tokens (`too_long`), shorter than --min-chars (`too_short`), holds a special token
of the template (`template_token`), or repeats an earlier prompt after case and whitespace
folding (`duplicate`). It stops at --count records or after --max-attempts samples.

The output is appended to under the same lock, torn-line repair and settings check as
`synthesize` (`JsonlOutput`, `<OUT>.synth/settings.json`); a rerun counts the records already
there and continues from the index after the highest one.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from draftdata.collect.synthesize import (
    FLUSH_SECONDS,
    HFGenerator,
    JsonlOutput,
    check_settings,
    sidecar_dir,
    turn_seed,
)
from draftdata.errors import DraftdataError
from draftdata.progress import JobProgress

SENTINEL = "\x00draftdata-user-message\x00"
ID_PATTERN = re.compile(r"^self-(-?\d+)-(\d+)$")


@dataclass
class PromptSettings:
    """Everything a `draftdata prompts` run needs."""

    model: str
    model_path: str
    output: str
    count: int
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None
    chat_template: str | None = None
    min_chars: int = 16
    max_attempts: int | None = None  # None: 3 x count + 64
    batch_size: int = 32
    dtype: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.count < 1:
            raise DraftdataError("--count must be a positive integer")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise DraftdataError("--max-new-tokens and --batch-size must be positive integers")
        if self.temperature <= 0:
            raise DraftdataError("--temperature must be > 0: greedy decoding writes the same prompt every time")
        if not 0 < self.top_p <= 1:
            raise DraftdataError("--top-p must be in (0, 1]")
        if self.max_attempts is None:
            self.max_attempts = 3 * self.count + 64
        if self.max_attempts < self.count:
            raise DraftdataError(f"--max-attempts {self.max_attempts} is below --count {self.count}")

    def identity(self) -> dict[str, Any]:
        """The settings that decide what gets written (a rerun into the same output must keep them)."""
        import hashlib

        from draftdata.models import model_hash, model_identity

        template = hashlib.sha256(self.chat_template.encode()).hexdigest()[:16] if self.chat_template else None
        return {"command": "prompts", "model_id": model_identity(self.model_path)[0],
                "model_hash": model_hash(self.model_path), "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "system_prompt": self.system_prompt, "chat_template_hash": template, "min_chars": self.min_chars}

    def report_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chat_template"] = self.chat_template is not None
        return d


def query_prefix(generator: HFGenerator, system_prompt: str | None = None) -> list[int]:
    """Token ids of the chat template up to where a user message's text begins."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + \
        [{"role": "user", "content": SENTINEL}]
    try:
        text = generator.chat.render(messages)
    except Exception as e:  # noqa: BLE001 - jinja raises TemplateError, or anything the template calls
        raise DraftdataError(f"the chat template failed on a one-message conversation: {type(e).__name__}: {e}") \
            from None
    if text.count(SENTINEL) != 1:
        raise DraftdataError("the chat template does not render a user message's text verbatim, so there is no "
                             "place to let the model write one; pass --chat-template FILE")
    prefix = text[:text.index(SENTINEL)]
    ids = generator.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DraftdataError("the chat template puts nothing before the user's text; a base model without a chat "
                             "format cannot write prompts this way")
    return ids


def fold(text: str) -> str:
    """The duplicate key of a prompt: lower case, runs of whitespace as one space."""
    return " ".join(text.casefold().split())


def read_existing(path: Path, seed: int) -> tuple[set[str], int]:
    """Folded texts already in the output and the next index to sample (after the highest id of this seed)."""
    texts: set[str] = set()
    next_index = 0
    if not path.is_file():
        return texts, next_index
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            for m in record.get("conversations", []):
                if m.get("role") == "user":
                    texts.add(fold(m.get("content", "")))
            match = ID_PATTERN.match(record["conversation_id"])
            if match and int(match.group(1)) == seed:
                next_index = max(next_index, int(match.group(2)) + 1)
    return texts, next_index


@dataclass
class PromptStats:
    written: int = 0
    attempts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    rejected: Counter = field(default_factory=Counter)  # reason -> samples

    def format(self, output: str, wanted: int, total: int) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        reasons = ", ".join(f"{k} {v:,}" for k, v in self.rejected.most_common())
        return "\n".join([
            f"prompts summary ({self.seconds:,.1f} s)",
            f"  written    {self.written:,} prompts ({total:,} of --count {wanted:,} in the file), "
            f"{self.tokens:,} tokens sampled ({rate:,.0f} tokens/s)",
            f"  rejected   {sum(self.rejected.values()):,} of {self.attempts:,} samples" + (f": {reasons}" if reasons else ""),
            f"  output     {output}"])


def generate_prompts(generator: HFGenerator, settings: PromptSettings, out: JsonlOutput, *,
                     progress: JobProgress | None = None) -> PromptStats:
    """Sample prompts into `out` until it holds --count of them (or --max-attempts samples were drawn)."""
    prefix = query_prefix(generator, settings.system_prompt)
    special = set(getattr(generator.tokenizer, "all_special_ids", [])) - generator.stop_ids
    seen, index = read_existing(out.path, settings.seed)
    have = len(out.ids)
    stats = PromptStats()
    t0 = time.perf_counter()
    budget = min(settings.max_new_tokens, generator.max_seq_len - len(prefix))
    if budget < 1:
        raise DraftdataError(f"the prompt prefix has {len(prefix)} tokens: no room within the model's "
                             f"{generator.max_seq_len} positions")
    batch = generator.new_batch()
    capacity, refill = settings.batch_size, max(1, settings.batch_size // 8)
    pending: list[dict[str, Any]] = []
    last_flush = time.perf_counter()

    def flush() -> None:
        nonlocal last_flush
        out.append(pending)
        pending.clear()
        last_flush = time.perf_counter()

    while have < settings.count:
        free = min(capacity - len(batch), settings.count - have - len(batch), settings.max_attempts - stats.attempts)
        if free > 0 and batch.can_add and (free >= refill or not len(batch)):
            batch.add([(index + k, prefix, turn_seed(settings.seed, f"self-{index + k}", 0), budget)
                       for k in range(free)])
            index += free
            stats.attempts += free
        if not len(batch):
            break  # --max-attempts reached
        new = 0
        for key, tokens, stopped in batch.step():
            stats.tokens += len(tokens)
            text = generator.answer(tokens, stopped).text.strip()
            reason = "too_long" if not stopped else "template_token" if special.intersection(tokens[:-1]) \
                else "too_short" if len(text) < settings.min_chars else "duplicate" if fold(text) in seen else None
            if reason is not None:
                stats.rejected[reason] += 1
            elif have + new < settings.count:
                seen.add(fold(text))
                pending.append({"conversation_id": f"self-{settings.seed}-{key:07d}",
                                "conversations": [{"role": "user", "content": text}]})
                new += 1
        have += new
        stats.written += new
        if progress is not None and new:
            progress.update(new, 0)
        if len(pending) >= capacity or (pending and time.perf_counter() - last_flush > FLUSH_SECONDS):
            flush()
    flush()
    stats.seconds = time.perf_counter() - t0
    return stats


def run(settings: PromptSettings) -> int:
    """The `draftdata prompts` command: returns 0, or 1 when --max-attempts ran out before --count."""
    with JsonlOutput(settings.output) as out:
        check_settings(out, settings)
        have = len(out.ids)
        if have >= settings.count:
            print(f"draftdata prompts: {out.path} already holds {have:,} prompts (--count {settings.count:,}); "
                  "nothing to do", file=sys.stderr)
            return 0
        if have:
            print(f"draftdata prompts: {out.path} already holds {have:,} prompts; writing "
                  f"{settings.count - have:,} more", file=sys.stderr)
        generator = HFGenerator(settings.model_path, max_new_tokens=settings.max_new_tokens,
                                temperature=settings.temperature, top_p=settings.top_p, dtype=settings.dtype,
                                device=settings.device, chat_template=settings.chat_template)
        bar = JobProgress(total=settings.count - have, desc="prompts", unit="prompt")
        generator.on_step = lambda t: bar.update(0, t)
        try:
            stats = generate_prompts(generator, settings, out, progress=bar)
        finally:
            bar.close()
            generator.close()
        total = len(out.ids)
        print(stats.format(str(out.path), settings.count, total))
        (sidecar_dir(out.path) / f"prompts-summary-{int(time.time())}.json").write_text(
            json.dumps({"stats": {**asdict(stats), "rejected": dict(stats.rejected)},
                        "settings": settings.report_dict()}, indent=2) + "\n")
    if total < settings.count:
        print(f"draftdata prompts: only {total:,} of {settings.count:,} prompts after {stats.attempts:,} samples "
              f"(--max-attempts {settings.max_attempts:,}); most were rejected as "
              f"{stats.rejected.most_common(1)[0][0] if stats.rejected else '-'}: raise --max-new-tokens or "
              f"--temperature, or rerun to continue", file=sys.stderr)
        return 1
    return 0


__all__ = ["PromptSettings", "PromptStats", "fold", "generate_prompts", "query_prefix", "run"]
