"""Draft-quality benchmark: SmolLM2-135M-Instruct, synthesized answers -> EAGLE3 draft -> acceptance length.

Runs the whole product through its CLI, one resumable step at a time (a step whose output
exists is skipped, so a killed run continues where it stopped):

 1. prompts     --prompts records of ../shared/data/train.jsonl (the first ones, or round-robin over its
                sources with --prompt-mix sources), user turns only, in shards
 2. synthesize  the base model answers them (`draftdata synthesize`, greedy), shards in parallel;
                every synth-*.jsonl in the work dir is merged into synth.jsonl (one record per id)
 3. collect     hidden states twice: bf16 and fp8 codecs (`draftdata collect`)
 4. vocab       draft vocabulary of --vocab-size tokens from the bf16 dataset (`draftdata vocab`)
 5. train       (a) bf16 + vocab, (b) fp8 + vocab, (c) bf16 + full vocab, started together and
                stopped after --train-minutes; same seed, lr, constant schedule after warmup and
                data order, checkpoints every --save-every steps
 6. export      the checkpoint at the last step all three reached (equal budget), plus (a)'s last
                checkpoint when it got further (`draftdata export`)
 7. eval        K=5 chain drafting, greedy, on a fixed mt_bench subset (`draftdata eval`), all at
                once; only (a) also measures prompt-lookup decoding (same prompts, same run)
 8. summary     tables (markdown) + summary.json from the eval reports, metrics and datasets

Every long step runs with one torch thread per process: on a shared, overloaded 2-core box
several single-threaded processes get more done than one oversubscribed multi-threaded one.

Work files go to bench/_work/quality (git-ignored); every step's command, log and wall time
are recorded there (commands.sh, logs/, timings.json). Results are written up by hand in
bench/quality/results.md from summary.md.

    python bench/quality/run_quality.py            # everything (resumes)
    python bench/quality/run_quality.py --only summary
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
THREADS = 1  # torch threads of the whole box (--threads); steps run alone get all, concurrent ones share
DATA = REPO.parent / "shared" / "data"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "bench" / "_work" / "quality"), help="work directory")
    p.add_argument("--prompts", type=int, default=96, help="train.jsonl records to synthesize answers for")
    p.add_argument("--prompt-mix", choices=["first", "sources"], default="first",
                   help="first: the first --prompts records; sources: round-robin over gsm8k / t0 / selfinstruct")
    p.add_argument("--synth-max-new-tokens", type=int, default=160)
    p.add_argument("--synth-batch-size", type=int, default=24)
    p.add_argument("--synth-shards", type=int, default=4, help="parallel synthesize processes")
    p.add_argument("--max-seq-len", type=int, default=1024, help="collect and train sample length limit")
    p.add_argument("--vocab-size", type=int, default=8192, help="compressed draft vocabulary size")
    p.add_argument("--train-minutes", type=float, default=25, help="wall-clock budget of the (concurrent) trainings")
    p.add_argument("--max-steps", type=int, default=100000, help="--steps given to the trainer (the deadline stops it)")
    p.add_argument("--save-every", type=int, default=5, help="checkpoint interval: the comparison step is a multiple")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--batch-tokens", type=int, default=1024, help="token budget per training batch")
    p.add_argument("--eval-every", type=int, default=20, help="mt_bench subset: every Nth conversation (1 = all 80)")
    p.add_argument("--eval-max-turns", type=int, default=1, help="user turns per mt_bench conversation")
    p.add_argument("--eval-max-new-tokens", type=int, default=48)
    p.add_argument("--only", nargs="*", help="run only these steps (names as printed)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the box: a step run alone gets all, concurrent processes share them "
                        "(default 1: the overloaded shared box of the first run)")
    p.add_argument("--synth-minutes", type=float, default=None,
                   help="stop synthesizing after this long and keep what was written (default: until done)")
    p.add_argument("--train-mode", choices=["concurrent", "sequential"], default="concurrent",
                   help="concurrent: a, b, c together for --train-minutes; sequential: the headline (a) alone "
                        "with all threads for --train-minutes, then b and c together for --compare-minutes")
    p.add_argument("--compare-minutes", type=float, default=10, help="sequential mode: budget of b and c")
    return p.parse_args()


class Runner:
    """Runs steps in order, skipping those whose output exists; records commands and wall times."""

    def __init__(self, work: Path, only: list[str] | None) -> None:
        self.work = work
        self.only = set(only) if only else None
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.timings_path = work / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}

    def step(self, name: str, done: Path, cmd: list[str] | None = None, fn=None) -> None:
        """Run `cmd` (a CLI call, logged) or `fn()` unless `done` exists; `done` is written last."""
        if self.only is not None and name not in self.only:
            return
        if done.exists():
            print(f"[skip] {name}: {done} exists", file=sys.stderr)
            return
        print(f"[run ] {name}", file=sys.stderr, flush=True)
        t0 = time.time()
        if cmd is not None:
            line = f"OMP_NUM_THREADS={THREADS} " + shlex.join(cmd)
            with open(self.work / "commands.sh", "a") as f:
                f.write(f"# {name}\n{line}\n")
            log = self.work / "logs" / f"{name}.log"
            with open(log, "a") as out:
                out.write(f"$ {line}\n")
                out.flush()
                rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.work,
                                     env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
            if rc != 0:
                sys.exit(f"step {name} failed with exit status {rc}; see {log}")
        if fn is not None:
            fn()
        seconds = time.time() - t0
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        self.timings_path.write_text(json.dumps(self.timings, indent=2) + "\n")
        if cmd is not None and not done.exists():
            done.write_text(f"{seconds:.1f}\n")
        print(f"[done] {name} in {seconds / 60:.1f} min", file=sys.stderr, flush=True)


def jsonl_lines(path: Path) -> list[str]:
    """The non-blank lines of a JSONL file; split on "\\n" only: U+2028 is valid inside JSON strings."""
    return [line for line in path.read_text().split("\n") if line.strip()]


def write_prompts(src: Path, work: Path, n: int, shards: int, mix: str = "first") -> None:
    """n train.jsonl conversations, assistant turns dropped, dealt round-robin into shards.

    mix "first": the first n records. mix "sources": round-robin over the sources (the id prefix:
    gsm8k, t0, selfinstruct) in file order, so any prefix of each shard -- what a synthesize stopped
    by its time budget got through -- covers every source about equally until the small ones run out.
    """
    records = [json.loads(line) for line in jsonl_lines(src)]
    if mix == "sources":
        by_source: dict[str, list[dict]] = {}
        for rec in records:
            by_source.setdefault(rec["conversation_id"].split("-")[0], []).append(rec)
        queues = list(by_source.values())
        records = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    outs = [open(work / f"prompts-{k}.jsonl", "w") for k in range(shards)]
    for i, rec in enumerate(records[:n]):
        turns = [t for t in rec["conversations"] if t["role"] != "assistant"]
        outs[i % shards].write(json.dumps({"conversation_id": rec["conversation_id"], "conversations": turns}) + "\n")
    for out in outs:
        out.close()


def synthesize_shards(work: Path, shards: int, args: list[str], log: Path, minutes: float | None = None) -> None:
    """One `draftdata synthesize` per shard, in parallel (one torch thread each: on a shared, overloaded
    2-core box several single-threaded processes beat one oversubscribed multi-threaded process).

    synthesize appends whole lines per batch and resumes by id, so a killed run loses only the
    batches in flight; rerunning this step continues the shards. They are merged into synth.jsonl.
    """
    threads = max(1, THREADS // shards)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = []
    with open(log, "a") as out:
        for k in range(shards):
            cmd = ["draftdata", "synthesize", "--input", str(work / f"prompts-{k}.jsonl"),
                   "--output", str(work / f"synth-{k}.jsonl")] + args
            out.write(f"$ OMP_NUM_THREADS={threads} {shlex.join(cmd)}\n")
            out.flush()
            with open(work / "commands.sh", "a") as f:
                f.write(f"# synthesize shard {k}\nOMP_NUM_THREADS={threads} {shlex.join(cmd)}\n")
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env))
        deadline = time.time() + minutes * 60 if minutes else float("inf")
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(5)
        stopped = [p for p in procs if p.poll() is None]
        for p in stopped:  # synthesize keeps every finished batch; the merge takes what was written
            p.kill()
            p.wait()
        codes = [0 if p in stopped else p.returncode for p in procs]
        if stopped:
            print(f"synthesize: budget of {minutes} min spent, stopped {len(stopped)} shard(s)", file=sys.stderr)
    if any(codes):
        sys.exit(f"synthesize failed (exit statuses {codes}); see {log}")
    merge_synth(work)


def merge_synth(work: Path) -> None:
    """synth.jsonl = every synth-*.jsonl (shards, and synth-probe.jsonl from the sizing probe), one record per id."""
    seen: set[str] = set()
    tmp = work / "synth.jsonl.tmp"  # synth.jsonl marks the step done: it appears only whole
    with open(tmp, "w") as merged:
        for path in sorted(work.glob("synth-*.jsonl")):
            for line in jsonl_lines(path):
                cid = json.loads(line)["conversation_id"]
                if cid not in seen:
                    seen.add(cid)
                    merged.write(line + "\n")
    tmp.replace(work / "synth.jsonl")


def write_eval_subset(src: Path, dst: Path, every: int) -> None:
    """Every `every`-th mt_bench conversation (all 8 categories are covered for every <= 10)."""
    dst.write_text("".join(line + "\n" for i, line in enumerate(jsonl_lines(src)) if i % every == 0))


def train_concurrently(work: Path, runs: dict[str, list[str]], minutes: float, threads: int = 1) -> None:
    """Start every training at once (`threads` torch threads each), each with `--max-minutes minutes`.

    Same wall clock and the same share of a shared CPU for every variant. The trainer stops itself
    at a step boundary with a checkpoint when its time is up; one still running 5 minutes later is
    killed (its atomic checkpoints stay). A rerun resumes (--resume).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = {}
    for name, cmd in runs.items():
        cmd = cmd + ["--max-minutes", str(minutes)]
        with open(work / "commands.sh", "a") as f:
            f.write(f"# train {name}\nOMP_NUM_THREADS={threads} {shlex.join(cmd)}\n")
        log = open(work / "logs" / f"train_{name}.log", "a")
        log.write(f"$ OMP_NUM_THREADS={threads} {shlex.join(cmd)}\n")
        log.flush()
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
    deadline = time.time() + minutes * 60 + 300
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(5)
    for name, p in procs.items():
        if p.poll() is None:
            print(f"train {name}: still running 5 min past --max-minutes {minutes}, killing it", file=sys.stderr)
            p.kill()
            p.wait()


