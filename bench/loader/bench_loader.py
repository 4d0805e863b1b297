"""Loader benchmark: every figure is a ratio measured side by side in one run, on the same data.

- loader bytes/s over a local dataset / `cat` of the same files, from page cache and cold  (goal >= 0.7)
- loader samples/s / ModelOpt's per-file `torch.load` dataset of the same samples   (goal >= 5x)
- loader bytes/s from S3 (moto server process on 127.0.0.1) / a raw s3fs read of the same objects  (goal >= 0.7)
- peak memory of the loader vs its prefetch setting

Data: synthetic bf16 activations of realistic shapes written with the store (hidden size H,
k aux layers, sample lengths log-uniform in [64, 2048]). Each measurement is repeated and the
median is reported; repeats are interleaved so that machine noise hits all contenders alike.

    python bench/loader/bench_loader.py --hidden 2048 --gib 1.0 --out bench/loader/results.md
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from draftdata.config import DatasetSchema
from draftdata.loaders import HiddenStateDataset
from draftdata.loaders.plan import bytes_per_token
from draftdata.store import create_dataset, open_dataset


def make_samples(hidden: int, aux: int, total_bytes: int, seed: int) -> list[dict]:
    """Samples of log-uniform length whose raw bytes add up to about `total_bytes`."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = torch.randn(1 << 24, generator=g).to(torch.bfloat16)  # values are irrelevant to I/O; reuse a pool
    per_token = bytes_per_token(hidden, aux)
    samples, size, i = [], 0, 0
    while size < total_bytes:
        n = int(np.exp(rng.uniform(np.log(64), np.log(2048))))
        off = int(rng.integers(0, pool.numel() - n * hidden * (aux + 1)))
        flat = pool[off:off + n * hidden * (aux + 1)].view(n, hidden * (aux + 1))
        samples.append({"conversation_id": f"s{i:06d}", "input_ids": torch.randint(0, 32000, (n,), dtype=torch.int32),
                        "loss_mask": torch.ones(n, dtype=torch.uint8),
                        "aux_hidden_states": flat[:, :hidden * aux].contiguous(),
                        "hidden_states": flat[:, hidden * aux:].contiguous()})
        size += n * per_token
        i += 1
    return samples


def write_store(url: str, samples: list[dict], hidden: int, aux: int, part_bytes: int, storage_options=None) -> None:
    schema = DatasetSchema(base_model_id="bench/synthetic", hidden_size=hidden, aux_layer_ids=list(range(1, aux + 1)),
                           num_hidden_layers=aux + 4, vocab_size=32000, max_seq_len=4096)
    w = create_dataset(url, schema, storage_options=storage_options)
    pw = w.open_part()
    for s in samples:
        pw.add(s)
        if pw.nbytes >= part_bytes:
            pw.commit()
            pw = w.open_part()
    pw.commit()


