"""`draftdata eval`: real chain speculative decoding against the HF base model.

The output must be the base model's greedy output token for token, whatever the draft. To
check the acceptance accounting too, drafts are *constructed* to agree with the base:

- a "successor" base: every decoder layer adds nothing (o_proj = down_proj = 0), the embeddings
  have equal norms, and lm_head = E[f], so the greedy next token is f(current token) for a
  chosen involution f (or the identity);
- a draft whose fc passes the first aux slot through and whose midlayer adds nothing, with
  lm_head = E: from the pair (x_{t+1}, aux_t) it predicts x_t, and it keeps predicting x_t
  along the chain. Under f = identity every draft is right (acceptance length K+1); under an
  involution f(f(x)) = x only the first draft is right (acceptance length exactly 2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model  # noqa: E402

from draftdata.config import DatasetSchema, EagleConfig  # noqa: E402
from draftdata.train import evaluate as ev  # noqa: E402
from draftdata.train.export import export_draft  # noqa: E402
from draftdata.train.model import build_draft, draft_step, save_draft  # noqa: E402

SMALL_DRAFT = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
K = 4


def schema_for(base_dir: Path, aux: list[int]) -> DatasetSchema:
    cfg = json.loads((base_dir / "config.json").read_text())
    return DatasetSchema(base_model_id="tiny", hidden_size=cfg["hidden_size"], aux_layer_ids=aux,
                         num_hidden_layers=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"], max_seq_len=256)


def exported_draft(tmp: Path, base_dir: Path, *, arch: dict | None = None, aux=(0, 1, 2), draft_vocab=None,
                   craft: torch.Tensor | None = None, dtype: str = "float32") -> Path:
    """Build a draft with the trainer's API (optionally crafted to copy aux slot 0 and predict with
    lm_head rows `craft`), save it as a trainer checkpoint, export it, return the export dir."""
    eagle = EagleConfig.from_dict({"eagle_architecture_config": {**SMALL_DRAFT, **(arch or {})}})
    draft, _ = build_draft(base_dir, eagle, schema_for(base_dir, list(aux)), draft_vocab=draft_vocab)
    if craft is not None:
        h = draft.config.hidden_size
        with torch.no_grad():
            fc = torch.zeros(h, len(aux) * h)
            fc[:, :h] = torch.eye(h)
            draft.fc.weight.copy_(fc)
            draft.midlayer.self_attn.o_proj.weight.zero_()
            draft.midlayer.mlp.down_proj.weight.zero_()
            draft.lm_head.weight = torch.nn.Parameter(craft.clone())
    save_draft(tmp / "ckpt", draft)
    return export_draft(tmp / "ckpt", tmp / "export", dtype=dtype)


def successor_base(path: Path, involution: bool) -> tuple[Path, torch.Tensor, list[int]]:
    """A tiny Llama whose greedy next token is f(current); returns (dir, embedding, f)."""
    from transformers import LlamaForCausalLM

    make_tiny_model(path, seed=1)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    v, h = model.config.vocab_size, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(v, h, generator=g)
    emb = emb / emb.norm(dim=1, keepdim=True) * h ** 0.5      # equal norms: RMSNorm leaves rows as they are
    f = list(range(v))
    if involution:
        for i in range(3, v - 1, 2):                          # keep the special tokens 0..2 fixed
            f[i], f[i + 1] = i + 1, i
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight.copy_(emb[f])                     # logits_j = E[f(j)] . E[x]: argmax j = f(x)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(path)
    return path, emb, f


def write_prompts(path: Path) -> Path:
    rows = [
        {"conversation_id": "a", "conversations": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 12 plus 30?"},
            {"role": "user", "content": "And the quick brown fox?"}]},
        {"conversation_id": "b", "conversations": [{"role": "user", "content": "Write a short poem about the sea."},
                                                   {"role": "assistant", "content": "ignored"}]},
        {"conversation_id": "c", "conversations": [{"role": "assistant", "content": "no user turn"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention (several times slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


def run_eval(base_dir: Path, export_dir: Path, prompts: Path, **kw):
    torch.manual_seed(0)
    base, tok, _ = ev.load_base(base_dir, torch.device("cpu"), torch.float64)
    draft = ev.load_exported_draft(export_dir, base, dtype=torch.float64)
    convs = ev.read_prompts(str(prompts))
    kw = {"steps": K, "max_new_tokens": 24, "methods": ("greedy", "eagle"), "warmup": False,
          "progress": False, **kw}
    return ev.evaluate(base, tok, draft, convs, **kw)


def test_random_draft_output_is_greedy_output(tiny_model, prompts, tmp_path):
    export = exported_draft(tmp_path, tiny_model)
    r = run_eval(tiny_model, export, prompts, methods=("greedy", "eagle", "prompt_lookup"))
    assert r["turns"] == 3 and r["conversations"] == 2          # record "c" has no user turn: skipped
    assert r["output_matches_greedy"]["eagle"]["equal"] == 3, r["output_matches_greedy"]
    assert r["output_matches_greedy"]["prompt_lookup"]["equal"] == 3
    e = r["eagle"]
    assert e["tokens"] == r["greedy"]["tokens"]
    assert e["verify_passes"] > 0
    assert e["acceptance_length"] == pytest.approx(1 + sum(e["acceptance_rate_per_position"]))
    assert e["base_forwards"] == e["verify_passes"] + r["turns"]  # one prefill per turn
    assert set(r["speedup"]) == {"eagle_vs_greedy", "eagle_vs_prompt_lookup", "prompt_lookup_vs_greedy"}
    assert r["per_prompt"][1]["turn"] == 2 and r["per_prompt"][1]["prompt_tokens"] > r["per_prompt"][0]["prompt_tokens"]
    text = ev.format_report(r)
    assert "acceptance length" in text and "speedup eagle_vs_greedy" in text


def test_sliding_window_base_output_is_greedy_output(tiny_model, prompts, tmp_path):
    """A base whose own KV cache keeps a sliding window (Mistral, Gemma): the verify pass's cache
    could not be cropped back to the accepted tokens ("Cannot crop a DynamicSlidingWindowLayer"),
    a traceback after the greedy reference had run."""
    from transformers import MistralConfig, MistralForCausalLM

    base_dir = tmp_path / "mistral"
    shutil.copytree(tiny_model, base_dir)
    cfg = json.loads((tiny_model / "config.json").read_text())
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=cfg["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=8,
        bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"], pad_token_id=cfg["pad_token_id"]))
    (base_dir / "model.safetensors").unlink()
    mistral.save_pretrained(base_dir)
    r = run_eval(base_dir, exported_draft(tmp_path, base_dir), prompts)
    assert r["output_matches_greedy"]["eagle"]["equal"] == 3


def test_greedy_reference_ignores_the_models_shipped_generation_settings(tiny_model, prompts, tmp_path):
    """A base whose generation_config.json ships a repetition penalty and sampling (as Qwen2.5's
    does): the greedy and prompt-lookup references took the penalty and matched EAGLE on 0 turns."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    cfg = json.loads((base / "generation_config.json").read_text())
    cfg.update({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.5,
                "no_repeat_ngram_size": 2})
    (base / "generation_config.json").write_text(json.dumps(cfg))
    model, tok, _ = ev.load_base(base, torch.device("cpu"), torch.float64)
    assert model.generation_config.repetition_penalty == 1.5
    text = tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False,
                                   add_generation_prompt=True)
    prompt = tok.encode(text, add_special_tokens=False)
    eos = {tok.eos_token_id}
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):                                      # greedy by hand: argmax, no processors
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in eos:
                break
    want = ids[len(prompt):]
    assert ev.hf_generate(model, prompt, 20, eos, tok.pad_token_id).tokens == want
    assert ev.hf_generate(model, prompt, 20, eos, tok.pad_token_id, prompt_lookup_num_tokens=3).tokens == want
    assert model.generation_config.repetition_penalty == 1.5         # set back after the call
    export = exported_draft(tmp_path, base)
    r = run_eval(base, export, prompts, methods=("greedy", "eagle", "prompt_lookup"))
    assert r["output_matches_greedy"]["eagle"]["equal"] == r["turns"] == 3


