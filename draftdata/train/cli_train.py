"""`draftdata train`: train an EAGLE3 / EAGLE 3.1 draft from a hidden-state dataset (eagle_offline=True).

Single process:   draftdata train --data URL --model BASE --output DIR --steps 1000
Data parallel:    torchrun --nproc-per-node 8 -m draftdata.cli train --data URL ...
Ray cluster:      draftdata train ... --ray-workers 8     (Ray Train TorchTrainer)
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset URL (local path, file://, s3://, gs://)")
    p.add_argument("--model", required=True,
                   help="base model: HF directory, hub id in the local cache, .gguf, or 'smollm2'; only "
                        "embed_tokens and lm_head are read (the final norm too for a dataset of pre-norm final states; "
                        "one layer with --init-from-base)")
    p.add_argument("--output", required=True, help="output directory (checkpoints, metrics, final draft)")
    p.add_argument("--eagle-config", metavar="FILE",
                   help="JSON file with the EagleConfig fields to change (ModelOpt names), e.g. "
                        '{"eagle_architecture_config": {"fc_norm": true, "norm_output": true}}')
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer steps to train")
    length.add_argument("--epochs", type=int, help="passes over the dataset")
    p.add_argument("--max-minutes", type=float, metavar="M",
                   help="stop after M minutes of wall clock (checkpoint + final draft; --resume continues); "
                        "pair it with --schedule constant, as a cosine/linear schedule would not finish")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="token budget per micro-batch and rank, counted padded (default 8192); longer "
                        "samples are truncated to --max-seq-len")
    p.add_argument("--max-seq-len", type=int, help="truncate samples to this many tokens (default --batch-tokens)")
    p.add_argument("--pad-to-multiple-of", type=int, metavar="N",
                   help="round each batch's padded length up to a multiple of N: fewer distinct shapes (GPU "
                        "kernels, torch.compile; on the CPU in bf16, fewer cached oneDNN primitives: -1 GiB at "
                        "0.97x tokens/s with 64, bench/train/results.md). Default: no rounding")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--draft-vocab", metavar="FILE", help="d2t/t2d file from `draftdata vocab` (compressed vocab)")
    p.add_argument("--ttt-steps", type=int, help="training-time-test steps (default: eagle_ttt_steps = 3)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--init-draft", metavar="PATH",
                   help="start from the weights of an existing draft (a draftdata checkpoint or training output, "
                        "or an exported EAGLE3 directory such as a published draft) instead of a random one; "
                        "optimizer, schedule and data order start fresh")
    p.add_argument("--init-from-base", action="store_true",
                   help="start the draft's decoder layer as a copy of the base's layer after the highest aux "
                        "layer (fc: identity on that aux state; final norm: the base's) instead of random "
                        "weights; Llama-style bases, draft shaped like the base")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 2%% of the steps)")
    p.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine",
                   help="decay after warmup (default cosine)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr as a fraction of --lr (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the weight matrices (norm weights are not decayed; default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0; 0 = no clipping)")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (default 1000)")
    p.add_argument("--val-data", metavar="URL",
                   help="held-out dataset (collected like --data from other conversations): its loss and "
                        "accuracy per TTT step go to the log and metrics.jsonl every --val-every steps")
    p.add_argument("--val-every", type=int, metavar="N",
                   help="held-out evaluation every N steps (default: --save-every) and at the last step")
    p.add_argument("--on-corrupt", choices=("skip", "raise"), default="skip",
                   help="a damaged sample (CRC mismatch, wrong shapes): skip it and report it in the log and "
                        "corrupt_samples.jsonl (default; no sample is repeated or lost on resume), or raise "
                        "(stop, naming it)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints to keep (default 2; 0 = all)")
    p.add_argument("--log-every", type=int, default=10, help="print metrics every N steps (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and data order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="read the dataset in stored order")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype: bf16 autocast over fp32 weights, or fp32; auto = bf16 on GPUs and on "
                        "CPUs with native bf16 (AVX512-BF16, AMX), else fp32")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes per rank (default 0: read in the main process, which "
                        "already prefetches with threads)")
    p.add_argument("--no-plot", action="store_true", help="skip training_curves.png")
    p.add_argument("--ray-workers", type=int, help="run on a Ray cluster with this many Ray Train workers")
    p.add_argument("--ray-gpus", action=argparse.BooleanOptionalAction, default=None,
                   help="one GPU per Ray worker (default: if the cluster has GPUs and --device is not cpu)")
    # Same flag as every dataset command (draftdata.store.fs.add_storage_option_argument), spelled
    # out here so that building the parser does not import the store (and torch).
    p.add_argument("--storage-option", "-S", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option for the dataset URL, repeatable; dotted keys nest "
                        "(e.g. client_kwargs.endpoint_url=http://127.0.0.1:9000)")


def run(args: argparse.Namespace) -> int:
    from draftdata.config import ConfigError
    from draftdata.store.fs import parse_storage_options, refuse_relative_in_ray_upload
    from draftdata.train.trainer import TrainConfig, TrainInterrupted, train, train_with_ray

    refuse_relative_in_ray_upload("--output", str(args.output))
    eagle: dict = {}
    if args.eagle_config:
        from pathlib import Path

        from draftdata.config import EagleConfig

        EagleConfig.from_json_file(args.eagle_config)          # validates, names file and line
        eagle = json.loads(Path(args.eagle_config).read_text())
        if not isinstance(eagle, dict):
            raise ConfigError(f"{args.eagle_config}: expected a JSON object")
    cfg = TrainConfig(
        data=args.data, model=args.model, output=args.output, eagle_config=eagle, steps=args.steps,
        epochs=args.epochs, max_minutes=args.max_minutes, lr=args.lr, warmup_steps=args.warmup_steps,
        schedule=args.schedule, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, grad_accum=args.grad_accum,
        batch_tokens=args.batch_tokens, max_seq_len=args.max_seq_len, pad_to_multiple_of=args.pad_to_multiple_of,
        draft_vocab=args.draft_vocab, ttt_steps=args.ttt_steps, resume=args.resume, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, seed=args.seed,
        shuffle=not args.no_shuffle, device=args.device, dtype=args.dtype, num_workers=args.num_workers,
        storage_options=parse_storage_options(args.storage_option), plot=not args.no_plot,
        val_data=args.val_data, val_every=args.val_every, on_corrupt=args.on_corrupt,
        init_draft=args.init_draft, init_from_base=args.init_from_base,
    )
    try:
        if args.ray_workers:
            result = train_with_ray(cfg, args.ray_workers, use_gpu=args.ray_gpus)
            if getattr(result, "error", None):
                print(f"draftdata train: Ray Train failed: {result.error}", file=sys.stderr)
                return 1
            return 0
        train(cfg)
    except TrainInterrupted as e:   # Ctrl-C or SIGTERM (the CLI makes 130 a 143): which checkpoint --resume takes
        print(f"draftdata train: {e}", file=sys.stderr)
        return 130
    return 0
