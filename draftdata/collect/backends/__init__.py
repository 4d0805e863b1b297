"""Collect backends: run the base model and return per-sequence hidden states.

`hf` (transformers, CPU/CUDA) lives in hf.py; `trtllm` (TensorRT-LLM) in trtllm.py. Both are
imported only when chosen, so a missing optional dependency fails only the run that needs it.
"""

from __future__ import annotations

import os
from typing import Any

from draftdata.collect.backends.base import Backend, BaseModelInfo
from draftdata.errors import DraftdataError

BACKENDS = ("hf", "trtllm")


def get_backend(name: str, model_path: str | os.PathLike, **options: Any) -> Backend:
    """Build backend `name` for the HF model directory `model_path`; options go to its constructor."""
    if name == "hf":
        from draftdata.collect.backends.hf import HFBackend

        return HFBackend(model_path, **options)
    if name == "trtllm":
        from draftdata.collect.backends.trtllm import TrtllmBackend

        return TrtllmBackend(model_path, **options)
    raise DraftdataError(f"--backend {name!r}: expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "BaseModelInfo", "get_backend"]
