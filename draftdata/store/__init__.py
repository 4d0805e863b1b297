"""The on-disk dataset format: create, write, open and read datasets (see docs/FORMAT.md)."""

from draftdata.store.dataset import (
    Dataset,
    DatasetWriter,
    PartInfo,
    PartWriter,
    create_dataset,
    open_dataset,
)

__all__ = ["Dataset", "DatasetWriter", "PartInfo", "PartWriter", "create_dataset", "open_dataset"]
