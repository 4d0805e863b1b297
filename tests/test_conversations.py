"""Reading, validating and tokenizing conversations: record formats, rejects with file:line, loss masks."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from draftdata.collect.conversations import (
    ChatTokenizer,
    Conversation,
    Reject,
    content_id,
    count_records,
    load_chat_template,
    parse_record,
    read_conversations,
    tokenize_stream,
)
from draftdata.errors import DraftdataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def conv(*turns, **extra):
    return {**extra, "conversations": [{"role": r, "content": c} for r, c in turns]}


# ---------------------------------------------------------------- record formats


def test_record_formats_normalize_to_the_same_messages():
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    chat = parse_record(conv(("system", "Be brief."), ("user", "hi"), ("assistant", "hello")))
    messages = parse_record({"messages": expected})
    sharegpt = parse_record({"conversations": [{"from": "system", "value": "Be brief."},
                                               {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    sharegpt_top_system = parse_record({"system": "Be brief.", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    for c in (chat, messages, sharegpt, sharegpt_top_system):
        assert c.messages == expected
    # no explicit id: a stable content hash, equal across formats
    assert chat.conversation_id == sharegpt.conversation_id == content_id(expected)
    assert chat.conversation_id.startswith("sha256-")
    other = parse_record(conv(("user", "hi"), ("assistant", "hello!")))
    assert other.conversation_id != chat.conversation_id


def test_ids_come_from_conversation_id_id_or_uuid():
    base = conv(("user", "a"), ("assistant", "b"))
    assert parse_record({**base, "conversation_id": "c1", "id": "x"}).conversation_id == "c1"
    assert parse_record({**base, "id": 17}).conversation_id == "17"
    assert parse_record({**base, "uuid": "u-9"}).conversation_id == "u-9"


def test_rejects_name_file_line_and_reason(tmp_path):
    good = conv(("user", "q"), ("assistant", "a"), conversation_id="good")
    path = write_jsonl(tmp_path / "in.jsonl", [
        good,                                                         # 1
        "{not json",                                                  # 2
        "",                                                           # 3 blank: ignored, no reject
        "[1, 2]",                                                     # 4
        {"id": "m", "text": "no conversation here"},                  # 5
        {"id": "e", "conversations": []},                             # 6
        conv(("user", "q"), ("robot", "a"), id="r"),                  # 7
        {"id": "n", "messages": [{"role": "user", "content": ["list"]}]},  # 8
        conv(("user", "q"), ("assistant", "a"), conversation_id="good"),   # 9 duplicate
        conv(("user", "only a question"), id="noasst"),                # 10
        {"id": "bm", "messages": ["just a string"]},                  # 11
        conv(("user", "q"), ("assistant", "a"), id=""),                # 12
        conv(("user", "q2"), ("assistant", "a2"), id="good2"),         # 13
        r'{"id": "sur", "messages": [{"role": "user", "content": "half an emoji \ud83d"}]}',  # 14
        {"id": "rl", "messages": [{"role": ["user"], "content": "q"}]},  # 15 a role that is a list
        {"id": "rd", "messages": [{"role": {"r": 1}, "content": "q"}]},  # 16 (it crashed the whole run)
        conv(("user", "q"), ("assistant", "a"), id="noasst"),           # 17 the id of a rejected record
        {"id": "bad1", "messages": [{"role": "user", "content": 5}]},  # 18 invalid, but it has an id ...
        conv(("user", "q"), ("assistant", "a"), id="bad1"),             # 19 ... so this one is its duplicate
    ])
    got = list(read_conversations(str(path)))
    rejects = [(r.source, r.reason) for r in got if isinstance(r, Reject)]
    f = str(path)
    assert rejects == [
        (f"{f}:2", "malformed_json"), (f"{f}:4", "not_an_object"), (f"{f}:5", "missing_conversations"),
        (f"{f}:6", "empty_conversations"), (f"{f}:7", "unknown_role"), (f"{f}:8", "non_string_content"),
        (f"{f}:9", "duplicate_id"), (f"{f}:10", "no_assistant_turn"), (f"{f}:11", "bad_message"),
        (f"{f}:12", "bad_id"), (f"{f}:14", "malformed_json"), (f"{f}:15", "unknown_role"),
        (f"{f}:16", "unknown_role"), (f"{f}:17", "duplicate_id"), (f"{f}:18", "non_string_content"),
        (f"{f}:19", "duplicate_id"),
    ]
    surrogate = next(r for r in got if isinstance(r, Reject) and r.source == f"{f}:14")
    assert "lone UTF-16 surrogate" in surrogate.detail and "messages[0]" in surrogate.detail
    assert [c.conversation_id for c in got if isinstance(c, Conversation)] == ["good", "good2"]
    assert [c.source for c in got if isinstance(c, Conversation)] == [f"{f}:1", f"{f}:13"]
    dup = next(r for r in got if isinstance(r, Reject) and r.reason == "duplicate_id")
    assert dup.conversation_id == "good" and "good" in str(dup) and f"{f}:9" in str(dup)
    assert "only the first record with an id is read" in dup.detail
    # prompt-only conversations are fine when every token is trained on
    kept = [c.conversation_id for c in read_conversations(str(path), require_assistant=False)
            if isinstance(c, Conversation)]
    assert kept == ["good", "noasst", "good2"]
    assert count_records(str(path)) == 18 and count_records(str(path), limit=5) == 5
    assert count_records(str(path), limit=0) == 0


def test_reject_details_say_what_is_wrong(tmp_path, tokenizer):
    """A JSON error gives the column in its line (not JSON's own "line 2", which next to file:LINE
    reads as another line of the file); an assistant-first conversation says so, instead of the
    template's "empty conversation" of the prefix render."""
    path = write_jsonl(tmp_path / "in.jsonl", ['{"id": "cut", "messages": ', "{broken", '{"id": "cut", "messa',
                                               "[", '  {"id": "x"},'])
    with open(path, "ab") as f:
        f.write(b'{"id": "\xff"}\n{"id": "cut", "messa')   # the last line without its newline
    details = [r.detail for r in read_conversations(str(path))]
    cut = " (the end of the line: the record is cut short)"
    assert details == ["Expecting value at column 26" + cut,     # the end of the line, not past its newline
                       "Expecting property name enclosed in double quotes at column 2",
                       "Invalid control character at column 21" + cut,   # said "at at column"
                       "Expecting value at column 2" + cut + "; the input must be JSON Lines, one object per "
                       "line, not a JSON array",
                       "Extra data at column 14",
                       "not UTF-8: byte 0xff at byte 9 of the line (invalid start byte)",  # Python's "position 8"
                       "Unterminated string starting at column 15 (it runs to the end of the line: the record is "
                       "cut short)"]  # said neither "column" nor "cut short"
    chat = ChatTokenizer(tokenizer)
    first = Conversation("a1", [{"role": "assistant", "content": "Hi! How can I help?"},
                                {"role": "user", "content": "hello"}], "f.jsonl:2")
    (r,) = chat.tokenize([first])
    assert isinstance(r, Reject) and r.reason == "assistant_first" and r.source == "f.jsonl:2"
    assert "starts with an assistant message" in r.detail and "empty conversation" not in r.detail
    # after a system message the reply has a prompt to follow: kept, and so is any with --loss-mask all
    after_system = Conversation("a2", [{"role": "system", "content": "Be brief."}] + first.messages, "f.jsonl:3")
    assert not isinstance(chat.tokenize([after_system])[0], Reject)
    assert not isinstance(ChatTokenizer(tokenizer, loss_mask="all").tokenize([first])[0], Reject)


