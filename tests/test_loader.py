"""HiddenStateDataset / HiddenStateMapDataset on real datasets written with the store (local and S3).

Exactly-once over 2 ranks x 2 real DataLoader workers, determinism, exact resume (also through
torchdata's StatefulDataLoader), batching invariants, corrupt bytes and missing datasets.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import threading
import uuid
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from torch.utils.data import DataLoader, DistributedSampler

from draftdata.config import DatasetSchema
from draftdata.errors import CorruptDataError, DatasetNotFoundError, DraftdataError, StorageAccessError
from draftdata.loaders import HiddenStateDataset, HiddenStateMapDataset, collate_samples, padding_efficiency
from draftdata.loaders import plan as planning
from draftdata.store import create_dataset, open_dataset

H, AUX = 8, [0, 2]
K = len(AUX)
TOKEN_BYTES = planning.bytes_per_token(H, K)


def _sample(idx: int, length: int) -> dict:
    """A sample whose every value can be recomputed from (idx, position)."""
    t = torch.arange(length)
    return {
        "conversation_id": f"c{idx:04d}",
        "input_ids": ((idx * 7 + t) % 400).to(torch.int32),
        "loss_mask": ((idx + t) % 3 != 0).to(torch.uint8),
        "aux_hidden_states": (t[:, None] % 200 + torch.arange(K * H) / 64).to(torch.bfloat16),
        "hidden_states": torch.full((length, H), float(idx % 250), dtype=torch.bfloat16),
    }


def write_dataset(url: str, part_sizes: list[int], *, storage_options=None, fmt: str = "zarr", seed: int = 0,
                  max_len: int = 40, first: int = 0) -> dict[str, dict]:
    """Write parts of the given sample counts (ids from c{first:04d} on; adds parts to an existing
    dataset at `url`); return the reference samples by conversation id."""
    schema = DatasetSchema(base_model_id="test/tiny", hidden_size=H, aux_layer_ids=AUX, num_hidden_layers=4,
                           vocab_size=400, max_seq_len=512)
    w = create_dataset(url, schema, format=fmt, storage_options=storage_options)
    rng = random.Random(seed)
    ref, idx = {}, first
    for n in part_sizes:
        pw = w.open_part()
        for _ in range(n):
            s = _sample(idx, rng.randint(1, max_len))
            pw.add(s)
            ref[s["conversation_id"]] = s
            idx += 1
        pw.commit()
    return ref


PARTS = [9, 3, 14, 1, 7, 11, 5]  # 50 samples, uneven parts


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory) -> tuple[str, dict]:
    url = str(tmp_path_factory.mktemp("loader") / "ds")
    return url, write_dataset(url, PARTS)


def ids_of(item) -> list[str]:
    cid = item["conversation_id"]
    return list(cid) if isinstance(cid, list) else [cid]


def run_loader(ds, num_workers: int, **kw) -> list[list[str]]:
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers, **kw)
    return [ids_of(x) for x in loader]


def flat(items):
    return [c for it in items for c in it]


# ---------------------------------------------------------------------------------- pure plan


def test_plan_is_exactly_once_for_many_splits():
    rng = np.random.default_rng(1)
    counts = [int(c) for c in rng.integers(0, 30, size=13)]
    lengths = [rng.integers(1, 100, size=c) for c in counts]
    n = sum(counts)
    for world in (1, 2, 3, 8):
        for workers in (1, 2, 5):
            for kw in ({}, {"batch_size": 4}, {"max_tokens_per_batch": 150}, {"max_tokens_per_batch": 150, "batch_size": 3}):
                seen, rank_sizes = [], []
                for r in range(world):
                    plan = planning.rank_plan(counts, lengths, seed=5, epoch=2, shuffle=True, rank=r, world_size=world,
                                              token_bytes=10, window_bytes=3000, **kw)
                    rank_sizes.append(plan.num_samples)
                    for w in range(workers):
                        for win in plan.worker_windows(w, workers):
                            assert plan.window_bytes(win, 10) <= 3000 or win.hi - win.lo <= kw.get("batch_size", 1)
                            for item in win.items:
                                seen.extend((int(plan.part[i]), int(plan.row[i])) for i in item)
                                if kw.get("max_tokens_per_batch") and len(item) > 1:
                                    assert len(item) * plan.length[item].max() <= kw["max_tokens_per_batch"]
                                if kw.get("batch_size"):
                                    assert len(item) <= kw["batch_size"]
                assert sorted(seen) == sorted((p, j) for p, c in enumerate(counts) for j in range(c))
                assert len(seen) == n and max(rank_sizes) - min(rank_sizes) <= 1


def test_windows_end_at_part_boundaries_when_parts_fit():
    counts = [5, 7, 3, 9, 4]
    lengths = [np.full(c, 10) for c in counts]
    plan = planning.rank_plan(counts, lengths, seed=0, epoch=0, shuffle=False, rank=0, world_size=1,
                              token_bytes=1, window_bytes=120)  # a part is 30-90 bytes
    for w in plan.windows:
        parts = set(plan.part[w.lo:w.hi].tolist())
        assert all(plan.row[i] == 0 or plan.part[i - 1] == plan.part[i] for i in range(w.lo, w.hi))
        # every part in a window is whole
        assert sum(counts[p] for p in parts) == w.hi - w.lo
    big = planning.rank_plan([50], [np.full(50, 10)], seed=0, epoch=0, shuffle=False, rank=0, world_size=1,
                             token_bytes=1, window_bytes=120)
    assert [w.hi - w.lo for w in big.windows] == [12, 12, 12, 12, 2]  # a part larger than a window is split


def test_fixed_batches_only_last_is_partial():
    counts, lengths = [37, 20], [np.full(37, 5), np.full(20, 5)]
    plan = planning.rank_plan(counts, lengths, seed=0, epoch=0, shuffle=True, rank=0, world_size=1,
                              token_bytes=100, window_bytes=2000, batch_size=4)
    sizes = [len(it) for w in sorted(plan.windows, key=lambda w: w.lo) for it in w.items]
    assert sizes[:-1] == [4] * (len(sizes) - 1) and sizes[-1] == 57 % 4


def test_interleave_and_worker_positions_agree():
    rng = random.Random(0)
    for _ in range(200):
        counts = [rng.randint(0, 9) for _ in range(rng.randint(1, 5))]
        order = planning.interleave(counts)
        for k in range(len(order) + 1):
            expect = [sum(1 for w, _ in order[:k] if w == i) for i in range(len(counts))]
            assert planning.worker_positions(counts, k) == expect
    with pytest.raises(ValueError):
        planning.worker_positions([2, 2], 5)


def test_shuffle_is_deterministic_per_seed_and_epoch():
    counts = [10] * 6
    lengths = [np.arange(1, 11)] * 6

    def order(seed, epoch, shuffle=True):
        plan = planning.rank_plan(counts, lengths, seed=seed, epoch=epoch, shuffle=shuffle, rank=0, world_size=1,
                                  token_bytes=1, window_bytes=30)
        return [(int(plan.part[i]), int(plan.row[i])) for w in plan.windows for it in w.items for i in it]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert order(1, 0, shuffle=False) == [(p, j) for p in range(6) for j in range(10)]


# ---------------------------------------------------------------------------------- real data


def test_persistent_workers_follow_set_epoch(local_ds):
    """With persistent_workers=True the workers outlive one epoch; each epoch must still be that
    epoch's order (a per-process epoch would repeat the first epoch's order forever)."""
    url, _ = local_ds
    ds = HiddenStateDataset(url, seed=5, max_tokens_per_batch=100, prefetch_bytes=50 * TOKEN_BYTES)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    seen = []
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        seen.append([ids_of(x) for x in loader])
        assert seen[-1] == expected_order(ds, 2), epoch
    assert seen[0] != seen[1] != seen[2]


def test_main_process_state_dict_while_workers_iterate_warns(local_ds):
    """The main process's copy of the dataset does not advance when DataLoader workers read: its
    state_dict() then would restart the epoch, so it warns (and not once the next epoch is set)."""
    import warnings

    url, _ = local_ds
    ds = HiddenStateDataset(url, seed=5, max_tokens_per_batch=100, prefetch_bytes=50 * TOKEN_BYTES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.state_dict()                                       # nothing iterated yet: no warning
    it = iter(DataLoader(ds, batch_size=None, num_workers=2))
    take(it, 3)
    with pytest.warns(UserWarning, match="while DataLoader workers iterate epoch 0.*StatefulDataLoader"):
        state = ds.state_dict()
    assert state["items_yielded"] == 0
    del it
    ds.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds.state_dict()["epoch"] == 1


def test_exactly_once_two_ranks_two_workers(local_ds):
    url, ref = local_ds
    for kw in ({}, {"max_tokens_per_batch": 90}):
        per_rank = []
        for rank in range(2):
            ds = HiddenStateDataset(url, rank=rank, world_size=2, seed=3, prefetch_bytes=60 * TOKEN_BYTES, **kw)
            items = run_loader(ds, num_workers=2)
            assert items == expected_order(ds, 2)  # the documented round-robin of the workers' plans
            assert len(items) == len(ds)
            per_rank.append(flat(items))
        everything = per_rank[0] + per_rank[1]
        assert sorted(everything) == sorted(ref) and len(set(everything)) == len(ref)
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def expected_order(ds: HiddenStateDataset, num_workers: int) -> list[list[str]]:
    """What a DataLoader over `ds` must yield: the workers' item lists interleaved round-robin."""
    plan = ds.plan()
    per_worker = []
    for w in range(max(1, num_workers)):
        items = [[ds.store.parts[int(plan.part[i])].conversation_ids[int(plan.row[i])] for i in it]
                 for win in plan.worker_windows(w, max(1, num_workers)) for it in win.items]
        per_worker.append(items)
    return [per_worker[w][k] for w, k in planning.interleave([len(x) for x in per_worker])]


