"""Read conversations from JSONL, validate them, and tokenize them with a loss mask.

Accepted records (one JSON object per line):
- `{"conversations" | "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
- ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`, with an
  optional top-level `"system"` string used as the system prompt.
The id is `conversation_id`, `id` or `uuid` (first present), else a stable hash of the
normalized messages, so the same conversation gets the same id in either format.

Bad records never stop a job: each becomes a `Reject` naming file:line and a reason code
(REASONS below) that the runner counts and writes to the rejects file.

Loss mask "assistant": the chat template is rendered for growing prefixes of the conversation;
assistant turn i covers the characters between the prompt for turn i (messages[:i] with the
generation prompt) and the render of messages[:i+1], minus trailing whitespace. So the mask
holds each assistant reply plus its end-of-turn token, never the role header, and it works for
templates without `{% generation %}` tags. Tokens are mapped to those character spans with
the fast tokenizer's offsets.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from draftdata.errors import DraftdataError

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
ID_KEYS = ("conversation_id", "id", "uuid")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst")

# Reject reason codes (stable: they appear in summaries and rejects files).
REASONS = {
    "malformed_json": "the line is not valid JSON (or not UTF-8)",
    "not_an_object": "the line is JSON but not an object",
    "missing_conversations": "no `conversations` or `messages` list",
    "empty_conversations": "the conversation has no messages",
    "bad_message": "a message is not an object with role/content (or from/value)",
    "unknown_role": "a role other than system/user/assistant (human/gpt)",
    "non_string_content": "a message's content is not a string",
    "bad_id": "the id is empty or not a string/number",
    "duplicate_id": "an earlier record in the input has the same id (the first one is kept)",
    "no_assistant_turn": "no assistant message, so --loss-mask assistant would train on nothing",
    "assistant_first": "the first message is an assistant turn, which answers nothing (--loss-mask assistant needs "
                       "a user or system message first)",
    "template_error": "the chat template failed on this conversation",
    "too_long": "longer than --max-seq-len tokens (--on-long skip, or nothing left to train after truncation)",
    "non_finite": "the base model's hidden states for it hold inf or NaN (it overflowed; --dtype bf16 or fp32)",
}


@dataclass(frozen=True)
class Conversation:
    conversation_id: str
    messages: list[dict[str, str]]  # normalized: role in system/user/assistant, content str
    source: str  # "file:line"
    category: str | None = None  # the record's "category" (MT-Bench style prompt sets), for eval's breakdown


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str  # a key of REASONS
    detail: str
    conversation_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "conversation_id": self.conversation_id,
                "reason": self.reason, "detail": self.detail}

    def __str__(self) -> str:
        cid = f" (conversation {self.conversation_id})" if self.conversation_id else ""
        return f"{self.source}{cid}: {self.reason}: {self.detail}"


@dataclass
class TokenizedSample:
    conversation_id: str
    input_ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # uint8 [L]
    source: str
    truncated: bool = False

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class RecordError(Exception):
    def __init__(self, reason: str, detail: str, conversation_id: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.conversation_id = reason, detail, conversation_id


# ---------------------------------------------------------------- input files

def input_files(input: str, storage_options: dict | None = None, flag: str = "--input"
                ) -> list[tuple[Any, str, str]]:
    """(filesystem, path, display name) for each input file: a file, a directory of *.jsonl
    (sorted by name), a glob, or any fsspec URL of those. Raises, naming `flag`, if nothing is there."""
    import fsspec

    from draftdata.store.fs import is_local  # (here: importing the store loads torch)

    remote = not is_local(input)
    fs, path = fsspec.core.url_to_fs(input, **((storage_options or {}) if remote else {}))
    if any(c in path for c in "*?["):
        paths, folder = _files(fs.glob(path, detail=True), input), os.path.dirname(input)
        if any(c in folder for c in "*?["):  # "in/*/part.jsonl": the folder differs per file
            folder = ""
    elif fs.isdir(path):
        paths, folder = [p for p in _files(fs.ls(path, detail=True), input) if p.endswith(JSONL_SUFFIXES)], input
        if not paths:
            raise DraftdataError(f"{flag} {input}: directory holds no *.jsonl files")
    elif fs.exists(path):
        paths, folder = [path], None
    else:
        raise DraftdataError(f"{flag} {input}: no such file or directory")
    if not paths:
        raise DraftdataError(f"{flag} {input}: the pattern matches no files")

    def display(p: str) -> str:  # as the user wrote it: "in/", "s3://b/in/*.jsonl" -> that folder + name
        if folder == "":
            return fs.unstrip_protocol(p) if remote else p
        return input if folder is None else f"{folder.rstrip('/')}/{os.path.basename(p)}"

    return [(fs, p, display(p)) for p in paths]


# The rejects files draftdata writes (collect: in the dataset, synthesize: beside its output). A
# directory or pattern never lists them: a rerun would read an earlier run's rejects as input.
OWN_REJECTS = re.compile(r"(^|/)_reports/collect-[^/]+/rejects\.jsonl$|\.synth/rejects-[^/]+\.jsonl$")


def _files(entries: Any, input: str) -> list[str]:
    """The sorted file paths among fsspec `ls`/`glob` entries: no directories (an input folder may
    hold sub-folders), none of draftdata's own rejects files unless `input` names their folder."""
    infos = entries.values() if isinstance(entries, dict) else entries
    own = "_reports/" not in input and ".synth/" not in input
    return sorted(e["name"] for e in infos
                  if e.get("type") != "directory" and not (own and OWN_REJECTS.search(e["name"])))


