"""Where `synthesize`'s time goes on a GPU (bench/gpu/results.md: 2.7k tok/s at batch 512 on an H200).

One short call on the device machine answers the open question, for each attention implementation
in --attn (`ours` = the draftdata_sdpa_gqa attention synthesize registers, `sdpa` = transformers'
own), on the same prompts:

1. a timed run of the product path (`synthesize_conversations`, continuous batching) without the
   profiler: generated tok/s, and the seconds spent in prefills (`RunningBatch.add`) against
   decode steps (`RunningBatch.step`), with the number of each;
2. `torch.profiler` over --profile-steps decode steps of a fresh full batch: the top ops by
   self device time (CUDA) or self CPU time (CPU dry run), and the host time per step.

Prints both and writes a JSON summary (--out). Runs on the CPU too, as a dry run:

    python bench/gpu/profile_synth.py --device cpu --prompts 8 --batch-size 4 --max-new-tokens 8 \\
        --profile-steps 3 --out /tmp/profile_synth.json
    python bench/gpu/profile_synth.py --device cuda --prompts 1024 --batch-size 512 --out $OUT/profile_synth.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "synth"))
from bench_synth import continuous, load_prompts  # noqa: E402  (the synthesize benchmark's helpers)

from draftdata.collect.decode_batch import RunningBatch  # noqa: E402
from draftdata.collect.synthesize import HFGenerator  # noqa: E402
from draftdata.models import resolve_model  # noqa: E402


def set_attention(generator: HFGenerator, name: str) -> str:
    """Switch the loaded model's attention: 'ours' (what synthesize registers) or a transformers name."""
    from draftdata.collect.synthesize import _register_gqa_attention

    impl = _register_gqa_attention() if name == "ours" else name
    if hasattr(generator.model, "set_attn_implementation"):
        generator.model.set_attn_implementation(impl)
    else:
        generator.model.config._attn_implementation = impl
    return impl


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(generator: HFGenerator, prompts: list, batch_size: int) -> dict[str, Any]:
    """The product path, with the seconds of every prefill and decode step added up."""
    spent = {"add_s": 0.0, "adds": 0, "step_s": 0.0, "steps": 0}
    make = generator.new_batch
    device = generator.input_device

    def new_batch() -> RunningBatch:
        batch = make()
        add, step = batch.add, batch.step

        def timed_add(rows: list) -> None:
            t0 = time.perf_counter()
            add(rows)
            sync(device)
            spent["add_s"] += time.perf_counter() - t0
            spent["adds"] += 1

        def timed_step() -> list:
            t0 = time.perf_counter()
            out = step()
            sync(device)
            spent["step_s"] += time.perf_counter() - t0
            spent["steps"] += 1
            return out

        batch.add, batch.step = timed_add, timed_step
        return batch

    generator.new_batch = new_batch
    try:
        seconds, tokens, _ = continuous(generator, prompts, batch_size)
    finally:
        generator.new_batch = make
    return {"seconds": round(seconds, 3), "tokens": tokens, "tok_s": round(tokens / seconds, 1),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in spent.items()},
            "ms_per_step": round(1000 * spent["step_s"] / max(1, spent["steps"]), 2)}


def profiled_steps(generator: HFGenerator, prompts: list, batch_size: int, steps: int, top: int) -> dict[str, Any]:
    """torch.profiler over `steps` decode steps of one full batch (after its prefill)."""
    from torch.profiler import ProfilerActivity, profile

    device = generator.input_device
    batch = generator.new_batch()
    rows = []
    for i, p in enumerate(prompts[:batch_size]):
        ids = generator.encode(p)
        rows.append((i, ids, 0, generator.budget(ids)))
    batch.add(rows)
    batch.step()  # first step outside the profile (allocations)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        done = 0
        while done < steps and len(batch):
            batch.step()
            done += 1
        sync(device)
        host = time.perf_counter() - t0
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)[:top]
    top_ops = [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
                "self_device_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 3)} for e in events]
    table = prof.key_averages().table(sort_by=attr, row_limit=top)
    batch.drain()
    return {"steps": done, "rows": len(rows), "ms_per_step": round(1000 * host / max(1, done), 2),
            "top_ops": top_ops, "table": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/train.jsonl"))
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--attn", default="ours,sdpa", help="comma list: ours, sdpa, eager, ...")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--top", type=int, default=15, help="ops listed per profile")
    ap.add_argument("--out", default=None, help="write the JSON summary here")
    args = ap.parse_args()

    generator = HFGenerator(resolve_model(args.model), max_new_tokens=args.max_new_tokens, device=args.device,
                            dtype=args.dtype)
    prompts = load_prompts(Path(args.data), args.prompts, "sources")
    summary: dict[str, Any] = {"device": str(generator.input_device), "dtype": str(generator.model.dtype),
                               "prompts": len(prompts), "batch_size": args.batch_size,
                               "max_new_tokens": args.max_new_tokens, "runs": {}}
    if generator.input_device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(generator.input_device)
    for name in args.attn.split(","):
        impl = set_attention(generator, name)
        continuous(generator, prompts[:4], 4)  # warm-up: kernels, allocator
        run = timed_run(generator, prompts, args.batch_size)
        prof = profiled_steps(generator, prompts, args.batch_size, args.profile_steps, args.top)
        print(f"== attention {name} ({impl}): {run['tok_s']} tok/s; prefills {run['add_s']} s in {run['adds']}, "
              f"decode {run['step_s']} s in {run['steps']} steps ({run['ms_per_step']} ms/step); profiled "
              f"{prof['steps']} steps of {prof['rows']} rows: {prof['ms_per_step']} ms/step", flush=True)
        print(prof.pop("table"), flush=True)
        summary["runs"][name] = {"implementation": impl, "timed": run, "profile": prof}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