def test_directory_glob_gzip_and_fsspec_inputs(tmp_path):
    import fsspec

    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "b.jsonl", [conv(("user", "b"), ("assistant", "B"), id="b")])
    write_jsonl(d / "a.jsonl", [conv(("user", "a"), ("assistant", "A"), id="a"), "oops"])
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps(conv(("user", "c"), ("assistant", "C"), id="c")) + "\n")
    import zstandard  # a dependency: without it fsspec read .zst files as raw bytes ("malformed_json")

    (d / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        (json.dumps(conv(("user", "e"), ("assistant", "E"), id="e")) + "\n").encode()))
    for name in ("E.JSONL.ZST", "e.jsonl.zstd"):  # other spellings (the directory listing takes .jsonl.zst only)
        (tmp_path / name).write_bytes((d / "e.jsonl.zst").read_bytes())
        assert [x.conversation_id for x in read_conversations(str(tmp_path / name))] == ["e"]
    (d / "notes.txt").write_text("ignored")
    got = list(read_conversations(str(d)))
    assert [getattr(x, "conversation_id", None) for x in got] == ["a", None, "b", "c", "e"]
    assert got[1].source == f"{d}/a.jsonl:2"
    assert [x.conversation_id for x in read_conversations(str(d / "*.jsonl")) if isinstance(x, Conversation)] == ["a", "b"]
    assert [x.conversation_id for x in read_conversations(str(d), limit=2) if isinstance(x, Conversation)] == ["a"]
    for sub in ("x", "y"):          # a wildcard folder: each file named by its own path, not "in/*/p.jsonl"
        (tmp_path / "w" / sub).mkdir(parents=True)
        write_jsonl(tmp_path / "w" / sub / "p.jsonl", ["oops"])
    sources = [r.source for r in read_conversations(str(tmp_path / "w" / "*" / "p.jsonl"))]
    assert sources == [f"{tmp_path}/w/x/p.jsonl:1", f"{tmp_path}/w/y/p.jsonl:1"]
    with fsspec.open("memory://draftdata-test/input.jsonl", "w") as f:
        f.write(json.dumps(conv(("user", "m"), ("assistant", "M"), id="m")) + "\n")
    got = list(read_conversations("memory://draftdata-test/input.jsonl"))
    assert got[0].conversation_id == "m" and got[0].source == "memory://draftdata-test/input.jsonl:1"
    with pytest.raises(DraftdataError, match="no such file"):
        list(read_conversations(str(tmp_path / "missing.jsonl")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DraftdataError, match="no \\*.jsonl"):
        list(read_conversations(str(empty)))


# ---------------------------------------------------------------- loss masks


def masked_text(tokenizer, sample) -> list[str]:
    """The decoded runs of tokens with loss_mask 1."""
    ids, mask = sample.input_ids, sample.loss_mask
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tokenizer.decode(ids[start:i].tolist()))
            start = None
    return runs