def test_order_is_the_documented_interleave_and_deterministic(local_ds):
    url, _ = local_ds
    ds = HiddenStateDataset(url, seed=11, max_tokens_per_batch=100, prefetch_bytes=50 * TOKEN_BYTES)
    ds.set_epoch(4)
    first = run_loader(ds, num_workers=2)
    assert first == expected_order(ds, 2)
    again = HiddenStateDataset(url, seed=11, max_tokens_per_batch=100, prefetch_bytes=50 * TOKEN_BYTES)
    again.set_epoch(4)
    assert run_loader(again, num_workers=2) == first
    assert [ids_of(x) for x in again] == expected_order(again, 0)  # in-process iteration
    ds.set_epoch(5)
    assert run_loader(ds, num_workers=2) != first
    plain = HiddenStateDataset(url, shuffle=False)
    assert flat([ids_of(x) for x in plain]) == [c for p in plain.store.parts for c in p.conversation_ids]


def test_batches_follow_the_contract(local_ds):
    url, ref = local_ds
    budget = 64
    ds = HiddenStateDataset(url, max_tokens_per_batch=budget, max_seq_len=30, seed=2, prefetch_bytes=80 * TOKEN_BYTES)
    seen, real, padded = [], 0, 0
    for batch in ds:
        b, t = batch["input_ids"].shape
        assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
        assert batch["loss_mask"].dtype == torch.float32 and batch["lengths"].dtype == torch.int64
        assert batch["hidden_states"].dtype == torch.bfloat16 and batch["hidden_states"].shape == (b, t, H)
        assert batch["aux_hidden_states"].dtype == torch.bfloat16 and batch["aux_hidden_states"].shape == (b, t, K * H)
        assert b == 1 or b * t <= budget
        assert t == int(batch["lengths"].max())
        for i, cid in enumerate(batch["conversation_id"]):
            n = int(batch["lengths"][i])
            s = ref[cid]
            assert n == min(30, len(s["input_ids"]))  # truncation keeps the first max_seq_len tokens
            assert torch.equal(batch["attention_mask"][i], (torch.arange(t) < n).long())
            assert torch.equal(batch["input_ids"][i, :n], s["input_ids"][:n].long())
            assert torch.equal(batch["loss_mask"][i, :n], s["loss_mask"][:n].float())
            assert not batch["loss_mask"][i, n:].any() and not batch["input_ids"][i, n:].any()
            assert torch.equal(batch["hidden_states"][i, :n], s["hidden_states"][:n])
            assert torch.equal(batch["aux_hidden_states"][i, :n], s["aux_hidden_states"][:n])
            assert not batch["hidden_states"][i, n:].any() and not batch["aux_hidden_states"][i, n:].any()
            seen.append(cid)
        real += int(batch["lengths"].sum())
        padded += b * t
    assert sorted(seen) == sorted(ref)
    assert ds.padding_efficiency() == pytest.approx(real / padded)
    assert ds.stats["padded_tokens"] == padded and ds.stats["tokens"] == real
    assert ds.stats["peak_prefetch_bytes"] <= 80 * TOKEN_BYTES

    fixed = HiddenStateDataset(url, batch_size=8, shuffle=False, pad_to_multiple_of=16)
    sizes = [len(b["conversation_id"]) for b in fixed]
    assert sizes == [8] * 6 + [2]
    b0 = next(iter(fixed))
    assert b0["input_ids"].shape[1] % 16 == 0 and padding_efficiency(b0) <= 1.0


