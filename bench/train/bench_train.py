"""Training throughput and peak memory of the draft trainer vs ModelOpt's eagle_offline=True model.

Same run, same machine, same data, same draft configuration:

  ours            `draftdata.train.trainer.train` (token-budget batches from our loader, AdamW,
                  3 TTT steps, fp32 on CPU / bf16 autocast on GPU: the dtypes the modelopt
                  variants run in; bf16 on the CPU is measured by bench/train/bench_dtype.py)
  modelopt        ModelOpt 0.47 `HFEagleModel` (eagle_offline=True, torch.compile off) on exactly
                  the batches our loader yields, with the same AdamW step: the model math alone
  modelopt-bs1    ModelOpt's offline data layout: one sample per step, padded to
                  --modelopt-seq-len (its collator pads every sample to training_seq_len)

Data: SmolLM2-135M-Instruct hidden states (hidden 576, 30 layers, vocab 49152) collected with
`draftdata collect` from ../shared/data/train.jsonl (or --data URL). Each variant runs in its own
process so its peak RSS (ru_maxrss) is its own. Tokens/s counts real (unpadded) tokens per
second of optimizer steps after --warmup steps, data loading included.

    python bench/train/bench_train.py --collect 256 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = REPO.parent / "shared" / "data" / "train.jsonl"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def draft_arch(schema, base_cfg) -> dict:
    """The EAGLE3 default draft (ModelOpt's heads/kv/head_dim), sized from the base like ours."""
    return {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": base_cfg.intermediate_size, "rope_theta": base_cfg.rope_theta,
            "eagle_aux_hidden_state_layer_ids": list(schema.aux_layer_ids)}


# ------------------------------------------------------------------------------------------ variants

def run_ours(args) -> dict:
    from draftdata.train.trainer import TrainConfig, train

    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    t0 = time.perf_counter()
    shape = {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}  # ModelOpt's, as recorded
    train(TrainConfig(data=args.data, model=args.model, output=str(out), steps=args.steps, lr=1e-4,
                      eagle_config={"eagle_architecture_config": shape},
                      batch_tokens=args.batch_tokens, seed=0, save_every=10**9, log_every=10**9,
                      progress=False, plot=False, device=args.device,
                      dtype="fp32" if args.device == "cpu" else "auto"))
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup:]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"variant": "ours", "steps": len(rows), "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "peak_rss_mib": peak_rss_mib(), "first_loss": rows[0]["loss"], "wall_s": wall,
            "tokens_per_step": sum(r["tokens"] for r in timed) / len(timed)}


