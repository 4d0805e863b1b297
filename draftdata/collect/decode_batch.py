"""Continuous batching for local generation (`draftdata synthesize` with transformers).

A `RunningBatch` decodes up to --batch-size rows with one KV cache laid out as slots: row j of
every layer's key/value buffer is slot j. A row that finishes frees its slot at once; new
prompts are prefilled together and their keys/values written into free slots, right-aligned
with the running rows (left padding). So the batch stays full while answers of very different
lengths finish, instead of draining to its longest answer (static batching kept about 55% of
the decode slots busy on Run 3's answers, bench/synth), and nothing is copied when a row
leaves: the cache is only written, and compacted only when more slots are free than the runner
refills at once (the final drain, a static batch). Each step's token is appended in place into
spare columns.

Each row keeps its own positions, padding mask and sampling generator, and padded columns get
no attention weight, so a row's tokens do not depend on which rows share the batch (up to float
rounding of batched matmuls). Columns that no live row uses any more (the left padding of rows
that left) are cut off after every step by moving a view, not by copying.

Slots need transformers' plain `DynamicCache` (every layer a `DynamicLayer`), as the model's
config describes it. Models whose cache is anything else (sliding-window or linear-attention
layers, older transformers) run static batches: new rows join only when the batch is empty,
and finished rows are dropped with the cache's own `batch_select_indices`.
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
def slot_layer_class() -> type:
    """`SlotLayer`, a transformers DynamicLayer over slot buffers (built on first use: only a
    batch whose model has plain DynamicLayers, i.e. transformers 5, asks for it)."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """Keys/values are the view buf[:, :, start:end] of buffers with spare columns on both
        sides: a decode step writes its token in place at `end`, new rows are written into their
        slots, and cutting leading columns moves `start`. Buffers are zero-initialized, so a
        column no row attends to still holds finite numbers (0 x NaN would poison attention)."""

        def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            self.kbuf, self.vbuf = keys.contiguous(), values.contiguous()
            self.start, self.end = 0, keys.shape[-2]
            self._view()

        def _view(self) -> None:
            self.keys = self.kbuf[:, :, self.start:self.end]
            self.values = self.vbuf[:, :, self.start:self.end]

        def _realloc(self, rows: int, lead: int, used: int, room: int) -> None:
            """New buffers of `rows` rows: `lead` free columns, the used ones, `room` spare."""
            shape = list(self.kbuf.shape)
            shape[0], shape[2] = rows, lead + used + room
            kbuf, vbuf = self.kbuf.new_zeros(shape), self.vbuf.new_zeros(shape)
            n = min(rows, self.kbuf.shape[0])
            kbuf[:n, :, lead:lead + used] = self.kbuf[:n, :, self.end - used:self.end]
            vbuf[:n, :, lead:lead + used] = self.vbuf[:n, :, self.end - used:self.end]
            self.kbuf, self.vbuf, self.start, self.end = kbuf, vbuf, lead, lead + used
            self._view()

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            add = key_states.shape[-2]
            if self.end + add > self.kbuf.shape[2]:
                self._realloc(self.kbuf.shape[0], 0, self.end - self.start, add + SLACK_COLUMNS)
            self.kbuf[:, :, self.end:self.end + add] = key_states
            self.vbuf[:, :, self.end:self.end + add] = value_states
            self.end += add
            self._view()
            return self.keys, self.values

        def fit(self, rows: int, columns: int) -> None:
            """At least `rows` slots and `columns` columns in use (new columns on the left)."""
            used = self.end - self.start
            lead = max(0, columns - used)
            if rows > self.kbuf.shape[0] or lead > self.start:
                self._realloc(max(rows, self.kbuf.shape[0]), lead, used, SLACK_COLUMNS)
                self.start = 0  # the `lead` new columns are zeros
            else:
                self.start -= lead
            self._view()

        def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Rows `keys`/`values` [b, h, n, d] into `slots`, right-aligned with the running rows."""
            n = keys.shape[-2]
            slots = slots.to(self.kbuf.device)  # a model spread over GPUs keeps each layer's cache on its GPU
            self.kbuf[slots, :, self.end - n:self.end] = keys
            self.vbuf[slots, :, self.end - n:self.end] = values

        def cut(self, first: int) -> None:
            self.start += first
            self._view()

        def keep(self, slots: torch.Tensor) -> None:
            slots = slots.to(self.kbuf.device)
            self.kbuf, self.vbuf = self.kbuf[slots], self.vbuf[slots]
            self._view()

    return SlotLayer