def test_assistant_mask_covers_replies_and_end_of_turn_only(tokenizer):
    chat = ChatTokenizer(tokenizer, max_seq_len=512)
    c = parse_record(conv(("system", "You are terse."), ("user", "What is 12 plus 30?"), ("assistant", "42"),
                          ("user", "And the fox?"), ("assistant", "The quick brown fox jumps.")))
    (s,) = chat.tokenize([c])
    text = tokenizer.apply_chat_template(c.messages, tokenize=False)
    assert tokenizer.decode(s.input_ids.tolist()) == text
    assert s.input_ids.dtype == np.int32 and s.loss_mask.dtype == np.uint8
    assert masked_text(tokenizer, s) == ["42<|im_end|>", "The quick brown fox jumps.<|im_end|>"]
    # the same ids as tokenizing the rendered template directly
    assert s.input_ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", [None, "qwen3"])
def test_a_truncated_reply_trains_its_text_not_an_end_of_turn(tokenizer, template):
    """An answer synthesize cut at the token limit ends in an end of turn only in the rendered
    conversation: the model never ended it there, and the draft learned to end turns mid-sentence."""
    record = conv(("user", "Count."), ("assistant", "one two three"), ("user", "More?"), ("assistant", "four five"))
    record["conversations"][1]["truncated"] = True
    record["conversations"][3]["truncated"] = True
    kw = {"chat_template": QWEN3_LIKE} if template else {}
    c = parse_record(record)
    assert [m.get("truncated") for m in c.messages] == [None, True, None, True]
    for fast in (True, False):
        chat = ChatTokenizer(tokenizer, max_seq_len=512, **kw)
        chat._fast = fast
        (s,) = chat.tokenize([c])
        last = "<think>\n\n</think>\n\nfour five" if template else "four five"  # (Qwen3 writes it, the model too)
        assert masked_text(tokenizer, s) == ["one two three", last]
    record["conversations"][0]["truncated"] = True               # only an assistant message can be cut
    assert "truncated" not in parse_record(record).messages[0]
    # whatever the template does to the reply (trims it; keeps only the answer after </think> in an
    # earlier reply), and a cut reply of whitespace only: no end of turn is trained
    trimming = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cases = [(trimming, [("user", "Go."), ("assistant", "  spaced out\n"), ("user", "ok")], ["spaced out"]),
             (QWEN3_LIKE, [("user", "Go."), ("assistant", "<think>\nhmm\n</think>\n\nthe answer"),
                           ("user", "ok"), ("assistant", "fine")], ["the answer"]),
             (None, [("user", "Go."), ("assistant", "\n\n\n"), ("user", "ok"), ("assistant", "fine")], [])]
    for template, turns, want in cases:
        r = conv(*turns)
        r["conversations"][1]["truncated"] = True
        chat = ChatTokenizer(tokenizer, max_seq_len=512, **({"chat_template": template} if template else {}))
        (s,) = chat.tokenize([parse_record(r)])
        got = masked_text(tokenizer, s)
        assert [t for t in got if "fine" not in t] == want, (template, got)


