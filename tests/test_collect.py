"""The HF backend and `draftdata collect`: capture convention, batching, resume, rejects, SIGKILL, S3."""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import overflowing_model

from draftdata.cli import main
from draftdata.collect.backends import get_backend
from draftdata.collect.backends.hf import HFBackend
from draftdata.collect.conversations import ChatTokenizer, TokenizedSample, parse_record
from draftdata.collect.runner import CollectOptions, collect_records, token_batches
from draftdata.config import DatasetSchema
from draftdata.errors import DraftdataError, SchemaMismatchError
from draftdata.store import create_dataset, open_dataset

BF16 = {"rtol": 2**-7, "atol": 1e-5}  # one bf16 rounding step


@pytest.fixture(scope="module")
def backend32(tiny_model):
    b = HFBackend(tiny_model, dtype="fp32")
    yield b
    b.close()


def reference_states(model_dir, seq, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = reference_states.cache.get((str(model_dir), dtype))
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        reference_states.cache[(str(model_dir), dtype)] = model
    with torch.inference_mode():
        return model(torch.tensor([seq]), output_hidden_states=True).hidden_states


reference_states.cache = {}


def random_seqs(lengths, seed=0, vocab=400):
    g = random.Random(seed)
    return [[g.randrange(3, vocab) for _ in range(n)] for n in lengths]


# ---------------------------------------------------------------- backend


def test_capture_equals_hf_output_hidden_states(tiny_model, backend32):
    """aux id k = output of decoder layer k = HF hidden_states[k+1]; final = hidden_states[-1] (post-norm)."""
    seqs = random_seqs([9, 3, 17])
    aux_ids = [0, 2]
    outs = backend32.forward(seqs, aux_ids)
    assert backend32.info.final_hidden_prenorm is False
    for seq, (aux, final) in zip(seqs, outs):
        hs = reference_states(tiny_model, seq)
        assert len(hs) == 5  # embeddings + 4 layers (the last replaced by the final norm's output)
        assert aux.dtype == final.dtype == torch.bfloat16 and aux.device.type == "cpu"
        assert aux.shape == (len(seq), 2 * 64) and final.shape == (len(seq), 64)
        expected = torch.cat([hs[k + 1][0] for k in aux_ids], dim=-1)
        torch.testing.assert_close(aux.float(), expected.bfloat16().float(), **BF16)
        torch.testing.assert_close(final.float(), hs[-1][0].bfloat16().float(), **BF16)
        # the convention is not HF's index k (the embeddings for k = 0)
        assert not torch.allclose(aux[:, :64].float(), hs[0][0], atol=1e-2)


def test_earlier_layer_outputs_are_not_kept_during_the_forward(backend32):
    """Memory holds the packed aux buffer, not every layer's [B, T, H] output: when the last
    decoder layer starts, only its input is still alive (with output_hidden_states=True, all are)."""
    import weakref

    refs: list = []
    alive: list[int] = []
    layers = backend32.layers
    hooks = [layer.register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o[0] if isinstance(o, tuple) else o)))
             for layer in layers[:-1]]
    hooks.append(layers[-1].register_forward_pre_hook(lambda m, a: alive.append(sum(r() is not None for r in refs))))
    try:
        backend32.forward(random_seqs([20, 7]), [0, 1])
        refs.clear()
        with torch.inference_mode():
            backend32.model(input_ids=torch.tensor(random_seqs([20])), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    assert alive == [1, 3]


def test_out_of_memory_split_frees_the_failed_batch_first(backend32, capsys):
    """A batch that runs out of GPU memory is split in halves, and the halves run only after the
    failed forward's activations are released (held by the exception's traceback, they would
    leave each half less memory than the whole batch had). The OOM is raised for real, by the
    last decoder layer, whenever it sees more than one sequence."""
    import weakref
    from types import SimpleNamespace

    from draftdata.collect import runner

    failed: list = []
    alive_at_retry: list[int] = []

    def hook(module, args):
        if args[0].shape[0] > 1:
            failed.append(weakref.ref(args[0]))
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")
        alive_at_retry.append(sum(r() is not None for r in failed))

    seqs = random_seqs([30, 20, 10, 5])
    batch = [SimpleNamespace(input_ids=np.asarray(q), length=len(q), source=f"in.jsonl:{i + 1}")
             for i, q in enumerate(seqs)]
    handle = backend32.layers[-1].register_forward_pre_hook(hook)
    try:
        out, nonfinite = runner._forward(backend32, batch, [0, 1])
    finally:
        handle.remove()
    assert [a.shape[0] for a, _ in out] == [30, 20, 10, 5] and nonfinite == [0, 0, 0, 0]
    assert len(failed) == 3 and alive_at_retry == [0, 0, 0, 0]
    assert "out of memory on a batch of 4 sequences; splitting it" in capsys.readouterr().err
    handle = backend32.layers[-1].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory (raised by the test)")))
    try:
        with pytest.raises(DraftdataError, match=r"one sequence of 5 tokens \(in.jsonl:4\)"):
            runner._forward(backend32, batch[3:], [0, 1])
    finally:
        handle.remove()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_batched_equals_alone(tiny_model, backend32, dtype):
    backend = backend32 if dtype == "fp32" else HFBackend(tiny_model, dtype="bf16")
    seqs = random_seqs([31, 5, 18, 1, 24], seed=1)
    batched = backend.forward(seqs, [0, 1, 3])
    for seq, (aux, final) in zip(seqs, batched):
        (aux1, final1), = backend.forward([seq], [0, 1, 3])
        assert aux.shape == aux1.shape == (len(seq), 3 * 64)  # no padding rows
        if dtype == "fp32":  # computed in fp32: at most one bf16 rounding step apart
            torch.testing.assert_close(aux, aux1, **BF16)
            torch.testing.assert_close(final, final1, **BF16)
        else:  # computed in bf16: kernel order differs by batch shape, a few rounding steps
            torch.testing.assert_close(aux.float(), aux1.float(), rtol=2**-5, atol=2**-6)
            torch.testing.assert_close(final.float(), final1.float(), rtol=2**-5, atol=2**-5)


def test_a_multimodal_base_is_hooked_on_its_text_layers(tiny_model, tmp_path):
    """Gemma 3 with a vision tower as deep as its text model: the first ModuleList of that length,
    the vision encoder's, was hooked; its hooks never ran on text and the aux states stored were
    uninitialized memory (exit 0). The text decoder's layers are hooked now."""
    import transformers

    base = tmp_path / "gemma3vlm"
    shutil.copytree(tiny_model, base, ignore=shutil.ignore_patterns("*.safetensors", "config.json",
                                                                   "generation_config.json"))
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    text = transformers.Gemma3TextConfig(vocab_size=vocab + 8, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=512)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
        image_token_index=vocab + 1, boi_token_index=vocab + 2, eoi_token_index=vocab + 3)).eval()
    model.save_pretrained(base)
    ids = [5, 6, 7, 8, 9, 10]
    ((aux, final),) = HFBackend(base, dtype="fp32").forward([ids], [0, 1, 2])
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    want = torch.cat([states[k + 1][0] for k in (0, 1, 2)], dim=-1)
    assert torch.allclose(aux.float(), want, rtol=2e-2, atol=2e-2)
    assert torch.allclose(final.float(), states[-1][0], rtol=2e-2, atol=2e-2)


