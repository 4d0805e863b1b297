"""Helpers for the training tests: real hidden-state datasets computed from the tiny model.

Hidden states come from the real base model (HF `output_hidden_states`) and are written with
the real store, exactly as `draftdata collect` would lay them out (aux layer k = hidden_states[k+1],
final = hidden_states[-1], post-norm). No tests live here.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from draftdata.config import DatasetSchema

WORDS = ("the quick brown fox jumps over lazy dog what is plus answer speculative decoding drafts tokens "
         "small model verifies base write short poem about sea waves roll numbers hello world").split()


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30)))
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    return out


def tokenize(tokenizer: Any, conv: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """ChatML ids and the assistant loss mask (1 on the assistant content and its end token)."""
    prompt = tokenizer.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conv, tokenize=False)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    mask = [0] * len(p) + [1] * (len(ids) - len(p) - 1) + [0]
    return ids, mask


def make_dataset(url: str, model_dir: str | Path, *, n: int = 24, seed: int = 0, aux_layer_ids=(0, 1, 2),
                 fmt: str = "zarr", codec: str = "bf16", per_part: int = 8,
                 storage_options: dict | None = None) -> DatasetSchema:
    """Run the tiny model over `n` random conversations and store its hidden states at `url`."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from draftdata.store import create_dataset

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    schema = DatasetSchema(base_model_id=str(model_dir), hidden_size=cfg.hidden_size,
                           aux_layer_ids=list(aux_layer_ids), num_hidden_layers=cfg.num_hidden_layers,
                           vocab_size=cfg.vocab_size, max_seq_len=512)
    writer = create_dataset(url, schema, format=fmt, codec=codec, storage_options=storage_options)
    part = writer.open_part()
    for i, conv in enumerate(conversations(n, seed)):
        ids, mask = tokenize(tok, conv)
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        aux = torch.cat([hs[k + 1][0] for k in aux_layer_ids], dim=-1).bfloat16()
        part.add({"conversation_id": f"c{seed}-{i}", "input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask),
                  "aux_hidden_states": aux, "hidden_states": hs[-1][0].bfloat16()})
        if part.num_samples >= per_part:
            part.commit()
            part = writer.open_part()
    part.commit()
    return schema


def damage_part(url: str, part_id: str) -> None:
    """Flip one byte inside the hidden-states shard of a zarr part: every sample of it fails its CRC."""
    shard = Path(url) / "parts" / part_id / "hidden_states" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x5A
    shard.write_bytes(bytes(data))


def damage_first_batch(url: str, *, seed: int, batch_tokens: int, rank: int = 0, world_size: int = 1) -> Any:
    """Damage the part that holds `rank`'s first batch of epoch 0 (as the trainer plans it with
    `--batch-tokens`); returns that part's PartInfo."""
    from draftdata.loaders import HiddenStateDataset

    ds = HiddenStateDataset(url, seed=seed, rank=rank, world_size=world_size, max_seq_len=batch_tokens,
                            max_tokens_per_batch=batch_tokens)
    plan = ds.plan()
    victim = ds.store.parts[int(plan.part[plan.worker_windows(0, 1)[0].items[0][0]])]
    damage_part(url, victim.id)
    return victim


TINY_ARCH = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96}


_DATASETS: dict[str, str] = {}


@pytest.fixture(scope="session")
def train_data(tiny_model, tmp_path_factory) -> str:
    """48 conversations of real tiny-model hidden states in a zarr dataset (6 parts); built once per
    session even though several test modules import this fixture."""
    if "train" not in _DATASETS:
        url = str(tmp_path_factory.mktemp("train_data") / "ds")
        make_dataset(url, tiny_model, n=48)
        _DATASETS["train"] = url
    return _DATASETS["train"]


def _can_create_files_in(directory: Path) -> bool:
    probe = directory / "draftdata-write-probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.fixture
def unwritable_dir(tmp_path) -> Iterator[Path]:
    """A directory this process cannot create files in: a read-only (0555) one, or, for root, whom
    permissions do not stop, /sys (the kernel refuses new files there); skipped if neither is."""
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        found = next((d for d in (read_only, Path("/sys")) if d.is_dir() and not _can_create_files_in(d)), None)
        if found is None:
            pytest.skip("no directory this process cannot write into")
        yield found
    finally:
        read_only.chmod(0o755)
