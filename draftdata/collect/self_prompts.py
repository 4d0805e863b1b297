"""`draftdata prompts`: user prompts written by the base model itself, for `synthesize` to answer.

A draft learns what its base model writes in reply to the prompts it was trained on; a draft
trained on math and QA prompts guesses poorly on open chat (bench/quality/results.md, Run 4).
When no broad prompt set is at hand, the base model can write one: a chat model fed its
template up to the point where a user message begins continues with something a user would
write, in the styles and topics of its own instruction tuning, and stops at the end-of-turn
token (the "Magpie" recipe: Xu et al. 2024, arXiv:2406.08464).

What a run does: renders the chat template around a sentinel user message (with
`--system-prompt` when given, else the template's default), keeps the text before the sentinel
as the prefix (followed by the opening words of a `--user-prefix`, index i taking the (i mod n)-th
of the n given: the way to steer a small model, whose topics a system prompt moves only partly,
towards kinds of requests: "Write a", "Imagine you are", "Extract"), and samples continuations of
it with continuous batching (`RunningBatch`), each from its own seed (--seed, index). A continuation becomes a record `{"conversation_id":
"self-<seed>-<index>", "conversations": [{"role": "user", "content": TEXT}]}` unless it is cut
at --max-new-tokens (`too_long`), shorter than --min-chars (`too_short`), holds a special token
of the template (`template_token`), or repeats an earlier prompt after case and whitespace
folding (`duplicate`). It stops at --count records or after --max-attempts samples.

With `--follow-up FILE` the prefix is instead a whole answered conversation of FILE followed by
the opening of a user message: sample i writes the next user turn of the i-th conversation that
ends with an answer, and the record is that conversation with the message appended, under its
own id (multi-turn data: `synthesize --keep-answers` then answers the new turn). `duplicate` there means a
repeat of a user message of the same conversation.

With `--endpoint URL` the samples come from an OpenAI-compatible server instead (vLLM, SGLang,
trtllm-serve: the way to write many prompts on GPUs): the prefix is still rendered and tokenized
here, from `--tokenizer` (the served model's tokenizer directory, no weights read), and sent as a
token-id `prompt` to POST /v1/completions, one request per index with its seed, `--concurrency`
in flight, judged and written in index order. The request asks for the stop ids
(`stop_token_ids`) and the special tokens in the text (`skip_special_tokens: false`), so that
`template_token` samples are seen; text after a stop token is cut off here as well.

The output is appended to under the same lock, torn-line repair and settings check as
`synthesize` (`JsonlOutput`, `<OUT>.synth/settings.json`); a rerun counts the records already
there and continues from the index after the highest one.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from draftdata.collect.conversations import ROLES, Conversation, Reject, read_conversations
from draftdata.collect.stats import format_counts
from draftdata.collect.synthesize import (
    FLUSH_SECONDS,
    EndpointClient,
    EndpointError,
    HFGenerator,
    JsonlOutput,
    check_settings,
    load_tokenizer,
    sidecar_dir,
    stop_token_ids,
    turn_seed,
)
from draftdata.errors import DraftdataError
from draftdata.progress import JobProgress

T = TypeVar("T")

SENTINEL = "\x00draftdata-user-message\x00"
ID_PATTERN = re.compile(r"^self-(-?\d+)-(\d+)$")


@dataclass
class PromptSettings:
    """Everything a `draftdata prompts` run needs."""

    model: str | None  # --model as given; with --endpoint the served name (None: the server's only model)
    model_path: str    # the local model directory; with --endpoint the --tokenizer directory
    output: str
    count: int | None  # None only with follow_up: one sample for every conversation of the input
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None
    user_prefixes: list[str] = field(default_factory=list)  # --user-prefix, cycled over the indices
    chat_template: str | None = None
    min_chars: int = 16
    max_attempts: int | None = None  # None: 3 x count + 64
    batch_size: int = 32
    dtype: str = "auto"
    device: str = "cpu"
    endpoint: str | None = None
    api_key: str | None = None
    concurrency: int = 16
    request_timeout: float = 600.0
    retries: int = 5
    follow_up: str | None = None  # --follow-up FILE: answered conversations to continue by one user message

    def __post_init__(self) -> None:
        if self.count is None and self.follow_up is None:
            raise DraftdataError("give --count N (the prompts the output should hold), or --follow-up FILE")
        if self.count is not None and self.count < 1:
            raise DraftdataError("--count must be a positive integer")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise DraftdataError("--max-new-tokens, --batch-size and --concurrency must be positive integers")
        if self.temperature <= 0:
            raise DraftdataError("--temperature must be > 0: greedy decoding writes the same prompt every time")
        if not 0 < self.top_p <= 1:
            raise DraftdataError("--top-p must be in (0, 1]")
        if self.max_attempts is None:  # (a --follow-up run also stops when its input runs out)
            self.max_attempts = 3 * self.count + 64 if self.count is not None else 1 << 62
        if self.count is not None and self.max_attempts < self.count:
            raise DraftdataError(f"--max-attempts {self.max_attempts} is below --count {self.count}")
        if self.follow_up is not None and self.system_prompt is not None:
            raise DraftdataError("--system-prompt does not go with --follow-up: a conversation is continued under its "
                                 "own system message (synthesize answered it under that one)")
        if any(not p.strip() for p in self.user_prefixes):
            raise DraftdataError("--user-prefix must not be empty or blank (leave it out to let the model "
                                 "write the whole message)")

    def identity(self) -> dict[str, Any]:
        """The settings that decide what gets written (a rerun into the same output must keep them)."""
        import hashlib

        from draftdata.models import generation_hash, model_hash, model_identity, tokenizer_hash

        template = hashlib.sha256(self.chat_template.encode()).hexdigest()[:16] if self.chat_template else None
        if self.endpoint:
            model = {"model_id": self.model, "model_hash": None, "endpoint": self.endpoint,
                     "tokenizer_hash": tokenizer_hash(self.model_path)}
        else:
            model = {"model_id": model_identity(self.model_path)[0], "model_hash": model_hash(self.model_path),
                     "generation_hash": generation_hash(self.model_path)}
        return {"command": "prompts", **model, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "system_prompt": self.system_prompt, "user_prefixes": self.user_prefixes or None,
                "chat_template_hash": template, "min_chars": self.min_chars,
                "dtype": None if self.endpoint else self.dtype, "follow_up": self.follow_up}

    def report_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chat_template"] = self.chat_template is not None
        d["api_key"] = self.api_key is not None  # never write secrets
        return d


class PromptFormat:
    """What an --endpoint run needs of the model here: tokenizer, chat template, stop ids (no weights)."""

    def __init__(self, model_path: str, chat_template: str | None = None) -> None:
        from transformers import AutoConfig, GenerationConfig

        from draftdata.collect.conversations import ChatTokenizer

        self.tokenizer = load_tokenizer(model_path)
        self.chat = ChatTokenizer(self.tokenizer, chat_template=chat_template)
        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except (OSError, ValueError):
            eos = None
        try:
            config = AutoConfig.from_pretrained(model_path)
            config = config.get_text_config() if hasattr(config, "get_text_config") else config
        except (OSError, ValueError):
            config = None
        if eos is None and config is not None:
            eos = getattr(config, "eos_token_id", None)
        self.stop_ids = stop_token_ids(eos, self.tokenizer, self.chat.render)
        self.max_seq_len = getattr(config, "max_position_embeddings", None) or 1 << 30


def query_prefix(fmt: HFGenerator | PromptFormat, system_prompt: str | None = None, user_prefix: str = "",
                 history: list[dict[str, str]] | None = None) -> list[int]:
    """Token ids of the chat template up to where a user message's text begins, followed by
    `user_prefix` (the message's first words, tokenized together with the template text).
    `history`: the conversation the message follows (--follow-up), instead of `system_prompt`."""
    given = history is not None
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + \
        list(history or []) + [{"role": "user", "content": SENTINEL}]
    try:
        text = fmt.chat.render(messages)
    except Exception as e:  # noqa: BLE001 - jinja raises TemplateError, or anything the template calls
        what = "this conversation" if given else "a one-message conversation"
        raise DraftdataError(f"the chat template failed on {what}: {type(e).__name__}: {e}") from None
    if text.count(SENTINEL) != 1:
        raise DraftdataError("the chat template does not render a user message's text verbatim, so there is no "
                             "place to let the model write one; pass --chat-template FILE")
    prefix = text[:text.index(SENTINEL)]
    ids = fmt.tokenizer(prefix + user_prefix, add_special_tokens=False)["input_ids"]
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
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)  # (the output's own check has read every line as a record with an id)
            messages = record.get("conversations", record.get("messages", [])) if isinstance(record, dict) else None
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise DraftdataError(f"{path}:{lineno}: not a conversation record (a list of messages under "
                                     "'conversations' or 'messages'); fix or remove that line, then rerun")
            for m in messages:
                if ROLES.get(str(m.get("role", m.get("from")))) == "user":  # as collect reads roles
                    content = m.get("content", m.get("value", ""))
                    if not isinstance(content, str):
                        raise DraftdataError(f"{path}:{lineno}: a user message's content is "
                                             f"{type(content).__name__}, not text; fix or remove that line, then rerun")
                    texts.add(fold(content))
            match = ID_PATTERN.match(record["conversation_id"])
            if match and int(match.group(1)) == seed:
                next_index = max(next_index, int(match.group(2)) + 1)
    return texts, next_index


# What to change when a run keeps nothing, by its most common reject reason.
REJECT_HINTS = {
    "too_long": "the model did not end its message within --max-new-tokens (or the conversation leaves no "
                "room in its context); raise --max-new-tokens",
    "too_short": "the messages were shorter than --min-chars; lower it",
    "duplicate": "the model repeated itself; raise --temperature",
    "template_token": "the model wrote chat-template tokens into its message; check --chat-template",
    "template_error": "the chat template cannot render these conversations; pass a --chat-template FILE",
    "content_filter": "the server's content filter cut the samples; serve the model without one",
}


@dataclass
class PromptStats:
    written: int = 0
    attempts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    rejected: Counter = field(default_factory=Counter)  # reason -> samples
    skipped_input: Counter = field(default_factory=Counter)  # --follow-up records not continued: reason -> records

    def format(self, output: str, goal: str, total: int, follow: bool = False) -> str:
        """The summary; `goal` says what the file should hold ("--count 500")."""
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        reasons = format_counts(self.rejected)
        lines = [f"prompts summary ({self.seconds:,.1f} s)"]
        if follow:
            skipped = format_counts(self.skipped_input)
            lines.append(f"  input      {sum(self.skipped_input.values()):,} records not continued"
                         + (f": {skipped}" if skipped else ""))
        lines += [f"  written    {self.written:,} prompts ({total:,} of {goal} in the file), "
                  f"{self.tokens:,} tokens sampled ({rate:,.0f} tokens/s)",
                  f"  rejected   {sum(self.rejected.values()):,} of {self.attempts:,} samples"
                  + (f": {reasons}" if reasons else "")]
        unjudged = self.attempts - self.written - sum(self.rejected.values())  # a stop: sampled, never judged
        if unjudged > 0:
            lines[-1] += f" ({unjudged:,} more were in flight when the run stopped, not judged)"
        if not self.written and self.rejected:
            lines.append(f"  hint       no sample was kept: {REJECT_HINTS.get(self.rejected.most_common(1)[0][0], '')}")
        return "\n".join([*lines, f"  output     {output}"])


def in_turn(items: Sequence[T], index: int) -> T:
    """The item sample `index` uses when samples take the items in turn: items[index mod n]."""
    return items[index % len(items)]


class _Keeper:
    """Hands out what each sample continues (`openings`, index by index) and judges the finished
    samples in the order given, appending the kept ones to the output (in batches: up to
    `flush_at` records or every FLUSH_SECONDS). With --follow-up, sample i continues the i-th
    answered conversation of the input (`follow`) and keeps its id."""

    def __init__(self, settings: PromptSettings, out: JsonlOutput, fmt: HFGenerator | PromptFormat,
                 progress: JobProgress | None, flush_at: int, follow: list[Conversation] | None = None,
                 stats: PromptStats | None = None) -> None:
        self.settings, self.out, self.fmt, self.progress, self.flush_at = settings, out, fmt, progress, flush_at
        self.follow = follow
        self.seen: set[str] = set()  # folded prompts written so far (fresh prompts only; a follow-up is
        # judged against its own conversation's earlier requests)
        if follow is None:
            self.seen, self.index = read_existing(out.path, settings.seed)
            self.prefixes = [query_prefix(fmt, settings.system_prompt, p) for p in settings.user_prefixes or [""]]
            longest = max(map(len, self.prefixes))
            if self.budget(longest) < 1:
                raise DraftdataError(f"the prompt prefix has {longest} tokens: no room within the model's "
                                     f"{fmt.max_seq_len} positions")
        else:  # a rerun continues every conversation not in the file yet (rows finish out of order)
            query_prefix(fmt, user_prefix=self.user_prefix(0))  # a template that cannot do this fails here, once
            self.index = 0
        self.wanted = settings.count if settings.count is not None else len(follow or [])
        self.have = len(out.ids)
        self.stats = stats if stats is not None else PromptStats()
        self.pending: list[dict[str, Any]] = []
        self.last_flush = time.perf_counter()

    @property
    def missing(self) -> int:
        return self.wanted - self.have

    def budget(self, prefix_tokens: int) -> int:
        return min(self.settings.max_new_tokens, self.fmt.max_seq_len - prefix_tokens)

    def user_prefix(self, index: int) -> str:
        """The opening words sample `index` continues ("" without --user-prefix)."""
        prefixes = self.settings.user_prefixes
        return in_turn(prefixes, index) if prefixes else ""

    def openings(self, n: int) -> list[tuple[int, list[int], int, int]]:
        """Up to n next samples to draw, as (index, prefix token ids, seed, token budget); fewer
        when --max-attempts or the --follow-up input runs out. A conversation whose prefix cannot
        be written or leaves no room is counted as a rejected sample here."""
        rows = []
        settings, stats = self.settings, self.stats
        while len(rows) < n and stats.attempts < settings.max_attempts:
            index = self.index
            if self.follow is None:
                prefix = in_turn(self.prefixes, index)
                rows.append((index, prefix, turn_seed(settings.seed, f"self-{index}", 0), self.budget(len(prefix))))
            elif index >= len(self.follow):
                break
            elif self.follow[index].conversation_id in self.out.ids:  # continued by an earlier run
                self.index += 1
                continue
            else:
                conv = self.follow[index]
                try:
                    prefix = query_prefix(self.fmt, None, self.user_prefix(index), history=conv.messages)
                except DraftdataError:
                    prefix = None
                if prefix is None or self.budget(len(prefix)) < 1:
                    stats.rejected["template_error" if prefix is None else "too_long"] += 1
                else:
                    turn = sum(m["role"] == "user" for m in conv.messages)
                    rows.append((index, prefix, turn_seed(settings.seed, conv.conversation_id, turn),
                                 self.budget(len(prefix))))
            self.index += 1
            stats.attempts += 1
        return rows

    def take(self, index: int, text: str, stopped: bool, template_token: bool, filtered: bool = False) -> None:
        """One finished sample (the model's continuation): kept (while prompts are missing) or counted
        under its reason (`filtered`: a server's content filter cut it)."""
        text = (self.user_prefix(index) + text).strip()
        conv = self.follow[index] if self.follow is not None else None
        seen = self.seen if conv is None else {fold(m["content"]) for m in conv.messages if m["role"] == "user"}
        reason = "content_filter" if filtered else "too_long" if not stopped else "template_token" if template_token \
            else "too_short" if len(text) < self.settings.min_chars else "duplicate" if fold(text) in seen else None
        if reason is not None:
            self.stats.rejected[reason] += 1
        elif self.missing > 0:
            message = {"role": "user", "content": text}
            if conv is None:
                self.seen.add(fold(text))
                record = {"conversation_id": f"self-{self.settings.seed}-{index:07d}", "conversations": [message]}
            else:
                record = {"conversation_id": conv.conversation_id, "conversations": [*conv.messages, message]}
                if conv.category is not None:
                    record["category"] = conv.category
            self.pending.append(record)
            self.have += 1
            self.stats.written += 1
            if self.progress is not None:
                self.progress.update(1, 0)

    def maybe_flush(self) -> None:
        if len(self.pending) >= self.flush_at or (self.pending and time.perf_counter() - self.last_flush > FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        self.out.append(self.pending)
        self.pending.clear()
        self.last_flush = time.perf_counter()


def read_follow_up(settings: PromptSettings) -> tuple[list[Conversation], Counter]:
    """The --follow-up input's conversations that end with an answer, and the skipped records by reason."""
    follow, skipped = [], Counter()
    for item in read_conversations(settings.follow_up, require_assistant=False, flag="--follow-up"):
        if isinstance(item, Reject):
            skipped[item.reason] += 1
        elif item.messages[-1]["role"] != "assistant":  # prompts not answered yet, or ending with a question
            skipped["not_answered"] += 1
        else:
            follow.append(item)
    if not follow:
        reasons = format_counts(skipped) or "the file is empty"
        raise DraftdataError(f"--follow-up {settings.follow_up}: no conversation ends with an assistant answer "
                             f"({reasons}); answer the prompts first (draftdata synthesize), then continue its output")
    return follow, skipped


def generate_prompts(source: HFGenerator | EndpointClient, settings: PromptSettings, out: JsonlOutput, *,
                     fmt: PromptFormat | None = None, progress: JobProgress | None = None,
                     follow: list[Conversation] | None = None, stats: PromptStats | None = None) -> PromptStats:
    """Sample prompts into `out` until it holds --count of them (or --max-attempts samples were
    drawn, or every conversation of `follow` had its sample).

    source: the local generator, or an endpoint client together with `fmt` (the model's tokenizer
    and template, read here). follow: the answered conversations to continue (--follow-up).
    stats: counts to update (the caller's, so that they survive an interrupt)."""
    local = isinstance(source, HFGenerator)
    fmt = source if local else fmt
    if fmt is None:
        raise ValueError("an endpoint source needs fmt (PromptFormat)")
    t0 = time.perf_counter()
    keep = _Keeper(settings, out, fmt, progress, flush_at=settings.batch_size if local else settings.concurrency,
                   follow=follow, stats=stats)
    try:
        if local:
            _sample_local(source, keep)
        else:
            _sample_endpoint(source, fmt, keep)
    finally:
        keep.flush()  # what was kept before an error or interrupt is written
        keep.stats.seconds = time.perf_counter() - t0
    return keep.stats


def _sample_local(generator: HFGenerator, keep: _Keeper) -> None:
    """Continuous batching: a row that finishes makes room for the next index at once. Finished
    samples are judged in index order, as with an endpoint: which of two equal prompts is kept
    does not depend on finish order, and the file always holds every judged index up to its
    highest, so a rerun after a kill goes on exactly where an uninterrupted run would."""
    special = set(getattr(generator.tokenizer, "all_special_ids", [])) - generator.stop_ids
    batch = generator.new_batch()
    capacity = keep.settings.batch_size
    refill = max(1, capacity // 8)
    order: deque[int] = deque()          # indices handed out, in order: each is in `batch` or in `done`
    done: dict[int, tuple[str, bool, bool]] = {}
    while keep.missing > 0:
        free = min(capacity - len(batch), keep.missing - len(batch) - len(done))  # done: not judged yet
        if free > 0 and batch.can_add and (free >= refill or not len(batch)):
            rows = keep.openings(free)
            if rows:
                batch.add(rows)
                order.extend(row[0] for row in rows)
        if not len(batch):
            break  # --max-attempts reached, or the --follow-up input
        for key, tokens, stopped in batch.step():
            keep.stats.tokens += len(tokens)
            done[key] = (generator.answer(tokens, stopped).text, stopped, bool(special.intersection(tokens[:-1])))
        while order and order[0] in done and keep.missing > 0:
            index = order.popleft()
            keep.take(index, *done.pop(index))
        keep.maybe_flush()


def _sample_endpoint(client: EndpointClient, fmt: PromptFormat, keep: _Keeper) -> None:
    """One request per index, --concurrency in flight, judged in index order (so which of two
    equal prompts is kept does not depend on which answer arrived first)."""
    settings, stats = keep.settings, keep.stats
    decode = fmt.tokenizer.decode
    stops = [t for t in (decode([i]) for i in sorted(fmt.stop_ids)) if t]
    specials = [t for t in (decode([i]) for i in set(getattr(fmt.tokenizer, "all_special_ids", [])) - fmt.stop_ids)
                if t]
    extra = {"stop_token_ids": sorted(fmt.stop_ids), "skip_special_tokens": False}
    inflight: deque[tuple[int, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="draftdata-prompts")
    try:
        while True:
            while len(inflight) < min(settings.concurrency, keep.missing):
                rows = keep.openings(1)
                if not rows:
                    break
                index, prefix, seed, budget = rows[0]
                inflight.append((index, pool.submit(client.complete, prefix, seed, budget, extra)))
            if not inflight:
                break  # --count reached, or --max-attempts, or the end of the --follow-up input
            key, future = inflight.popleft()
            answer = future.result()
            stats.tokens += answer.tokens
            if keep.progress is not None:
                keep.progress.update(0, answer.tokens)
            if answer.filtered:  # one sample the server's filter cut: others (other seeds) may pass
                keep.take(key, "", False, False, filtered=True)
                keep.maybe_flush()
                continue
            if answer.reject is not None:  # every request is this one but for its seed: all would fail
                hint = (" draftdata sends a token-id prompt with the vLLM/SGLang fields stop_token_ids and "
                        "skip_special_tokens; the server must accept them" if answer.reject[1].startswith("HTTP 4")
                        else " Every request differs from it only in its seed, so the run stops here.")
                raise EndpointError(f"--endpoint {client.base}: POST /completions: {answer.reject[1]}.{hint}")
            text, stopped = answer.text, not answer.truncated
            cuts = [text.index(t) for t in stops if t in text]
            if cuts:  # a server that did not stop at the stop ids: cut where the model ended its turn
                text, stopped = text[:min(cuts)], True
            keep.take(key, text, stopped, any(t in text for t in specials))
            keep.maybe_flush()
    finally:
        client.cut_off()  # requests under way end now (their threads would hold the exit until answered)
        pool.shutdown(wait=False, cancel_futures=True)


def run(settings: PromptSettings) -> int:
    """The `draftdata prompts` command: returns 0, or 1 when --max-attempts (or the --follow-up
    input) ran out before --count."""
    client, fmt = None, None
    if settings.endpoint:
        fmt = PromptFormat(settings.model_path, settings.chat_template)
        client = EndpointClient(settings.endpoint, model=settings.model, max_new_tokens=settings.max_new_tokens,
                                temperature=settings.temperature, top_p=settings.top_p, api_key=settings.api_key,
                                timeout=settings.request_timeout, retries=settings.retries)
        settings.model = client.model  # the served name, asked of the server when not given
    follow, skipped = None, Counter()
    if settings.follow_up is not None:
        if Path(settings.follow_up).resolve() == Path(settings.output).resolve():
            raise DraftdataError(f"--output {settings.output} is the --follow-up input; write to a new file")
        follow, skipped = read_follow_up(settings)
    with JsonlOutput(settings.output, command="prompts") as out:
        check_settings(out, settings, command="prompts")
        have = len(out.ids)
        wanted = settings.count if settings.count is not None else len(follow)
        if have >= wanted:
            print(f"draftdata prompts: {out.path} already holds {have:,} prompts (of {wanted:,}); "
                  "nothing to do", file=sys.stderr)
            return 0
        if have:
            print(f"draftdata prompts: {out.path} already holds {have:,} prompts; writing "
                  f"{'up to ' if settings.count is None else ''}{wanted - have:,} more", file=sys.stderr)
        generator = None
        if fmt is None:  # load the model before the progress bar: a failed load prints no progress line
            generator = HFGenerator(settings.model_path, max_new_tokens=settings.max_new_tokens,
                                    temperature=settings.temperature, top_p=settings.top_p,
                                    dtype=settings.dtype, device=settings.device,
                                    chat_template=settings.chat_template)
        bar = JobProgress(total=wanted - have, desc="prompts", unit="prompt")
        stats = PromptStats()
        stopped = True
        try:
            if generator is None:
                generate_prompts(client, settings, out, fmt=fmt, progress=bar, follow=follow, stats=stats)
            else:
                generator.on_step = lambda t: bar.update(0, t)
                generate_prompts(generator, settings, out, progress=bar, follow=follow, stats=stats)
            stopped = False
        finally:  # also after Ctrl-C or an error once sampling began: the summary of what was written
            bar.close()
            if generator is not None:
                generator.close()
            total = len(out.ids)
            if not stopped or stats.attempts:
                stats.skipped_input = skipped
                goal = f"--count {wanted:,}" if settings.count is not None else f"{wanted:,} conversations to continue"
                print(stats.format(str(out.path), goal, total, follow=follow is not None))
                (sidecar_dir(out.path) / f"prompts-summary-{int(time.time())}-{os.getpid()}.json").write_text(
                    json.dumps({"stats": {**asdict(stats), "rejected": dict(stats.rejected),
                                          "skipped_input": dict(stats.skipped_input)},
                                "settings": settings.report_dict(), "stopped_early": stopped}, indent=2) + "\n")
                if stopped:
                    print("draftdata prompts: stopped early; every prompt written so far is kept, rerun the same "
                          "command to continue", file=sys.stderr)
    if settings.count is not None and total < settings.count:
        all_used = follow is not None and stats.attempts < settings.max_attempts
        ran_out = f"--follow-up's {len(follow):,} conversations" if all_used else \
            f"--max-attempts {settings.max_attempts:,}"
        if all_used:  # a rerun has no conversation left to continue
            hint = "every answered conversation of --follow-up was used: lower --count, or answer more conversations"
        elif not stats.written:  # a rerun starts from the same sample indices and draws the same samples
            hint = ("nothing was kept, so a rerun with these settings draws the same samples again: raise "
                    "--max-new-tokens or --temperature, or change --seed")
        else:
            hint = "raise --max-new-tokens or --temperature, or rerun to continue"
        print(f"draftdata prompts: only {total:,} of {settings.count:,} prompts after {stats.attempts:,} samples "
              f"({ran_out}); most were rejected as "
              f"{stats.rejected.most_common(1)[0][0] if stats.rejected else '-'}: {hint}", file=sys.stderr)
        return 1
    return 0


__all__ = ["PromptFormat", "PromptSettings", "PromptStats", "fold", "generate_prompts", "query_prefix", "run"]
