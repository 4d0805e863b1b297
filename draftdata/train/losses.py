"""Training-time test (TTT) unrolling and the EAGLE3 loss, as ModelOpt's HF EAGLE model computes them.

Step 0 runs the draft over every position t with the base's state h_t (fc of the aux states) and
the embedding of token t+1; it predicts token t+2, whose target distribution is the base model's
softmax at position t+1 (from the stored final hidden state through the frozen lm_head).
Step k>0 feeds each position the draft's own output state of step k-1 at position t-1
(`roll(1)`), i.e. what the draft would see k tokens into a speculative chain, and attends to:

    step-0 keys at positions <= t-k   and   step-j key at position t-(k-j), j = 1..k

(ModelOpt's `get_ttt_msk_func`, over the keys of all steps concatenated). Its first k positions
have no history and are left out of the loss. Per step k:

    loss_k = sum_t mask[t+1+k...] * CE(target_{t+1}, draft_t) / count_k,   total = sum_k decay^k loss_k

with accuracy = argmax agreement over the same positions. Targets are restricted to the draft
vocabulary (a softmax over those ids only) when it is compressed.

Memory: the lm_head and the cross-entropy are fused and run over chunks of the positions that
are in the loss (`head_cross_entropy`): the [T, vocab] draft logits never exist whole, and
nothing of vocabulary width is kept for backward (the gradient with respect to the draft state
is formed during the forward pass). The target distribution of the loss positions is computed
once per batch and shared by the TTT steps while it fits TARGET_CACHE_BYTES (`target_cache`);
beyond that, once per step and chunk, so it never exists whole either.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from draftdata.train.model import DraftStepOutput, Eagle3Draft, TargetHead


def ttt_attention_mask(seq_len: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [T, T*(step+1)] mask (True = attend) of TTT step `step` over the keys of steps 0..step.

    Same predicate as ModelOpt's get_ttt_msk_func: query q sees step-0 keys kv <= q - step and,
    in block i (keys of step i), only position q - (step - i).
    """
    q = torch.arange(seq_len, device=device)[:, None]
    kv = torch.arange(seq_len * (step + 1), device=device)[None, :]
    mask = kv <= q - step
    for i in range(1, step + 1):
        mask = mask | ((kv == q + i * seq_len - (step - i)) & (kv >= seq_len * i))
    return mask


