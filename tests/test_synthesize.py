"""`draftdata synthesize`: base-model-written answers, on the tiny real Llama (no mocks).

Covers turn-by-turn regeneration against independent `model.generate` runs, system prompts,
user-only conversations, determinism across batch sizes (greedy and sampled), resume, SIGKILL
of the real CLI at several moments, torn-line repair, bad input, an OpenAI-compatible server on
127.0.0.1 with the real HF model behind it, collect reading the output, and --ray on a local
Ray cluster.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from openai_server import ChatServer, OddServer

from draftdata.cli import main
from draftdata.collect.conversations import REASONS, parse_record, read_conversations
from draftdata.collect.synthesize import (
    SYNTH_REASONS,
    Answer,
    HFGenerator,
    JsonlOutput,
    Prompt,
    SynthSettings,
    SynthStats,
    TurnState,
    _error_text,
    _finish,
    synthesize_conversations,
    turn_seed,
)
from draftdata.errors import DraftdataError

MAX_NEW = 10


def conversations() -> list[dict]:
    """A small input covering the record shapes synthesize must handle."""
    return [
        {"conversation_id": "single", "conversations": [
            {"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42"}]},
        {"conversation_id": "multi", "conversations": [
            {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "Write a short poem about the sea."},
            {"role": "assistant", "content": "Waves roll in."}]},
        {"conversation_id": "system", "conversations": [
            {"role": "system", "content": "You answer with numbers."},
            {"role": "user", "content": "numbers 0 1 2"}, {"role": "assistant", "content": "3"}]},
        {"conversation_id": "user-only", "conversations": [
            {"role": "user", "content": "The quick brown fox"}, {"role": "user", "content": "jumps over"}]},
        {"id": 7, "conversations": [{"from": "human", "value": "Speculative decoding drafts tokens"},
                                    {"from": "gpt", "value": "yes"}], "system": "Be brief."},
        {"conversations": [{"role": "user", "content": "no id here"}]},
    ] + [{"conversation_id": f"q{i:02d}", "conversations": [{"role": "user", "content": f"What is {i} plus {i}?"}]}
         for i in range(6)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(records: list[dict]) -> dict[str, list[dict]]:
    return {r["conversation_id"]: r["conversations"] for r in records}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A 64-wide model gains nothing from threads, and on a busy 2-core machine thread hand-offs
    cost more than the matmuls; restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def generator(tiny_model) -> HFGenerator:
    return HFGenerator(tiny_model, max_new_tokens=MAX_NEW, dtype="fp32")


def synth(convs: list[dict], generator: HFGenerator, *, batch_size: int = 4, temperature: float = 0.0,
          seed: int = 0, **kwargs) -> dict[str, list[dict]]:
    """Run the batched loop in-process; returns id -> messages."""
    settings = SynthSettings(input="-", output="-", model_path="-", batch_size=batch_size, seed=seed,
                             temperature=temperature, max_new_tokens=generator.max_new_tokens, **kwargs)
    generator.temperature = temperature
    records, rejects = [], []
    try:
        synthesize_conversations([parse_record(c, f"in:{i + 1}") for i, c in enumerate(convs)], generator, settings,
                                 sink=records.extend, on_reject=rejects.append)
    finally:
        generator.temperature = 0.0
    assert not rejects, rejects
    return by_id(records)


def reference_answer(generator: HFGenerator, messages: list[dict]) -> str:
    """Greedy answer from transformers' own `model.generate` (independent of our decode loop)."""
    text = generator.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = generator.tokenizer(text, add_special_tokens=False)["input_ids"]
    out = generator.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=sorted(generator.stop_ids),
                                   pad_token_id=generator.pad_id)
    new = out[0, len(ids):]
    text = generator.tokenizer.decode(new, skip_special_tokens=True)
    cut = len(new) == 0 or int(new[-1]) not in generator.stop_ids
    return text.rstrip("\ufffd") if cut else text  # a cut inside a character's bytes ends before it


# ------------------------------------------------------------------ what gets generated

def test_turn_by_turn_each_answer_follows_the_models_own_earlier_answers(generator):
    out = synth(conversations(), generator)
    multi = out["multi"]
    assert [m["role"] for m in multi] == ["user", "assistant", "user", "assistant"]
    assert [multi[0]["content"], multi[2]["content"]] == ["hello world", "Write a short poem about the sea."]
    assert multi[1]["content"] != "hi" and multi[3]["content"] != "Waves roll in."
    # turn 1 from the user message alone; turn 2 given turn 1's *synthesized* answer
    assert multi[1]["content"] == reference_answer(generator, multi[:1])
    assert multi[3]["content"] == reference_answer(generator, multi[:3])
    # the original answer in the context would give another turn-2 answer: the context matters
    original = [multi[0], {"role": "assistant", "content": "hi"}, multi[2]]
    assert reference_answer(generator, original) != multi[3]["content"]


def test_system_prompts_kept_injected_replaced_and_user_only_answered(generator):
    out = synth(conversations(), generator)
    assert out["system"][0] == {"role": "system", "content": "You answer with numbers."}
    assert out["system"][2]["content"] == reference_answer(generator, out["system"][:2])
    assert out["7"][0] == {"role": "system", "content": "Be brief."}  # ShareGPT top-level system
    assert [m["role"] for m in out["user-only"]] == ["user", "assistant", "user", "assistant"]
    assert [m["role"] for m in out["q03"]] == ["user", "assistant"]
    assert len(out) == len(conversations())

    injected = synth(conversations()[:3], generator, system_prompt="Answer in English.")
    assert injected["single"][0] == {"role": "system", "content": "Answer in English."}
    assert injected["single"][2]["content"] == reference_answer(generator, injected["single"][:2])
    assert injected["system"][0]["content"] == "You answer with numbers."  # its own prompt wins
    replaced = synth(conversations()[2:3], generator, system_prompt="Answer in English.", replace_system_prompt=True)
    assert [m for m in replaced["system"] if m["role"] == "system"] == [
        {"role": "system", "content": "Answer in English."}]


def test_records_keep_their_category(generator):
    convs = [{"conversation_id": "m", "category": "math", "conversations": [{"role": "user", "content": "1+1?"}]},
             {"conversation_id": "n", "category": 7, "conversations": [{"role": "user", "content": "2+2?"}]},
             {"conversation_id": "o", "conversations": [{"role": "user", "content": "3+3?"}]}]
    settings = SynthSettings(input="-", output="-", model_path="-", batch_size=2, max_new_tokens=4)
    records: list[dict] = []
    synthesize_conversations([parse_record(c, f"in:{i + 1}") for i, c in enumerate(convs)], generator, settings,
                             sink=records.extend, on_reject=lambda r: None)
    assert {r["conversation_id"]: r.get("category") for r in records} == {"m": "math", "n": None, "o": None}


