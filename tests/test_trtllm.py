"""TensorRT-LLM backend without TensorRT-LLM: its dump records -> our samples, layer mapping, install hint.

The dump files here are written with torch.save in TensorRT-LLM's own layout (a list of record
dicts per `<prefix>_<n>.pt` file, see docs/TRTLLM.md); nothing about the conversion is mocked.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from draftdata.collect.backends.trtllm import (
    DUMP_PREFIX,
    INSTALL_HINT,
    DumpCollector,
    RequestMatcher,
    TrtllmDumpError,
    dump_files,
    load_dump_file,
    record_tensors,
    trtllm_compute_dtype,
    trtllm_layers_to_capture,
)
from draftdata.errors import DraftdataError

H = 16
AUX = [1, 3, 5]
HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def make_sample(seed: int, length: int, vocab: int = 400) -> dict:
    """Reference tensors for one sequence: what a backend should return for it."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, vocab, (length,), generator=g),
        "aux": torch.randn(length, len(AUX) * H, generator=g).to(torch.bfloat16),
        "final": torch.randn(length, H, generator=g).to(torch.bfloat16),
    }


def trtllm_record(counter: int, s: dict, *, aux_key: str = "aux_hidden_states", with_final_slot: bool = False,
                  extra_token: int | None = None) -> dict:
    """A record as TensorRT-LLM's SaveHiddenStates writes it (int64 ids, tensors in model dtype)."""
    ids, aux, final = s["input_ids"].long(), s["aux"], s["final"]
    if with_final_slot:  # layer -1 captured explicitly: the final state is repeated as the last aux slot
        aux = torch.cat([aux, final], dim=1)
    if extra_token is not None:  # a version whose record also holds the generated token
        ids = torch.cat([ids, torch.tensor([extra_token])])
        aux = torch.cat([aux, torch.randn(1, aux.shape[1]).to(aux.dtype)])
        final = torch.cat([final, torch.randn(1, H).to(final.dtype)])
    return {"id": counter, "input_ids": ids, "hidden_state": final.clone(), aux_key: aux.clone()}


def write_dump(dump_dir: Path, n: int, records: list[dict]) -> Path:
    path = dump_dir / f"{DUMP_PREFIX}_{n}.pt"
    torch.save(records, path)
    return path


def assert_matches(result, s: dict) -> None:
    aux, final = result
    assert aux.dtype == torch.bfloat16 and final.dtype == torch.bfloat16
    assert aux.is_contiguous() and final.is_contiguous()
    assert torch.equal(aux, s["aux"]) and torch.equal(final, s["final"])


def test_layer_mapping_is_identity_and_validated():
    from draftdata.models import default_aux_layers

    for n in (8, 30, 32, 80):
        ours = default_aux_layers(n)
        assert trtllm_layers_to_capture(ours, n, include_final=False) == set(ours)
        assert trtllm_layers_to_capture(ours, n) == set(ours) | {-1}  # -1: TensorRT-LLM's final post-norm state
    assert trtllm_layers_to_capture([1, 15, 28], 32) == {1, 15, 28, -1}
    for bad in ([], [-1], [32], [1, 1]):
        with pytest.raises(DraftdataError):
            trtllm_layers_to_capture(bad, 32)