def step_weights(batch: dict[str, torch.Tensor], ttt_steps: int,
                 draft_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per TTT step k, the loss weight of draft positions k..T-2 ([B, T-1-k], float).

    Soft targets: loss_mask at the target position t+1 (ModelOpt). Hard targets (`draft_ids`, a
    base-id -> draft-id table, -1 outside the draft vocabulary): additionally the label token
    t+2 must exist and be in the draft vocabulary.
    """
    loss_mask = batch["loss_mask"].float()
    t = loss_mask.shape[1]
    out = []
    for k in range(ttt_steps):
        w = loss_mask[:, 1 + k:]
        if draft_ids is not None:
            labels_ok = torch.zeros_like(w)
            ids = batch["input_ids"][:, 2 + k:]
            real = batch["attention_mask"][:, 2 + k:].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
            labels_ok[:, : t - 2 - k] = (real & (draft_ids[ids] >= 0)).float()
            w = w * labels_ok
        out.append(w)
    return out


def step_token_counts(batch: dict[str, torch.Tensor], ttt_steps: int,
                      draft_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[ttt_steps] number of positions in each step's loss (the loss normalizers)."""
    return torch.stack([w.sum() for w in step_weights(batch, ttt_steps, draft_ids)])


@dataclass
class TTTOutput:
    loss: torch.Tensor          # scalar to backpropagate: sum_k decay^k * loss_sum[k] / normalizer[k]
    loss_sum: torch.Tensor      # [K] summed (weighted) CE per step, detached
    correct: torch.Tensor       # [K] argmax agreements per step
    count: torch.Tensor         # [K] positions in each step's loss

    def step_losses(self) -> list[float]:
        return (self.loss_sum / self.count.clamp_min(1e-5)).tolist()

    def step_accuracies(self) -> list[float]:
        return (self.correct / self.count.clamp_min(1)).tolist()


def ttt_unroll(draft: Eagle3Draft, input_ids: torch.Tensor, aux_hidden_states: torch.Tensor, ttt_steps: int,
               *, mix_hidden_states: bool = False, logits: bool = True) -> Iterator[DraftStepOutput]:
    """Yield the draft's output of each TTT step over all T positions (see the module docstring);
    with logits=False the lm_head is skipped (`.normed` holds its input).

    Step k's logits at position t are what the draft computes k steps into a chain that left the
    base model's states after position t-k, with the true tokens as its inputs (teacher forcing).
    """
    device, dtype = draft.fc.weight.device, draft.fc.weight.dtype
    input_ids = input_ids.to(device, torch.long)
    b, t = input_ids.shape
    embeds = draft.embed(input_ids.roll(-1, 1))        # position t gets token t+1
    hidden = draft.combine_aux(aux_hidden_states.to(device, dtype))
    positions = torch.arange(t, device=device).expand(b, t)
    past: list = []
    for k in range(ttt_steps):
        if mix_hidden_states or k == 0:
            out = draft(embeds, hidden, positions, mask=None, past=None, logits=logits)
        else:
            out = draft(embeds, hidden, positions, mask=ttt_attention_mask(t, k, device), past=past,
                        logits=logits)
            # (ModelOpt's step-0 mask also hides padded keys; with right padding no real query
            # can see them, so plain causal attention gives the same loss.)
        if not mix_hidden_states:
            past.append(out.kv)
        new_hidden = out.hidden.roll(1, 1)              # state of position t-1 feeds position t
        hidden = _mix(hidden, new_hidden, k) if mix_hidden_states else new_hidden
        yield out


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(p_i, softmax(h_i @ W^T)) over rows i, in chunks of `chunk` rows.

    `targets(s, e)` returns (p [e-s, V] fp32 rows summing to 1, target argmax [e-s]). The gradient
    w.r.t. h (and W when it is trained) is computed chunk by chunk in the forward pass, so only
    [N, H] (and [V, H]) tensors are kept for backward. Returns (loss sum, number of rows where
    the draft's argmax equals the target's).
    """

    @staticmethod
    def forward(ctx, h, weight, row_weight, targets, chunk):
        n = h.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)      # fp32 math (fp64 stays fp64)
        grad_h = torch.zeros_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight.requires_grad else None
        loss = torch.zeros((), dtype=acc, device=h.device)
        correct = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = torch.nn.functional.linear(h[s:e], weight).to(acc)
            logq = torch.log_softmax(z, dim=-1)
            p, target_tok = targets(s, e)
            w = row_weight[s:e].to(acc)
            loss += -(w * (p * logq).sum(-1)).sum()
            correct += ((z.argmax(-1) == target_tok) & (w > 0)).sum()
            g = (logq.exp_() - p) * w[:, None]                # dLoss/dz (p sums to 1)
            grad_h[s:e] = (g.to(weight.dtype) @ weight).to(h.dtype)
            if grad_w is not None:
                grad_w += g.t() @ h[s:e].to(acc)
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.weight_dtype, ctx.has_grad_w = weight.dtype, grad_w is not None
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if ctx.has_grad_w else None
        return grad_h * grad_loss.to(grad_h.dtype), gw, None, None, None


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, row_weight: torch.Tensor, targets,
                       chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused lm_head + soft cross-entropy over rows of h (see HeadCrossEntropy)."""
    if chunk is None:
        chunk = chunk_rows(weight.shape[0])
    return HeadCrossEntropy.apply(h, weight, row_weight, targets, chunk)


TARGET_CACHE_BYTES = 256 << 20


def chunk_rows(vocab: int) -> int:
    """Rows per chunk of vocabulary-wide work: ~32 MiB per [chunk, vocab] fp32 temporary."""
    return max(16, (32 << 20) // (4 * vocab))


def target_cache(head: TargetHead, final_hidden: torch.Tensor, loss_mask: torch.Tensor, vocab: int,
                 ttt_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The target distribution of every position in the loss, computed once per batch.

    Step k's target for draft position t is the base's softmax at t+1+k, so all steps draw on the
    positions whose loss_mask is set. Computing those once instead of once per step saves
    ttt_steps-1 target projections (8-12% of a CPU step at SmolLM2 shapes). Returns (probs [N, V]
    fp32, argmax [N], flat position -> row, -1 where unused), or None where one step needs no
    reuse or the table would pass TARGET_CACHE_BYTES (large vocabularies x batches: per step).
    """
    b, t = loss_mask.shape
    needed = torch.nonzero(loss_mask.reshape(-1) > 0).squeeze(1)
    n = needed.numel()
    if ttt_steps < 2 or n * vocab * 4 > TARGET_CACHE_BYTES:
        return None
    flat = final_hidden.reshape(b * t, -1)
    probs = torch.empty(n, vocab, dtype=torch.float32, device=final_hidden.device)
    top = torch.empty(n, dtype=torch.long, device=final_hidden.device)
    chunk = chunk_rows(vocab)
    for s in range(0, n, chunk):
        logits = head(flat.index_select(0, needed[s:s + chunk])).float()
        top[s:s + chunk] = logits.argmax(-1)
        probs[s:s + chunk] = torch.softmax(logits, dim=-1)
    row_of = torch.full((b * t,), -1, dtype=torch.long, device=final_hidden.device)
    row_of[needed] = torch.arange(n, device=final_hidden.device)
    return probs, top, row_of


def ttt_loss(draft: Eagle3Draft, head: TargetHead, batch: dict[str, torch.Tensor], *, ttt_steps: int,
             decay: float, normalizer: torch.Tensor | None = None, mix_hidden_states: bool = False,
             self_logit_distillation: bool = True) -> TTTOutput:
    """Unroll the draft `ttt_steps` times over a loader batch and return the decayed loss.

    batch: input_ids [B, T], loss_mask [B, T], hidden_states [B, T, H], aux_hidden_states
    [B, T, k*H] (right-padded, the loader contract). `normalizer` [K]: the per-step token counts
    to divide by (the trainer passes counts summed over gradient-accumulation micro-batches and
    ranks); default: this batch's own counts + 1e-5, exactly ModelOpt's per-batch loss.
    Only positions with a non-zero loss weight go through the lm_head.
    """
    device = draft.fc.weight.device
    input_ids = batch["input_ids"].to(device, torch.long)
    draft_ids = None if self_logit_distillation else _draft_id_table(draft)
    weights = step_weights({**batch, "input_ids": input_ids}, ttt_steps, draft_ids)
    weights = [w.to(device) for w in weights]
    count = torch.stack([w.sum() for w in weights])
    denom = (count + 1e-5) if normalizer is None else normalizer.to(device).clamp_min(1e-5)
    final_hidden = batch["hidden_states"].to(device)
    if not self_logit_distillation:
        labels = torch.zeros_like(input_ids)
        labels[:, :-1] = draft_ids[input_ids[:, 1:]].clamp_min(0)     # labels[t+1] = draft id of token t+2
    cache = target_cache(head, final_hidden, batch["loss_mask"].to(device), draft.config.draft_vocab_size,
                         ttt_steps) if self_logit_distillation else None

    loss = torch.zeros((), device=device)
    loss_sum, correct = [], []
    for k, out in enumerate(ttt_unroll(draft, input_ids, batch["aux_hidden_states"], ttt_steps,
                                       mix_hidden_states=mix_hidden_states, logits=False)):
        w = weights[k].reshape(-1)
        rows = torch.nonzero(w > 0).squeeze(1)             # only positions in the loss
        h = out.normed[:, k:-1].reshape(-1, out.normed.shape[-1]).index_select(0, rows)
        if cache is not None:
            span = input_ids.shape[1] - 1 - k                  # draft positions t of step k; target t+1+k
            idx = cache[2][(rows // span) * input_ids.shape[1] + rows % span + 1 + k]

            def targets(s, e, idx=idx):
                return cache[0].index_select(0, idx[s:e]), cache[1].index_select(0, idx[s:e])
        elif self_logit_distillation:
            tgt = final_hidden[:, 1 + k:].reshape(-1, final_hidden.shape[-1]).index_select(0, rows)

            def targets(s, e, tgt=tgt):
                logits = head(tgt[s:e]).float()
                return torch.softmax(logits, dim=-1), logits.argmax(-1)
        else:
            tok = labels[:, 1 + k:].reshape(-1).index_select(0, rows)

            def targets(s, e, tok=tok):
                p = torch.zeros(e - s, draft.config.draft_vocab_size, device=device)
                return p.scatter_(1, tok[s:e, None], 1.0), tok[s:e]
        step_sum, hits = head_cross_entropy(h, draft.lm_head.weight, w.index_select(0, rows), targets)
        loss = loss + (decay ** k) * step_sum / denom[k]
        loss_sum.append(step_sum.detach())
        correct.append(hits)
    return TTTOutput(loss=loss, loss_sum=torch.stack(loss_sum), correct=torch.stack(correct), count=count)


class EagleTTT(nn.Module):
    """The draft, its frozen target head and the TTT settings as one module: what DDP wraps
    (one forward per backward, however many TTT steps run inside)."""

    def __init__(self, draft: Eagle3Draft, head: TargetHead, *, ttt_steps: int, decay: float,
                 mix_hidden_states: bool = False, self_logit_distillation: bool = True) -> None:
        super().__init__()
        self.draft, self.head = draft, head
        self.ttt_steps, self.decay = ttt_steps, decay
        self.mix_hidden_states, self.self_logit_distillation = mix_hidden_states, self_logit_distillation

    def draft_id_table(self) -> torch.Tensor | None:
        """Base id -> draft id table for hard-label training, else None (see step_weights)."""
        return None if self.self_logit_distillation else _draft_id_table(self.draft)

    def forward(self, batch: dict[str, torch.Tensor], normalizer: torch.Tensor | None = None) -> TTTOutput:
        return ttt_loss(self.draft, self.head, batch, ttt_steps=self.ttt_steps, decay=self.decay,
                        normalizer=normalizer, mix_hidden_states=self.mix_hidden_states,
                        self_logit_distillation=self.self_logit_distillation)


def _draft_id_table(draft: Eagle3Draft) -> torch.Tensor:
    """Base id -> draft id (-1 outside the draft vocabulary), from the draft's d2t."""
    n = draft.d2t.numel()
    table = torch.full((draft.t2d.numel(),), -1, dtype=torch.long, device=draft.d2t.device)
    table[torch.arange(n, device=draft.d2t.device) + draft.d2t] = torch.arange(n, device=draft.d2t.device)
    return table


def _mix(hidden: torch.Tensor, new_hidden: torch.Tensor, step: int) -> torch.Tensor:
    """ModelOpt's eagle_mix_hidden_states: replace a random T/(2^step+1) of the positions."""
    b, t, _ = hidden.shape
    n = max(1, t // (2 ** step + 1))
    idx = torch.rand(b, t, device=hidden.device).argsort(dim=1)[:, :n]
    rows = torch.arange(b, device=hidden.device)[:, None]
    hidden = hidden.clone()
    hidden[rows, idx] = new_hidden[rows, idx]
    return hidden


__all__ = ["EagleTTT", "HeadCrossEntropy", "TTTOutput", "head_cross_entropy", "step_token_counts", "step_weights",
           "ttt_attention_mask", "ttt_loss", "ttt_unroll"]
