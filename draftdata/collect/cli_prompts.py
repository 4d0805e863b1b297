"""`draftdata prompts`: let the base model write user prompts for `synthesize` to answer.

Reference: docs/SYNTHESIZE.md ("Prompts written by the model"). The work is in self_prompts.py.
"""

from __future__ import annotations

import argparse

from draftdata.collect.cli_synthesize import add_endpoint_arguments, endpoint_api_key


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="base model: a local HF directory, a hub id already in the local HF cache, a .gguf file, "
                        "or 'smollm2'. With --endpoint: the served model name (default: the server's only model)")
    p.add_argument("--output", required=True,
                   help="output JSONL of one-user-message conversations (local path), appended to; a rerun "
                        "continues until it holds --count prompts (with --follow-up: the continued conversations)")
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="prompts the output should hold (with --follow-up default: one sample per conversation)")
    p.add_argument("--follow-up", metavar="FILE", default=None,
                   help="continue each conversation of FILE that ends with an answer (synthesize's output) by one "
                        "user message the model writes after it: multi-turn prompts. Records keep their id and "
                        "messages; `synthesize --keep-answers` the output to answer the new turn")
    gen = p.add_argument_group("sampling")
    gen.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (default 1.0)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0 = off)")
    gen.add_argument("--seed", type=int, default=0, metavar="S",
                     help="each prompt is sampled from its own seed (S, index) (default 0); ids are self-S-INDEX")
    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                     help="longest prompt in tokens; longer samples are rejected (default 128)")
    gen.add_argument("--min-chars", type=int, default=16, metavar="N",
                     help="shortest prompt kept, in characters (default 16)")
    gen.add_argument("--max-attempts", type=int, default=None, metavar="N",
                     help="give up after this many samples in one run (default 3 x --count + 64)")
    gen.add_argument("--system-prompt", metavar="TEXT", default=None,
                     help="system message to write the prompts under (default: the template's own default)")
    gen.add_argument("--user-prefix", metavar="TEXT", action="append", default=[],
                     help="opening words of each prompt, for the model to continue (e.g. 'Write a', 'Imagine you "
                          "are'); repeat it to cycle through several, prompt i taking the (i mod n)-th. It steers "
                          "the kind of request more than --system-prompt does with small models")
    gen.add_argument("--chat-template", metavar="FILE", default=None,
                     help="Jinja chat template to use instead of the tokenizer's")
    local = p.add_argument_group("local generation (transformers)")
    local.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="prompts sampled together, continuous batching (default 32)")
    local.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                       help="compute dtype; auto = bf16 on GPUs and on CPUs with native bf16 "
                            "(AVX512-BF16, AMX), else fp32")
    local.add_argument("--device", default="auto",
                       help="auto, cpu, cuda or cuda:N (default auto: cuda when a GPU is visible, else cpu)")
    remote = add_endpoint_arguments(
        p, "sample with POST URL/v1/completions (a token-id prompt) instead of loading the model",
        what="requests", concurrency=16)
    remote.add_argument("--tokenizer", metavar="MODEL", default=None,
                        help="with --endpoint: the served model's directory (or hub id in the cache, .gguf, "
                             "'smollm2'), for its tokenizer and chat template; no weights are read")


def run(args: argparse.Namespace) -> int:
    from draftdata.collect.conversations import load_chat_template
    from draftdata.collect.self_prompts import PromptSettings
    from draftdata.collect.self_prompts import run as run_prompts
    from draftdata.errors import DraftdataError
    from draftdata.models import local_device, resolve_model

    if args.endpoint is None:
        if args.model is None:
            raise DraftdataError("give --model (a local model to sample with), or --endpoint URL and --tokenizer")
        if args.tokenizer is not None:
            raise DraftdataError("--tokenizer goes with --endpoint; locally the --model's own tokenizer is used")
        local = args.model
    else:
        if args.tokenizer is None:
            raise DraftdataError("--endpoint needs --tokenizer MODEL: the served model's directory, whose tokenizer "
                                 "and chat template write the prompt prefix here")
        local = args.tokenizer
    settings = PromptSettings(
        model=args.model, model_path=str(resolve_model(local)), output=args.output, count=args.count,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        system_prompt=args.system_prompt, user_prefixes=args.user_prefix,
        chat_template=load_chat_template(args.chat_template) if args.chat_template else None,
        min_chars=args.min_chars, max_attempts=args.max_attempts, batch_size=args.batch_size, dtype=args.dtype,
        device=local_device(args.device), endpoint=args.endpoint, api_key=endpoint_api_key(args),
        concurrency=args.concurrency, request_timeout=args.request_timeout, retries=args.retries,
        follow_up=args.follow_up)
    return run_prompts(settings)
