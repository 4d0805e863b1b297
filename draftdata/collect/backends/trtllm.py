"""TensorRT-LLM backend: hidden states from TensorRT-LLM's LLM API in SaveHiddenStates mode.

TensorRT-LLM captures EAGLE3 hidden states with `SaveHiddenStatesDecodingConfig`: each request
runs one context forward; the capture hooks copy the output of every requested decoder layer
(and the final post-norm state) into a buffer, and the rank-0 worker `torch.save`s a list of
record dicts to `<output_directory>/<file_prefix>_<n>.pt`. A record holds:

    id                  drafter's own 1-based counter (NOT the LLM request id)
    input_ids           int64 [L], the prompt tokens
    hidden_state        [L, H], the final state after the model's last norm
    aux_hidden_states   [L, k*H], captured layers in ascending layer order
                        (called `hidden_state_features` in earlier TensorRT-LLM versions)

This module drives that mechanism with a private dump directory, `write_interval=1` (one file
per request, so nothing waits for a later flush) and one generated token per request. Records
are matched to our requests by their token ids, never by file name or order, and every dump file
is deleted as soon as it has been read. docs/TRTLLM.md lists the TensorRT-LLM sources this
follows and what has (not) been run against a real TensorRT-LLM.

The parts that do not need tensorrt_llm (layer mapping, reading dump files, record -> tensors,
matching) are plain functions and `DumpCollector`, tested on CPU with dump files written in
TensorRT-LLM's layout.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from draftdata.collect.backends.base import Backend, BaseModelInfo
from draftdata.errors import DraftdataError

INSTALL_HINT = "pip install draftdata[trtllm]"
DUMP_PREFIX = "draftdata"
# Current record key first, then the name earlier TensorRT-LLM versions wrote.
AUX_KEYS = ("aux_hidden_states", "hidden_state_features")
FINAL_KEY = "hidden_state"
# LLM arguments this backend must own: the capture only works with one context request per forward,
# full prefill (no block reuse, no chunking) and no overlap scheduler (see docs/TRTLLM.md).
PROTECTED_LLM_ARGS = frozenset({
    "model", "speculative_config", "max_batch_size", "disable_overlap_scheduler", "cuda_graph_config",
    "enable_chunked_prefill", "kv_cache_config", "pipeline_parallel_size",
})
_DUMP_NAME = re.compile(r"^(?P<prefix>.+)_(?P<n>\d+)\.pt$")


class TrtllmNotInstalledError(DraftdataError):
    """`--backend trtllm` was asked for but tensorrt_llm cannot be imported."""


class TrtllmDumpError(DraftdataError):
    """A TensorRT-LLM dump file or record is missing, unreadable or has the wrong shape."""


# ---------------------------------------------------------------------------------------------
# Pure part: no tensorrt_llm needed.
# ---------------------------------------------------------------------------------------------

def trtllm_layers_to_capture(aux_layer_ids: Sequence[int], num_hidden_layers: int, *,
                             include_final: bool = True) -> set[int]:
    """Map our aux layer ids to TensorRT-LLM's `eagle3_layers_to_capture`.

    Both number layer k as "output of decoder layer k" (0-based, HF `hidden_states[k + 1]`):
    TensorRT-LLM's decoder layer k calls `maybe_capture_hidden_states(k, hidden, residual)` after its
    MLP and stores `hidden + residual`. So the map is the identity. TensorRT-LLM's id -1 is the final
    post-norm state; it is added (`include_final`) because versions that do not add it themselves
    leave the buffer slot that `hidden_state` is read from unwritten.
    """
    ids = [int(k) for k in aux_layer_ids]
    if not ids:
        raise DraftdataError("the TensorRT-LLM backend needs at least one aux layer id")
    if len(set(ids)) != len(ids):
        raise DraftdataError(f"aux layer ids {ids} contain duplicates")
    bad = [k for k in ids if not 0 <= k < num_hidden_layers]
    if bad:
        raise DraftdataError(f"aux layer ids {bad} are outside 0..{num_hidden_layers - 1} "
                             f"(the model has {num_hidden_layers} decoder layers)")
    return set(ids) | ({-1} if include_final else set())


def load_dump_file(path: str | Path) -> list[dict]:
    """Read one TensorRT-LLM dump file: a torch.save'd list of record dicts (tensors and ints only)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise TrtllmDumpError(f"{path}: expected a list of record dicts, found {type(obj).__name__}")
    return obj