def test_padding_efficiency_counts_pad_to_multiple_of(local_ds):
    """The plan's padding efficiency pads like collation does, pad_to_multiple_of included."""
    url, _ = local_ds
    for kw in ({"batch_size": 4}, {"max_tokens_per_batch": 90, "max_seq_len": 30}):
        ds = HiddenStateDataset(url, pad_to_multiple_of=64, seed=1, **kw)
        padded = sum(int(b["input_ids"].numel()) for b in ds)
        assert ds.stats["padded_tokens"] == padded
        assert ds.padding_efficiency() == pytest.approx(ds.stats["tokens"] / padded)


def test_token_budget_counts_the_rounded_length(local_ds):
    """With pad_to_multiple_of the budget holds for the batches as padded (it counted the unrounded
    length, so rounding could nearly double a batch); a lone sample over the budget stays alone."""
    url, _ = local_ds
    ds = HiddenStateDataset(url, max_tokens_per_batch=96, max_seq_len=40, pad_to_multiple_of=32, seed=3)
    shapes = [tuple(b["input_ids"].shape) for b in ds]
    assert all(t % 32 == 0 and (b * t <= 96 or b == 1) for b, t in shapes)
    assert sum(b for b, _ in shapes) == ds.num_samples
    assert max(b * t for b, t in shapes) > 64                  # the budget is used, not just one sample
    with pytest.warns(UserWarning, match=r"\(32 padded to a multiple of 32\) exceed max_tokens_per_batch=30"):
        HiddenStateDataset(url, max_tokens_per_batch=30, max_seq_len=30, pad_to_multiple_of=32)


def test_samples_are_views_of_the_stored_bits(local_ds):
    url, ref = local_ds
    ds = HiddenStateDataset(url, shuffle=False)
    it = iter(ds)
    a, b = next(it), next(it)
    assert a["hidden_states"].dtype == torch.bfloat16
    # Two samples of one part share one decoded buffer: no per-sample copies were made.
    assert a["hidden_states"].untyped_storage().data_ptr() == b["hidden_states"].untyped_storage().data_ptr()
    assert torch.equal(a["aux_hidden_states"], ref[a["conversation_id"]]["aux_hidden_states"])


def take(loader_iter, n):
    return [ids_of(next(loader_iter)) for _ in range(n)]


def test_leaving_a_loop_early_stops_the_reader_thread(local_ds):
    """`break` closes the iterator, which waits for its read-ahead thread: a daemon thread still
    reading when a script exits is killed inside torch/zarr code (abort, exit status 134)."""
    url, _ = local_ds
    for batching in [{"batch_size": 1}, {"max_tokens_per_batch": 64}] * 5:  # each try catches a leak ~2 in 3 times
        before = set(threading.enumerate())
        ds = HiddenStateDataset(url, prefetch_bytes=TOKEN_BYTES * 40, **batching)  # about a window at a time
        for i, _ in enumerate(ds):
            if i == 2:
                break
        assert [t.name for t in set(threading.enumerate()) - before if t.name == "draftdata-prefetch"] == []


