"""Anonymous memory the loader holds per codec, during and after each epoch, against `prefetch_bytes`.

Writes synthetic datasets (H=512, k=3; `--parts` parts of `--samples` samples of `--tokens`
tokens) with the bf16 and fp8 codecs, then, in a fresh process per codec, iterates
`HiddenStateDataset(shuffle=True, prefetch_bytes=...)` for `--epochs` epochs and samples the
process's RssAnon every 2 ms: the peak within each epoch and what stays after it (all samples
dropped, `gc.collect()`), both over the level after opening the dataset. The loader's bound is
`prefetch_bytes` (docs/LOADER.md); after an epoch it should hold almost nothing.

    python bench/loader/bench_codec_memory.py --workdir DIR [--prefetch-mib 256]

Run it with PYTHONPATH pointing at another checkout to compare versions side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time


def write(url: str, codec: str, parts: int, samples: int, tokens: int) -> None:
    import numpy as np
    import torch

    from draftdata.config import DatasetSchema
    from draftdata.store import create_dataset

    h = 512
    schema = DatasetSchema(base_model_id="synthetic", hidden_size=h, aux_layer_ids=[0, 1, 2], num_hidden_layers=4,
                           vocab_size=100, max_seq_len=1 << 20)
    writer = create_dataset(url, schema, codec=codec)
    g = torch.Generator().manual_seed(0)
    n = 0
    for _ in range(parts):
        part = writer.open_part()
        for _ in range(samples):
            part.add({"conversation_id": f"c{n}", "input_ids": np.zeros(tokens, np.int32),
                      "loss_mask": np.ones(tokens, np.uint8),
                      "aux_hidden_states": torch.randn(tokens, 3 * h, generator=g).bfloat16(),
                      "hidden_states": torch.randn(tokens, h, generator=g).bfloat16()})
            n += 1
        part.commit()


def anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(url: str, prefetch: int, epochs: int) -> list[tuple[float, float]]:
    from draftdata.loaders import HiddenStateDataset

    ds = HiddenStateDataset(url, shuffle=True, prefetch_bytes=prefetch)
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], anon_mib())
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    base = anon_mib()
    out = []
    for e in range(epochs):
        ds.set_epoch(e)
        peak[0] = 0.0
        for x in ds:
            del x
        gc.collect()
        out.append((peak[0] - base, anon_mib() - base))
    stop.set()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--parts", type=int, default=200)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prefetch-mib", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--measure", nargs=2, metavar=("URL", "PREFETCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.epochs)))
        return
    prefetch = args.prefetch_mib << 20
    print(f"{args.parts} parts x {args.samples} samples x {args.tokens} tokens, H=512, k=3; prefetch "
          f"{args.prefetch_mib} MiB; RssAnon over the level after opening, MiB: peak in epoch / left after it")
    for codec in ("bf16", "fp8"):
        url = os.path.join(args.workdir, f"ds_{codec}")
        if not os.path.exists(url):
            write(url, codec, args.parts, args.samples, args.tokens)
        got = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--epochs", str(args.epochs),
                              "--measure", url, str(prefetch)], capture_output=True, text=True, check=True)
        rows = json.loads(got.stdout.strip().splitlines()[-1])
        print(f"{codec:5s} " + "  ".join(f"e{i}: {p:+.0f} / {a:+.0f}" for i, (p, a) in enumerate(rows)))


if __name__ == "__main__":
    main()
