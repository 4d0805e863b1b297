"""Train, export and evaluate EAGLE3 / EAGLE 3.1 drafts from a hidden-state dataset.

model.py (the draft + base tensors), losses.py (TTT unroll and loss), vocab.py (d2t / t2d),
trainer.py (the loop: DDP, Ray Train, checkpoints). Modules are imported on use; this package
import stays light.
"""