def run_concurrently(work: Path, cmds: dict[str, list[str]], kind: str, threads: int = 1) -> None:
    """Run the commands at once, `threads` torch threads each (skipping those whose report exists)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = {}
    for name, cmd in cmds.items():
        if Path(cmd[cmd.index("--output") + 1]).exists():
            continue
        with open(work / "commands.sh", "a") as f:
            f.write(f"# {kind} {name}\nOMP_NUM_THREADS={threads} {shlex.join(cmd)}\n")
        log = open(work / "logs" / f"{kind}_{name}.log", "a")
        log.write(f"$ OMP_NUM_THREADS={threads} {shlex.join(cmd)}\n")
        log.flush()
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
    failed = [name for name, p in procs.items() if p.wait() != 0]
    if failed:
        sys.exit(f"{kind} failed for {failed}; see {work / 'logs'}")


def last_checkpoint_step(run: Path) -> int:
    return max(int(c.name.split("-")[1]) for c in (run / "checkpoints").glob("step-*[0-9]"))


def common_checkpoint_step(work: Path, names: list[str]) -> int:
    """The last step every run has a checkpoint of: the equal-budget comparison point."""
    steps = []
    for name in names:
        ckpts = sorted((work / f"run_{name}" / "checkpoints").glob("step-*[0-9]"))
        if not ckpts:
            sys.exit(f"run_{name} has no checkpoint; give the trainings more --train-minutes")
        steps.append({int(c.name.split("-")[1]) for c in ckpts})
    return max(set.intersection(*steps))


def dataset_stats(url: Path) -> dict:
    from draftdata.store import open_dataset

    ds = open_dataset(str(url))
    stored = sum(p.stored_bytes for p in ds.parts)
    on_disk = sum(f.stat().st_size for f in url.rglob("*") if f.is_file())
    return {"samples": ds.num_samples, "tokens": ds.num_tokens, "codec": ds.schema.codec,
            "stored_bytes": stored, "bytes_on_disk": on_disk, "stored_bytes_per_token": stored / ds.num_tokens}


def train_stats(run: Path, at_step: int | None = None) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if at_step is not None:
        rows = [r for r in rows if r["step"] <= at_step]
    last = rows[-1]
    tail = rows[-5:]  # single steps are noisy (a few samples each): report the mean of the last 5
    return {"steps": last["step"], "tokens_seen": last["tokens_seen"], "minutes": last["elapsed_s"] / 60,
            "tokens_per_s": sum(r["tokens"] for r in rows) / last["elapsed_s"],
            "loss_last5": sum(r["loss"] for r in tail) / len(tail),
            "acc_last5": [sum(r["step_acc"][i] for r in tail) / len(tail) for i in range(len(last["step_acc"]))],
            "loss_by_step": {r["step"]: r["loss"] for r in rows}}


def summarize(work: Path, variants: dict[str, dict], out_md: Path, out_json: Path) -> None:
    from draftdata.train.trainer import plot_metrics

    summary: dict = {"datasets": {k: dataset_stats(work / k) for k in ("ds_bf16", "ds_fp8")}, "variants": {}}
    for v in variants.values():  # stopped runs never reached the trainer's own final plot
        if not (work / v["run"] / "training_curves.png").exists():
            plot_metrics(work / v["run"] / "metrics.jsonl", work / v["run"] / "training_curves.png")
    for name, v in variants.items():
        report_path = work / f"eval_{name}.json"
        if not report_path.exists():
            continue
        r = json.loads(report_path.read_text())
        e = r["eagle"]
        summary["variants"][name] = {
            "label": v["label"], "data": v["data"], "vocab": v["vocab"],
            "train": train_stats(work / v["run"], v.get("at_step")),
            "acceptance_length": e["acceptance_length"], "verify_passes": e["verify_passes"],
            "acceptance_rate_per_position": e["acceptance_rate_per_position"],
            "conditional_acceptance_rate_per_position": e["conditional_acceptance_rate_per_position"],
            "tokens_per_s": {m: r[m]["tokens_per_second"] for m in ("greedy", "eagle", "prompt_lookup") if m in r},
            "prompt_lookup_tokens_per_base_forward": r.get("prompt_lookup", {}).get("tokens_per_base_forward"),
            "speedup": r["speedup"], "output_matches_greedy": {
                m: f"{x['equal']}/{x['total']}" for m, x in r["output_matches_greedy"].items()},
            "turns": r["turns"], "conversations": r["conversations"],
        }
    out_json.write_text(json.dumps(summary, indent=2) + "\n")
    la, lb = (summary["variants"][k]["train"]["loss_by_step"] if k in summary["variants"] else {} for k in "ab")
    same = [s for s in la if s in lb]

    md = ["| variant | data | draft vocab | steps | tokens seen | train min | train tok/s | loss (last 5 steps) "
          "| train acc TTT 1/2/3 (last 5) | acc. length (K=5) | acceptance per position 1..5 | eagle tok/s "
          "| greedy tok/s | speedup vs greedy |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["variants"].items():
        t = s["train"]
        pos = " / ".join(f"{x:.2f}" for x in s["acceptance_rate_per_position"])
        accs = " / ".join(f"{x:.3f}" for x in t["acc_last5"])
        md.append(f"| {name}: {s['label']} | {s['data']} | {s['vocab']} | {t['steps']} | {t['tokens_seen']:,} "
                  f"| {t['minutes']:.1f} | {t['tokens_per_s']:.1f} | {t['loss_last5']:.3f} | {accs} "
                  f"| **{s['acceptance_length']:.3f}** | {pos} "
                  f"| {s['tokens_per_s']['eagle']:.1f} | {s['tokens_per_s']['greedy']:.1f} "
                  f"| {s['speedup']['eagle_vs_greedy']:.2f}x |")
    md += ["", "| dataset | samples | tokens | codec | stored bytes | bytes/token |", "|---|---|---|---|---|---|"]
    for k, d in summary["datasets"].items():
        md.append(f"| {k} | {d['samples']} | {d['tokens']:,} | {d['codec']} | {d['stored_bytes']:,} "
                  f"| {d['stored_bytes_per_token']:.0f} |")
    if same:
        diffs = [abs(la[s] - lb[s]) / la[s] for s in same]
        md += ["", f"Training loss, fp8 (b) vs bf16 (a) data, same batches at steps 1..{max(same)}: mean relative "
               f"difference {sum(diffs) / len(diffs):.2%}, largest {max(diffs):.2%}"]
    for name, s in summary["variants"].items():
        if "prompt_lookup" in s["tokens_per_s"]:
            md += ["", f"Prompt-lookup baseline (same run as {name}): "
                   f"{s['prompt_lookup_tokens_per_base_forward']:.3f} tokens per base forward, "
                   f"{s['tokens_per_s']['prompt_lookup']:.1f} tok/s; speedups {json.dumps(s['speedup'])}"]
    out_md.write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> int:
    global THREADS
    a = parse_args()
    THREADS = max(1, a.threads)
    work = Path(a.work).resolve()
    run = Runner(work, a.only)
    dd = ["draftdata"]

    synth = work / "synth.jsonl"
    run.step("prompts", work / "prompts-0.jsonl",
             fn=lambda: write_prompts(DATA / "train.jsonl", work, a.prompts, a.synth_shards, a.prompt_mix))
    synth_args = ["--model", "smollm2", "--max-new-tokens", str(a.synth_max_new_tokens),
                  "--batch-size", str(a.synth_batch_size)]
    run.step("synthesize", synth, fn=lambda: synthesize_shards(work, a.synth_shards, synth_args,
                                                                work / "logs" / "synthesize.log", a.synth_minutes))

    for codec in ("bf16", "fp8"):
        run.step(f"collect_{codec}", work / f"collect_{codec}.done", dd + [
            "collect", "--model", "smollm2", "--input", str(synth), "--output", str(work / f"ds_{codec}"),
            "--codec", codec, "--format", "zarr", "--max-seq-len", str(a.max_seq_len), "--on-long", "truncate"])

    vocab = work / f"vocab_{a.vocab_size}.safetensors"
    run.step("vocab", vocab, dd + ["vocab", str(work / "ds_bf16"), "--draft-vocab-size", str(a.vocab_size),
                                   "--out", str(vocab)])

    common = ["--model", "smollm2", "--steps", str(a.max_steps), "--lr", str(a.lr),
              "--warmup-steps", str(a.warmup_steps), "--schedule", "constant", "--batch-tokens", str(a.batch_tokens),
              "--max-seq-len", str(a.max_seq_len), "--save-every", str(a.save_every), "--keep-checkpoints", "0",
              "--log-every", "1", "--seed", "0", "--resume"]
    trainings = {  # name: (dataset, extra flags)
        "a": ("ds_bf16", ["--draft-vocab", str(vocab)]),
        "b": ("ds_fp8", ["--draft-vocab", str(vocab)]),
        "c": ("ds_bf16", []),
    }
    runs = {name: dd + ["train", "--data", str(work / data), "--output", str(work / f"run_{name}")] + common + extra
            for name, (data, extra) in trainings.items()}
    def train() -> None:
        if a.train_mode == "concurrent":
            train_concurrently(work, runs, a.train_minutes)
        else:
            train_concurrently(work, {"a": runs["a"]}, a.train_minutes, THREADS)
            train_concurrently(work, {k: runs[k] for k in ("b", "c")}, a.compare_minutes, max(1, THREADS // 2))
        (work / "train.done").write_text("done\n")

    run.step("train", work / "train.done", fn=train)

    variants = {
        "a": {"label": "bf16 data + 8k draft vocab (headline)", "data": "bf16", "vocab": a.vocab_size, "run": "run_a"},
        "b": {"label": "fp8 data + 8k draft vocab", "data": "fp8", "vocab": a.vocab_size, "run": "run_b"},
        "c": {"label": "bf16 data + full vocab", "data": "bf16", "vocab": 49152, "run": "run_c"},
    }
    subset = work / "mt_bench_eval.jsonl"
    run.step("eval_prompts", subset, fn=lambda: write_eval_subset(DATA / "mt_bench.jsonl", subset, a.eval_every))
    if not (work / "train.done").exists():
        return 0
    step = common_checkpoint_step(work, list(variants))
    print(f"equal-budget comparison at step {step}", file=sys.stderr)
    for v in variants.values():
        v["at_step"] = step
    last_a = last_checkpoint_step(work / "run_a")
    if last_a > step:  # the headline run also at the most steps it reached (no equal-budget partner)
        variants["a_last"] = {**variants["a"], "label": "bf16 data + 8k draft vocab, last checkpoint",
                              "at_step": last_a}
    evals = {}
    for name, v in variants.items():
        export = work / f"export_{name}"
        run.step(f"export_{name}", export / "config.json", dd + [
            "export", str(work / v["run"] / "checkpoints" / f"step-{v['at_step']:08d}"), "--out", str(export)])
        evals[name] = dd + ["eval", "--model", "smollm2", "--draft", str(export), "--prompts", str(subset),
                            "--steps", "5", "--max-new-tokens", str(a.eval_max_new_tokens),
                            "--max-turns", str(a.eval_max_turns),
                            "--output", str(work / f"eval_{name}.json")] + ([] if name == "a" else ["--no-prompt-lookup"])
    def evaluate() -> None:
        if a.train_mode == "concurrent":
            run_concurrently(work, evals, "eval")
        else:  # the headline alone with every thread (its speedups are the ones reported), then the rest
            headline = "a_last" if "a_last" in evals else "a"
            evals[headline] = [x for x in evals[headline] if x != "--no-prompt-lookup"]
            if headline != "a":
                evals["a"].append("--no-prompt-lookup")
            run_concurrently(work, {headline: evals[headline]}, "eval", THREADS)
            rest = {k: v for k, v in evals.items() if k != headline}
            run_concurrently(work, rest, "eval", max(1, THREADS // len(rest)))
        (work / "eval.done").write_text("done\n")

    run.step("eval", work / "eval.done", fn=evaluate)

    if a.only is None or "summary" in a.only:
        summarize(work, variants, work / "summary.md", work / "summary.json")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
