"""The training loop: CLI run and outputs, exact resume after SIGKILL, DDP (torchrun, gloo), Ray Train."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import TINY_ARCH, train_data, unwritable_dir  # noqa: F401 (fixture)

from draftdata.cli import main
from draftdata.errors import DraftdataError
from draftdata.train.model import load_draft
from draftdata.train.trainer import TrainConfig, TrainInterrupted, lr_lambda, normalize_location, train

REPO = Path(__file__).resolve().parents[1]


def eagle_file(tmp_path: Path, **extra) -> Path:
    f = tmp_path / "eagle.json"
    f.write_text(json.dumps({"eagle_architecture_config": TINY_ARCH, **extra}))
    return f


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def test_cli_train_end_to_end(tmp_path, tiny_model, train_data):  # noqa: F811
    out = tmp_path / "run"
    rc = main(["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out),
               "--eagle-config", str(eagle_file(tmp_path)), "--steps", "10", "--lr", "3e-3", "--batch-tokens",
               "512", "--save-every", "4", "--log-every", "4", "--ttt-steps", "2", "--seed", "3"])
    assert rc == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    for key in ("loss", "step_loss", "step_acc", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_gb"):
        assert key in rows[0], key
    assert len(rows[0]["step_loss"]) == 2 and len(rows[0]["step_acc"]) == 2
    first = sum(r["step_loss"][0] for r in rows[:3]) / 3
    last = sum(r["step_loss"][0] for r in rows[-3:]) / 3
    assert last < first, (first, last)
    # The lr each step used (2% warmup of 10 steps is none, then cosine): 3e-3 at step 1, not the next step's.
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * lr_lambda(0, 10, "cosine", 0.0)(s) for s in range(10)])
    assert rows[0]["lr"] == pytest.approx(3e-3) and rows[-1]["lr"] > 0
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000008", "step-00000010"]
    draft = load_draft(out / "final")
    assert draft.config.eagle.eagle_ttt_steps == 2
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["batch_tokens"] == 512 and "storage_options" not in saved

    # The output holds a run: refuse to overwrite it without --resume ...
    assert main(["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out),
                 "--eagle-config", str(eagle_file(tmp_path)), "--steps", "16", "--batch-tokens", "512"]) == 2
    # ... and refuse to resume it with settings that would change the run.
    assert main(["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out), "--resume",
                 "--eagle-config", str(eagle_file(tmp_path)), "--steps", "20", "--batch-tokens", "256",
                 "--ttt-steps", "2", "--seed", "3"]) == 2


def test_sigkill_and_resume_gives_the_same_losses(tmp_path, tiny_model, train_data):  # noqa: F811
    common = dict(data=train_data, model=str(tiny_model), eagle_config={"eagle_architecture_config": TINY_ARCH},
                  steps=10, batch_tokens=256, grad_accum=2, save_every=4, log_every=1, lr=2e-3, seed=5,
                  num_workers=1, progress=False, plot=False)
    reference = train(TrainConfig(output=str(tmp_path / "ref"), **common))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "draftdata.cli", "train", "--data", train_data, "--model", str(tiny_model),
           "--output", str(out), "--eagle-config", str(eagle_file(tmp_path)), "--steps", "10",
           "--batch-tokens", "256", "--grad-accum", "2", "--save-every", "4", "--log-every", "1", "--lr", "2e-3",
           "--seed", "5", "--num-workers", "1", "--no-plot"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env())
    killed_at = None
    for line in proc.stdout:
        if line.startswith("step 7/"):
            proc.send_signal(signal.SIGKILL)
            killed_at = 7
            break
    proc.wait(timeout=60)
    assert killed_at and proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    last = int(ckpts[-1].split("-")[1])          # 4, or 8 if the run got ahead of our reading
    assert last in (4, 8), ckpts
    state = torch.load(out / "checkpoints" / ckpts[-1] / "trainer_state.pt", weights_only=True)
    assert state["items_consumed"] > 0           # the checkpoint is in the middle of an epoch

    resumed = train(TrainConfig(output=str(out), resume=True, **common))
    assert resumed.steps == 10 and len(resumed.losses) == 10 - last  # only the steps after the checkpoint
    ref_rows, rows = read_metrics(tmp_path / "ref"), read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))           # no step lost or logged twice
    for a, b in zip(ref_rows, rows):
        assert (a["step"], a["epoch"], a["tokens"]) == (b["step"], b["epoch"], b["tokens"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), a["step"]
        assert a["step_acc"] == pytest.approx(b["step_acc"], abs=1e-7)
    assert rows[-1]["epoch"] > rows[last - 1]["epoch"]               # the resumed part crossed an epoch
    ref_w = reference.draft.draft_state_dict()
    for name, value in load_draft(out / "final").draft_state_dict().items():
        torch.testing.assert_close(value, ref_w[name].to(value.dtype), rtol=1e-6, atol=1e-7, msg=name)


def test_held_out_validation_is_reported_and_leaves_the_run_unchanged(tmp_path, tiny_model, train_data, capsys):  # noqa: F811
    from test_train_support import make_dataset

    from draftdata.loaders import HiddenStateDataset
    from draftdata.train.losses import EagleTTT
    from draftdata.train.model import build_draft
    from draftdata.train.trainer import Dist, validation_metrics

    val_url = str(tmp_path / "val")
    make_dataset(val_url, tiny_model, n=12, seed=1)
    common = dict(data=train_data, model=str(tiny_model), eagle_config={"eagle_architecture_config": TINY_ARCH},
                  steps=6, batch_tokens=256, save_every=3, log_every=1, lr=2e-3, seed=5, progress=False,
                  dtype="fp32")   # recomputed below in fp32
    plain = train(TrainConfig(output=str(tmp_path / "plain"), plot=False, **common))
    result = train(TrainConfig(output=str(tmp_path / "val_run"), val_data=val_url, val_every=2, **common))
    rows = read_metrics(tmp_path / "val_run")
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4, 6]
    assert [r["loss"] for r in rows] == plain.losses                 # the run itself is untouched
    assert len({r["val_tokens"] for r in val}) == 1 and val[0]["val_tokens"] > 0   # all of it, every time
    assert len(val[0]["val_step_acc"]) == len(val[0]["val_step_loss"]) == 3
    captured = capsys.readouterr()
    assert "val step 6: loss" in captured.out and "also in --data" not in captured.err
    assert (tmp_path / "val_run" / "training_curves.png").stat().st_size > 10_000

    # the last value is the trained draft's loss on the held-out set, recomputed here
    dataset = HiddenStateDataset(val_url, shuffle=False, max_seq_len=256, max_tokens_per_batch=256)
    eagle = TrainConfig(**common, output="-").eagle()
    _, head = build_draft(tiny_model, eagle, dataset.schema)
    module = EagleTTT(result.draft, head, ttt_steps=eagle.eagle_ttt_steps, decay=eagle.eagle_loss_decay_factor)
    again = validation_metrics(module, dataset, device=torch.device("cpu"), info=Dist(),
                               autocast=contextlib.nullcontext())
    assert again["val_loss"] == pytest.approx(val[-1]["val_loss"], rel=1e-5)
    assert again["val_tokens"] == val[-1]["val_tokens"]

    # a held-out set captured from other layers, or --val-every alone, is refused with the reason
    other = str(tmp_path / "val_other")
    make_dataset(other, tiny_model, n=4, aux_layer_ids=(1, 2, 3))
    args = ["train", "--data", train_data, "--model", str(tiny_model), "--eagle-config", str(eagle_file(tmp_path)),
            "--steps", "2", "--batch-tokens", "256"]
    assert main(args + ["--output", str(tmp_path / "r1"), "--val-data", other]) == 2
    assert "aux_layer_ids is [1, 2, 3]" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "r2"), "--val-every", "2"]) == 2
    assert "--val-every needs --val-data" in capsys.readouterr().err
    missing = str(tmp_path / "nope")                     # which flag names the missing dataset
    assert main(args + ["--output", str(tmp_path / "r4"), "--val-data", missing]) == 2
    assert f"error: --val-data {missing}: no dataset here" in capsys.readouterr().err
    assert main([x if x != train_data else missing for x in args] + ["--output", str(tmp_path / "r4")]) == 2
    assert f"error: --data {missing}: no dataset here" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "r3"), "--val-data", train_data, "--no-plot"]) == 0
    assert "warning: 48 of the 48 held-out conversations in" in capsys.readouterr().err   # --val-data = --data


DDP_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from safetensors.torch import save_file
from draftdata.train.trainer import TrainConfig, TrainInterrupted, lr_lambda, normalize_location, train
cfg = TrainConfig(**json.loads(sys.argv[1]))
result = train(cfg)
rank = int(__import__("os").environ["RANK"])
save_file({k: v.contiguous() for k, v in result.draft.draft_state_dict().items()}, f"{cfg.output}/rank{rank}.safetensors")
"""