def test_an_empty_input_warns(tiny_model, tmp_path, capsys):
    """An input without records ends with a warning, not a summary of zeros (as collect does)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["synthesize", "--model", str(tiny_model), "--input", str(empty),
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    out = capsys.readouterr()
    assert "warning: no records were read from --input" in out.err and "synthesize summary" not in out.out


def test_empty_answers_are_kept_and_counted():
    conv = parse_record({"id": "e", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    state, stats = TurnState(conv), SynthStats()
    state.add_answer(Answer("", tokens=1))
    state.add_answer(Answer("fine", tokens=2))
    assert [m["content"] for m in _finish(state, stats)["conversations"]] == ["a", "", "b", "fine"]
    assert stats.empty == 1 and stats.answers == 2
    assert "  empty      1 answers have no text (the model ended its turn at once; kept)" in stats.format("out")
    assert "empty" not in SynthStats(answers=3).format("out")


def test_keep_answers_generates_only_the_missing_answers(generator, tiny_model, tmp_path, capsys):
    """--keep-answers (for `prompts --follow-up` output): the input's answers stay as written, and a
    missing answer gets the seed and context a full rewrite would give its turn; only generated
    answers are counted; the setting is part of what a resume must keep."""
    u1, u2 = {"role": "user", "content": "hello world"}, {"role": "user", "content": "What is 12 plus 30?"}
    full = synth([{"conversation_id": "two", "conversations": [u1, u2]}], generator, temperature=1.0, seed=3)["two"]
    assert [m["role"] for m in full] == ["user", "assistant", "user", "assistant"]
    given = {"role": "assistant", "content": "Given answer."}
    convs = [{"conversation_id": "two", "conversations": full[:3]},  # the follow-up of a synthesized turn
             {"conversation_id": "done", "conversations": [u1, given]},
             {"conversation_id": "lead", "conversations": [given, u2, given, u1]}]
    kept = synth(convs, generator, temperature=1.0, seed=3, keep_answers=True)
    assert kept["two"] == full  # turn 2 sampled as in the full rewrite: same seed, same context
    assert kept["done"] == [u1, given]  # nothing missing: written as it came
    assert kept["lead"][:2] == [u2, given] and kept["lead"][2] == u1 and len(kept["lead"]) == 4
    rewritten = synth(convs[1:2], generator)["done"]  # without it every answer is written again
    assert rewritten[0] == u1 and rewritten[1] != given
    system = {"role": "system", "content": "Be brief."}  # answers not right after a user message are dropped
    odd = synth([{"conversation_id": "a", "conversations": [u1, given, given]},
                 {"conversation_id": "s", "conversations": [u1, system, given]}], generator, keep_answers=True)
    assert odd["a"] == [u1, given]
    assert odd["s"][0] == u1 and odd["s"][1]["role"] == "assistant" and odd["s"][1] != given and odd["s"][2:] == [system]

    inp, out = write_jsonl(tmp_path / "in.jsonl", convs), tmp_path / "out.jsonl"
    common = ["--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", MAX_NEW]
    assert run_cli(*common, "--keep-answers") == 0
    assert "written    3 conversations, 2 answers" in capsys.readouterr().out  # two, lead: one answer each
    identity = json.loads((tmp_path / "out.jsonl.synth" / "settings.json").read_text())["identity"]
    assert identity["keep_answers"] is True
    with pytest.raises(DraftdataError, match="keep_answers: file has True, this run has False"):
        run_cli(*common, "--limit", 5)


def test_turn_state_structure():
    conv = parse_record({"conversation_id": "x", "conversations": [
        {"role": "assistant", "content": "greeting"}, {"role": "user", "content": "a"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "old"},
        {"role": "system", "content": "late system"}]})
    state = TurnState(conv, seed=3)
    assert state.prompt().messages == [{"role": "user", "content": "a"}]
    assert state.prompt().seed == turn_seed(3, "x", 0) != turn_seed(3, "x", 1)
    from draftdata.collect.synthesize import Answer

    state.add_answer(Answer("A1"))
    assert state.prompt().messages[-1] == {"role": "user", "content": "b"} and not state.finished
    state.add_answer(Answer("A2"))
    assert state.finished
    assert [m["content"] for m in state.record()["conversations"]] == ["a", "A1", "b", "A2", "late system"]
    with pytest.raises(Exception, match="no user message"):
        TurnState(parse_record({"conversations": [{"role": "assistant", "content": "only"}]}))


def test_deterministic_for_a_seed_regardless_of_batch_size(generator):
    convs = conversations()[:8]
    greedy1, greedy4 = synth(convs, generator, batch_size=1), synth(convs, generator, batch_size=4)
    assert greedy1 == greedy4
    sampled = [synth(convs, generator, batch_size=b, temperature=1.0, seed=5) for b in (1, 4)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != greedy4
    assert synth(convs, generator, batch_size=4, temperature=1.0, seed=6) != sampled[0]
    # order of the input does not matter either (seeds come from ids, not positions)
    assert synth(list(reversed(convs)), generator, batch_size=3, temperature=1.0, seed=5) == sampled[0]


def test_padded_decoding_keeps_kv_heads_grouped_and_matches_transformers_sdpa(generator, monkeypatch):
    """Batched decoding runs SDPA with enable_gqa (no copy of the KV cache per query head, the CPU
    bottleneck of bench/synth) and generates exactly what transformers' own sdpa path generates."""
    import transformers.integrations.sdpa_attention as sdpa

    from draftdata.collect.synthesize import GQA_ATTENTION

    assert generator.model.config._attn_implementation == GQA_ATTENTION
    assert generator.model.config.num_key_value_heads < generator.model.config.num_attention_heads
    copies = []
    real_repeat_kv = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *a: copies.append(1) or real_repeat_kv(*a))
    ids = [generator.encode(Prompt([{"role": "user", "content": "hi " * n}], seed=0)) for n in (1, 5, 9, 14)]
    grouped = generator.generate_ids(ids, [0] * 4)
    assert not copies
    generator.model.set_attn_implementation("sdpa")
    try:
        assert generator.generate_ids(ids, [0] * 4) == grouped
        assert copies  # the path we replace does copy the KV heads when a padding mask is given
    finally:
        generator.model.set_attn_implementation(GQA_ATTENTION)


def test_grouped_decode_attention_matches_sdpa():
    """The bf16 CPU decode path: one query per row over grouped KV heads, with a per-row padding
    mask (bool or additive), a mask broadcast over rows, or none, equals fp32 SDPA."""
    from draftdata.collect.synthesize import _grouped_decode_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for shape in ((3, 6, 1, 8), (3, 2, 11, 8), (3, 2, 11, 8)))
    pad = torch.ones(3, 1, 1, 13, dtype=torch.bool)       # longer than the keys, as transformers' masks may be
    pad[0, ..., :4] = pad[2, ..., :7] = False
    additive = torch.zeros(3, 1, 1, 13).masked_fill(~pad, float("-inf"))
    for mask in (pad, additive, pad[:1], None):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[..., :11], scale=0.3, enable_gqa=True).transpose(1, 2)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
            m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
            got = _grouped_decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), m, 0.3)
            assert got.shape == (3, 1, 6, 8) and got.dtype == dtype
            torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