def test_backend_errors(tiny_model, backend32):
    with pytest.raises(DraftdataError, match="0..3"):
        backend32.forward([[5, 6]], [4])
    with pytest.raises(DraftdataError, match="vocabulary"):
        backend32.forward([[5, 4000]], [1])
    with pytest.raises(DraftdataError, match="--backend 'nope'"):
        get_backend("nope", tiny_model)
    # "auto" as on the command line (COLLECT.md's Python API example raised "--device 'auto'")
    assert get_backend("hf", tiny_model, device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DraftdataError, match="no CUDA|cpu"):
        if not torch.cuda.is_available():
            HFBackend(tiny_model, device="cuda")
        else:
            raise DraftdataError("cpu")


def sample(n, cid=None):
    return TokenizedSample(cid or f"s{n}", np.arange(n, dtype=np.int32), np.ones(n, np.uint8), "f:1")


def test_token_batches_fill_the_budget_longest_first():
    samples = [sample(n, f"c{i}") for i, n in enumerate([5, 100, 40, 41, 39, 7, 300, 38, 6, 40])]
    batches = list(token_batches(samples, batch_tokens=160))
    assert sorted(s.conversation_id for b in batches for s in b) == sorted(s.conversation_id for s in samples)
    assert [s.length for s in batches[0]] == [300]  # longer than the budget: alone
    for b in batches:
        longest = max(s.length for s in b)
        assert b[0].length == longest
        assert len(b) == 1 or len(b) * longest <= 160
        padding = len(b) * longest - sum(s.length for s in b)
        assert len(b) == 1 or padding <= max(0.125 * len(b) * longest, 16 * len(b))
    # 39 would overflow the budget (4 x 41 > 160); 6 would pad 7 and 38 by more than 16 a row
    assert [[s.length for s in b] for b in batches[1:]] == [[100], [41, 40, 40], [39, 38, 7], [6, 5]]


def test_writer_failure_reaches_the_caller_and_commits_nothing(tiny_model, backend32, tmp_path):
    """A sample the store refuses (hidden size 64 into a hidden-size-32 dataset) fails in the writer
    thread; collect_records must raise it and leave no visible part."""
    schema = DatasetSchema(base_model_id="x", hidden_size=32, aux_layer_ids=[0], num_hidden_layers=4,
                           vocab_size=400, max_seq_len=64)
    writer = create_dataset(str(tmp_path / "ds"), schema)
    with pytest.raises(SchemaMismatchError, match="hidden_size=32"):
        collect_records([sample(8, f"c{i}") for i in range(20)], backend32, writer,
                        CollectOptions(aux_layer_ids=[0], batch_tokens=16, queue_batches=1))
    assert open_dataset(str(tmp_path / "ds")).parts == []


def test_input_errors_on_the_reader_thread_reach_the_caller(tiny_model, backend32, tmp_path):
    from transformers import AutoTokenizer

    from draftdata.collect.conversations import read_conversations
    from draftdata.collect.runner import CollectStats, RejectLog, prepare_samples

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(conv("a", ("user", "q"), ("assistant", "a"))) + "\n{bad\n")
    schema = DatasetSchema(base_model_id="x", hidden_size=64, aux_layer_ids=[0], num_hidden_layers=4,
                           vocab_size=400, max_seq_len=64)
    writer = create_dataset(str(tmp_path / "ds"), schema)
    stats = CollectStats()
    samples = prepare_samples(read_conversations(str(inp)), ChatTokenizer(AutoTokenizer.from_pretrained(tiny_model)),
                              skip_ids=set(), stats=stats, on_reject=RejectLog(stats, strict=True))
    with pytest.raises(DraftdataError, match=f"{inp}:2: malformed_json"):
        collect_records(samples, backend32, writer, CollectOptions(aux_layer_ids=[0]))
    assert open_dataset(str(tmp_path / "ds")).parts == []


# ---------------------------------------------------------------- the CLI


def conv(cid, *turns):
    return {"conversation_id": cid, "conversations": [{"role": r, "content": c} for r, c in turns]}


WORDS = "the quick brown fox jumps over the lazy dog what is 12 plus 30 answer 42 hello world".split()


def valid_conversations(n, seed=0):
    g = random.Random(seed)
    out = []
    for i in range(n):
        turns = [("user", " ".join(g.choices(WORDS, k=g.randint(2, 12)))),
                 ("assistant", " ".join(g.choices(WORDS, k=g.randint(1, 16))))]
        if i % 5 == 0:
            turns = [("system", "Be short.")] + turns + [("user", "and?"), ("assistant", "numbers 1 2 3")]
        out.append(conv(f"c{i:04d}", *turns))
    return out


def write_input(path, records):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return str(path)


def collect_args(model, inp, out, *extra):
    return ["collect", "--model", str(model), "--input", inp, "--output", out, "--dtype", "fp32",
            "--max-seq-len", "128", *extra]


def stored_ids(url, **kw):
    return [cid for p in open_dataset(url, **kw).parts for cid in p.conversation_ids]