@pytest.mark.parametrize("template", [None, "qwen3"])
def test_tokenizers_without_offsets_get_the_same_mask(tokenizer, template):
    """Slow tokenizers return no character offsets; the mask then comes from token counts of the
    text before each reply's edges, and must equal the offsets path's."""
    records = [conv(("system", "You are terse."), ("user", "What is 12 plus 30?"), ("assistant", "42"),
                    ("user", "And the fox?"), ("assistant", "The quick brown fox jumps.")),
               conv(("user", "naïve café? 東京"), ("assistant", "déjà vu, 東京 ✓"),
                    ("user", "again"), ("assistant", "a\nb\n\nc"))]
    kw = {"chat_template": QWEN3_LIKE} if template else {}
    fast = ChatTokenizer(tokenizer, max_seq_len=512, **kw)
    slow = ChatTokenizer(tokenizer, max_seq_len=512, **kw)
    slow._fast = False                       # the path a tokenizer without offsets takes
    got = [(fast.tokenize([parse_record(r)])[0], slow.tokenize([parse_record(r)])[0]) for r in records]
    for a, b in got:
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert a.loss_mask.tolist() == b.loss_mask.tolist() and a.loss_mask.any()


def test_loss_mask_all_and_prompt_only(tokenizer):
    chat = ChatTokenizer(tokenizer, loss_mask="all")
    (s,) = chat.tokenize([parse_record(conv(("user", "hello world")))])
    assert s.loss_mask.all() and len(s.loss_mask) == len(s.input_ids)


def test_mask_for_template_that_rewrites_the_conversation_end(tokenizer):
    # Appends an end-of-text marker once after the last message, so a rendered prefix is not a
    # prefix of the full conversation: the mask must fall back to locating each reply.
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}")
    chat = ChatTokenizer(tokenizer, chat_template=template)
    (s,) = chat.tokenize([parse_record(conv(("user", "hi"), ("assistant", "hello world"), ("user", "and"),
                                            ("assistant", "numbers 1 2")))])
    first, last = masked_text(tokenizer, s)
    assert first == "hello world<|im_end|>"
    # the last turn's render ends the conversation, so its end marker belongs to the turn
    assert last == "numbers 1 2<|im_end|>\n<|endoftext|>"