def test_bf16_on_cpu_decodes_with_the_grouped_attention(tiny_model, monkeypatch):
    """--dtype bf16 on the CPU: every decode step of every layer takes `_grouped_decode_attention`
    (torch's CPU SDPA is several times slower in bf16 for one query), and the padded, batched
    decode's logits match an fp32 forward of the same tokens without a cache; oneDNN's primitive
    cache (an entry per matmul shape, and every decode step has a new one) gets a bound."""
    from transformers import AutoModelForCausalLM

    import draftdata.collect.synthesize as synthesize
    from draftdata.models import ONEDNN_CACHE_ENV

    calls = []
    real = synthesize._grouped_decode_attention
    monkeypatch.setattr(synthesize, "_grouped_decode_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    gen = HFGenerator(tiny_model, max_new_tokens=MAX_NEW, dtype="bf16")
    assert os.environ[ONEDNN_CACHE_ENV] == "64"  # bounded before the first bf16 matmul (bench/train)
    prompts = [gen.encode(Prompt([{"role": "user", "content": "hi " * n}], seed=0)) for n in (1, 6, 13)]
    batch = gen.new_batch()
    batch.add([(j, ids, 0, MAX_NEW) for j, ids in enumerate(prompts)])
    for _ in range(3):
        assert batch.step() == []
    layers = gen.model.config.num_hidden_layers
    assert len(calls) == 3 * layers  # the prefill (many queries) runs SDPA
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for j, ids in enumerate(prompts):
        with torch.no_grad():
            ref = fp32(torch.tensor([ids + batch.tokens[j]])).logits[0, -1]
        got = batch.logits[j].float()
        assert (got - ref).abs().max() < 0.05 * ref.abs().max(), j


def test_rows_join_a_running_batch_and_generate_what_they_would_alone(generator):
    """Continuous batching: rows join while others decode (shorter and longer prompts than the
    running rows, so either side gets left-padded) into the slots of rows that left, and each
    generates exactly its one-at-a-time tokens; columns only departed rows used are cut off."""
    prompts = [generator.encode(Prompt([{"role": "user", "content": "hi " * n}], seed=0)) for n in (3, 1, 9, 14, 30, 2)]
    alone = [generator.generate_ids([ids], [0])[0][0] for ids in prompts]
    budgets = [3, 8, 10, 4, 6, 10]
    sizes: list[int] = []
    batch = generator.new_batch()
    batch.on_step = sizes.append
    out: dict[int, list[int]] = {}

    def run(steps: int) -> None:
        for _ in range(steps):
            out.update({key: tokens for key, tokens, _ in batch.step()})

    batch.add([(k, prompts[k], 0, budgets[k]) for k in (0, 1)])
    run(1)
    keys = batch.cache.layers[0].keys
    run(1)  # nobody left: the step's token was written in place, not by copying the cache
    assert type(batch.cache.layers[0]).__name__ == "SlotLayer"
    assert batch.cache.layers[0].keys.data_ptr() == keys.data_ptr()
    assert batch.cache.layers[0].keys.shape[-2] == keys.shape[-2] + 1
    batch.add([(k, prompts[k], 0, budgets[k]) for k in (2, 3)])  # longer prompts: the running rows get padded
    run(3)
    assert len(batch) == 3 and 0 in out  # row 0 spent its budget and left
    batch.add([(k, prompts[k], 0, budgets[k]) for k in (4, 5)])
    assert len(batch) == 5 and len(batch.keys) == 5  # 4 slots + 1: one of the two took row 0's slot
    while len(batch) > 1:
        run(1)
    live = [j for j, k in enumerate(batch.keys) if k is not None]
    assert [batch.keys[j] for j in live] == [5] and bool(batch.mask[live].all())  # alone: no padding column left
    run(10)
    assert len(batch) == 0 and sizes[:6] == [2, 2, 4, 3, 3, 5]
    for k, budget in enumerate(budgets):
        assert out[k] == alone[k][:budget], k


def test_synthesize_keeps_the_batch_full_while_conversations_wait(tiny_model):
    """Answers of different lengths (budgets from --max-seq-len): a finished turn makes room for the
    next at once, so fewer decode steps than rounds that wait for their longest answer, and the
    answers are those of --batch-size 1."""
    gen = HFGenerator(tiny_model, max_new_tokens=MAX_NEW, dtype="fp32")
    convs = [{"conversation_id": f"c{i}", "conversations": [{"role": "user", "content": "hi " * n}]}
             for i, n in enumerate((12, 12, 12, 1, 11, 11, 11, 2, 12, 12, 12, 3))]
    lengths = [len(gen.encode(Prompt(c["conversations"], seed=0))) for c in convs]
    gen.max_seq_len = max(lengths) + 2
    budgets = [gen.budget([0] * n) for n in lengths]
    assert len(set(budgets)) > 2
    sizes: list[int] = []
    gen.on_step = sizes.append
    batched = synth(convs, gen, batch_size=4)
    assert sum(sizes) == sum(budgets)  # nobody stops early in 10 tokens of a random model
    rounds = sum(max(budgets[i:i + 4]) for i in range(0, len(budgets), 4))  # waiting for each round's longest
    assert len(sizes) < rounds and sizes.count(4) >= len(sizes) - max(budgets)
    gen.on_step = None
    assert synth(convs, gen, batch_size=1) == batched


def test_a_sliding_window_model_runs_static_batches_with_the_same_answers(tiny_model, tmp_path):
    """A cache that cannot be merged (sliding-window layers, here a tiny Mistral with a 16-token
    window, shorter than prompt + answer) falls back to static batches: no turn joins a running
    batch, and the answers equal one-at-a-time generation."""
    import shutil

    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    path = tmp_path / "mistral"
    path.mkdir()
    for f in tiny_model.iterdir():  # the tokenizer and its chat template
        if f.suffix != ".safetensors" and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, path / f.name)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(path)
    gen = HFGenerator(path, max_new_tokens=MAX_NEW, dtype="fp32")
    assert gen.new_batch().join is False
    convs = [{"conversation_id": f"s{i}", "conversations": [{"role": "user", "content": "hi " * n}]}
             for i, n in enumerate((12, 1, 11, 2, 3, 9))]
    sizes: list[int] = []
    gen.on_step = sizes.append
    batched = synth(convs, gen, batch_size=4)
    assert sizes == [4] * MAX_NEW + [2] * MAX_NEW  # two static batches of 4 and 2
    gen.on_step = None
    assert synth(convs, gen, batch_size=1) == batched


def test_conversations_are_read_in_windows_shortest_prompt_first():
    from draftdata.collect.synthesize import by_length_in_windows

    convs = [TurnState(parse_record({"conversation_id": f"c{i}", "conversations": [
        {"role": "system", "content": "s" * (i % 2)}, {"role": "user", "content": "u" * n},
        {"role": "assistant", "content": "a" * 1000}, {"role": "user", "content": "later" * 100}]}))
        for i, n in enumerate((9, 3, 7, 1, 8, 2, 5))]
    out = [s.conv.conversation_id for s in by_length_in_windows(convs, 3)]
    # windows [9+0, 3+1, 7+0], [1+1, 8+0, 2+1], [5+0]: the first prompt counts, not answers or later turns
    assert out == ["c1", "c2", "c0", "c3", "c5", "c4", "c6"]