def run_ddp(tmp_path: Path, cfg: dict) -> subprocess.CompletedProcess:
    """`train(TrainConfig(**cfg))` on two gloo ranks under torchrun; each rank saves its weights."""
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(script), json.dumps(cfg)],
                          capture_output=True, text=True, env=env(), timeout=180)


def test_bf16_autocast_on_the_cpu(tmp_path, tiny_model, train_data, capsys, monkeypatch):  # noqa: F811
    """--dtype bf16 trains on the CPU under bf16 autocast (fp32 master weights, the frozen base
    tensors in bf16): the first loss is the fp32 run's within bf16 rounding, and it learns. oneDNN's
    primitive cache gets a bound (one entry per matmul shape otherwise grows memory by GBs)."""
    from draftdata.models import ONEDNN_CACHE_ENV

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    common = dict(data=train_data, model=str(tiny_model), eagle_config={"eagle_architecture_config": TINY_ARCH},
                  steps=12, batch_tokens=256, save_every=100, log_every=1, lr=2e-3, seed=5, progress=False,
                  plot=False, device="cpu")
    fp32 = train(TrainConfig(output=str(tmp_path / "fp32"), dtype="fp32", **common))
    assert "on cpu (fp32)" in "".join(capsys.readouterr())
    assert ONEDNN_CACHE_ENV not in os.environ
    bf16 = train(TrainConfig(output=str(tmp_path / "bf16"), dtype="bf16", **common))
    assert "on cpu (bf16)" in "".join(capsys.readouterr())
    assert os.environ[ONEDNN_CACHE_ENV] == "64"
    assert bf16.draft.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.draft.trainable_parameters()} == {torch.float32}
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=0.02) and bf16.losses[0] != fp32.losses[0]
    assert sum(bf16.losses[-3:]) < sum(bf16.losses[:3])
    with pytest.raises(DraftdataError, match="--dtype"):
        TrainConfig(output="-", dtype="fp16", **common).validate()


