"""Store benchmark: stored/raw bytes per codec, write and read throughput per format, local and S3.

Every ratio is measured side by side in one run on the same data:
- stored bytes / raw tensor bytes (bf16 hidden + int32 ids + uint8 mask) for bf16, zstd, fp8;
- write and read GB/s of each format, local and on S3 (moto on 127.0.0.1), divided by `cat` of
  the same files from page cache (and, for S3, by a raw s3fs GET of the same objects).

Data: real SmolLM2-135M-Instruct activations (aux layers 1, 14, 26 + final) on conversations
from ../shared/data/train.jsonl (`--source smollm2`, default), or Gaussian noise (`--source random`).

    python bench/store/bench_store.py --conversations 200 --out bench/store/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from draftdata.config import DatasetSchema
from draftdata.store import create_dataset, open_dataset

ROOT = Path(__file__).resolve().parents[2]


def real_samples(n: int, max_len: int) -> tuple[list[dict], DatasetSchema]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftdata.models import default_aux_layers, resolve_model

    path = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    cfg = model.config
    layers = default_aux_layers(cfg.num_hidden_layers)
    rows = [json.loads(x) for x in (ROOT.parent / "shared/data/train.jsonl").read_text().splitlines()[:n]]
    samples = []
    with torch.inference_mode():
        for r in rows:
            text = tok.apply_chat_template(r["conversations"], tokenize=False)
            ids = tok(text, return_tensors="pt").input_ids[:, :max_len]
            hs = model(ids, output_hidden_states=True).hidden_states
            samples.append({
                "conversation_id": r["conversation_id"], "input_ids": ids[0], "loss_mask": torch.ones_like(ids[0]),
                "aux_hidden_states": torch.cat([hs[k + 1][0] for k in layers], -1).to(torch.bfloat16),
                "hidden_states": hs[-1][0].to(torch.bfloat16),
            })
    schema = DatasetSchema(base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", hidden_size=cfg.hidden_size,
                           aux_layer_ids=layers, num_hidden_layers=cfg.num_hidden_layers,
                           vocab_size=cfg.vocab_size, max_seq_len=max_len)
    return samples, schema


def random_samples(n: int, max_len: int) -> tuple[list[dict], DatasetSchema]:
    g = torch.Generator().manual_seed(0)
    h, layers = 576, [1, 14, 26]
    samples = []
    for i in range(n):
        L = int(torch.randint(64, max_len, (1,), generator=g))
        samples.append({"conversation_id": f"r{i}", "input_ids": torch.randint(0, 49152, (L,), generator=g),
                        "loss_mask": torch.ones(L, dtype=torch.uint8),
                        "aux_hidden_states": torch.randn(L, 3 * h, generator=g).to(torch.bfloat16),
                        "hidden_states": torch.randn(L, h, generator=g).to(torch.bfloat16)})
    return samples, DatasetSchema(base_model_id="random", hidden_size=h, aux_layer_ids=layers,
                                  num_hidden_layers=30, vocab_size=49152, max_seq_len=max_len)


def write(url, schema, samples, fmt, codec, opts, per_part):
    t = time.perf_counter()
    w = create_dataset(url, schema, format=fmt, codec=codec, storage_options=opts)
    for s in range(0, len(samples), per_part):
        pw = w.open_part()
        for x in samples[s:s + per_part]:
            pw.add(x)
        pw.commit()
    return time.perf_counter() - t


def read_all(url, opts):
    ds = open_dataset(url, storage_options=opts)
    t = time.perf_counter()
    n = 0
    for p in range(len(ds.parts)):
        arrays = ds.read_part(p)
        n += arrays["aux_hidden_states"].numel()
    return time.perf_counter() - t


def cat_seconds(directory: str) -> tuple[float, int]:
    files = [str(p) for p in Path(directory).rglob("*") if p.is_file()]
    size = sum(os.path.getsize(f) for f in files)
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    best = min(_timed(lambda: subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)) for _ in range(3))
    return best, size


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=["smollm2", "random"], default="smollm2")
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--per-part", type=int, default=100)
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args()

    samples, schema = (real_samples if args.source == "smollm2" else random_samples)(args.conversations, args.max_len)
    tokens = sum(len(s["input_ids"]) for s in samples)
    raw = tokens * (2 * (schema.num_aux_slots + 1) * schema.hidden_size + 5)
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_"))
    rows = []

    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}

    for fmt in ("zarr", "arrow"):
        for codec in ("bf16", "zstd", "fp8"):
            local = str(tmp / f"{fmt}-{codec}")
            wt = write(local, schema, samples, fmt, codec, None, args.per_part)
            ds = open_dataset(local)
            stored = ds.stored_bytes
            rt = min(read_all(local, None) for _ in range(2))
            cat_t, files_bytes = cat_seconds(local)
            s3url = f"s3://bench/{fmt}-{codec}"
            swt = write(s3url, schema, samples, fmt, codec, opts, args.per_part)
            srt = read_all(s3url, opts)
            fs = fsspec.filesystem("s3", **opts)
            objs = [p for p in fs.find(f"bench/{fmt}-{codec}/parts")]
            get_t = _timed(lambda fs=fs, objs=objs: fs.cat(objs))
            gb = raw / 1e9
            rows.append({
                "format": fmt, "codec": codec, "stored/raw": stored / raw,
                "write GB/s": gb / wt, "read GB/s": gb / rt, "cat GB/s": gb / cat_t,
                "write/cat": cat_t / wt, "read/cat": cat_t / rt,
                "S3 write GB/s": gb / swt, "S3 read GB/s": gb / srt,
                "S3 read/cat": cat_t / srt, "S3 read/raw GET": get_t / srt,
            })
            print(json.dumps(rows[-1]), flush=True)
    server.stop()
    shutil.rmtree(tmp, ignore_errors=True)

    head = list(rows[0])
    lines = [
        f"Data: {args.source}, {len(samples)} conversations, {tokens:,} tokens, hidden {schema.hidden_size}, "
        f"aux layers {schema.aux_layer_ids}; raw = {raw / 2**20:.1f} MiB (bf16 hidden + int32 ids + uint8 mask). "
        f"GB/s are logical (raw) bytes per second; `cat` reads the stored files of the same dataset from page cache "
        f"(so cat GB/s counts raw bytes over the time to cat the smaller compressed files). "
        f"S3 = moto server on 127.0.0.1; 'raw GET' = s3fs cat of the same objects. Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text("# Store benchmark\n\n" + text)


if __name__ == "__main__":
    main()
