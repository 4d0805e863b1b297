"""draftdata: offline hidden-state data for training EAGLE3 / EAGLE 3.1 draft models."""

__version__ = "0.1.0"