def test_answers_stop_at_end_of_turn_or_are_counted_truncated(generator):
    ids = generator.encode(Prompt([{"role": "user", "content": "hello"}], 0))
    (tokens, stopped), = generator.generate_ids([ids], [0])
    assert len(tokens) <= MAX_NEW
    assert stopped == (tokens[-1] in generator.stop_ids)
    assert generator.tokenizer.convert_tokens_to_ids("<|im_end|>") in generator.stop_ids
    # a cut inside a character's bytes: the partial character is no text of the model's (it was U+FFFD)
    bytes_of = generator.tokenizer("ok 東", add_special_tokens=False)["input_ids"]
    assert generator.answer(bytes_of[:-1], stopped=False).text == "ok "


def test_max_seq_len_past_the_model_positions_warns(tiny_model, capsys):
    """--max-seq-len 4096 on a 512-position model generated past RoPE's range without a word."""
    HFGenerator(tiny_model, max_new_tokens=MAX_NEW, dtype="fp32", max_seq_len=4096)
    assert "--max-seq-len 4096 is above the model's 512 positions" in capsys.readouterr().err
    HFGenerator(tiny_model, max_new_tokens=MAX_NEW, dtype="fp32", max_seq_len=512)
    assert "warning" not in capsys.readouterr().err


def test_a_cut_answer_is_marked_truncated_in_the_output(tiny_model, tmp_path):
    """Answers cut at --max-new-tokens carry "truncated": true (collect then leaves the end of turn
    after them out of the loss); the mark never goes back to the model in a later turn's prompt."""
    inp = write_jsonl(tmp_path / "in.jsonl", conversations())
    out = tmp_path / "out.jsonl"
    assert run_cli("--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", 2) == 0
    answers = [m for r in read_output(out) for m in r["conversations"] if m["role"] == "assistant"]
    assert answers and all(m.get("truncated") is True for m in answers if m["content"].strip())
    state = TurnState(parse_record(read_output(out)[0]), seed=0, system_prompt=None, replace_system_prompt=False,
                      keep_answers=True)
    assert any("truncated" in m for m in state.messages)
    assert all(set(m) == {"role", "content"} for m in state.prompt().messages)


# ------------------------------------------------------------------ the CLI, output file, resume

def run_cli(*args: object) -> int:
    """`draftdata synthesize ARGS` in this process, raising its DraftdataError (main() prints it, exits 2)."""
    from draftdata.cli import build_parser
    from draftdata.collect import cli_synthesize

    return cli_synthesize.run(build_parser().parse_args(["synthesize", *map(str, args)]))


def test_cli_resume_skips_written_ids_and_collect_reads_the_output(tiny_model, tmp_path, capsys, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", conversations())
    out = tmp_path / "out.jsonl"
    common = ["--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", MAX_NEW]
    monkeypatch.setenv("DRAFTDATA_PROGRESS_INTERVAL", "0")  # stderr is not a terminal: plain progress lines
    assert run_cli(*common, "--limit", 4, "--batch-size", 3) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("synthesize: ")]
    assert len(lines) > 2 and lines[-1].startswith("synthesize: 4/4 convs (100%), ")
    assert int(lines[-1].split(", ")[1].split()[0].replace(",", "")) > 0  # generated tokens, counted live
    monkeypatch.delenv("DRAFTDATA_PROGRESS_INTERVAL")
    first = out.read_text()
    assert len(first.splitlines()) == 4
    assert run_cli(*common, "--batch-size", 2) == 0
    text = out.read_text()
    assert text.startswith(first)  # append-only
    records = read_output(out)
    ids = [r["conversation_id"] for r in records]
    assert sorted(ids) == sorted(c.conversation_id for c in read_conversations(str(inp)))
    assert len(ids) == len(set(ids))
    assert "already_written 4" in capsys.readouterr().out
    assert run_cli(*common) == 0 and out.read_text() == text  # nothing left to do
    # same content as one uninterrupted run with another batch size (greedy)
    fresh = tmp_path / "fresh.jsonl"
    assert run_cli("--model", tiny_model, "--input", inp, "--output", fresh, "--max-new-tokens", MAX_NEW) == 0
    assert by_id(read_output(fresh)) == by_id(records)

    # the output is collect input: every record valid, with assistant turns, and collect runs on it
    items = list(read_conversations(str(out), require_assistant=True))
    assert len(items) == len(records) and all(hasattr(c, "messages") for c in items)
    assert main(["collect", "--model", str(tiny_model), "--input", str(out), "--output",
                 str(tmp_path / "ds"), "--part-size", "1"]) == 0
    from draftdata.store import open_dataset

    assert open_dataset(str(tmp_path / "ds")).num_samples == len(records)


def test_tokens_of_a_conversation_rejected_at_a_later_turn_are_counted_as_discarded(tiny_model, tmp_path, capsys):
    """A conversation whose second turn no longer fits --max-seq-len is rejected whole: the tokens its
    first answer took were in no count, and the tokens/s figure left them out of the time's work."""
    long_turn = " ".join(["numbers 0 1 2 3 4 5 6 7 8 9"] * 8)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"conversation_id": "grows", "conversations": [
        {"role": "user", "content": "hello"}, {"role": "user", "content": long_turn}]}])
    out = tmp_path / "out.jsonl"
    assert run_cli("--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", MAX_NEW,
                   "--max-seq-len", 60, "--dtype", "fp32") == 0
    printed = capsys.readouterr().out
    assert out.read_text() == "" and "too_long 1" in printed
    assert re.search(r"discarded  [1-9]\d* tokens generated for earlier turns of conversations rejected at a later "
                     r"turn", printed), printed