def test_collect_end_to_end_rejects_and_resume(tiny_model, backend32, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("DRAFTDATA_PROGRESS_INTERVAL", "0")  # stderr is not a terminal: plain progress lines

    good = valid_conversations(12)
    sharegpt = {"id": "sg", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"},
                                              {"from": "human", "value": "and?"}, {"from": "gpt", "value": " "}]}
    records = good[:6] + ["{broken json\n", conv("bad-role", ("user", "q"), ("bot", "a")), sharegpt,
                          conv("c0003", ("user", "dup"), ("assistant", "dup")),
                          conv("long", ("user", "numbers 1 2 3 " * 60), ("assistant", "ok")),
                          conv("prompt-only", ("user", "just asking"))] + good[6:]
    inp = write_input(tmp_path / "in.jsonl", records)
    out = str(tmp_path / "ds")
    args = collect_args(tiny_model, inp, out, "--batch-tokens", "96", "--part-size", "0.05")
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("collect: ")]
    assert len(lines) > 2 and "convs (" in lines[0] and " tok/s" in lines[0]
    assert lines[-1].startswith("collect: 18/18 convs (100%), ")  # every record counted, written or not
    want = sorted([c["conversation_id"] for c in good] + ["sg"])
    ids = stored_ids(out)
    assert sorted(ids) == want and len(ids) == len(set(ids))
    ds = open_dataset(out)
    assert len(ds.parts) > 1  # rolled over at --part-size
    assert ds.schema.aux_layer_ids == [0, 1] and ds.schema.final_hidden_prenorm is False
    assert ds.schema.loss_mask == "assistant" and ds.schema.base_model_hash
    assert "written    13 conversations" in summary and "skipped    5:" in summary
    for reason in ("malformed_json 1", "unknown_role 1", "duplicate_id 1", "too_long 1", "no_assistant_turn 1"):
        assert reason in summary
    assert "empty      1 conversations with an empty assistant message (kept" in summary  # "sg": kept, and said
    (report,) = glob.glob(f"{out}/_reports/*/summary.json")
    assert json.loads(Path(report).read_text())["stats"]["empty_answers"] == 1

    # rejects: one line each, with file:line and reason
    (rejects_file,) = glob.glob(f"{out}/_reports/*/rejects.jsonl")
    assert f"rejects    {rejects_file}" in summary
    rejects = [json.loads(line) for line in open(rejects_file)]
    assert [(r["source"], r["reason"]) for r in rejects] == [
        (f"{inp}:7", "malformed_json"), (f"{inp}:8", "unknown_role"), (f"{inp}:10", "duplicate_id"),
        (f"{inp}:11", "too_long"), (f"{inp}:12", "no_assistant_turn")]

    # every stored sample is its tokenization + the states of running it alone
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(tiny_model), max_seq_len=128)
    by_id = {c.conversation_id: c for c in (parse_record(r) for r in good + [sharegpt])}
    for s in ds:
        (tok,) = chat.tokenize([by_id[s["conversation_id"]]])
        assert s["input_ids"].tolist() == tok.input_ids.tolist()
        assert s["loss_mask"].tolist() == tok.loss_mask.tolist()
        (aux, final), = backend32.forward([tok.input_ids.tolist()], [0, 1])
        torch.testing.assert_close(s["aux_hidden_states"], aux, **BF16)
        torch.testing.assert_close(s["hidden_states"], final, **BF16)

    # resume: the same command again writes nothing new
    parts_before = [p.id for p in ds.parts]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "written    0 conversations" in summary and "already_committed 13" in summary
    assert "empty " not in summary
    assert [p.id for p in open_dataset(out).parts] == parts_before

    # more input later: only the new conversations are collected
    extra = valid_conversations(15)[12:]
    write_input(tmp_path / "in.jsonl", records + extra)
    assert main(args) == 0
    assert "written    3 conversations" in capsys.readouterr().out
    ids = stored_ids(out)
    assert sorted(ids) == sorted(want + [c["conversation_id"] for c in extra]) and len(ids) == len(set(ids))


