"""Continuous batching for local generation (`draftdata synthesize` with transformers).

A `RunningBatch` decodes up to --batch-size rows with one KV cache. A row that finishes leaves
the batch at once, and new prompts join the running batch: they are prefilled together, then
their cache is merged into the running one, left-padded to a common length. So the batch stays
full while answers of very different lengths finish, instead of draining to its longest answer
(static batching kept about 55% of the decode slots busy on Run 3's answers, bench/synth).

Each row keeps its own positions, padding mask and sampling generator, and padded columns get
no attention weight, so a row's tokens do not depend on which rows share the batch (up to float
rounding of batched matmuls). Columns that no row uses any more (the left padding of rows that
left) are cut off after every step.

Merging needs transformers' plain `DynamicCache` (every layer a `DynamicLayer`). Models whose
cache is anything else (sliding-window or linear-attention layers, older transformers) run the
same loop as static batches: new rows join only when the batch is empty.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any

import torch

PADDING_SLACK = 0.3  # a padded prefill may cost up to 30% more than its rows' own work


def length_groups(lengths: list[int], max_new_tokens: int, slack: float = PADDING_SLACK) -> list[list[int]]:
    """Split prompts sorted by length into consecutive groups that run as one padded batch.

    Left padding makes every row as long as the longest prompt, for the prefill and for every
    decoding step's attention. A group grows while its padded work, n x (longest + new tokens),
    stays within (1 + slack) x the rows' own work, sum(length + new tokens): with long answers
    (decoding dominates) prompts of very different lengths still share a batch; with short
    answers a 500-token prompt no longer makes thirty 60-token prompts pay for 500 positions.
    """
    groups: list[list[int]] = []
    group: list[int] = []
    own = 0
    for k, n in enumerate(lengths):  # ascending: the new prompt is the group's longest
        if group and (len(group) + 1) * (n + max_new_tokens) > (1 + slack) * (own + n + max_new_tokens):
            groups.append(group)
            group, own = [], 0
        group.append(k)
        own += n + max_new_tokens
    if group:
        groups.append(group)
    return groups


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else inverse-CDF sampling with one uniform
    draw per row (from that row's own generator), after temperature and nucleus (top-p) cuts.
    Every operation is row-wise, so a row's token never depends on the other rows."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        # keep the most likely tokens until their mass reaches top_p (the first is always kept)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1, dtype=torch.float64)
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(1)
    j = torch.searchsorted(cdf, target, right=True)
    # rounding can put the target at the very top: take the last token that has probability
    last = (probs > 0).long().cumsum(-1).argmax(-1, keepdim=True)
    j = torch.minimum(j, last)
    return (order.gather(1, j) if order is not None else j).squeeze(1)


SLACK_COLUMNS = 64  # spare cache columns per reallocation: appends in place for this many steps


@functools.cache
def slack_layer_class() -> type | None:
    """`SlackLayer`, a transformers DynamicLayer that appends in place (None without DynamicLayer)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class SlackLayer(DynamicLayer):
        """A DynamicLayer whose keys/values are leading views of buffers with spare columns, so a
        decode step writes its token in place instead of copying the whole cache (DynamicLayer's
        torch.cat: about a fifth of a CPU decode step at batch 32). Anything else that replaces
        the tensors (rows selected, columns cut, rows merged) makes the next append reallocate."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys, self.keys_buffer = _append(self.keys, getattr(self, "keys_buffer", None), key_states)
            self.values, self.values_buffer = _append(self.values, getattr(self, "values_buffer", None),
                                                      value_states)
            return self.keys, self.values

    return SlackLayer


def _append(current: torch.Tensor, buf: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`current` + `new` along dim -2, written into `buf` when `current` is its leading view."""
    n, add = current.shape[-2], new.shape[-2]
    if (buf is None or current.data_ptr() != buf.data_ptr() or current.shape[:-2] != buf.shape[:-2]
            or current.stride() != buf.stride() or n + add > buf.shape[-2]):
        shape = list(current.shape)
        shape[-2] = n + add + SLACK_COLUMNS
        buf = current.new_empty(shape)
        buf[..., :n, :].copy_(current)
    buf[..., n:n + add, :].copy_(new)
    return buf[..., :n + add, :], buf


def mergeable(cache: Any) -> bool:
    """Whether rows of another prefill can be merged into `cache` (plain full-attention layers)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    kinds = (DynamicLayer, slack_layer_class())
    return type(cache) is DynamicCache and bool(layers) and all(type(layer) in kinds for layer in layers)


def with_slack(cache: Any) -> None:
    """Make a mergeable cache's plain layers `SlackLayer`s (the same tensors; appends in place)."""
    slack = slack_layer_class()
    for i, layer in enumerate(cache.layers):
        if type(layer) is not slack:
            new = slack.__new__(slack)
            new.__dict__.update(layer.__dict__)
            cache.layers[i] = new


