"""`draftdata vocab`: the draft vocabulary (d2t / t2d) from stored assistant tokens, and training with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_support import TINY_ARCH, make_dataset, train_data, unwritable_dir  # noqa: F401 (fixture)

from draftdata.cli import main
from draftdata.store import open_dataset
from draftdata.train.model import load_base_parts, load_draft
from draftdata.train.vocab import load_draft_vocab, save_draft_vocab, select_draft_vocab


def assistant_counts(url: str, storage_options=None) -> np.ndarray:
    ds = open_dataset(url, storage_options=storage_options)
    counts = np.zeros(ds.schema.vocab_size, dtype=np.int64)
    for i in range(ds.num_samples):
        s = ds.sample(i)
        counts += np.bincount(s["input_ids"][s["loss_mask"].bool()].numpy(), minlength=len(counts))
    return counts


def test_vocab_cli_selects_top_assistant_tokens(tmp_path, train_data, capsys):  # noqa: F811
    out = tmp_path / "vocab.safetensors"
    assert main(["vocab", train_data, "--draft-vocab-size", "60", "--out", str(out)]) == 0
    assert "coverage" in capsys.readouterr().err
    v = load_draft_vocab(out)
    counts = assistant_counts(train_data)
    assert v.draft_vocab_size == 60 and v.vocab_size == 400
    assert torch.equal(v.token_counts, torch.from_numpy(counts))
    target = v.target_ids()
    assert torch.equal(target, torch.sort(target).values) and int(v.t2d.sum()) == 60
    assert torch.equal(v.d2t, target - torch.arange(60))                 # d2t[i] = target_id(i) - i
    assert bool(v.t2d[target].all())
    # Exactly the 60 most frequent (ties by smaller id): every chosen count >= every other count.
    chosen = np.zeros(400, dtype=bool)
    chosen[target.numpy()] = True
    assert counts[chosen].min() >= counts[~chosen].max()
    assert float(v.metadata["coverage"]) == pytest.approx(counts[chosen].sum() / counts.sum(), abs=1e-6)
    assert v.metadata["counted"] == "loss_mask==1"

    # Fewer distinct tokens than N: all of them, padded with the smallest unseen ids.
    distinct = int((counts > 0).sum())
    n = distinct + 25
    assert main(["vocab", train_data, "-n", str(n), "--out", str(out)]) == 0
    v = load_draft_vocab(out)
    target = set(v.target_ids().tolist())
    seen = set(np.nonzero(counts)[0].tolist())
    unseen = [i for i in range(400) if i not in seen]
    assert seen <= target and target - seen == set(unseen[:25])

    assert main(["vocab", train_data, "-n", "401", "--out", str(out)]) == 2
    assert "between 1 and the vocabulary size 400" in capsys.readouterr().err
    unread = tmp_path / "parts-gone"                 # the size is checked before any part is read
    shutil.copytree(train_data, unread)
    shutil.rmtree(unread / "parts")
    assert main(["vocab", str(unread), "-n", "0", "--out", str(out)]) == 2
    assert "between 1 and the vocabulary size 400, got 0" in capsys.readouterr().err

    before = (Path(train_data) / "dataset.json").read_bytes()     # --out inside the dataset: refused
    assert main(["vocab", train_data, "-n", "10", "--out", str(Path(train_data) / "dataset.json")]) == 2
    assert "inside the dataset" in capsys.readouterr().err
    assert (Path(train_data) / "dataset.json").read_bytes() == before

    weights = tmp_path / "model.safetensors"                     # a file that is no vocabulary: refused, kept
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(weights))
    victim = tmp_path / "conv.jsonl"
    victim.write_text('{"messages": []}\n')
    for path in (weights, victim):
        before = path.read_bytes()
        assert main(["vocab", train_data, "-n", "10", "--out", str(path)]) == 2
        assert "exists and is not a draft vocabulary file" in capsys.readouterr().err
        assert path.read_bytes() == before
    empty = tmp_path / "empty.safetensors"                      # an empty file (mktemp): written
    empty.write_bytes(b"")
    assert main(["vocab", train_data, "-n", "10", "--out", str(empty)]) == 0 and load_draft_vocab(empty)
    assert main(["vocab", train_data, "-n", "10", "--out", f"file://{out}"]) == 0   # a vocabulary: replaced
    assert load_draft_vocab(out).draft_vocab_size == 10 and not Path("file:").exists()
    assert main(["vocab", train_data, "-n", "10", "--out", "s3://bucket/vocab.safetensors"]) == 2
    assert "is written to a local file" in capsys.readouterr().err and not Path("s3:").exists()


def test_unwritable_out_is_refused_before_counting(tmp_path, train_data, capsys, unwritable_dir):  # noqa: F811
    """An --out that cannot be written is one line, found before the dataset is read (even a missing
    dataset is reported after it), and a write that fails anyway is one line too, not a traceback."""
    from draftdata.errors import DraftdataError

    out = unwritable_dir / "sub" / "v.safetensors"
    for url in (train_data, str(tmp_path / "no_dataset")):
        assert main(["vocab", url, "-n", "60", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"draftdata vocab: error: --out {out}: cannot write there") and err.count("\n") == 1
    assert not out.parent.exists()
    with pytest.raises(DraftdataError, match=f"cannot write {unwritable_dir / 'v.safetensors'} "):
        save_draft_vocab(unwritable_dir / "v.safetensors", select_draft_vocab(torch.ones(400), 60))


def test_select_draft_vocab_ties_and_identity():
    v = select_draft_vocab(torch.tensor([5, 0, 5, 7, 0, 1]), 3)
    assert v.target_ids().tolist() == [0, 2, 3] and v.d2t.tolist() == [0, 1, 1]
    assert v.t2d.tolist() == [True, False, True, True, False, False]
    assert v.draft_ids().tolist() == [0, -1, 1, 2, -1, -1]
    full = select_draft_vocab(torch.zeros(6, dtype=torch.int64), 6)
    assert full.d2t.tolist() == [0] * 6 and bool(full.t2d.all())


def test_negative_target_ids_are_rejected(tmp_path):
    """d2t mapping a draft id below 0 would wrap around in t2d[target]; the file must be rebuilt."""
    from safetensors.torch import save_file

    from draftdata.errors import DraftdataError

    target = torch.tensor([-1, 5, 7, 9])
    t2d = torch.zeros(300, dtype=torch.bool)
    t2d[[299, 5, 7, 9]] = True
    path = tmp_path / "bad.safetensors"
    save_file({"d2t": target - torch.arange(4), "t2d": t2d}, str(path))
    with pytest.raises(DraftdataError, match=r"bad\.safetensors: d2t maps draft id 0 to base id -1 .*rebuild"):
        load_draft_vocab(path)


def test_a_model_file_given_as_draft_vocab_lists_a_few_names(tmp_path):
    """A model's weights passed to --draft-vocab: the error listed every tensor name on one line
    (thousands for a real model)."""
    from safetensors.torch import save_file

    from draftdata.errors import DraftdataError

    path = tmp_path / "model.safetensors"
    save_file({f"layers.{i}.weight": torch.zeros(1) for i in range(40)}, str(path))
    with pytest.raises(DraftdataError) as e:
        load_draft_vocab(path)
    msg = str(e.value)
    assert "needs d2t and t2d, has layers.0.weight, layers.1.weight, " in msg and "... (40 tensors)" in msg
    assert msg.count("layers.") == 5 and "draftdata vocab" in msg


def test_vocab_from_s3(tmp_path, tiny_model, s3_bucket, capsys):
    bucket, opts = s3_bucket
    url = f"{bucket}/ds"
    make_dataset(url, tiny_model, n=8, per_part=4, storage_options=opts, fmt="arrow")
    out = tmp_path / "v.safetensors"
    endpoint = opts["client_kwargs"]["endpoint_url"]
    assert main(["vocab", url, "-n", "40", "--out", str(out), "-S", "key=testing", "-S", "secret=testing",
                 "-S", f"client_kwargs.endpoint_url={endpoint}", "-S", "client_kwargs.region_name=us-east-1"]) == 0
    v = load_draft_vocab(out)
    assert torch.equal(v.token_counts, torch.from_numpy(assistant_counts(url, opts)))


def test_training_uses_the_draft_vocab(tmp_path, tiny_model, train_data):  # noqa: F811
    vocab = tmp_path / "vocab.safetensors"
    assert main(["vocab", train_data, "-n", "64", "--out", str(vocab)]) == 0
    eagle = tmp_path / "eagle.json"
    eagle.write_text(json.dumps({"eagle_architecture_config": TINY_ARCH}))
    out = tmp_path / "run"
    assert main(["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out), "--steps", "3",
                 "--batch-tokens", "512", "--eagle-config", str(eagle), "--draft-vocab", str(vocab),
                 "--no-plot"]) == 0
    draft = load_draft(out / "final")
    v = load_draft_vocab(vocab)
    assert draft.config.draft_vocab_size == 64 and draft.lm_head.weight.shape == (64, 64)
    assert torch.equal(draft.d2t, v.d2t) and torch.equal(draft.t2d, v.t2d)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)
    base_rows = load_base_parts(tiny_model, rows=v.target_ids())["lm_head"]
    assert not torch.allclose(draft.lm_head.weight, base_rows)        # trained, from the base rows

    # freeze_lm_head: the compressed lm_head stays the base's rows (fp32 here: bf16
    # training keeps frozen base tensors in bf16).
    eagle.write_text(json.dumps({"eagle_architecture_config": {**TINY_ARCH, "freeze_lm_head": True}}))
    assert main(["train", "--data", train_data, "--model", str(tiny_model), "--output", str(tmp_path / "frozen"),
                 "--steps", "3", "--batch-tokens", "512", "--eagle-config", str(eagle), "--draft-vocab",
                 str(vocab), "--no-plot", "--dtype", "fp32"]) == 0
    frozen = load_draft(tmp_path / "frozen" / "final")
    assert not frozen.config.train_lm_head
    assert torch.equal(frozen.lm_head.weight, base_rows.to(frozen.lm_head.weight.dtype))
    eagle.write_text(json.dumps({"eagle_architecture_config": {**TINY_ARCH, "freeze_lm_head": True,
                                                               "has_lm_head": True}}))
    assert main(["train", "--data", train_data, "--model", str(tiny_model), "--output", str(tmp_path / "r3"),
                 "--steps", "1", "--batch-tokens", "512", "--eagle-config", str(eagle)]) == 2

    # A draft_vocab_size in the EagleConfig must agree with the file.
    eagle.write_text(json.dumps({"eagle_architecture_config": {**TINY_ARCH, "draft_vocab_size": 100}}))
    assert main(["train", "--data", train_data, "--model", str(tiny_model), "--output", str(tmp_path / "r2"),
                 "--steps", "1", "--batch-tokens", "512", "--eagle-config", str(eagle), "--draft-vocab",
                 str(vocab)]) == 2


def test_a_vocab_counted_under_another_tokenizer_is_warned_about(tmp_path, tiny_model, capsys):
    """Same vocabulary size, other tokenizer: the ids name other tokens (accuracy fell by half in a
    run that accepted it without a word); the file records the dataset's tokenizer_hash and train
    warns when it differs (a warning: the hash also covers the chat template)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"conversation_id": f"c{i}", "conversations": [
        {"role": "user", "content": "what is 12 plus 30"}, {"role": "assistant", "content": "the answer is 42 " * (i + 1)}]})
        + "\n" for i in range(6)))
    data = str(tmp_path / "ds")
    assert main(["collect", "--model", str(tiny_model), "--input", str(inp), "--output", data, "--dtype", "fp32",
                 "--aux-layers", "0,1,2"]) == 0
    vocab = tmp_path / "vocab.safetensors"
    assert main(["vocab", data, "-n", "32", "--out", str(vocab)]) == 0
    v = load_draft_vocab(vocab)
    assert v.metadata["tokenizer_hash"] == open_dataset(data).schema.tokenizer_hash
    v.metadata["tokenizer_hash"] = "sha256:" + "0" * 64
    other = save_draft_vocab(tmp_path / "other-tokenizer.safetensors", v)
    eagle = tmp_path / "eagle.json"
    eagle.write_text(json.dumps({"eagle_architecture_config": TINY_ARCH}))
    train = ["train", "--data", data, "--model", str(tiny_model), "--steps", "1", "--batch-tokens", "512",
             "--eagle-config", str(eagle), "--no-plot"]
    capsys.readouterr()
    assert main(train + ["--output", str(tmp_path / "other"), "--draft-vocab", str(other)]) == 0
    assert "collected with another tokenizer or chat template" in capsys.readouterr().err
    assert main(train + ["--output", str(tmp_path / "good"), "--draft-vocab", str(vocab)]) == 0
    assert "another tokenizer" not in capsys.readouterr().err