def test_an_export_whose_config_disagrees_with_its_tensors_is_one_line(tiny_model, tmp_path):
    from draftdata.errors import DraftdataError

    export = exported_draft(tmp_path, tiny_model)
    cfg = json.loads((export / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (export / "config.json").write_text(json.dumps(cfg))
    base, _, _ = ev.load_base(tiny_model, torch.device("cpu"), torch.float32)
    with pytest.raises(DraftdataError, match=r"tensor shapes disagree with .*config.json \(size mismatch for "
                                             r"midlayer.mlp.\w+_proj.weight"):
        ev.load_exported_draft(export, base)


def test_agreeing_draft_accepts_every_draft(tmp_path, prompts):
    base_dir, emb, _ = successor_base(tmp_path / "base", involution=False)
    export = exported_draft(tmp_path, base_dir, craft=emb)
    r = run_eval(base_dir, export, prompts)
    e = r["eagle"]
    assert r["output_matches_greedy"]["eagle"]["equal"] == 3
    assert e["acceptance_length"] == pytest.approx(K + 1)
    assert e["acceptance_rate_per_position"] == [1.0] * K
    # 24 tokens per turn: the prefill gives 1, then ceil(23 / 5) = 5 verify passes.
    assert e["verify_passes"] == 3 * 5 and e["tokens"] == 3 * 24


def test_half_agreeing_draft_with_compressed_vocab_fc_norm_and_norm_output(tmp_path, prompts):
    """Only d_1 is right under an involution: acceptance length exactly 2. The draft predicts over a
    16-token vocabulary (d2t must map it back) and uses the EAGLE 3.1 switches."""
    from draftdata.train.vocab import select_draft_vocab

    base_dir, emb, f = successor_base(tmp_path / "base", involution=True)
    # The tokens in play: the last token of each chat prompt (the generation prompt ends with it) and f of it.
    tok_ids = [int(t) for t in range(emb.shape[0]) if t >= 3]
    counts = torch.zeros(emb.shape[0], dtype=torch.int64)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    last = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-1]
    assert f[last] != last
    counts[[last, f[last]]] = 1000
    counts[tok_ids[:40]] += 1
    vocab = select_draft_vocab(counts, 16)
    assert vocab.t2d[last] and vocab.t2d[f[last]]
    export = exported_draft(tmp_path, base_dir, craft=emb[vocab.target_ids()], draft_vocab=vocab,
                            arch={"fc_norm": True, "norm_output": True})
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 16 and cfg["fc_norm"] and cfg["norm_output"]
    r = run_eval(base_dir, export, prompts)
    e = r["eagle"]
    assert r["output_matches_greedy"]["eagle"]["equal"] == 3
    assert e["acceptance_length"] == pytest.approx(2.0)
    assert e["acceptance_rate_per_position"] == [1.0, 0.0, 0.0, 0.0]
    assert e["conditional_acceptance_rate_per_position"] == [1.0, 0.0, None, None]


def test_draft_runner_kv_cache_matches_full_recompute(tiny_model, tmp_path):
    """Catch-up in two chunks + chain proposals with the KV cache give the same drafts as
    recomputing the whole sequence with the trainer's `draft_step` (positions 0..T-1)."""
    export = exported_draft(tmp_path, tiny_model, dtype="float32")
    base, _, _ = ev.load_base(tiny_model, torch.device("cpu"), torch.float64)
    loaded = ev.load_exported_draft(export, base, dtype=torch.float64)
    model = loaded.model
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                      # spread the logits so argmax is far from ties
        for p in model.parameters():
            if p.requires_grad or p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    m, h = 11, model.config.hidden_size
    ctx = torch.randint(3, model.config.vocab_size, (m + 1,), generator=g).tolist()
    aux = torch.randn(m, 3 * h, generator=g, dtype=torch.float64)

    runner = ev.DraftRunner(loaded)
    runner.catch_up(ctx[1:6], aux[:5])
    first, state = runner.catch_up(ctx[6:m + 1], aux[5:])
    drafts = runner.propose(first, state, K)
    assert runner.length == m and runner.kv[0].shape[2] == m    # chain entries are not kept

    ref, ids, hidden = [], torch.tensor(ctx[1:m + 1]), model.combine_aux(aux[None])[0]
    for _ in range(K):
        out = draft_step(model, ids, hidden, hidden_is_aux=False)
        ref.append(int(model.to_target_ids(out.logits[0, -1].argmax())))
        ids = torch.cat([ids, torch.tensor([ref[-1]])])
        hidden = torch.cat([hidden, out.hidden[0, -1:]])
    assert drafts == ref


def test_aux_capture_is_decoder_layer_output(tiny_model):
    """Hook on layers[k] == HF hidden_states[k+1]: the ModelOpt / TRT-LLM id k (vLLM id k+1)."""
    base, _, _ = ev.load_base(tiny_model, torch.device("cpu"), torch.float32)
    cap = ev.AuxCapture(base, [0, 2])
    try:
        out = base(input_ids=torch.tensor([[5, 6, 7, 8]]), output_hidden_states=True)
        got = cap.take()
    finally:
        cap.close()
    want = torch.cat([out.hidden_states[1][0], out.hidden_states[3][0]], dim=-1)
    assert torch.equal(got, want)


def test_load_accepts_layers0_names_and_vllm_only_ids(tiny_model, tmp_path):
    """Third-party exports: `layers.0.*` names (ModelOpt) and only vLLM's top-level ids."""
    from safetensors.torch import load_file, save_file

    export = exported_draft(tmp_path, tiny_model, aux=(1, 2, 3))
    state = load_file(str(export / "model.safetensors"))
    save_file({k.replace("midlayer.", "layers.0."): v for k, v in state.items() if k != "t2d"},
              str(export / "model.safetensors"))
    cfg = json.loads((export / "config.json").read_text())
    del cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    (export / "config.json").write_text(json.dumps(cfg))
    base, _, _ = ev.load_base(tiny_model, torch.device("cpu"), torch.float32)
    loaded = ev.load_exported_draft(export, base)
    assert loaded.aux_layer_ids == [1, 2, 3]
    assert torch.equal(loaded.model.midlayer.mlp.up_proj.weight, state["midlayer.mlp.up_proj.weight"].float())

    cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [0, 1, 2]   # disagrees with vLLM's [2, 3, 4]
    (export / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ev.DraftdataError, match="disagree"):
        ev.load_exported_draft(export, base)


def test_norm_before_residual_drafts_are_built_exported_and_read_back(tiny_model, tmp_path):
    """Drafts trained by speculators set norm_before_residual (the layer's residual is hidden_norm(h),
    not h): eval read them as the other layer and measured another model, silently. RMSNorm ignores
    the state's scale, so with the flag the draft's output does not change when h is scaled."""
    base, _, _ = ev.load_base(tiny_model, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    h = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    embeds, hidden, positions = torch.randn(1, 5, h), torch.randn(1, 5, h), torch.arange(5)[None]
    for flag in (True, False):
        export = exported_draft(tmp_path / str(flag), tiny_model, arch={"norm_before_residual": flag})
        assert json.loads((export / "config.json").read_text()).get("norm_before_residual", False) is flag
        draft = ev.load_exported_draft(export, base).model
        assert draft.config.norm_before_residual is flag
        with torch.no_grad():
            same = torch.allclose(draft(embeds, hidden, positions).logits, draft(embeds, 10 * hidden, positions).logits,
                                  atol=1e-5)
        assert same is flag


def test_load_reads_a_pytorch_model_bin_draft_without_unpickling_objects(tiny_model, tmp_path):
    """The EAGLE authors release drafts as config.json + pytorch_model.bin: read with weights_only,
    so a file that pickles anything but tensors is refused in one line naming it."""
    from safetensors.torch import load_file

    export = exported_draft(tmp_path, tiny_model)
    state = load_file(str(export / "model.safetensors"))
    (export / "model.safetensors").unlink()
    torch.save(state, export / "pytorch_model.bin")
    base, _, _ = ev.load_base(tiny_model, torch.device("cpu"), torch.float32)
    loaded = ev.load_exported_draft(export, base)
    assert torch.equal(loaded.model.fc.weight, state["fc.weight"].float())

    torch.save({"fc.weight": state["fc.weight"], "note": ev.PromptConversation("x", [], [])},
               export / "pytorch_model.bin")
    with pytest.raises(ev.DraftdataError, match=r"pytorch_model\.bin: cannot read .* plain tensor"):
        ev.load_exported_draft(export, base)
    torch.save({"fc.weight": state["fc.weight"], "step": 3}, export / "pytorch_model.bin")
    with pytest.raises(ev.DraftdataError, match=r"pytorch_model\.bin: expected a flat"):
        ev.load_exported_draft(export, base)
    (export / "pytorch_model.bin").unlink()
    with pytest.raises(ev.DraftdataError, match=r"model\.safetensors not found .* or pytorch_model\.bin"):
        ev.load_exported_draft(export, base)


def test_a_system_message_between_turns_stays_where_the_file_puts_it(tiny_model, tmp_path):
    """A system message after the first answer was moved to the start of every turn's prompt, so
    turn 1 was measured on a prompt the file never shows it with."""
    from transformers import AutoTokenizer

    path = tmp_path / "p.jsonl"
    msgs = [{"role": "system", "content": "first system"}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "x"}, {"role": "system", "content": "second system"},
            {"role": "user", "content": "two"}, {"role": "system", "content": "after the last turn"}]
    path.write_text(json.dumps({"conversation_id": "s", "conversations": msgs}) + "\n")
    (conv,) = ev.read_prompts(str(path))
    assert conv.system == [msgs[0]] and conv.user_turns == ["one", "two"] and conv.later_system == {1: [msgs[3]]}
    r = run_eval(tiny_model, exported_draft(tmp_path, tiny_model), path)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    first = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert r["per_prompt"][0]["prompt_tokens"] == len(tok(first, add_special_tokens=False)["input_ids"])


def test_a_malformed_export_config_is_one_line(tiny_model, tmp_path):
    """A third-party or hand-edited config.json without a size, with a size of the wrong type, or
    holding a list was a KeyError / ValueError / AttributeError traceback."""
    export = exported_draft(tmp_path, tiny_model)
    base, _, _ = ev.load_base(tiny_model, torch.device("cpu"), torch.float32)
    good = json.loads((export / "config.json").read_text())
    for bad, match in (({k: v for k, v in good.items() if k != "intermediate_size"}, "no intermediate_size"),
                       ({**good, "num_attention_heads": "many"}, "a field has the wrong type"),
                       ([good], "holds a JSON list, not a model config")):
        (export / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ev.DraftdataError, match=match):
            ev.load_exported_draft(export, base)


def test_eval_rejects_a_trainer_checkpoint(tiny_model, tmp_path):
    exported_draft(tmp_path, tiny_model)
    base, _, _ = ev.load_base(tiny_model, torch.device("cpu"), torch.float32)
    with pytest.raises(ev.DraftdataError, match="draftdata export"):
        ev.load_exported_draft(tmp_path / "ckpt", base)


def test_cli_eval_json(tiny_model, prompts, tmp_path, capsys, monkeypatch):
    from draftdata.cli import main

    export = exported_draft(tmp_path, tiny_model)
    out_file = tmp_path / "new" / "dir" / "report.json"             # a missing parent is created
    monkeypatch.setenv("DRAFTDATA_PROGRESS_INTERVAL", "0")  # stderr is not a terminal: plain progress lines
    rc = main(["eval", "--model", str(tiny_model), "--draft", str(export), "--prompts", str(prompts),
               "--steps", "3", "--max-new-tokens", "6", "--limit", "1", "--max-turns", "1", "--dtype", "float64",
               "--json", "--output", str(out_file)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "not the base the draft was trained for" not in captured.err
    report = json.loads(captured.out)
    line = [line for line in captured.err.splitlines() if line.startswith("eval: ")][-1]
    assert line.startswith("eval: 1/1 turns (100%), ") and f"acceptance {report['eagle']['acceptance_length']:.3f}" in line
    assert report == json.loads(out_file.read_text())
    assert report["turns"] == 1 and report["steps"] == 3
    assert {"greedy", "eagle", "prompt_lookup", "speedup", "output_matches_greedy"} <= set(report)
    assert len(report["eagle"]["acceptance_rate_per_position"]) == 3
    assert main(["eval", "--model", str(tiny_model), "--draft", str(tmp_path / "ckpt"),
                 "--prompts", str(prompts)]) == 2


def test_turns_the_chat_template_refuses_are_skipped_and_reported(tiny_model, prompts, tmp_path):
    """A template that raises for a record (Gemma's "System role not supported") ended eval in a jinja
    traceback after the models loaded, losing every turn before it. That record's turns are skipped
    and listed; a file none of whose first prompts renders is one line."""
    base_dir = tmp_path / "nosys"
    shutil.copytree(tiny_model, base_dir)
    config = json.loads((base_dir / "tokenizer_config.json").read_text())
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    if (base_dir / "chat_template.jinja").exists():
        template = base_dir / "chat_template.jinja"
        template.write_text(refuse + template.read_text())
    else:
        config["chat_template"] = refuse + config["chat_template"]
        (base_dir / "tokenizer_config.json").write_text(json.dumps(config))
    export = exported_draft(tmp_path, base_dir)
    r = run_eval(base_dir, export, prompts, warmup=True)  # "a" (first) has a system prompt, "b" has none
    assert r["turns"] == 1 and r["per_prompt"][0]["conversation_id"] == "b"
    assert [(x["conversation_id"], x["turn"]) for x in r["skipped_turns"]] == [("a", 1), ("a", 2)]
    assert "System role not supported" in r["skipped_turns"][0]["error"]
    assert r["skipped_turns"][0]["source"].endswith("prompts.jsonl:1")
    assert "skipped 2 turn(s) the chat template could not render: " in ev.format_report(r)
    only_system = write_prompts(tmp_path / "p.jsonl")
    only_system.write_text(only_system.read_text().splitlines()[0] + "\n")
    with pytest.raises(ev.DraftdataError, match=r"renders none of the 1 prompts \(.*p.jsonl:1: TemplateError"):
        run_eval(base_dir, export, only_system, warmup=True)


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_eval_reports_the_turns_it_finished(tiny_model, prompts, tmp_path, capsys, sig, status):
    """Ctrl-C or SIGTERM during eval printed only "interrupted": every finished turn was lost (an
    hour of mt_bench on a CPU). A real signal, sent by the process to itself from inside the base
    model's forward pass in the third turn, stops it with the report of the first two, printed and
    written."""
    from draftdata.cli import main

    export = exported_draft(tmp_path, tiny_model)
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"conversation_id": f"q{i}", "conversations": [
        {"role": "user", "content": f"Question number {i}?"}]}) + "\n" for i in range(6)))
    forwards = []

    def hook(module, args, output):
        if type(module).__name__ == "LlamaForCausalLM":
            forwards.append(1)
            if len(forwards) == 2 * 24 + 5:  # a turn: 8 greedy forwards, then eagle's (12 new tokens, K=3)
                os.kill(os.getpid(), sig)

    out_file = tmp_path / "report.json"
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        rc = main(["eval", "--model", str(tiny_model), "--draft", str(export), "--prompts", str(many), "--steps", "3",
                   "--max-new-tokens", "12", "--no-prompt-lookup", "--dtype", "float64", "--output", str(out_file)])
    finally:
        handle.remove()
    assert rc == status
    err = capsys.readouterr()
    report = json.loads(out_file.read_text())
    done = report["stopped_early"]["turns_done"]
    assert 1 <= done < 6 and report["stopped_early"]["turns_planned"] == 6 and report["turns"] == done
    assert report["output_matches_greedy"]["eagle"] == {"equal": done, "total": done, "mismatched": []}
    assert f"stopped early: {done} of 6 turns measured" in err.out
    assert "the report covers the turns finished before the stop" in err.err


