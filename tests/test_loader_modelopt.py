"""The ModelOpt drop-in against the real nvidia-modelopt (0.47): same samples and batches as its own
`OfflineSupervisedDataset` + `EagleOfflineDataCollator`, and forward/backward of an EAGLE model
converted with eagle_offline=True on batches from our loaders (CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from draftdata.config import DatasetSchema
from draftdata.errors import DraftdataError
from draftdata.loaders.modelopt import (
    SAMPLE_KEYS,
    EagleOfflineCollator,
    OfflineDataset,
    StreamingOfflineDataset,
    check_compatible,
    make_eagle_offline_data_module,
)
from draftdata.store import create_dataset

mtsp = pytest.importorskip("modelopt.torch.speculative")
eagle_utils = pytest.importorskip("modelopt.torch.speculative.eagle.utils")

AUX_IDS = [0, 2]  # 0-based decoder-layer outputs, as ModelOpt and draftdata number them
TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is 12 plus 30? The answer is 42.",
         "Write a short poem about the sea. Waves roll in, waves roll out.", "hello world numbers 0 1 2 3",
         "Speculative decoding drafts tokens with a small model and verifies them with the base model."]


@pytest.fixture(scope="module")
def base(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    return model, tok


@pytest.fixture(scope="module")
def data(base, tmp_path_factory):
    """One dataset written with the store and the same samples as ModelOpt .pt dumps."""
    model, tok = base
    root = tmp_path_factory.mktemp("modelopt")
    cfg = model.config
    schema = DatasetSchema(base_model_id="tiny", hidden_size=cfg.hidden_size, aux_layer_ids=AUX_IDS,
                           num_hidden_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size, max_seq_len=512)
    writer = create_dataset(str(root / "ds"), schema)
    pt_files = []
    for part in (TEXTS[:3], TEXTS[3:]):
        pw = writer.open_part()
        for text in part:
            chat = [{"role": "user", "content": text}, {"role": "assistant", "content": text[::-1]}]
            ids = tok(tok.apply_chat_template(chat, tokenize=False), return_tensors="pt")["input_ids"]
            with torch.no_grad():
                hs = model(ids, output_hidden_states=True).hidden_states
            aux = torch.cat([hs[k + 1][0] for k in AUX_IDS], dim=-1)
            mask = (torch.arange(ids.shape[1]) % 3 != 0).to(torch.uint8)
            cid = f"conv{len(pt_files)}"
            pw.add({"conversation_id": cid, "input_ids": ids[0], "loss_mask": mask,
                    "aux_hidden_states": aux, "hidden_states": hs[-1][0]})
            path = root / f"{cid}.pt"  # ModelOpt's collect_hidden_states layout
            torch.save({"input_ids": ids[0], "hidden_states": hs[-1][0].clone(), "aux_hidden_states": aux.clone(),
                        "loss_mask": mask.long(), "conversation_id": cid}, path)
            pt_files.append(str(path))
        pw.commit()
    return str(root / "ds"), pt_files


def eagle_model(base_model):
    model = copy.deepcopy(base_model)
    cfg = model.config
    mtsp.convert(model, [("eagle", {
        "eagle_offline": True,
        "eagle_use_torch_compile": False,
        "eagle_architecture_config": {
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "draft_vocab_size": cfg.vocab_size,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": cfg.hidden_size // 4,
            "intermediate_size": 2 * cfg.hidden_size, "max_position_embeddings": 512,
            "eagle_aux_hidden_state_layer_ids": AUX_IDS,
        },
    })])
    return model


def _same(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("answer_only_loss", [False, True])
def test_samples_and_batches_match_modelopt(data, answer_only_loss):
    url, pt_files = data
    ours = OfflineDataset(url, answer_only_loss=answer_only_loss)
    theirs = eagle_utils.OfflineSupervisedDataset(pt_files, answer_only_loss=answer_only_loss)
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        assert tuple(ours[i]) == SAMPLE_KEYS
        _same(ours[i], theirs[i])
    for train_len in (8, 64):
        batch = [ours[i] for i in range(3)]
        _same(EagleOfflineCollator(train_len)(batch), eagle_utils.EagleOfflineDataCollator(train_len)(batch))
    streamed = {tuple(s["input_ids"].tolist()): s for s in StreamingOfflineDataset(url, answer_only_loss=answer_only_loss)}
    assert len(streamed) == len(theirs)
    for i in range(len(theirs)):
        _same(streamed[tuple(theirs[i]["input_ids"].tolist())], theirs[i])


def test_forward_backward_on_our_batches(base, data):
    url, pt_files = data
    model = eagle_model(base[0])
    check_compatible(model, OfflineDataset(url).schema)
    model.train()

    # Same samples, same order: the loss on our batch equals the loss on ModelOpt's own batch.
    ours = EagleOfflineCollator(32)([OfflineDataset(url, answer_only_loss=True)[i] for i in range(2)])
    ref_ds = eagle_utils.OfflineSupervisedDataset(pt_files, answer_only_loss=True)
    theirs = eagle_utils.EagleOfflineDataCollator(32)([ref_ds[i] for i in range(2)])
    with torch.no_grad():
        assert model(**ours).loss.item() == model(**theirs).loss.item()

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    module = make_eagle_offline_data_module(url, train_len=32, answer_only_loss=True)
    loaders = [
        DataLoader(module["train_dataset"], batch_size=2, shuffle=True, collate_fn=module["data_collator"]),
        DataLoader(StreamingOfflineDataset(url, answer_only_loss=True, seed=1), batch_size=2,
                   collate_fn=EagleOfflineCollator(32)),
    ]
    steps = 0
    for loader in loaders:
        for batch in loader:
            out = model(**batch)
            assert torch.isfinite(out.loss)
            opt.zero_grad()
            out.loss.backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
            opt.step()
            steps += 1
    assert steps == 6
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))


def test_hf_trainer_runs_on_the_drop_in(base, data, tmp_path):
    from transformers import Trainer, TrainingArguments

    url, _ = data
    model = eagle_model(base[0])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                             report_to=[], save_strategy="no", remove_unused_columns=False, logging_steps=1,
                             learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, **make_eagle_offline_data_module(url, train_len=32))
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_check_compatible_names_the_mismatch(base, data):
    url, _ = data
    schema = OfflineDataset(url).schema
    wrong = DatasetSchema.from_dict({**schema.to_dict(), "aux_layer_ids": [1, 2, 3]})
    with pytest.raises(DraftdataError, match="aux layer ids"):
        check_compatible(eagle_model(base[0]), wrong)
    with pytest.raises(DraftdataError, match="eagle_config"):
        check_compatible(base[0], schema)