def input_reads(input: str, path: str, files: list[tuple[Any, str, str]]) -> tuple[str, str] | None:
    """Whether the reader of `input` (whose files, from `input_files`, are `files`) reads the file
    `path`: ("file", display name) when it is one of them, ("listed", "") when it would be once
    written (a JSONL name in the input directory, or a name the input pattern matches), else None.
    Local paths compare by their canonical location (file://, local://, ~, symlinks)."""
    import fnmatch

    from draftdata.store.fs import canonical_location, is_local

    target = canonical_location(path)
    for fs, file, name in files:
        if canonical_location(file if is_local(input) else fs.unstrip_protocol(file)) == target:
            return "file", name
    if is_local(input) and is_local(path):
        src = canonical_location(input)
        inside = os.path.isdir(src) and os.path.dirname(target) == src and path.endswith(JSONL_SUFFIXES)
        # fnmatch's "*" crosses "/", fsspec's glob does not: match path component by component.
        want, got = src.split(os.sep), target.split(os.sep)
        globbed = any(c in src for c in "*?[") and len(want) == len(got) \
            and all(fnmatch.fnmatchcase(g, w) for g, w in zip(got, want))
        if inside or globbed:
            return "listed", ""
    return None


def _lines(fs: Any, path: str) -> Iterator[tuple[int, bytes]]:
    zstd = path.lower().endswith((".zst", ".zstd"))  # fsspec knows ".zst" only (in any case)
    with fs.open(path, "rb", compression="zstd" if zstd else "infer") as f:
        if zstd:  # zstandard's reader has no lines of its own
            f = io.BufferedReader(f)
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, raw


def warn_no_records(command: str, input: str, limit: int | None, what: str) -> None:
    """Say that --input held no records (a run would otherwise end in a summary of zeros):
    `draftdata COMMAND: warning: ...; nothing to WHAT`."""
    why = "--limit 0" if limit == 0 else "its files are empty or hold only blank lines"
    print(f"draftdata {command}: warning: no records were read from --input {input} ({why}); nothing to {what}",
          file=sys.stderr)


def count_records(input: str, storage_options: dict | None = None, limit: int | None = None) -> int:
    """Non-blank lines in the input (what read_conversations will yield), for progress bars."""
    n = 0
    if limit is not None and limit <= 0:
        return 0
    for fs, path, _ in input_files(input, storage_options):
        for _ in _lines(fs, path):
            n += 1
            if limit is not None and n >= limit:
                return n
    return n


# ---------------------------------------------------------------- records

