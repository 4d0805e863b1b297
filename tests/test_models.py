"""Model specs: local dirs, the local HF cache (never downloading), GGUF conversion, fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from draftdata.collect.backends.base import BaseModelInfo
from draftdata.errors import DraftdataError
from draftdata.models import (
    default_aux_layers,
    model_hash,
    model_identity,
    parse_aux_layers,
    resolve_model,
    tokenizer_hash,
)


def test_device_auto_and_gpu_index_checks(monkeypatch):
    """--device auto follows what this process sees; cuda:N past the visible GPUs is one line."""
    import torch

    from draftdata.models import check_device, local_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device("auto") == "cpu" and local_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert local_device("auto") == "cuda"
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DraftdataError, match="only 2 CUDA device"):
        check_device("cuda:2")


def test_distributed_gpu_refusals(monkeypatch):
    """cuda:N with several ranks, and more torchrun processes per node than GPUs, are refused."""
    import torch

    from draftdata.train.trainer import Dist, _visible_cuda_index, setup_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DraftdataError, match="same GPU"):
        setup_distributed("cuda:0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(DraftdataError, match="3 processes per node but only 2"):
        _visible_cuda_index(Dist(0, 3, 0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _visible_cuda_index(Dist(1, 2, 1)) == 1
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert _visible_cuda_index(Dist(3, 4, 3)) == 1        # each process its own GPUs: modulo


def test_default_aux_layers_follow_eagle3():
    assert default_aux_layers(30) == [1, 14, 26]  # SmolLM2-135M
    assert default_aux_layers(32) == [1, 15, 28]  # Llama-3-8B
    assert default_aux_layers(80) == [1, 39, 76]  # Llama-3-70B
    assert default_aux_layers(4) == [0, 1]  # tiny test model: {1, 1, 0}


def test_default_aux_layers_are_never_negative():
    """Bases with < 4 layers: ModelOpt clamps at 0; N = 1 has no layer 1, so only [0]."""
    assert default_aux_layers(3) == [0, 1]
    assert default_aux_layers(2) == [0, 1]
    assert default_aux_layers(1) == [0]
    assert parse_aux_layers("eagle", 3) == [0, 1]
    try:
        from modelopt.torch.speculative.plugins.hf_eagle import default_eagle_aux_layer_ids
    except ImportError:
        return
    for n in range(2, 129):
        assert default_aux_layers(n) == default_eagle_aux_layer_ids(n), n


def test_parse_aux_layers():
    assert parse_aux_layers("eagle", 30) == [1, 14, 26]
    assert parse_aux_layers("12, 1,7", 30) == [1, 7, 12]
    with pytest.raises(DraftdataError, match=r"'1,1': layer 1 given more than once"):  # a typo for 1,2: one layer fewer
        parse_aux_layers("1,1", 4)
    with pytest.raises(DraftdataError, match="out of range.*0..3"):
        parse_aux_layers("1,4", 4)
    with pytest.raises(DraftdataError, match="comma-separated"):
        parse_aux_layers("first,last", 4)


def test_local_directory(tiny_model, tmp_path):
    assert resolve_model(str(tiny_model)) == Path(tiny_model).resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DraftdataError, match="no config.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(DraftdataError, match="GGUF file not found"):
        resolve_model(tmp_path / "missing.gguf")
    model_id, revision = model_identity(tiny_model)
    assert model_id == str(Path(tiny_model).resolve()) and revision is None


def fake_hub_cache(root: Path, repo: str, model_dir: Path, commit: str = "a" * 40) -> Path:
    """Lay out `model_dir` the way huggingface_hub caches a download of `repo`."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    return snapshot


def test_hub_id_from_the_local_cache_only(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "acme/tiny-llama", Path(tiny_model))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model("acme/tiny-llama") == snapshot
    assert resolve_model("acme/tiny-llama@" + "a" * 40) == snapshot
    assert model_identity(snapshot) == ("acme/tiny-llama", "a" * 40)
    info = BaseModelInfo.from_model_dir(snapshot)
    assert (info.model_id, info.num_hidden_layers, info.hidden_size) == ("acme/tiny-llama", 4, 64)
    with pytest.raises(DraftdataError, match="never downloads.*hf download acme/not-here"):
        resolve_model("acme/not-here")
    for path in ("./not-here", "/models/base", "data/models/base"):  # paths: no `hf download ./not-here`
        with pytest.raises(DraftdataError, match=rf"--model {path}: no such directory or file \("):
            resolve_model(path)