def write_pt(directory: Path, samples: list[dict]) -> list[str]:
    """The same samples in ModelOpt's collect_hidden_states layout: one torch.save file each."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for s in samples:
        path = directory / f"{s['conversation_id']}.pt"
        torch.save({"input_ids": s["input_ids"].long(), "hidden_states": s["hidden_states"],
                    "aux_hidden_states": s["aux_hidden_states"], "loss_mask": s["loss_mask"].long(),
                    "conversation_id": s["conversation_id"]}, path)
        files.append(str(path))
    return files


def files_under(path: str) -> list[str]:
    return sorted(str(p) for p in Path(path).rglob("*") if p.is_file())


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cat(files: list[str]) -> None:
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def drain(iterable) -> int:
    n = 0
    for _ in iterable:
        n += 1
    return n


def median_rates(contenders: dict[str, tuple], repeats: int, before=None) -> dict[str, float]:
    """contenders: name -> (callable, amount); returns median amount/second per contender.

    `before` (untimed) runs before every timed call, e.g. to evict files from the page cache.
    """
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, (fn, _) in contenders.items():
            if before is not None:
                before()
            times[name].append(timed(fn))
    return {name: contenders[name][1] / statistics.median(t) for name, t in times.items()}


def evict(files: list[str]) -> None:
    """Drop the files from the page cache (POSIX_FADV_DONTNEED; no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class PeakRSS:
    """Samples this process's resident set size every 2 ms (ru_maxrss never decreases, this can be reset)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--aux", type=int, default=3)
    ap.add_argument("--gib", type=float, default=1.0, help="raw bytes of the local dataset")
    ap.add_argument("--part-mib", type=float, default=256)
    ap.add_argument("--s3-mib", type=float, default=256, help="raw bytes of the S3 dataset")
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--prefetch-mib", type=float, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="append a markdown section to this file")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_loader_"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    H, K = args.hidden, args.aux
    prefetch = int(args.prefetch_mib * 2**20)
    lines = [f"## H={H}, k={K}: {args.gib:g} GiB local, {args.s3_mib:g} MiB S3, parts {args.part_mib:g} MiB, "
             f"prefetch {args.prefetch_mib:g} MiB",
             "", f"Machine: {os.cpu_count()} CPU cores, load average at start "
             f"{os.getloadavg()[0]:.1f}; medians of {args.repeats} interleaved repeats.", ""]
    print(lines[0], file=sys.stderr)

    samples = make_samples(H, K, int(args.gib * 2**30), seed=0)
    url = str(work / "ds")
    write_store(url, samples, H, K, int(args.part_mib * 2**20))
    pt_files = write_pt(work / "pt", samples)
    del samples
    ds_files, ds = files_under(url), open_dataset(url)
    raw = ds.num_tokens * bytes_per_token(H, K)
    stored = sum(os.path.getsize(f) for f in ds_files)
    n = ds.num_samples
    for f in (ds_files, pt_files):  # page cache
        cat(f)

    def loader(**kw):
        return HiddenStateDataset(url, seed=1, prefetch_bytes=prefetch, **kw)

    def loader_workers():
        dl = torch.utils.data.DataLoader(loader(max_tokens_per_batch=args.tokens_per_batch), batch_size=None,
                                         num_workers=2)
        drain(dl)

    def read_into_memory():  # the least any loader must do: every byte into fresh process memory
        for f in ds_files:
            np.fromfile(f, dtype=np.uint8)

    rates = median_rates({
        "cat": (lambda: cat(ds_files), stored),
        "fromfile": (read_into_memory, stored),
        "samples": (lambda: drain(loader()), raw),
        "batches": (lambda: drain(loader(max_tokens_per_batch=args.tokens_per_batch)), raw),
        "batches_2_workers": (loader_workers, raw),
    }, args.repeats)
    eff = loader(max_tokens_per_batch=args.tokens_per_batch).padding_efficiency()
    lines += [
        "| local, page cache | throughput | ÷ cat |", "|---|---|---|",
        f"| `cat` of the {len(ds_files)} dataset files | {gb(rates['cat'])} | 1.00 |",
        f"| reference: `np.fromfile` of the same files (bytes into fresh memory, no checks) | "
        f"{gb(rates['fromfile'])} | {rates['fromfile'] / rates['cat']:.2f} |",
        f"| HiddenStateDataset, samples (bf16 views) | {gb(rates['samples'])} | {rates['samples'] / rates['cat']:.2f} |",
        f"| HiddenStateDataset, token-budget batches ({args.tokens_per_batch} tokens, padding efficiency "
        f"{eff:.3f}) | {gb(rates['batches'])} | {rates['batches'] / rates['cat']:.2f} |",
        f"| same, DataLoader num_workers=2 | {gb(rates['batches_2_workers'])} | "
        f"{rates['batches_2_workers'] / rates['cat']:.2f} |", ""]

    # ModelOpt's own offline dataset over per-sample .pt files vs ours, same samples, same dict layout.
    from modelopt.torch.speculative.eagle.utils import OfflineSupervisedDataset

    from draftdata.loaders.modelopt import StreamingOfflineDataset

    order = np.random.default_rng(0).permutation(len(pt_files))
    theirs = OfflineSupervisedDataset([pt_files[i] for i in order], answer_only_loss=True)

    def theirs_workers():
        drain(torch.utils.data.DataLoader(theirs, batch_size=None, num_workers=2, collate_fn=lambda x: x))

    def ours_workers():
        drain(torch.utils.data.DataLoader(StreamingOfflineDataset(url, answer_only_loss=True, prefetch_bytes=prefetch),
                                          batch_size=None, num_workers=2, collate_fn=lambda x: x))

    per = median_rates({
        "torch.load": (lambda: drain(theirs[i] for i in range(len(theirs))), n),
        "ours": (lambda: drain(StreamingOfflineDataset(url, answer_only_loss=True, prefetch_bytes=prefetch)), n),
        "torch.load_2w": (theirs_workers, n),
        "ours_2w": (ours_workers, n),
    }, args.repeats)
    lines += [
        "| ModelOpt layout, same samples, same per-sample dicts | samples/s | ÷ per-file torch.load |", "|---|---|---|",
        f"| `OfflineSupervisedDataset` (one `torch.load` per sample), in process | {per['torch.load']:.0f} | 1.00 |",
        f"| `draftdata.loaders.modelopt.StreamingOfflineDataset`, in process | {per['ours']:.0f} | "
        f"{per['ours'] / per['torch.load']:.2f} |",
        f"| `OfflineSupervisedDataset`, DataLoader num_workers=2 | {per['torch.load_2w']:.0f} | 1.00 |",
        f"| `StreamingOfflineDataset`, DataLoader num_workers=2 | {per['ours_2w']:.0f} | "
        f"{per['ours_2w'] / per['torch.load_2w']:.2f} |", ""]

    # Cold page cache: what training on a dataset larger than RAM sees.
    cold = median_rates({
        "cat": (lambda: cat(ds_files), stored),
        "ours": (lambda: drain(StreamingOfflineDataset(url, answer_only_loss=True, prefetch_bytes=prefetch)), n),
        "torch.load": (lambda: drain(theirs[i] for i in range(len(theirs))), n),
    }, args.repeats, before=lambda: evict(ds_files + pt_files))
    ours_bytes = cold["ours"] * raw / n
    lines += [
        "| cold page cache (files evicted before every run) | throughput | ratio |", "|---|---|---|",
        f"| `cat` of the dataset files | {gb(cold['cat'])} | 1.00 |",
        f"| `StreamingOfflineDataset` (ModelOpt dicts from our dataset) | {gb(ours_bytes)}, "
        f"{cold['ours']:.0f} samples/s | {ours_bytes / cold['cat']:.2f} of cat |",
        f"| `OfflineSupervisedDataset`, per-file `torch.load` in shuffled order | {cold['torch.load']:.0f} samples/s | "
        f"ours ÷ this: {cold['ours'] / cold['torch.load']:.2f} |", ""]

    # Peak memory: samples mode in this process, references dropped as we go.
    with PeakRSS() as mem:
        it = loader()
        drain(it)
    lines += [f"Peak memory, samples mode: RSS grew by {(mem.peak - mem.base) / 2**20:,.0f} MiB over the "
              f"{args.prefetch_mib:g} MiB prefetch setting (loader-held bytes peaked at "
              f"{it.stats['peak_prefetch_bytes'] / 2**20:,.0f} MiB); process max RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB.", ""]
    shutil.rmtree(work / "pt", ignore_errors=True)

    lines += s3_section(H, K, int(args.s3_mib * 2**20), args.part_mib, prefetch, args.repeats)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def s3_section(H: int, K: int, total: int, part_mib: float, prefetch: int, repeats: int) -> list[str]:
    import boto3
    import s3fs

    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(k, v)
    # The S3 server runs in its own process so that it does not share a GIL with the readers.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", "import time; from moto.server import ThreadedMotoServer; "
                               f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start(); "
                               "time.sleep(1e9)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint,
                                                                        "region_name": "us-east-1"}}
        url = "s3://bench/ds"
        write_store(url, make_samples(H, K, total, seed=1), H, K, int(min(part_mib, total / 2**20 / 4) * 2**20),
                    storage_options=opts)
        fs = s3fs.S3FileSystem(**opts)
        objects = [p for p in fs.find("bench/ds") if "/parts/" in p]
        stored = sum(fs.size(p) for p in objects)
        raw = open_dataset(url, storage_options=opts).num_tokens * bytes_per_token(H, K)

        def raw_read():
            fs.invalidate_cache()
            fs.cat(objects)

        rates = median_rates({
            "s3fs": (raw_read, stored),
            "ours": (lambda: drain(HiddenStateDataset(url, storage_options=opts, prefetch_bytes=prefetch)), raw),
        }, repeats)
        return ["| S3 (moto server process on 127.0.0.1) | throughput | ÷ raw s3fs |", "|---|---|---|",
                f"| raw `s3fs.cat` of the {len(objects)} part objects (concurrent GETs) | {gb(rates['s3fs'])} | 1.00 |",
                f"| HiddenStateDataset, samples | {gb(rates['ours'])} | {rates['ours'] / rates['s3fs']:.2f} |", ""]
    finally:
        server.kill()


if __name__ == "__main__":
    sys.exit(main())
