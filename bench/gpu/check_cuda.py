"""CUDA checks of what CPU-only CI cannot reach, plus the trainer's speed on SmolLM2-shaped data.

    python bench/gpu/check_cuda.py --work DIR [--smol-config DIR]

1. collect (HF backend) on the GPU in bf16 and in fp32 against fp32 on the CPU, same tiny random
   Llama, same conversations: token ids / loss masks identical, hidden states' relative error.
2. train on the GPU (bf16 autocast): loss falls, peak GPU memory is reported.
3. export, then eval on the GPU in bf16 and in fp32: output == plain greedy output.
4. With --smol-config (a directory with SmolLM2's config.json and tokenizer files): a random model
   of SmolLM2's shape, collect on the GPU (tokens/s), `vocab -n 8192`, and train steps/s at
   --batch-tokens 16384 (the calibration a timed GPU training run sizes its cosine schedule by).

Every step runs the `draftdata` CLI as a user would. Prints one JSON object (also DIR/check_cuda.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "draftdata" / "data" / "prompts.jsonl"


def cli(*args: str, log: Path) -> float:
    """Run `draftdata ARGS`, append its output to `log`, return its wall time; raise on failure."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ draftdata {' '.join(args)}\n")
        f.flush()
        done = subprocess.run([sys.executable, "-m", "draftdata.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"draftdata {args[0]} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - t0


def rel_err(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def compare(ref_url: str, url: str) -> dict:
    """Per-sample relative error of aux and final hidden states of two collects of the same input."""
    import torch

    from draftdata.store import open_dataset

    ref, ds = open_dataset(ref_url), open_dataset(url)
    by_id = {cid: (p, j) for p, info in enumerate(ds.parts) for j, cid in enumerate(info.conversation_ids)}
    aux, fin, same = [], [], True
    for i in range(ref.num_samples):
        a = ref.sample(i)
        b = ds.read_sample(*by_id[a["conversation_id"]])
        same &= torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        aux.append(rel_err(a["aux_hidden_states"], b["aux_hidden_states"]))
        fin.append(rel_err(a["hidden_states"], b["hidden_states"]))
    return {"samples": ref.num_samples, "ids_and_masks_equal": bool(same) and len(by_id) == ref.num_samples,
            "aux_rel_err_max": max(aux), "aux_rel_err_median": sorted(aux)[len(aux) // 2],
            "final_rel_err_max": max(fin), "final_rel_err_median": sorted(fin)[len(fin) // 2]}


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def tiny_checks(work: Path, log: Path, device: str) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_model

    model = str(make_tiny_model(work / "tiny", num_layers=4, hidden_size=256))
    out: dict = {}
    for name, dev, dtype in (("cpu_fp32", "cpu", "fp32"), ("cuda_bf16", device, "bf16"),
                                ("cuda_fp32", device, "fp32")):
        out[f"collect_{name}_s"] = cli("collect", "--model", model, "--input", str(PROMPTS), "--output",
                                       str(work / f"ds_{name}"), "--device", dev, "--dtype", dtype, log=log)
    out["collect_cuda_bf16_vs_cpu_fp32"] = compare(str(work / "ds_cpu_fp32"), str(work / "ds_cuda_bf16"))
    out["collect_cuda_fp32_vs_cpu_fp32"] = compare(str(work / "ds_cpu_fp32"), str(work / "ds_cuda_fp32"))

    run = work / "run_tiny"
    out["train_s"] = cli("train", "--data", str(work / "ds_cuda_bf16"), "--model", model, "--output", str(run),
                         "--steps", "60", "--lr", "3e-3", "--warmup-steps", "5", "--batch-tokens", "2048",
                         "--device", device, "--no-plot", "--save-every", "1000", log=log)
    rows = metrics(run)
    first, last = rows[:5], rows[-5:]
    out["train"] = {"steps": len(rows), "loss_first5": sum(r["loss"] for r in first) / len(first),
                    "loss_last5": sum(r["loss"] for r in last) / len(last),
                    "acc_last5_pos1": sum(r["step_acc"][0] for r in last) / len(last),
                    "peak_mem_gb": max(r["peak_mem_gb"] for r in rows)}
    out["train"]["loss_falls"] = out["train"]["loss_last5"] < out["train"]["loss_first5"]
    cli("export", str(run), "--out", str(work / "export_tiny"), log=log)
    for dtype in ("bfloat16", "float32"):
        report = work / f"eval_{dtype}.json"
        out[f"eval_cuda_{dtype}_s"] = cli("eval", "--model", model, "--draft", str(work / "export_tiny"),
                                          "--prompts", str(PROMPTS), "--limit", "16", "--max-new-tokens", "48",
                                          "--device", device, "--dtype", dtype, "--output", str(report), log=log)
        r = json.loads(report.read_text())
        out[f"eval_cuda_{dtype}"] = {"output_matches_greedy": r["output_matches_greedy"],
                                     "acceptance_length": r.get("eagle", {}).get("acceptance_length")}
    return out


def smol_calibration(work: Path, smol: Path, log: Path, device: str, copies: int, steps: int) -> dict:
    """A random model of SmolLM2's shape: collect tokens/s on the GPU and train steps/s at 16k-token batches."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    model_dir = work / "smol_random"
    shutil.copytree(smol, model_dir, dirs_exist_ok=True)
    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(model_dir)).to(torch.bfloat16).save_pretrained(model_dir)
    records = [json.loads(x) for x in PROMPTS.read_text().splitlines() if x.strip()]
    conv = work / "smol_input.jsonl"
    with open(conv, "w") as f:
        for k in range(copies):
            for r in records:
                f.write(json.dumps({**r, "conversation_id": f"{r['conversation_id']}-{k}"}) + "\n")
    ds = work / "ds_smol"
    out = {"collect_s": cli("collect", "--model", str(model_dir), "--input", str(conv), "--output", str(ds),
                            "--device", device, "--dtype", "bf16", "--batch-tokens", "32768", log=log)}
    from draftdata.store import open_dataset

    out["collect_tokens"] = open_dataset(str(ds)).num_tokens
    cli("vocab", str(ds), "-n", "8192", "-o", str(work / "vocab_smol.safetensors"), log=log)
    run = work / "run_smol"
    out["train_s"] = cli("train", "--data", str(ds), "--model", str(model_dir), "--output", str(run),
                         "--steps", str(steps), "--lr", "2e-3", "--batch-tokens", "16384", "--max-seq-len", "1024",
                         "--draft-vocab", str(work / "vocab_smol.safetensors"), "--device", device,
                         "--num-workers", "8", "--no-plot", "--save-every", "1000", log=log)
    rows = metrics(run)
    a, b = rows[19], rows[-1]
    out["train_steps_per_s"] = (b["step"] - a["step"]) / (b["elapsed_s"] - a["elapsed_s"])
    out["train_tokens_per_s"] = sum(r["tokens"] for r in rows[20:]) / (b["elapsed_s"] - a["elapsed_s"])
    out["train_peak_mem_gb"] = max(r["peak_mem_gb"] for r in rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--smol-config", help="directory with SmolLM2's config.json + tokenizer files")
    p.add_argument("--device", default="cuda", help="cpu: dry run without a GPU")
    p.add_argument("--copies", type=int, default=40, help="copies of the bundled prompts for the calibration")
    p.add_argument("--steps", type=int, default=80, help="calibration training steps (>= 25)")
    args = p.parse_args()
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "check_cuda.log"
    result: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    import transformers

    result["transformers"] = transformers.__version__
    checks = [("tiny", lambda: tiny_checks(work, log, args.device))]
    if args.smol_config:
        checks.append(("smol_calibration", lambda: smol_calibration(work, Path(args.smol_config), log, args.device,
                                                                    args.copies, args.steps)))
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as err:  # report and go on: one broken path must not hide the others
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        result[f"{name}_wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: result[name]}), flush=True)
        (work / "check_cuda.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