def test_resume_mid_epoch(local_ds):
    url, _ = local_ds
    kw = {"seed": 9, "max_tokens_per_batch": 80, "prefetch_bytes": 50 * TOKEN_BYTES}
    ds = HiddenStateDataset(url, **kw)
    ds.set_epoch(1)
    full = run_loader(ds, num_workers=2)
    assert len(full) > 8

    # In-process: state_dict / load_state_dict on the dataset itself.
    ds0 = HiddenStateDataset(url, **kw)
    ds0.set_epoch(1)
    it = iter(ds0)
    head = [ids_of(next(it)) for _ in range(5)]
    state = pickle.loads(pickle.dumps(ds0.state_dict()))
    fresh = HiddenStateDataset(url, **kw)
    fresh.load_state_dict(state)
    inproc = expected_order(fresh, 0)
    assert head + [ids_of(x) for x in fresh] == inproc
    assert [ids_of(x) for x in fresh] == inproc  # the resume applied to one iteration only

    # A plain DataLoader with workers: resume from a count of consumed items (global cursor).
    for k in (0, 3, 7, len(full)):
        again = HiddenStateDataset(url, **kw)
        again.load_state_dict({"epoch": 1, "items_consumed": np.int64(k)})
        assert run_loader(again, num_workers=2) == full[k:]
    # A cursor outside its epoch is refused when loaded (it was a bare ValueError at the first item)
    for bad, says in (({"epoch": 1, "items_consumed": len(full) + 1}, f"{len(full) + 1} items consumed in epoch 1, "
                       f"but this rank has {len(full)} items"), ({"epoch": 1, "items_consumed": -3}, "-3 items"),
                      ({"epoch": -1, "items_consumed": 0}, "epoch is -1"),
                      ({"epoch": "1", "items_consumed": 0}, "epoch is '1'")):
        with pytest.raises(DraftdataError, match=f"cannot resume: .*{re.escape(says)}"):
            HiddenStateDataset(url, **kw).load_state_dict(bad)


def test_resume_through_stateful_dataloader(local_ds):
    from torchdata.stateful_dataloader import StatefulDataLoader

    url, _ = local_ds
    kw = {"seed": 4, "max_tokens_per_batch": 80, "prefetch_bytes": 50 * TOKEN_BYTES}
    ds = HiddenStateDataset(url, **kw)
    ds.set_epoch(2)
    full = run_loader(ds, num_workers=2)
    for num_workers, k in ((2, 5), (0, 4)):
        ds = HiddenStateDataset(url, **kw)
        ds.set_epoch(2)
        loader = StatefulDataLoader(ds, batch_size=None, num_workers=num_workers)
        it = iter(loader)
        head = take(it, k)
        state = pickle.loads(pickle.dumps(loader.state_dict()))
        del it, loader
        ds2 = HiddenStateDataset(url, **kw)
        loader2 = StatefulDataLoader(ds2, batch_size=None, num_workers=num_workers)
        loader2.load_state_dict(state)
        rest = [ids_of(x) for x in loader2]
        expect = full if num_workers == 2 else expected_order(ds2, 0)
        assert head + rest == expect


