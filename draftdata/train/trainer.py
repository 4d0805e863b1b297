"""The draft training loop (eagle_offline=True), written as one readable recipe.

    train(TrainConfig) -> TrainResult

1. set up: device, torch.distributed (torchrun or Ray Train), seeds
2. data: HiddenStateDataset with a token budget per micro-batch, split over ranks
3. model: the draft + frozen target head (only embed / lm_head / final norm of the base)
4. optimizer AdamW, scheduler warmup + cosine/linear/constant decay
5. resume: draft weights, optimizer, scheduler, RNG and loader cursor from the last checkpoint
6. loop: gradient-accumulation micro-batches -> TTT loss -> backward -> clip -> step;
   metrics to stdout + metrics.jsonl (+ TensorBoard); checkpoint every `save_every` steps;
   with `val_data`, the same loss and accuracy over a held-out dataset every `val_every` steps
7. end: final/ checkpoint and training_curves.png

Every input is checked (step 1-3) before the output directory is first written. Ctrl-C in a
single process stops at the end of the current step with a checkpoint there (StopOnInterrupt).

Output directory:
    train_config.json                 the run's settings (checked on --resume)
    metrics.jsonl                     one JSON object per optimizer step (val_* keys on held-out steps)
    corrupt_samples.jsonl             damaged samples that were skipped (only when there were any)
    checkpoints/step-XXXXXXXX/        draft.safetensors, draft_config.json, trainer_state.pt
    final/                            draft.safetensors, draft_config.json (what export reads)
    training_curves.png               loss and per-TTT-step accuracy

Loss normalization: each TTT step's cross-entropy is summed over every loss position of the
optimizer step (all micro-batches, all ranks) and divided by that global count, so token-budget
batches of different sizes weigh every token equally. For a single batch this is exactly
ModelOpt's per-batch loss.

Damaged samples (CRC mismatch, wrong shapes) are skipped and reported (--on-corrupt skip, the
default): the loader yields a batch whose samples were all damaged as an empty batch, which the
trainer runs as a zero-weight stand-in (DDP ranks still all-reduce), so every rank takes exactly
the planned batches, the checkpoint's batch cursor stays exact and resume neither repeats nor
loses a sample. `--on-corrupt raise` stops at the first one instead, naming it.

Epochs: ranks can hold different numbers of batches; each epoch runs min over ranks of
(batches // grad_accum) optimizer steps so no rank waits on another, dropping the remainder
(fewer than world_size * grad_accum batches per epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from draftdata.config import EagleConfig
from draftdata.errors import (
    TERMINATED,
    DatasetNotFoundError,
    DraftdataError,
    MissingPartsError,
    name_some,
    raise_terminated,
    reclaim_sigterm,
)
from draftdata.locks import DirectoryLock

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
CORRUPT = "corrupt_samples.jsonl"
TRAIN_CONFIG = "train_config.json"
TRAIN_LOCK = ".train.lock"                 # locked (lockf) by the run training into the directory
TRAINER_STATE = "trainer_state.pt"
PLOT = "training_curves.png"

# Settings that must not change across --resume, or the resumed run is not the same run.
RESUME_FIXED = ("data", "model", "eagle_config", "draft_vocab", "batch_tokens", "max_seq_len", "grad_accum",
                "seed", "shuffle", "num_workers", "world_size", "pad_to_multiple_of")
# Settings that may name a local path: recorded and compared as absolute real paths.
PATH_SETTINGS = ("data", "model", "draft_vocab", "val_data", "init_draft")
# What marks a directory as a model (weights next to config.json), which --output must not write into.
MODEL_WEIGHTS = ("*.safetensors", "*.bin", "*.gguf", "*.index.json")


@dataclass
class TrainConfig:
    """Settings of one training run (the CLI flags of `draftdata train`)."""

    data: str
    model: str
    output: str
    eagle_config: dict[str, Any] = field(default_factory=dict)   # EagleConfig overrides
    steps: int | None = None
    epochs: int | None = None
    max_minutes: float | None = None         # stop (checkpoint + final draft) after this much wall clock
    lr: float = 1e-4
    warmup_steps: int | None = None          # None: 2% of the steps
    schedule: str = "cosine"                 # cosine | linear | constant
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0                # 0: no clipping (the norm is still logged), as in HF Trainer
    grad_accum: int = 1
    batch_tokens: int = 8192
    max_seq_len: int | None = None           # None: batch_tokens
    pad_to_multiple_of: int | None = None    # round each batch's padded length up (fewer distinct shapes)
    draft_vocab: str | None = None
    ttt_steps: int | None = None             # overrides eagle_ttt_steps
    resume: bool = False
    save_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    shuffle: bool = True
    device: str = "auto"
    dtype: str = "auto"                      # bf16 (autocast, fp32 weights) | fp32 | auto: models.compute_dtype
    num_workers: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)
    plot: bool = True
    progress: bool = True
    val_data: str | None = None              # held-out dataset: loss/accuracy every val_every steps
    val_every: int | None = None             # None: every save_every steps (and at the last step)
    on_corrupt: str = "skip"                 # skip (and report) damaged samples | raise
    init_draft: str | None = None            # start from this draft's weights (warm start; not a resume)
    init_from_base: bool = False             # start the draft layer as the base's layer after the top aux layer

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of == 1:  # rounding to 1 is no rounding: the same run as before the flag existed
            self.pad_to_multiple_of = None

    def eagle(self) -> EagleConfig:
        cfg = dict(self.eagle_config)
        if self.ttt_steps is not None:
            cfg["eagle_ttt_steps"] = self.ttt_steps
        return EagleConfig.from_dict(cfg, source="--eagle-config")

    def validate(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise DraftdataError("give exactly one of --steps and --epochs")
        for name in ("steps", "epochs", "grad_accum", "batch_tokens", "save_every", "log_every", "max_seq_len",
                     "val_every", "ttt_steps", "pad_to_multiple_of"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise DraftdataError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise DraftdataError(f"--dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.on_corrupt not in ("skip", "raise"):
            raise DraftdataError(f"--on-corrupt must be skip or raise, got {self.on_corrupt!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise DraftdataError(f"--schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise DraftdataError(f"--max-minutes must be positive, got {self.max_minutes}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DraftdataError(f"--lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm", "num_workers", "keep_checkpoints", "warmup_steps"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):   # NaN fails `v >= 0`
                raise DraftdataError(f"--{name.replace('_', '-')} must be a number >= 0, got {v}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise DraftdataError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.init_draft is not None and self.init_from_base:
            raise DraftdataError("give at most one of --init-draft and --init-from-base")
        if self.pad_to_multiple_of and self.pad_to_multiple_of > self.batch_tokens:
            raise DraftdataError(f"--batch-tokens {self.batch_tokens} is below --pad-to-multiple-of "
                                 f"{self.pad_to_multiple_of}: no batch would fit its budget")
        if self.val_every is not None and self.val_data is None:
            raise DraftdataError("--val-every needs --val-data (a held-out dataset collected like --data)")
        self.eagle()


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_checkpoint: Path
    losses: list[float]                      # total loss of every step run by this process
    draft: Any = None                        # the trained Eagle3Draft (this rank's copy)


# ---------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False                 # we called init_process_group (so we destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_spec: str) -> tuple[Dist, torch.device]:
    """Join torch.distributed when launched by torchrun (or already joined under Ray Train)."""
    joined = dist.is_available() and dist.is_initialized()
    if device_spec != "auto":
        from draftdata.models import check_device

        world = dist.get_world_size() if joined else int(os.environ.get("WORLD_SIZE", "1"))
        if check_device(device_spec).index is not None and world > 1:
            raise DraftdataError(f"--device {device_spec} puts every rank on the same GPU; with torchrun or "
                                 "Ray Train pass --device cuda (each rank takes its local rank's GPU)")
    info = Dist()
    if joined:
        info = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = torch.cuda.is_available() and device_spec != "cpu"
        # Other ranks wait in a barrier while rank 0 saves checkpoints and the final draft, which on
        # a slow shared file system can take longer than the default 10-minute collective timeout.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
        info = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)
    if device_spec == "auto":
        device = torch.device(f"cuda:{_visible_cuda_index(info)}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_spec)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{_visible_cuda_index(info)}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return info, device


def _visible_cuda_index(info: Dist) -> int:
    # Under Ray Train (or a launcher that gives each process its own GPUs) a worker may see only
    # its own GPU, so local rank N uses cuda:N mod count; under torchrun every process sees all of
    # the node's GPUs, and more processes than GPUs would put two ranks on one GPU (NCCL fails).
    count = torch.cuda.device_count()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if os.environ.get("TORCHELASTIC_RUN_ID") and per_node > count:
        raise DraftdataError(f"{per_node} processes per node but only {count} GPU(s) are visible: start at most "
                             f"{count} (torchrun --nproc-per-node), or pass --device cpu")
    return info.local_rank % max(1, count)


def param_groups(draft: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on the matrices only, none on the norm weights (the
    1-D tensors), as HF Trainer (ModelOpt's recipe) and most LLM recipes do. One group when off."""
    params = draft.trainable_parameters()
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float):
    """LR multiplier of step s: linear warmup from 0, then cosine / linear decay to min_ratio."""

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * decay

    return f


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": random.getstate()}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB


def _all_reduce(t: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(t)
    return t


def stand_in_batch(schema: Any, ttt_steps: int) -> dict[str, Any]:
    """One row of zeros with no loss position: trained on in place of an all-damaged batch, it
    adds nothing to the loss or the gradients but takes part in DDP's gradient all-reduce."""
    t, h = ttt_steps + 2, schema.hidden_size
    return {"input_ids": torch.zeros((1, t), dtype=torch.int64), "attention_mask": torch.ones((1, t), dtype=torch.int64),
            "loss_mask": torch.zeros((1, t), dtype=torch.float32),
            "hidden_states": torch.zeros((1, t, h), dtype=torch.bfloat16),
            "aux_hidden_states": torch.zeros((1, t, h * schema.num_aux_slots), dtype=torch.bfloat16),
            "lengths": torch.tensor([t]), "conversation_id": [""]}


def _say(msg: str, stream: Any = None) -> None:
    """One line to stderr (or `stream`), written to the stream itself rather than with `print`: Ray
    Train replaces `print` in its workers with one that logs the line and, when Ray has redirected
    the stream (it has, in a worker), prints it as well, so every line reached the driver twice."""
    stream = stream or sys.stderr
    stream.write(msg + "\n")
    stream.flush()


def _log(msg: str, info: Dist) -> None:
    if info.main:
        _say(msg)


def over_budget(lengths: np.ndarray, max_seq_len: int, cfg: TrainConfig, flag: str) -> str | None:
    """A warning line when a sample (cut to max_seq_len, padded) is longer than --batch-tokens: it
    forms an over-budget batch of its own (the loader's own warning names its arguments, not flags)."""
    pad = cfg.pad_to_multiple_of or 1
    longest = min(int(np.asarray(lengths).max()), max_seq_len)
    padded = -(-longest // pad) * pad
    if padded <= cfg.batch_tokens:
        return None
    return (f"warning: {flag}: samples of up to {longest} tokens"
            + (f" ({padded} padded to a multiple of {pad})" if padded != longest else "")
            + f" exceed --batch-tokens {cfg.batch_tokens}: each forms a batch of its own, over the budget; "
            f"set --max-seq-len at most {cfg.batch_tokens // pad * pad} to cut them")


def describe_truncation(lengths: np.ndarray, max_seq_len: int, default: str | None) -> str | None:
    """One line saying how many samples are longer than max_seq_len (the loader keeps their first
    max_seq_len tokens) and what share of all tokens that cuts; None when no sample is. `default`:
    what --max-seq-len defaulted to (None: it was given)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    long = lengths > max_seq_len
    if not long.any():
        return None
    cut = int((lengths[long] - max_seq_len).sum()) / int(lengths.sum())
    flag = f"--max-seq-len {max_seq_len}" + (f" (default: {default})" if default else "")
    return (f"{int(long.sum())} of {len(lengths)} samples are longer than {flag} and are cut to their first "
            f"{max_seq_len} tokens: {cut:.1%} of the tokens are left out")


def normalize_location(value: str | None) -> str | None:
    """A local path as its absolute real path, so `base`, `./base` and `/abs/base` (or the same
    path given from another directory) record and compare as one; URLs (`://`), hub ids and
    `smollm2`, which name no local file, stay as given."""
    from draftdata.store.fs import is_local, local_path

    if value is None or not is_local(value) or value.lower() == "smollm2":
        return value
    path = local_path(value)  # file:// and local:// spell local paths too
    return os.path.realpath(path) if os.path.exists(path) else value


def check_output_dir(output: Path) -> None:
    """Refuse an --output that is a file, or a model's directory (config.json and weights, no
    train_config.json): checkpoints and train_config.json would be written into the model."""
    if output.exists() and not output.is_dir():
        raise DraftdataError(f"--output {output} is a file; training writes a directory there (choose another path)")
    if (output / "dataset.json").is_file() or (output / "commits").is_dir():
        raise DraftdataError(f"--output {output}: holds a dataset (dataset.json); training would write its "
                             "checkpoints and logs into it; choose another --output (a new or empty directory)")
    run = output.parent.parent if output.parent.name == CHECKPOINTS else output.parent
    if output.name in (FINAL, CHECKPOINTS) or output.parent.name == CHECKPOINTS:
        if (run / TRAIN_CONFIG).is_file():  # a run's final/ or checkpoint: `export RUN` would take the old weights
            raise DraftdataError(f"--output {output}: is part of the training run {run}; train into a new "
                                 f"directory (or continue that run with --output {run} --resume)")
    if not output.is_dir() or (output / TRAIN_CONFIG).exists() or not (output / "config.json").is_file():
        return
    weights = sorted(p.name for pattern in MODEL_WEIGHTS for p in output.glob(pattern))
    if weights:
        raise DraftdataError(f"--output {output}: holds a model (config.json, {name_some(weights)}), not a train "
                             "run; training would write its checkpoints into it; choose another --output (a new "
                             "or empty directory)")


def make_output_dir(output: Path) -> None:
    """Create the output directory; one that cannot be created is one line."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DraftdataError(f"--output {output}: cannot write there ({e.strerror or e}); choose a writable "
                             "directory") from None