def read_conversations(input: str, storage_options: dict | None = None, *, limit: int | None = None,
                       require_assistant: bool = True, flag: str = "--input") -> Iterator[Conversation | Reject]:
    """Yield a Conversation or a Reject for each non-blank line of the input, in order.

    `limit` stops after that many records. Duplicate ids are rejected after the first.
    `require_assistant` rejects conversations without an assistant message. `flag` is the
    command's name for the input in errors (eval: --prompts).
    """
    seen: set[str] = set()
    n = 0
    for fs, path, name in input_files(input, storage_options, flag):
        for lineno, raw in _lines(fs, path):
            if limit is not None and n >= limit:
                return
            n += 1
            source = f"{name}:{lineno}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                yield Reject(source, "malformed_json", json_error_detail(e))
                continue
            except UnicodeDecodeError as e:
                yield Reject(source, "malformed_json", utf8_error_detail(e))
                continue
            try:
                conv = parse_record(obj, source)
            except RecordError as e:
                if e.conversation_id is not None and e.conversation_id in seen:
                    e.reason, e.detail = "duplicate_id", (f"id {e.conversation_id!r} already used by an earlier record "
                                                          "of the input (and this record is itself invalid: "
                                                          f"{e.reason}: {e.detail})")
                elif e.conversation_id is not None:
                    seen.add(e.conversation_id)  # the first record with an id is the one read, valid or not
                yield Reject(source, e.reason, e.detail, e.conversation_id)
                continue
            if conv.conversation_id in seen:
                yield Reject(source, "duplicate_id", f"id {conv.conversation_id!r} already used by an earlier "
                             "record of the input: only the first record with an id is read (look for "
                             "that one among the kept or the rejected)", conv.conversation_id)
                continue
            seen.add(conv.conversation_id)
            if require_assistant and not any(m["role"] == "assistant" for m in conv.messages):
                yield Reject(source, "no_assistant_turn", "no assistant message; use --loss-mask all "
                             "to keep prompt-only conversations", conv.conversation_id)
                continue
            yield conv


def json_error_detail(error: json.JSONDecodeError) -> str:
    """JSON's message with the column in the line: its own "line 2 column 1" counts the line's
    newline as a second line, which next to `file:LINE` reads as another line of the file."""
    end = len(error.doc.rstrip())
    where = f"{'' if error.msg.endswith(' at') else 'at '}column {min(error.pos, end) + 1}"
    if error.msg.startswith("Unterminated string"):
        where += " (it runs to the end of the line: the record is cut short)"
    elif error.pos >= end:
        where += " (the end of the line: the record is cut short)"
    if error.doc.lstrip().startswith(("[", "]")):
        where += "; the input must be JSON Lines, one object per line, not a JSON array"
    return f"{error.msg} {where}"


def utf8_error_detail(error: UnicodeDecodeError) -> str:
    """A line that is not UTF-8, with the byte's place in the line (Python's "position" counts from 0)."""
    return f"not UTF-8: byte 0x{error.object[error.start]:02x} at byte {error.start + 1} of the line ({error.reason})"


# An assistant message with "truncated": true (synthesize writes it on answers cut at the token
# limit) trains its text but not the end of turn the template puts after it: the model never ended it.
TRUNCATED = "truncated"


def parse_record(obj: Any, source: str = "") -> Conversation:
    """Normalize one JSON record to a Conversation; raises RecordError(reason, detail)."""
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    cid = _explicit_id(obj)
    if cid is not None:
        _check_unicode(cid, "the id", None)
    key = "conversations" if "conversations" in obj else "messages" if "messages" in obj else None
    if key is None:
        raise RecordError("missing_conversations", "no 'conversations' or 'messages' field "
                          f"(keys: {sorted(obj)[:8]})", cid)
    raw = obj[key]
    if not isinstance(raw, list):
        raise RecordError("missing_conversations", f"'{key}' is {type(raw).__name__}, expected a list", cid)
    if not raw:
        raise RecordError("empty_conversations", f"'{key}' is an empty list", cid)
    messages = []
    system = obj.get("system")
    if isinstance(system, str) and system and not _is_system(raw[0]):
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RecordError("bad_message", f"{key}[{i}] is {type(m).__name__}, expected an object", cid)
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None:
            raise RecordError("bad_message", f"{key}[{i}] has no 'role' (or 'from')", cid)
        if not isinstance(role, str) or role not in ROLES:
            raise RecordError("unknown_role", f"{key}[{i}] role {role!r}; expected one of "
                              f"system/user/assistant (ShareGPT: system/human/gpt)", cid)
        if not isinstance(content, str):
            raise RecordError("non_string_content", f"{key}[{i}] content is "
                              f"{type(content).__name__}, expected a string", cid)
        _check_unicode(content, f"{key}[{i}] content", cid)
        messages.append({"role": ROLES[role], "content": content,
                         **({TRUNCATED: True} if m.get(TRUNCATED) is True and ROLES[role] == "assistant" else {})})
    if messages and messages[0]["role"] == "system":
        _check_unicode(messages[0]["content"], "the system prompt", cid)
    category = obj.get("category")
    return Conversation(cid if cid is not None else content_id(messages), messages, source,
                        category if isinstance(category, str) and category else None)


