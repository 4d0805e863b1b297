"""Session 13's GPU checks, one device call (results in bench/gpu/results.md).

1. collect's out-of-memory split on a real CUDA OOM: a tiny random Llama (hidden 512, eager
   attention, bf16) over 8 sequences of 4,096 tokens with the process capped between the peak
   memory of 4 and of 8 sequences; logs every backend.forward call (batch size, GiB allocated on
   entry). Since the fix the halves start from the memory the whole batch started from.
2. `draftdata train` on CUDA (bf16) over a dataset with a damaged part (--on-corrupt skip): the
   stand-in step for an all-damaged batch, the run's planned step count, finite losses.

    python bench/gpu/check_fixes.py --out $OUT/check_fixes.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def oom_split(work: Path, device: str) -> dict:
    import numpy as np
    import torch
    from conftest import make_tiny_model

    from draftdata.collect import runner
    from draftdata.collect.backends.hf import HFBackend

    model = make_tiny_model(work / "tiny512", num_layers=4, hidden_size=512)
    backend = HFBackend(str(model), dtype="bf16", device=device, attn_implementation="eager")
    rng = np.random.default_rng(0)
    seqs = [SimpleNamespace(input_ids=rng.integers(0, backend.info.vocab_size, 4096), length=4096,
                            source=f"s{i}", conversation_id=str(i)) for i in range(8)]
    aux = [1, 2]
    forward = backend.forward

    def peak(n: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        forward([s.input_ids.tolist() for s in seqs[:n]], aux)
        return torch.cuda.max_memory_allocated()

    peaks = {n: peak(n) for n in (1, 2, 4, 8)}
    calls: list = []

    def logged(batch, aux_ids):
        calls.append((len(batch), round(torch.cuda.memory_allocated() / 2**30, 2)))
        return forward(batch, aux_ids)

    backend.forward = logged
    cap = (peaks[4] + peaks[8]) / 2
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    t0 = time.perf_counter()
    try:
        out = runner._forward(backend, seqs, aux)
        result = f"ok: {len(out)} results"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        result = f"failed: {type(e).__name__}: {str(e)[:120]}"
    torch.cuda.set_per_process_memory_fraction(1.0)
    return {"peak_gib_by_batch": {n: round(v / 2**30, 2) for n, v in peaks.items()},
            "cap_gib": round(cap / 2**30, 2), "result": result, "calls_batch_gib_at_entry": calls,
            "seconds": round(time.perf_counter() - t0, 2)}


def damaged_train(work: Path, device: str) -> dict:
    from conftest import make_tiny_model
    from test_train_support import TINY_ARCH, damage_first_batch, make_dataset

    from draftdata.loaders import HiddenStateDataset
    from draftdata.train.trainer import TrainConfig, train

    model = make_tiny_model(work / "tiny64")
    url = str(work / "ds")
    make_dataset(url, model, n=48)
    damage_first_batch(url, seed=5, batch_tokens=64)
    plan_ds = HiddenStateDataset(url, seed=5, max_seq_len=64, max_tokens_per_batch=64)
    cfg = TrainConfig(data=url, model=str(model), output=str(work / "run"), epochs=1, batch_tokens=64, seed=5,
                      lr=2e-3, device=device, dtype="bf16", eagle_config={"eagle_architecture_config": TINY_ARCH},
                      save_every=1000, log_every=1000, progress=False, plot=False)
    result = train(cfg)
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"steps": result.steps, "planned": len(plan_ds), "skipped_samples": sum(r["skipped_samples"] for r in rows),
            "first_step_tokens": rows[0]["tokens"], "losses_finite": all(r["loss"] == r["loss"] for r in rows),
            "last_loss": rows[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cpu: dry run of the training check only")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="check_fixes-"))
    report: dict = {}
    checks = (("oom_split", oom_split), ("damaged_train", damaged_train))
    for name, fn in checks if args.device.startswith("cuda") else checks[1:]:
        t0 = time.perf_counter()
        try:
            report[name] = fn(work, args.device)
        except Exception as e:  # noqa: BLE001 - one check failing must not hide the other
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        report[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(report[name]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
