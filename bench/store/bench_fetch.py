"""Bytes fetched from S3 per byte the loader returns (moto on 127.0.0.1), per format.

A streaming loader over object storage pays for every byte it GETs; this counts them (through
s3fs's range-read and whole-object calls) while `HiddenStateDataset` reads a shuffled epoch of
token-budget batches, and divides by the stored bytes of the samples it yielded. Deterministic
(no timing), so one run per setting is enough; run it from a checkout to compare commits.

    python bench/store/bench_fetch.py --prefetch-mib 16 256
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefetch-mib", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--formats", nargs="+", default=["zarr", "arrow"])
    ap.add_argument("--codecs", nargs="+", default=["bf16", "fp8"])
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from draftdata.config import DatasetSchema
    from draftdata.loaders import HiddenStateDataset
    from draftdata.store import create_dataset, open_dataset

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    opts = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}

    fetched = [0, 0]
    real_cat, real_range = s3fs.core.S3FileSystem._cat_file, s3fs.core.S3File._fetch_range

    async def cat_file(self, path, version_id=None, start=None, end=None, **kw):
        out = await real_cat(self, path, version_id=version_id, start=start, end=end, **kw)
        fetched[0] += len(out)
        fetched[1] += 1
        return out

    def fetch_range(self, start, end):
        out = real_range(self, start, end)
        fetched[0] += len(out)
        fetched[1] += 1
        return out

    s3fs.core.S3FileSystem._cat_file, s3fs.core.S3File._fetch_range = cat_file, fetch_range
    H, K = 576, 3                                   # SmolLM2-135M's width, 3 aux layers
    print("| format | codec | prefetch MiB | stored bytes of the samples | fetched | fetched / stored | GETs |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for fmt in args.formats:
        for codec in args.codecs:
            url = f"s3://bench/{fmt}-{codec}"
            schema = DatasetSchema(base_model_id="bench", hidden_size=H, aux_layer_ids=[1, 14, 26],
                                   num_hidden_layers=30, vocab_size=49152, max_seq_len=1024)
            w = create_dataset(url, schema, format=fmt, codec=codec, storage_options=opts)
            g = torch.Generator().manual_seed(0)
            for _ in range(2):
                pw = w.open_part()
                for i in range(64):
                    n = 100 + (i * 37) % 500
                    pw.add({"conversation_id": f"c{i}", "input_ids": torch.randint(0, 49152, (n,), generator=g),
                            "loss_mask": torch.ones(n, dtype=torch.long),
                            "aux_hidden_states": torch.randn(n, K * H, generator=g).to(torch.bfloat16),
                            "hidden_states": torch.randn(n, H, generator=g).to(torch.bfloat16)})
                pw.commit()
            stored = open_dataset(url, storage_options=opts).stored_bytes
            for mib in args.prefetch_mib:
                fetched[:] = [0, 0]
                with tempfile.TemporaryDirectory():
                    ds = HiddenStateDataset(url, storage_options=opts, shuffle=True, max_tokens_per_batch=4096,
                                            prefetch_bytes=mib << 20)
                    sum(len(b["input_ids"]) for b in ds)
                print(f"| {fmt} | {codec} | {mib} | {stored / 1e6:.1f} MB | {fetched[0] / 1e6:.1f} MB "
                      f"| {fetched[0] / stored:.2f} | {fetched[1]} |")
    server.stop()


if __name__ == "__main__":
    main()