def mergeable(cache: Any) -> bool:
    """Whether `cache` is made of plain full-attention layers (rows can be written into slots)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    return type(cache) is DynamicCache and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _mergeable_model(model: Any) -> bool:
    """Whether `model`'s cache, as its config describes it, is made of plain full-attention layers."""
    try:
        from transformers.cache_utils import DynamicCache

        return mergeable(DynamicCache(config=model.config))
    except (ImportError, TypeError, ValueError, KeyError, AttributeError):  # older transformers, exotic configs
        return False


Row = tuple[Hashable, list[int], int, int]  # (key, prompt token ids, seed, most new tokens)
Finished = tuple[Hashable, list[int], bool]  # (key, new tokens incl. the stop token, stopped by the model)


class RunningBatch:
    """Rows being decoded together: `add` prefills new rows into free slots, `step` picks one
    token for every live row and returns the rows that finished (their slots become free)."""

    def __init__(self, model: Any, *, stop_ids: set[int], pad_id: int, temperature: float = 0.0,
                 top_p: float = 1.0, on_step: Callable[[int], None] | None = None):
        self.model, self.stop_ids, self.pad_id = model, stop_ids, pad_id
        self.temperature, self.top_p = temperature, top_p
        # True: the cache is made of SlotLayers once the first rows are in. False: rows join an
        # empty batch only and finished rows are dropped with batch_select_indices (static batches).
        self.join = _mergeable_model(model)
        self.on_step = on_step  # called with the tokens of each decode step (live progress)
        self.device = model.get_input_embeddings().weight.device
        self._reset()

    def _reset(self) -> None:
        self.keys: list[Hashable | None] = []     # per slot; None = free
        self.tokens: list[list[int]] = []
        self.budget: list[int] = []
        self.rngs: list[torch.Generator | None] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None      # [slots, S] 1 = a real token, 0 = left padding
        self.last_pos: torch.Tensor | None = None  # [slots] position of each row's last token
        self.logits: torch.Tensor | None = None    # [slots, V] each row's next-token logits

    def __len__(self) -> int:
        return sum(k is not None for k in self.keys)

    @property
    def can_add(self) -> bool:
        return len(self) == 0 or self.join

    @torch.inference_mode()
    def add(self, rows: list[Row]) -> None:
        """Prefill `rows` (in groups of similar prompt length) and put them into free slots."""
        if rows and not self.can_add:
            raise RuntimeError("this batch takes new rows only when it is empty (its cache cannot be merged)")
        rows = sorted(rows, key=lambda r: len(r[1]))
        groups = length_groups([len(r[1]) for r in rows], 0) if self.join else [list(range(len(rows)))]
        for group in groups:
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
            slots = list(range(b))
            self.keys, self.tokens, self.budget, self.rngs = [None] * b, [[] for _ in range(b)], [0] * b, [None] * b
            if self.join:
                self.join = mergeable(cache)
            if self.join:
                self._to_slot_layers()
        else:
            if not mergeable(cache):
                raise RuntimeError(f"{type(self.model).__name__} returned a KV cache that cannot be merged "
                                   f"({type(cache).__name__}); its config promised plain full-attention layers")
            slots = self._place(b, cache, mask, last, logits)
        for slot, (key, _, seed, budget) in zip(slots, rows):
            self.keys[slot], self.tokens[slot], self.budget[slot] = key, [], budget
            self.rngs[slot] = torch.Generator().manual_seed(seed)

    def _to_slot_layers(self) -> None:
        slot_layer = slot_layer_class()
        for i, layer in enumerate(self.cache.layers):
            new = slot_layer.__new__(slot_layer)
            new.__dict__.update(layer.__dict__)
            new.adopt(layer.keys, layer.values)
            self.cache.layers[i] = new

    def _place(self, b: int, cache: Any, mask: torch.Tensor, last: torch.Tensor, logits: torch.Tensor) -> list[int]:
        """Write a prefilled group into free slots (adding slots when too few are free)."""
        free = [j for j, k in enumerate(self.keys) if k is None]
        grow = max(0, b - len(free))
        if grow:
            free += list(range(len(self.keys), len(self.keys) + grow))
            self.keys += [None] * grow
            self.tokens += [[] for _ in range(grow)]
            self.budget += [0] * grow
            self.rngs += [None] * grow
            self.mask = torch.cat([self.mask, self.mask.new_ones(grow, self.mask.shape[1])])
            self.last_pos = torch.cat([self.last_pos, self.last_pos.new_zeros(grow)])
            self.logits = torch.cat([self.logits, self.logits.new_zeros(grow, self.logits.shape[1])])
        columns = max(self.mask.shape[1], mask.shape[1])
        for layer in self.cache.layers:
            layer.fit(len(self.keys), columns)
        if columns > self.mask.shape[1]:  # the running rows get more left padding
            self.mask = torch.cat([self.mask.new_zeros(len(self.keys), columns - self.mask.shape[1]), self.mask], 1)
        slots = free[:b]
        sel = torch.tensor(slots, device=self.device)
        for layer, new in zip(self.cache.layers, cache.layers):
            layer.write(sel, new.keys, new.values)
        self.mask[sel] = 0
        self.mask[sel, columns - mask.shape[1]:] = mask
        self.last_pos[sel] = last
        self.logits[sel] = logits
        return slots

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """One token for every live row; rows that stopped or reached their budget leave."""
        live = [j for j, k in enumerate(self.keys) if k is not None]
        if not live:
            return []
        uniforms = None
        if self.temperature > 0:
            uniforms = torch.stack([torch.rand((), generator=self.rngs[j], dtype=torch.float64) for j in live])
        rows = torch.tensor(live, device=self.device)
        chosen = pick_tokens(self.logits[rows], self.temperature, self.top_p, uniforms)
        if self.on_step is not None:
            self.on_step(len(live))
        finished: list[Finished] = []
        for j, t in zip(live, chosen.tolist()):
            self.tokens[j].append(t)
            if t in self.stop_ids or len(self.tokens[j]) >= self.budget[j]:
                finished.append((self.keys[j], self.tokens[j], t in self.stop_ids))
                self.keys[j], self.rngs[j] = None, None
        if len(finished) == len(live):
            self._reset()
            return finished
        inputs = torch.full((len(self.keys),), self.pad_id, dtype=torch.long, device=self.device)
        inputs[rows] = chosen
        if finished:
            inputs = self._after_finish(inputs)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.keys), 1)], dim=1)
        self.last_pos = self.last_pos + 1
        out = self.model(input_ids=inputs.view(-1, 1), attention_mask=self.mask,
                         position_ids=self.last_pos.view(-1, 1), past_key_values=self.cache, use_cache=True)
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]
        return finished

    def _after_finish(self, inputs: torch.Tensor) -> torch.Tensor:
        """Free the finished rows' slots (or drop them when the cache has no slots) and cut the
        columns no live row uses."""
        live = [j for j, k in enumerate(self.keys) if k is not None]
        sel = torch.tensor(live, device=self.device)
        # Free slots still cost a row of every step: more than the runner refills at once (1/8 of
        # the slots) means nobody is about to take them (a drain, a static batch): compact.
        if not self.join or len(self.keys) - len(live) > max(1, len(self.keys) // 8):
            if self.join:
                for layer in self.cache.layers:
                    layer.keep(sel)
            else:
                self.cache.batch_select_indices(sel.cpu())  # CPU indices work on every layer's GPU
            self.mask, self.last_pos, self.logits, inputs = self.mask[sel], self.last_pos[sel], self.logits[sel], inputs[sel]
            for name in ("keys", "tokens", "budget", "rngs"):
                values = getattr(self, name)
                setattr(self, name, [values[j] for j in live])
            live_mask = self.mask
        else:  # free slots attend to everything (finite numbers, no all-masked row) and are ignored
            dead = torch.tensor([j for j, k in enumerate(self.keys) if k is None], device=self.device)
            self.mask[dead] = 1
            self.last_pos[dead] = 0
            live_mask = self.mask[sel]
        if self.join:
            first = int(live_mask.bool().any(0).long().argmax())
            if first:
                for layer in self.cache.layers:
                    layer.cut(first)
                self.mask = self.mask[:, first:]
        return inputs

    def drain(self) -> None:
        """Drop every row (their partial answers are lost): the batch is empty again."""
        self._reset()