def test_ddp_two_gloo_processes(tmp_path, tiny_model, train_data):  # noqa: F811
    from safetensors.torch import load_file

    from draftdata.loaders import HiddenStateDataset
    from draftdata.train.losses import step_token_counts, ttt_loss
    from draftdata.train.model import build_draft

    out = tmp_path / "ddp"
    cfg = dict(data=train_data, model=str(tiny_model), output=str(out), steps=3, batch_tokens=512, seed=7,
               eagle_config={"eagle_architecture_config": TINY_ARCH}, log_every=1, progress=False, plot=False,
               lr=1e-3)
    run = run_ddp(tmp_path, cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 rank(s) on cpu" in run.stderr
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k                   # DDP kept the replicas identical
    torch.manual_seed(7)                                      # the trainer seeds the init with --seed
    draft, head = build_draft(tiny_model, TrainConfig(**cfg).eagle(), HiddenStateDataset(train_data).schema)
    assert not torch.equal(r0["fc.weight"], draft.fc.weight)  # the replicas did train

    # Step 1's logged loss is over both ranks' batches, each token weighted equally.
    first = []
    for rank in range(2):
        ds = HiddenStateDataset(train_data, seed=7, rank=rank, world_size=2, max_seq_len=512,
                                max_tokens_per_batch=512)
        first.append(next(iter(ds)))
    counts = sum(step_token_counts(b, 3) for b in first)
    expected = sum(ttt_loss(draft, head, b, ttt_steps=3, decay=0.9, normalizer=counts).loss.item() for b in first)
    assert read_metrics(out)[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert read_metrics(out)[0]["tokens"] == sum(int(b["lengths"].sum()) for b in first)


@pytest.mark.slow
def test_ray_train_torch_trainer(tmp_path, tiny_model, train_data, capfd):  # noqa: F811
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train")
    from draftdata.train.trainer import train_with_ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    # The cluster claims 2 GPUs (a resource count; this machine has none): with --device cpu the
    # workers must still be CPU workers in a gloo group (GPU workers would get an NCCL group).
    ray.init(address="local", num_cpus=2, num_gpus=2, object_store_memory=80 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    try:
        t0 = time.time()
        cfg = TrainConfig(data=train_data, model=str(tiny_model), output=str(tmp_path / "ray"), device="cpu",
                          eagle_config={"eagle_architecture_config": TINY_ARCH}, steps=3,
                          batch_tokens=512, log_every=1, progress=False, plot=False)
        with pytest.raises(DraftdataError, match="--ray-gpus with --device cpu"):
            train_with_ray(cfg, num_workers=2, use_gpu=True)
        result = train_with_ray(cfg, num_workers=2)
        assert result.error is None
        print(f"ray run took {time.time() - t0:.1f}s")
        # Rank 0's lines reach the driver once (Ray Train's print patch printed each of them twice).
        seen = ""
        deadline = time.monotonic() + 20
        while "final draft:" not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
            seen += "".join(capfd.readouterr())
        assert seen.count("final draft:") == 1 and seen.count("step 1/3 ") == 1, seen[-3000:]

        # Ctrl-C on the driver: Ray Train's own handler aborted the workers mid-step (exit 1, every step
        # since the last checkpoint lost). Now the workers end their step and save a checkpoint.
        stopped = dataclasses.replace(cfg, output=str(tmp_path / "ray_stop"), steps=2000, save_every=10_000)

        def interrupt_after_two_steps() -> None:
            metrics = tmp_path / "ray_stop" / "metrics.jsonl"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt_after_two_steps, daemon=True).start()
        with pytest.raises(TrainInterrupted, match=r"interrupted at step \d+/2000: kept checkpoint .*--resume") as e:
            train_with_ray(stopped, num_workers=2)
        step = int(re.search(r"at step (\d+)/", str(e.value)).group(1))
        assert 2 <= step < 2000
        assert [p.name for p in (tmp_path / "ray_stop" / "checkpoints").iterdir()] == [f"step-{step:08d}"]
        assert [r["step"] for r in read_metrics(tmp_path / "ray_stop")] == list(range(1, step + 1))
        train_with_ray(dataclasses.replace(stopped, steps=step + 1, resume=True), num_workers=2)
        assert [r["step"] for r in read_metrics(tmp_path / "ray_stop")] == list(range(1, step + 2))
    finally:
        ray.shutdown()
    rows = read_metrics(tmp_path / "ray")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert load_draft(tmp_path / "ray" / "final").config.hidden_size == 64
    assert json.loads((tmp_path / "ray" / "train_config.json").read_text())["world_size"] == 2


def test_max_minutes_stops_with_a_checkpoint_and_resume_continues(tmp_path, tiny_model, train_data,  # noqa: F811
                                                                  capsys):
    out = tmp_path / "run"
    common = ["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out),
              "--eagle-config", str(eagle_file(tmp_path)), "--steps", "6", "--lr", "3e-3", "--batch-tokens", "512",
              "--save-every", "100", "--ttt-steps", "2", "--schedule", "constant", "--no-plot"]
    assert main(common + ["--max-minutes", "0.0001"]) == 0          # out of time after the first step
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    assert load_draft(out / "final") is not None
    saved = json.loads((out / "train_config.json").read_text())  # as a draftdata before that field recorded it
    del saved["eagle_config"]["eagle_architecture_config"]["norm_before_residual"]
    (out / "train_config.json").write_text(json.dumps(saved))
    assert main(common + ["--resume"]) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))
    capsys.readouterr()
    shorter = [x if x != "6" else "3" for x in common]      # a rerun with fewer steps keeps the longer run's draft
    assert main(shorter + ["--resume"]) == 0
    assert "is at step 6, past this run's last step (3): nothing is left to train" in capsys.readouterr().err
    assert main(common + ["--resume"]) == 0                 # the same --steps again: no "fewer steps" advice
    assert "is the run's last step (6): nothing is left to train; the final draft is written" in capsys.readouterr().err
    other_ttt = [x if x != "2" else "3" for x in common]   # --ttt-steps 3: the one field, not two 50-key dicts
    assert main(other_ttt + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(eagle_config.eagle_ttt_steps: checkpoint run had 2, now 3)" in err and len(err) < 400, err
    bad = ["train", "--data", train_data, "--model", str(tiny_model), "--output", str(tmp_path / "bad"),
           "--steps", "6", "--max-minutes", "0"]
    assert main(bad) == 2 and not (tmp_path / "bad").exists()       # bad value: one-line error, nothing written


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path, tiny_model, train_data):  # noqa: F811
    """A full disk (here a real file-size limit, RLIMIT_FSIZE, on the training process) while saving
    a checkpoint was a traceback (safetensors' SafetensorError, or torch's "unexpected pos"), exit 1,
    leaving step-N.tmp/ behind. Now: one line naming the checkpoint and the free space, exit 2, no
    partial checkpoint; a rerun with room resumes."""
    import resource

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "draftdata.cli", "train", "--data", train_data, "--model", str(tiny_model),
            "--output", str(out), "--eagle-config", str(eagle_file(tmp_path)), "--steps", "3", "--save-every", "2",
            "--batch-tokens", "256", "--ttt-steps", "2", "--no-plot"]
    run = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=300,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)))
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert f"cannot write {out / 'checkpoints' / 'step-00000002'} (" in last and "MiB free there" in last, last
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=env(), timeout=300).returncode == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_samples_over_the_token_budget_are_one_line_in_the_cli_terms(tmp_path, tiny_model, train_data,  # noqa: F811
                                                                    capsys):
    """A --max-seq-len above --batch-tokens gave the loader's Python UserWarning (a source line, and
    advice in the loader's argument names); with --pad-to-multiple-of the default --max-seq-len
    (--batch-tokens) itself padded past the budget (128-token batches against 100)."""
    common = ["train", "--data", train_data, "--model", str(tiny_model), "--eagle-config", str(eagle_file(tmp_path)),
              "--steps", "1", "--ttt-steps", "2", "--no-plot"]
    assert main(common + ["--output", str(tmp_path / "a"), "--batch-tokens", "64", "--max-seq-len", "200",
                          "--val-data", train_data]) == 0
    err = capsys.readouterr().err
    assert "UserWarning" not in err and "warning: --data: samples of up to" in err
    assert "exceed --batch-tokens 64: each forms a batch of its own" in err and "set --max-seq-len at most 64" in err
    assert "warning: --val-data: samples of up to" in err
    assert main(common + ["--output", str(tmp_path / "b"), "--batch-tokens", "100", "--pad-to-multiple-of", "64"]) == 0
    err = capsys.readouterr().err
    assert "exceed --batch-tokens" not in err
    assert "longer than --max-seq-len 64 (default: --batch-tokens rounded down to --pad-to-multiple-of)" in err
    (record,) = read_metrics(tmp_path / "b")
    assert record["tokens"] / record["padding_efficiency"] <= 100 + 1e-6   # the padded batch fits the budget
    saved = json.loads((tmp_path / "b" / "train_config.json").read_text())   # as an earlier draftdata recorded it
    (tmp_path / "b" / "train_config.json").write_text(json.dumps({**saved, "max_seq_len": 100}))
    resumed = [x if x != "1" else "2" for x in common]
    assert main(resumed + ["--output", str(tmp_path / "b"), "--batch-tokens", "100", "--pad-to-multiple-of", "64",
                           "--resume"]) == 0, capsys.readouterr().err[-2000:]
    assert main(common + ["--output", str(tmp_path / "c"), "--batch-tokens", "32", "--pad-to-multiple-of", "64"]) == 2
    assert "--batch-tokens 32 is below --pad-to-multiple-of 64" in capsys.readouterr().err


def test_resume_applies_a_changed_lr_and_refuses_weight_decay_on_off(tmp_path, tiny_model, train_data):  # noqa: F811
    """--lr (and a non-zero --weight-decay) may change on --resume and then apply: the checkpoint's
    optimizer state brought the old values back while the log and train_config.json named the new.
    Turning weight decay on or off is refused up front, train_config.json untouched."""
    out = tmp_path / "run"
    common = ["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out),
              "--eagle-config", str(eagle_file(tmp_path)), "--steps", "4", "--batch-tokens", "512",
              "--save-every", "100", "--ttt-steps", "2", "--schedule", "constant", "--warmup-steps", "0",
              "--no-plot"]
    assert main(common + ["--lr", "3e-3", "--weight-decay", "0.1", "--max-minutes", "0.0001"]) == 0
    config = (out / "train_config.json").read_text()
    assert main(common + ["--lr", "1e-3", "--weight-decay", "0", "--resume"]) == 2
    assert (out / "train_config.json").read_text() == config
    assert main(common + ["--lr", "1e-3", "--weight-decay", "0.2", "--resume"]) == 0
    assert [r["lr"] for r in read_metrics(out)] == pytest.approx([3e-3, 1e-3, 1e-3, 1e-3])
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["lr"], saved["weight_decay"]) == (1e-3, 0.2)
    state = torch.load(out / "checkpoints" / "step-00000004" / "trainer_state.pt", weights_only=True)
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.2, 0.0]


