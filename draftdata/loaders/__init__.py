"""Streaming and random-access loaders for hidden-state datasets (see docs/LOADER.md).

`HiddenStateDataset`: IterableDataset, exactly-once per epoch over ranks x DataLoader workers,
deterministic shuffle, exact resume, batching by size or token budget.
`HiddenStateMapDataset`: `len` + `[i]`, for HF Trainer and DistributedSampler.
`draftdata.loaders.modelopt`: the same data in NVIDIA ModelOpt's offline EAGLE layout.
"""

from draftdata.loaders.collate import collate_samples, padding_efficiency
from draftdata.loaders.dataset import HiddenStateDataset, HiddenStateMapDataset, rank0_part_ids

__all__ = ["HiddenStateDataset", "HiddenStateMapDataset", "collate_samples", "padding_efficiency", "rank0_part_ids"]
