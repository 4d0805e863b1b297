"""fp8 decode: one-shot float32 product (before session 19) vs chunked into the bf16 output (now).

Each measurement runs in a fresh process (peak RSS is per process): decode ROWS x WIDTH fp8 bits
(a read of many rows, e.g. a length-bucketing window of the loader) REPEATS times; prints the
median seconds and the process's peak RSS growth over the inputs. Alternates old/new.

    python bench/store/bench_fp8_decode.py [--rows 65536] [--width 1728] [--repeats 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def old_decode(q, scale):
    import numpy as np
    import torch

    rows, slots = scale.shape
    qt = torch.from_numpy(np.ascontiguousarray(q)).view(torch.float8_e4m3fn).float().view(rows, slots, q.shape[1] // slots)
    out = qt * torch.from_numpy(np.ascontiguousarray(scale)).unsqueeze(2)
    return out.view(rows, q.shape[1]).to(torch.bfloat16)


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def make_inputs(folder: str, rows: int, width: int) -> None:
    import numpy as np
    import torch

    from draftdata.store.codecs import fp8_encode

    torch.manual_seed(0)
    x = (torch.randn(rows, width) * 3).to(torch.bfloat16)
    q, scale = fp8_encode(x.view(torch.uint16).numpy(), 3)
    np.save(f"{folder}/q.npy", q)
    np.save(f"{folder}/scale.npy", scale)


def child(which: str, folder: str, repeats: int) -> dict:
    import numpy as np
    import torch

    from draftdata.store.codecs import fp8_decode

    torch.set_num_threads(1)
    q, scale = np.load(f"{folder}/q.npy"), np.load(f"{folder}/scale.npy")
    base = peak_rss_kib()
    fn = old_decode if which == "old" else fp8_decode
    times, out = [], None
    for _ in range(repeats):
        out = None
        t0 = time.perf_counter()
        out = fn(q, scale)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_kib()
    return {"seconds": statistics.median(times), "peak_growth_mib": (peak - base) / 1024,
            "output_mib": out.numel() * 2 / 2**20, "check": float(out.float().sum())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--width", type=int, default=1728)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--child", default=None)
    p.add_argument("--folder", default=None)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.folder, a.repeats)))
        return
    got: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as folder:
        make_inputs(folder, a.rows, a.width)
        for _ in range(a.runs):
            for which in ("old", "new"):
                r = subprocess.run([sys.executable, __file__, "--child", which, "--folder", folder,
                                    "--repeats", str(a.repeats)], capture_output=True, text=True, check=True)
                got[which].append(json.loads(r.stdout))
    assert got["old"][0]["check"] == got["new"][0]["check"]
    for which, rs in got.items():
        print(f"{which}: decode {statistics.median(r['seconds'] for r in rs) * 1e3:.0f} ms, peak RSS growth "
              f"{statistics.median(r['peak_growth_mib'] for r in rs):.0f} MiB for a {rs[0]['output_mib']:.0f} MiB output "
              "(runs: " + ", ".join(f"{r['seconds'] * 1e3:.0f} ms" for r in rs) + ")")
    print(f"new / old time: {statistics.median(r['seconds'] for r in got['new']) / statistics.median(r['seconds'] for r in got['old']):.2f}")


if __name__ == "__main__":
    main()