def stack_left_padded(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows of `a` then rows of `b` (dim 0), both right-aligned along `dim` and zero-filled on the left."""
    length = max(a.shape[dim], b.shape[dim])
    shape = list(a.shape)
    shape[0], shape[dim] = a.shape[0] + b.shape[0], length
    out = a.new_zeros(shape)
    out[:a.shape[0]].narrow(dim, length - a.shape[dim], a.shape[dim]).copy_(a)
    out[a.shape[0]:].narrow(dim, length - b.shape[dim], b.shape[dim]).copy_(b)
    return out


Row = tuple[Hashable, list[int], int, int]  # (key, prompt token ids, seed, most new tokens)
Finished = tuple[Hashable, list[int], bool]  # (key, new tokens incl. the stop token, stopped by the model)


class RunningBatch:
    """Rows being decoded together: `add` prefills new rows into the batch, `step` picks one
    token for every row and returns the rows that finished (which leave the batch)."""

    def __init__(self, model: Any, *, stop_ids: set[int], pad_id: int, temperature: float = 0.0,
                 top_p: float = 1.0, join: bool = True, on_step: Callable[[int], None] | None = None):
        self.model, self.stop_ids, self.pad_id = model, stop_ids, pad_id
        self.temperature, self.top_p = temperature, top_p
        self.join = join  # False: rows are added only to an empty batch (static batching)
        self.on_step = on_step  # called with the tokens of each decode step (live progress)
        self.device = model.get_input_embeddings().weight.device
        self._reset()

    def _reset(self) -> None:
        self.keys: list[Hashable] = []
        self.tokens: list[list[int]] = []
        self.budget: list[int] = []
        self.rngs: list[torch.Generator] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None      # [B, S] 1 = a real token, 0 = left padding
        self.last_pos: torch.Tensor | None = None  # [B] position of each row's last token
        self.logits: torch.Tensor | None = None    # [B, V] each row's next-token logits

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def can_add(self) -> bool:
        return not self.keys or self.join

    @torch.inference_mode()
    def add(self, rows: list[Row]) -> None:
        """Prefill `rows` (in groups of similar prompt length) and merge them into the batch."""
        if rows and not self.can_add:
            raise RuntimeError("this batch takes new rows only when it is empty (its cache cannot be merged)")
        rows = sorted(rows, key=lambda r: len(r[1]))
        for group in length_groups([len(r[1]) for r in rows], 0):
            self._join([rows[k] for k in group])

    def _join(self, rows: list[Row]) -> None:
        b, longest = len(rows), max(len(r[1]) for r in rows)
        ids = torch.full((b, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, longest, dtype=torch.long)
        for i, (_, prompt, _, _) in enumerate(rows):  # left padding: every row's next token goes last
            ids[i, longest - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            mask[i, longest - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        mask, positions = mask.to(self.device), positions.to(self.device)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        cache, logits, last = out.past_key_values, out.logits[:, -1], positions[:, -1]
        if self.cache is None:
            self.cache, self.mask, self.last_pos, self.logits = cache, mask, last, logits
        else:
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = stack_left_padded(mine.keys, theirs.keys, dim=-2)
                mine.values = stack_left_padded(mine.values, theirs.values, dim=-2)
            self.mask = stack_left_padded(self.mask, mask, dim=-1)
            self.last_pos = torch.cat([self.last_pos, last])
            self.logits = torch.cat([self.logits, logits])
        self.join = self.join and mergeable(self.cache)
        if self.join:
            with_slack(self.cache)
        for key, _, seed, budget in rows:
            self.keys.append(key)
            self.tokens.append([])
            self.budget.append(budget)
            self.rngs.append(torch.Generator().manual_seed(seed))

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """One token for every row; rows that stopped or reached their budget leave the batch."""
        if not self.keys:
            return []
        uniforms = None
        if self.temperature > 0:
            uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.rngs])
        chosen = pick_tokens(self.logits, self.temperature, self.top_p, uniforms)
        if self.on_step is not None:
            self.on_step(len(self.keys))
        keep: list[int] = []
        finished: list[Finished] = []
        for j, t in enumerate(chosen.tolist()):
            self.tokens[j].append(t)
            if t in self.stop_ids:
                finished.append((self.keys[j], self.tokens[j], True))
            elif len(self.tokens[j]) >= self.budget[j]:
                finished.append((self.keys[j], self.tokens[j], False))
            else:
                keep.append(j)
        if not keep:
            self._reset()
            return finished
        if len(keep) < len(self.keys):
            self._select(keep)
            chosen = chosen[torch.tensor(keep, device=chosen.device)]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(keep), 1)], dim=1)
        self.last_pos = self.last_pos + 1
        out = self.model(input_ids=chosen.view(-1, 1).to(self.device), attention_mask=self.mask,
                         position_ids=self.last_pos.view(-1, 1), past_key_values=self.cache, use_cache=True)
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]
        return finished

    def _select(self, keep: list[int]) -> None:
        """Keep rows `keep` and cut the columns that only the departed rows used."""
        sel = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(sel)
        self.mask, self.last_pos, self.logits = self.mask[sel], self.last_pos[sel], self.logits[sel]
        for name in ("keys", "tokens", "budget", "rngs"):
            values = getattr(self, name)
            setattr(self, name, [values[j] for j in keep])
        first = int(self.mask.bool().any(0).long().argmax())
        if first and mergeable(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    def drain(self) -> list[Hashable]:
        """Drop every row (their partial answers are lost) and return their keys."""
        keys = self.keys
        self._reset()
        return keys
