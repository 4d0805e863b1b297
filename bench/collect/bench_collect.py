"""Collect throughput vs the bare forward passes and vs a ModelOpt-style dump, same conversations.

    python bench/collect/bench_collect.py [--n 300] [--dtype auto|bf16|fp32] [--device cpu|cuda]

Three measurements on the first N conversations of ../shared/data/train.jsonl with SmolLM2-135M
(the embedded default), each model load excluded:

  bare      the HF base model's forward passes (no capture, no copies, no writes) over exactly
            the token-budget batches `collect` forms from these conversations
  collect   the real pipeline: read JSONL, tokenize + loss mask, batch, forward with capture,
            write a Zarr dataset through the background writer (collect_records)
  modelopt  what ModelOpt's collect_hidden_states does: batch 1, AutoModelForCausalLM with
            output_hidden_states=True, one torch.save .pt per conversation (no padding to
            training_seq_len, which would only make it slower)

"bare" and "collect" run in one process: bare and capturing forward passes alternate batch by
batch (paired, so load from other processes hits both alike), then one full collect run gives the
pipeline's time outside the forward passes. "modelopt" runs in its own process. Peak RSS is measured per process (ru_maxrss), GPU peak with
torch.cuda.max_memory_allocated. Prints one JSON object; results.md records them.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "train.jsonl"


def first_conversations(n: int, out: Path) -> Path:
    """The first n lines of train.jsonl as the benchmark input."""
    with open(DATA) as f, open(out, "w") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokenized(model_path: Path, input_path: Path, max_seq_len: int):
    from transformers import AutoTokenizer

    from draftdata.collect.conversations import (
        ChatTokenizer,
        TokenizedSample,
        read_conversations,
        tokenize_stream,
    )

    chat = ChatTokenizer(AutoTokenizer.from_pretrained(model_path), max_seq_len=max_seq_len)
    return chat, [s for s in tokenize_stream(read_conversations(str(input_path)), chat) if isinstance(s, TokenizedSample)]


def run_pipeline(args: argparse.Namespace, model_path: Path, input_path: Path) -> dict:
    """Paired bare vs capturing forward passes over the same batches, then one full collect run."""
    import torch

    from draftdata.collect.backends.base import BaseModelInfo
    from draftdata.collect.backends.hf import HFBackend
    from draftdata.collect.conversations import read_conversations
    from draftdata.collect.job import CollectSettings, make_schema
    from draftdata.collect.runner import (
        CollectOptions,
        CollectStats,
        _windows,
        collect_records,
        prepare_samples,
        token_batches,
    )
    from draftdata.models import default_aux_layers
    from draftdata.store import create_dataset

    info = BaseModelInfo.from_model_dir(model_path)
    aux = default_aux_layers(info.num_hidden_layers)
    options = CollectOptions(aux_layer_ids=aux, batch_tokens=args.batch_tokens)
    chat, samples = tokenized(model_path, input_path, args.max_seq_len)
    batches = [b for w in _windows(samples, options.window_tokens) for b in token_batches(w, options.batch_tokens)]
    tokens = sum(s.length for s in samples)
    padded = sum(len(b) * b[0].length for b in batches)
    rss_before_model = peak_rss_mib()
    backend = HFBackend(model_path, dtype=args.dtype, device=args.device)
    model, dev = backend.model, backend.input_device
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def collect() -> tuple[float, CollectStats]:
        url = str(Path(args.workdir) / "collect")
        settings = CollectSettings(model="smollm2", model_path=str(model_path), input=str(input_path), output=url,
                                   aux_layer_ids=aux, max_seq_len=args.max_seq_len)
        writer = create_dataset(url, make_schema(settings, info))
        stats = CollectStats()
        t0 = time.perf_counter()
        rejects = []
        samples = prepare_samples(read_conversations(str(input_path)), chat, skip_ids=set(), stats=stats,
                                  on_reject=rejects.append)
        collect_records(samples, backend, writer, options, stats=stats)
        sync()
        seconds = time.perf_counter() - t0
        shutil.rmtree(url)
        return seconds, stats

    def bare_batch(b) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            t = b[0].length
            ids = torch.zeros(len(b), t, dtype=torch.long)
            mask = torch.zeros(len(b), t, dtype=torch.long)
            for i, s in enumerate(b):
                ids[i, : s.length] = torch.from_numpy(s.input_ids)
                mask[i, : s.length] = 1
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        sync()
        return time.perf_counter() - t0

    def capture_batch(b) -> float:
        t0 = time.perf_counter()
        backend.forward([s.input_ids.tolist() for s in b], aux)  # returns CPU tensors: synchronized
        return time.perf_counter() - t0

    def pair(b, bare_first: bool) -> tuple[float, float]:
        if bare_first:
            t_bare = bare_batch(b)
            return t_bare, capture_batch(b)
        t_capture = capture_batch(b)
        return bare_batch(b), t_capture

    bare_batch(batches[0])  # warm-up (first-call allocations); the biggest batch, so peak RSS counts it
    rss_bare = peak_rss_mib()
    gpu_bare = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    # Paired, per batch, alternating which goes first, best of --pairs: load from other processes
    # hits both alike, and a load spike in one try is dropped.
    bare_s = capture_s = 0.0
    for i, b in enumerate(batches):
        tries = [pair(b, bare_first=(i + j) % 2 == 0) for j in range(args.pairs)]
        bare_s += min(t[0] for t in tries)
        capture_s += min(t[1] for t in tries)
    collect_s, stats = collect()
    pipeline_overhead_s = collect_s - stats.forward_seconds
    return {
        "conversations": len(samples), "tokens": tokens, "padded_tokens": padded, "batches": len(batches),
        "bare_seconds": bare_s, "capture_forward_seconds": capture_s,
        "collect_seconds": collect_s, "collect_forward_seconds": stats.forward_seconds,
        "pipeline_overhead_seconds": pipeline_overhead_s,
        "bare_tokens_per_s": tokens / bare_s, "collect_tokens_per_s": tokens / collect_s,
        # end to end: separate passes minutes apart, so other load on the machine shows up here
        "collect_over_bare_direct": bare_s / collect_s,
        # paired: bare vs capture forward per batch, plus the collect run's time outside forward
        "collect_over_bare_paired": bare_s / (capture_s + pipeline_overhead_s),
        "written": stats.written, "stored_bytes": stats.stored_bytes, "raw_bytes": stats.raw_bytes,
        "peak_rss_mib_before_model": rss_before_model, "peak_rss_mib_bare": rss_bare,
        "peak_rss_mib_collect": peak_rss_mib(),
        "gpu_peak_mib_bare": gpu_bare,
        "gpu_peak_mib_collect": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def run_modelopt(args: argparse.Namespace, model_path: Path, input_path: Path) -> dict:
    """ModelOpt-style dump: batch 1, output_hidden_states=True, one torch.save file per conversation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftdata.collect.backends.hf import DTYPES
    from draftdata.collect.conversations import (
        ChatTokenizer,
        Conversation,
        TokenizedSample,
        read_conversations,
    )
    from draftdata.models import auto_dtype, default_aux_layers

    chat = ChatTokenizer(AutoTokenizer.from_pretrained(model_path), max_seq_len=args.max_seq_len)
    conversations = [c for c in read_conversations(str(input_path)) if isinstance(c, Conversation)]
    dev = torch.device(args.device)
    dtype = DTYPES[auto_dtype(dev) if args.dtype == "auto" else args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(dev).eval()
    aux = default_aux_layers(model.config.num_hidden_layers)
    out = Path(args.workdir) / "modelopt"
    out.mkdir()
    tokens = n = 0
    t0 = time.perf_counter()
    for c in conversations:  # tokenized as it goes, one at a time, with the same template and mask
        (s,) = chat.tokenize([c])
        if not isinstance(s, TokenizedSample):
            continue
        ids = torch.from_numpy(s.input_ids).long().unsqueeze(0).to(dev)
        with torch.inference_mode():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.save({
            "input_ids": ids[0].cpu(),
            "hidden_states": hs[-1][0].cpu(),
            "aux_hidden_states": torch.cat([hs[k + 1][0] for k in aux], dim=-1).cpu(),
            "loss_mask": torch.from_numpy(s.loss_mask),
            "conversation_id": s.conversation_id,
        }, out / f"{s.conversation_id}.pt")
        tokens, n = tokens + s.length, n + 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    nbytes = sum(p.stat().st_size for p in out.iterdir())
    return {"modelopt_conversations": n, "modelopt_tokens": tokens, "modelopt_seconds": seconds,
            "modelopt_tokens_per_s": tokens / seconds, "modelopt_bytes": nbytes,
            "peak_rss_mib_modelopt": peak_rss_mib(),
            "gpu_peak_mib_modelopt": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="conversations from train.jsonl (default 300)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--pairs", type=int, default=1, help="bare/capture tries per batch, best kept (default 1)")
    p.add_argument("--mode", choices=["all", "pipeline", "modelopt"], default="all")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    from draftdata.models import resolve_model

    model_path = resolve_model("smollm2")
    if args.mode == "all":
        with tempfile.TemporaryDirectory(prefix="bench-collect-") as work:
            base = [sys.executable, __file__, "--n", str(args.n), "--dtype", args.dtype, "--device", args.device,
                    "--batch-tokens", str(args.batch_tokens), "--max-seq-len", str(args.max_seq_len),
                    "--pairs", str(args.pairs), "--workdir", work]
            results = {}
            for mode in ("pipeline", "modelopt"):
                done = subprocess.run(base + ["--mode", mode], capture_output=True, text=True, check=True)
                results.update(json.loads(done.stdout.strip().splitlines()[-1]))
        results["collect_over_modelopt"] = results["collect_tokens_per_s"] / results["modelopt_tokens_per_s"]
        results.update({"dtype": args.dtype, "device": args.device, "n": args.n, "batch_tokens": args.batch_tokens,
                        "pairs": args.pairs})
        print(json.dumps(results, indent=2))
        return
    input_path = first_conversations(args.n, Path(args.workdir) / "input.jsonl")
    run = run_pipeline if args.mode == "pipeline" else run_modelopt
    print(json.dumps(run(args, model_path, input_path)))


if __name__ == "__main__":
    main()