def run_cli(*argv: str) -> int:
    from draftdata.cli import main

    return main(["eval", *argv])


@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:1"])
def test_cli_eval_unusable_device_is_one_line(tiny_model, prompts, tmp_path, capsys, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli("--model", str(tiny_model), "--draft", str(tmp_path), "--prompts", str(prompts),
                   "--device", device) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"draftdata eval: error: --device {device!r}"
                                                     if device == "gpu" else f"draftdata eval: error: --device {device}")
    assert "cpu" in err


def test_eval_dtype_accepts_collect_and_train_spellings():
    from draftdata.train.evaluate import pick_device_dtype

    for short, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                         ("float32", torch.float32)):
        assert pick_device_dtype("cpu", short) == (torch.device("cpu"), dtype)


def test_cli_eval_bad_output_is_refused_before_any_model_work(prompts, tmp_path, capsys):
    """Checked first: --model does not even exist, yet the error is about --output."""
    missing = str(tmp_path / "no-model")
    assert run_cli("--model", missing, "--draft", missing, "--prompts", str(prompts), "--output", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--output {tmp_path}: is a directory" in err
    (tmp_path / "afile").write_text("x")
    assert run_cli("--model", missing, "--draft", missing, "--prompts", str(prompts),
                   "--output", str(tmp_path / "afile" / "r.json")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create its directory" in err and "choose another --output" in err


def test_cli_eval_bad_counts_and_a_training_run_as_draft_are_one_line(tiny_model, prompts, tmp_path, capsys):
    """--limit 0 used to evaluate one conversation; a training run given as --draft says to export it."""
    missing = str(tmp_path / "no-model")
    for flag in ("--limit", "--max-turns", "--threads", "--prompt-lookup-tokens", "--steps", "--max-new-tokens"):
        assert run_cli("--model", missing, "--draft", missing, "--prompts", str(prompts), flag, "0") == 2
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    exported_draft(tmp_path, tiny_model)                    # leaves the trainer checkpoint in tmp_path/ckpt
    with pytest.raises(ev.DraftdataError, match=r"this is a training run: run `draftdata export .*ckpt --out DIR`"):
        ev.load_exported_draft(tmp_path / "ckpt", None)


def test_missing_prompts_file_names_the_prompts_flag(tmp_path, capsys):
    with pytest.raises(ev.DraftdataError, match=r"^--prompts .*nope\.jsonl: no such file"):
        ev.read_prompts(str(tmp_path / "nope.jsonl"))
    missing = str(tmp_path / "no-model")
    assert run_cli("--model", missing, "--draft", missing, "--prompts", str(tmp_path / "nope.jsonl")) == 2
    err = capsys.readouterr().err
    assert "--prompts" in err and "--input" not in err


def test_cli_eval_warns_when_base_is_not_the_drafts(tiny_model, prompts, tmp_path, capsys):
    """The export records the base's model hash; another base is a warning on stderr, not an error."""
    import shutil

    export = exported_draft(tmp_path, tiny_model)
    other = Path(shutil.copytree(tiny_model, tmp_path / "other"))
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6   # e.g. a fine-tune's config
    (other / "config.json").write_text(json.dumps(cfg))
    draft_cfg = json.loads((export / "config.json").read_text())
    assert ev.base_model_warnings(draft_cfg, tiny_model, 4) == []
    assert run_cli("--model", str(other), "--draft", str(export), "--prompts", str(prompts), "--limit", "1",
                   "--max-turns", "1", "--max-new-tokens", "2", "--no-prompt-lookup", "--dtype", "float64") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "not the base the draft was trained for" in warnings[0]
    assert draft_cfg["draftdata"]["base_model_hash"] in warnings[0]
    from draftdata.models import model_hash  # an export from an earlier build: compared in its scheme

    old = {**draft_cfg, "draftdata": {**draft_cfg["draftdata"], "base_model_hash": model_hash(tiny_model, like="sha256:")}}
    assert ev.base_model_warnings(old, tiny_model, 4) == []
    assert len(ev.base_model_warnings(old, str(other), 4)) == 1

    del draft_cfg["draftdata"]["base_model_hash"]                 # older exports: cheap fields only
    draft_cfg["draftdata"].update(base_model_id="org/other-model", base_num_hidden_layers=8)
    got = ev.base_model_warnings(draft_cfg, tiny_model, 4)
    assert len(got) == 2 and "org/other-model" in got[0] and "8" in got[1]


def test_cli_eval_prints_the_report_before_writing_it(tiny_model, prompts, tmp_path, capsys, monkeypatch):
    """A write that fails after the run (disk full) must not lose the report: it is on stdout already."""
    export = exported_draft(tmp_path, tiny_model)
    target = tmp_path / "report.json"
    write_text = Path.write_text

    def failing(self, *args, **kwargs):
        if self == target:
            raise OSError(28, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    assert run_cli("--model", str(tiny_model), "--draft", str(export), "--prompts", str(prompts), "--limit", "1",
                   "--max-turns", "1", "--max-new-tokens", "2", "--no-prompt-lookup", "--dtype", "float64",
                   "--output", str(target)) == 2
    captured = capsys.readouterr()
    assert "acceptance length" in captured.out
    assert "No space left on device" in captured.err and "printed above" in captured.err


def test_report_breaks_acceptance_down_by_category_and_measures_draft_vocab_coverage(tmp_path):
    """MT-Bench style records carry a "category": the report gives each its acceptance length. The
    coverage is the share of greedy output tokens the draft vocabulary holds (the draft cannot propose
    the others): here the output alternates f(last), last, ... and the vocabulary lacks f(last), so it
    is exactly 1/2, also for an export that carries d2t without t2d."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from draftdata.train.vocab import select_draft_vocab

    base_dir, emb, f = successor_base(tmp_path / "base", involution=True)
    last = AutoTokenizer.from_pretrained(base_dir)("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-1]
    counts = torch.zeros(emb.shape[0], dtype=torch.int64)
    counts[last] = 1000
    counts[[t for t in range(3, 40) if t != f[last]]] += 1
    vocab = select_draft_vocab(counts, 16)
    assert vocab.t2d[last] and not vocab.t2d[f[last]]
    export = exported_draft(tmp_path, base_dir, craft=emb[vocab.target_ids()], draft_vocab=vocab)
    rows = [{"conversation_id": f"q{i}", "category": cat, "conversations": [{"role": "user", "content": text}]}
            for i, (cat, text) in enumerate([("writing", "A poem, please."), ("math", "What is 2 plus 2?"),
                                              ("writing", "A story about a cat."), (None, "Hello there.")])]
    prompts = tmp_path / "bench.jsonl"
    prompts.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    r = run_eval(base_dir, export, prompts)
    e = r["eagle"]
    assert e["draft_vocab_coverage"] == pytest.approx(0.5)
    cats = e["per_category"]
    assert set(cats) == {"writing", "math"}
    assert cats["writing"]["turns"] == 2 and cats["math"]["turns"] == 1
    assert sum(v["verify_passes"] for v in cats.values()) < e["verify_passes"]   # the uncategorized turn
    assert [p.get("category") for p in r["per_prompt"]] == ["writing", "math", "writing", None]
    text = ev.format_report(r)
    assert "50.0% of the greedy output tokens" in text and "acceptance length by category" in text

    weights = export / "model.safetensors"
    state = load_file(weights)
    del state["t2d"]
    save_file(state, weights)
    assert run_eval(base_dir, export, prompts)["eagle"]["draft_vocab_coverage"] == pytest.approx(0.5)
    state["d2t"] = state["d2t"] + emb.shape[0]  # maps past the end of the base vocabulary
    save_file(state, weights)
    with pytest.raises(ev.DraftdataError, match="d2t does not map 16 draft ids"):
        run_eval(base_dir, export, prompts)