def test_resume_with_other_settings_is_refused(tiny_model, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", conversations()[:2])
    out = tmp_path / "out.jsonl"
    assert run_cli("--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", MAX_NEW) == 0
    with pytest.raises(DraftdataError, match="temperature: file has 0.0, this run has 0.7"):
        run_cli("--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", MAX_NEW,
                "--temperature", 0.7)
    assert main(["synthesize", "--model", str(tiny_model), "--input", str(inp), "--output", str(out),
                 "--max-new-tokens", "5"]) == 2  # the CLI prints it as one line, exit 2
    # the compute dtype and the length bound change answers too
    with pytest.raises(DraftdataError, match="dtype: file has 'auto', this run has 'fp32'"):
        run_cli("--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", MAX_NEW, "--dtype", "fp32")
    with pytest.raises(DraftdataError, match="max_seq_len: file has None, this run has 64"):
        run_cli("--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", MAX_NEW,
                "--max-seq-len", 64)
    # a file written before a setting was recorded cannot be checked for it: appending goes on
    settings = tmp_path / "out.jsonl.synth" / "settings.json"
    recorded = json.loads(settings.read_text())
    del recorded["identity"]["max_seq_len"]
    settings.write_text(json.dumps(recorded))
    more = write_jsonl(tmp_path / "more.jsonl", conversations()[:3])
    assert run_cli("--model", tiny_model, "--input", more, "--output", out, "--max-new-tokens", MAX_NEW,
                   "--max-seq-len", 64) == 0
    # an earlier build's model fingerprint (config, names and sizes) is compared in its own scheme
    from draftdata.models import model_hash

    recorded = json.loads(settings.read_text())
    recorded["identity"]["model_hash"] = model_hash(tiny_model, like="sha256:")
    settings.write_text(json.dumps(recorded))
    most = write_jsonl(tmp_path / "most.jsonl", conversations()[:4])
    assert run_cli("--model", tiny_model, "--input", most, "--output", out, "--max-new-tokens", MAX_NEW,
                   "--max-seq-len", 64) == 0


def test_resume_checks_the_template_and_end_of_turn_ids_but_not_what_cannot_change_answers(tiny_model, tmp_path):
    """A chat template or generation_config.json edited in the model directory between two runs
    appended differently rendered conversations silently; the same weights at another path, or
    --seed / --top-p of a greedy run, were refused though they change no answer."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    convs = conversations()
    inp = write_jsonl(tmp_path / "in.jsonl", convs[:2])
    out = tmp_path / "out.jsonl"
    common = ["--max-new-tokens", MAX_NEW, "--output", out]
    assert run_cli("--model", model, "--input", inp, *common) == 0
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)
    assert run_cli("--model", moved, "--input", write_jsonl(tmp_path / "i3.jsonl", convs[:3]), *common,
                   "--seed", 5, "--top-p", 0.5) == 0
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    with pytest.raises(DraftdataError, match="generation_hash: file has"):
        run_cli("--model", model, "--input", write_jsonl(tmp_path / "i4.jsonl", convs[:4]), *common)


def test_resume_on_another_device_with_dtype_auto_warns(tiny_model, tmp_path, capsys):
    """--dtype auto resolves by device, so resuming a file written on a GPU on the CPU (or the
    reverse) would mix compute dtypes silently: the run says so."""
    inp = write_jsonl(tmp_path / "in.jsonl", conversations()[:1])
    out = tmp_path / "out.jsonl"
    assert run_cli("--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", MAX_NEW) == 0
    settings = tmp_path / "out.jsonl.synth" / "settings.json"
    recorded = json.loads(settings.read_text())
    assert recorded["settings"]["device"] == "cpu"       # --device auto, resolved on this machine
    recorded["settings"]["device"] = "cuda"               # as if written on a GPU machine
    settings.write_text(json.dumps(recorded))
    capsys.readouterr()
    more = write_jsonl(tmp_path / "more.jsonl", conversations()[:2])
    assert run_cli("--model", tiny_model, "--input", more, "--output", out, "--max-new-tokens", MAX_NEW) == 0
    assert "was written on cuda, this run is on cpu with --dtype auto" in capsys.readouterr().err
    # nothing to warn about: the same device type, an explicit dtype, or answers from an endpoint
    from types import SimpleNamespace

    from draftdata.collect.synthesize import _warn_other_device
    for saved, now in (({"device": "cuda:1", "dtype": "auto"}, {"device": "cuda"}),
                       ({"device": "cuda", "dtype": "fp32"}, {"device": "cpu"}),
                       ({"device": "cuda", "dtype": "auto", "endpoint": "http://h/v1"},
                        {"device": "cpu", "endpoint": "http://h/v1"})):
        _warn_other_device(saved, SimpleNamespace(**{"endpoint": None, **now}), "out.jsonl", "synthesize")
    assert capsys.readouterr().err == ""


def test_bad_input_rejected_with_file_line_and_strict(tiny_model, tmp_path, capsys):
    good = conversations()[:2]
    inp = write_jsonl(tmp_path / "in.jsonl", [good[0], "{not json", {"conversation_id": "none", "conversations": [
        {"role": "assistant", "content": "no question"}]}, {"messages": [{"role": "robot", "content": "x"}]},
        good[1], good[0]])
    out = tmp_path / "out.jsonl"
    rejects = tmp_path / "rejects.jsonl"
    assert run_cli("--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", 4,
                   "--rejects", rejects) == 0
    assert sorted(by_id(read_output(out))) == ["multi", "single"]
    rej = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rej] == [
        (f"{inp}:2", "malformed_json"), (f"{inp}:3", "no_user_turn"), (f"{inp}:4", "unknown_role"),
        (f"{inp}:6", "duplicate_id")]
    assert {r["reason"] for r in rej} <= REASONS.keys() | SYNTH_REASONS.keys()  # the documented reasons
    summary = capsys.readouterr().out
    assert "duplicate_id 1" in summary and "malformed_json 1" in summary
    reports = list((tmp_path / "out.jsonl.synth").glob("summary-*.json"))
    assert reports and json.loads(reports[0].read_text())["stats"]["written"] == 2

    strict_out = tmp_path / "strict.jsonl"
    with pytest.raises(DraftdataError, match=rf"{inp}:2: malformed_json"):
        run_cli("--model", tiny_model, "--input", inp, "--output", strict_out, "--strict")
    assert strict_out.read_text() == ""


def test_unwritable_output_is_one_line_before_any_model_work(tiny_model, tmp_path):
    """synthesize and prompts refuse an --output they cannot create (a read-only directory, a path
    through a file) with one line naming it, before the model loads, instead of an OSError traceback."""
    from draftdata.cli import build_parser
    from draftdata.collect import cli_prompts

    inp = write_jsonl(tmp_path / "in.jsonl", conversations()[:1])
    (tmp_path / "a-file").write_text("x")
    places = [tmp_path / "a-file" / "s.jsonl"]
    if os.geteuid() != 0:  # root writes into read-only directories
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        places.append(ro / "s.jsonl")
    for out in places:
        says = rf"^--output {re.escape(str(out))}: cannot create or append to it"
        with pytest.raises(DraftdataError, match=says):
            run_cli("--model", tiny_model, "--input", inp, "--output", out)
        with pytest.raises(DraftdataError, match=says):
            cli_prompts.run(build_parser().parse_args(["prompts", "--model", str(tiny_model), "--output", str(out),
                                                       "--count", "1"]))
    # the same through the CLI: one line, exit 2
    assert main(["synthesize", "--model", str(tiny_model), "--input", str(inp), "--output", str(places[0])]) == 2


def test_leading_assistant_messages_are_reported(tiny_model, tmp_path, capsys):
    """An assistant message before any user message answers nothing and is left out of the output;
    the summary says how many conversations lost one (it used to vanish silently)."""
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"conversation_id": "greet", "conversations": [{"role": "assistant", "content": "Hi! How can I help?"},
                                                         {"role": "user", "content": "What is 12 plus 30?"}]},
        {"conversation_id": "plain", "conversations": [{"role": "user", "content": "hello"}]}])
    out = tmp_path / "out.jsonl"
    assert run_cli("--model", tiny_model, "--input", inp, "--output", out, "--max-new-tokens", 4) == 0
    assert [m["role"] for m in by_id(read_output(out))["greet"]] == ["user", "assistant"]
    summary = capsys.readouterr().out
    assert "  dropped    assistant messages before the first user message, in 1 conversation (" in summary
    (report,) = (tmp_path / "out.jsonl.synth").glob("summary-*.json")
    assert json.loads(report.read_text())["stats"]["leading_assistant"] == 1


def test_torn_last_line_is_cut_and_foreign_lines_refused(tmp_path, capsys):
    path = tmp_path / "out.jsonl"
    whole = json.dumps({"conversation_id": "a", "conversations": []}) + "\n"
    path.write_text(whole + whole.replace('"a"', '"b"') + '{"conversation_id": "c", "conv')
    with JsonlOutput(path) as out:
        assert out.ids == {"a", "b"}
        assert "removed a torn last line" in capsys.readouterr().err
        out.append([{"conversation_id": "c", "conversations": [{"role": "user", "content": "\ud800 lone"}]}])
    assert [r["conversation_id"] for r in read_output(path)] == ["a", "b", "c"]
    with JsonlOutput(path) as out:  # a second open: nothing to repair
        assert out.ids == {"a", "b", "c"}
        with pytest.raises(DraftdataError, match=r"another draftdata run \(synthesize or prompts\) is writing"):
            JsonlOutput(path)
    path.write_text(whole + "garbage\n" + whole.replace('"a"', '"b"'))
    with pytest.raises(DraftdataError, match=r"out.jsonl:2: not a record written by synthesize"):
        JsonlOutput(path)


def test_output_that_is_an_input_file_is_refused(tiny_model, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", conversations()[:1])
    with pytest.raises(DraftdataError, match="is also an input file"):
        run_cli("--model", tiny_model, "--input", tmp_path, "--output", inp)
    with pytest.raises(DraftdataError, match="local"):
        run_cli("--model", tiny_model, "--input", inp, "--output", "s3://bucket/out.jsonl")
    # not there yet, but it would be listed as input once written
    for src in (tmp_path, tmp_path / "*.jsonl"):
        with pytest.raises(DraftdataError, match="would be read back as input"):
            run_cli("--model", tiny_model, "--input", src, "--output", tmp_path / "answers.jsonl")
    assert not (tmp_path / "answers.jsonl").exists()
    # fsspec's "*" does not cross "/": an output in a subdirectory is never listed by the pattern
    from types import SimpleNamespace

    from draftdata.collect.synthesize import check_paths

    check_paths(SimpleNamespace(input=str(tmp_path / "*.jsonl"), output=str(tmp_path / "out" / "answers.jsonl"),
                                storage_options=None))


def test_sigkill_at_several_moments_then_rerun_gives_each_id_once(tiny_model, tmp_path):
    convs = [{"conversation_id": f"k{i:02d}", "conversations": [
        {"role": "user", "content": f"What is {i} plus 30?"}, {"role": "assistant", "content": "x"},
        {"role": "user", "content": "And the lazy dog?"}]} for i in range(8)]
    inp = write_jsonl(tmp_path / "in.jsonl", convs)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "draftdata.cli", "synthesize", "--model", str(tiny_model), "--input", str(inp),
           "--output", str(out), "--max-new-tokens", "12", "--batch-size", "2", "--dtype", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def lines() -> int:
        return len(out.read_bytes().split(b"\n")) - 1 if out.exists() else 0

    def kill_when(condition) -> None:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    kill_when(lambda: False if not out.exists() else True)  # while loading (output just opened)
    kill_when(lambda: lines() >= 2)  # right after the first batch was written
    start = lines()
    kill_when(lambda: lines() >= start + 2)  # mid-run, right after a later write
    killed_at = lines()
    assert 0 < killed_at < len(convs)
    for line in out.read_bytes().splitlines():  # every line so far is whole, valid JSON
        json.loads(line)
    assert run_cli(*cmd[4:]) == 0
    records = read_output(out)
    ids = [r["conversation_id"] for r in records]
    assert sorted(ids) == [c["conversation_id"] for c in convs]  # each exactly once
    assert all(len(r["conversations"]) == 4 for r in records)
    reference = tmp_path / "reference.jsonl"
    assert run_cli(*cmd[4:9], reference, *cmd[10:]) == 0
    assert by_id(read_output(reference)) == by_id(records)  # same answers as an uninterrupted run


# ------------------------------------------------------------------ OpenAI-compatible endpoint

@pytest.fixture(scope="module")
def chat_server(tiny_model):
    server = ChatServer(tiny_model, max_new_tokens=MAX_NEW)
    yield server
    server.close()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_endpoint_mode_matches_local_generation(chat_server, tiny_model, tmp_path, temperature):
    inp = write_jsonl(tmp_path / "in.jsonl", conversations())
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    flags = ["--input", inp, "--max-new-tokens", MAX_NEW, "--temperature", temperature, "--seed", 11]
    assert run_cli("--model", tiny_model, "--dtype", "fp32", "--output", local, *flags) == 0  # the server's dtype
    chat_server.requests.clear()
    assert run_cli("--endpoint", chat_server.url, "--concurrency", 3, "--output", remote, *flags) == 0
    assert by_id(read_output(remote)) == by_id(read_output(local))
    sent = chat_server.requests
    assert len(sent) == sum(sum(m["role"] == "user" for m in msgs) for msgs in by_id(read_output(local)).values())
    assert {r["model"] for r in sent} == {"tiny-llama"} and {r["max_tokens"] for r in sent} == {MAX_NEW}
    second_turn = next(r for r in sent if r["messages"][0]["content"] == "hello world" and len(r["messages"]) == 3)
    earlier = by_id(read_output(local))["multi"][1]  # its own earlier answer, without the "truncated" mark
    assert second_turn["messages"][1] == {"role": "assistant", "content": earlier["content"]}
    assert second_turn["seed"] == turn_seed(11, "multi", 1)


def test_one_endpoint_client_answers_run_after_run(chat_server):
    """A `--ray` actor keeps one client for all its work units: the first unit's end left it
    stopped (every later request cut off at connect: units failed until the run gave up; before
    that, later units silently had no retries)."""
    from draftdata.collect.synthesize import make_generator

    settings = SynthSettings(input="-", output="-", endpoint=chat_server.url, max_new_tokens=MAX_NEW)
    client = make_generator(settings)
    convs = [parse_record(c, f"in:{i + 1}") for i, c in enumerate(conversations()[:4])]
    for unit in (convs[:2], convs[2:]):
        records, rejects = [], []
        synthesize_conversations(unit, client, settings, sink=records.extend, on_reject=rejects.append)
        assert len(records) == 2 and not rejects, rejects


def test_endpoint_errors_retries_and_api_key(chat_server, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"conversation_id": "ok", "conversations": [{"role": "user", "content": "hello"}]},
        {"conversation_id": "flaky", "conversations": [{"role": "user", "content": "FLAKY hello"}]},
        {"conversation_id": "refused", "conversations": [{"role": "user", "content": "hi"},
                                                         {"role": "user", "content": "FORBIDDEN"}]}])
    out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    monkeypatch.setenv("DRAFTDATA_API_KEY", "sekret")
    chat_server.requests.clear()
    assert run_cli("--endpoint", chat_server.url + "/v1", "--model", "tiny-llama", "--input", inp, "--output", out,
                   "--max-new-tokens", 4, "--rejects", rejects) == 0
    assert sorted(by_id(read_output(out))) == ["flaky", "ok"]
    rej = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["conversation_id"], r["reason"]) for r in rej] == [("refused", "endpoint_rejected")]
    assert "endpoint_rejected" in SYNTH_REASONS
    assert "HTTP 400" in rej[0]["detail"] and "turn 2" in rej[0]["detail"]
    assert {r["auth"] for r in chat_server.requests} == {"Bearer sekret"}
    assert "sekret" not in "".join(p.read_text() for p in (tmp_path / "out.jsonl.synth").iterdir())
    with pytest.raises(DraftdataError, match="HTTP 404: model 'nope' does not exist"):  # a flag error: stop
        run_cli("--endpoint", chat_server.url, "--model", "nope", "--input", inp, "--output", tmp_path / "o2.jsonl")
    with pytest.raises(DraftdataError, match="failed 2 times"):  # nothing listening: retries, then stops
        run_cli("--endpoint", "http://127.0.0.1:9", "--model", "m", "--input", inp, "--output",
                tmp_path / "o3.jsonl", "--retries", 1)
    with pytest.raises(DraftdataError, match="--request-timeout positive"):
        run_cli("--endpoint", chat_server.url, "--input", inp, "--output", tmp_path / "o4.jsonl",
                "--request-timeout", 0)


class NotFoundServer:
    """Answers every request with HTTP 404 and a long multi-line HTML page (a wrong --endpoint URL)."""

    PAGE = ("<!DOCTYPE html>\n<html>\n<head><title>404 Not Found</title>\n<style>body { color: red; }</style>"
            "</head>\n<body>\n<h1>Not Found</h1>\n" + "<p>The requested URL was not found on this server.</p>\n" * 40
            + "</body>\n</html>\n")

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        page = self.PAGE.encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(404)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            do_POST = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_wrong_endpoint_url_says_so_in_one_short_line(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", conversations())
    server = NotFoundServer()
    try:
        with pytest.raises(DraftdataError) as e:
            run_cli("--endpoint", server.url + "/api", "--input", inp, "--output", tmp_path / "o.jsonl")
        msg = str(e.value)
        assert "answered HTTP 404" in msg and "the URL is probably wrong" in msg and "http://host:8000" in msg
        assert "pass --model" not in msg and "\n" not in msg and "<" not in msg and len(msg) < 500, msg
        assert "(404 Not Found Not Found The requested URL was not found on this server." in msg
        with pytest.raises(DraftdataError) as e:  # --model given: the POST answers 404, quoted as short
            run_cli("--endpoint", server.url, "--model", "m", "--input", inp, "--output", tmp_path / "o.jsonl")
        msg = str(e.value)
        assert "HTTP 404" in msg and "\n" not in msg and len(msg) < 500, msg
    finally:
        server.close()


def one_turn(cid: str, text: str) -> dict:
    return {"conversation_id": cid, "conversations": [{"role": "user", "content": text}]}


def test_endpoint_oddities_are_answered_rejected_retried_or_stop_the_run(tmp_path):
    server = OddServer()
    try:
        inp = write_jsonl(tmp_path / "in.jsonl", [one_turn("usage", "USAGESTR hi"), one_turn("filter", "FILTER hi"),
                                                  one_turn("cut", "CLOSE503 hi"), one_turn("plain", "hi")])
        out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
        assert run_cli("--endpoint", server.url, "--input", inp, "--output", out, "--rejects", rejects,
                       "--retries", 2) == 0
        # a usage block that is not numbers crashed the run; a 503 with a cut-off body escaped the retries
        assert sorted(by_id(read_output(out))) == ["cut", "plain", "usage"]
        (rej,) = [json.loads(line) for line in rejects.read_text().splitlines()]
        assert rej["conversation_id"] == "filter" and "content_filter" in rej["detail"]   # not the model's answer
        # --request-timeout bounds the whole request (urllib bounds each socket read): a trickled body
        slow = write_jsonl(tmp_path / "slow.jsonl", [one_turn("slow", "TRICKLE hi")])
        t0 = time.monotonic()
        with pytest.raises(DraftdataError, match="took longer than --request-timeout"):
            run_cli("--endpoint", server.url, "--input", slow, "--output", tmp_path / "o2.jsonl",
                    "--request-timeout", 1, "--retries", 0)
        assert time.monotonic() - t0 < 20
        cut = write_jsonl(tmp_path / "cut.jsonl", [one_turn("cut200", "CUT200 hi")])
        with pytest.raises(DraftdataError, match="IncompleteRead"):   # a transport failure: stop, rerun resumes
            run_cli("--endpoint", server.url, "--input", cut, "--output", tmp_path / "o5.jsonl", "--retries", 1)
        moved = write_jsonl(tmp_path / "moved.jsonl", [one_turn("moved", "R307 hi")])
        with pytest.raises(DraftdataError, match=r"redirected \(HTTP 307 to /elsewhere\); give the final URL"):
            run_cli("--endpoint", server.url, "--input", moved, "--output", tmp_path / "o3.jsonl")
        # the same server spelled another documented way resumes; compressed outputs are refused
        assert run_cli("--endpoint", server.url + "/v1/chat/completions", "--input", inp, "--output", out,
                       "--retries", 2, "--max-seq-len", 777) == 0    # (--max-seq-len is local generation's)
        with pytest.raises(DraftdataError, match="appends plain JSONL lines"):
            run_cli("--endpoint", server.url, "--input", inp, "--output", tmp_path / "o4.jsonl.gz")
        # --rejects onto the output or an input file overwrote it at the end of the run
        before = out.read_bytes()
        for target, what in ((out, "is the --output file"), (inp, "is an input file")):
            with pytest.raises(DraftdataError, match=what):
                run_cli("--endpoint", server.url, "--input", inp, "--output", out, "--rejects", target)
        assert out.read_bytes() == before
    finally:
        server.close()


def test_strict_endpoint_run_keeps_every_answer_the_server_gave(tmp_path):
    """--strict stops at the first reject, but the conversations answered in the same moment (or
    still in flight) were dropped; every one the server answered is now written."""
    server = OddServer(delay=0.5)
    try:
        inp = write_jsonl(tmp_path / "in.jsonl", [one_turn(f"ok{i}", f"hi {i}") for i in range(7)]
                          + [one_turn("bad", "FORBIDDEN")])
        out = tmp_path / "out.jsonl"
        with pytest.raises(DraftdataError, match="--strict stops"):
            run_cli("--endpoint", server.url, "--input", inp, "--output", out, "--strict", "--concurrency", 8)
        assert sorted(by_id(read_output(out))) == [f"ok{i}" for i in range(7)]
        # a stop does not sit out another conversation's retries (backoff 1, 2, 4, 8 s here)
        inp = write_jsonl(tmp_path / "in2.jsonl", [one_turn("busy", "BUSY"), one_turn("bad", "FORBIDDEN")])
        t0 = time.monotonic()
        with pytest.raises(DraftdataError, match="--strict stops"):
            run_cli("--endpoint", server.url, "--input", inp, "--output", tmp_path / "o2.jsonl", "--strict",
                    "--retries", 4)
        assert time.monotonic() - t0 < 6
    finally:
        server.close()


def test_a_stopping_endpoint_run_cuts_off_requests_in_flight(tmp_path):
    """--strict and Ctrl-C waited for every request under way, up to --request-timeout (600 s by
    default): a run stops within seconds now, keeps what the server finished, and a rerun asks for
    the cut-off conversations again."""
    server = OddServer(hang=90)
    try:
        inp = write_jsonl(tmp_path / "in.jsonl", [one_turn("slow", "HANG"), one_turn("bad", "FORBIDDEN")])
        t0 = time.monotonic()
        with pytest.raises(DraftdataError, match="--strict stops"):
            run_cli("--endpoint", server.url, "--input", inp, "--output", tmp_path / "o.jsonl", "--strict",
                    "--concurrency", 2)
        assert time.monotonic() - t0 < 20
        inp = write_jsonl(tmp_path / "in2.jsonl", [one_turn("ok", "hi"), one_turn("slow", "HANG")])
        out = tmp_path / "o2.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "draftdata.cli", "synthesize", "--endpoint", server.url,
                                 "--input", str(inp), "--output", str(out), "--concurrency", "2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C while "slow" waits for its answer
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 20 and proc.returncode == 130, err[-2000:]
        assert "cutting off 1 request(s) in flight" in err
        assert list(by_id(read_output(out))) == ["ok"]
    finally:
        server.close()


def test_sigterm_stops_like_ctrl_c_keeping_finished_answers_and_reports(tiny_model, tmp_path):
    """SIGTERM (what slurm, Kubernetes, `timeout` and `docker stop` send) killed the run at once:
    the answers finished but not yet written, the summary and the rejects were lost."""
    inp = write_jsonl(tmp_path / "in.jsonl", [one_turn(f"c{i}", f"hello number {i}") for i in range(400)])
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "draftdata.cli", "synthesize", "--model", str(tiny_model),
                             "--input", str(inp), "--output", str(out), "--max-new-tokens", "24",
                             "--batch-size", "4", "--dtype", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err, err[-2000:]
    written = len(read_output(out))
    assert 2 <= written < 400 and f"written    {written:,}" in stdout, stdout
    assert list((tmp_path / "out.jsonl.synth").glob("summary-*.json"))


def test_a_server_that_never_accepts_is_given_up_on_at_connect(monkeypatch):
    """A stopping run cannot cut a socket still connecting (a crashed host, a firewall dropping
    packets): such a request held the run for all of --request-timeout (600 s by default); the
    handshake now has its own bound, CONNECT_TIMEOUT_S (10 s; 1 s here)."""
    import socket

    from draftdata.collect import synthesize as synth_module
    from draftdata.collect.synthesize import EndpointClient, EndpointError

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)                                 # a full accept queue: further handshakes hang
    port = server.getsockname()[1]
    queued = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        queued.append(c)
    time.sleep(0.3)
    monkeypatch.setattr(synth_module, "CONNECT_TIMEOUT_S", 1.0)
    client = EndpointClient(f"http://127.0.0.1:{port}", model="m", timeout=60, retries=0)
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match="timed out"):
        client.answer(Prompt([{"role": "user", "content": "hi"}], 0))
    assert time.monotonic() - t0 < 20
    for c in [*queued, server]:
        c.close()


def test_quoted_response_bodies_are_one_short_line():
    assert _error_text({"error": {"message": "bad\n  request " + "x" * 500}}) == "bad request " + "x" * 185 + "..."
    assert _error_text("<html><script>var a = 1;</script><b>Gone</b>\n</html>") == "Gone"
    assert _error_text("") == "(empty body)"


# ------------------------------------------------------------------ --ray

def test_ray_matches_local_output(tiny_model, tmp_path, capfd):
    ray = pytest.importorskip("ray")
    inp = write_jsonl(tmp_path / "in.jsonl", conversations())
    local, distributed = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    flags = ["--model", tiny_model, "--input", inp, "--max-new-tokens", MAX_NEW, "--temperature", 1.0]
    assert run_cli(*flags, "--output", local) == 0
    assert run_cli(*flags, "--output", distributed, "--limit", 3) == 0  # --ray resumes a partial output
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, logging_level="ERROR")
    try:
        assert run_cli(*flags, "--output", distributed, "--ray", "--num-workers", 2, "--work-unit-size", 2,
                       "--batch-size", 2) == 0
    finally:
        ray.shutdown()
    if os.geteuid() == 0:  # CPU actors compute at the raylet's niceness, not Ray's worker niceness (15)
        nice = re.findall(r"cpu, 1 threads at nice (-?\d+)", capfd.readouterr().err)
        assert nice and set(nice) == {str(os.getpriority(os.PRIO_PROCESS, 0))}, nice
    records = read_output(distributed)
    assert len(records) == len({r["conversation_id"] for r in records}) == len(conversations())
    assert by_id(records) == by_id(read_output(local))  # same answers, however the work was split


def test_sigterm_stops_a_ray_run_as_ctrl_c_does(tmp_path):
    """ray.init replaces the CLI's SIGTERM handler with its own exit (status 1 or 15, a dump, no
    'terminated' line): the CLI takes SIGTERM back after connecting."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)                                   # accepts, never answers
    inp = write_jsonl(tmp_path / "in.jsonl", [one_turn(f"c{i}", f"hi {i}") for i in range(4)])
    proc = subprocess.Popen([sys.executable, "-m", "draftdata.cli", "synthesize", "--endpoint",
                             f"http://127.0.0.1:{server.getsockname()[1]}", "--model", "m", "--input", str(inp),
                             "--output", str(tmp_path / "out.jsonl"), "--ray", "--num-workers", "1",
                             "--request-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"})
    try:
        server.settimeout(120)
        conn, _ = server.accept()                       # a worker's request: the run is under way
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err, err[-2000:]