def test_resume_refuses_a_draft_vocab_file_that_changed(tmp_path, tiny_model, train_data, capsys):  # noqa: F811
    """--draft-vocab was compared by path only: another file of the same size at that path was
    trained on silently (d2t then disagreed with the file), another size ended in a traceback."""
    vocab, out = tmp_path / "vocab.safetensors", tmp_path / "run"
    common = ["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out),
              "--eagle-config", str(eagle_file(tmp_path)), "--steps", "4", "--batch-tokens", "512",
              "--save-every", "100", "--schedule", "constant", "--no-plot", "--draft-vocab", str(vocab)]
    assert main(["vocab", train_data, "--draft-vocab-size", "64", "--out", str(vocab)]) == 0
    assert main(common + ["--max-minutes", "0.0001"]) == 0
    config = (out / "train_config.json").read_text()
    for size in ("64", "80"):
        assert main(["vocab", train_data, "--draft-vocab-size", size, "--all-tokens", "--out", str(vocab)]) == 0
        capsys.readouterr()
        assert main(common + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert "draft_vocab: the vocabulary in" in err and "changed since the checkpoint" in err and "Traceback" not in err
    assert (out / "train_config.json").read_text() == config
    vocab.unlink()                                           # missing: said as such, not as "changed"
    assert main(common + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "vocab.safetensors not found" in err and "the vocabulary in" not in err


def test_pad_to_multiple_of_rounds_batches_and_is_fixed_for_the_run(tmp_path, tiny_model, train_data):  # noqa: F811
    """--pad-to-multiple-of reaches the loader (every batch's padded length is a multiple of it,
    seen in the logged padding efficiency) and a resume with another value is refused."""
    from draftdata.loaders import HiddenStateDataset

    out = tmp_path / "run"
    common = ["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out),
              "--eagle-config", str(eagle_file(tmp_path)), "--steps", "4", "--batch-tokens", "512",
              "--save-every", "2", "--no-plot"]
    assert main(common + ["--pad-to-multiple-of", "96", "--max-minutes", "0.0001"]) == 0
    assert json.loads((out / "train_config.json").read_text())["pad_to_multiple_of"] == 96
    batches = list(HiddenStateDataset(train_data, shuffle=True, seed=0, max_tokens_per_batch=512,
                                      max_seq_len=512, pad_to_multiple_of=96))
    first = batches[0]
    assert first["input_ids"].shape[1] % 96 == 0
    assert read_metrics(out)[0]["padding_efficiency"] == pytest.approx(
        int(first["lengths"].sum()) / first["input_ids"].numel())
    assert main(common + ["--pad-to-multiple-of", "64", "--resume"]) == 2


def test_tensorboard_logs_every_step_once_across_a_resume(tmp_path, tiny_model, train_data):  # noqa: F811
    """With tensorboard installed (the dev extra) the run also writes TensorBoard scalars for
    every step, and a resumed run continues the same curves (each step once)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    common = ["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out),
              "--eagle-config", str(eagle_file(tmp_path)), "--batch-tokens", "512", "--log-every", "1",
              "--save-every", "2", "--no-plot"]
    assert main(common + ["--steps", "3"]) == 0
    # TensorBoard reads a folder's event files in name order: "<unix second>.<host>.<pid>.<counter>".
    # Two runs in one second of one process sort by the counter as text (".10" before ".9" once many
    # writers were made in the process, as in the full suite): the resumed run's file was read first
    # and the older file's steps purged it. A real resume starts in a later second: so does this one.
    time.sleep(1.05 - time.time() % 1)
    assert main(common + ["--steps", "5", "--resume"]) == 0

    def scalars(tag: str) -> list[int]:
        acc = EventAccumulator(str(out / "tensorboard"))
        acc.Reload()
        return sorted(e.step for e in acc.Scalars(tag))

    assert scalars("train/loss") == scalars("train/acc_ttt0") == [1, 2, 3, 4, 5]
    assert scalars("train/tokens_per_s") == [1, 2, 3, 4, 5]


def test_pad_to_multiple_of_one_is_no_rounding():
    """Rounding to a multiple of 1 is the run without rounding, for API callers as for the CLI, so a
    resume with 1 of a run from before the setting existed is not refused as a changed setting, and
    a run that recorded 1 (an API run before the mapping) resumes without it."""
    from draftdata.train.trainer import _check_resume_config

    assert TrainConfig(data="d", model="m", output="o", pad_to_multiple_of=1).pad_to_multiple_of is None
    assert TrainConfig(data="d", model="m", output="o", pad_to_multiple_of=8).pad_to_multiple_of == 8
    assert _check_resume_config({"pad_to_multiple_of": 1}, {"pad_to_multiple_of": None}, Path("run")) == []
    with pytest.raises(DraftdataError, match="pad_to_multiple_of: checkpoint run had 8, now None"):
        _check_resume_config({"pad_to_multiple_of": 8}, {"pad_to_multiple_of": None}, Path("run"))


def damaged_copy(source: str, dest: Path, *, rank: int = 0, world_size: int = 1, batch_tokens: int = 64,
                 seed: int = 5) -> tuple[str, dict[str, int]]:
    """A copy of dataset `source` whose part holding `rank`'s first batch has a flipped byte in its
    hidden states; returns (url, {conversation id: stored length} of every damaged sample)."""
    import shutil

    from test_train_support import damage_first_batch

    from draftdata.loaders import HiddenStateDataset

    url = str(dest)
    shutil.copytree(source, url)
    victim = damage_first_batch(url, seed=seed, batch_tokens=batch_tokens, rank=rank, world_size=world_size)
    with pytest.warns(UserWarning, match="skipping"):
        good = {s["conversation_id"] for s in HiddenStateDataset(url, shuffle=False, on_corrupt="skip")}
    damaged = {c: int(n) for c, n in zip(victim.conversation_ids, victim.lengths) if c not in good}
    assert damaged
    return url, damaged


def test_damaged_samples_are_skipped_reported_and_resumed_exactly(tmp_path, tiny_model, train_data, capsys):  # noqa: F811
    """`draftdata train` skips damaged samples and reports each (corrupt_samples.jsonl, the log,
    metrics); a batch of only damaged samples becomes a zero-weight step, so the run takes the
    planned steps, every intact sample's tokens are trained on once, and a resume right after
    such a step continues exactly. `--on-corrupt raise` stops naming the sample."""
    url, damaged = damaged_copy(train_data, tmp_path / "damaged")
    common = dict(model=str(tiny_model), eagle_config={"eagle_architecture_config": TINY_ARCH}, epochs=1,
                  batch_tokens=64, save_every=100, log_every=100, lr=2e-3, seed=5, progress=False, plot=False,
                  schedule="constant", ttt_steps=2)
    intact = train(TrainConfig(data=train_data, output=str(tmp_path / "intact"), **common))
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        whole = train(TrainConfig(data=url, output=str(tmp_path / "whole"), **common))
    assert not [w for w in seen if "skipping part" in str(w.message)]  # the trainer logs them its own way
    assert whole.steps == intact.steps > 40                       # one or two samples per batch, as planned
    ref, rows = read_metrics(tmp_path / "intact"), read_metrics(tmp_path / "whole")
    assert rows[0]["tokens"] == rows[0]["loss_tokens"] == 0        # the first batch was all damaged
    assert sum(r["skipped_samples"] for r in rows) == len(damaged)
    listed = [json.loads(line) for line in (tmp_path / "whole" / "corrupt_samples.jsonl").read_text().splitlines()]
    assert len(listed) == len(damaged) and listed[0]["step"] == 1
    named = {c: r["step"] for r in listed for c in damaged if f"(conversation {c!r})" in r["reason"]}
    assert sorted(named) == sorted(damaged)
    # Every step trained on what the intact run did, less exactly the damaged samples listed for it.
    for a, b in zip(ref, rows):
        lost = sum(min(n, 64) for c, n in damaged.items() if named[c] == a["step"])
        assert b["tokens"] == a["tokens"] - lost, a["step"]
    err = capsys.readouterr().err
    assert "step 1: skipped 1 damaged sample(s)" in err and f"skipped {len(damaged)} damaged sample(s) in all" in err

    # Out of time after step 1 (the stand-in step), then resumed: the same run, step for step.
    part = TrainConfig(data=url, output=str(tmp_path / "resumed"), max_minutes=1e-6, **common)
    assert train(part).steps == 1
    train(TrainConfig(data=url, output=str(tmp_path / "resumed"), resume=True, **common))
    again = read_metrics(tmp_path / "resumed")
    assert [(r["step"], r["tokens"], r["skipped_samples"]) for r in again] == \
           [(r["step"], r["tokens"], r["skipped_samples"]) for r in rows]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert (tmp_path / "resumed" / "corrupt_samples.jsonl").read_text() == \
           (tmp_path / "whole" / "corrupt_samples.jsonl").read_text()

    args = ["train", "--data", url, "--model", str(tiny_model), "--eagle-config", str(eagle_file(tmp_path)),
            "--steps", "2", "--batch-tokens", "64", "--seed", "5", "--output", str(tmp_path / "strict")]
    assert main(args + ["--on-corrupt", "raise"]) == 2
    assert "is corrupt" in (err := capsys.readouterr().err) and "draftdata verify" in err
    assert any(repr(c) in err for c in damaged)


def test_ddp_stand_in_step_for_a_damaged_batch(tmp_path, tiny_model, train_data):  # noqa: F811
    """Two gloo ranks, rank 1's first batch all damaged: rank 1 runs the stand-in, both ranks
    still all-reduce every step, finish the planned steps and end with identical replicas."""
    from safetensors.torch import load_file

    url, damaged = damaged_copy(train_data, tmp_path / "damaged", rank=1, world_size=2, seed=7)
    out = tmp_path / "ddp"
    cfg = dict(data=url, model=str(tiny_model), output=str(out), steps=6, batch_tokens=64, seed=7,
               eagle_config={"eagle_architecture_config": TINY_ARCH}, log_every=1, progress=False, plot=False,
               lr=1e-3, ttt_steps=2)
    run = run_ddp(tmp_path, cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[0]["skipped_samples"] >= 1
    listed = [json.loads(line) for line in (out / "corrupt_samples.jsonl").read_text().splitlines()]
    assert listed[0]["rank"] == 1 and listed[0]["step"] == 1
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_weight_decay_spares_the_norm_weights(tmp_path, tiny_model, train_data):  # noqa: F811
    """--weight-decay shrinks the weight matrices but not the RMSNorm weights (HF Trainer's rule)."""
    from draftdata.loaders import HiddenStateDataset
    from draftdata.train.model import build_draft

    cfg = TrainConfig(data=train_data, model=str(tiny_model), output=str(tmp_path / "wd"), steps=3, lr=1e-3,
                      weight_decay=50.0, warmup_steps=0, schedule="constant", batch_tokens=256,
                      eagle_config={"eagle_architecture_config": TINY_ARCH}, progress=False, plot=False, seed=1)
    trained = train(cfg).draft.draft_state_dict()
    torch.manual_seed(1)                                            # the trainer seeds the init with --seed
    start = build_draft(tiny_model, cfg.eagle(), HiddenStateDataset(train_data).schema)[0].draft_state_dict()

    def ratio(name: str) -> float:
        return float(trained[name].float().norm() / start[name].float().norm())

    assert ratio("fc.weight") < 0.9                                 # (1 - lr * wd)^3 = 0.86, plus Adam's steps
    for name in ("norm.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight"):
        assert abs(ratio(name) - 1) < 0.01, name


def test_resume_keeps_its_data_snapshot_and_random_stream(tmp_path, tiny_model, train_data, capsys):  # noqa: F811
    """Resumed mid-epoch after collection committed another part, with hidden-state mixing on
    (which draws from the run's RNG) and a torn last metrics line: the same losses and tokens as
    the uninterrupted run, which saw only the old parts."""
    import shutil

    from test_train_support import make_dataset

    url = str(tmp_path / "growing")
    shutil.copytree(train_data, url)
    common = dict(data=url, model=str(tiny_model), steps=5, batch_tokens=256, save_every=100, log_every=100,
                  lr=2e-3, seed=5, progress=False, plot=False, schedule="constant", ttt_steps=2,
                  eagle_config={"eagle_architecture_config": TINY_ARCH, "eagle_mix_hidden_states": True})
    train(TrainConfig(output=str(tmp_path / "ref"), **common))
    assert train(TrainConfig(output=str(tmp_path / "run"), max_minutes=1e-6, **common)).steps == 1
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "epoch": 0, "lo')                    # a write cut short by the crash
    make_dataset(url, tiny_model, n=8, seed=9)                     # collection goes on meanwhile
    train(TrainConfig(output=str(tmp_path / "run"), resume=True, **common))
    assert "1 part(s) committed to" in capsys.readouterr().err
    ref, rows = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "run")
    assert [(r["step"], r["tokens"]) for r in rows] == [(r["step"], r["tokens"]) for r in ref]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-6)


def test_train_settings_out_of_range_are_refused():
    common = dict(data="-", model="-", output="-", steps=1)
    for name, value in (("max_grad_norm", -1.0), ("weight_decay", -0.1), ("num_workers", -1),
                        ("keep_checkpoints", -2), ("warmup_steps", -5), ("max_grad_norm", math.nan),
                        ("weight_decay", math.nan), ("weight_decay", math.inf)):
        with pytest.raises(DraftdataError, match=f"--{name.replace('_', '-')} must be a number >= 0"):
            TrainConfig(**common, **{name: value}).validate()
    for lr in (math.inf, math.nan, 0.0):             # NaN and inf trained a NaN draft and exited 0
        with pytest.raises(DraftdataError, match="--lr must be a positive number"):
            TrainConfig(**common, lr=lr).validate()
    TrainConfig(**common, max_grad_norm=0.0, warmup_steps=0).validate()   # 0: no clipping, as in HF Trainer


def test_user_mistakes_are_one_line_errors_or_warnings(tmp_path, tiny_model, train_data, capsys):  # noqa: F811
    """--device cuda without CUDA, --ttt-steps 0, a base model other than the collecting one (a
    warning: a variant may be meant), and a dataset whose every sample is damaged (an error: the
    run trained on nothing, no draft is written)."""
    import shutil

    from test_train_support import damage_part

    args = ["train", "--data", train_data, "--model", str(tiny_model), "--eagle-config", str(eagle_file(tmp_path)),
            "--batch-tokens", "256", "--no-plot"]
    if not torch.cuda.is_available():
        assert main(args + ["--output", str(tmp_path / "a"), "--steps", "1", "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "b"), "--steps", "1", "--device", "gpu"]) == 2
    assert "--device 'gpu': expected cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "c"), "--steps", "1", "--ttt-steps", "0"]) == 2
    assert "--ttt-steps must be a positive integer" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert main(args + ["--output", str(tmp_path / "notes.txt"), "--steps", "1"]) == 2
    assert "notes.txt is a file" in capsys.readouterr().err

    from draftdata.models import model_hash

    hashed = tmp_path / "hashed"                        # as `collect` writes it: the base model's hash
    shutil.copytree(train_data, hashed)
    meta = json.loads((hashed / "dataset.json").read_text())
    (hashed / "dataset.json").write_text(json.dumps({**meta, "base_model_hash": model_hash(tiny_model)}))
    args[args.index(train_data)] = str(hashed)
    assert main(args + ["--output", str(tmp_path / "d0"), "--steps", "1"]) == 0
    assert "is not the model" not in capsys.readouterr().err
    legacy = {**meta, "base_model_hash": model_hash(tiny_model, like="sha256:")}  # an earlier build's scheme
    (hashed / "dataset.json").write_text(json.dumps(legacy))
    assert main(args + ["--output", str(tmp_path / "d1"), "--steps", "1"]) == 0
    assert "is not the model" not in capsys.readouterr().err
    (hashed / "dataset.json").write_text(json.dumps({**meta, "base_model_hash": model_hash(tiny_model)}))
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "_name_or_path": "a variant"}))
    args[args.index(str(tiny_model))] = str(other)
    assert main(args + ["--output", str(tmp_path / "d"), "--steps", "1"]) == 0
    assert "is not the model" in capsys.readouterr().err
    args[args.index(str(hashed))] = train_data

    broken = tmp_path / "broken"
    shutil.copytree(train_data, broken)
    for part in broken.glob("parts/*"):
        damage_part(str(broken), part.name)
    args[args.index(train_data)] = str(broken)
    assert main(args + ["--output", str(tmp_path / "e"), "--steps", "2"]) == 2
    assert re.search(r"2 steps trained on nothing: \d+ damaged sample\(s\) were skipped", capsys.readouterr().err)
    assert not (tmp_path / "e" / "final").exists()