def record_tensors(record: dict, *, num_aux: int, hidden_size: int, num_rows: int,
                   where: str = "record") -> tuple[torch.Tensor, torch.Tensor]:
    """One dump record -> (aux [num_rows, num_aux*H] bf16, final [num_rows, H] bf16), contiguous on CPU.

    Accepts `aux_hidden_states` or the older `hidden_state_features`. When TensorRT-LLM also stored
    the final state as the last aux slot (layer -1 requested explicitly), that slot must equal
    `hidden_state` and is dropped. The aux slots stay in TensorRT-LLM's order, ascending layer ids,
    which is also the order the Backend interface promises.
    """
    final = record.get(FINAL_KEY)
    aux_key = next((k for k in AUX_KEYS if k in record), None)
    if aux_key is None or not isinstance(final, torch.Tensor):
        raise TrtllmDumpError(f"{where}: needs {FINAL_KEY!r} and one of {list(AUX_KEYS)}; has keys {sorted(record)}")
    aux = record[aux_key]
    if not isinstance(aux, torch.Tensor) or aux.dim() != 2 or final.dim() != 2:
        raise TrtllmDumpError(f"{where}: {aux_key!r} and {FINAL_KEY!r} must be 2-D tensors")
    width = num_aux * hidden_size
    if aux.shape[1] == width + hidden_size and aux.shape[0] == final.shape[0]:
        if not torch.equal(aux[:, width:], final):
            raise TrtllmDumpError(f"{where}: the extra last slot of {aux_key!r} is not the final state "
                                  f"{FINAL_KEY!r}; this TensorRT-LLM orders its capture buffer differently")
        aux = aux[:, :width]
    if aux.shape[1] != width or final.shape[1] != hidden_size:
        raise TrtllmDumpError(
            f"{where}: {aux_key!r} is {tuple(aux.shape)} and {FINAL_KEY!r} is {tuple(final.shape)}; expected "
            f"[L, {width}] ({num_aux} layers x hidden {hidden_size}) and [L, {hidden_size}]")
    if aux.shape[0] < num_rows or final.shape[0] < num_rows:
        raise TrtllmDumpError(f"{where}: has {aux.shape[0]}/{final.shape[0]} rows for {num_rows} tokens")
    aux, final = aux[:num_rows], final[:num_rows]
    return aux.to(torch.bfloat16).contiguous(), final.to(torch.bfloat16).contiguous()


class RequestMatcher:
    """Matches dump records to outstanding requests by their prompt token ids, never by order.

    TensorRT-LLM's record `id` is its drafter's own counter, not the LLM request id, so the token ids
    are the only identity a record carries. Requests with identical tokens are interchangeable
    (same input, same hidden states). A record whose tokens are one longer than a request's (the
    generated token appended) also matches; its rows are cut to the prompt length.
    """

    def __init__(self) -> None:
        self._waiting: dict[tuple[int, ...], deque[int]] = {}
        self._pending: set[int] = set()

    def expect(self, request_id: int, token_ids: Sequence[int]) -> None:
        if request_id in self._pending:
            raise ValueError(f"request {request_id} is already pending")
        self._waiting.setdefault(tuple(int(t) for t in token_ids), deque()).append(request_id)
        self._pending.add(request_id)

    def match(self, token_ids: Sequence[int]) -> tuple[int, int] | None:
        """(request id, prompt length) of the request these record tokens belong to, or None."""
        key = tuple(int(t) for t in token_ids)
        for candidate in (key, key[:-1]):
            queue = self._waiting.get(candidate)
            if queue:
                request_id = queue.popleft()
                if not queue:
                    del self._waiting[candidate]
                self._pending.discard(request_id)
                return request_id, len(candidate)
        return None

    @property
    def pending(self) -> list[int]:
        return sorted(self._pending)