def same_shape_other_weights(model_dir: Path, dest: Path) -> Path:
    """A copy of `model_dir` with one weight byte changed mid-file (same config, names and sizes)."""
    copy = Path(shutil.copytree(model_dir, dest))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return copy


def test_model_hash_sees_other_weights_of_the_same_shape(tiny_model, tmp_path):
    """A fine-tune keeps config, file names and sizes; the fingerprint still tells it apart. A
    fingerprint recorded by earlier builds (`sha256:`, names and sizes only) is reproduced with
    `like=` so that datasets written then still compare."""
    from draftdata.models import same_model_hash

    tuned = same_shape_other_weights(tiny_model, tmp_path / "tuned")
    assert model_hash(tuned).startswith("sampled-sha256:")
    assert model_hash(tuned) != model_hash(tiny_model)
    old = model_hash(tiny_model, like="sha256:0")
    assert old.startswith("sha256:") and model_hash(tuned, like=old) == old   # the old scheme cannot tell
    assert model_hash(tiny_model, like=model_hash(tiny_model)) == model_hash(tiny_model)
    assert same_model_hash(model_hash(tuned), model_hash(tiny_model)) is False
    assert same_model_hash(model_hash(tiny_model), model_hash(tiny_model)) is True
    assert same_model_hash(old, model_hash(tiny_model)) is None and same_model_hash(None, old) is None


def test_fingerprints_change_with_what_matters(tiny_model, tmp_path):
    copy = Path(shutil.copytree(tiny_model, tmp_path / "copy"))
    assert model_hash(copy) == model_hash(tiny_model)
    assert tokenizer_hash(copy) == tokenizer_hash(tiny_model)
    assert tokenizer_hash(copy, "{{ messages }}") != tokenizer_hash(copy)
    with open(copy / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    assert model_hash(copy) != model_hash(tiny_model)
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    tok = json.loads((copy / "tokenizer_config.json").read_text())
    tok["chat_template"] = "{{ x }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(tok))
    assert tokenizer_hash(copy) != tokenizer_hash(tiny_model)


CONVERT = """
from draftdata.models import resolve_model
print(resolve_model("smollm2"))
"""


@pytest.mark.integration
def test_smollm2_is_converted_once_even_by_concurrent_processes(tmp_path, monkeypatch, capfd):
    """Two processes ask for the embedded model in a fresh cache at once: one converts, both get the
    same complete HF directory (bf16 safetensors, ChatML template, eos = <|im_end|>)."""
    from transformers import AutoConfig, AutoTokenizer

    env = {**os.environ, "DRAFTDATA_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert path.parent == tmp_path / "cache" / "models"
    assert sum("converting" in o[1] for o in outs) == 1  # the other waited on the lock and reused it
    assert sum(" in " in o[1] and "draftdata: converted SmolLM2-135M-Instruct.Q4_1.gguf in " in o[1]
               for o in outs) == 1                          # where a first run's time went
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    config = AutoConfig.from_pretrained(path)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert model_identity(path) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "gguf:SmolLM2-135M-Instruct.Q4_1.gguf")
    # a later resolve is a cache hit
    capfd.readouterr()
    monkeypatch.setenv("DRAFTDATA_CACHE", str(tmp_path / "cache"))
    assert resolve_model("smollm2") == path
    assert "converting" not in capfd.readouterr().err


def test_a_moved_copy_of_the_base_resumes_its_dataset(tiny_model, tmp_path, capsys):
    """A base identified by its directory may move (a copy on local disk, another mount): with the
    same weights (content fingerprint) collect resumes and the dataset keeps its recorded id."""
    from test_collect import collect_args, valid_conversations, write_input

    from draftdata.cli import main
    from draftdata.store import open_dataset

    inp = write_input(tmp_path / "in.jsonl", valid_conversations(3))
    first = write_input(tmp_path / "first.jsonl", valid_conversations(3)[:2])
    out = str(tmp_path / "ds")
    assert main(collect_args(tiny_model, first, out)) == 0
    recorded = open_dataset(out).schema.base_model_id
    moved = Path(shutil.copytree(tiny_model, tmp_path / "elsewhere" / "model"))
    assert main(collect_args(moved, inp, out)) == 0
    ds = open_dataset(out)
    assert ds.num_samples == 3 and ds.schema.base_model_id == recorded == str(Path(tiny_model).resolve())
