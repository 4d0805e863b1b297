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
import re
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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

SENTINEL = "\x00draftdata-user-message\x00"
ID_PATTERN = re.compile(r"^self-(-?\d+)-(\d+)$")


@dataclass
class PromptSettings:
    """Everything a `draftdata prompts` run needs."""

    model: str | None  # --model as given; with --endpoint the served name (None: the server's only model)
    model_path: str    # the local model directory; with --endpoint the --tokenizer directory
    output: str
    count: int
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

    def __post_init__(self) -> None:
        if self.count < 1:
            raise DraftdataError("--count must be a positive integer")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise DraftdataError("--max-new-tokens, --batch-size and --concurrency must be positive integers")
        if self.temperature <= 0:
            raise DraftdataError("--temperature must be > 0: greedy decoding writes the same prompt every time")
        if not 0 < self.top_p <= 1:
            raise DraftdataError("--top-p must be in (0, 1]")
        if self.max_attempts is None:
            self.max_attempts = 3 * self.count + 64
        if self.max_attempts < self.count:
            raise DraftdataError(f"--max-attempts {self.max_attempts} is below --count {self.count}")
        if any(not p.strip() for p in self.user_prefixes):
            raise DraftdataError("--user-prefix must not be empty or blank (leave it out to let the model "
                                 "write the whole message)")

    def identity(self) -> dict[str, Any]:
        """The settings that decide what gets written (a rerun into the same output must keep them)."""
        import hashlib

        from draftdata.models import model_hash, model_identity, tokenizer_hash

        template = hashlib.sha256(self.chat_template.encode()).hexdigest()[:16] if self.chat_template else None
        if self.endpoint:
            model = {"model_id": self.model, "model_hash": None, "endpoint": self.endpoint,
                     "tokenizer_hash": tokenizer_hash(self.model_path)}
        else:
            model = {"model_id": model_identity(self.model_path)[0], "model_hash": model_hash(self.model_path)}
        return {"command": "prompts", **model, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "system_prompt": self.system_prompt, "user_prefixes": self.user_prefixes or None,
                "chat_template_hash": template, "min_chars": self.min_chars,
                "dtype": None if self.endpoint else self.dtype}

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


