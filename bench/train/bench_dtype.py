"""`draftdata train` on the CPU: fp32 vs bf16 autocast, and the bound on oneDNN's primitive cache.

Same run, same data, same seed, same steps; each variant is its own `draftdata train` process
(its peak RSS is its own), variants alternated over --repeat rounds:

  fp32            --dtype fp32
  bf16            --dtype bf16 (oneDNN primitive cache bounded to 64 entries, the default now)
  bf16-cache1024  --dtype bf16 with ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 (oneDNN's own default)

tokens/s: real tokens of the steps after --warmup divided by their time (data loading included),
from metrics.jsonl. Peak RSS: the trainer's own `peak_mem_gb` (its ru_maxrss on the CPU). Pass
the dataset (and draft vocabulary) of a quality run, e.g.

    python bench/train/bench_dtype.py --data bench/_work/run8/ds_synth_cpu \
        --draft-vocab bench/_work/run8/vocab_8192_cpu.safetensors --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "fp32": ("fp32", {}),
    "bf16": ("bf16", {}),
    "bf16-cache1024": ("bf16", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}),
}


def run(variant: str, args: argparse.Namespace) -> dict:
    dtype, extra_env = VARIANTS[variant]
    out = Path(tempfile.mkdtemp(prefix=f"bench_dtype_{variant}_"))
    cmd = ["draftdata", "train", "--data", args.data, "--model", args.model, "--output", str(out),
           "--steps", str(args.steps), "--lr", "2e-3", "--warmup-steps", "10", "--batch-tokens", str(args.batch_tokens),
           "--max-seq-len", "1024", "--save-every", str(10 ** 9), "--seed", "0", "--no-plot", "--dtype", dtype]
    if args.draft_vocab:
        cmd += ["--draft-vocab", args.draft_vocab]
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    env.update({"OMP_NUM_THREADS": str(args.threads), **extra_env})
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    timed = rows[args.warmup:]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"variant": variant, "steps": len(rows), "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "peak_rss_gib": max(r["peak_mem_gb"] for r in rows), "wall_s": wall,
            "loss_first10": sum(r["loss"] for r in rows[:10]) / 10, "loss_last10": sum(r["loss"] for r in rows[-10:]) / 10}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--draft-vocab")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="fp32,bf16,bf16-cache1024")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    results = []
    for variant in args.variants.split(",") * args.repeat:
        print("running", variant, file=sys.stderr, flush=True)
        results.append(run(variant, args))
        print(json.dumps(results[-1]), flush=True)
    base = next((r["tokens_per_s"] for r in results if r["variant"] == "fp32"), None)
    print("\n| variant | tokens/s | ÷ fp32 | peak RSS GiB | mean loss, first / last 10 steps |")
    print("|---|---:|---:|---:|---|")
    for r in results:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {ratio} | {r['peak_rss_gib']:.2f} | "
              f"{r['loss_first10']:.2f} / {r['loss_last10']:.2f} |")


if __name__ == "__main__":
    main()