def test_mask_when_the_end_marker_and_the_header_share_a_prefix(tokenizer):
    """Phi-3's template appends eos when no generation prompt follows: the render before a reply and
    the conversation share "<|" of <|endoftext|> / <|im_start|>, so the reply "a" was found inside
    the header token (which was trained, the reply not), and an empty earlier reply was rejected."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}")
    chat = ChatTokenizer(tokenizer, chat_template=template)
    for reply, masked in (("a", "a<|im_end|>"), ("as", "as<|im_end|>"), ("", "<|im_end|>")):
        (s,) = chat.tokenize([parse_record(conv(("user", "pick a, b or c"), ("assistant", reply), ("user", "next"),
                                                ("assistant", "b")))])
        assert not isinstance(s, Reject), s
        assert masked_text(tokenizer, s) == [masked, "b<|im_end|>\n<|endoftext|>"]
    # the next message's text inside the reply's think block, the answer's words too: the answer
    # found there (a few characters of the think block trained, the reply not) is not taken
    reply = "<think>\n4 is bigger, not 1\n</think>\n\n4"
    (s,) = chat.tokenize([parse_record(conv(("user", "which is bigger"), ("assistant", reply), ("user", "1"),
                                            ("assistant", "ok")))])
    assert masked_text(tokenizer, s) == [reply + "<|im_end|>", "ok<|im_end|>\n<|endoftext|>"]


def test_mask_of_a_reasoning_reply_the_last_turn_repeats(tokenizer):
    """Earlier replies lose their <think> block and the last keeps it (Qwen3): the earlier reply's
    full text was found in the last turn, and the conversation was rejected as template_error."""
    template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] }}<|im_end|>\n{% elif loop.last %}<|im_start|>assistant\n{{ m['content'] }}"
                "<|im_end|>\n{% else %}<|im_start|>assistant\n{{ (m['content'].split('</think>')[-1]).strip() }}"
                "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    answer = "<think>\nsum\n</think>\n\n4"
    chat = ChatTokenizer(tokenizer, chat_template=template)
    for last in (answer, answer + " again"):
        (s,) = chat.tokenize([parse_record(conv(("user", "what is 2 plus 2"), ("assistant", answer),
                                                ("user", "what is 2 plus 2"), ("assistant", last)))])
        assert not isinstance(s, Reject), s
        assert masked_text(tokenizer, s) == ["4<|im_end|>", last + "<|im_end|>"]


def test_mask_for_template_with_a_different_layout(tokenizer):
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
                "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}<|endoftext|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}Assistant: {% endif %}")
    chat = ChatTokenizer(tokenizer, chat_template=template)
    (s,) = chat.tokenize([parse_record(conv(("user", "what is 4"), ("assistant", "four")))])
    assert masked_text(tokenizer, s) == ["four<|endoftext|>"]


QWEN3_LIKE = (  # Qwen3's rule: an empty think block on the last reply only; earlier replies lose theirs
    "{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% elif loop.last %}<|im_start|>assistant\n<think>\n\n</think>\n\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>assistant\n{{ (m['content'].split('</think>')[-1]).strip() }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_mask_for_templates_that_render_the_last_reply_differently(tokenizer):
    """A reply rendered differently as the last message is looked for after its prompt, never in
    the user's words before it; a reasoning reply whose <think> block the template drops from
    earlier turns is still found (its answer)."""
    chat = ChatTokenizer(tokenizer, chat_template=QWEN3_LIKE)
    (s,) = chat.tokenize([parse_record(conv(("user", "Answer with yes or no: is 7 prime?"), ("assistant", "yes"),
                                            ("user", "Is 9 prime?"), ("assistant", "no")))])
    assert masked_text(tokenizer, s) == ["yes<|im_end|>", "<think>\n\n</think>\n\nno<|im_end|>"]
    (s,) = chat.tokenize([parse_record(conv(("user", "is 7 prime?"), ("assistant", "<think>\nno divisors\n</think>\n\nyes"),
                                            ("user", "Is 9 prime?"), ("assistant", "no")))])
    assert masked_text(tokenizer, s) == ["yes<|im_end|>", "<think>\n\n</think>\n\nno<|im_end|>"]


def test_short_empty_and_reasoning_replies_of_earlier_turns(tokenizer):
    """Earlier replies a template renders differently are looked for after their assistant header:
    a reply "a" or "start" was found inside "<|im_start|>assistant" (the header trained, the reply
    not); an empty one is its end-of-turn token (it was rejected); a reasoning reply ending in a
    newline keeps its end-of-turn token."""
    chat = ChatTokenizer(tokenizer, chat_template=QWEN3_LIKE)
    for reply, want in (("a", "a<|im_end|>"), ("start", "start<|im_end|>"), ("", "<|im_end|>"),
                        ("<think>\nr\n</think>\n\nyes\n", "yes<|im_end|>")):
        (s,) = chat.tokenize([parse_record(conv(("user", "Pick a, b or c"), ("assistant", reply),
                                                ("user", "and next?"), ("assistant", "b")))])
        assert masked_text(tokenizer, s) == [want, "<think>\n\n</think>\n\nb<|im_end|>"], reply


def test_reply_mask_stops_before_the_next_turn_and_skips_unspecial_role_tokens(tiny_model):
    """A template without an end-of-turn token: the reply's mask does not run on into the next
    turn's start token. DeepSeek-R1's role token <｜Assistant｜> is an added token that is not
    "special": the reply "a" is still looked for after it, not in it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    no_eot = ("{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n"
              "{% elif loop.last %}<|im_start|>assistant\n<think>\n\n</think>\n\n{{ m['content'] }}\n"
              "{% else %}<|im_start|>assistant\n{{ m['content'] }}\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (s,) = ChatTokenizer(tok, chat_template=no_eot).tokenize(
        [parse_record(conv(("user", "hi"), ("assistant", "hello world"), ("user", "and"), ("assistant", "bye")))])
    assert masked_text(tok, s)[0] == "hello world"
    tok.add_tokens(["<｜User｜>", "<｜Assistant｜>"])                          # added, not special (as in R1)
    tok.add_special_tokens({"additional_special_tokens": ["<｜end▁of▁sentence｜>"]})
    r1 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
          "{% else %}{{ '<｜Assistant｜>' + m['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}")
    chat = ChatTokenizer(tok, chat_template=r1)
    for reply in ("a", ""):
        (s,) = chat.tokenize([parse_record(conv(("user", "Pick a or b"), ("assistant", reply), ("user", "next?"),
                                                ("assistant", "b")))])
        assert masked_text(tok, s) == [reply + "<｜end▁of▁sentence｜>", "b<｜end▁of▁sentence｜>"], reply