def test_resume_accepts_the_same_paths_spelled_differently(tmp_path, tiny_model, train_data, monkeypatch,  # noqa: F811
                                                           capsys):
    """train_config.json records local paths as absolute real paths, and --resume compares them so:
    relative and absolute spellings, from another working directory, and an older run's relative
    paths are the same run; another model is still refused. Hub ids and URLs stay strings."""
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    common = ["--eagle-config", str(eagle_file(tmp_path)), "--steps", "4", "--batch-tokens", "512",
              "--save-every", "100", "--schedule", "constant", "--no-plot"]
    first = ["train", "--data", os.path.relpath(train_data), "--model", os.path.relpath(tiny_model),
             "--output", "../run", "--max-minutes", "0.0001"]
    assert main(first + common) == 0                                  # stops after step 1 with a checkpoint
    config = tmp_path / "run" / "train_config.json"
    saved = json.loads(config.read_text())
    assert saved["data"] == os.path.realpath(train_data) and saved["model"] == os.path.realpath(tiny_model)

    monkeypatch.chdir(tmp_path)                                       # elsewhere, spelled otherwise
    again = ["train", "--data", f"local://{train_data}", "--model", "./" + os.path.relpath(tiny_model),
             "--output", "run", "--resume", "--max-minutes", "0.0001"]       # (local:// was taken for a URL)
    assert main(again + common) == 0
    assert "resumed from" in capsys.readouterr().err
    # A train_config.json from before paths were normalized holds them as given: read relative to here.
    config.write_text(json.dumps({**saved, "data": os.path.relpath(train_data),
                                  "model": os.path.relpath(tiny_model)}))
    assert main(["train", "--data", train_data, "--model", str(tiny_model), "--output", "run", "--resume"]
                + common) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]

    other = tmp_path / "other_model"
    shutil.copytree(tiny_model, other)
    assert main(["train", "--data", train_data, "--model", str(other), "--output", "run", "--resume"] + common) == 2
    assert "model: checkpoint run had" in capsys.readouterr().err
    for name in ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "s3://bucket/ds", None):
        assert normalize_location(name) == name
    assert normalize_location(f"file://{train_data}") == os.path.realpath(train_data)