def test_stateful_dataloader_with_loader_batching_and_an_early_checkpoint(local_ds):
    """DataLoader(batch_size=B) over single samples resumes exactly through StatefulDataLoader (the
    documented way: the global cursor assumes batch_size=None), also from a checkpoint taken before
    every worker has yielded, when a worker's state is where its iteration will start."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    url, _ = local_ds
    kw = {"seed": 3, "prefetch_bytes": 40 * TOKEN_BYTES}

    def loader(ds):
        return StatefulDataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_samples)

    full = [b["conversation_id"] for b in loader(HiddenStateDataset(url, **kw))]
    assert len(full) > 6
    for k in (0, 1, 4):
        first = loader(HiddenStateDataset(url, **kw))
        it = iter(first)
        head = [next(it)["conversation_id"] for _ in range(k)]
        state = pickle.loads(pickle.dumps(first.state_dict()))
        del it, first
        again = loader(HiddenStateDataset(url, **kw))
        again.load_state_dict(state)
        assert head + [b["conversation_id"] for b in again] == full, k


def test_checkpoints_at_an_epoch_boundary_resume_the_new_epoch(local_ds):
    """A state taken after set_epoch(e+1), before (or just after) the new epoch's first item, is a
    position in epoch e+1: it used to be the finished epoch e's count labelled e+1, so the resume
    lost that many items (in process, and in persistent StatefulDataLoader workers)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    url, _ = local_ds
    kw = {"seed": 5, "prefetch_bytes": 40 * TOKEN_BYTES}
    ds = HiddenStateDataset(url, **kw)
    for _ in ds:
        pass
    ds.set_epoch(1)
    state = ds.state_dict()
    assert (state["epoch"], state["items_yielded"]) == (1, 0)
    ds.load_state_dict({"epoch": 1, "items_consumed": 3})
    assert ds.state_dict()["items_yielded"] == 3              # the loaded position, not the last iteration's

    fresh = HiddenStateDataset(url, **kw)
    fresh.set_epoch(1)
    full = run_loader(fresh, num_workers=2)
    for head_n in (0, 1):
        ds = HiddenStateDataset(url, **kw)
        loader = StatefulDataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
        for _ in loader:                                     # epoch 0
            pass
        ds.set_epoch(1)
        it = iter(loader)
        head = take(it, head_n)
        state = pickle.loads(pickle.dumps(loader.state_dict()))
        del it, loader
        ds2 = HiddenStateDataset(url, **kw)
        ds2.set_epoch(1)
        again = StatefulDataLoader(ds2, batch_size=None, num_workers=2)
        again.load_state_dict(state)
        assert head + [ids_of(x) for x in again] == full, head_n


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_checkpoint_at_the_end_of_an_epoch_resumes_the_next_one(local_ds, num_workers):
    """The usual trainer: the loop of epoch e ends, the loader is checkpointed, and after a restart
    it is loaded and set_epoch(e + 1) called. StatefulDataLoader hands the saved state over only
    when the iterator starts, after set_epoch: the state of the finished epoch e rewound the
    dataset to e, which then yielded nothing (in process) or epoch e again (workers)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    url, _ = local_ds
    kw = {"seed": 3, "prefetch_bytes": 40 * TOKEN_BYTES}
    want = HiddenStateDataset(url, **kw)
    want.set_epoch(2)
    full = run_loader(want, num_workers=num_workers)
    ds = HiddenStateDataset(url, **kw)
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=num_workers)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for _ in loader:
            pass
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    for load_first in (True, False):                       # load, then set_epoch, or the other way round
        ds2 = HiddenStateDataset(url, **kw)
        again = StatefulDataLoader(ds2, batch_size=None, num_workers=num_workers)
        if load_first:
            again.load_state_dict(state)
        ds2.set_epoch(2)
        if not load_first:
            again.load_state_dict(state)
        assert [ids_of(x) for x in again] == full and ds2.epoch == 2, load_first

    # Not at the end of its epoch, an earlier state is a rollback: applied, also after set_epoch
    # and after another load (it was dropped, and the run silently started the newer epoch).
    ds = HiddenStateDataset(url, **kw)
    ds.set_epoch(1)
    it = iter(ds)
    head = take(it, 2)
    mid = ds.state_dict()
    rest = [ids_of(x) for x in it]
    for before in ({"set_epoch": 5}, {"load": {"epoch": 3, "items_consumed": 1}}):
        again = HiddenStateDataset(url, **kw)
        if "set_epoch" in before:
            again.set_epoch(before["set_epoch"])
        else:
            again.load_state_dict(before["load"])
        again.load_state_dict(mid)
        assert again.epoch == 1 and [ids_of(x) for x in again] == rest and len(head) == 2, before


def test_a_loaded_state_applies_to_one_iteration_with_workers(local_ds):
    """Workers apply a loaded state once: iterating the same epoch again (no set_epoch) reads all of
    it, as in process (the state stuck in the main process's copy and every iteration resumed)."""
    url, _ = local_ds
    kw = {"seed": 6, "prefetch_bytes": 40 * TOKEN_BYTES}
    full = run_loader(HiddenStateDataset(url, **kw), num_workers=2)
    for persistent in (False, True):
        ds = HiddenStateDataset(url, **kw)
        ds.load_state_dict({"epoch": 0, "items_consumed": 10})
        loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent)
        assert [ids_of(x) for x in loader] == full[10:]
        assert [ids_of(x) for x in loader] == full, persistent
        with pytest.warns(UserWarning, match="while DataLoader workers iterate"):
            assert ds.state_dict()["items_yielded"] == 0     # main process: the next iteration starts over