MISTRAL_V03_LIKE = (  # Mistral-7B-Instruct-v0.3's rule: the system prompt goes into the last user message
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{% if loop.last and system_message is defined %}"
    "[INST] {{ system_message }}\n\n{{ m['content'] }}[/INST]{% else %}[INST] {{ m['content'] }}[/INST]{% endif %}"
    "{% else %} {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}")


def test_reply_is_not_taken_from_the_request_when_the_system_prompt_moves(tokenizer):
    """With a system prompt the render of the messages before a reply differs from the conversation
    from the request on: the reply "yes" was found in the request "Say yes or no"."""
    chat = ChatTokenizer(tokenizer, chat_template=MISTRAL_V03_LIKE)
    (s,) = chat.tokenize([parse_record(conv(("system", "Be brief."), ("user", "Is 7 prime? Say yes or no."),
                                            ("assistant", "yes"), ("user", "Is 9 prime? no or yes"),
                                            ("assistant", "no")))])
    assert [t.strip() for t in masked_text(tokenizer, s)] == ["yes<|im_end|>", "no<|im_end|>"]


def test_reply_starting_like_the_generation_prompt_tail_is_found(tokenizer):
    """DeepSeek-R1-style templates open a think block in the generation prompt ("<think>\\n") that
    stored replies do not render: a reply starting with "<" (HTML, XML) is still located."""
    r1 = ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
          "{% else %}<|im_start|>assistant\n{{ m['content'].split('</think>')[-1] }}<|im_end|>\n{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    chat = ChatTokenizer(tokenizer, chat_template=r1)
    for reply in ("<b>42</b> is the answer.", "The answer is 42."):
        (s,) = chat.tokenize([parse_record(conv(("user", "What is 12 plus 30?"), ("assistant", reply)))])
        assert masked_text(tokenizer, s) == [reply + "<|im_end|>"]


def test_named_chat_templates_use_the_default_one(tokenizer):
    """Hermes / Command-R tokenizers ship {"default": ..., "tool_use": ...}: the default renders."""
    import copy

    named = copy.copy(tokenizer)
    named.chat_template = {"default": tokenizer.chat_template, "tool_use": "{{ 'tools' }}"}
    (s,) = ChatTokenizer(named).tokenize([parse_record(conv(("user", "hi"), ("assistant", "hello")))])
    assert masked_text(tokenizer, s) == ["hello<|im_end|>"]
    named.chat_template = {"tool_use": "{{ 'tools' }}"}
    with pytest.raises(DraftdataError, match="none called 'default'"):
        ChatTokenizer(named)


