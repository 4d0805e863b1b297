"""`draftdata collect`: run a base model over conversations and store the hidden states a draft needs.

Reference: docs/COLLECT.md. This module only declares flags; the work is in job.py / runner.py.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from draftdata.store.fs import add_storage_option_argument

    p.add_argument("--model", required=True,
                   help="base model: a local HF directory, a hub id already in the local HF cache (never "
                        "downloaded; org/name[@revision]), a .gguf file, or 'smollm2' (the embedded default)")
    p.add_argument("--input", required=True,
                   help="conversations: a JSONL file, a directory of *.jsonl, a glob, or an fsspec URL")
    p.add_argument("--output", required=True, help="dataset URL (local path, file://, s3://, gs://, ...)")
    p.add_argument("--format", choices=["zarr", "arrow"], default=None,
                   help="part format (default: the existing dataset's, else zarr)")
    p.add_argument("--codec", choices=["bf16", "zstd", "fp8"], default=None,
                   help="hidden-state codec (default: the existing dataset's, else bf16)")
    p.add_argument("--aux-layers", default="eagle", metavar="eagle|IDS",
                   help="aux layers, 0-based output of decoder layer k (= HF hidden_states[k+1]); 'eagle' = "
                        "sorted({1, N//2-1, N-4}) (default), or ids like 1,7,12")
    p.add_argument("--max-seq-len", type=int, default=3072, help="longest sample in tokens (default 3072)")
    p.add_argument("--on-long", choices=["skip", "truncate"], default="skip",
                   help="longer samples: reject them (skip, default) or keep their first --max-seq-len tokens")
    p.add_argument("--loss-mask", choices=["assistant", "all"], default="assistant",
                   help="tokens to train on: assistant replies incl. end-of-turn (default), or all")
    p.add_argument("--chat-template", metavar="FILE", default=None,
                   help="Jinja chat template to use instead of the tokenizer's (raw Jinja, or JSON with "
                        "'chat_template')")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="compute dtype of the base model; auto = bf16 on GPUs and on CPUs with native bf16, "
                        "else fp32 (stored states are always bf16)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (hf backend; default auto: cuda when a GPU is visible, else "
                        "cpu; with --ray: the actors' own)")
    p.add_argument("--backend", choices=["hf", "trtllm"], default="hf", help="hf (transformers, default) or trtllm")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=None, metavar="N",
                   help="trtllm: GPUs of one engine (default 1; with --ray: --gpus-per-worker)")
    p.add_argument("--moe-expert-parallel-size", "--ep", type=int, default=None, metavar="N",
                   help="trtllm: MoE expert-parallel degree within the --tensor-parallel-size GPUs")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per forward batch counted with padding: batch size x longest (default 8192)")
    p.add_argument("--part-size", type=float, default=512, metavar="MiB",
                   help="roll over to a new part after this many MiB of raw data (default 512)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="read only the first N records")
    p.add_argument("--strict", action="store_true",
                   help="validate the whole input first and fail on the first bad record, before any model work")
    p.add_argument("--rejects", metavar="PATH", default=None,
                   help="write rejected records here (default <output>/_reports/collect-<time>-<pid>/rejects.jsonl)")
    add_storage_option_argument(p)
    ray = p.add_argument_group("Ray cluster (see docs/RAY.md)")
    ray.add_argument("--ray", action="store_true", help="run on a Ray cluster: one actor per worker")
    ray.add_argument("--ray-address", default=None, help="Ray address: auto, HOST:6379 (default: Ray's own choice: RAY_ADDRESS, else this machine's running cluster, else a new local one)")
    ray.add_argument("--num-workers", type=int, default=None,
                     help="Ray actors (default: one per --gpus-per-worker GPUs; 1 with CPU actors)")
    ray.add_argument("--gpus-per-worker", type=float, default=None,
                     help="GPUs per Ray actor (default 1 when the cluster has GPUs and --device is not cpu, else 0)")
    ray.add_argument("--max-retries", type=int, default=None, metavar="N",
                     help="retries of a failed work unit before it is reported and skipped (default 2)")


def run(args: argparse.Namespace) -> int:
    from draftdata.collect.ray_job import check_ray_flags
    from draftdata.store.fs import refuse_relative_in_ray_upload

    check_ray_flags(args)
    refuse_relative_in_ray_upload("--output", args.output)
    if args.rejects:
        refuse_relative_in_ray_upload("--rejects", args.rejects)
    if args.ray:
        from draftdata.collect.ray_job import run_ray_collect

        return run_ray_collect(args)
    from draftdata.collect.job import run_local, settings_from_args

    return run_local(settings_from_args(args))