def write_run_config(output: Path, settings: dict[str, Any]) -> None:
    """Create the output directory and write train_config.json atomically (on --resume under DDP
    the other ranks read it at the same time); a directory that cannot be written is one line."""
    make_output_dir(output)
    try:
        tmp = output / f".{TRAIN_CONFIG}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, output / TRAIN_CONFIG)
    except OSError as e:
        raise DraftdataError(f"--output {output}: cannot write there ({e.strerror or e}); choose a writable "
                             "directory") from None


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C ended `train`; the message says which checkpoint is kept for --resume."""


class StopOnInterrupt:
    """Once installed, the first Ctrl-C (SIGINT), or SIGTERM (a scheduler's preemption), only
    asks the loop to stop at the end of the current step, so that it saves a checkpoint there; a
    second one interrupts at once.

    Only where that is safe: one process (under torchrun the launcher signals the ranks again and
    kills them soon after), in the main thread (Ray Train runs `train` in another), and when the
    signal would otherwise raise KeyboardInterrupt (SIGINT's default; SIGTERM under the CLI), not
    when the launcher ignores or handles it."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self.enabled = enabled
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        for sig, raising in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, raise_terminated)):
            if signal.getsignal(sig) is raising:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if signum == signal.SIGTERM:
            TERMINATED.set()
        self.remove()  # a second signal raises at once
        # os.write, not print: the main thread may be inside a write to stderr (a reentrant
        # buffered write raises RuntimeError and would kill the run this handler is saving)
        what = b"SIGTERM" if signum == signal.SIGTERM else b"Ctrl-C"
        os.write(2, what + b": stopping at the end of this step with a checkpoint (" + what +
                 b" again stops at once, without one)\n")

    def remove(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _leave_stops_to_main(worker_id: int) -> None:
    """DataLoader worker init: a terminal's Ctrl-C, and a scheduler's SIGTERM to the process
    group, reach the workers too; leave them to the main process, which stops at a step boundary
    and then shuts the workers down (a worker killed mid-step made torch raise in the main
    process; a worker outliving its main process exits on its own)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:08d}"


def complete_checkpoints(output: str | Path) -> list[Path]:
    """The complete checkpoints under output/checkpoints (trainer_state.pt written), oldest first."""
    root = Path(output) / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).exists() and not p.name.endswith(".tmp"))


def latest_checkpoint(output: str | Path) -> Path | None:
    """The newest complete checkpoint under output/checkpoints (complete = trainer_state.pt exists)."""
    done = complete_checkpoints(output)
    return done[-1] if done else None


def load_newest_checkpoint(output: Path, info: Dist) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    """(directory, trainer state, draft weights on the CPU) of the newest checkpoint that reads
    back whole; a damaged newer one (a crash of the machine mid-write, a full disk) is named and
    passed over. None when there is no checkpoint; an error when every one is damaged."""
    from safetensors.torch import load_file

    root = Path(output) / CHECKPOINTS
    damaged = []
    for ckpt in reversed(complete_checkpoints(output)):
        try:
            state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
            weights = load_file(str(ckpt / "draft.safetensors"))
        except Exception as e:  # noqa: BLE001 - any read failure means the checkpoint is unusable
            damaged.append(f"{ckpt.name} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})")
            if info.main:  # out of the step-* names: it must not count as a newest checkpoint, or be kept over good ones
                with contextlib.suppress(OSError):
                    ckpt.rename(ckpt.with_name("damaged-" + ckpt.name))
            continue
        if damaged:
            _log(f"resume: passing over damaged checkpoint(s) {'; '.join(damaged)} (renamed damaged-step-*; "
                 f"delete them once looked at); resuming from {ckpt}", info)
        return ckpt, state, weights
    if damaged:
        raise DraftdataError(f"every checkpoint in {root} is damaged: {'; '.join(damaged)} (renamed damaged-step-*); "
                             "the run cannot continue: train again (another --output, or this one without --resume "
                             "once the damaged-step-* directories are looked at and removed)")
    return None


def _fsync_dir_files(path: Path) -> None:
    """Flush a checkpoint's files and directory to the disk before it is renamed into place, so a
    crash of the machine cannot leave a complete-looking checkpoint with empty files."""
    for p in [*path.iterdir(), path]:  # the files, then the directory that lists them
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cannot_write(path: Path, error: BaseException, then: str) -> DraftdataError:
    """One line for a failed write (a full disk, a quota, an I/O error: safetensors and torch.save
    raise their own types, torch's without the cause), with the free space where it failed."""
    detail = error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())[:200]
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"; {shutil.disk_usage(where).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = ""
    return DraftdataError(f"cannot write {path} ({type(error).__name__}: {detail}{free}); {then}")


def save_checkpoint(output: Path, step: int, draft, state: dict[str, Any], rng_states: list[Any],
                    keep: int) -> Path:
    """Write a checkpoint into a temporary dir and rename it into place (rank 0 only)."""
    from draftdata.train.model import save_draft

    final = _checkpoint_dir(output, step)
    tmp = final.with_name(final.name + ".tmp")
    for partial in final.parent.glob("step-*.tmp"):  # this one, and any a kill cut short (one run per output)
        shutil.rmtree(partial, ignore_errors=True)
    try:
        save_draft(tmp, draft)
        torch.save({**state, "rng": rng_states}, tmp / TRAINER_STATE)
        _fsync_dir_files(tmp)
    except Exception as e:  # noqa: BLE001 - whatever the writer raised; the loop's state is fine
        shutil.rmtree(tmp, ignore_errors=True)
        raise cannot_write(final, e, "the checkpoints before it are intact: free space (or fix the output "
                           "directory) and rerun with --resume") from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    old = sorted(p for p in (output / CHECKPOINTS).glob("step-*") if not p.name.endswith(".tmp"))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def vocab_digest(vocab: Any) -> str | None:
    """SHA-256 of a draft vocabulary's d2t table (a loaded DraftVocab, or None): the vocabulary
    itself, not its file's bytes, whose metadata differs between two builds of one vocabulary."""
    if vocab is None:
        return None
    import hashlib

    return hashlib.sha256(vocab.d2t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _differences(name: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """(dotted name, a's value, b's value) where two settings differ, nested dicts key by key (the
    EagleConfig: one changed field, not both 50-key dicts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)
                for d in _differences(f"{name}.{k}", a.get(k), b.get(k))]
    return [(name, a, b)] if a != b else []


def _check_resume_config(saved: dict[str, Any], now: dict[str, Any], path: Path) -> list[str]:
    # Paths recorded by an older draftdata may be relative: read them from here, as best we can.
    saved = {**saved, **{k: normalize_location(saved[k]) for k in PATH_SETTINGS if k in saved}}
    if saved.get("pad_to_multiple_of") == 1:  # an API run recorded 1 before TrainConfig mapped it to None
        saved["pad_to_multiple_of"] = None
    if isinstance(saved.get("eagle_config"), dict):  # with the defaults of fields added since it was saved
        try:
            saved["eagle_config"] = EagleConfig.from_dict(saved["eagle_config"]).to_dict()
        except DraftdataError:
            pass  # compared as it is: the difference is listed below
    diffs = [f"{name}: checkpoint run had {then!r}, now {new!r}" for k in RESUME_FIXED if saved.get(k) != now.get(k)
             for name, then, new in _differences(k, saved.get(k), now.get(k))]
    if saved.get("draft_vocab_d2t_sha256") and now.get("draft_vocab_d2t_sha256") \
            and saved["draft_vocab_d2t_sha256"] != now["draft_vocab_d2t_sha256"]:  # None: no --draft-vocab now
        diffs.append(f"draft_vocab: the vocabulary in {now.get('draft_vocab')} changed since the checkpoint (d2t sha256 "
                     f"{str(saved['draft_vocab_d2t_sha256'])[:12]}... then, {str(now.get('draft_vocab_d2t_sha256'))[:12]}... "
                     "now); the draft's d2t came from the old one")
    if "weight_decay" in saved and bool(saved["weight_decay"]) != bool(now.get("weight_decay")):
        diffs.append(f"weight_decay: checkpoint run had {saved['weight_decay']!r}, now {now.get('weight_decay')!r} "
                     "(turning weight decay on or off changes the optimizer's parameter groups; another "
                     "non-zero value is fine)")
    if diffs:
        raise DraftdataError(f"cannot --resume from {path}: settings differ from the interrupted run ("
                             + "; ".join(diffs) + "); use the same settings or a new --output")
    return [k for k in now if k not in RESUME_FIXED and k != "draft_vocab_d2t_sha256" and saved.get(k) != now.get(k)]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def _step_of(line: str) -> float:
    """The step of a metrics/corrupt-samples line; inf for a blank or torn one (a write cut short by
    a crash or a full disk can only come after the last checkpoint, so it is dropped)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed), written by rank 0."""

    def __init__(self, output: Path, enabled: bool, resume_step: int):
        self.path = output / METRICS
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.corrupt_path = output / CORRUPT
        for path in (self.path, self.corrupt_path):
            if path.exists():
                # A killed run may have logged steps after its last checkpoint: drop them (no duplicates).
                keep = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")   # renamed over: a kill keeps one whole file
                tmp.write_text("".join(line + "\n" for line in keep))
                os.replace(tmp, path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise cannot_write(self.path, e, "the last checkpoint is intact: free space and rerun with "
                               "--resume") from None
        if self.tb is not None:
            step = record["step"]
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self.tb.add_scalar(f"train/{key}", record[key], step)
            for k, (loss, acc) in enumerate(zip(record["step_loss"], record["step_acc"])):
                self.tb.add_scalar(f"train/loss_ttt{k}", loss, step)
                self.tb.add_scalar(f"train/acc_ttt{k}", acc, step)
            if "val_loss" in record:
                self.tb.add_scalar("val/loss", record["val_loss"], step)
                for k, (loss, acc) in enumerate(zip(record["val_step_loss"], record["val_step_acc"])):
                    self.tb.add_scalar(f"val/loss_ttt{k}", loss, step)
                    self.tb.add_scalar(f"val/acc_ttt{k}", acc, step)

    def write_corrupt(self, step: int, epoch: int, per_rank: list[list[str]]) -> None:
        """Append the damaged samples skipped in one step (one line each, with the reader's reason)."""
        if not self.enabled:
            return
        with self.corrupt_path.open("a") as f:
            for rank, reasons in enumerate(per_rank):
                for reason in reasons:
                    f.write(json.dumps({"step": step, "epoch": epoch, "rank": rank, "reason": reason}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# Dataset fields a held-out dataset must share with the training data (same base, same layers).
VAL_MATCH = ("base_model_hash", "tokenizer_hash", "hidden_size", "aux_layer_ids", "num_hidden_layers", "vocab_size",
             "final_hidden_prenorm", "layer_id_convention")


def check_val_schema(train_schema: Any, val_schema: Any, train_url: str, val_url: str) -> None:
    """Refuse a held-out dataset captured from another base model or other layers."""
    from draftdata.models import same_model_hash

    for name in VAL_MATCH:
        mine, theirs = getattr(train_schema, name), getattr(val_schema, name)
        if name == "base_model_hash" and same_model_hash(mine, theirs) is None:
            continue  # one is missing, or written by an older draftdata that hashed less
        if mine is not None and theirs is not None and mine != theirs:
            raise DraftdataError(f"--val-data {val_url}: its {name} is {theirs!r}, the training data's ({train_url}) "
                                 f"is {mine!r}; collect the held-out conversations with the same --model and "
                                 "--aux-layers")


def validation_metrics(module: Any, dataset: Any, *, device: torch.device, info: Dist,
                       autocast: Any) -> dict[str, Any]:
    """Loss and top-1 accuracy per TTT step over all of a held-out dataset (each rank its share,
    summed over ranks) for an `EagleTTT` module, in the training loss's own terms, without
    gradients or hidden-state mixing."""
    from draftdata.train.losses import ttt_loss

    draft, ttt_steps, decay = module.draft, module.ttt_steps, module.decay
    loss_sum = torch.zeros(ttt_steps, device=device)
    correct = torch.zeros(ttt_steps, device=device)
    count = torch.zeros(ttt_steps, device=device)
    skipped = torch.zeros((), device=device)        # damaged held-out samples the loader left out
    was_training = draft.training
    draft.eval()
    # fork_rng: the DataLoader draws a seed from the global generator; the run must not notice us
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            for batch in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0):
                skipped += len(batch.get("skipped", ()))
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                with autocast:
                    out = ttt_loss(draft, module.head, batch, ttt_steps=ttt_steps, decay=decay,
                                   self_logit_distillation=module.self_logit_distillation)
                loss_sum += out.loss_sum.float()
                correct += out.correct.float()
                count += out.count.float()
    finally:
        draft.train(was_training)
    for t in (loss_sum, correct, count, skipped):
        _all_reduce(t, info)
    step_loss = per_position(loss_sum, count)
    # As the training loss: a TTT step without positions adds nothing; no position at all is NaN.
    val_loss = float(sum(decay ** k * step_loss[k] for k in range(ttt_steps) if count[k] > 0)) if count[0] > 0 \
        else math.nan
    return {"val_loss": val_loss,
            "val_step_loss": step_loss.tolist(), "val_step_acc": per_position(correct, count).tolist(),
            "val_tokens": int(count[0].item()), "val_skipped_samples": int(skipped.item())}


def per_position(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count per TTT step, NaN where a step had no position (0 would read as a result)."""
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def plot_metrics(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """PNG of the total loss and the per-TTT-step loss and accuracy against the optimizer step
    (held-out values, when the run had --val-data, as dashed lines with markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (ax_total, ax_loss, ax_acc) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_total.plot(steps, [r["loss"] for r in rows], color="black")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax_total.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", color="tab:red",
                      label="held-out (--val-data)")
        ax_total.legend()
    for k in range(len(rows[0]["step_loss"])):
        line, = ax_loss.plot(steps, [r["step_loss"][k] for r in rows], label=f"TTT step {k}")
        ax_acc.plot(steps, [r["step_acc"][k] for r in rows], label=f"TTT step {k}", color=line.get_color())
        if val:
            ax_loss.plot([r["step"] for r in val], [r["val_step_loss"][k] for r in val], "o--",
                         color=line.get_color(), label=f"held-out, step {k}")
            ax_acc.plot([r["step"] for r in val], [r["val_step_acc"][k] for r in val], "o--",
                        color=line.get_color(), label=f"held-out, step {k}")
    ax_total.set(xlabel="optimizer step", ylabel="loss", title="training loss (sum of decay^k x step loss)")
    ax_loss.set(xlabel="optimizer step", ylabel="soft cross-entropy", title="loss per TTT step")
    ax_acc.set(xlabel="optimizer step", ylabel="top-1 agreement with the base", title="accuracy per TTT step",
               ylim=(0, 1))
    for ax in (ax_total, ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_loss.legend()
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, stop_check: Callable[[], bool] | None = None) -> TrainResult:
    """Train a draft as described in the module docstring; returns where the result is.

    Every input (settings, output directory, dataset, base model, draft vocabulary) is checked
    before the output directory is written, so a mistake leaves nothing behind."""
    with warnings.catch_warnings():  # the loader's warnings: logged per step here instead, or said in
        warnings.filterwarnings("ignore", message="skipping part ", category=UserWarning)  # the CLI's terms
        warnings.filterwarnings("ignore", message=".* exceed max_tokens_per_batch=", category=UserWarning)
        return _train(cfg, stop_check)


def _train(cfg: TrainConfig, stop_check: Callable[[], bool] | None = None) -> TrainResult:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from draftdata.loaders import HiddenStateDataset, rank0_part_ids
    from draftdata.models import compute_dtype, model_hash, resolve_model
    from draftdata.train.losses import EagleTTT, step_token_counts
    from draftdata.train.model import build_draft, check_base_model, count_parameters, save_draft
    from draftdata.train.vocab import load_draft_vocab
    from draftdata.train.warm_start import apply_init_draft, read_base_layer_init, read_init_draft

    cfg.validate()
    eagle = cfg.eagle()
    info, device = setup_distributed(cfg.device)
    output = Path(cfg.output)
    stop_request = StopOnInterrupt(info.world_size == 1)
    lock: DirectoryLock | None = None
    try:
        # -- 1. run settings and resume point ---------------------------------------------------
        # By default a sample is cut to the budget (rounded down to the padding multiple, so that a
        # padded sample still fits it); longer ones would form over-budget batches of their own.
        max_seq_len = cfg.max_seq_len or cfg.batch_tokens // (cfg.pad_to_multiple_of or 1) * (cfg.pad_to_multiple_of or 1)
        if cfg.resume and cfg.max_seq_len is None and (output / TRAIN_CONFIG).is_file():
            try:  # a run an earlier draftdata started, whose default was --batch-tokens unrounded: keep it
                saved = json.loads((output / TRAIN_CONFIG).read_text())
            except (OSError, ValueError):
                saved = {}
            if isinstance(saved, dict) and saved.get("max_seq_len") == saved.get("batch_tokens") == cfg.batch_tokens:
                max_seq_len = cfg.batch_tokens
        run_settings = {**dataclasses.asdict(cfg), "world_size": info.world_size,
                        "eagle_config": eagle.to_dict(), "max_seq_len": max_seq_len}
        for k in ("resume", "progress", "plot", "device", "output", "storage_options"):  # no secrets on disk
            run_settings.pop(k)
        run_settings.update({k: normalize_location(run_settings[k]) for k in PATH_SETTINGS})
        draft_vocab = load_draft_vocab(cfg.draft_vocab) if cfg.draft_vocab is not None else None
        run_settings["draft_vocab_d2t_sha256"] = vocab_digest(draft_vocab)  # --resume: the same vocabulary, not only path
        check_output_dir(output)
        if not cfg.resume and latest_checkpoint(output) is not None:
            raise DraftdataError(f"{output} already holds checkpoints; pass --resume to continue that run, "
                                 "or choose another --output")
        if info.main:  # a second run on this output (a --resume while it trains) stops here
            lock = DirectoryLock(str(output), TRAIN_LOCK, "train", "training into it",
                                 "two runs would log each step twice and overwrite each other's checkpoints")
        # (the weights are dropped, `del resume_weights`, once loaded into the draft)
        ckpt, resume_state, resume_weights = load_newest_checkpoint(output, info) or (None, None, None)
        if ckpt is not None and (output / TRAIN_CONFIG).exists():
            saved = json.loads((output / TRAIN_CONFIG).read_text())
            changed = _check_resume_config(saved, json.loads(json.dumps(run_settings)), ckpt)
            if changed:
                _log(f"resume: settings changed since the checkpoint: {changed}", info)
        elif ckpt is not None:
            _log(f"resume: {output / TRAIN_CONFIG} is missing; cannot check the settings match", info)
        elif cfg.resume:
            _log(f"resume: no checkpoint in {output / CHECKPOINTS}; starting from scratch", info)

        # -- 2. data -----------------------------------------------------------------------------
        # The run trains on one snapshot of the committed parts (collection may still be adding
        # some): every rank uses rank 0's, and --resume the checkpoint's, so the plan and the
        # checkpoint's batch cursor keep meaning the same batches.
        def open_data(parts: list[str] | None) -> HiddenStateDataset:
            return HiddenStateDataset(
                cfg.data, shuffle=cfg.shuffle, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                max_seq_len=max_seq_len, storage_options=cfg.storage_options or None,
                max_tokens_per_batch=cfg.batch_tokens, pin_memory=False, on_corrupt=cfg.on_corrupt,
                empty_batches=cfg.on_corrupt == "skip", parts=parts, pad_to_multiple_of=cfg.pad_to_multiple_of)

        snapshot = resume_state.get("part_ids") if resume_state else None
        try:
            dataset = open_data(snapshot)
        except DatasetNotFoundError as e:  # which of the run's datasets
            raise DatasetNotFoundError(f"--data {e}") from None
        except MissingPartsError as e:
            raise DraftdataError(f"--resume: {ckpt} trains on a snapshot of {len(snapshot)} parts of {cfg.data}, and "
                                 f"some are gone from it ({e}): the dataset was replaced or parts were removed since "
                                 "the run started. Restore them, or train a new run (another --output)") from None
        if snapshot is None and info.world_size > 1:  # (rank and world size are given: the loader cannot)
            agreed = rank0_part_ids(dataset.part_ids)
            if agreed != dataset.part_ids:
                dataset = open_data(agreed)
        if snapshot is not None and dataset.parts_left_out:
            _log(f"resume: {dataset.parts_left_out} part(s) committed to {cfg.data} since the run started are not "
                 "used (the run keeps its snapshot of the data); train a new run to include them", info)
        schema = dataset.schema
        default = None if cfg.max_seq_len is not None else "--batch-tokens" if max_seq_len == cfg.batch_tokens \
            else "--batch-tokens rounded down to --pad-to-multiple-of"
        lengths = dataset.store.sample_lengths()
        truncation = describe_truncation(lengths, max_seq_len, default)
        if truncation:
            _log(truncation, info)
        over = over_budget(lengths, max_seq_len, cfg, "--data")
        if over:
            _log(over, info)
        val_dataset = None
        if cfg.val_data is not None:
            try:
                val_dataset = HiddenStateDataset(
                    cfg.val_data, shuffle=False, rank=info.rank, world_size=info.world_size,
                    max_seq_len=max_seq_len, storage_options=cfg.storage_options or None,
                    max_tokens_per_batch=cfg.batch_tokens, pin_memory=False, on_corrupt=cfg.on_corrupt,
                    pad_to_multiple_of=cfg.pad_to_multiple_of)
            except DatasetNotFoundError as e:
                raise DatasetNotFoundError(f"--val-data {e}") from None
            over = over_budget(val_dataset.store.sample_lengths(), max_seq_len, cfg, "--val-data")
            if over:
                _log(over, info)
            check_val_schema(schema, val_dataset.schema, cfg.data, cfg.val_data)
            held_out = {c for p in val_dataset.store.parts for c in p.conversation_ids}
            shared = sum(c in held_out for p in dataset.store.parts for c in p.conversation_ids)
            if shared:
                _log(f"warning: {shared} of the {len(held_out)} held-out conversations in {cfg.val_data} are also "
                     f"in --data {cfg.data} (by conversation id): the held-out figures measure them as training "
                     "data; collect the held-out set from other conversations", info)
        val_every = cfg.val_every or cfg.save_every

        def steps_in_epoch(epoch: int) -> int:
            return min(dataset.items_per_rank(epoch)) // cfg.grad_accum

        if cfg.steps is not None:
            total_steps = cfg.steps
        else:
            total_steps = sum(steps_in_epoch(e) for e in range(cfg.epochs))
        if total_steps < 1 or steps_in_epoch(0) < 1:
            raise DraftdataError(f"{cfg.data}: {dataset.num_samples} samples make fewer than grad_accum="
                                 f"{cfg.grad_accum} batches of {cfg.batch_tokens} tokens per rank "
                                 f"({info.world_size} ranks); lower --batch-tokens or --grad-accum")

        # -- 3. model ----------------------------------------------------------------------------
        # Config, draft vocabulary and weight headers first: only then is the output written.
        base_dir = resolve_model(cfg.model)
        draft_cfg = check_base_model(base_dir, eagle, schema, draft_vocab)
        counted_with = draft_vocab.metadata.get("tokenizer_hash") if draft_vocab is not None else None
        if counted_with and schema.tokenizer_hash and counted_with != schema.tokenizer_hash:
            # The hash also covers the chat template, so this may be the same tokenizer under another template.
            _log(f"warning: --draft-vocab {cfg.draft_vocab} was counted on "
                 f"{draft_vocab.metadata.get('dataset', 'a dataset')}, collected with another tokenizer or chat "
                 f"template than {cfg.data} (tokenizer_hash {counted_with[:19]}... vs {schema.tokenizer_hash[:19]}...). "
                 "If the tokenizers differ, its ids name other tokens and the draft learns the wrong vocabulary: "
                 "build one from this dataset with `draftdata vocab`", info)
        init_tensors, init_notes = None, []
        if cfg.init_draft is not None and ckpt is None:   # a resumed run's weights come from its checkpoint
            init_tensors, init_notes = read_init_draft(cfg.init_draft, draft_cfg,
                                                       draft_vocab.d2t if draft_vocab is not None else None)
            init_notes = [f"draft initialized from {cfg.init_draft}", *init_notes]
        elif cfg.init_from_base and ckpt is None:
            init_tensors, note = read_base_layer_init(base_dir, draft_cfg)
            init_notes = [note]
        torch.manual_seed(cfg.seed)                      # identical initial draft on every rank
        if schema.base_model_hash and model_hash(base_dir, like=schema.base_model_hash) != schema.base_model_hash:
            _log(f"warning: --model {cfg.model} is not the model {cfg.data} was collected with (the dataset says "
                 f"{schema.base_model_id!r}; config or weight files differ): the draft would learn that model's "
                 "hidden states against this model's head. Train with the collecting model.", info)
        compute = compute_dtype(cfg.dtype, device)
        frozen_dtype = torch.bfloat16 if compute == "bf16" else torch.float32
        draft, head = build_draft(base_dir, eagle, schema, draft_vocab, frozen_dtype, device)
        if init_tensors is not None:
            apply_init_draft(draft, init_tensors)
            _log("; ".join(init_notes), info)
        module = EagleTTT(draft, head, ttt_steps=eagle.eagle_ttt_steps, decay=eagle.eagle_loss_decay_factor,
                          mix_hidden_states=eagle.eagle_mix_hidden_states,
                          self_logit_distillation=eagle.eagle_self_logit_distillation)
        # Buffers (d2t, t2d, RoPE frequencies) are the same on every rank and never change: no
        # per-step sync (torch 2.13 renamed the switch; it syncs them once at init, which is harmless).
        buffer_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
        model = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                    **buffer_sync) if info.world_size > 1 else module
        n = count_parameters(draft)
        _log(f"draft: {n['trainable'] / 1e6:.1f}M trainable parameters ({n['saved'] / 1e6:.1f}M saved), "
             f"draft vocab {draft.config.draft_vocab_size}/{draft.config.vocab_size}, aux layers "
             f"{draft.config.aux_layer_ids}, rope_theta {draft.config.rope_theta:g}, {info.world_size} rank(s) "
             f"on {device} ({compute}); {total_steps} steps", info)

        # -- 4. optimizer and schedule -----------------------------------------------------------
        params = draft.trainable_parameters()
        optimizer = torch.optim.AdamW(param_groups(draft, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.02 * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(warmup, total_steps, cfg.schedule, cfg.min_lr_ratio))

        # -- 5. resume ---------------------------------------------------------------------------
        step, epoch, consumed, tokens_seen, elapsed_before, corrupt_seen = 0, 0, 0, 0, 0.0, 0
        loss_tokens_seen: int | None = 0
        if ckpt is not None:
            state = resume_state
            missing, unexpected = draft.load_state_dict(resume_weights, strict=False)
            del resume_weights
            if [k for k in missing if not k.startswith("embed_tokens.")] or unexpected:
                raise DraftdataError(f"{ckpt}: checkpoint does not match the draft (missing {missing}, "
                                     f"unexpected {unexpected})")
            try:
                optimizer.load_state_dict(state["optimizer"])
            except ValueError as e:   # e.g. saved by a draftdata whose decay groups differed
                raise DraftdataError(f"{ckpt}: the optimizer state does not fit this run's parameter groups "
                                     f"({e}); resume with the version that wrote it, or start a new --output") from None
            scheduler.load_state_dict(state["scheduler"])
            # The checkpoint's groups hold its lr, betas and weight decay: this run's settings apply
            # (--lr, --steps, --schedule, --warmup-steps, betas, a non-zero --weight-decay may change
            # on resume; unchanged, every value below equals the loaded one, so resuming stays exact).
            scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
            for g, wanted, f in zip(optimizer.param_groups, param_groups(draft, cfg.weight_decay), scheduler.lr_lambdas):
                g.update(initial_lr=cfg.lr, lr=cfg.lr * f(scheduler.last_epoch), betas=tuple(cfg.betas),
                         weight_decay=wanted["weight_decay"])
            step, epoch, consumed = state["step"], state["epoch"], state["items_consumed"]
            tokens_seen, elapsed_before = state["tokens_seen"], state["elapsed_s"]
            corrupt_seen = state.get("corrupt_samples", 0)
            loss_tokens_seen = state.get("loss_tokens_seen")      # None: written by an older draftdata
            _set_rng_state(state["rng"][info.rank], device)
            _log(f"resumed from {ckpt} at step {step} (epoch {epoch}, {consumed} batches into it)", info)
            if step > total_steps:  # a shorter --steps (or --epochs) than the run already trained
                _log(f"resume: {ckpt} is at step {step}, past this run's last step ({total_steps}): nothing is left "
                     "to train, and the final draft is that checkpoint's weights; to train fewer steps, train into a "
                     "new --output", info)
            elif step == total_steps:  # the run ended (a kill during the final save, or a rerun)
                _log(f"resume: {ckpt} is the run's last step ({step}): nothing is left to train; the final draft is "
                     "written from it", info)
        else:
            torch.manual_seed(cfg.seed + info.rank)     # per-rank stream (mix_hidden_states, dropout)

        if info.main:    # every input checked and the checkpoint loaded: only now is the output written
            make_output_dir(output)
            lock.take()  # before anything is written: a second run must not overwrite train_config.json
            write_run_config(output, run_settings)
            if ckpt is not None and step < total_steps and (output / FINAL).is_dir():
                # An earlier end of this run (--max-minutes, a shorter --steps): `export RUN` prefers
                # final/, so a resumed run killed later would export those older weights.
                shutil.rmtree(output / FINAL)

        # -- 6. loop -----------------------------------------------------------------------------
        metrics = MetricsLog(output, info.main, step)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if compute == "bf16"
                    else contextlib.nullcontext())
        nvtx = eagle.eagle_enable_nvtx and device.type == "cuda"
        losses: list[float] = []
        started = time.perf_counter()
        from tqdm import tqdm

        # On a terminal only: in a log file the metric lines (every --log-every steps) are the progress.
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
                   disable=None if cfg.progress and info.main else True, file=sys.stderr)

        def trained_on_nothing(when: str) -> DraftdataError:
            reasons = [f"{corrupt_seen} damaged sample(s) were skipped (run `draftdata verify {cfg.data}`)"] \
                if corrupt_seen else []
            if truncation:
                reasons.append(f"{truncation}, which can leave no assistant token to learn from; raise "
                               "--max-seq-len or --batch-tokens")
            why = "; ".join(reasons) or "no batch had a loss position (is the loss mask empty?)"
            return DraftdataError(f"{cfg.data}: {when} trained on nothing: {why}; no draft was written")

        out_of_time = interrupted = False
        kept: Path | None = None                        # the newest checkpoint this process saved

        def diverged(at: int, norm: float) -> DraftdataError:
            last = kept or latest_checkpoint(output)
            return DraftdataError(
                f"step {at}: the gradient norm is {norm} (the loss diverged), so the run stops before the weights "
                f"take it. Lower --lr (now {cfg.lr:g}) or set --max-grad-norm; "
                + (f"the last checkpoint, {last}, is intact (rerun with --resume and the new settings)" if last
                   else "no checkpoint was saved yet"))
        stop_request.install()
        while step < total_steps and not out_of_time and not interrupted:
            dataset.set_epoch(epoch)
            if consumed:
                dataset.load_state_dict({"epoch": epoch, "items_consumed": consumed, "num_workers": cfg.num_workers})
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                                                 pin_memory=device.type == "cuda",
                                                 worker_init_fn=_leave_stops_to_main if cfg.num_workers else None)
            # The iterator draws a seed from the global RNG: keep that draw out of the run's own stream
            # (hidden-state mixing), which a resumed run restores from the checkpoint before this point.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                batches = iter(loader)
            epoch_steps = steps_in_epoch(epoch)
            while step < total_steps and consumed // cfg.grad_accum < epoch_steps:
                t0 = time.perf_counter()
                try:
                    raw = [next(batches) for _ in range(cfg.grad_accum)]
                except StopIteration:
                    raise DraftdataError(f"{cfg.data}: the loader ended epoch {epoch} after {consumed} batches, "
                                         f"before the {epoch_steps * cfg.grad_accum} its plan promised (did "
                                         "the dataset change while training?)") from None
                skipped = [reason for b in raw for reason in b.get("skipped", ())]
                real_tokens = sum(int(b["lengths"].sum()) for b in raw)
                batch_slots = sum(int(b["input_ids"].numel()) for b in raw)   # padding included
                # A batch whose samples were all damaged arrives empty: run a stand-in without loss
                # positions instead, so that this rank's backward still joins DDP's all-reduce.
                raw = [b if b["input_ids"].shape[0] else stand_in_batch(schema, module.ttt_steps) for b in raw]
                micro = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
                         for b in raw]
                counts = _all_reduce(sum(step_token_counts(b, module.ttt_steps, module.draft_id_table())
                                         for b in micro).to(device), info)
                loss_sum = torch.zeros(module.ttt_steps, device=device)
                correct = torch.zeros(module.ttt_steps, device=device)
                total = torch.zeros((), device=device)
                for i, batch in enumerate(micro):
                    sync = model.no_sync() if info.world_size > 1 and i < len(micro) - 1 \
                        else contextlib.nullcontext()
                    with sync:
                        if nvtx:
                            torch.cuda.nvtx.range_push("eagle_forward")
                        with autocast:
                            out = model(batch, counts)
                        if nvtx:
                            torch.cuda.nvtx.range_pop()
                        # DDP averages gradients over ranks; the loss is already over the global count.
                        (out.loss * info.world_size).backward()
                    loss_sum += out.loss_sum
                    correct += out.correct
                    total += out.loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
                if not math.isfinite(float(grad_norm)):        # the same on every rank (reduced gradients)
                    raise diverged(step + 1, float(grad_norm))
                if counts[0] == 0:  # no loss position on any rank (all damaged): the step counts, the weights stay
                    optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]            # the rate this step uses (log it, not the next)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                consumed += cfg.grad_accum

                tokens, slots, n_skipped = _all_reduce(torch.tensor(
                    [float(real_tokens), float(batch_slots), float(len(skipped))], device=device), info).tolist()
                n_skipped = int(n_skipped)
                _all_reduce(loss_sum, info)
                _all_reduce(correct, info)
                _all_reduce(total, info)
                dt = time.perf_counter() - t0
                tokens_seen += int(tokens)
                loss_tokens = int(counts[0].item())
                if loss_tokens_seen is not None:
                    loss_tokens_seen += loss_tokens
                record = {
                    "step": step, "epoch": epoch, "loss": total.item(),
                    "step_loss": per_position(loss_sum, counts).tolist(),
                    "step_acc": per_position(correct, counts).tolist(),
                    "lr": lr, "grad_norm": float(grad_norm), "tokens": int(tokens),
                    "loss_tokens": loss_tokens, "tokens_per_s": tokens / max(dt, 1e-9),
                    "tokens_seen": tokens_seen, "skipped_samples": n_skipped,
                    "padding_efficiency": tokens / slots if slots else float("nan"),  # nan: no batch
                    "elapsed_s": elapsed_before + time.perf_counter() - started,
                    "peak_mem_gb": _peak_memory_gb(device),
                }
                if not eagle.eagle_report_acc:
                    record["step_acc"] = [float("nan")] * module.ttt_steps
                if cfg.max_minutes is not None:  # every rank stops at the same step (rank 0's clock decides)
                    late = float(info.main and time.perf_counter() - started >= cfg.max_minutes * 60)
                    out_of_time = bool(_all_reduce(torch.tensor(late, device=device), info).item())
                if val_dataset is not None and (step % val_every == 0 or step == total_steps or out_of_time):
                    record.update(validation_metrics(module, val_dataset, device=device, info=info,
                                                     autocast=autocast))
                if n_skipped:
                    corrupt_seen += n_skipped
                    per_rank = [skipped]
                    if info.world_size > 1:
                        per_rank = [None] * info.world_size
                        dist.all_gather_object(per_rank, skipped)
                    metrics.write_corrupt(step, epoch, per_rank)
                    _log(f"step {step}: skipped {n_skipped} damaged sample(s) ({corrupt_seen} so far, listed in "
                         f"{output / CORRUPT}); `draftdata verify {cfg.data}` lists every damaged part", info)
                losses.append(record["loss"])
                metrics.write(record)
                bar.update(1)
                if loss_tokens_seen == 0 and step >= min(10, total_steps):  # say so now, not after the last step
                    raise trained_on_nothing(f"the first {step} of {total_steps} steps")
                if info.main and (step % cfg.log_every == 0 or step == 1 or step == total_steps):
                    accs = " ".join(f"{a:.3f}" for a in record["step_acc"])
                    _say(f"step {step}/{total_steps} epoch {epoch} loss {record['loss']:.4f} acc [{accs}] "
                         f"lr {record['lr']:.2e} gnorm {record['grad_norm']:.3f} "
                         f"{record['tokens_per_s']:.0f} tok/s mem {record['peak_mem_gb']:.2f} GiB", sys.stdout)
                if info.main and "val_loss" in record:
                    accs = " ".join(f"{a:.3f}" for a in record["val_step_acc"])
                    _say(f"val step {step}: loss {record['val_loss']:.4f} acc [{accs}] over "
                         f"{record['val_tokens']:,} held-out tokens", sys.stdout)
                    if record["val_skipped_samples"]:
                        _say(f"val step {step}: {record['val_skipped_samples']} damaged held-out sample(s) left out; "
                             f"`draftdata verify {cfg.val_data}` lists the damaged parts")
                requested = stop_request.requested
                if stop_check is not None:  # a stop asked from outside (the Ray driver): every rank agrees
                    asked = float(info.main and stop_check())
                    requested = requested or bool(_all_reduce(torch.tensor(asked, device=device), info).item())
                interrupted = requested and step < total_steps
                if step % cfg.save_every == 0 or step == total_steps or out_of_time or interrupted:
                    end_of_epoch = consumed // cfg.grad_accum >= epoch_steps
                    state = {"step": step, "epoch": epoch + 1 if end_of_epoch else epoch,
                             "items_consumed": 0 if end_of_epoch else consumed,
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "tokens_seen": tokens_seen, "corrupt_samples": corrupt_seen,
                             "loss_tokens_seen": loss_tokens_seen,
                             "part_ids": dataset.part_ids,
                             "elapsed_s": elapsed_before + time.perf_counter() - started}
                    rng = [None] * info.world_size
                    if info.world_size > 1:
                        dist.all_gather_object(rng, _rng_state(device))
                    else:
                        rng = [_rng_state(device)]
                    if info.main:
                        path = save_checkpoint(output, step, draft, state, rng, cfg.keep_checkpoints)
                        bar.write(f"saved checkpoint {path}", file=sys.stderr)
                        kept = path
                    if info.world_size > 1:
                        dist.barrier()
                if out_of_time:
                    _log(f"--max-minutes {cfg.max_minutes:g} reached at step {step}/{total_steps}; checkpoint "
                         "saved (--resume continues the same run)", info)
                    break
                if interrupted:
                    break
            del batches, loader
            if consumed // cfg.grad_accum >= epoch_steps:
                epoch, consumed = epoch + 1, 0
        stop_request.remove()
        bar.close()
        metrics.close()
        if interrupted:
            raise TrainInterrupted(f"interrupted at step {step}/{total_steps}: kept checkpoint {kept}; "
                                   "the same command with --resume continues from it")

        # -- 7. final artifacts ------------------------------------------------------------------
        if loss_tokens_seen == 0 and not out_of_time:  # (a --max-minutes stop may resume into real batches)
            raise trained_on_nothing(f"{step} steps")
        final = output / FINAL
        if info.main:
            try:
                save_draft(final, draft)
            except Exception as e:  # noqa: BLE001 - see cannot_write
                last = kept or latest_checkpoint(output)
                raise cannot_write(final, e, f"the last checkpoint{f' ({last})' if last else ''} holds these weights: "
                                   "free space and rerun with --resume, or export that checkpoint") from None
            if cfg.plot and (output / METRICS).exists():
                png = plot_metrics(output / METRICS, output / PLOT)
                if png:
                    _say(f"wrote {png}")
            _say(f"final draft: {final} ({step} steps)")
            if corrupt_seen:
                _say(f"skipped {corrupt_seen} damaged sample(s) in all, listed in {output / CORRUPT}")
        if info.world_size > 1:
            dist.barrier()
        return TrainResult(output=output, steps=step, final_checkpoint=final, losses=losses, draft=draft)
    except KeyboardInterrupt as e:
        if isinstance(e, TrainInterrupted) or not info.main:
            raise
        newest = latest_checkpoint(output) if output.is_dir() else None
        if newest is None:
            raise TrainInterrupted("interrupted before a checkpoint was saved; nothing to resume") from None
        raise TrainInterrupted(f"interrupted; kept checkpoint {newest}: the same command with --resume continues "
                               "from it") from None
    finally:
        stop_request.remove()
        if lock is not None:
            lock.release()
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Ray Train
# ---------------------------------------------------------------------------------------------