def test_bad_inputs_and_outputs_are_refused_before_anything_is_written(tmp_path, tiny_model, train_data,  # noqa: F811
                                                                       capsys, unwritable_dir):  # noqa: F811
    """A missing model, dataset or draft vocabulary, a truncated base weights file, a model's own
    directory as --output and an --output that cannot be written: one line each, and no output
    directory (nor anything inside the model's) is written."""
    import shutil

    def run(output: Path, **override: str) -> str:
        flags = {"--data": train_data, "--model": str(tiny_model), "--eagle-config": str(eagle_file(tmp_path)),
                 "--steps": "2", "--batch-tokens": "256", **override}
        assert main(["train", "--output", str(output), "--no-plot", *[x for kv in flags.items() for x in kv]]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.splitlines()[-1].startswith("draftdata train: error: ")
        return err.splitlines()[-1]

    damaged = tmp_path / "damaged_model"
    shutil.copytree(tiny_model, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])                  # a download cut short
    out = tmp_path / "out"
    for flag, value, words in (("--model", tmp_path / "nope", "--model"), ("--data", tmp_path / "nope", "no dataset"),
                               ("--draft-vocab", tmp_path / "nope.safetensors", "nope.safetensors not found"),
                               ("--model", damaged, f"{weights}: cannot read the base model's weights")):
        assert words in run(out, **{flag: str(value)})
        assert not out.exists(), (flag, value)

    base_copy = tmp_path / "base_copy"
    shutil.copytree(tiny_model, base_copy)
    before = sorted(p.name for p in base_copy.iterdir())
    assert "holds a model (config.json, model.safetensors), not a train run" in run(base_copy)
    assert sorted(p.name for p in base_copy.iterdir()) == before
    before = sorted(p.name for p in Path(train_data).iterdir())     # the dataset itself: it was trained into
    assert f"--output {train_data}: holds a dataset (dataset.json)" in run(Path(train_data))
    assert sorted(p.name for p in Path(train_data).iterdir()) == before
    done = tmp_path / "done"                                          # a run's final/: `export done` took the old one
    (done / "final").mkdir(parents=True)
    (done / "train_config.json").write_text("{}")
    assert f"--output {done / 'final'}: is part of the training run {done}" in run(done / "final")
    assert not (done / "final" / "final").exists()

    assert f"--output {unwritable_dir / 'run'}: cannot write there" in run(unwritable_dir / "run")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, tiny_model, train_data, capsys, sig):  # noqa: F811
    """SIGINT stops `draftdata train` at the end of the step it is in, with a checkpoint at that
    step (none was due: --save-every 500), says which one is kept, and --resume continues there.
    The run resumed a shorter one: its final/ (step 2) is gone, so `export RUN` takes the newer
    checkpoint (it took the stale final/). SIGTERM (a scheduler's preemption) does the same and
    exits 143 (it killed the run at once, without a checkpoint)."""
    out = tmp_path / "run"
    args = ["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out),
            "--eagle-config", str(eagle_file(tmp_path)), "--batch-tokens", "256", "--save-every", "500",
            "--log-every", "1", "--schedule", "constant", "--no-plot",
            *(["--num-workers", "1"] if sig == signal.SIGTERM else [])]
    assert main(args + ["--steps", "2"]) == 0 and (out / "final").is_dir()
    # SIGTERM as a scheduler sends it: to the whole process group, DataLoader workers included
    # (a worker it killed made torch raise in the main process)
    proc = subprocess.Popen([sys.executable, "-m", "draftdata.cli", *args, "--steps", "1000", "--resume"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            os.killpg(proc.pid, sig)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    stopped = re.search(r"draftdata train: interrupted at step (\d+)/1000: kept checkpoint (\S+); the same "
                        r"command with --resume continues from it", err)
    assert stopped, err[-2000:]
    step = int(stopped.group(1))
    assert step >= 3 and Path(stopped.group(2)) == out / "checkpoints" / f"step-{step:08d}"
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))
    assert not (out / "final").exists()
    from draftdata.train.export import find_checkpoint
    assert find_checkpoint(out) == out / "checkpoints" / f"step-{step:08d}"

    partial = out / "checkpoints" / "step-00000001.tmp"     # a save a second signal cut short: it stayed
    partial.mkdir()
    assert main(args + ["--steps", str(step + 2), "--resume"]) == 0
    assert f"at step {step} " in capsys.readouterr().err
    assert not partial.exists()
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 3))