def test_reloading_the_same_checkpoint_resumes_again(local_ds):
    """Rolling back to a checkpoint twice on one StatefulDataLoader (e.g. after a NaN): the second
    load resumes too. Its id came from `random`, which the loader seeds per worker from the saved
    state, so the second load drew the first one's id and was taken as already applied."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    url, _ = local_ds
    kw = {"seed": 8, "prefetch_bytes": 40 * TOKEN_BYTES}
    full = run_loader(HiddenStateDataset(url, **kw), num_workers=2)
    first = StatefulDataLoader(HiddenStateDataset(url, **kw), batch_size=None, num_workers=2)
    it = iter(first)
    head = take(it, 7)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    del it, first
    loader = StatefulDataLoader(HiddenStateDataset(url, **kw), batch_size=None, num_workers=2)
    loader.load_state_dict(state)
    it = iter(loader)
    assert take(it, 3) == full[7:10]
    del it
    loader.load_state_dict(state)
    assert head + [ids_of(x) for x in loader] == full
    # and a state the workers applied is not applied again by an iteration in this process
    ds = HiddenStateDataset(url, **kw)
    ds.load_state_dict({"epoch": 0, "items_consumed": 10})
    assert run_loader(ds, num_workers=2) == full[10:]
    assert len([x for x in ds]) == ds.num_samples


def test_a_cursor_naming_its_num_workers_refuses_another(local_ds):
    """The items a count covers depend on num_workers; a cursor that names it is checked (one that
    does not cannot be, see docs/LOADER.md)."""
    url, _ = local_ds
    ds = HiddenStateDataset(url, seed=2)
    ds.load_state_dict({"epoch": 0, "items_consumed": 4, "num_workers": 2})
    with pytest.raises(DraftdataError, match="num_workers=2, this DataLoader has 1"):
        run_loader(ds, num_workers=1)
    ds.load_state_dict({"epoch": 0, "items_consumed": 4, "num_workers": 2})
    assert len(run_loader(ds, num_workers=2)) == ds.num_samples - 4
    ds.load_state_dict({"epoch": 0, "items_consumed": 4, "num_workers": 0})
    assert len(run_loader(ds, num_workers=0)) == ds.num_samples - 4
    ds.load_state_dict({"epoch": 0, "items_consumed": 4, "num_workers": 0})
    with pytest.raises(DraftdataError, match="num_workers=0, this DataLoader has 2"):
        run_loader(ds, num_workers=2)


def test_resume_refuses_a_different_setup(local_ds):
    url, _ = local_ds
    ds = HiddenStateDataset(url, rank=0, world_size=2)
    state = ds.state_dict()
    with pytest.raises(DraftdataError, match="world_size"):
        HiddenStateDataset(url, rank=0, world_size=3).load_state_dict(state)
    with pytest.raises(DraftdataError, match="seed=0 when saved, 1 now"):          # names the difference
        HiddenStateDataset(url, rank=0, world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(DraftdataError, match="max_tokens_per_batch=None when saved, 300 now"):
        HiddenStateDataset(url, rank=0, world_size=2, max_tokens_per_batch=300).load_state_dict(state)
    fewer = HiddenStateDataset(url, rank=0, world_size=2, parts=ds.part_ids[:-1])
    with pytest.raises(DraftdataError, match=f"{len(ds.part_ids)} committed parts when saved, "
                                             f"{len(ds.part_ids) - 1} now"):
        fewer.load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("settings", "parts")}  # saved by an earlier version
    with pytest.raises(DraftdataError, match="committed parts or the loader settings differ"):
        HiddenStateDataset(url, rank=0, world_size=2, seed=1).load_state_dict(old)
    other = HiddenStateDataset(url, rank=0, world_size=2)
    other.load_state_dict({**state, "items_yielded": 1})
    with pytest.raises(DraftdataError, match="num_workers"):
        run_loader(other, num_workers=2)


def test_s3_with_workers(s3_bucket):
    bucket, opts = s3_bucket
    url = f"{bucket}/hs"
    ref = write_dataset(url, [6, 4, 9], storage_options=opts, seed=1)
    per_rank = []
    for rank in range(2):
        # Opened (and its filesystem used) in the parent before the workers fork.
        ds = HiddenStateDataset(url, storage_options=opts, rank=rank, world_size=2, max_tokens_per_batch=70,
                                prefetch_bytes=40 * TOKEN_BYTES)
        assert len(list(ds)) == len(ds)
        items = run_loader(ds, num_workers=2, timeout=60)
        assert items == expected_order(ds, 2)
        per_rank.extend(flat(items))
    assert sorted(per_rank) == sorted(ref)
    batch = next(iter(HiddenStateDataset(url, storage_options=opts, batch_size=4)))
    for i, cid in enumerate(batch["conversation_id"]):
        n = int(batch["lengths"][i])
        assert torch.equal(batch["aux_hidden_states"][i, :n], ref[cid]["aux_hidden_states"])


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_corrupt_part_names_part_and_sample(tmp_path, fmt):
    url = str(tmp_path / "ds")
    ref = write_dataset(url, [4, 5, 3], fmt=fmt)
    ds = HiddenStateDataset(url, shuffle=False)
    victim = ds.store.parts[1]
    if fmt == "zarr":
        shard = Path(url) / "parts" / victim.id / "hidden_states" / "c" / "0" / "0"
        _flip_byte(shard, 40)
    else:
        f = Path(url) / "parts" / victim.id / "part.arrow"
        raw = f.read_bytes()
        marker = torch.full((H,), float(int(victim.conversation_ids[0][1:]) % 250), dtype=torch.bfloat16)
        _flip_byte(f, raw.index(marker.view(torch.uint16).numpy().tobytes()) + 1)
    with pytest.raises(CorruptDataError) as err:
        list(HiddenStateDataset(url, shuffle=False))
    msg = str(err.value)
    assert victim.id in msg and "sample 0" in msg and victim.conversation_ids[0] in msg
    with pytest.raises(CorruptDataError, match=victim.id):
        HiddenStateMapDataset(url)[4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [s["conversation_id"] for s in HiddenStateDataset(url, shuffle=False, on_corrupt="skip")]
    assert set(got) < set(ref) and not set(got) & set(victim.conversation_ids)
    assert any(victim.id in str(w.message) for w in caught)


def test_empty_batches_keep_the_plan_and_the_global_cursor_exact(tmp_path):
    """on_corrupt="skip" + empty_batches: a batch whose samples are all damaged arrives as a 0-row
    batch naming them, a partly damaged one lists what it lost, every planned item is yielded, and
    a global items_consumed cursor (with DataLoader workers) resumes exactly after such batches."""
    url = str(tmp_path / "ds")
    write_dataset(url, [6, 6, 6, 6])
    victim = HiddenStateDataset(url, shuffle=False).store.parts[1]
    _flip_byte(Path(url) / "parts" / victim.id / "hidden_states" / "c" / "0" / "0", 40)
    kw = dict(shuffle=False, batch_size=4, shuffle_window=12, on_corrupt="skip", empty_batches=True)
    ds = HiddenStateDataset(url, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    planned = expected_order(ds, 2)
    assert len(batches) == len(ds) == len(planned)
    for want, got in zip(planned, batches):
        lost = [c for c in want if c not in got["conversation_id"]]
        assert got["conversation_id"] == [c for c in want if c not in lost]
        assert len(got.get("skipped", [])) == len(lost)
        assert all(f"(conversation {c!r})" in r for c, r in zip(lost, got.get("skipped", [])))
        assert got["input_ids"].shape[0] == len(want) - len(lost)
    empty = [b for b in batches if b["input_ids"].shape[0] == 0]
    assert any(b.get("skipped") and b["input_ids"].shape[0] for b in batches)        # a partly damaged one
    assert empty and all(b["hidden_states"].shape == (0, 0, H) and b["lengths"].numel() == 0 for b in empty)
    first_empty = next(i for i, b in enumerate(batches) if b["input_ids"].shape[0] == 0)
    for consumed in (first_empty + 1, len(batches) - 1):
        again = HiddenStateDataset(url, **kw)
        again.load_state_dict({"epoch": 0, "items_consumed": consumed})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rest = [b["conversation_id"] for b in DataLoader(again, batch_size=None, num_workers=2)]
        assert rest == [b["conversation_id"] for b in batches[consumed:]]
    with pytest.raises(DraftdataError, match="needs batching"):
        HiddenStateDataset(url, on_corrupt="skip", empty_batches=True)


class _FlakyMemoryFS(MemoryFileSystem):
    """Fault injector: memory:// under the name flakymem://, whose reads of part data fail with the
    ConnectionResetError s3fs raises once its own retries are spent, while `failing` is set."""

    protocol = "flakymem"
    failing = False

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("flakymem://"):
            path = "memory://" + path[len("flakymem://"):]
        return super()._strip_protocol(path)

    @classmethod
    def check(cls, path: str) -> None:
        if cls.failing and "/parts/" in path:
            raise ConnectionResetError(104, "Connection reset by peer")

    def cat_file(self, path, start=None, end=None, **kwargs):
        self.check(self._strip_protocol(path))
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if mode != "rb":
            return f
        return _FlakyFile(bytes(f.getbuffer()), self._strip_protocol(path))


class _FlakyFile(io.BytesIO):
    def __init__(self, data: bytes, path: str):
        super().__init__(data)
        self.path = path

    def read(self, *args):
        _FlakyMemoryFS.check(self.path)
        return super().read(*args)


@pytest.fixture()
def flaky_fs():
    fsspec.register_implementation("flakymem", _FlakyMemoryFS, clobber=True)
    yield _FlakyMemoryFS
    _FlakyMemoryFS.failing = False


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_storage_outage_is_not_corruption(flaky_fs, fmt):
    """A read that fails in the storage layer raises StorageAccessError, also with on_corrupt="skip"
    (which would otherwise silently drop every sample during an outage); a missing object stays corruption."""
    name = f"outage-{fmt}-{uuid.uuid4().hex[:8]}/ds"
    ref = write_dataset(f"memory://{name}", [3, 3], fmt=fmt, max_len=5)
    url = f"flakymem://{name}"
    store = open_dataset(url)
    pid = store.parts[0].id
    assert store.sample(0)["conversation_id"] == store.parts[0].conversation_ids[0]  # range readers now cached
    flaky_fs.failing = True
    for read in (lambda: store.read_part(0), lambda: store.sample(1), lambda: open_dataset(url).sample(4),
                 lambda: HiddenStateMapDataset(url)[2],
                 lambda: list(HiddenStateDataset(url, batch_size=2, shuffle=False, io_threads=1,
                                                 on_corrupt="skip", empty_batches=True)),
                 lambda: list(HiddenStateDataset(url, shuffle=False, prefetch_bytes=2 * TOKEN_BYTES))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(StorageAccessError, match="ConnectionResetError") as err:
                read()
        assert not [w for w in caught if "skipping" in str(w.message)]
        assert "/parts/" in str(err.value) and "retry" in str(err.value)
    flaky_fs.failing = False
    got = [s["conversation_id"] for s in HiddenStateDataset(url, shuffle=False, on_corrupt="skip")]
    assert sorted(got) == sorted(ref) and store.sample(1)["conversation_id"] == store.parts[0].conversation_ids[1]
    victim = f"/{name}/parts/{pid}/" + ("part.arrow" if fmt == "arrow" else "hidden_states/c/0/0")
    MemoryFileSystem().rm(victim)
    with pytest.raises(CorruptDataError, match=pid):
        open_dataset(url).read_part(0)


def test_missing_and_empty_dataset(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no dataset here"):
        HiddenStateDataset(str(tmp_path / "nope"))
    with pytest.raises(DatasetNotFoundError):
        HiddenStateMapDataset(str(tmp_path / "nope"))
    write_dataset(str(tmp_path / "empty"), [])
    with pytest.raises(DraftdataError, match="no committed samples"):
        HiddenStateDataset(str(tmp_path / "empty"))
    with pytest.raises(DraftdataError, match="positive"):
        HiddenStateDataset(str(tmp_path / "empty"), batch_size=0)


def test_map_dataset_with_distributed_sampler(local_ds):
    url, ref = local_ds
    ds = HiddenStateMapDataset(url, max_seq_len=12)
    assert len(ds) == len(ref)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_samples, num_workers=1)
        for batch in loader:
            assert batch["input_ids"].shape[1] <= 12
            for i, cid in enumerate(batch["conversation_id"]):
                n = int(batch["lengths"][i])
                assert torch.equal(batch["hidden_states"][i, :n], ref[cid]["hidden_states"][:n])
            seen.extend(batch["conversation_id"])
    assert len(seen) == len(set(seen)) == len(ref)
    assert ds[-1]["conversation_id"] == ds.store.parts[-1].conversation_ids[-1]
    assert list(ds.lengths()) == [min(12, len(ref[c]["input_ids"])) for p in ds.store.parts for c in p.conversation_ids]


@pytest.mark.parametrize("codec", ["bf16", "zstd"])
def test_store_range_reads_match_zarr(tmp_path, codec):
    """The loader's range reads (the store's direct shard path) return what zarr-python decodes."""
    hidden = 256  # ~680 token rows per chunk: several chunks per array
    schema = DatasetSchema(base_model_id="t", hidden_size=hidden, aux_layer_ids=[0, 1, 2], num_hidden_layers=4,
                           vocab_size=400, max_seq_len=4096)
    w = create_dataset(str(tmp_path / "ds"), schema, codec=codec)
    pw = w.open_part()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        n = 50 + 37 * i
        pw.add({"conversation_id": f"c{i}", "input_ids": torch.arange(n, dtype=torch.int32),
                "loss_mask": torch.ones(n, dtype=torch.uint8),
                "aux_hidden_states": torch.randn(n, 3 * hidden, generator=g).to(torch.bfloat16),
                "hidden_states": torch.randn(n, hidden, generator=g).to(torch.bfloat16)})
    pw.commit()
    reader = open_dataset(str(tmp_path / "ds")).reader(0)
    rng = np.random.default_rng(0)
    for name in ("input_ids", "aux_hidden_states", "hidden_states"):
        ref = reader.array(name)[:]
        assert np.array_equal(reader.read(name), ref)
        rows = len(ref)
        for a, b in [(0, 1), (rows - 1, rows), (680, 1400), (5, 5)] + [tuple(sorted(rng.integers(0, rows + 1, 2)))
                                                                    for _ in range(8)]:
            assert np.array_equal(reader.read(name, int(a), int(b)), ref[a:b])


def test_collate_converts_other_float_hidden_states_to_bf16():
    """Hidden states from elsewhere (fp32, fp16) are converted, not reinterpreted as bf16 bits."""
    samples = [{"conversation_id": f"c{i}", "input_ids": torch.arange(3), "loss_mask": torch.ones(3, dtype=torch.uint8),
                "hidden_states": torch.full((3, 4), 0.75, dtype=dtype),
                "aux_hidden_states": torch.full((3, 8), 2.5, dtype=dtype)}
               for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16))]
    batch = collate_samples(samples)
    assert batch["hidden_states"].dtype == torch.bfloat16
    assert torch.equal(batch["hidden_states"].float(), torch.full((3, 3, 4), 0.75))
    assert torch.equal(batch["aux_hidden_states"].float(), torch.full((3, 3, 8), 2.5))


DDP_LOADER_SCRIPT = """
import json, os, sys, time
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_loader import write_dataset
from draftdata.loaders import HiddenStateDataset