STOP_POLL_S = 1.0  # how often rank 0 asks the driver's stop flag (an actor call) under Ray Train


def _stop_flag_class() -> Any:
    """A Ray actor the driver sets on Ctrl-C or SIGTERM and rank 0 reads between steps: Ray Train
    workers never see the driver's signals (Ray Train's own Ctrl-C handler aborted them mid-step,
    and every step since the last checkpoint was lost)."""
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        def __init__(self) -> None:
            self.stop, self.outcome = False, None

        def set(self) -> None:
            self.stop = True

        def is_set(self) -> bool:
            return self.stop

        def stopped(self, message: str) -> None:  # rank 0: where the run stopped (the kept checkpoint)
            self.outcome = message

        def message(self) -> str | None:
            return self.outcome

    return StopFlag


def ray_train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer: the same `train`, one per worker.

    Ray has already joined the workers into a torch.distributed group; `train` uses it. A stop
    the driver asks for ends the run at the end of a step with a checkpoint, as Ctrl-C does in
    one process.
    """
    import ray

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in config.items() if k in fields})
    flag, last = config.get("_stop_flag"), [0.0, False]

    def stop_check() -> bool:
        if flag is not None and not last[1] and time.monotonic() - last[0] >= STOP_POLL_S:
            last[0], last[1] = time.monotonic(), bool(ray.get(flag.is_set.remote()))
        return last[1]

    import ray.train

    try:
        result = train(cfg, stop_check=stop_check if flag is not None else None)
        metrics = {"steps": result.steps, "final_loss": result.losses[-1] if result.losses else None}
    except TrainInterrupted as e:  # every rank stopped at the same step; rank 0 saved the checkpoint
        metrics = {"interrupted": str(e)}
        if flag is not None and ray.train.get_context().get_world_rank() == 0:
            ray.get(flag.stopped.remote(str(e)))
    try:
        ray.train.report(metrics)
    except Exception:  # noqa: BLE001 - reporting is best effort (older/newer Ray Train APIs)
        pass


def train_with_ray(cfg: TrainConfig, num_workers: int, *, use_gpu: bool | None = None,
                   storage_path: str | None = None) -> Any:
    """Run `train` on `num_workers` Ray Train workers (joins the Ray cluster `ray.init` finds)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg.validate()
    # Ray Train workers run in a session directory of their own: hand them absolute local paths.
    cfg = dataclasses.replace(cfg, output=str(Path(cfg.output).resolve()), **{
        name: normalize_location(value) for name in PATH_SETTINGS if (value := getattr(cfg, name))})
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
        reclaim_sigterm()
    if use_gpu is None:  # --device cpu on a GPU cluster: CPU workers (an NCCL group cannot serve them)
        use_gpu = cfg.device != "cpu" and bool(ray.cluster_resources().get("GPU", 0))
    elif use_gpu and cfg.device == "cpu":
        raise DraftdataError("--ray-gpus with --device cpu: Ray Train would give the workers GPUs and an NCCL "
                             "group that CPU tensors cannot use; drop one of the two")
    storage = storage_path or str(Path(cfg.output) / "ray")             # cfg.output is absolute now
    flag = _stop_flag_class().remote()
    trainer = TorchTrainer(
        ray_train_loop, train_loop_config={**dataclasses.asdict(cfg), "_stop_flag": flag},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name="draftdata-train", storage_path=storage),
    )
    # fit() runs in a thread of its own, so Ray Train installs no Ctrl-C handler (it aborted the
    # workers mid-step); here Ctrl-C or SIGTERM sets the flag, and the workers stop at the end of
    # their step with a checkpoint. A second one stops the driver at once.
    outcome: dict[str, Any] = {}
    done = threading.Event()  # (not Thread.join: a KeyboardInterrupt inside join can mark the thread ended)

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised in the main thread below
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=fit, name="ray-train-fit", daemon=True).start()
    stopping = False
    while not done.is_set():
        try:
            done.wait(0.5)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated) under the CLI
            if stopping:
                raise TrainInterrupted("interrupted again: stopped at once; --resume continues from the newest "
                                       f"checkpoint in {Path(cfg.output) / CHECKPOINTS}") from None
            stopping = True
            ray.get(flag.set.remote())
            _say("stopping: the workers finish their step and save a checkpoint (Ctrl-C again stops at once)")
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    message = ray.get(flag.message.remote())  # rank 0's, when the workers stopped early
    if message:
        raise TrainInterrupted(message)
    if stopping and getattr(result, "error", None):  # the stop came before the workers ran their loop
        newest = latest_checkpoint(Path(cfg.output))
        raise TrainInterrupted(f"interrupted; kept checkpoint {newest}: the same command with --resume continues "
                               "from it" if newest else "interrupted before a checkpoint was saved; nothing to resume")
    return result