def test_every_record_rejected_fails_and_says_why(tiny_model, tmp_path, capsys):
    """A JSON array (as ShareGPT dumps ship) instead of JSON Lines: every line was rejected, the
    reason was only in the rejects file, and collect exited 0 with an empty dataset."""
    records = [conv(f"c{i}", ("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(3)]
    inp = tmp_path / "sharegpt.json"
    inp.write_text(json.dumps(records, indent=1))
    out = str(tmp_path / "ds")
    assert main(collect_args(tiny_model, str(inp), out)) == 1
    err = capsys.readouterr().err
    (rejects_file,) = glob.glob(f"{out}/_reports/*/rejects.jsonl")
    assert re.search(rf"draftdata collect: error: all \d+ records read were rejected, nothing was written; the "
                     rf"first: {re.escape(str(inp))}:1: malformed_json: .*JSON Lines.* \(all of them: "
                     rf"{re.escape(rejects_file)}\)", err), err
    # some written, some rejected: the usual summary, exit 0
    write_input(inp, records + ["{broken json\n"])
    assert main(collect_args(tiny_model, str(inp), out)) == 0
    assert "were rejected" not in capsys.readouterr().err


def test_strict_fails_before_any_model_work(tiny_model, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", valid_conversations(3) + [conv("x", ("user", "q"), ("ghost", "a"))])
    out = tmp_path / "ds"
    assert main(collect_args(tiny_model, inp, str(out), "--strict")) == 2
    err = capsys.readouterr().err
    assert f"{inp}:4" in err and "unknown_role" in err and "--strict" in err
    assert not out.exists()  # nothing created, no model loaded
    inp = write_input(tmp_path / "ok.jsonl", valid_conversations(3))
    assert main(collect_args(tiny_model, inp, str(out), "--strict", "--limit", "2")) == 0
    assert len(stored_ids(str(out))) == 2


def test_strict_says_it_validates_and_shows_progress(tiny_model, tmp_path, capsys, monkeypatch):
    """--strict reads and tokenizes everything before the model loads (minutes on a large input):
    a line says so, and progress lines follow like the collection's own."""
    monkeypatch.setenv("DRAFTDATA_PROGRESS_INTERVAL", "0")  # stderr is not a terminal: plain progress lines
    inp = write_input(tmp_path / "in.jsonl", valid_conversations(3))
    assert main(collect_args(tiny_model, inp, str(tmp_path / "ds"), "--strict")) == 0
    err = capsys.readouterr().err.splitlines()
    start = err.index("draftdata collect: --strict: validating 3 records before loading the model")
    validate = [line for line in err if line.startswith("validate: ")]
    assert validate and validate[-1].startswith("validate: 3/3 records (100%), ") and " tok/s" in validate[-1]
    assert err.index(validate[-1]) > start
    assert err.index(validate[-1]) < next(i for i, line in enumerate(err) if line.startswith("collect: "))


def test_empty_input_warns_and_creates_no_dataset(tiny_model, tmp_path, capsys):
    inp = write_input(tmp_path / "empty.jsonl", ["\n", "  \n"])
    out = tmp_path / "ds"
    assert main(collect_args(tiny_model, inp, str(out))) == 0
    err = capsys.readouterr().err
    assert f"warning: no records were read from --input {inp}" in err and "nothing to collect" in err
    assert not out.exists()
    # a resume with nothing new leaves the dataset as it is
    full = write_input(tmp_path / "in.jsonl", valid_conversations(2))
    assert main(collect_args(tiny_model, full, str(out))) == 0
    parts = [p.id for p in open_dataset(str(out)).parts]
    assert main(collect_args(tiny_model, full, str(out), "--limit", "0")) == 0
    assert "(--limit 0); nothing to collect" in capsys.readouterr().err
    assert [p.id for p in open_dataset(str(out)).parts] == parts


def test_rejects_path_is_checked_first_and_never_costs_the_summary(tiny_model, tmp_path, capsys):
    from draftdata.collect.conversations import read_conversations
    from draftdata.collect.runner import CollectStats, RejectLog, write_reports

    inp = write_input(tmp_path / "in.jsonl", ["{broken\n"] + valid_conversations(2))
    out = tmp_path / "ds"
    folder = tmp_path / "indir"
    folder.mkdir()
    (tmp_path / "a-file").write_text("x")
    (folder / "more.jsonl").write_text(json.dumps(valid_conversations(1)[0]) + "\n")
    for rejects, says in ((folder, "is a directory; give a file path"),
                          (tmp_path / "a-file" / "rejects.jsonl", "is a file, not a directory"),
                          (inp, "is an input file"),          # overwritten at the end: the input was lost
                          (folder / "rejects.jsonl", "would be read back as input")):
        if "input" in says and rejects != inp:
            assert main(collect_args(tiny_model, str(folder), str(out), "--rejects", str(rejects))) == 2
            assert says in capsys.readouterr().err and not out.exists()
            continue
        assert main(collect_args(tiny_model, inp, str(out), "--rejects", str(rejects))) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"draftdata collect: error: --rejects {rejects}") and says in err
        assert len(err.splitlines()) == 1 and not out.exists()  # refused before any model work
    for other in ([str(folder / "*.jsonl"), str(folder / "r.jsonl")], [inp, f"file://{inp}"],
                  [inp, str(Path(inp).parent / "." / Path(inp).name)]):     # a pattern, other spellings
        assert main(collect_args(tiny_model, other[0], str(out), "--rejects", other[1])) == 2
        assert "--rejects" in capsys.readouterr().err and not out.exists()
    assert main(["synthesize", "--model", str(tiny_model), "--input", inp, "--output", str(tmp_path / "s.jsonl"),
                 "--rejects", str(folder)]) == 2
    assert "--rejects" in capsys.readouterr().err and not (tmp_path / "s.jsonl").exists()
    assert main(collect_args(tiny_model, inp, str(out), "--rejects", str(tmp_path / "new" / "r.jsonl"))) == 0
    assert len((tmp_path / "new" / "r.jsonl").read_text().splitlines()) == 1
    capsys.readouterr()

    # a rejects file that cannot be written (the place changed during the run) is a warning, and
    # summary.json is still written, saying what happened
    stats = CollectStats(read=1)
    log = RejectLog(stats)
    (reject,) = read_conversations(inp, limit=1)
    log(reject)
    where = write_reports(str(out), None, stats, log, {"k": 1}, str(folder))
    assert where is None
    assert "warning: could not write the 1 rejected records to" in capsys.readouterr().err
    (summary,) = [p for p in glob.glob(f"{out}/_reports/*/summary.json")
                  if "rejects_error" in json.loads(Path(p).read_text())]
    assert json.loads(Path(summary).read_text())["stats"]["skipped"] == {"malformed_json": 1}


def test_unreadable_weights_are_named_in_one_line(tiny_model, tmp_path, capsys):
    """A truncated model.safetensors (an interrupted download) is one line naming the file, for
    collect, synthesize and prompts alike; nothing is created."""
    bad = tmp_path / "badw"
    shutil.copytree(tiny_model, bad)
    weights = bad / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    inp = write_input(tmp_path / "in.jsonl", valid_conversations(2))
    runs = [collect_args(bad, inp, str(tmp_path / "ds")),
            ["synthesize", "--model", str(bad), "--input", inp, "--output", str(tmp_path / "s.jsonl"),
             "--max-new-tokens", "4"],
            ["prompts", "--model", str(bad), "--output", str(tmp_path / "p.jsonl"), "--count", "2"]]
    for argv in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"draftdata {argv[0]}: error: --model {bad}: {weights} is not a readable safetensors "
                              "file") and "truncated or corrupt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ds").exists()


def test_chat_template_syntax_error_stops_at_startup(tiny_model, tmp_path, capsys):
    """A template that does not compile used to reject every record as template_error and leave an
    empty dataset; now every command that takes --chat-template stops with the file and line."""
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    as_json = tmp_path / "bad.json"
    as_json.write_text(json.dumps({"chat_template": bad.read_text()}))
    inp = write_input(tmp_path / "in.jsonl", valid_conversations(2))
    out = tmp_path / "ds"
    runs = [collect_args(tiny_model, inp, str(out)),
            ["synthesize", "--model", str(tiny_model), "--input", inp, "--output", str(tmp_path / "s.jsonl")],
            ["prompts", "--model", str(tiny_model), "--output", str(tmp_path / "p.jsonl"), "--count", "2"]]
    for argv in runs:
        assert main([*argv, "--chat-template", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err == f"draftdata {argv[0]}: error: --chat-template {bad}:2: Jinja syntax error: unexpected '}}'; " \
                      "fix the template\n"
    assert main([*runs[0], "--chat-template", str(as_json)]) == 2
    assert f"--chat-template {as_json}: its chat_template string, line 2: Jinja syntax error" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "s.jsonl").exists() and not (tmp_path / "p.jsonl").exists()


def test_summary_labels_the_collecting_and_the_overall_rate():
    from draftdata.collect.runner import CollectStats

    stats = CollectStats(written=2, tokens=40_000, parts=1, seconds=40.0, collect_seconds=1.0)
    assert "(40,000 tokens/s collecting, 1,000 overall incl. model load)" in stats.format("out")
    stats.collect_seconds = 0.0  # not measured (the Ray driver): only the overall rate, labelled as such
    assert "(1,000 tokens/s overall, incl. model load)" in stats.format("out")


def test_demo_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "conv.jsonl"
    out.write_text("{}\n")
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"draftdata demo: error: --out {out}: is a file") and len(err.splitlines()) == 1
    assert out.read_text() == "{}\n"


def test_schema_mismatch_is_refused_with_what_differs(tiny_model, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", valid_conversations(2))
    out = str(tmp_path / "ds")
    assert main(collect_args(tiny_model, inp, out, "--aux-layers", "0,1", "--codec", "zstd")) == 0
    capsys.readouterr()
    assert main(collect_args(tiny_model, inp, out, "--aux-layers", "1,2")) == 2
    err = capsys.readouterr().err
    assert "aux_layer_ids: dataset has [0, 1], this run has [1, 2] (set by --aux-layers)" in err
    assert "codec" not in err  # unset --codec adopts the dataset's
    assert main(collect_args(tiny_model, inp, out, "--aux-layers", "0,1", "--codec", "fp8",
                             "--loss-mask", "all")) == 2
    err = capsys.readouterr().err
    assert "codec: dataset has 'zstd', this run has 'fp8' (set by --codec)" in err
    assert "loss_mask: dataset has 'assistant', this run has 'all'" in err
    assert main(collect_args(tiny_model, inp, out, "--aux-layers", "0,1")) == 0  # same settings: resumes
    assert "already_committed 2" in capsys.readouterr().out
    # dataset.json's max_seq_len bounds every stored sample: a resume may lower it, never raise it
    assert main(collect_args(tiny_model, inp, out, "--aux-layers", "0,1", "--max-seq-len", "99999")) == 2
    assert "was collected with --max-seq-len 128; this run's 99999" in capsys.readouterr().err
    assert main(collect_args(tiny_model, inp, out, "--aux-layers", "0,1", "--max-seq-len", "64")) == 0


def test_resume_tells_other_weights_apart_and_reads_old_fingerprints(tiny_model, tmp_path, capsys):
    """Appending with a same-shape model with other weights (a fine-tune) is refused; a dataset
    whose dataset.json carries an earlier build's fingerprint (`sha256:`, names and sizes only)
    still resumes with its own model, and keeps that fingerprint."""
    from test_models import same_shape_other_weights

    from draftdata.models import model_hash

    inp = write_input(tmp_path / "in.jsonl", valid_conversations(3))
    first = write_input(tmp_path / "first.jsonl", valid_conversations(3)[:2])
    out = str(tmp_path / "ds")
    assert main(collect_args(tiny_model, first, out)) == 0
    tuned = same_shape_other_weights(tiny_model, tmp_path / "tuned")
    capsys.readouterr()
    assert main(collect_args(tuned, inp, out)) == 2
    assert "base_model_hash: dataset has 'sampled-sha256:" in capsys.readouterr().err

    meta_file = Path(out) / "dataset.json"
    old = model_hash(tiny_model, like="sha256:")
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "base_model_hash": old}))
    assert main(collect_args(tiny_model, inp, out)) == 0
    assert "already_committed 2" in capsys.readouterr().out
    assert open_dataset(out).num_samples == 3
    assert json.loads(meta_file.read_text())["base_model_hash"] == old