def _check_unicode(text: str, where: str, cid: str | None) -> None:
    """Reject text that is not valid Unicode: JSON's \\ud83d escapes can encode half of a
    surrogate pair (common in scraped ShareGPT dumps), which no tokenizer or file accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError("malformed_json", f"{where} holds {text[e.start:e.end]!r} at character {e.start}, a lone "
                          "UTF-16 surrogate (half of an escaped emoji?), which is not valid Unicode text", cid) from None


def _is_system(m: Any) -> bool:
    return isinstance(m, dict) and m.get("role", m.get("from")) == "system"


def _explicit_id(obj: dict) -> str | None:
    for k in ID_KEYS:
        if obj.get(k) is not None:
            v = obj[k]
            if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
                raise RecordError("bad_id", f"'{k}' is {v!r}; expected a non-empty string or integer")
            return str(v)
    return None


def content_id(messages: list[dict[str, str]]) -> str:
    """Stable id for a conversation without one: hash of its normalized messages."""
    blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return "sha256-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


# ---------------------------------------------------------------- tokenization

def template_syntax_error(template: str) -> tuple[int, str] | None:
    """(line, message) of a Jinja syntax error in a chat template, else None. It is compiled as
    transformers compiles it (same environment and extensions), so a broken template stops a run
    at startup instead of rejecting every record as template_error."""
    from jinja2 import TemplateSyntaxError

    try:  # private in transformers (pinned < 5.15): without it the check is skipped, never wrong
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as e:
        return e.lineno, e.message or "syntax error"
    return None


def load_chat_template(path: str | os.PathLike) -> str:
    """A Jinja chat template from a file: raw Jinja, or JSON with a "chat_template" string.
    Its syntax is checked here (an error names the file and the template line)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise DraftdataError(f"--chat-template {path}: {e.strerror}") from None
    if p.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DraftdataError(f"--chat-template {path}: a .json template file must be an object with "
                                 f"a 'chat_template' string") from None
    error = template_syntax_error(text)
    if error is not None:
        where = f"{path}: its chat_template string, line {error[0]}" if p.suffix == ".json" else f"{path}:{error[0]}"
        raise DraftdataError(f"--chat-template {where}: Jinja syntax error: {error[1]}; fix the template")
    return text


