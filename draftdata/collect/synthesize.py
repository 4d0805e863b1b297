"""`draftdata synthesize`: rewrite every assistant turn of a conversation file with the base model.

A draft trained on the base model's own answers accepts more tokens than one trained on
human or other-model answers, because it learns the distribution it will be asked to guess.

What a conversation becomes: its assistant messages are dropped, `--system-prompt` is
injected where it has no system message (or replaces them all with `--replace-system-prompt`),
and every user message is answered in order, each answer generated after the model's own
earlier answers (so a two-question conversation is a real multi-turn chat with the model).
System messages stay where they were.

Two ways to generate:
- local (`HFGenerator`): batched decoding with transformers on CPU/CUDA, continuous batching
  (`decode_batch.RunningBatch`): a finished answer leaves the batch and the next prompt joins
  it at once, left-padded into the shared KV cache. Each (conversation, turn) draws its random
  numbers from its own generator seeded from (--seed, id, turn), so an
  answer does not depend on which other conversations share its batch, on the batch size, on
  resuming, or on how a Ray job split the input (up to float rounding of batched matmuls);
  temperature 0 is greedy.
- `--endpoint URL` (`EndpointClient`): any OpenAI-compatible chat-completions server (vLLM,
  SGLang, TRT-LLM serve); conversations run concurrently on a small thread pool, each turn one
  POST {URL}/v1/chat/completions carrying the same per-turn seed.

Output (`JsonlOutput`): JSONL in the format `collect` reads, ids kept, appended in whole lines
(one write + fsync per --batch-size finished conversations, or every 30 s) while an exclusive
lock keeps a second run off the file. A rerun skips the ids already written; a line torn by a
kill is cut off (with a message) before anything is appended, so a kill loses at most the
conversations in flight or not yet written (a rerun generates them again) and never breaks the
file. `<OUT>.synth/` holds the settings the file was written with (a rerun with other
generation settings is refused: it would mix two distributions), the run summaries and the
rejects.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from draftdata.collect.conversations import (
    TRUNCATED,
    Conversation,
    RecordError,
    Reject,
    read_conversations,
    warn_no_records,
)
from draftdata.collect.stats import RunStats, write_run_reports
from draftdata.errors import DraftdataError
from draftdata.progress import JobProgress

if TYPE_CHECKING:
    from draftdata.collect.decode_batch import RunningBatch

# Reject reasons of synthesize (reading the input rejects with collect's REASONS as well).
SYNTH_REASONS = {
    "no_user_turn": "the conversation has no user message, so there is nothing to answer",
    "template_error": "the chat template failed on this conversation",
    "too_long": "a prompt is longer than --max-seq-len tokens, so its turn cannot be answered",
    "endpoint_rejected": "the endpoint refused the request (HTTP 4xx) or returned no answer",
}
SIDECAR_SUFFIX = ".synth"  # <OUT>.synth/: settings.json, summary-*.json, rejects-*.jsonl

Progress = Callable[[int, int], None]  # (conversations finished, tokens generated) since the last call
Sink = Callable[[list[dict[str, Any]]], None]  # takes finished output records, one batch at a time


# ---------------------------------------------------------------- settings and stats

@dataclass
class SynthSettings:
    """Everything a synthesize run needs, resolved and picklable (Ray ships it to actors)."""

    input: str
    output: str
    model: str | None = None  # --model as given (the served model name with --endpoint)
    model_path: str | None = None  # resolved local HF directory (local generation only)
    endpoint: str | None = None
    api_key: str | None = None
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None
    replace_system_prompt: bool = False
    keep_answers: bool = False  # --keep-answers: keep the input's answers, generate only the missing ones
    chat_template: str | None = None  # template text from --chat-template
    max_seq_len: int | None = None  # None: the model's max_position_embeddings
    batch_size: int = 32
    concurrency: int = 8
    request_timeout: float = 600.0
    retries: int = 5
    dtype: str = "auto"
    device: str = "cpu"
    limit: int | None = None
    strict: bool = False
    rejects: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise DraftdataError("--max-new-tokens must be a positive integer")
        if self.temperature < 0:
            raise DraftdataError("--temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise DraftdataError("--top-p must be in (0, 1]")
        for name in ("batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise DraftdataError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise DraftdataError("--max-seq-len must be at least 2")
        if self.limit is not None and self.limit < 0:
            raise DraftdataError("--limit must be >= 0")
        if self.endpoint is None and self.model_path is None:
            raise DraftdataError("give --model (a local model to generate with) or --endpoint URL")

    def identity(self) -> dict[str, Any]:
        """The settings that decide what gets written (compared when a run resumes an output)."""
        from draftdata.models import generation_hash, model_hash, model_identity

        if self.endpoint:
            model_id, weights, files = self.model, None, None
        else:
            model_id, weights = model_identity(self.model_path)[0], model_hash(self.model_path)
            files = generation_hash(self.model_path)  # the template and end-of-turn ids
        template = hashlib.sha256(self.chat_template.encode()).hexdigest()[:16] if self.chat_template else None
        return {"model_id": model_id, "model_hash": weights, "generation_hash": files, "endpoint": self.endpoint,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "system_prompt": self.system_prompt,
                "replace_system_prompt": self.replace_system_prompt, "keep_answers": self.keep_answers,
                "chat_template_hash": template,
                "dtype": None if self.endpoint else self.dtype, "max_seq_len": self.max_seq_len}

    def report_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["api_key"] = self.api_key is not None  # never write secrets
        d["storage_options"] = sorted(self.storage_options)
        d["chat_template"] = self.chat_template is not None
        return d


@dataclass
class SynthStats(RunStats):
    """Counts for the synthesize summary; `tokens`: tokens generated (answers incl. their
    end-of-turn token); `truncated`: answers cut at --max-new-tokens (or --max-seq-len)."""

    answers: int = 0  # assistant turns generated
    empty: int = 0  # generated answers with no text (the model ended its turn at once; kept)
    generate_seconds: float = 0.0
    leading_assistant: int = 0  # written conversations whose assistant messages before any user message were dropped
    discarded_tokens: int = 0  # generated for conversations rejected at a later turn (not written)

    def format(self, output: str, input: str | None = None, rejects: str | None = None) -> str:
        generated = self.tokens + self.discarded_tokens  # the rate counts all the work the time went into
        rate = generated / self.generate_seconds if self.generate_seconds > 0 else 0.0
        lines = self.summary_lines("synthesize", [f"  written    {self.written:,} conversations, {self.answers:,} "
                                                  f"answers, {self.tokens:,} tokens generated ({rate:,.0f} tokens/s)"],
                                   input)
        if self.discarded_tokens:
            lines.append(f"  discarded  {self.discarded_tokens:,} tokens generated for earlier turns of conversations "
                         "rejected at a later turn (in the rejects file)")
        if self.truncated:
            lines.append(f"  truncated  {self.truncated:,} answers cut at --max-new-tokens or the context "
                         "(kept, marked 'truncated')")
        if self.empty:
            lines.append(f"  empty      {self.empty:,} answers have no text (the model ended its turn at once; kept)")
        if self.leading_assistant:
            n = self.leading_assistant
            lines.append(f"  dropped    assistant messages before the first user message, in {n:,} "
                         f"conversation{'' if n == 1 else 's'} (they answer nothing, so no answer replaces them)")
        return "\n".join(lines + self.where_lines(output, rejects))


# ---------------------------------------------------------------- conversations turn by turn

@dataclass
class Prompt:
    """One turn to answer: the messages so far (ending with a user message) and its seed."""

    messages: list[dict[str, str]]
    seed: int
    source: str = ""


@dataclass
class Answer:
    text: str = ""
    tokens: int = 0  # generated tokens, incl. the end-of-turn token when there is one
    truncated: bool = False  # stopped by the token limit, not by the model
    reject: tuple[str, str] | None = None  # (reason, detail): this conversation cannot be finished
    filtered: bool = False  # the reject is a server's content filter (prompts: one failed sample, not a stop)


def turn_seed(seed: int, conversation_id: str, turn: int) -> int:
    """The seed of one answer: a hash of (--seed, conversation id, turn), 31 bits (fits every
    server's `seed` field). It is what makes sampling independent of batching and ordering."""
    digest = hashlib.sha256(f"{seed}\x00{conversation_id}\x00{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class TurnState:
    """A conversation being rewritten: the messages it keeps, answered one user turn at a time."""

    def __init__(self, conv: Conversation, *, seed: int = 0, system_prompt: str | None = None,
                 replace_system_prompt: bool = False, keep_answers: bool = False):
        first_user = next((i for i, m in enumerate(conv.messages) if m["role"] == "user"), len(conv.messages))
        # the answers are written again (or, --keep-answers, kept: an assistant message right after a
        # user message, that turn's answer); assistant messages before the first user message answer
        # nothing, so they are dropped either way, and so are other ones (after a system message or
        # another answer), which the model did not write for a user turn
        msgs = conv.messages
        kept = [m for i, m in enumerate(msgs) if m["role"] != "assistant"
                or (keep_answers and i > first_user and msgs[i - 1]["role"] == "user")]
        self.leading_assistant = sum(m["role"] == "assistant" for m in conv.messages[:first_user])
        if system_prompt is not None:
            if replace_system_prompt:
                kept = [m for m in kept if m["role"] != "system"]
            if not any(m["role"] == "system" for m in kept):
                kept.insert(0, {"role": "system", "content": system_prompt})
        if not any(m["role"] == "user" for m in kept):
            raise RecordError("no_user_turn", "no user message to answer", conv.conversation_id)
        self.conv, self.seed = conv, seed
        self.todo = kept
        self.messages: list[dict[str, str]] = []
        self.turn = 0  # user turns answered so far (kept answers included: the seed of turn k is the same either way)
        self.kept = 0  # answers kept from the input (--keep-answers)
        self.tokens = 0
        self.truncated = 0
        self.empty = 0  # generated answers with no text
        self.waiting = False  # the last message is a user message waiting for its answer
        self._advance()

    @property
    def finished(self) -> bool:
        return not self.waiting

    def _advance(self) -> None:
        """Move kept messages into `messages` up to and including the next user message that has
        no answer (with --keep-answers, an assistant message right after a user message is its
        answer, kept); with none left, move the rest (trailing system messages stay in place) and
        finish."""
        while self.todo:
            m = self.todo.pop(0)
            if m["role"] == "assistant" and self.messages and self.messages[-1]["role"] == "user":
                self.turn += 1
                self.kept += 1
            self.messages.append(dict(m))
            if m["role"] == "user" and not (self.todo and self.todo[0]["role"] == "assistant"):
                self.waiting = True
                return

    def prompt(self) -> Prompt:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.messages]  # no "truncated"
        return Prompt(messages, turn_seed(self.seed, self.conv.conversation_id, self.turn), self.conv.source)

    def add_answer(self, answer: Answer) -> None:
        # A cut answer is marked: the end of turn after it in a rendered conversation is not the
        # model's, and collect leaves it out of the loss.
        self.messages.append({"role": "assistant", "content": answer.text, **({TRUNCATED: True} if answer.truncated
                                                                              else {})})
        self.waiting = False
        self.turn += 1
        self.tokens += answer.tokens
        self.truncated += int(answer.truncated)
        self.empty += int(not answer.text.strip())
        self._advance()

    def record(self) -> dict[str, Any]:
        record = {"conversation_id": self.conv.conversation_id, "conversations": self.messages}
        if self.conv.category is not None:  # kept for eval's per-category breakdown
            record["category"] = self.conv.category
        return record


def start_turns(conv: Conversation, settings: SynthSettings) -> TurnState:
    return TurnState(conv, seed=settings.seed, system_prompt=settings.system_prompt,
                     replace_system_prompt=settings.replace_system_prompt, keep_answers=settings.keep_answers)


# ---------------------------------------------------------------- local generation (transformers)

def load_tokenizer(model_path: str | os.PathLike) -> Any:
    """The model directory's tokenizer (no weights are read)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError) as e:
        raise DraftdataError(f"--model {model_path}: cannot load its tokenizer: {e}") from None


def stop_token_ids(generation_eos: Any, tokenizer: Any, render: Callable[..., str]) -> set[int]:
    """End-of-generation ids: the generation config's eos (`generation_eos`, an id, a list or
    None) and the tokenizer's, plus the token the chat template puts after an assistant reply
    (e.g. <|im_end|>, <|eot_id|>) when special."""
    ids: set[int] = set()
    for value in (generation_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    marker = "Zq7xW"
    try:
        text = render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
        after = text[text.index(marker) + len(marker):]
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in set(tokenizer.all_special_ids):
            ids.add(int(first[0]))
    except Exception:  # noqa: BLE001 - templates that reject this probe still have eos
        pass
    if not ids:
        raise DraftdataError("the model has no end-of-sequence token (generation_config.eos_token_id, "
                             "tokenizer.eos_token); answers would never end")
    return ids


GQA_ATTENTION = "draftdata_sdpa_gqa"


def _grouped_decode_attention(query: Any, key: Any, value: Any, mask: Any, scaling: float | None) -> Any:
    """Attention of one query token per row, [B, Hq, 1, D] over keys/values [B, Hkv, S, D], as
    two batched matmuls with the query heads of each KV head stacked (no KV copy per query head),
    softmax in fp32. `mask`: None, bool [B, 1, 1, >=S] (True = attend) or additive float.
    Returns [B, 1, Hq, D], the layout transformers' attention functions return."""
    import torch

    b, hq, _, d = query.shape
    hkv, s = key.shape[1], key.shape[-2]
    q = query.reshape(b, hkv, hq // hkv, d)                  # query head h uses KV head h // groups
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * (d ** -0.5 if scaling is None else scaling)
    if mask is not None:
        m = mask[..., -1:, :s]                               # [B or 1, 1, 1, S], broadcast over heads
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(b, 1, hq, d)


def _register_gqa_attention() -> str | None:
    """SDPA attention that keeps grouped-query KV heads grouped (`enable_gqa=True`) even with a
    padding mask. transformers' own sdpa path copies the KV cache to every query head whenever a
    mask is given (it enables GQA only without a mask); for left-padded batched decoding that copy
    dominated CPU time (bench/synth/results.md). Same kernel family, same results.

    One-token decode steps in bf16/fp16 on the CPU take `_grouped_decode_attention` instead:
    torch's CPU SDPA kernel is ~6x slower in bf16 than in fp32 for a single query, which cancelled
    what bf16 matmuls gain (bench/synth/results.md)."""
    import torch

    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # an older transformers: its default attention (correct, slower on CPU)
        return None

    half = (torch.bfloat16, torch.float16)

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                  scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
        if (query.shape[-2] == 1 and query.device.type == "cpu" and query.dtype in half
                and not dropout and query.shape[1] % key.shape[1] == 0
                and (attention_mask is None or attention_mask.shape[1] == 1)):
            return _grouped_decode_attention(query, key, value, attention_mask, scaling), None
        if attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1 or dropout:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask[:, :, :, :key.shape[-2]], scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(GQA_ATTENTION, attention)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    return GQA_ATTENTION


class HFGenerator:
    """Batched generation with transformers: left-padded prefill, KV-cache decoding, finished rows
    dropped from the batch, per-row seeded sampling."""

    def __init__(self, model_path: str | os.PathLike, *, max_new_tokens: int = 1024, temperature: float = 0.0,
                 top_p: float = 1.0, dtype: str = "auto", device: str = "cpu", chat_template: str | None = None,
                 max_seq_len: int | None = None):
        import torch
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM

        from draftdata.collect.backends.hf import DTYPES, load_error
        from draftdata.collect.conversations import ChatTokenizer
        from draftdata.models import check_device, compute_dtype, quiet_transformers

        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.device = check_device(device)
        dtype = compute_dtype(dtype, self.device)
        if dtype not in DTYPES:
            raise DraftdataError(f"--dtype {dtype!r}: expected auto, bf16, fp16 or fp32")
        self.tokenizer = load_tokenizer(model_path)
        self.chat = ChatTokenizer(self.tokenizer, chat_template=chat_template)
        if self.device.type == "cuda" and device == "cuda" and torch.cuda.device_count() > 1:
            device_map: Any = "auto"  # spread a model too big for one GPU over all visible GPUs
        else:
            device_map = None if self.device.type == "cpu" else str(self.device)
        try:
            with quiet_transformers():
                self.model = AutoModelForCausalLM.from_pretrained(
                    str(model_path), dtype=DTYPES[dtype], device_map=device_map,
                    attn_implementation=_register_gqa_attention()).eval()
        except (OSError, ValueError, SafetensorError) as e:
            raise load_error(model_path, e) from None
        self.model.requires_grad_(False)
        self.input_device = self.model.get_input_embeddings().weight.device
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        positions = getattr(config, "max_position_embeddings", None)
        if max_seq_len and positions and max_seq_len > positions:  # RoPE past its range: fluent-looking garbage
            print(f"draftdata: warning: --max-seq-len {max_seq_len} is above the model's {positions} positions "
                  "(max_position_embeddings); answers past them are not what the model was trained to write",
                  file=sys.stderr)
        self.max_seq_len = max_seq_len or positions or 1 << 30
        self.stop_ids = stop_token_ids(getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer,
                                       self.chat.render)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else min(self.stop_ids)
        self.on_step: Callable[[int], None] | None = None  # called with the tokens of each decode step

    def encode(self, prompt: Prompt) -> list[int] | Answer:
        """Token ids of the prompt with the generation header, or a rejecting Answer."""
        try:
            text = self.chat.render(prompt.messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja raises TemplateError, or anything the template calls
            return Answer(reject=("template_error", f"{type(e).__name__}: {e}"))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.max_seq_len:
            return Answer(reject=("too_long", f"turn {_user_turns(prompt.messages)}: the prompt has {len(ids)} "
                                  f"tokens, no room to answer within --max-seq-len {self.max_seq_len}"))
        return ids

    def new_batch(self) -> RunningBatch:
        """An empty running batch of this model (continuous batching where its cache allows)."""
        from draftdata.collect.decode_batch import RunningBatch

        return RunningBatch(self.model, stop_ids=self.stop_ids, pad_id=self.pad_id, temperature=self.temperature,
                            top_p=self.top_p, on_step=self.on_step)

    def budget(self, prompt_ids: list[int]) -> int:
        """The most new tokens a prompt may get: --max-new-tokens, within --max-seq-len."""
        return min(self.max_new_tokens, self.max_seq_len - len(prompt_ids))

    def answer(self, tokens: list[int], stopped: bool) -> Answer:
        """The Answer for generated tokens (the stop token is counted, not decoded)."""
        body = tokens[:-1] if stopped else tokens
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        if not stopped:  # a cut inside a character's bytes decodes to U+FFFD: not the model's text
            text = text.rstrip("\ufffd")
        return Answer(text, len(tokens), truncated=not stopped)

    def generate(self, prompts: list[Prompt]) -> list[Answer]:
        """One answer per prompt, in order (all of them decoded as one running batch)."""
        answers: list[Answer | None] = [None] * len(prompts)
        todo: list[tuple[int, list[int], int]] = []
        for i, p in enumerate(prompts):
            enc = self.encode(p)
            if isinstance(enc, Answer):
                answers[i] = enc
            else:
                todo.append((i, enc, p.seed))
        if todo:
            results = self._generate_split([t for _, t, _ in todo], [s for _, _, s in todo])
            for (i, _, _), (tokens, stopped) in zip(todo, results):
                answers[i] = self.answer(tokens, stopped)
        return answers  # type: ignore[return-value]

    def _generate_split(self, batch: list[list[int]], seeds: list[int]) -> list[tuple[list[int], bool]]:
        """`generate_ids`, halving the batch on GPU out-of-memory (the halves run after the `except`
        block, whose live traceback would keep the failed attempt's memory allocated)."""
        import torch

        try:
            return self.generate_ids(batch, seeds)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise DraftdataError(f"out of GPU memory generating for one prompt of {len(batch[0])} tokens; "
                                     "lower --max-new-tokens / --max-seq-len or use a bigger GPU") from None
        torch.cuda.empty_cache()
        print(f"draftdata: out of memory on a batch of {len(batch)}; splitting it (lower "
              "--batch-size to avoid this)", file=sys.stderr)
        half = len(batch) // 2
        return self._generate_split(batch[:half], seeds[:half]) + self._generate_split(batch[half:], seeds[half:])

    def generate_ids(self, batch: list[list[int]], seeds: list[int]) -> list[tuple[list[int], bool]]:
        """Generate for token-id prompts: (new tokens incl. the stop token, stopped by the model)."""
        running = self.new_batch()
        running.add([(i, ids, seed, self.budget(ids)) for i, (ids, seed) in enumerate(zip(batch, seeds))])
        results: dict[int, tuple[list[int], bool]] = {}
        while len(running):
            for i, tokens, stopped in running.step():
                results[i] = (tokens, stopped)  # type: ignore[index]
        return [results[i] for i in range(len(batch))]

    def close(self) -> None:
        import torch

        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _user_turns(messages: list[dict[str, str]]) -> int:
    return sum(m["role"] == "user" for m in messages)


# ---------------------------------------------------------------- OpenAI-compatible endpoint

class EndpointError(DraftdataError):
    """The endpoint is unreachable or keeps failing (after retries): the run stops, resumable."""


def endpoint_base(url: str) -> str:
    """`http://host:8000`, `.../v1`, `.../v1/chat/completions` or `.../v1/completions` -> `http://host:8000/v1`."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise DraftdataError(f"--endpoint {url!r}: expected an http:// or https:// URL")
    for tail in ("/chat/completions", "/completions", "/v1"):
        if base.endswith(tail):
            base = base[: -len(tail)]
    return base + "/v1"


STOP_GRACE_S = 2.0  # how long a stopping run waits for answers under way before it cuts them off


class EndpointClient:
    """Answers prompts through POST {base}/chat/completions, one request per turn, with retries
    (connection errors, 408/429/5xx: exponential backoff) and the per-turn seed; `complete`
    continues raw token ids through POST {base}/completions (for `draftdata prompts`)."""

    def __init__(self, url: str, *, model: str | None = None, max_new_tokens: int = 1024,
                 temperature: float = 0.0, top_p: float = 1.0, api_key: str | None = None,
                 timeout: float = 600.0, retries: int = 5, backoff: float = 1.0):
        self.base = endpoint_base(url)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.api_key, self.timeout, self.retries, self.backoff = api_key, timeout, retries, backoff
        self.stopping = threading.Event()  # set when the run stops: no further attempt or backoff wait
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # connections, for cut_off
        self._sockets_lock, self._cut = threading.Lock(), threading.Event()
        self._opener = urllib.request.build_opener(_NoRedirect, *_tracking_handlers(self))
        self.model = model or self._only_model()

    def _connected(self, sock: socket.socket) -> None:
        """Remember a request's connection, so that cut_off can end it."""
        with self._sockets_lock:
            self._sockets.add(sock)
        if self._cut.is_set():  # connected while cut_off ran
            _shut(sock)

    def start_run(self) -> None:
        """Clear an earlier run's stop (a Ray actor keeps one client for all its work units)."""
        self.stopping.clear()
        self._cut.clear()

    def cut_off(self) -> None:
        """End every request under way at once (their calls fail and make no further attempt):
        urllib's blocking reads otherwise hold a stopping run for up to --request-timeout. A
        request still connecting ends within CONNECT_TIMEOUT_S."""
        self.stopping.set()
        self._cut.set()
        with self._sockets_lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """(status, parsed JSON or text); retries transient failures, raises EndpointError when they persist."""
        url = self.base + path
        data = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            if attempt and self.stopping.wait(min(60.0, self.backoff * 2 ** (attempt - 1))):
                raise EndpointError(f"--endpoint {self.base}: {method} {path}: the run is stopping (last: {last})")
            req = urllib.request.Request(url, data=data, method=method, headers=self._headers())
            deadline = time.monotonic() + self.timeout  # for the whole request, not each socket read
            garbled = None  # the body of this attempt's 200 when it is not JSON
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    status, raw = resp.status, _read_until(resp, deadline)
                payload = _json_or_text(raw)
                if status == 200 and isinstance(payload, str) and method == "POST":
                    garbled = payload  # cut off on the way? ask again; the same every time: the caller rejects it
                    last = f"HTTP 200 with a body that is not JSON ({_one_line(payload)})"
                    continue
                return status, payload
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:  # (a GET to the same host was followed; see _NoRedirect)
                    raise EndpointError(f"--endpoint {self.base}: {method} {path} was redirected (HTTP {e.code} to "
                                        f"{e.headers.get('Location', '?')}); give the final URL") from None
                try:
                    payload = _json_or_text(_read_until(e, deadline))
                except (http.client.HTTPException, ConnectionError, TimeoutError, OSError) as read_error:
                    payload = f"(the error body could not be read: {type(read_error).__name__})"
                if e.code in (408, 429) or e.code >= 500:
                    last = f"HTTP {e.code}: {_error_text(payload)}"
                    continue
                return e.code, payload
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if garbled is not None:  # the last attempt too: the same every time, so the caller rejects it
            return 200, garbled
        raise EndpointError(f"--endpoint {self.base}: {method} {path} failed {self.retries + 1} times, last: "
                            f"{last}. Check that the server is up; rerun the same command to resume")

    def _only_model(self) -> str:
        """The served model name from GET /models, when the server serves exactly one."""
        status, payload = self._request("GET", "/models")
        if status == 404:
            raise DraftdataError(f"--endpoint {self.base}: GET {self.base}/models answered HTTP 404 "
                                 f"({_error_text(payload)}), so the URL is probably wrong: give the server root, "
                                 "e.g. http://host:8000 (a trailing /v1 or /v1/chat/completions is fine too)")
        if status in (401, 403):
            raise DraftdataError(f"--endpoint {self.base}: GET /models answered HTTP {status} "
                                 f"({_error_text(payload)}); check --api-key / $DRAFTDATA_API_KEY")
        data = payload.get("data") if status == 200 and isinstance(payload, dict) else None
        names = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        if len(names) != 1 or not isinstance(names[0], str):
            raise DraftdataError(f"--endpoint {self.base}: pass --model NAME, the served model name "
                                 f"(GET /models answered {status}: {_one_line(str(names)) if names else _error_text(payload)})")
        return names[0]

    def answer(self, prompt: Prompt) -> Answer:
        body = {"model": self.model, "messages": prompt.messages, "max_tokens": self.max_new_tokens,
                "temperature": self.temperature, "seed": prompt.seed}
        if self.top_p < 1.0:
            body["top_p"] = self.top_p
        where = f"turn {_user_turns(prompt.messages)}"
        status, payload = self._post("/chat/completions", body)
        if status != 200:
            return Answer(reject=("endpoint_rejected", f"{where}: HTTP {status}: {_error_text(payload)}"))
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return Answer(reject=("endpoint_rejected", f"{where}: the response has no choices[0].message.content: "
                                  f"{_one_line(str(payload))}"))
        if not isinstance(text, str):
            return Answer(reject=("endpoint_rejected", f"{where}: message.content is {text!r} (a reasoning "
                                  "parser or tool call on the server? serve the model without them)"))
        return _answer(payload, choice, text)

    def complete(self, prompt_ids: list[int], seed: int, max_tokens: int,
                 extra: dict[str, Any] | None = None) -> Answer:
        """Continue token ids (POST /completions with a token-id `prompt`, as vLLM, SGLang and
        trtllm-serve accept it); `extra` adds server-specific fields such as `stop_token_ids`."""
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens,
                "temperature": self.temperature, "seed": seed, **(extra or {})}
        if self.top_p < 1.0:
            body["top_p"] = self.top_p
        status, payload = self._post("/completions", body)
        if status != 200:
            return Answer(reject=("endpoint_rejected", f"HTTP {status}: {_error_text(payload)}"))
        try:
            choice = payload["choices"][0]
            text = choice["text"]
        except (KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            return Answer(reject=("endpoint_rejected", f"the response has no choices[0].text: {_one_line(str(payload))}"))
        return _answer(payload, choice, text)

    def _post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POST with retries; HTTP 401/403/404 are about the server or the flags, not one request: stop."""
        status, payload = self._request("POST", path, body)
        if status in (401, 403, 404):
            raise EndpointError(f"--endpoint {self.base}: POST {path} answered HTTP {status}: "
                                f"{_error_text(payload)}" + (" (check --api-key / $DRAFTDATA_API_KEY)"
                                                             if status != 404 else " (check --model and the URL)"))
        return status, payload

    def close(self) -> None:
        pass


def _answer(payload: dict[str, Any], choice: dict[str, Any], text: str) -> Answer:
    """The answer of one 200 response. A filtered one is no answer of the model's; a usage block
    that is not numbers (some proxies) only loses the token count."""
    if choice.get("finish_reason") == "content_filter":
        return Answer(reject=("endpoint_rejected", "the server's content filter cut the answer "
                              "(finish_reason content_filter); it is not the model's own"), filtered=True)
    usage = payload.get("usage")
    try:
        tokens = int(usage.get("completion_tokens") or 0) if isinstance(usage, dict) else 0
    except (TypeError, ValueError):
        tokens = 0
    return Answer(text, tokens, truncated=choice.get("finish_reason") == "length")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST is an error (urllib would resend it as a GET without its body), and so is a
    redirect to another host (the Authorization header would go along); a GET on the same host
    (`/v1/models` -> `/v1/models/`) is followed."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        same_host = urllib.parse.urlsplit(newurl).netloc in ("", urllib.parse.urlsplit(req.full_url).netloc)
        if req.get_method() != "GET" or not same_host:
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _shut(sock: socket.socket) -> None:
    """Shut a connection down: a thread blocked reading it returns at once."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


CONNECT_TIMEOUT_S = 10.0  # a TCP (and TLS) handshake: a server that takes longer is down, and is retried


def _tracked(connection_class: type, client: EndpointClient) -> type:
    """`connection_class` that connects within CONNECT_TIMEOUT_S (a stopping run cannot cut a
    socket still connecting) and hands each socket it connects to the client (for cut_off)."""
    class Tracked(connection_class):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            full = self.timeout
            if isinstance(full, (int, float)):
                self.timeout = min(full, CONNECT_TIMEOUT_S)
            try:
                super().connect()
            finally:
                self.timeout = full
            if isinstance(full, (int, float)):
                self.sock.settimeout(full)  # reads: each bounded by --request-timeout again
            client._connected(self.sock)
    return Tracked


def _tracking_handlers(client: EndpointClient) -> list[Any]:
    """urllib's http and https handlers, opening their connections as `_tracked` ones."""
    handlers = []
    for handler_class, connection_class in ((urllib.request.HTTPHandler, http.client.HTTPConnection),
                                            (urllib.request.HTTPSHandler, http.client.HTTPSConnection)):
        class Handler(handler_class):  # type: ignore[misc, valid-type]
            connection = _tracked(connection_class, client)

            def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
                return super().do_open(self.connection, req, **kwargs)
        handlers.append(Handler())
    return handlers


def _read_until(resp: Any, deadline: float) -> bytes:
    """A response body, read in blocks; a server that trickles it past `deadline` is a timeout
    (urllib's timeout bounds each socket read, not the request)."""
    read = getattr(resp, "read1", None) or getattr(getattr(resp, "fp", None), "read1", None) or resp.read
    chunks = []
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the response took longer than --request-timeout")
        block = read(1 << 16)  # read1: returns what one socket read brings, so the deadline is checked
        if not block:
            if getattr(resp, "length", None):  # Content-Length not reached: read1 ends quietly where read raised
                raise http.client.IncompleteRead(b"".join(chunks), resp.length)
            return b"".join(chunks)
        chunks.append(block)


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw[:500].decode("utf-8", "replace")


def _error_text(payload: Any) -> str:
    """The error message of a response body (JSON `error.message`, else the text), as one short line."""
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            return _one_line(str(err.get("message", err)))
        return _one_line(str(err))
    return _one_line(str(payload))


def _one_line(text: str, limit: int = 200) -> str:
    """`text` (an HTML page's text without its tags) on one line of at most `limit` characters."""
    if "<" in text and ">" in text:
        text = re.sub(r"(?is)<(script|style)\b.*?</\1>|<[^>]*>", " ", text)
    text = " ".join(text.split()) or "(empty body)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------- the generation loops

Generator = HFGenerator | EndpointClient


def make_generator(settings: SynthSettings) -> Generator:
    """The local HF generator, or the endpoint client with --endpoint."""
    if settings.endpoint:
        return EndpointClient(settings.endpoint, model=settings.model, max_new_tokens=settings.max_new_tokens,
                              temperature=settings.temperature, top_p=settings.top_p, api_key=settings.api_key,
                              timeout=settings.request_timeout, retries=settings.retries)
    assert settings.model_path is not None
    return HFGenerator(settings.model_path, max_new_tokens=settings.max_new_tokens,
                       temperature=settings.temperature, top_p=settings.top_p, dtype=settings.dtype,
                       device=settings.device, chat_template=settings.chat_template,
                       max_seq_len=settings.max_seq_len)


def synthesize_conversations(conversations: Iterable[Conversation], generator: Generator, settings: SynthSettings,
                             *, sink: Sink, on_reject: Callable[[Reject], None],
                             stats: SynthStats | None = None, progress: Progress | None = None) -> SynthStats:
    """Answer every user turn of `conversations` and hand finished records to `sink`.

    Local generation decodes up to --batch-size turns as one running batch (continuous batching:
    a turn that finishes makes room for the next one at once); an endpoint runs --concurrency
    conversations at once, each turn by turn. `sink` gets finished records in groups (locally
    up to --batch-size of them or every FLUSH_SECONDS; for an endpoint each wake-up's), so the
    caller writes them in one write. Every conversation advances `progress` once: when it is
    finished or rejected.
    """
    stats = stats if stats is not None else SynthStats()
    progress = progress or (lambda n, t: None)
    if isinstance(generator, EndpointClient):
        _run_concurrent(conversations, generator, settings, sink, on_reject, stats, progress)
    else:
        _run_batched(conversations, generator, settings, sink, on_reject, stats, progress)
    return stats


def _start(conv: Conversation, settings: SynthSettings, on_reject: Callable[[Reject], None],
           progress: Progress) -> TurnState | None:
    try:
        return start_turns(conv, settings)
    except RecordError as e:
        on_reject(Reject(conv.source, e.reason, e.detail, conv.conversation_id))
        progress(1, 0)
        return None


def _finish(state: TurnState, stats: SynthStats) -> dict[str, Any]:
    stats.answers += state.turn - state.kept
    stats.leading_assistant += int(state.leading_assistant > 0)
    stats.tokens += state.tokens
    stats.truncated += state.truncated
    stats.empty += state.empty
    return state.record()


FLUSH_SECONDS = 30.0  # finished records wait at most this long (or for --batch-size of them) to be written
LENGTH_WINDOW = 8     # conversations are read in windows of this many batches, shortest first


def prompt_chars(messages: list[dict[str, str]]) -> int:
    """Characters of the messages a turn's prompt holds: a free proxy of its token length."""
    return sum(len(m["content"]) for m in messages)


def by_length_in_windows(states: Iterable[TurnState], window: int) -> Iterator[TurnState]:
    """`states` in windows of `window`, each window shortest first prompt first. Rows of a running
    batch are left-padded to its longest context, and every row's attention runs over all of it:
    one 1,000-token prompt among 31 short ones made attention ~40% of a CPU decode step. In
    windows the batch mostly holds prompts of similar length; the answers do not depend on the order."""
    buf: list[TurnState] = []
    for state in states:
        buf.append(state)
        if len(buf) == window:
            yield from sorted(buf, key=lambda st: prompt_chars(st.messages))
            buf = []
    yield from sorted(buf, key=lambda st: prompt_chars(st.messages))


def _run_batched(conversations: Iterable[Conversation], generator: HFGenerator, settings: SynthSettings,
                 sink: Sink, on_reject: Callable[[Reject], None], stats: SynthStats, progress: Progress) -> None:
    """Continuous batching: up to --batch-size turns decode together; when turns finish, the next
    turns (a conversation's next user turn first, then new conversations) join the running batch."""
    import torch

    started = (state for conv in conversations  # rejects are reported in input order, before sorting
               if (state := _start(conv, settings, on_reject, progress)) is not None)
    source = by_length_in_windows(started, LENGTH_WINDOW * settings.batch_size)
    more = True
    waiting: deque[TurnState] = deque()  # turns ready to join the batch
    running: dict[int, TurnState] = {}   # id(state) -> state, for the rows in the batch
    capacity = settings.batch_size
    batch = generator.new_batch()
    done: list[dict[str, Any]] = []       # finished records not yet handed to sink
    flushed_at = time.monotonic()

    def flush() -> None:
        nonlocal done, flushed_at
        records, done, flushed_at = done, [], time.monotonic()
        if records:
            sink(records)
            stats.written += len(records)

    def fill_waiting(free: int) -> None:
        nonlocal more
        while more and len(waiting) < free:
            state = next(source, None)
            if state is None:
                more = False
            elif state.finished:  # --keep-answers: every user turn already has its answer
                done.append(_finish(state, stats))
                progress(1, 0)
            else:
                waiting.append(state)

    def join() -> None:
        rows = []
        while waiting and len(running) < capacity:  # running includes the rows joining now
            state = waiting.popleft()
            prompt = state.prompt()
            enc = generator.encode(prompt)
            if isinstance(enc, Answer):
                stats.discarded_tokens += state.tokens
                on_reject(Reject(state.conv.source, *enc.reject, state.conv.conversation_id))  # type: ignore[misc]
                progress(1, 0)
                fill_waiting(capacity - len(running))
                continue
            running[id(state)] = state
            rows.append((id(state), enc, prompt.seed, generator.budget(enc)))
        batch.add(rows)

    try:
        while True:
            fill_waiting(capacity - len(running))
            free = capacity - len(running)
            refill_at = max(1, capacity // 8)  # join in groups of at least this many (fewer, smaller prefills)
            joining = bool(waiting) and free > 0 and batch.can_add and (
                not running or free >= min(refill_at, len(waiting)))
            if not joining and not running:
                return
            t0 = time.perf_counter()
            try:
                if joining:
                    join()
                finished = batch.step()
            except torch.OutOfMemoryError:
                capacity = _shrink_after_oom(capacity, batch, running, waiting)
                continue
            stats.generate_seconds += time.perf_counter() - t0
            completed = 0
            for key, tokens, stopped in finished:
                state = running.pop(key)  # type: ignore[arg-type]
                state.add_answer(generator.answer(tokens, stopped))
                if state.finished:
                    done.append(_finish(state, stats))
                    completed += 1
                else:
                    waiting.appendleft(state)  # its next turn goes first: conversations finish in order
            if finished:
                progress(completed, sum(len(t) for _, t, _ in finished))
            if len(done) >= capacity or (done and time.monotonic() - flushed_at >= FLUSH_SECONDS):
                flush()
    finally:
        flush()  # finished conversations are kept even when the run stops on an error


def _shrink_after_oom(capacity: int, batch: RunningBatch, running: dict[int, TurnState],
                      waiting: deque[TurnState]) -> int:
    """Out of GPU memory: put every running turn back in the queue (also those whose prefill
    failed, so none is orphaned; they restart from their prompt and per-turn seeds make the
    answers the same) and halve the batch."""
    import torch

    batch.drain()
    if capacity == 1:
        raise DraftdataError("out of GPU memory generating one answer; lower --max-new-tokens / --max-seq-len "
                             "or use a bigger GPU") from None
    waiting.extendleft(reversed(list(running.values())))
    print(f"draftdata synthesize: out of GPU memory with {len(running)} answers in flight; continuing with "
          f"--batch-size {capacity // 2} (lower --batch-size to avoid this)", file=sys.stderr)
    running.clear()
    torch.cuda.empty_cache()
    return capacity // 2


def _run_concurrent(conversations: Iterable[Conversation], client: EndpointClient, settings: SynthSettings,
                    sink: Sink, on_reject: Callable[[Reject], None], stats: SynthStats, progress: Progress) -> None:
    stop = threading.Event()
    client.start_run()

    def converse(state: TurnState) -> tuple[TurnState, tuple[str, str] | None]:
        while not state.finished and not stop.is_set():
            answer = client.answer(state.prompt())
            if answer.reject is not None:
                return state, answer.reject
            state.add_answer(answer)
        return state, None

    def keep(done: Iterable[Future], raise_after: bool) -> None:
        """Write the finished conversations of `done` first, then report rejects (--strict raises
        there) and re-raise a worker's error: nothing answered is lost to either."""
        records: list[dict[str, Any]] = []
        rejects: list[Reject] = []
        failure: BaseException | None = None
        tokens = 0
        for future in done:
            try:
                state, reject = future.result()
            except BaseException as e:  # noqa: BLE001 - raised below, after the finished ones are kept
                failure = failure or e
                continue
            tokens += state.tokens
            if reject is not None:
                stats.discarded_tokens += state.tokens
                rejects.append(Reject(state.conv.source, *reject, state.conv.conversation_id))
            elif state.finished:  # (not a conversation cut short because the run stopped)
                records.append(_finish(state, stats))
        if records:
            sink(records)
            stats.written += len(records)
        progress(len(records), tokens)
        for reject in rejects:
            on_reject(reject)
            progress(1, 0)
        if failure is not None and raise_after:
            raise failure

    source = iter(conversations)
    more = True
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="draftdata-endpoint")
    pending: set[Future] = set()
    try:
        while True:
            while more and len(pending) < 2 * settings.concurrency:  # a few queued: no thread waits for work
                conv = next(source, None)
                if conv is None:
                    more = False
                elif (state := _start(conv, settings, on_reject, progress)) is not None:
                    pending.add(pool.submit(converse, state))
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            keep(done, raise_after=True)
    finally:
        stop.set()
        for future in pending:
            future.cancel()
        client.stopping.set()  # no retry or backoff wait after this
        in_flight = [f for f in pending if not f.done() and not f.cancelled()]
        try:  # answers arriving in this moment are kept; the rest are cut off (a rerun asks again)
            if in_flight and wait(in_flight, timeout=STOP_GRACE_S).not_done:
                print(f"draftdata synthesize: cutting off {sum(not f.done() for f in in_flight)} request(s) "
                      "in flight; a rerun of the same command asks for those conversations again",
                      file=sys.stderr, flush=True)
        finally:
            client.cut_off()
        pool.shutdown(wait=True)
        with contextlib.suppress(Exception):  # answers that arrived while the run stopped (an error is already on its way)
            keep([f for f in pending if f.done() and not f.cancelled()], raise_after=False)
        stats.generate_seconds += time.perf_counter() - t0


# ---------------------------------------------------------------- append-only output

def encode_records(records: Iterable[dict[str, Any]]) -> bytes:
    """Whole JSONL lines; UTF-8 as is, ASCII escapes for text UTF-8 cannot hold (lone surrogates)."""
    lines = []
    for r in records:
        line = json.dumps(r, ensure_ascii=False)
        try:
            lines.append(line.encode("utf-8"))
        except UnicodeEncodeError:
            lines.append(json.dumps(r).encode("ascii"))
    return b"".join(line + b"\n" for line in lines)


class JsonlOutput:
    """The output JSONL, held under an exclusive lock for the whole run.

    Opening it reads the ids already written and cuts off a torn last line (a line without its
    newline: a kill during a write); `append` writes whole lines with one write and an fsync,
    so after a crash the file holds whole records plus at most one torn tail.
    """

    def __init__(self, path: str | os.PathLike, command: str = "synthesize"):
        import fcntl

        self.path, self.command = Path(path), command
        if self.path.is_dir():
            raise DraftdataError(f"--output {path}: is a directory; give a .jsonl file path")
        if self.path.name.endswith((".gz", ".bz2", ".xz", ".zst")):  # readers would decompress what is plain text
            raise DraftdataError(f"--output {path}: {command} appends plain JSONL lines; write a .jsonl file and "
                                 "compress it once the run is done")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            what = e.strerror or str(e)
            if e.filename and os.path.abspath(e.filename) != os.path.abspath(self.path):
                what += f": {e.filename}"  # a folder on the way, e.g. a file where a directory should be
            raise DraftdataError(f"--output {path}: cannot create or append to it ({what}); give a path in a "
                                 "writable directory") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise DraftdataError(f"--output {path}: another draftdata run (synthesize or prompts) is writing this "
                                 "file; wait for it or write to another --output") from None
        try:
            self.ids, self.duplicates = self._scan()
        except BaseException:
            self.close()
            raise

    def _scan(self) -> tuple[set[str], int]:
        ids: set[str] = set()
        duplicates = 0
        good_end = 0  # byte offset just after the last whole line
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # the torn tail, handled below
                good_end += len(raw)
                if not raw.strip():
                    continue
                try:
                    cid = json.loads(raw)["conversation_id"]
                    if not isinstance(cid, str):
                        raise TypeError
                except (ValueError, UnicodeDecodeError, KeyError, TypeError):
                    raise DraftdataError(
                        f"{self.path}:{lineno}: not a record written by {self.command} (a JSON object with a "
                        f"string conversation_id); the file was changed by something else. Remove or fix that "
                        f"line, or write to a new --output") from None
                if cid in ids:
                    duplicates += 1
                ids.add(cid)
        size = os.fstat(self.fd).st_size
        if size > good_end:
            os.ftruncate(self.fd, good_end)
            os.fsync(self.fd)
            print(f"draftdata {self.command}: {self.path}: removed a torn last line ({size - good_end:,} bytes) left by "
                  f"an interrupted run; that conversation is generated again", file=sys.stderr)
        return ids, duplicates

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append whole lines (one write, then fsync) and remember their ids (before the fsync: a
        Ctrl-C or SIGTERM lands after a system call, and the run's summary counts these ids)."""
        if not records:
            return
        data = memoryview(encode_records(records))
        while data:  # a regular file takes it in one write; loop in case the kernel writes less
            n = os.write(self.fd, data)
            data = data[n:]
        self.ids.update(r["conversation_id"] for r in records)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1

    def __enter__(self) -> JsonlOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sidecar_dir(output: str | os.PathLike) -> Path:
    return Path(f"{output}{SIDECAR_SUFFIX}")


class OutputSettings(Protocol):
    """What check_settings needs of a run's settings (SynthSettings, self_prompts.PromptSettings)."""

    model_path: str | None

    def identity(self) -> dict[str, Any]: ...

    def report_dict(self) -> dict[str, Any]: ...


def check_settings(output: JsonlOutput, settings: OutputSettings, command: str = "synthesize") -> None:
    """Refuse to append with generation settings other than those the file was written with
    (every key of `identity()` recorded in the file is compared; a key the file lacks was added
    by a later draftdata version and cannot be checked). `command` names the run in warnings."""
    path = sidecar_dir(output.path) / "settings.json"
    current = settings.identity()
    if output.ids and path.is_file():
        try:
            saved = json.loads(path.read_text())
            recorded, saved_settings = saved.get("identity", {}), saved.get("settings") or {}
        except (OSError, ValueError, AttributeError):
            recorded, saved_settings = None, {}
        if recorded is not None:
            if recorded.get("model_hash") and current.get("model_hash"):  # in the file's fingerprint scheme
                from draftdata.config import same_weights
                from draftdata.models import model_hash

                current["model_hash"] = model_hash(settings.model_path, like=recorded["model_hash"])
                if same_weights(current["model_hash"], recorded["model_hash"]):  # the same weights, moved
                    current["model_id"] = recorded.get("model_id")
            if recorded.get("temperature") == current.get("temperature") == 0:  # greedy: no sampling settings
                for key in ("top_p", "seed"):
                    current[key] = recorded.get(key)
            if recorded.get("endpoint") and current.get("endpoint"):  # http://h:8000, .../v1, .../v1/chat/completions
                recorded = {**recorded, "endpoint": endpoint_base(recorded["endpoint"])}
                current["endpoint"] = endpoint_base(current["endpoint"])
                recorded.pop("max_seq_len", None)  # a local-generation setting: the server decides here
            diffs = [f"{k}: file has {recorded.get(k)!r}, this run has {current.get(k)!r}"
                     for k in sorted(recorded) if recorded.get(k) != current.get(k)]
            if diffs:
                raise DraftdataError(
                    f"--output {output.path} already holds {len(output.ids):,} conversations written with other "
                    f"settings, so appending would mix two generation setups; refusing. Differences: "
                    + "; ".join(diffs) + ". Rerun with the same flags, or write to a new --output.")
            _warn_other_device(saved_settings, settings, output.path, command)
            return
    if output.ids and not path.is_file():
        print(f"draftdata {command}: {output.path} has no {path.name} in {path.parent.name}/ (written by something "
              f"else?); cannot check that its records used the same settings", file=sys.stderr)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"identity": current, "settings": settings.report_dict()}, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise DraftdataError(f"--output {output.path}: cannot write {path} ({e.strerror or e}), where the run's "
                             "settings are kept next to the output; give a path in a writable directory") from None


def _warn_other_device(saved: dict[str, Any], settings: OutputSettings, path: str, command: str) -> None:
    """--dtype auto resolves by device (bf16 on a GPU, fp32 on most CPUs), so a resume on another
    kind of device appends answers of another compute dtype although the recorded settings agree."""
    if saved.get("endpoint") or getattr(settings, "endpoint", None):  # nothing is computed here
        return
    was, now = str(saved.get("device") or "auto"), str(getattr(settings, "device", None) or "auto")
    if "auto" in (was, now) or was.split(":")[0] == now.split(":")[0] or saved.get("dtype") != "auto":
        return
    print(f"draftdata {command}: warning: {path} was written on {was}, this run is on {now} with --dtype auto, "
          f"which resolves differently there; pass --device {was} (or an explicit --dtype) to keep one setup",
          file=sys.stderr)


def write_reports(output: str | os.PathLike, stats: SynthStats, rejects: Any, settings: SynthSettings) -> str | None:
    """summary-<time>-<pid>.json (always) and the rejects (when any) in <OUT>.synth/ (or --rejects);
    returns where the rejects are."""
    return write_run_reports("synthesize", str(sidecar_dir(output)), "summary-{stamp}-{pid}.json",
                             "rejects-{stamp}-{pid}.jsonl", stats, settings.report_dict(), rejects, settings.rejects)


# ---------------------------------------------------------------- one run

def pending_conversations(settings: SynthSettings, *, skip_ids: set[str], stats: SynthStats,
                          on_reject: Callable[[Reject], None], progress: Progress | None = None) -> Iterator[Conversation]:
    """Input conversations still to synthesize: bad records go to `on_reject`, ids already in the
    output are counted as skipped (both advance `progress`)."""
    for item in read_conversations(settings.input, settings.storage_options, limit=settings.limit,
                                   require_assistant=False):
        stats.read += 1
        if isinstance(item, Reject):
            on_reject(item)
        elif item.conversation_id in skip_ids:
            stats.skipped["already_written"] += 1
        else:
            yield item
            continue
        if progress:
            progress(1, 0)


def validate_input(settings: SynthSettings) -> int:
    """--strict: read the whole input and fail on the first bad record, before any model work."""
    n = 0
    for item in read_conversations(settings.input, settings.storage_options, limit=settings.limit,
                                   require_assistant=False):
        if isinstance(item, Reject):
            raise DraftdataError(f"{item} (--strict stops at the first bad record, before any model work)")
        try:
            start_turns(item, settings)
        except RecordError as e:
            raise DraftdataError(f"{Reject(item.source, e.reason, e.detail, item.conversation_id)} (--strict stops "
                                 f"at the first bad record, before any model work)") from None
        n += 1
    return n


def check_paths(settings: SynthSettings) -> None:
    """The output is a local file that is none of the input files (fails before anything is created)."""
    from draftdata.collect.conversations import input_files, input_reads
    from draftdata.store.fs import is_local, local_path

    out = settings.output
    if not is_local(out):
        raise DraftdataError(f"--output {out}: synthesize appends to a local (or mounted) file; write it locally "
                             f"and copy it to object storage afterwards")
    out = local_path(out)
    settings.output = out
    # Also not there yet: a *.jsonl output in an input directory, or one the input pattern
    # matches, would be read back as input once it exists.
    reads = input_reads(settings.input, out, input_files(settings.input, settings.storage_options))
    if reads is not None and reads[0] == "file":
        raise DraftdataError(f"--output {out} is also an input file ({reads[1]}); write to another path")
    if reads is not None:
        raise DraftdataError(f"--output {out} would be read back as input (--input {settings.input} "
                             "covers it); write it outside the input directory or pattern")


def resolve_endpoint_model(settings: SynthSettings) -> None:
    """With --endpoint and no --model: ask the server for its (only) model name."""
    if settings.endpoint and not settings.model:
        settings.model = make_generator(settings).model  # type: ignore[union-attr]


def run_local(settings: SynthSettings) -> int:
    """The single-process synthesize: returns the exit status (0, also when records were rejected)."""
    from draftdata.collect.conversations import count_records
    from draftdata.collect.runner import RejectLog

    t_start = time.perf_counter()
    check_paths(settings)
    resolve_endpoint_model(settings)
    with JsonlOutput(settings.output) as out:
        check_settings(out, settings)
        total = validate_input(settings) if settings.strict else count_records(
            settings.input, settings.storage_options, settings.limit)
        if total == 0:
            warn_no_records("synthesize", settings.input, settings.limit, "answer")
            return 0
        if out.ids:
            print(f"draftdata synthesize: {out.path} already holds {len(out.ids):,} conversations; they are "
                  "skipped", file=sys.stderr)
        stats = SynthStats()
        rejects = RejectLog(stats, strict=settings.strict)  # type: ignore[arg-type]
        generator = make_generator(settings)
        bar = JobProgress(total=total, desc="synthesize", unit="conv")
        live = isinstance(generator, HFGenerator)  # counts tokens per decode step, not per finished batch

        def progress(n: int, t: int) -> None:
            bar.update(n, 0 if live else t)

        if live:
            generator.on_step = lambda t: bar.update(0, t)

        interrupted = True
        before = len(out.ids)
        try:
            items = pending_conversations(settings, skip_ids=set(out.ids), stats=stats, on_reject=rejects,
                                          progress=progress)
            synthesize_conversations(items, generator, settings, sink=out.append, on_reject=rejects, stats=stats,
                                     progress=progress)
            interrupted = False
        finally:
            bar.close()
            generator.close()
            stats.seconds = time.perf_counter() - t_start
            # What the file gained: a stop between a write and its count (flush) made the summary short.
            stats.written = len(out.ids) - before
            where = write_reports(out.path, stats, rejects, settings)
            print(stats.format(str(out.path), settings.input, where))
            if interrupted:
                print("draftdata synthesize: stopped early; every conversation written so far is kept, rerun the "
                      "same command to resume", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- --ray

class SynthWorker:
    """One Ray actor: loads the generator once and answers whole work units, returning the
    finished records to the driver (which alone appends to the output, so lines from several
    processes can never interleave or repeat)."""

    def __init__(self, settings: SynthSettings, model_hash: str | None):
        t0 = time.perf_counter()
        import dataclasses

        import ray

        from draftdata.collect.ray_pool import actor_cpu_threads, prepare_compute_thread
        from draftdata.models import model_hash as hash_of
        from draftdata.models import resolve_model

        self.threads = actor_cpu_threads() if settings.device == "cpu" else None
        # not threaded: __init__ and every method run on this (main) thread, the only one that computes
        self.niceness = prepare_compute_thread(self.threads)
        self.node = ray.util.get_node_ip_address()
        if not settings.endpoint:
            path = resolve_model(settings.model)  # type: ignore[arg-type]
            if hash_of(path) != model_hash:
                raise DraftdataError(f"worker on {self.node}: --model {settings.model} resolves to {path}, whose "
                                     f"weights differ from the driver's; make the same model available on every "
                                     f"node (a shared directory, or the same hub snapshot in each node's cache)")
            settings = dataclasses.replace(settings, model_path=str(path))
        self.settings = settings
        self.generator = make_generator(settings)
        self.setup_seconds = time.perf_counter() - t0

    def ready(self) -> dict[str, Any]:
        import torch

        return {"pid": os.getpid(), "node": self.node, "device": self.settings.device,
                "summary": f"{self.settings.device}, {torch.get_num_threads()} threads at nice {self.niceness}, "
                           f"generator ready in {self.setup_seconds:.1f} s"}

    def run_unit(self, unit_id: str, conversations: list[Conversation]) -> dict[str, Any]:
        records: list[dict[str, Any]] = []
        rejects: list[Reject] = []
        stats = synthesize_conversations(conversations, self.generator, self.settings, sink=records.extend,
                                         on_reject=rejects.append)
        return {"records": records, "rejects": rejects, "stats": stats}


def plan_synth_workers(num_workers: int | None, gpus_per_worker: float | None, settings: SynthSettings) -> Any:
    """The actors of `synthesize --ray` (`ray_job.plan_workers`); with --endpoint they are HTTP
    clients: CPU actors unless --gpus-per-worker asks for GPUs (one per GPU would wait for GPUs a
    serving engine on the same cluster holds)."""
    from draftdata.collect.ray_job import plan_workers

    if settings.endpoint and gpus_per_worker is None:
        return plan_workers(num_workers, 0.0, "cpu")
    return plan_workers(num_workers, gpus_per_worker, settings.device)


def run_ray(settings: SynthSettings, *, address: str | None = None, num_workers: int | None = None,
            gpus_per_worker: float | None = None, work_unit_size: int | None = None) -> int:
    """`synthesize --ray`: the driver reads the input, cuts it into work units of pending
    conversations, runs them on `ray_pool.ActorPool` (retries on actor death), and appends each
    finished unit's records (one write + fsync). Returns 1 when some units failed all retries
    (their conversations are listed as `unit_failed` rejects; a rerun retries them), else 0."""
    import dataclasses

    from draftdata.collect.conversations import count_records
    from draftdata.collect.ray_job import MAX_RETRIES, connect
    from draftdata.collect.ray_pool import ActorPool, PoolError, PoolProgress, WorkUnit, attempts_text
    from draftdata.collect.runner import RejectLog

    t_start = time.perf_counter()
    unit_size = work_unit_size if work_unit_size is not None else 4 * settings.batch_size
    if unit_size < 1:
        raise DraftdataError("--work-unit-size must be a positive integer")
    check_paths(settings)
    resolve_endpoint_model(settings)
    with JsonlOutput(settings.output) as out:
        check_settings(out, settings)
        total = validate_input(settings) if settings.strict else count_records(
            settings.input, settings.storage_options, settings.limit)
        if total == 0:
            warn_no_records("synthesize", settings.input, settings.limit, "answer")
            return 0
        if out.ids:
            print(f"draftdata synthesize: {out.path} already holds {len(out.ids):,} conversations; they are "
                  "skipped", file=sys.stderr)
        connected = connect(address)
        try:
            plan = plan_synth_workers(num_workers, gpus_per_worker, settings)
            model = settings.model
            if model and not settings.endpoint and os.path.exists(os.path.expanduser(model)):
                model = os.path.abspath(os.path.expanduser(model))
            worker_settings = dataclasses.replace(settings, model=model, device=plan.device)  # resolved per node
            weights = settings.identity()["model_hash"]
            print(f"draftdata synthesize --ray: {plan.describe()}; work units of {unit_size} conversations",
                  file=sys.stderr)
            stats = SynthStats()
            rejects = RejectLog(stats, strict=settings.strict)  # type: ignore[arg-type]
            skip = set(out.ids)  # a copy: the units are produced on another thread while `out` grows

            def units() -> Iterator[WorkUnit]:
                items = pending_conversations(settings, skip_ids=skip, stats=stats, on_reject=rejects,
                                              progress=lambda n, t: progress.update(n))
                chunk: list[Conversation] = []
                index = 0
                for conv in items:
                    chunk.append(conv)
                    if len(chunk) == unit_size:
                        yield _work_unit(index, chunk)
                        index, chunk = index + 1, []
                if chunk:
                    yield _work_unit(index, chunk)

            def on_done(unit: WorkUnit, result: dict[str, Any]) -> None:
                records = [r for r in result["records"] if r["conversation_id"] not in out.ids]
                out.append(records)
                for r in result["rejects"]:
                    rejects(r)
                unit_stats: SynthStats = result["stats"]
                unit_stats.written = len(records)
                unit_stats.read = 0
                stats.merge(unit_stats)
                unit.size = unit_stats.tokens

            pool = ActorPool(SynthWorker, args=(worker_settings, weights), num_workers=plan.num_workers,
                             num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_retries=MAX_RETRIES, in_flight=2)
            progress = PoolProgress(total_items=total, desc="synthesize", unit="conv")  # (closed below)
            interrupted = True
            t_pool = time.perf_counter()
            try:
                pool.run(units(), on_done=on_done, progress=progress)
                interrupted = False
            except PoolError:  # its message says what to do (no "stopped early ... rerun")
                interrupted = False
                raise
            finally:
                progress.close()
                report = pool.report  # what finished, and the units given up, also before an error or a stop
                stats.generate_seconds = time.perf_counter() - t_pool  # all actors together: the job's rate
                failed = report.failed if report else []
                for f in failed:
                    for conv in f.unit.args[0] if f.unit else []:
                        if conv.conversation_id not in out.ids:  # listed, not raised, also under --strict
                            stats.skipped["unit_failed"] += 1
                            rejects.rejects.append(Reject(
                                conv.source, "unit_failed", f"work unit {f.unit_id} failed {f.attempts} times; "
                                f"last error: {f.errors[-1] if f.errors else '?'}", conv.conversation_id))
                stats.seconds = time.perf_counter() - t_start
                where = write_reports(out.path, stats, rejects, settings)
                print(stats.format(str(out.path), settings.input, where))
                if report is not None:
                    print(f"  ray        {plan.describe()}; {report.units_done} units done, "
                          f"{report.workers_started} workers started, {report.workers_lost} lost")
                if failed:
                    print(f"  FAILED     {len(failed)} work unit(s) after {attempts_text(failed)} (reason "
                          f"unit_failed in the rejects file); rerun the same command to retry them")
                if interrupted:
                    print("draftdata synthesize: stopped early; every conversation written so far is kept, rerun "
                          "the same command to resume", file=sys.stderr)
        finally:
            if connected:
                import ray

                ray.shutdown()
    return 1 if failed else 0


def _work_unit(index: int, conversations: list[Conversation]) -> Any:
    from draftdata.collect.ray_pool import WorkUnit

    ids = [c.conversation_id for c in conversations]
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    return WorkUnit(id=f"u{index:05d}-{digest}", args=(conversations,), item_ids=ids)