def test_parts_record_how_they_were_computed_and_a_resume_in_another_dtype_warns(tiny_model, tmp_path, capsys):
    """--dtype auto resolves per machine (bf16 on GPUs and native-bf16 CPUs, else fp32): each commit
    record says what was used, a resume that would mix dtypes warns, inspect counts the parts."""
    from draftdata.store.cli_inspect import summarize

    inp = write_input(tmp_path / "in.jsonl", valid_conversations(4))
    out = str(tmp_path / "ds")
    assert main(collect_args(tiny_model, inp, out, "--limit", "2")) == 0       # --dtype fp32
    (part,) = open_dataset(out).parts
    assert part.producer == {"backend": "hf", "compute_dtype": "fp32", "device": "cpu"}
    capsys.readouterr()
    assert main(collect_args(tiny_model, inp, out, "--limit", "3")) == 0       # same dtype: quiet
    assert "warning" not in capsys.readouterr().err
    bf16 = collect_args(tiny_model, inp, out)
    bf16[bf16.index("fp32")] = "bf16"
    assert main(bf16) == 0
    err = capsys.readouterr().err
    assert f"warning: {out} holds states computed in fp32 (2 parts); this run computes in bf16" in err
    assert "pass --dtype fp32 to match" in err
    assert summarize(out)["computed_as"] == {"fp32 on cpu (hf)": 2, "bf16 on cpu (hf)": 1}
    assert main(["inspect", out]) == 0
    assert "computed as    bf16 on cpu (hf): 1 part, fp32 on cpu (hf): 2 parts" in capsys.readouterr().out
    from draftdata.collect.job import warn_mixed_compute  # what the --ray driver says at the end

    warn_mixed_compute(out, open_dataset(out).parts, after_ray_run=True)
    assert f"warning: {out} now mixes states computed in bf16 (1 part), fp32 (2 parts)" in capsys.readouterr().err


def test_states_with_inf_or_nan_are_rejected_not_stored(tiny_model, tmp_path, capsys):
    """A base that overflows (fp16) yields inf/NaN states from the overflowing token on; one such
    value poisons a training step, so the conversation is rejected (reason non_finite) and the rest
    are written; the same input in fp32 stores it."""
    model = overflowing_model(tiny_model, tmp_path / "model", "Waves")
    records = valid_conversations(6)
    records[2] = conv("hot", ("user", "the sea"), ("assistant", "Waves roll in"))
    inp = write_input(tmp_path / "in.jsonl", records)
    out = str(tmp_path / "ds")
    fp16 = collect_args(model, inp, out, "--rejects", str(tmp_path / "rejects.jsonl"))
    fp16[fp16.index("fp32")] = "fp16"
    assert main(fp16) == 0
    captured = capsys.readouterr()
    assert "non_finite 1" in captured.out + captured.err
    assert sorted(stored_ids(out)) == sorted(r["conversation_id"] for r in records if r["conversation_id"] != "hot")
    (reject,) = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert reject["reason"] == "non_finite" and reject["conversation_id"] == "hot"
    assert "inf/NaN hidden states" in reject["detail"] and "--dtype" in reject["detail"]
    ds = open_dataset(out)
    for p in range(len(ds.parts)):                       # what was stored is finite
        for sample in ds.iter_part(p):
            assert torch.isfinite(sample["aux_hidden_states"].float()).all()
    assert main(collect_args(model, inp, out)) == 0      # fp32 (a rerun resumes): it is collected now
    assert "hot" in stored_ids(out)


def test_output_that_holds_something_else_is_refused(tiny_model, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", valid_conversations(2))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "tokenizer.json").write_text("{}")
    assert main(collect_args(tiny_model, inp, str(model_dir))) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"--output {model_dir}: the directory already holds config.json, tokenizer.json and no dataset.json" in err
    assert "choose a new or empty directory" in err
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "tokenizer.json"]  # nothing written

    assert main(collect_args(tiny_model, inp, inp)) == 2  # a file
    err = capsys.readouterr().err
    assert f"--output {inp} is a file; collect writes a dataset directory" in err and "storage error" not in err, err

    remote = f"memory://collect-out-{os.getpid()}"  # an object-store prefix: one listing
    import fsspec

    fsspec.filesystem("memory").pipe(f"{remote}/ds/weights.bin", b"x")
    assert main(collect_args(tiny_model, inp, f"{remote}/ds")) == 2
    assert "already holds weights.bin and no dataset.json" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(collect_args(tiny_model, inp, str(empty))) == 0  # an empty directory is fine
    assert len(stored_ids(str(empty))) == 2
    assert main(collect_args(tiny_model, inp, str(empty))) == 0  # and so is resuming the dataset in it
    assert "already_committed 2" in capsys.readouterr().out


def test_collect_to_s3_with_input_on_s3(tiny_model, s3_bucket, capsys):
    import fsspec

    bucket, opts = s3_bucket
    with fsspec.open(f"{bucket}/input/convs.jsonl", "w", **opts) as f:
        f.write("".join(json.dumps(r) + "\n" for r in valid_conversations(6)) + "not json\n")
    endpoint = opts["client_kwargs"]["endpoint_url"]
    flags = ["-S", "key=testing", "-S", "secret=testing", "-S", f"client_kwargs.endpoint_url={endpoint}",
             "-S", "client_kwargs.region_name=us-east-1"]
    url = f"{bucket}/ds"
    assert main(collect_args(tiny_model, f"{bucket}/input/", url, *flags)) == 0
    summary = capsys.readouterr().out
    assert sorted(stored_ids(url, storage_options=opts)) == [f"c{i:04d}" for i in range(6)]
    assert f"rejects    {url}/_reports/" in summary
    fs = fsspec.filesystem("s3", **opts)
    (rejects,) = fs.glob(f"{bucket[5:]}/ds/_reports/*/rejects.jsonl")
    assert json.loads(fs.cat(rejects))["source"] == f"{bucket}/input/convs.jsonl:7"
    assert main(["verify", url, *flags]) == 0


# ---------------------------------------------------------------- SIGKILL at several points


def commits(out: Path) -> int:
    d = out / "commits"
    return len([p for p in d.iterdir() if p.suffix == ".json"]) if d.exists() else 0


