"""`draftdata inspect URL [--json]`: what a dataset holds and what it costs on disk."""

from __future__ import annotations

import argparse
import json
from typing import Any

from draftdata.store.fs import add_storage_option_argument, parse_storage_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="dataset URL (local path, file://, s3://, gs://, memory://)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_storage_option_argument(p)


def summarize(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts, byte sizes and schema of a dataset, as one dict (the `--json` output)."""
    from draftdata.store import open_dataset

    ds = open_dataset(url, storage_options=storage_options)
    s = ds.schema
    tokens = ds.num_tokens
    row_raw = 2 * (s.num_aux_slots + 1) * s.hidden_size + 4 + 1  # bf16 hidden + int32 id + uint8 mask
    raw = tokens * row_raw
    stored = ds.stored_bytes
    return {
        "url": ds.url,
        "samples": ds.num_samples,
        "tokens": tokens,
        "parts": len(ds.parts),
        "stored_bytes": stored,
        "raw_bytes": raw,
        "stored_over_raw": (stored / raw) if raw else None,
        "bytes_per_token": (stored / tokens) if tokens else None,
        "mean_tokens_per_sample": (tokens / ds.num_samples) if ds.num_samples else None,
        "work_units": len({p.work_unit for p in ds.parts if p.work_unit is not None}),
        "computed_as": _producers(ds.parts),
        "schema": s.to_dict(),
    }


def _producers(parts: Any) -> dict[str, int]:
    """Parts per way of computing ("bf16 on cuda (hf)"; "unrecorded" before commit records had it)."""
    out: dict[str, int] = {}
    for p in parts:
        q = p.producer or {}
        key = f"{q.get('compute_dtype') or '?'} on {q.get('device') or '?'} ({q.get('backend') or '?'})" if q \
            else "unrecorded"
        out[key] = out.get(key, 0) + 1
    return out


def format_text(info: dict[str, Any]) -> str:
    s = info["schema"]

    def gib(n: float) -> str:
        return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

    lines = [
        f"dataset        {info['url']}",
        f"samples        {info['samples']:,}",
        f"tokens         {info['tokens']:,}",
        f"parts          {info['parts']:,}",
        f"stored bytes   {info['stored_bytes']:,} ({gib(info['stored_bytes'])})",
        f"raw bytes      {info['raw_bytes']:,} ({gib(info['raw_bytes'])}; bf16 hidden + int32 ids + uint8 mask)",
    ]
    if info["stored_over_raw"] is not None:
        lines.append(f"stored / raw   {info['stored_over_raw']:.3f}")
        lines.append(f"bytes / token  {info['bytes_per_token']:.1f}")
    lines += [
        f"format         {s['storage_format']} / codec {s['codec']} (format version {s['format_version']})",
        f"base model     {s['base_model_id']}" + (f" @ {s['base_model_revision']}" if s.get("base_model_revision") else ""),
        f"hidden size    {s['hidden_size']}   layers {s['num_hidden_layers']}   vocab {s['vocab_size']}",
        f"aux layers     {s['aux_layer_ids']} ({s['layer_id_convention']})",
        f"final hidden   {'pre-norm' if s['final_hidden_prenorm'] else 'post-norm'}   loss mask {s['loss_mask']}"
        f"   max length {s['max_seq_len']}",
    ]
    if info["computed_as"]:
        lines.append("computed as    " + ", ".join(f"{k}: {n:,} part{'s' if n != 1 else ''}"
                                                 for k, n in sorted(info["computed_as"].items())))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = summarize(args.url, parse_storage_options(args.storage_option))
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