def test_our_layer_k_is_the_output_of_decoder_layer_k(tiny_model):
    """The identity map rests on this: TensorRT-LLM captures decoder layer k's output (hidden + residual
    after the MLP) for id k, and our id k is HF hidden_states[k + 1], which is that same tensor."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    outputs: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, k=k: outputs.__setitem__(k, out[0] if isinstance(out, tuple) else out))
             for k, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        hs = model(torch.tensor([[5, 17, 42, 99, 7]]), output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    n = model.config.num_hidden_layers
    for k in range(n - 1):  # hidden_states[n] is HF's post-norm final state, not layer n-1's raw output
        assert torch.equal(outputs[k], hs[k + 1]), k


def test_dump_records_out_of_order_old_keys_into_store(tmp_path):
    """Records written out of order, in several files, with old and new key names, go into a real part."""
    from draftdata.config import DatasetSchema
    from draftdata.store import create_dataset, open_dataset

    dump = tmp_path / "dump"
    dump.mkdir()
    lengths = [5, 9, 3, 7, 5, 11]
    samples = [make_sample(i, n) for i, n in enumerate(lengths)]
    samples[4] = {k: v.clone() for k, v in samples[0].items()}  # two identical conversations
    batch = [s["input_ids"].tolist() for s in samples]

    order = [3, 5, 0, 2, 4, 1]  # the order TensorRT-LLM finished them in
    records = [trtllm_record(c + 1, samples[i], aux_key="hidden_state_features" if i % 2 else "aux_hidden_states",
                             with_final_slot=(i == 2))
               for c, i in enumerate(order)]
    write_dump(dump, 1, records[:1])
    write_dump(dump, 3, records[1:3])  # a write_interval > 1 file with two records
    write_dump(dump, 6, records[3:])

    collector = DumpCollector(dump, DUMP_PREFIX, AUX, H)
    results = collector.collect(batch, timeout_s=5)
    assert len(results) == len(samples)
    for r, s in zip(results, samples):
        assert_matches(r, s)
    assert list(dump.iterdir()) == []  # every dump file consumed and deleted

    schema = DatasetSchema(base_model_id="tiny", hidden_size=H, aux_layer_ids=AUX, num_hidden_layers=8,
                           vocab_size=400, max_seq_len=64)
    url = (tmp_path / "ds").as_uri()
    writer = create_dataset(url, schema)
    part = writer.open_part("unit-0")
    for i, ((aux, final), ids) in enumerate(zip(results, batch)):
        part.add({"conversation_id": f"c{i}", "input_ids": torch.tensor(ids), "loss_mask": torch.ones(len(ids)),
                  "aux_hidden_states": aux, "hidden_states": final})
    part.commit()
    ds = open_dataset(url)
    assert ds.num_samples == len(samples) and ds.num_tokens == sum(lengths)
    for i, s in enumerate(samples):
        got = ds.sample(i)
        assert got["conversation_id"] == f"c{i}"
        assert got["input_ids"].tolist() == batch[i]
        assert torch.equal(got["aux_hidden_states"], s["aux"]) and torch.equal(got["hidden_states"], s["final"])


def test_records_arriving_while_collecting_and_partial_files(tmp_path):
    """Files appear one by one in random order, one first as a truncated (still being written) file."""
    lengths = [4, 6, 8, 5]
    samples = [make_sample(10 + i, n) for i, n in enumerate(lengths)]
    batch = [s["input_ids"].tolist() for s in samples]
    order = list(range(len(samples)))
    random.Random(3).shuffle(order)

    def writer():
        for c, i in enumerate(order, start=1):
            time.sleep(0.05)
            path = tmp_path / f"{DUMP_PREFIX}_{c}.pt"
            if c == 1:
                tmp = tmp_path / "full.bin"
                torch.save([trtllm_record(c, samples[i])], tmp)
                path.write_bytes(tmp.read_bytes()[:100])  # TensorRT-LLM is mid-write
                time.sleep(0.15)
                os.replace(tmp, path)
            else:
                torch.save([trtllm_record(c, samples[i])], path)

    thread = threading.Thread(target=writer)
    thread.start()
    results = DumpCollector(tmp_path, DUMP_PREFIX, AUX, H).collect(batch, timeout_s=5, poll_s=0.01)
    thread.join()
    for r, s in zip(results, samples):
        assert_matches(r, s)
    assert dump_files(tmp_path, DUMP_PREFIX) == []


def test_unmatched_missing_and_bad_records(tmp_path, capsys):
    a, b, stranger = make_sample(1, 6), make_sample(2, 4), make_sample(3, 5)
    write_dump(tmp_path, 1, [trtllm_record(1, stranger)])  # e.g. a warm-up request
    write_dump(tmp_path, 2, [trtllm_record(2, a)])
    collector = DumpCollector(tmp_path, DUMP_PREFIX, AUX, H)
    with pytest.raises(TrtllmDumpError, match=r"no record for 1 of 2 sequences \(batch positions \[1\]\)"):
        collector.collect([a["input_ids"].tolist(), b["input_ids"].tolist()], timeout_s=0.2)
    assert collector.discarded == 1 and "matches no request" in capsys.readouterr().err
    assert dump_files(tmp_path, DUMP_PREFIX) == []

    bad = trtllm_record(3, b)
    bad["aux_hidden_states"] = bad["aux_hidden_states"][:, : 2 * H]
    write_dump(tmp_path, 3, [bad])
    with pytest.raises(TrtllmDumpError, match=rf"{DUMP_PREFIX}_3.pt record 0: 'aux_hidden_states' is \(4, 32\)"):
        collector.collect([b["input_ids"].tolist()], timeout_s=1)

    (tmp_path / f"{DUMP_PREFIX}_3.pt").unlink()  # a bad file stays for inspection until close()

    # An extra slot that is not the final state: the buffer order is not what we rely on.
    reordered = trtllm_record(4, b, with_final_slot=True)
    reordered["aux_hidden_states"] = reordered["aux_hidden_states"].roll(H, dims=1)
    write_dump(tmp_path, 4, [reordered])
    with pytest.raises(TrtllmDumpError, match="extra last slot"):
        collector.collect([b["input_ids"].tolist()], timeout_s=1)


def test_record_with_generated_token():
    s = make_sample(7, 6)
    matcher = RequestMatcher()
    matcher.expect(0, s["input_ids"].tolist())
    rec = trtllm_record(1, s, extra_token=123)
    hit = matcher.match(rec["input_ids"].tolist())
    assert hit == (0, 6) and matcher.pending == []
    aux, final = record_tensors(rec, num_aux=3, hidden_size=H, num_rows=hit[1])
    assert torch.equal(aux, s["aux"]) and torch.equal(final, s["final"])



class NotATensor:
    pass


def test_dump_files_are_loaded_without_unpickling_objects(tmp_path):
    path = tmp_path / f"{DUMP_PREFIX}_1.pt"
    torch.save([{"id": 1, "evil": NotATensor()}], path)
    with pytest.raises(pickle.UnpicklingError):
        load_dump_file(path)


@pytest.mark.skipif(HAS_TRTLLM, reason="tensorrt_llm is installed here")
def test_backend_without_tensorrt_llm_stops_with_install_hint(tiny_model):
    from draftdata.collect.backends.trtllm import TrtllmBackend, TrtllmNotInstalledError

    with pytest.raises(TrtllmNotInstalledError, match=r"pip install draftdata\[trtllm\]"):
        TrtllmBackend(tiny_model, tensor_parallel_size=2)


@pytest.mark.skipif(HAS_TRTLLM, reason="tensorrt_llm is installed here")
def test_cli_collect_backend_trtllm_without_package(tiny_model, tmp_path):
    data = tmp_path / "conv.jsonl"
    data.write_text('{"conversation_id": "a", "conversations": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "hello"}]}\n')
    out = tmp_path / "ds"
    proc = subprocess.run(
        [sys.executable, "-m", "draftdata.cli", "collect", "--backend", "trtllm", "--model", str(tiny_model),
         "--input", str(data), "--output", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert INSTALL_HINT in lines[0]
    assert not out.exists(), "the install check must come before anything is written"
    # With --ray the driver (often a CPU-only head node) does not need TensorRT-LLM: only the actors do.
    from draftdata.collect.cli_collect import add_arguments
    from draftdata.collect.job import settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--backend", "trtllm", "--ray", "--model", str(tiny_model), "--input", str(data),
                              "--output", str(out)])
    assert settings_from_args(args).backend == "trtllm"


def test_cli_collect_parallel_flags_are_checked_before_any_work(tiny_model, tmp_path):
    data = tmp_path / "conv.jsonl"
    data.write_text('{"conversation_id": "a", "conversations": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "ds"
    base = [sys.executable, "-m", "draftdata.cli", "collect", "--model", str(tiny_model), "--input", str(data),
            "--output", str(out)]
    for extra, message in ((["--tp", "2"], "apply to --backend trtllm only"),
                           (["--backend", "trtllm", "--tp", "0"], "--tensor-parallel-size must be a positive"),
                           (["--backend", "trtllm", "--tp", "4", "--ep", "3"], "must divide")):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert not out.exists()


def test_compute_dtype_recorded_for_resumes(tmp_path):
    """The commit records' `producer` names the dtype TensorRT-LLM computes in, so a resume that
    computes differently is reported (as for the HF backend)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert trtllm_compute_dtype(tmp_path) == "bf16"          # named as the HF backend names it
    assert trtllm_compute_dtype(tmp_path, {"dtype": "auto"}) == "bf16"
    assert trtllm_compute_dtype(tmp_path, {"dtype": "float16"}) == "fp16"
    assert trtllm_compute_dtype(tmp_path, {"dtype": torch.float16}) == "fp16"
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"dtype": "float32"}}))
    assert trtllm_compute_dtype(tmp_path) == "fp32"
    (tmp_path / "config.json").write_text("{}")
    assert trtllm_compute_dtype(tmp_path) is None