url, out = sys.argv[1], sys.argv[3]
early = HiddenStateDataset(url, shuffle=False)  # before the process group: torchrun's RANK / WORLD_SIZE
dist.init_process_group("gloo")
rank = dist.get_rank()
dist.barrier()
if rank == 1:  # collection commits a part while rank 0 lists the dataset
    time.sleep(2)
    write_dataset(url, [6], first=1000)
ds = HiddenStateDataset(url, shuffle=True, seed=3)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"early": [early.rank, early.world_size, len(early)], "parts": ds.part_ids,
               "ids": [s["conversation_id"] for s in ds]}, f)
dist.destroy_process_group()
"""


def test_torchrun_ranks_split_one_snapshot_whenever_the_dataset_is_created(tmp_path):
    """Under torchrun, a dataset created before init_process_group gave every rank the whole
    dataset (rank 0 of 1: every sample twice per epoch); ranks that listed a growing dataset at
    different moments split different snapshots (samples lost or repeated). Now RANK/WORLD_SIZE
    are read from the launcher, and with a process group every rank takes rank 0's snapshot."""
    import socket
    import subprocess
    import sys

    url = str(tmp_path / "ds")
    write_dataset(url, PARTS)
    script = tmp_path / "ddp_loader.py"
    script.write_text(DDP_LOADER_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), str(script), url, str(Path(__file__).parent), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                             "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [r0["early"][:2], r1["early"][:2]] == [[0, 2], [1, 2]] and r0["early"][2] + r1["early"][2] == 50
    assert r0["parts"] == r1["parts"]
    snapshot = open_dataset(url).subset(r0["parts"])
    expected = sorted(c for p in snapshot.parts for c in p.conversation_ids)
    assert sorted(r0["ids"] + r1["ids"]) == expected


def test_batch_buffers_of_no_elements():
    """Zero-length samples collate into shapes like (2, 0): the buffer helper failed on them once
    large buffers came from an anonymous mapping (a 0-byte array has stride 0)."""
    from draftdata.loaders.collate import empty

    for shape, dtype in (((2, 0), torch.int64), ((4, 0, 64), torch.bfloat16), ((0,), torch.uint8)):
        assert empty(shape, dtype).shape == shape
    big = empty((1024, 2048), torch.bfloat16)  # 4 MiB: an own mapping
    big.fill_(1.5)
    assert big.dtype == torch.bfloat16 and big.is_contiguous() and float(big.sum()) == 1.5 * 1024 * 2048