def dump_files(dump_dir: str | Path, prefix: str) -> list[Path]:
    """The dump files `<prefix>_<n>.pt` in `dump_dir`, in write order (n ascending)."""
    found = []
    for path in Path(dump_dir).iterdir():
        m = _DUMP_NAME.match(path.name)
        if m and m.group("prefix") == prefix:
            found.append((int(m.group("n")), path))
    return [p for _, p in sorted(found)]


class DumpCollector:
    """Turns TensorRT-LLM dump files in one directory into per-request tensors.

    Each file is deleted as soon as its records are converted, so no per-request file outlives the
    batch it belongs to. A file that cannot be read yet (TensorRT-LLM may still be writing it) is
    retried until `timeout_s` passes without progress.
    """

    def __init__(self, dump_dir: str | Path, prefix: str, aux_layer_ids: Sequence[int], hidden_size: int):
        self.dump_dir = Path(dump_dir)
        self.prefix = prefix
        self.num_aux = len(aux_layer_ids)
        self.hidden_size = int(hidden_size)
        self.discarded = 0

    def collect(self, batch: Sequence[Sequence[int]], *, timeout_s: float = 120.0,
                poll_s: float = 0.02) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Wait for the record of every sequence in `batch`; results come back in batch order."""
        matcher = RequestMatcher()
        for i, ids in enumerate(batch):
            matcher.expect(i, ids)
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(batch)
        unreadable: dict[Path, str] = {}
        last_progress = time.monotonic()
        while matcher.pending:
            progressed = False
            for path in dump_files(self.dump_dir, self.prefix):
                try:
                    records = load_dump_file(path)
                except TrtllmDumpError:
                    raise
                except Exception as e:  # typically a file TensorRT-LLM has not finished writing
                    unreadable[path] = f"{type(e).__name__}: {e}"
                    continue
                unreadable.pop(path, None)
                for j, record in enumerate(records):
                    self._take(record, matcher, results, where=f"{path.name} record {j}")
                path.unlink()
                progressed = True
            if progressed:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > timeout_s:
                detail = "; ".join(f"{p.name}: {msg}" for p, msg in unreadable.items()) or "no dump file appeared"
                raise TrtllmDumpError(
                    f"TensorRT-LLM wrote no record for {len(matcher.pending)} of {len(batch)} sequences "
                    f"(batch positions {matcher.pending[:10]}) within {timeout_s:.0f} s in {self.dump_dir} ({detail})")
            else:
                time.sleep(poll_s)
        return results  # type: ignore[return-value]

    def _take(self, record: dict, matcher: RequestMatcher, results: list, *, where: str) -> None:
        ids = record.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise TrtllmDumpError(f"{where}: has no 'input_ids' tensor (keys {sorted(record)})")
        hit = matcher.match(ids.reshape(-1).tolist())
        if hit is None:
            self.discarded += 1
            print(f"draftdata: TensorRT-LLM record {where} (id {record.get('id')}, {ids.numel()} tokens) "
                  "matches no request of this batch; discarded", file=sys.stderr)
            return
        request_id, num_rows = hit
        results[request_id] = record_tensors(
            record, num_aux=self.num_aux, hidden_size=self.hidden_size, num_rows=num_rows, where=where)

    def discard_all(self) -> int:
        """Delete every dump file present (e.g. records of warm-up requests); returns how many."""
        paths = dump_files(self.dump_dir, self.prefix)
        for path in paths:
            path.unlink(missing_ok=True)
        return len(paths)


# ---------------------------------------------------------------------------------------------
# The backend: needs tensorrt_llm (and a GPU) at run time.
# ---------------------------------------------------------------------------------------------

def trtllm_compute_dtype(model_dir: str | Path, llm_kwargs: dict | None = None) -> str | None:
    """The dtype TensorRT-LLM computes in, for the commit records' `producer`: the `dtype` given in
    `llm_kwargs`, else (TensorRT-LLM's "auto") the checkpoint's own `torch_dtype` / `dtype` from
    config.json; None when neither says. Named as the HF backend names them (bf16, fp16, fp32), so
    a resume that switches backends compares like with like."""
    import json

    short = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    wanted = (llm_kwargs or {}).get("dtype")
    if wanted is None or str(wanted) == "auto":
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text())
        except (OSError, ValueError):
            return None
        text = config.get("text_config") or config
        wanted = text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or config.get("dtype")
    if not wanted:
        return None
    name = str(wanted).removeprefix("torch.")
    return short.get(name, name)


def import_tensorrt_llm() -> Any:
    """Import tensorrt_llm or stop with the one-line install hint."""
    try:
        import tensorrt_llm
    except ImportError as e:
        raise TrtllmNotInstalledError(
            f"--backend trtllm needs TensorRT-LLM, which is not installed ({e}); run: {INSTALL_HINT} "
            "(NVIDIA GPU + CUDA required)") from None
    except Exception as e:  # installed but broken, e.g. no CUDA driver on this machine
        raise TrtllmNotInstalledError(
            f"tensorrt_llm is installed but failed to import ({type(e).__name__}: {e}); "
            f"it needs an NVIDIA GPU with CUDA; reinstall with: {INSTALL_HINT}") from None
    return tensorrt_llm


class TrtllmBackend(Backend):
    """Collect backend on TensorRT-LLM's LLM API (PyTorch flow) with SaveHiddenStates capture.

    Construction takes only picklable arguments, so the Ray job can build it inside an actor that
    holds `tensor_parallel_size` GPUs. The LLM itself starts on the first `forward` (the aux layers
    are fixed for its lifetime), or at construction when `aux_layer_ids` is given.
    """

    def __init__(self, model_path: str | Path, *, tensor_parallel_size: int = 1,
                 moe_expert_parallel_size: int | None = None, moe_tensor_parallel_size: int | None = None,
                 moe_cluster_parallel_size: int | None = None, max_seq_len: int | None = None,
                 max_num_tokens: int | None = None, free_gpu_memory_fraction: float = 0.85,
                 aux_layer_ids: Sequence[int] | None = None, dump_dir: str | Path | None = None,
                 dump_timeout_s: float = 120.0, model_id: str | None = None, revision: str | None = None,
                 llm_kwargs: dict | None = None):
        self._trtllm = import_tensorrt_llm()
        self.model_path = Path(model_path)
        info = BaseModelInfo.from_model_dir(self.model_path, final_hidden_prenorm=False)
        if model_id is not None or revision is not None:
            info = dataclasses.replace(info, model_id=model_id or info.model_id, revision=revision or info.revision)
        self.info = info
        blocked = sorted(PROTECTED_LLM_ARGS & set(llm_kwargs or {}))
        if blocked:
            raise DraftdataError(f"llm_kwargs may not set {blocked}: the TensorRT-LLM backend owns them "
                                 "(hidden-state capture needs them fixed, see docs/TRTLLM.md)")
        self.tensor_parallel_size = int(tensor_parallel_size)
        self._parallel = {"tensor_parallel_size": self.tensor_parallel_size,
                          "moe_expert_parallel_size": moe_expert_parallel_size,
                          "moe_tensor_parallel_size": moe_tensor_parallel_size,
                          "moe_cluster_parallel_size": moe_cluster_parallel_size}
        self._max_seq_len = max_seq_len
        self._max_num_tokens = max_num_tokens
        self._free_gpu_memory_fraction = free_gpu_memory_fraction
        self._dump_parent = str(dump_dir) if dump_dir is not None else None
        self._dump_timeout_s = float(dump_timeout_s)
        self._llm_kwargs = dict(llm_kwargs or {})
        self.dtype = trtllm_compute_dtype(self.model_path, self._llm_kwargs)  # both recorded in `producer`
        self.device = torch.device("cuda")
        self._llm = None
        self._dump_dir: Path | None = None
        self._collector: DumpCollector | None = None
        self._aux_layer_ids: list[int] | None = None
        if aux_layer_ids is not None:
            self._start(aux_layer_ids)

    def _start(self, aux_layer_ids: Sequence[int]) -> None:
        """Build the LLM with SaveHiddenStates capture of `aux_layer_ids` into a fresh dump directory."""
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig
        try:
            from tensorrt_llm.llmapi import SaveHiddenStatesDecodingConfig
        except ImportError:
            raise TrtllmNotInstalledError(
                f"tensorrt_llm {getattr(self._trtllm, '__version__', '?')} has no SaveHiddenStatesDecodingConfig; "
                f"install a newer one: {INSTALL_HINT}") from None

        # The earliest versions keep the final post-norm state in a separate buffer behind this flag
        # (without it `hidden_state` is the last captured layer); later ones capture it as layer -1.
        first_version = "save_last_layer_post_norm" in getattr(SaveHiddenStatesDecodingConfig, "model_fields", {})
        layers = trtllm_layers_to_capture(aux_layer_ids, self.info.num_hidden_layers, include_final=not first_version)
        self._aux_layer_ids = sorted(int(k) for k in aux_layer_ids)
        self._dump_dir = Path(tempfile.mkdtemp(prefix="draftdata-trtllm-", dir=self._dump_parent))
        spec_args: dict[str, Any] = {"output_directory": str(self._dump_dir), "write_interval": 1,
                                     "file_prefix": DUMP_PREFIX, "eagle3_layers_to_capture": layers}
        if first_version:
            spec_args["save_last_layer_post_norm"] = True
        args: dict[str, Any] = {
            **self._llm_kwargs,
            "model": str(self.model_path),
            "speculative_config": SaveHiddenStatesDecodingConfig(**spec_args),
            "kv_cache_config": KvCacheConfig(enable_block_reuse=False,
                                             free_gpu_memory_fraction=self._free_gpu_memory_fraction),
            "max_batch_size": 1,
            "disable_overlap_scheduler": True,
            "cuda_graph_config": None,
            "enable_chunked_prefill": False,
            **{k: v for k, v in self._parallel.items() if v is not None},
        }
        if self._max_seq_len is not None:
            # The prompt plus the one generated token; with one request per forward no forward holds more.
            args["max_seq_len"] = args["max_num_tokens"] = int(self._max_seq_len) + 1
        elif self._max_num_tokens is not None:
            args["max_num_tokens"] = int(self._max_num_tokens)
        self._llm = LLM(**args)
        self._collector = DumpCollector(self._dump_dir, DUMP_PREFIX, self._aux_layer_ids, self.info.hidden_size)
        stale = self._collector.discard_all()
        if stale:
            print(f"draftdata: discarded {stale} TensorRT-LLM dump file(s) written during engine warm-up",
                  file=sys.stderr)

    def _sampling_params(self) -> Any:
        from tensorrt_llm import SamplingParams
        try:
            return SamplingParams(max_tokens=1, detokenize=False)
        except TypeError:  # versions without `detokenize`
            return SamplingParams(max_tokens=1)

    def forward(self, batch: list[list[int]], aux_layer_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each sequence: (aux [L, k*H] bf16 cpu, slots in ascending layer order; final post-norm [L, H])."""
        if self._llm is None:
            self._start(aux_layer_ids)
        elif sorted(int(k) for k in aux_layer_ids) != self._aux_layer_ids:
            raise DraftdataError(f"aux layers {list(aux_layer_ids)} differ from {self._aux_layer_ids}, which this "
                                 "TensorRT-LLM engine was started with; use one backend per layer set")
        for i, ids in enumerate(batch):
            if not ids:
                raise DraftdataError(f"batch position {i}: empty token sequence")
        if not batch:
            return []
        params = self._sampling_params()
        requests = [self._llm.generate_async([int(t) for t in ids], sampling_params=params) for ids in batch]
        for request in requests:
            request.result()  # raises if TensorRT-LLM rejected the request
        return self._collector.collect(batch, timeout_s=self._dump_timeout_s)

    def close(self) -> None:
        """Shut the engine down and remove the dump directory (idempotent)."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
        if self._dump_dir is not None:
            shutil.rmtree(self._dump_dir, ignore_errors=True)
            self._dump_dir = None