def test_two_collects_on_one_s3_output_the_second_is_refused(tiny_model, s3_bucket, tmp_path, capsys, monkeypatch):
    """Object stores have no file lock: two collects on one S3 output stored every conversation
    twice (each failing with DUPLICATES at the end). A lease object taken with a conditional PUT
    now refuses the second run, and `verify --gc`; a holder killed on this machine is taken over
    at once, one of another machine once its lease is stale."""
    import fsspec

    from draftdata.locks import LEASE_STALE_ENV

    bucket, opts = s3_bucket
    endpoint = opts["client_kwargs"]["endpoint_url"]
    flags = ["-S", "key=testing", "-S", "secret=testing", "-S", f"client_kwargs.endpoint_url={endpoint}",
             "-S", "client_kwargs.region_name=us-east-1"]
    good = valid_conversations(300, seed=5)
    inp = write_input(tmp_path / "in.jsonl", good)
    url = f"{bucket}/ds"
    fs = fsspec.filesystem("s3", **opts)
    lease = f"{bucket[5:]}/ds/.collect.lock"
    cmd = [sys.executable, "-m", "draftdata.cli", *collect_args(tiny_model, inp, url, "--part-size", "0.02",
                                                                "--batch-tokens", "256", *flags)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not fs.exists(f"{bucket[5:]}/ds/commits"):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no commit within 120 s"
            time.sleep(0.05)
            fs.invalidate_cache()
        capsys.readouterr()
        assert main(collect_args(tiny_model, inp, url, *flags)) == 2
        err = capsys.readouterr().err
        assert f"--output {url}: another draftdata collect (pid {proc.pid} on " in err and "is writing to it" in err, err
        assert main(["verify", url, "--gc", "--grace", "0", *flags]) == 2
        assert f"another draftdata collect (pid {proc.pid} on " in capsys.readouterr().err
        # a holder on this machine is judged by its process, not its lease's age (one stopped with
        # Ctrl-Z rewrites nothing, and writes again when resumed)
        monkeypatch.setenv(LEASE_STALE_ENV, "0")
        assert main(collect_args(tiny_model, inp, url, *flags)) == 2
        assert f"another draftdata collect (pid {proc.pid} on " in capsys.readouterr().err
        monkeypatch.delenv(LEASE_STALE_ENV)
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(fs.cat(lease))["pid"] == proc.pid  # a SIGKILL leaves it ...
    assert main(collect_args(tiny_model, inp, url, *flags)) == 0  # ... and this machine sees its holder is gone
    captured = capsys.readouterr()
    assert f"taking over {url}/.collect.lock: its holder (pid {proc.pid} on " in captured.err
    assert "is no longer running" in captured.err and "DUPLICATES" not in captured.err
    assert sorted(stored_ids(url, storage_options=opts)) == sorted(c["conversation_id"] for c in good)
    assert not fs.exists(lease)  # released at the end

    # a run on another machine: refused while its lease is fresh, taken over once it is stale
    fs.pipe(lease, json.dumps({"pid": 4242, "host": "elsewhere", "command": "collect", "doing": "writing to it",
                               "token": "t"}).encode())
    fs.pipe(f"{bucket[5:]}/new/.collect.lock", fs.cat(lease))
    with pytest.raises(DraftdataError, match=r"no dataset here yet .*collect \(pid 4242 on elsewhere\) holds it"):
        open_dataset(f"{bucket}/new", storage_options=opts)
    assert main(collect_args(tiny_model, inp, url, *flags)) == 2
    assert "another draftdata collect (pid 4242 on elsewhere) is writing to it; rewritten " in capsys.readouterr().err
    monkeypatch.setenv(LEASE_STALE_ENV, "0")
    assert main(collect_args(tiny_model, inp, url, *flags)) == 0
    assert "its holder (pid 4242 on elsewhere) last rewrote it " in capsys.readouterr().err
    assert not fs.exists(lease)
    # a takeover replaces exactly the lease it read (S3's If-Match): of two runs taking over one
    # dead lease at once, the second finds it changed and looks again
    from draftdata.locks import ObjectLease
    from draftdata.store.fs import replace_if_match

    fs.pipe(lease, b'{"pid": 4242, "host": "elsewhere", "token": "t"}')
    dead = fs.info(lease)["ETag"]
    first = ObjectLease(url, ".collect.lock", "collect", "writing to it", opts)
    first.take()
    assert json.loads(fs.cat(lease))["token"] == first.token
    assert replace_if_match(fs, lease, b"{}", dead) is False and json.loads(fs.cat(lease))["token"] == first.token
    with pytest.raises(DraftdataError, match="another draftdata collect"):
        ObjectLease(url, ".collect.lock", "collect", "writing to it", opts).take()
    first.release()
    assert not fs.exists(lease)


def uncommitted_part(out: Path) -> bool:
    parts = {p.name for p in (out / "parts").iterdir()} if (out / "parts").exists() else set()
    done = {p.stem for p in (out / "commits").iterdir()} if (out / "commits").exists() else set()
    return bool(parts - done)


def test_sigkill_at_several_points_then_rerun_gives_exactly_one_copy(tiny_model, tmp_path, capsys):
    good = valid_conversations(90, seed=3)
    bad = ["{oops\n", conv("r", ("user", "q"), ("robot", "a"))]
    inp = write_input(tmp_path / "in.jsonl", good[:40] + bad + good[40:])
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "draftdata.cli", *collect_args(tiny_model, inp, str(out), "--part-size", "0.02",
                                                                "--batch-tokens", "256")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def kill_when(condition, what, meanwhile=None):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not condition():
            assert proc.poll() is None, f"run finished before {what}: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.002)
        if meanwhile is not None:
            meanwhile(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return commits(out)

    # 1: after the first commit; 2: while a part's arrays are being written (before its commit
    # record); 3: further on, mid-stream
    n1 = kill_when(lambda: commits(out) >= 1, "first commit")
    n2 = kill_when(lambda: commits(out) > n1 and uncommitted_part(out), "a part being written")

    def second_writer_is_refused(proc):  # it would skip the same committed ids and store the rest twice
        capsys.readouterr()
        assert main(cmd[3:]) == 2
        assert f"another draftdata collect (pid {proc.pid}) is writing to it" in capsys.readouterr().err
        # gc would take the running writer's part in progress for a leftover (with --grace 0 it did,
        # and collect then committed a part whose arrays were gone)
        assert main(["verify", str(out), "--gc", "--grace", "0"]) == 2
        assert f"{out}: another draftdata collect (pid {proc.pid}) is writing to it" in capsys.readouterr().err

    kill_when(lambda: commits(out) >= n2 + 5, "five more commits", meanwhile=second_writer_is_refused)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already_committed" in done.stdout
    ids = stored_ids(str(out))
    assert len(ids) == len(set(ids)), "a conversation was stored twice"
    assert sorted(ids) == sorted(c["conversation_id"] for c in good)
    assert main(["verify", str(out)]) == 0
    assert main(["verify", str(out), "--gc", "--grace", "0"]) == 0
    assert not uncommitted_part(out)


def test_count_nonfinite_counts_tokens_not_overflowing_sums():
    from draftdata.collect.backends.base import count_nonfinite

    aux = torch.randn(10, 12).to(torch.bfloat16)
    final = torch.randn(10, 4).to(torch.bfloat16)
    aux[7] = 3e38                          # finite values whose float32 row sum overflows: not counted
    aux[2, 1], final[5, 0], final[8, 3] = float("nan"), float("inf"), float("-inf")
    assert count_nonfinite(aux, final, [4, 6]) == [1, 2]
    assert count_nonfinite(aux[:2], final[:2], [1, 1]) == [0, 0]


def test_output_lock_names_the_command_that_holds_it(tmp_path):
    """A collect started while `verify --gc` holds the dataset's lock names gc, not "collect"."""
    from draftdata.collect.job import output_lock

    out = tmp_path / "ds"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from draftdata.locks import COLLECT_LOCK, DirectoryLock; "
         "DirectoryLock(sys.argv[1], COLLECT_LOCK, 'verify --gc', 'removing leftovers from it', '', flag=''); "
         "print('held', flush=True); time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # a reader of an output whose collect has not written dataset.json yet (its model still loading)
        with pytest.raises(DraftdataError, match=rf"no dataset here yet \(dataset.json not found\): a draftdata "
                           rf"verify --gc \(pid {holder.pid}\) holds it"):
            open_dataset(str(out))
        with pytest.raises(DraftdataError, match=rf"--output {re.escape(str(out))}: another draftdata verify --gc "
                           rf"\(pid {holder.pid}\) is removing leftovers from it; wait for it to finish, or use "
                           "another --output"):
            output_lock(str(out))
    finally:
        holder.kill()
        holder.wait()
    output_lock(str(out)).release()  # the kernel dropped the killed holder's lock


def test_output_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    """The lock is a POSIX lock (lockf: not inherited by forked DataLoader workers), which the
    kernel grants twice to one process and drops when any descriptor of the file closes: a second
    holder in the process is refused before it opens the file, and the first stays locked."""
    from draftdata.collect.job import output_lock

    out = tmp_path / "ds"
    out.mkdir()
    probe = [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(out / ".collect.lock")]
    first = output_lock(str(out))
    for spelling in (str(out), f"file://{out}", f"local://{out}", f"{out}/"):   # local:// took no lock at all
        with pytest.raises(DraftdataError, match=r"another draftdata collect in this process \(pid \d+\)"):
            output_lock(spelling)
    assert subprocess.run(probe, capture_output=True).returncode != 0      # still held against others
    first.release()
    assert subprocess.run(probe, capture_output=True).returncode == 0
    output_lock(str(out)).release()


def test_ids_committed_twice_fail_the_run_that_committed_them_only(tiny_model, tmp_path, capsys):
    """Object stores have no lock: two writers there can commit one conversation twice. Every run
    ends by checking the commit records: duplicates among its own new parts fail it (exit 1);
    duplicates that were there before it started are a note, so later resumes still succeed.
    A second copy of a part stands in for the other writer."""
    from draftdata.collect.job import CommitLedger, report_duplicates
    from draftdata.store import create_dataset

    inp = write_input(tmp_path / "in.jsonl", valid_conversations(3))
    out = tmp_path / "ds"
    assert main(collect_args(tiny_model, inp, str(out))) == 0

    def copy_the_part():
        (record,) = [r for r in (out / "commits").glob("*.json")][:1]
        copy_id = record.stem[:-1] + ("0" if record.stem[-1] != "0" else "1")
        shutil.copytree(out / "parts" / record.stem, out / "parts" / copy_id)
        (out / "commits" / f"{copy_id}.json").write_text(record.read_text().replace(record.stem, copy_id))

    ledger = CommitLedger(create_dataset(str(out), open_dataset(str(out)).schema))
    before = set(ledger.parts)
    copy_the_part()                                    # "the other writer", while this run was going on
    ledger.refresh()
    capsys.readouterr()
    assert report_duplicates(ledger, str(out), before) is True
    assert "DUPLICATES 3 conversation ids were committed more than once in this run" in capsys.readouterr().err
    assert main(collect_args(tiny_model, inp, str(out))) == 0       # a later resume: a note, not a failure
    err = capsys.readouterr().err
    assert "DUPLICATES" not in err and "3 conversation ids were already committed more than once" in err
    assert f"draftdata verify {out}" in err


# ---------------------------------------------------------------- the demo (real SmolLM2)


@pytest.mark.integration
def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    """The README's first command, shrunk: synthesize -> collect -> inspect -> vocab -> train -> export -> eval."""
    from draftdata.demo import bundled_prompts

    prompts = tmp_path / "prompts.jsonl"
    lines = bundled_prompts().read_text().splitlines()[:6]
    first = json.loads(lines[0])  # a user's prompt file may hold U+2028 raw inside a JSON string
    first["conversations"][0]["content"] += "\u2028(see above)"
    lines[0] = json.dumps(first, ensure_ascii=False)
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["demo", "--out", str(tmp_path / "demo"), "--prompts", str(prompts), "--holdout", "2",
            "--max-new-tokens", "24", "--train-steps", "3", "--eval-tokens", "8", "--draft-vocab-size", "512"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "samples        4" in out and "aux layers     [1, 14, 26]" in out
    assert "acceptance length (tokens per base forward, K=5, greedy):" in out
    ds = open_dataset(str(tmp_path / "demo" / "dataset"))
    assert ds.num_samples == 4 and ds.schema.hidden_size == 576
    s = ds.sample(0)
    assert s["aux_hidden_states"].shape[1] == 3 * 576 and torch.isfinite(s["hidden_states"].float()).all()
    assert 0 < int(s["loss_mask"].sum()) < len(s["loss_mask"])
    assert (tmp_path / "demo" / "draft" / "config.json").exists()
    assert (tmp_path / "demo" / "draft" / "model.safetensors").exists()


def test_progress_lines_off_a_terminal_with_eta_and_one_final_line():
    import io

    from draftdata.progress import JobProgress

    out = io.StringIO()  # not a terminal
    p = JobProgress(total=10, desc="collect", unit="conv", interval=0, file=out,
                    extra=lambda: "units 1/2")
    p.update(2, 1000)
    p.update(2, 500)
    p.close()  # the last line already shows these counts: not printed twice
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("collect: 2/10 convs (20%), 1,000 tok, ") and ", units 1/2, elapsed " in lines[0]
    assert lines[1].startswith("collect: 4/10 convs (40%), 1,500 tok, ") and ", ETA " in lines[1]

    quiet = io.StringIO()
    p = JobProgress(total=None, desc="synthesize", unit="conv", interval=3600, file=quiet)
    p.update(3, 70)
    p.close()  # nothing within the interval: the close line carries the totals
    (line,) = quiet.getvalue().splitlines()
    assert line.startswith("synthesize: 3 convs, 70 tok, ") and "ETA" not in line


def test_progress_prints_on_its_own_clock_when_no_update_arrives():
    """A Ray work unit can take many minutes: lines were printed only on updates, so `ray job logs`
    showed nothing for 5 minutes although every line is promised each interval."""
    import io

    from draftdata.progress import JobProgress

    out = io.StringIO()
    p = JobProgress(total=10, desc="collect", unit="conv", interval=0.2, file=out)
    deadline = time.monotonic() + 30
    while len(out.getvalue().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("collect: 0/10 convs (0%), 0 tok, ") for line in lines), lines
    time.sleep(0.5)
    assert out.getvalue().splitlines() == lines  # closed: its clock stopped


def test_relative_output_in_a_ray_job_working_dir_is_refused(tiny_model, tmp_path):
    """Under `ray job submit --working-dir .` the driver runs in Ray's temporary copy of the upload: a
    relative --output was written there (exit 0) and deleted with the Ray session."""
    upload = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    upload.mkdir(parents=True)
    inp = write_input(tmp_path / "in.jsonl", valid_conversations(2))
    for cmd in (collect_args(tiny_model, inp, "rel_out"), ["synthesize", "--model", str(tiny_model), "--input", inp,
                "--output", "answers.jsonl"], ["train", "--data", str(tmp_path), "--model", str(tiny_model), "--output", "runs/x", "--steps", "1"]):
        done = subprocess.run([sys.executable, "-m", "draftdata.cli", *cmd], cwd=upload, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and "a relative path inside a Ray job's working directory" in done.stderr, \
            done.stderr
    assert list(upload.iterdir()) == []


def test_collect_to_a_local_scheme_url_writes_zarr_and_locks(tiny_model, tmp_path):
    """fsspec's local:// spelling of a path: zarr parts failed to write (it was taken for a remote
    store) and the output lock was skipped (two writers stored every conversation twice)."""
    inp = write_input(tmp_path / "in.jsonl", valid_conversations(3))
    url = f"local://{tmp_path}/ds"
    assert main(collect_args(tiny_model, inp, url)) == 0
    assert sorted(stored_ids(url)) == sorted(stored_ids(str(tmp_path / "ds"))) == ["c0000", "c0001", "c0002"]
    assert (tmp_path / "ds" / ".collect.lock").is_file()


def test_an_input_pattern_over_the_output_skips_rejects_files_and_folders(tiny_model, tmp_path, capsys):
    """`--input 'data/**/*.jsonl'` with the output inside data/ read the run's own rejects file back
    as input: the documented rerun after too_long rejects (--on-long truncate) then collected
    nothing (each reject line took its conversation's id, the real record became a duplicate). A
    sub-folder the pattern or directory lists was a traceback."""
    data = tmp_path / "data"
    (data / "z").mkdir(parents=True)
    (data / "sub.jsonl").mkdir()            # a folder named like an input file
    long_text = " ".join(["word"] * 300)
    write_input(data / "z" / "long.jsonl",
                [conv(f"l{i}", ("user", "q"), ("assistant", long_text)) for i in range(3)] + valid_conversations(4))
    pattern, out = str(data / "**" / "*.jsonl"), str(data / "ds")
    assert main(collect_args(tiny_model, pattern, out)) == 0
    assert "too_long 3" in capsys.readouterr().out
    assert list((data / "ds" / "_reports").glob("collect-*/rejects.jsonl"))
    from draftdata.collect.conversations import count_records
    assert count_records(str(data / "ds" / "_reports" / "*" / "rejects.jsonl")) == 3   # asked for: listed
    assert main(collect_args(tiny_model, pattern, out, "--on-long", "truncate")) == 0
    summary = capsys.readouterr().out
    assert "written    3 conversations" in summary and "duplicate_id" not in summary, summary
    assert sorted(stored_ids(out)) == sorted(["l0", "l1", "l2", *(f"c{i:04d}" for i in range(4))])
    write_input(data / "top.jsonl", valid_conversations(2, seed=1))
    assert main(collect_args(tiny_model, str(data / "*"), str(tmp_path / "ds2"))) == 0   # lists sub.jsonl/, z/
    assert main(collect_args(tiny_model, str(data), str(tmp_path / "ds3"))) == 0        # lists sub.jsonl/
    assert len(stored_ids(str(tmp_path / "ds2"))) == len(stored_ids(str(tmp_path / "ds3"))) == 2


def test_a_stopped_run_counts_truncated_among_the_written_only(tiny_model, tmp_path):
    """The reader tokenizes thousands of samples ahead of the model: a run stopped early reported
    every sample it had tokenized as `truncated` (2,534 of 96 written, in the report)."""
    long_text = " ".join(["word"] * 40)
    inp = write_input(tmp_path / "in.jsonl", [conv(f"t{i:05d}", ("user", "q"), ("assistant", long_text))
                                              for i in range(3000)])
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "draftdata.cli", *collect_args(tiny_model, inp, str(out), "--part-size", "0.02",
                                                                "--batch-tokens", "256", "--on-long", "truncate"),
           "--max-seq-len", "16"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while commits(out) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    summary = json.loads(next((out / "_reports").glob("collect-*/summary.json")).read_text())["stats"]
    written = len(stored_ids(str(out)))
    assert 0 < written < summary["read"] and summary["written"] == written
    assert summary["truncated"] == written, summary    # every sample is cut, and only the written count
    assert proc.returncode == 130 and "read ahead of the stop" in err, err[-2000:]


def test_a_dataset_created_meanwhile_by_another_writer_is_adopted(tiny_model, tmp_path, monkeypatch):
    """Two collects starting on one new object-store output (no lock there): the second found no
    dataset.json, then listed one the first had just written, and stopped with "no dataset here"."""
    from draftdata.store import dataset as store_dataset

    out, inp = str(tmp_path / "ds"), write_input(tmp_path / "in.jsonl", valid_conversations(6))
    read_schema, raced = store_dataset._Location.read_schema, []

    def other_writer_between(self):  # the other collect commits right after this run's first read
        schema = read_schema(self)
        if schema is None and not raced:
            raced.append(True)
            assert main(collect_args(tiny_model, inp, out, "--limit", "2")) == 0
        return schema

    monkeypatch.setattr(store_dataset._Location, "read_schema", other_writer_between)
    assert main(collect_args(tiny_model, inp, out)) == 0 and raced
    assert sorted(stored_ids(out)) == [f"c{i:04d}" for i in range(6)]


def test_a_stop_while_the_command_loads_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the first second of any command (while torch and pyarrow load, before the
    command runs) printed a 40-line traceback and died of the signal; SIGTERM there killed it
    silently."""
    from draftdata import cli, errors

    def ctrl_c_while_loading():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", ctrl_c_while_loading)
    assert cli.main(["collect"]) == 130
    assert capsys.readouterr().err == "draftdata: interrupted\n"

    def sigterm_while_loading():
        errors.raise_terminated(signal.SIGTERM, None)

    monkeypatch.setattr(cli, "build_parser", sigterm_while_loading)
    assert cli.main(["collect"]) == 143
    assert capsys.readouterr().err == "draftdata: terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # the handler is the process's again