def test_template_errors_and_missing_template_are_reported(tokenizer):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}" \
               "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = ChatTokenizer(tokenizer, chat_template=template)
    c = Conversation("x", [{"role": "assistant", "content": "a"}], "f.jsonl:3")
    (r,) = chat.tokenize([c])
    assert isinstance(r, Reject) and r.reason == "template_error" and "must start with user" in r.detail
    assert r.source == "f.jsonl:3"

    class NoTemplate:
        chat_template = None

    with pytest.raises(DraftdataError, match="--chat-template"):
        ChatTokenizer(NoTemplate())


def test_chat_template_file(tmp_path, tokenizer):
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    as_json = tmp_path / "t.json"
    as_json.write_text(json.dumps({"chat_template": jinja.read_text()}))
    assert load_chat_template(jinja) == load_chat_template(as_json) == jinja.read_text()
    with pytest.raises(DraftdataError, match="t.txt"):
        load_chat_template(tmp_path / "t.txt")


def test_too_long_skip_and_truncate(tokenizer):
    long_reply = " ".join(["numbers 0 1 2 3 4 5 6 7 8 9"] * 20)
    c = parse_record(conv(("user", "count"), ("assistant", long_reply)), "f.jsonl:1")
    n = len(ChatTokenizer(tokenizer, max_seq_len=10_000).tokenize([c])[0].input_ids)
    (r,) = ChatTokenizer(tokenizer, max_seq_len=40).tokenize([c])
    assert isinstance(r, Reject) and r.reason == "too_long" and f"{n} tokens > --max-seq-len 40" in r.detail
    (s,) = ChatTokenizer(tokenizer, max_seq_len=40, on_long="truncate").tokenize([c])
    assert s.truncated and s.length == 40 and s.loss_mask.any()
    # truncation that leaves nothing to train on is a reject, not an empty sample
    c2 = parse_record(conv(("user", long_reply), ("assistant", "ok")), "f.jsonl:2")
    (r2,) = ChatTokenizer(tokenizer, max_seq_len=40, on_long="truncate").tokenize([c2])
    assert isinstance(r2, Reject) and r2.reason == "too_long" and "no assistant tokens" in r2.detail


def test_long_text_is_tokenized_by_its_head(tokenizer):
    """A record far longer than --max-seq-len is tokenized by its head (whole, a 10 MB line took
    1.9 GB and 20 s before its reject): the same reject, and the same truncated sample, as from
    the whole text; a text of more than 8 characters a token is still tokenized whole."""
    words = " ".join(f"word{i % 997} {i}" for i in range(20_000))  # ~200k characters
    c = parse_record(conv(("user", "list"), ("assistant", words)), "f.jsonl:1")
    whole = ChatTokenizer(tokenizer, max_seq_len=10**9).tokenize([c])[0]
    (r,) = ChatTokenizer(tokenizer, max_seq_len=40).tokenize([c])
    assert isinstance(r, Reject) and r.reason == "too_long", r
    assert "tokens in its first 1,344 of" in r.detail and "> --max-seq-len 40" in r.detail
    (s,) = ChatTokenizer(tokenizer, max_seq_len=40, on_long="truncate").tokenize([c])
    assert s.truncated and s.input_ids.tolist() == whole.input_ids[:40].tolist()
    assert s.loss_mask.tolist() == whole.loss_mask[:40].tolist() and s.loss_mask.any()
    dense = parse_record(conv(("user", "x"), ("assistant", "<|im_start|>" * 3000)), "f.jsonl:2")
    n = len(ChatTokenizer(tokenizer, max_seq_len=10**9).tokenize([dense])[0].input_ids)
    (r2,) = ChatTokenizer(tokenizer, max_seq_len=200).tokenize([dense])
    assert isinstance(r2, Reject) and f"{n} tokens > --max-seq-len 200" in r2.detail, r2


def test_tokenize_stream_keeps_order_across_chunks(tokenizer):
    chat = ChatTokenizer(tokenizer)
    items = []
    for i in range(7):
        items.append(parse_record(conv(("user", f"q{i}"), ("assistant", f"a{i}"), id=f"c{i}")))
        if i % 3 == 0:
            items.append(Reject(f"f:{i}", "malformed_json", "x"))
    out = list(tokenize_stream(items, chat, chunk=2))
    assert [getattr(x, "conversation_id", None) or x.source for x in out] == \
        [getattr(x, "conversation_id", None) or x.source for x in items]