def test_pick_tokens_samples_the_distribution_row_by_row():
    from draftdata.collect.decode_batch import pick_tokens

    logits = torch.tensor([[0.0, 1.0, 2.0, -float("inf")]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(pick_tokens(logits, 1.0, 1.0, u), minlength=4) / 20000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015) and freq[3] == 0
    nucleus = torch.bincount(pick_tokens(logits, 1.0, 0.7, u), minlength=4) / 20000  # keeps the top two
    assert freq[0] > 0 and nucleus[0] == 0 and abs(nucleus[2] - 0.731) < 0.015
    edge = pick_tokens(logits[:2], 1.0, 1.0, torch.tensor([0.0, 1 - 2**-60], dtype=torch.float64))
    assert edge.tolist() == [0, 2]  # never a zero-probability token, even at the top of the CDF
    assert pick_tokens(logits[:1], 0.0, 1.0, None).tolist() == [2]


def test_length_groups_bound_padding_work():
    from draftdata.collect.decode_batch import length_groups

    lengths = [50, 55, 60, 62, 70, 500]
    assert length_groups(lengths, 64) == [[0, 1, 2, 3, 4], [5]]  # a long prompt no longer pads the rest
    assert length_groups(lengths, 4096) == [[0, 1, 2, 3, 4, 5]]  # long answers: one batch
    groups = length_groups(sorted([7, 300, 30, 31, 90, 95, 100, 2000]), 16)
    assert sorted(k for g in groups for k in g) == list(range(8))
    assert length_groups([], 10) == []