class ChatTokenizer:
    """Renders conversations with a chat template and tokenizes them with a loss mask."""

    def __init__(self, tokenizer: Any, *, chat_template: str | None = None, loss_mask: str = "assistant",
                 max_seq_len: int = 3072, on_long: str = "skip"):
        if loss_mask not in ("assistant", "all"):
            raise DraftdataError(f"--loss-mask {loss_mask!r}: expected 'assistant' or 'all'")
        if on_long not in ("skip", "truncate"):
            raise DraftdataError(f"--on-long {on_long!r}: expected 'skip' or 'truncate'")
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        if isinstance(self.template, dict):  # named templates (Hermes, Command-R): {"default": ..., "tool_use": ...}
            if "default" not in self.template:
                raise DraftdataError(f"the model's tokenizer has named chat templates {sorted(self.template)} and "
                                     "none called 'default'; pass --chat-template FILE")
            self.template = self.template["default"]
        if not self.template:
            raise DraftdataError("the model's tokenizer has no chat template; pass --chat-template FILE")
        error = template_syntax_error(self.template)
        if error is not None:
            whose = "the chat template" if chat_template else "the model's chat template"
            raise DraftdataError(f"{whose}, line {error[0]}: Jinja syntax error: {error[1]}; pass a fixed "
                                 "--chat-template FILE")
        self.tokenizer = tokenizer
        self.loss_mask = loss_mask
        self.max_seq_len = max_seq_len
        self.on_long = on_long
        self._fast = bool(getattr(tokenizer, "is_fast", False))
        self._specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len,
                                reverse=True)
        try:  # role markers may be added tokens that are not "special" (DeepSeek-R1's <｜Assistant｜>)
            added = [t for t in tokenizer.get_added_vocab() if t]
        except Exception:  # noqa: BLE001 -- tokenizers without an added vocabulary
            added = []
        self._markers = sorted(set(self._specials) | set(added), key=len, reverse=True)
        # (one pattern, longest first: a loop over hundreds of reserved tokens per turn took 8x the time)
        self._marker_rx = re.compile("|".join(map(re.escape, self._markers))) if self._markers else None
        self._marker_len = max(map(len, self._markers), default=0)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template,
                                                  add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in `text` (the full render of `messages`)."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:  # its prompt would be the render of no messages, which templates refuse
                raise RecordError("assistant_first", "the conversation starts with an assistant message, which "
                                  "answers nothing; start it with a user or system message (or drop that "
                                  "message), or use --loss-mask all")
            prompt = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1])
            if turn.startswith(prompt) and text.startswith(turn) and len(prompt) >= cursor:
                start, end = len(prompt), len(turn)
            else:
                # The template renders this turn differently when it is not the last message (e.g.
                # Qwen3 adds an empty think block to the last reply only, gpt-oss ends it with
                # <|return|>): find the reply's text itself, after everything the conversation
                # shares with the render of the messages before it, after the request it answers
                # (Mistral moves the system prompt into the last request, so the shared part can
                # end before it) and after the assistant header, so that words of the system
                # prompt, of the user's message or of the header are never taken for the reply.
                before = self.render(messages[:i])
                lo = max(cursor, self._shared(before, text))
                request = messages[i - 1]["content"].strip() if messages[i - 1]["role"] != "assistant" else ""
                at = text.find(request, cursor) if request else -1
                if at >= 0:
                    lo = max(lo, at + len(request))
                # (Phi-3 ends `before` with <|endoftext|>, which the generation prompt lacks: the header
                # is what the prompt has past the part the two share)
                lo += self._header_at(prompt[self._shared(before, prompt):], text, lo)
                # The reply lies before the next message's text: a later turn repeating it (a
                # reasoning reply whose <think> only the last turn keeps) is not it.
                after = messages[i + 1]["content"].strip() if i + 1 < len(messages) else ""
                hi = text.find(after, lo) if after else -1
                start, end = self._find_reply(m["content"], text, lo, hi) if hi >= 0 else (-1, -1)
                if start < 0:
                    start, end = self._find_reply(m["content"], text, lo)
                if start < 0:
                    raise RecordError("template_error", f"cannot locate assistant turn {i} in the rendered "
                                      "conversation (the template rewrites its content)")
            while end > start and text[end - 1].isspace():
                end -= 1
            if m.get(TRUNCATED):  # the reply's text only: the special tokens ending it were never generated
                end = self._before_end_markers(text, start, end)
            spans.append((start, end))
            cursor = max(cursor, end)
        return spans

    def _before_end_markers(self, text: str, start: int, end: int) -> int:
        """`end` moved back over the special tokens (and whitespace) that close text[start:end]:
        where a reply cut at the token limit ends. Whatever the template did to the reply's own
        text (trimmed it, kept only the answer after </think>), its end of turn is such a token."""
        while end > start:
            while end > start and text[end - 1].isspace():
                end -= 1
            size = next((len(sp) for sp in self._specials if text.startswith(sp, end - len(sp))
                         and end - len(sp) >= start), 0)
            if not size:
                break
            end -= size
        return end

    def _header_at(self, header: str, text: str, lo: int) -> int:
        """How much of the generation prompt's tail (`header`, e.g. "<|im_start|>assistant\n") `text`
        has at `lo`: the longest piece of it ending at a newline, a special token or its end. (Not
        any prefix: R1's "<think>\n", which stored replies do not render, could run on into a reply
        starting with "<".)"""
        cuts = {len(header)} | {i + 1 for i, ch in enumerate(header) if ch == "\n"}
        for sp in self._markers:
            at = header.find(sp)
            while at >= 0:
                cuts.add(at + len(sp))
                at = header.find(sp, at + 1)
        return next((c for c in sorted(cuts, reverse=True) if c and text.startswith(header[:c], lo)), 0)

    def _special_at(self, text: str, at: int) -> int:
        """Length of the special token (e.g. the end of turn) at `at`; 0 if none."""
        return next((len(s) for s in self._specials if text.startswith(s, at)), 0)

    def _shared(self, a: str, b: str) -> int:
        """Length of the prefix `a` and `b` share, cut back to not end inside a special or added
        token (<|endoftext|> and <|assistant|> share "<|")."""
        n = len(os.path.commonprefix([a, b]))
        if self._marker_rx is None:
            return n
        for s in range(max(0, n - self._marker_len + 1), n):  # the earliest marker running past n
            if any((m := self._marker_rx.match(x, s)) and m.end() > n for x in (a, b)):
                return s
        return n

    def _find_reply(self, content: str, text: str, lo: int, hi: int | None = None) -> tuple[int, int]:
        """(start, end) of a reply in `text` at or after `lo`, its end-of-turn token included;
        (-1, -1) if absent. Reasoning templates (Qwen3, DeepSeek-R1) drop the <think> block of
        earlier replies, so the text after the last </think> is tried next. An empty reply is the
        end-of-turn token at `lo`."""
        bounded = hi is not None  # before the next message: an answer must end its turn right there
        hi = len(text) if hi is None else hi
        candidates = [(content, "")]
        if "</think>" in content:  # the answer; the template may keep its trailing newlines (Qwen3)
            answer = content.rsplit("</think>", 1)[1]
            candidates.append((answer.strip(), answer[len(answer.rstrip()):]))
        for k, (c, tail) in enumerate(candidates):
            if not c.strip():  # an empty (or blank) reply: itself and its end-of-turn token, right here
                size = self._special_at(text, lo + len(c)) if text.startswith(c, lo) else 0
                if size:
                    return lo, lo + len(c) + size
                continue
            start = text.find(c, lo, hi)
            while start >= 0:
                end = start + len(c)
                if tail and text.startswith(tail, end) and self._special_at(text, end + len(tail)):
                    end += len(tail)
                if not (bounded and k) or self._special_at(text, end):
                    return start, end + self._special_at(text, end)
                start = text.find(c, start + 1, hi)  # the answer's words inside the think block: not it
        return -1, -1

    def tokenize(self, conversations: list[Conversation]) -> list[TokenizedSample | Reject]:
        """Tokenize a chunk of conversations (one batched tokenizer call); same order as the input."""
        rendered: list[tuple[Conversation, str, list[tuple[int, int]]] | Reject] = []
        for c in conversations:
            try:
                text = self.render(c.messages)
                spans = self.assistant_spans(c.messages, text) if self.loss_mask == "assistant" else []
                rendered.append((c, text, spans))
            except RecordError as e:
                rendered.append(Reject(c.source, e.reason, e.detail, c.conversation_id))
            except Exception as e:  # jinja raises TemplateError, or anything the template calls
                rendered.append(Reject(c.source, "template_error", f"{type(e).__name__}: {e}",
                                       c.conversation_id))
        ok = [r for r in rendered if not isinstance(r, Reject)]
        # A record far longer than --max-seq-len (a 10 MB line) is tokenized by its head only: whole,
        # its ids and offsets took 1.9 GB and 20 s before the length check threw them away.
        head = self.max_seq_len * HEAD_CHARS_PER_TOKEN + 1024
        encoded = self._encode([t[:head] for _, t, _ in ok], [sp for _, _, sp in ok])
        out: list[TokenizedSample | Reject] = []
        j = 0
        for r in rendered:
            if isinstance(r, Reject):
                out.append(r)
                continue
            conv, text, spans = r
            ids, mask = encoded[j]
            j += 1
            cut = len(text) > head
            if cut and len(ids) <= self.max_seq_len + HEAD_SPARE_TOKENS:  # > 8 characters a token: the whole
                ids, mask = self._encode([text], [spans])[0]
                cut = False
            out.append(self._fit(conv, ids, mask, None if not cut else f"in its first {head:,} of {len(text):,} "
                                 "characters"))
        return out

    def _encode(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids and loss mask of each text (one batched tokenizer call)."""
        if not texts:
            return []
        want_offsets = self.loss_mask == "assistant" and self._fast
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=want_offsets)
        out = []
        for j, text in enumerate(texts):
            ids = np.asarray(enc["input_ids"][j], dtype=np.int32)
            if self.loss_mask == "all":
                mask = np.ones(len(ids), dtype=np.uint8)
            elif want_offsets:
                mask = _mask_from_offsets(np.asarray(enc["offset_mapping"][j], dtype=np.int64).reshape(-1, 2),
                                          spans[j])
            else:
                mask = self._mask_by_prefix_lengths(text, spans[j], len(ids))
            out.append((ids, mask))
        return out

    def _mask_by_prefix_lengths(self, text: str, spans: list[tuple[int, int]], n: int) -> np.ndarray:
        """Slow tokenizers have no offsets: count the tokens of the text before each span edge."""
        mask = np.zeros(n, dtype=np.uint8)
        for s, e in spans:
            a = len(self.tokenizer(text[:s], add_special_tokens=False)["input_ids"])
            b = len(self.tokenizer(text[:e], add_special_tokens=False)["input_ids"])
            mask[a:b] = 1
        return mask

    def _fit(self, conv: Conversation, ids: np.ndarray, mask: np.ndarray, head: str | None = None
             ) -> TokenizedSample | Reject:
        """The sample, truncated or rejected by --max-seq-len; `head` says which part of a long text
        `ids` are (None: all of it)."""
        if self.loss_mask == "assistant" and not mask.any() and not head:
            return Reject(conv.source, "no_assistant_turn", "the chat template renders no assistant tokens",
                          conv.conversation_id)
        if len(ids) <= self.max_seq_len:
            return TokenizedSample(conv.conversation_id, ids, mask, conv.source)
        if self.on_long == "skip":
            return Reject(conv.source, "too_long", f"{len(ids)} tokens{' ' + head if head else ''} > --max-seq-len "
                          f"{self.max_seq_len} (use --on-long truncate to keep the first --max-seq-len tokens)",
                          conv.conversation_id)
        ids, mask = ids[: self.max_seq_len], mask[: self.max_seq_len]
        if self.loss_mask == "assistant" and not mask.any():
            return Reject(conv.source, "too_long", f"truncated to --max-seq-len {self.max_seq_len} tokens, no "
                          "assistant tokens are left", conv.conversation_id)
        return TokenizedSample(conv.conversation_id, ids, mask, conv.source, truncated=True)


HEAD_CHARS_PER_TOKEN = 8  # far above real text's 3-5: a longer text is tokenized by its head first
HEAD_SPARE_TOKENS = 64  # a head ending inside a word may split it differently from the whole text


def _mask_from_offsets(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for every token whose characters overlap an assistant span."""
    mask = np.zeros(len(offsets), dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for s, e in spans:
        mask |= (starts < e) & (ends > s)
    return mask.astype(np.uint8)


def tokenize_stream(items: Iterable[Conversation | Reject], chat: ChatTokenizer,
                    chunk: int = 256) -> Iterator[TokenizedSample | Reject]:
    """Tokenize a stream of read results in chunks (one batched tokenizer call per chunk),
    passing Rejects through in order."""
    pending: list[Conversation | Reject] = []

    def flush() -> Iterator[TokenizedSample | Reject]:
        convs = [x for x in pending if isinstance(x, Conversation)]
        done = iter(chat.tokenize(convs))
        for x in pending:
            yield x if isinstance(x, Reject) else next(done)
        pending.clear()

    for item in items:
        pending.append(item)
        if len(pending) >= chunk:
            yield from flush()
    yield from flush()