def run_modelopt(args, bs1: bool) -> dict:
    import warnings

    import modelopt.torch.speculative as mtsp
    import torch
    from modelopt.torch.speculative.utils import load_vlm_or_llm

    from draftdata.loaders import HiddenStateDataset
    from draftdata.models import resolve_model
    from draftdata.train.model import read_base_config

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    base_dir = resolve_model(args.model)
    if bs1:
        ds = HiddenStateDataset(args.data, seed=0, batch_size=1, max_seq_len=args.modelopt_seq_len,
                                pad_to_multiple_of=args.modelopt_seq_len)
    else:
        ds = HiddenStateDataset(args.data, seed=0, max_tokens_per_batch=args.batch_tokens,
                                max_seq_len=args.batch_tokens)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_vlm_or_llm(str(base_dir), use_offline_training=True, dtype=torch.float32)
    mtsp.convert(model, [("eagle", {"eagle_offline": True, "eagle_use_torch_compile": False,
                                    "eagle_architecture_config": draft_arch(ds.schema, read_base_config(base_dir))})])
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    tokens, seconds, first_loss, step, epoch = 0, 0.0, None, 0, 0
    t_start = time.perf_counter()
    while step < args.steps:
        ds.set_epoch(epoch)
        it = iter(ds)
        while step < args.steps:
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                break
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
            # ModelOpt caches its TTT masks by step index only, so a batch of another length would
            # reuse a mask of the wrong size; its trainer avoids that by padding every batch to
            # training_seq_len. Drop the cache to run it on our variable-length batches.
            model._cached_attn_blk_masks.clear()
            with autocast:
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], loss_mask=b["loss_mask"],
                            base_model_outputs={"base_model_hidden_states": b["hidden_states"].float(),
                                                "aux_hidden_states": b["aux_hidden_states"].float()})
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            first_loss = out.loss.item() if first_loss is None else first_loss
            if step >= args.warmup:
                tokens += int(b["lengths"].sum())
                seconds += dt
            step += 1
        epoch += 1
    return {"variant": "modelopt-bs1" if bs1 else "modelopt", "steps": step, "tokens_per_s": tokens / seconds,
            "peak_rss_mib": peak_rss_mib(), "first_loss": first_loss, "wall_s": time.perf_counter() - t_start,
            "tokens_per_step": tokens / max(1, step - args.warmup)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------------------------ driver

def collect(n: int, out: str) -> None:
    cmd = [sys.executable, "-m", "draftdata.cli", "collect", "--model", "smollm2", "--input", str(SHARED),
           "--output", out, "--limit", str(n), "--max-seq-len", "1024", "--on-long", "truncate"]
    print("collecting:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset URL (default: collect --collect conversations first)")
    p.add_argument("--collect", type=int, default=256, help="conversations to collect when --data is not given")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--modelopt-seq-len", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="ours,modelopt,modelopt-bs1")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the variant list this many times, alternating (a shared machine's load drifts)")
    p.add_argument("--json", default=str(HERE / "results.json"))
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.run:                                          # child process: one variant
        result = run_ours(args) if args.run == "ours" else run_modelopt(args, bs1=args.run == "modelopt-bs1")
        print("RESULT " + json.dumps(result), flush=True)
        return

    if not args.data:
        args.data = str(Path(tempfile.gettempdir()) / f"draftdata_bench_smollm2_{args.collect}")
        if not (Path(args.data) / "dataset.json").exists():
            collect(args.collect, args.data)
    from draftdata.store import open_dataset

    ds = open_dataset(args.data)
    results = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for variant in args.variants.split(",") * args.repeat:
        cmd = [sys.executable, __file__, "--run", variant, "--data", args.data, "--model", args.model,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-tokens", str(args.batch_tokens),
               "--modelopt-seq-len", str(args.modelopt_seq_len), "--device", args.device]
        print("running", variant, file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{variant} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(line[-1][7:]))
        print(json.dumps(results[-1]), file=sys.stderr)
    import torch

    summary = {"dataset": args.data, "samples": ds.num_samples, "tokens": ds.num_tokens,
               "schema": {"hidden_size": ds.schema.hidden_size, "num_hidden_layers": ds.schema.num_hidden_layers,
                          "vocab_size": ds.schema.vocab_size, "aux_layer_ids": ds.schema.aux_layer_ids},
               "device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "steps": args.steps, "warmup": args.warmup, "batch_tokens": args.batch_tokens,
               "results": results}
    import statistics

    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    median = {v: statistics.median(r["tokens_per_s"] for r in rs) for v, rs in by_variant.items()}
    summary["median_tokens_per_s"] = median
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| variant | real tokens/s (each run) | median | ours / this | peak RSS MiB | step-1 loss (own init) |")
    print("|---|---|---|---|---|---|")
    for v, rs in by_variant.items():
        runs = ", ".join(f"{r['tokens_per_s']:.1f}" for r in rs)
        ratio = f"{median['ours'] / median[v]:.2f}" if "ours" in median else "-"
        rss = max(r["peak_rss_mib"] for r in rs)
        print(f"| {v} | {runs} | {median[v]:.1f} | {ratio} | {rss:.0f} | {rs[0]['first_loss']:.3f} |")


if __name__ == "__main__":
    main()