def test_training_on_nothing_stops_early_and_says_why(tmp_path, tiny_model, train_data, capsys):  # noqa: F811
    """--batch-tokens 8 (so --max-seq-len 8) cuts every sample before its assistant tokens: the
    start-up log says how many samples are cut, and the run stops after 10 steps without a loss
    token, naming the cause, instead of after all 200."""
    out = tmp_path / "run"
    assert main(["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out),
                 "--eagle-config", str(eagle_file(tmp_path)), "--steps", "200", "--batch-tokens", "8",
                 "--no-plot"]) == 2
    err = capsys.readouterr().err
    cut = re.search(r"(\d+) of 48 samples are longer than --max-seq-len 8 \(default: --batch-tokens\) and are cut "
                    r"to their first 8 tokens: [\d.]+% of the tokens are left out", err)
    assert cut and int(cut.group(1)) == 48, err
    last = err.splitlines()[-1]
    assert last.startswith("draftdata train: error: ") and "the first 10 of 200 steps trained on nothing" in last
    assert "raise --max-seq-len or --batch-tokens" in last
    assert len(read_metrics(out)) == 10 and not (out / "final").exists()


def test_init_draft_starts_from_a_checkpoint_or_an_export_and_refuses_a_mismatch(tmp_path, tiny_model,  # noqa: F811
                                                                                 train_data, capsys):  # noqa: F811
    """--init-draft takes the weights of a training run or of an exported draft (the engines' names):
    the new run starts from those weights, not a fresh draft's; a draft of another architecture or
    vocabulary is refused in one line before anything is written."""
    from safetensors.torch import load_file, save_file

    common = ["--data", train_data, "--model", str(tiny_model), "--eagle-config", str(eagle_file(tmp_path)),
              "--batch-tokens", "256", "--ttt-steps", "2", "--no-plot", "--log-every", "1"]
    first = tmp_path / "first"
    assert main(["train", *common, "--output", str(first), "--steps", "12", "--lr", "5e-3", "--seed", "1"]) == 0
    exported = tmp_path / "exported"
    assert main(["export", str(first), "--out", str(exported), "--dtype", "float32"]) == 0
    trained = load_file(str(first / "final" / "draft.safetensors"))
    # A third-party layout of the same draft: `layers.0.*` names and the embedding included (speculators).
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((exported / "config.json").read_text())
    tensors = {k.replace("midlayer.", "layers.0.", 1): v for k, v in load_file(str(exported / "model.safetensors")).items()}
    tensors["embed_tokens.weight"] = torch.zeros(400, 64)
    save_file(tensors, str(renamed / "model.safetensors"))
    for source in (first, exported, renamed):        # a training output (its final/), an export, a foreign export
        out = tmp_path / f"from_{source.name}"
        capsys.readouterr()
        # A learning rate this small leaves Adam's first step ~1e-12 per weight: the run holds the source's weights.
        assert main(["train", *common, "--output", str(out), "--steps", "1", "--lr", "1e-12",
                     "--init-draft", str(source)]) == 0
        assert f"draft initialized from {source}" in capsys.readouterr().err
        again = load_file(str(out / "final" / "draft.safetensors"))
        assert sorted(again) == sorted(trained)
        for name, t in trained.items():
            assert torch.allclose(again[name].float(), t.float(), atol=1e-6), name
        assert json.loads((out / "train_config.json").read_text())["init_draft"] == os.path.realpath(source)

    def refused(*flags: str) -> str:
        out = tmp_path / "refused"
        capsys.readouterr()
        assert main(["train", *common, "--output", str(out), "--steps", "1", *flags]) == 2
        assert not out.exists()
        return capsys.readouterr().err.splitlines()[-1]

    assert "does not exist" in refused("--init-draft", str(tmp_path / "nope"))
    fc_norm = tmp_path / "fc_norm.json"
    fc_norm.write_text(json.dumps({"eagle_architecture_config": {**TINY_ARCH, "fc_norm": True}}))
    err = refused("--init-draft", str(first), "--eagle-config", str(fc_norm))
    assert "missing ['fc_norm.0.weight', 'fc_norm.1.weight', 'fc_norm.2.weight']" in err
    residual_norm = tmp_path / "residual_norm"                # the same tensors, another layer (speculators)
    shutil.copytree(exported, residual_norm)
    cfg = json.loads((residual_norm / "config.json").read_text())
    (residual_norm / "config.json").write_text(json.dumps({**cfg, "norm_before_residual": True}))
    err = refused("--init-draft", str(residual_norm))
    assert "norm_before_residual=true" in err and "this run builds false" in err
    vocab = tmp_path / "vocab.safetensors"
    assert main(["vocab", train_data, "--draft-vocab-size", "64", "--out", str(vocab)]) == 0
    err = refused("--init-draft", str(exported), "--draft-vocab", str(vocab))
    assert "the draft has a vocabulary of" in err and "pass the --draft-vocab file that draft was trained with" in err