def query_prefix(fmt: HFGenerator | PromptFormat, system_prompt: str | None = None, user_prefix: str = "") -> list[int]:
    """Token ids of the chat template up to where a user message's text begins, followed by
    `user_prefix` (the message's first words, tokenized together with the template text)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + \
        [{"role": "user", "content": SENTINEL}]
    try:
        text = fmt.chat.render(messages)
    except Exception as e:  # noqa: BLE001 - jinja raises TemplateError, or anything the template calls
        raise DraftdataError(f"the chat template failed on a one-message conversation: {type(e).__name__}: {e}") \
            from None
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


class _Keeper:
    """Judges finished samples in the order given and appends the kept ones to the output
    (in batches: up to `flush_at` records or every FLUSH_SECONDS)."""

    def __init__(self, settings: PromptSettings, out: JsonlOutput, progress: JobProgress | None,
                 flush_at: int) -> None:
        self.settings, self.out, self.progress, self.flush_at = settings, out, progress, flush_at
        self.seen, self.next_index = read_existing(out.path, settings.seed)
        self.have = len(out.ids)
        self.stats = PromptStats()
        self.pending: list[dict[str, Any]] = []
        self.last_flush = time.perf_counter()

    @property
    def missing(self) -> int:
        return self.settings.count - self.have

    def user_prefix(self, index: int) -> str:
        """The opening words sample `index` continues ("" without --user-prefix)."""
        prefixes = self.settings.user_prefixes
        return prefixes[index % len(prefixes)] if prefixes else ""

    def take(self, index: int, text: str, stopped: bool, template_token: bool) -> None:
        """One finished sample (the model's continuation): kept (while prompts are missing) or counted
        under its reason."""
        text = (self.user_prefix(index) + text).strip()
        reason = "too_long" if not stopped else "template_token" if template_token \
            else "too_short" if len(text) < self.settings.min_chars else "duplicate" if fold(text) in self.seen else None
        if reason is not None:
            self.stats.rejected[reason] += 1
        elif self.missing > 0:
            self.seen.add(fold(text))
            self.pending.append({"conversation_id": f"self-{self.settings.seed}-{index:07d}",
                                 "conversations": [{"role": "user", "content": text}]})
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


def generate_prompts(source: HFGenerator | EndpointClient, settings: PromptSettings, out: JsonlOutput, *,
                     fmt: PromptFormat | None = None, progress: JobProgress | None = None) -> PromptStats:
    """Sample prompts into `out` until it holds --count of them (or --max-attempts samples were drawn).

    source: the local generator, or an endpoint client together with `fmt` (the model's tokenizer
    and template, read here)."""
    local = isinstance(source, HFGenerator)
    fmt = source if local else fmt
    if fmt is None:
        raise ValueError("an endpoint source needs fmt (PromptFormat)")
    prefixes = [query_prefix(fmt, settings.system_prompt, p) for p in settings.user_prefixes or [""]]
    longest = max(map(len, prefixes))
    budget = min(settings.max_new_tokens, fmt.max_seq_len - longest)
    if budget < 1:
        raise DraftdataError(f"the prompt prefix has {longest} tokens: no room within the model's "
                             f"{fmt.max_seq_len} positions")
    t0 = time.perf_counter()
    keep = _Keeper(settings, out, progress, flush_at=settings.batch_size if local else settings.concurrency)
    try:
        if local:
            _sample_local(source, prefixes, budget, keep)
        else:
            _sample_endpoint(source, fmt, prefixes, budget, keep)
    finally:
        keep.flush()  # what was kept before an error or interrupt is written
    keep.stats.seconds = time.perf_counter() - t0
    return keep.stats


def _sample_local(generator: HFGenerator, prefixes: list[list[int]], budget: int, keep: _Keeper) -> None:
    """Continuous batching: a row that finishes makes room for the next index at once."""
    settings, stats = keep.settings, keep.stats
    special = set(getattr(generator.tokenizer, "all_special_ids", [])) - generator.stop_ids
    batch = generator.new_batch()
    capacity, refill = settings.batch_size, max(1, settings.batch_size // 8)
    index = keep.next_index
    while keep.missing > 0:
        free = min(capacity - len(batch), keep.missing - len(batch), settings.max_attempts - stats.attempts)
        if free > 0 and batch.can_add and (free >= refill or not len(batch)):
            batch.add([(index + k, prefixes[(index + k) % len(prefixes)], turn_seed(settings.seed, f"self-{index + k}", 0),
                        budget)
                       for k in range(free)])
            index += free
            stats.attempts += free
        if not len(batch):
            break  # --max-attempts reached
        for key, tokens, stopped in batch.step():
            stats.tokens += len(tokens)
            keep.take(key, generator.answer(tokens, stopped).text, stopped, bool(special.intersection(tokens[:-1])))
        keep.maybe_flush()


def _sample_endpoint(client: EndpointClient, fmt: PromptFormat, prefixes: list[list[int]], budget: int,
                     keep: _Keeper) -> None:
    """One request per index, --concurrency in flight, judged in index order (so which of two
    equal prompts is kept does not depend on which answer arrived first)."""
    settings, stats = keep.settings, keep.stats
    decode = fmt.tokenizer.decode
    stops = [t for t in (decode([i]) for i in sorted(fmt.stop_ids)) if t]
    specials = [t for t in (decode([i]) for i in set(getattr(fmt.tokenizer, "all_special_ids", [])) - fmt.stop_ids)
                if t]
    extra = {"stop_token_ids": sorted(fmt.stop_ids), "skip_special_tokens": False}
    index = keep.next_index
    inflight: deque[tuple[int, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="draftdata-prompts")
    try:
        while True:
            while len(inflight) < min(settings.concurrency, keep.missing) and stats.attempts < settings.max_attempts:
                seed = turn_seed(settings.seed, f"self-{index}", 0)
                prefix = prefixes[index % len(prefixes)]
                inflight.append((index, pool.submit(client.complete, prefix, seed, budget, extra)))
                index += 1
                stats.attempts += 1
            if not inflight:
                break  # --count reached, or --max-attempts
            key, future = inflight.popleft()
            answer = future.result()
            stats.tokens += answer.tokens
            if keep.progress is not None:
                keep.progress.update(0, answer.tokens)
            if answer.reject is not None:  # every request is this one but for its seed: all would fail
                raise EndpointError(f"--endpoint {client.base}: POST /completions: {answer.reject[1]}. draftdata "
                                    "sends a token-id prompt with the vLLM/SGLang fields stop_token_ids and "
                                    "skip_special_tokens; the server must accept them")
            text, stopped = answer.text, not answer.truncated
            cuts = [text.index(t) for t in stops if t in text]
            if cuts:  # a server that did not stop at the stop ids: cut where the model ended its turn
                text, stopped = text[:min(cuts)], True
            keep.take(key, text, stopped, any(t in text for t in specials))
            keep.maybe_flush()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run(settings: PromptSettings) -> int:
    """The `draftdata prompts` command: returns 0, or 1 when --max-attempts ran out before --count."""
    client, fmt = None, None
    if settings.endpoint:
        fmt = PromptFormat(settings.model_path, settings.chat_template)
        client = EndpointClient(settings.endpoint, model=settings.model, max_new_tokens=settings.max_new_tokens,
                                temperature=settings.temperature, top_p=settings.top_p, api_key=settings.api_key,
                                timeout=settings.request_timeout, retries=settings.retries)
        settings.model = client.model  # the served name, asked of the server when not given
    with JsonlOutput(settings.output, command="prompts") as out:
        check_settings(out, settings, command="prompts")
        have = len(out.ids)
        if have >= settings.count:
            print(f"draftdata prompts: {out.path} already holds {have:,} prompts (--count {settings.count:,}); "
                  "nothing to do", file=sys.stderr)
            return 0
        if have:
            print(f"draftdata prompts: {out.path} already holds {have:,} prompts; writing "
                  f"{settings.count - have:,} more", file=sys.stderr)
        generator = None
        if fmt is None:  # load the model before the progress bar: a failed load prints no progress line
            generator = HFGenerator(settings.model_path, max_new_tokens=settings.max_new_tokens,
                                    temperature=settings.temperature, top_p=settings.top_p,
                                    dtype=settings.dtype, device=settings.device,
                                    chat_template=settings.chat_template)
        bar = JobProgress(total=settings.count - have, desc="prompts", unit="prompt")
        try:
            if generator is None:
                stats = generate_prompts(client, settings, out, fmt=fmt, progress=bar)
            else:
                generator.on_step = lambda t: bar.update(0, t)
                stats = generate_prompts(generator, settings, out, progress=bar)
        finally:
            bar.close()
            if generator is not None:
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


__all__ = ["PromptFormat", "PromptSettings", "PromptStats", "fold", "generate_prompts", "query_prefix", "run"]
