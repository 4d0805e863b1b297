"""`draftdata synthesize`: rewrite every assistant turn of a conversation file with the base model.

Reference: docs/SYNTHESIZE.md. This module only declares flags; the work is in synthesize.py.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    from draftdata.store.fs import add_storage_option_argument

    p.add_argument("--model", default=None,
                   help="base model: a local HF directory, a hub id already in the local HF cache (never "
                        "downloaded; org/name[@revision]), a .gguf file, or 'smollm2'. With --endpoint: the "
                        "served model name (default: the server's only model)")
    p.add_argument("--input", required=True,
                   help="conversations: a JSONL file, a directory of *.jsonl, a glob, or an fsspec URL "
                        "(same formats as collect)")
    p.add_argument("--output", required=True,
                   help="output JSONL (local path), appended to; a rerun skips the ids already in it")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=1024, metavar="N", help="longest answer in tokens (default 1024)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="sampling temperature; 0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass when --temperature > 0 "
                                                              "(default 1.0 = off)")
    gen.add_argument("--seed", type=int, default=0, metavar="S",
                     help="sampling seed; each answer is seeded from (seed, conversation id, turn) (default 0)")
    gen.add_argument("--system-prompt", metavar="TEXT", default=None,
                     help="system prompt for conversations that have none (written to the output too)")
    gen.add_argument("--replace-system-prompt", action="store_true",
                     help="use --system-prompt instead of the conversations' own system prompts")
    gen.add_argument("--keep-answers", action="store_true",
                     help="keep the input's assistant messages that answer a user message and generate only the "
                          "missing answers (e.g. the new turn of `prompts --follow-up` output); default: every "
                          "assistant turn is written again")
    gen.add_argument("--chat-template", metavar="FILE", default=None,
                     help="Jinja chat template to use instead of the tokenizer's (local generation only)")
    local = p.add_argument_group("local generation (transformers)")
    local.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="answers decoded together; a finished one makes room for the next at once "
                            "(continuous batching; default 32, the fastest on 2 CPU threads: bench/synth/results.md)")
    local.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                       help="prompt + answer limit in tokens (default: the model's max_position_embeddings)")
    local.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                       help="compute dtype; auto = bf16 on GPUs and on CPUs with native bf16 "
                            "(AVX512-BF16, AMX), else fp32")
    local.add_argument("--device", default="auto",
                       help="auto, cpu, cuda or cuda:N (default auto: cuda when a GPU is visible, else cpu; with "
                            "--ray: the actors' own)")
    add_endpoint_arguments(p, "generate with POST URL/v1/chat/completions instead of loading the model",
                           what="conversations", concurrency=8)
    p.add_argument("--limit", type=int, default=None, metavar="N", help="read only the first N records")
    p.add_argument("--strict", action="store_true",
                   help="validate the whole input first and fail on the first bad record, before any model work")
    p.add_argument("--rejects", metavar="PATH", default=None,
                   help="write rejected records here (default <output>.synth/rejects-<time>-<pid>.jsonl)")
    add_storage_option_argument(p)
    ray = p.add_argument_group("Ray cluster (see docs/SYNTHESIZE.md and docs/RAY.md)")
    ray.add_argument("--ray", action="store_true", help="run on a Ray cluster: one generating actor per worker")
    ray.add_argument("--ray-address", default=None, metavar="ADDR", help="Ray address: auto, HOST:6379 (default: Ray's own choice: RAY_ADDRESS, else this machine's running cluster, else a new local one)")
    ray.add_argument("--num-workers", type=int, default=None, metavar="N",
                     help="Ray actors (default: one per --gpus-per-worker GPUs; 1 with CPU actors)")
    ray.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                     help="GPUs per Ray actor (default 1 when the cluster has GPUs and --device is not cpu, else 0)")
    ray.add_argument("--work-unit-size", type=int, default=None, metavar="N",
                     help="conversations per Ray work unit (default: 4 x --batch-size)")


def add_endpoint_arguments(p: argparse.ArgumentParser, endpoint_help: str, what: str,
                           concurrency: int) -> argparse._ArgumentGroup:
    """The OpenAI-compatible server flags `synthesize` and `prompts` share; returns their group."""
    remote = p.add_argument_group("OpenAI-compatible server (vLLM, SGLang, trtllm-serve)")
    remote.add_argument("--endpoint", metavar="URL", default=None, help=endpoint_help)
    remote.add_argument("--api-key", default=None, metavar="KEY",
                        help="bearer token for --endpoint (default: $DRAFTDATA_API_KEY, else $OPENAI_API_KEY)")
    remote.add_argument("--concurrency", type=int, default=concurrency, metavar="N",
                        help=f"{what} in flight (default {concurrency})")
    remote.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                        help="seconds per request (default 600)")
    remote.add_argument("--retries", type=int, default=5, metavar="N",
                        help="retries of a request after connection errors or HTTP 408/429/5xx (default 5)")
    return remote


def endpoint_api_key(args: argparse.Namespace) -> str | None:
    """Check the server flags; the bearer token for --endpoint (None without one)."""
    from draftdata.errors import DraftdataError

    if args.retries < 0 or args.request_timeout <= 0:
        raise DraftdataError("--retries must be >= 0 and --request-timeout positive")
    if args.endpoint is None:
        return None
    return args.api_key or os.environ.get("DRAFTDATA_API_KEY") or os.environ.get("OPENAI_API_KEY")


def settings_from_args(args: argparse.Namespace):
    """Validate the flags and resolve the model (converting a GGUF once)."""
    from draftdata.collect.conversations import load_chat_template
    from draftdata.collect.runner import check_rejects_path
    from draftdata.collect.synthesize import SynthSettings
    from draftdata.errors import DraftdataError
    from draftdata.models import local_device, resolve_model
    from draftdata.store.fs import parse_storage_options, refuse_relative_in_ray_upload

    refuse_relative_in_ray_upload("--output", args.output)
    if args.endpoint is None and args.model is None:
        raise DraftdataError("give --model (a local model to generate with) or --endpoint URL")
    if args.endpoint is not None and args.chat_template is not None:
        raise DraftdataError("--chat-template applies to local generation; with --endpoint the server applies its "
                             "own template (set it when starting the server)")
    check_rejects_path(args.rejects, args.input, args.output,  # before any model work: written at the end
                       storage_options=parse_storage_options(args.storage_option))
    return SynthSettings(
        input=args.input, output=args.output, model=args.model,
        model_path=None if args.endpoint else str(resolve_model(args.model)),
        endpoint=args.endpoint, api_key=endpoint_api_key(args),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        system_prompt=args.system_prompt, replace_system_prompt=args.replace_system_prompt,
        keep_answers=args.keep_answers, chat_template=load_chat_template(args.chat_template) if args.chat_template else None,
        max_seq_len=args.max_seq_len, batch_size=args.batch_size, concurrency=args.concurrency,
        request_timeout=args.request_timeout, retries=args.retries, dtype=args.dtype,
        device=args.device if args.ray else local_device(args.device),
        limit=args.limit, strict=args.strict, rejects=args.rejects,
        storage_options=parse_storage_options(args.storage_option),
    )


def run(args: argparse.Namespace) -> int:
    from draftdata.errors import DraftdataError

    if args.replace_system_prompt and args.system_prompt is None:
        raise DraftdataError("--replace-system-prompt needs --system-prompt TEXT")
    from draftdata.collect.ray_job import check_ray_flags

    check_ray_flags(args)
    settings = settings_from_args(args)
    if args.ray:
        from draftdata.collect.synthesize import run_ray

        return run_ray(settings, address=args.ray_address, num_workers=args.num_workers,
                       gpus_per_worker=args.gpus_per_worker, work_unit_size=args.work_unit_size)
    from draftdata.collect.synthesize import run_local

    return run_local(settings)