def test_init_from_base_copies_the_base_layer_after_the_top_aux_layer(tmp_path, tiny_model, train_data, capsys):  # noqa: F811
    """--init-from-base: fc is the identity on the top aux slot, the decoder layer (state half of
    q/k/v, o_proj, MLP, norms) is the base's next layer, the final norm the base's; the embedding
    half of q/k/v keeps its random init. A draft not shaped like the base, or no layer after the
    top aux layer, is refused before anything is written."""
    import dataclasses

    from safetensors.torch import load_file

    from draftdata.config import EagleConfig
    from draftdata.store import open_dataset
    from draftdata.train.model import check_base_model
    from draftdata.train.warm_start import read_base_layer_init

    out = tmp_path / "run"
    common = ["--data", train_data, "--model", str(tiny_model), "--batch-tokens", "256", "--ttt-steps", "2",
              "--no-plot", "--steps", "1"]
    assert main(["train", *common, "--output", str(out), "--lr", "1e-12", "--init-from-base"]) == 0
    assert "draft initialized from the base's layer 3 (fc: identity on aux layer 2)" in capsys.readouterr().err
    draft = load_file(str(out / "final" / "draft.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    h = 64

    def same(a, b):
        return torch.allclose(a.float(), b.float(), atol=1e-6)

    fc = torch.zeros(h, 3 * h)
    fc[:, 2 * h:] = torch.eye(h)
    assert same(draft["fc.weight"], fc)
    assert same(draft["norm.weight"], base["model.norm.weight"])
    assert same(draft["midlayer.hidden_norm.weight"], base["model.layers.3.input_layernorm.weight"])
    assert same(draft["midlayer.input_layernorm.weight"], torch.ones(h))
    for name in ("q_proj", "k_proj", "v_proj"):
        w = draft[f"midlayer.self_attn.{name}.weight"]
        assert same(w[:, h:], base[f"model.layers.3.self_attn.{name}.weight"])
        assert 0 < float(w[:, :h].std()) < 0.05                            # the random embedding half
    for name in ("self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert same(draft[f"midlayer.{name}.weight"], base[f"model.layers.3.{name}.weight"]), name

    def refused(*flags: str) -> str:
        bad = tmp_path / "refused"
        capsys.readouterr()
        assert main(["train", *common, "--output", str(bad), "--init-from-base", *flags]) == 2
        assert not bad.exists()
        return capsys.readouterr().err.splitlines()[-1]

    assert "the draft must be shaped like the base" in refused("--eagle-config", str(eagle_file(tmp_path)))
    assert "at most one of --init-draft and --init-from-base" in refused("--init-draft", str(out))
    cfg = check_base_model(tiny_model, EagleConfig(), open_dataset(train_data).schema)
    with pytest.raises(DraftdataError, match="layer 3 is the base's last"):
        read_base_layer_init(tiny_model, dataclasses.replace(cfg, aux_layer_ids=[0, 1, 3]))


def test_a_diverging_run_stops_before_the_weights_take_it(tmp_path, tiny_model, train_data, capsys):  # noqa: F811
    """An lr that blows the draft up: the step with a non-finite gradient norm stops the run with
    what to change, and neither a NaN checkpoint nor a NaN final draft is written."""
    out = tmp_path / "run"
    args = ["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out), "--eagle-config",
            str(eagle_file(tmp_path)), "--steps", "8", "--batch-tokens", "256", "--save-every", "1",
            "--lr", "1e30", "--warmup-steps", "0", "--max-grad-norm", "0", "--schedule", "constant", "--no-plot"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "(the loss diverged)" in err and "Lower --lr (now 1e+30)" in err, err
    assert not (out / "final").exists()
    for ckpt in (out / "checkpoints").iterdir():
        weights = load_file(str(ckpt / "draft.safetensors"))
        assert all(torch.isfinite(w.float()).all() for w in weights.values()), ckpt


def test_a_second_run_on_the_same_output_is_refused_while_the_first_trains(tmp_path, tiny_model, train_data):  # noqa: F811
    """Two runs on one --output logged steps twice and removed each other's checkpoints; the
    second now stops at once, naming the first, and can go on once the first is gone."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "draftdata.cli", "train", "--data", train_data, "--model", str(tiny_model),
           "--output", str(out), "--eagle-config", str(eagle_file(tmp_path)), "--steps", "100000",
           "--batch-tokens", "256", "--save-every", "2", "--log-every", "1", "--no-plot"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env())
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                break
        second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env(), timeout=120)
        assert second.returncode == 2
        assert f"another draftdata train (pid {proc.pid}) is training into it" in second.stderr, second.stderr
    finally:
        proc.kill()
        proc.wait(timeout=60)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))        # each step once


def test_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, tiny_model, train_data, capsys):  # noqa: F811
    out = tmp_path / "run"
    args = ["train", "--data", train_data, "--model", str(tiny_model), "--output", str(out), "--eagle-config",
            str(eagle_file(tmp_path)), "--batch-tokens", "256", "--save-every", "2", "--keep-checkpoints", "3",
            "--schedule", "constant", "--no-plot"]
    assert main(args + ["--steps", "4"]) == 0
    state = out / "checkpoints" / "step-00000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])                    # a crash of the machine mid-write
    capsys.readouterr()
    assert main(args + ["--steps", "6", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "passing over damaged checkpoint(s) step-00000004" in err and "resuming from" in err, err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    # Renamed out of the way: with --keep-checkpoints 3 the damaged step 4 no longer takes a slot
    # (sorted by name, it outranked the good checkpoints written below it and got them pruned).
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["damaged-step-00000004", "step-00000002", "step-00000004", "step-00000006"]
    for ckpt in ("step-00000004", "step-00000006"):
        (out / "checkpoints" / ckpt / "draft.safetensors").write_bytes(b"\0" * 10)
    assert main(args + ["--steps", "8", "--resume"]) == 0            # step 2 is intact
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))
    for ckpt in (out / "checkpoints").glob("step-*"):
        (ckpt / "draft.safetensors").write_bytes(b"\0" * 10)
    assert main(args + ["--steps", "10", "--resume"]) == 2
    assert "every checkpoint in" in capsys.readouterr().err


def test_damaged_held_out_samples_are_reported_and_an_empty_held_out_set_is_nan(
        tmp_path, tiny_model, train_data, capsys):  # noqa: F811
    """Held-out samples the loader left out were not reported at all; a held-out set (or TTT step)
    with no loss position logged 0, which reads as a result."""
    val, damaged = damaged_copy(train_data, tmp_path / "val")
    args = ["train", "--data", train_data, "--model", str(tiny_model), "--eagle-config", str(eagle_file(tmp_path)),
            "--steps", "2", "--batch-tokens", "256", "--no-plot"]
    assert main(args + ["--output", str(tmp_path / "r1"), "--val-data", val, "--val-every", "1"]) == 0
    err = capsys.readouterr().err
    left_out = re.search(r"val step 1: (\d+) damaged held-out sample\(s\) left out; `draftdata verify ", err)
    assert left_out and 0 < int(left_out.group(1)) <= len(damaged), err
    assert read_metrics(tmp_path / "r1")[0]["val_skipped_samples"] == int(left_out.group(1))

    from draftdata.train.trainer import per_position

    got = per_position(torch.tensor([3.0, 0.0]), torch.tensor([2.0, 0.0]))
    assert got[0] == 1.5 and math.isnan(got[1])


def test_resume_names_a_dataset_replaced_since_the_run_started(tmp_path, tiny_model, capsys):
    from test_train_support import make_dataset

    data = str(tmp_path / "data")
    make_dataset(data, tiny_model, n=8)
    args = ["train", "--data", data, "--model", str(tiny_model), "--output", str(tmp_path / "run"), "--eagle-config",
            str(eagle_file(tmp_path)), "--batch-tokens", "256", "--no-plot"]
    assert main(args + ["--steps", "2"]) == 0
    shutil.rmtree(data)
    make_dataset(data, tiny_model, n=8, seed=1)                     # the same path, other parts
    capsys.readouterr()
    assert main(args + ["--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trains on a snapshot of 1 parts" in err and "the dataset was replaced or parts were removed" in err, err
