"""Ray overhead: `collect --ray` with 1 and 2 workers vs single-process `collect`, same input.

    python bench/ray/bench_ray.py [--sizes 30 90] [--cpus 2] [--modes single ray1 ray2] [--out FILE]

For each input size (the first N conversations of ../shared/data/train.jsonl) the same command
runs up to three ways, as a user would run it (a fresh `python -m draftdata.cli collect` each):

  single   draftdata collect --model smollm2 ...   with OMP_NUM_THREADS=--cpus (torch threads)
  ray1     ... --ray --ray-address <head> --num-workers 1   (the actor gets all --cpus CPUs)
  ray2     ... --ray --ray-address <head> --num-workers 2   (--cpus / 2 CPUs each)

so single and ray1 always use the same number of threads. The Ray head
(`ray start --head --num-cpus <--cpus>`, token auth off) is started once before the runs, as a
cluster is long-lived (its start time is reported separately), and frozen (SIGSTOP to its
process group) during single-process runs, whose machine would not run Ray's daemons; it is
thawed (SIGCONT) a few seconds before each Ray run. Reported:

- end-to-end wall time of each run and ray / single ratios;
- steady-state throughput from two sizes: (tokens_big - tokens_small) / (wall_big - wall_small),
  which cancels every fixed cost (process start, model load, actor start), and the fixed cost
  itself (wall - tokens / steady throughput);
- peak RSS of the CLI process (the driver, for Ray runs; /usr/bin/time) and of each Ray worker
  (VmHWM reported by the actor, from the run's summary.json).

Runs are interleaved (single, ray1, ray2, single, ...); ratios are given for the best and for the
median of `--repeats`, so load from other processes on the machine hits all three alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "train.jsonl"
MODES = ("single", "ray1", "ray2")  # the order runs are interleaved in
THAW_S = 3.0  # after SIGCONT: let the daemons catch up on their timers before a Ray run
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_head(temp: str, cpus: int, worker_niceness: int | None = None) -> tuple[str, int, float]:
    """`ray start --head` on free ports in its own process group; returns (address, pgid, seconds).

    Ray runs workers at nice 15 by default (`RAY_worker_niceness`); `worker_niceness` overrides it.
    """
    gcs, dash, client, agent, agent_grpc, env_agent, metrics = free_ports(7)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash), "--ray-client-server-port",
         str(client), "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(env_agent), "--metrics-export-port", str(metrics), "--num-cpus", str(cpus),
         "--temp-dir", temp, "--disable-usage-stats"],
        env=ENV if worker_niceness is None else {**ENV, "RAY_worker_niceness": str(worker_niceness)},
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=180)
    if proc.returncode:
        sys.exit(f"ray start failed:\n{out[-3000:]}")
    return f"127.0.0.1:{gcs}", proc.pid, time.perf_counter() - t0


def stop_head(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(3)


def first_conversations(n: int, path: Path) -> Path:
    with open(DATA) as f, open(path, "w") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return path


class CpuSampler:
    """CPU seconds spent during a run, per kind of process: the CLI (driver), the Ray actors, the Ray
    daemons (raylet, GCS, dashboard, agents, idle workers) and everything else on the machine.

    Polls /proc twice a second and keeps each pid's last CPU total, so processes that start and
    end within the run (the actors) count up to their last poll (<= 0.5 s of CPU missed each).
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, head_session: int) -> None:
        self._session = head_session
        self._last: dict[int, tuple[str, float]] = {}
        self._start = {pid: cpu for pid, (_, cpu) in self._poll().items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _poll(self) -> dict[int, tuple[str, float]]:
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
                cpu = (int(fields[11]) + int(fields[12])) / self.TICK  # utime + stime
                pid = int(d.name)
                kind = self._kind(d, int(fields[3]))  # a worker's title changes: ray::IDLE -> ray::CollectWorker
                if kind is None:  # exiting: no command line any more; keep what it was
                    kind = self._last.get(pid, ("other", 0.0))[0]
            except (OSError, ValueError, IndexError):
                continue
            out[pid] = (kind, cpu)
        return out

    def _kind(self, d: Path, session: int) -> str | None:
        cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if not cmd:
            return None
        if "draftdata.cli" in cmd:
            return "cli"
        if cmd.startswith(("ray::CollectWorker", "ray::_OutputLock")):
            return "actors"
        if cmd.startswith("ray::IDLE"):
            return "ray_idle_workers"
        return "ray_daemons" if session == self._session else "other"

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._last.update(self._poll())

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        out: dict[str, float] = {}
        for pid, (kind, total) in self._last.items():  # a pid counts under its last kind
            out[kind] = out.get(kind, 0.0) + max(0.0, total - self._start.get(pid, 0.0))
        return {k: round(v, 1) for k, v in sorted(out.items())}


def run(mode: str, inp: Path, out: Path, batch_tokens: int, address: str, cpus: int, head_session: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-f", "TIME %M %e", sys.executable, "-m", "draftdata.cli", "collect", "--model", "smollm2",
           "--input", str(inp), "--output", str(out), "--batch-tokens", str(batch_tokens), "--part-size", "64"]
    if mode != "single":
        cmd += ["--ray", "--ray-address", address, "--num-workers", mode[-1]]
    load = os.getloadavg()[0]
    env = {**ENV, "OMP_NUM_THREADS": str(cpus)} if mode == "single" else ENV
    sampler = CpuSampler(head_session)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    cpu = sampler.stop()
    if done.returncode:
        sys.exit(f"{mode} failed:\n{done.stderr[-4000:]}")
    rss_kb, wall = done.stderr.strip().splitlines()[-1].split()[1:]
    (summary_path,) = sorted(out.glob("_reports/*/summary.json"))
    summary = json.loads(summary_path.read_text())
    ray = summary["settings"].get("ray") or {}
    return {"mode": mode, "wall_s": float(wall), "tokens": summary["stats"]["tokens"],
            "conversations": summary["stats"]["written"], "cli_peak_rss_mib": int(rss_kb) / 1024,
            "worker_peak_rss_mib": [r / 2**20 for r in ray.get("worker_peak_rss", [])],
            "worker_setup_s": [w.get("setup_s") for w in ray.get("worker_info", [])],
            "units": ray.get("units_done"), "load_avg_1m_at_start": load, "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[100, 300], metavar=("SMALL", "BIG"))
    ap.add_argument("--batch-tokens", type=int, default=512,
                    help="also sets the work unit: 32 x this many tokens (default 512: units of 16k tokens)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2,
                    help="CPUs of the Ray head and threads of the single-process run (default 2, this machine)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--out", type=Path, default=None, help="append a markdown report here")
    ap.add_argument("--worker-niceness", type=int, default=None,
                    help="RAY_worker_niceness of the head (Ray's default: 15, i.e. actors yield to every other process)")
    args = ap.parse_args()

    from draftdata.models import resolve_model

    resolve_model("smollm2")  # convert the GGUF once, outside the timings
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    temp = tempfile.mkdtemp(prefix="bray", dir="/tmp")
    address, pgid, head_s = start_head(temp, args.cpus, args.worker_niceness)
    frozen = False
    results: dict[tuple[int, str], dict] = {}
    walls: dict[tuple[int, str], list[float]] = {}
    try:
        for n in args.sizes:
            inp = first_conversations(n, work / f"in{n}.jsonl")
            for _ in range(args.repeats):
                for mode in [m for m in MODES if m in args.modes]:
                    if (mode == "single") != frozen:
                        os.killpg(pgid, signal.SIGSTOP if mode == "single" else signal.SIGCONT)
                        frozen = mode == "single"
                        time.sleep(THAW_S if not frozen else 0.5)
                    r = run(mode, inp, work / f"out-{mode}", args.batch_tokens, address, args.cpus, pgid)
                    print(json.dumps({"n": n, **r}), flush=True)
                    walls.setdefault((n, mode), []).append(r["wall_s"])
                    best = results.get((n, mode))
                    if best is None or r["wall_s"] < best["wall_s"]:
                        results[(n, mode)] = r
    finally:
        if frozen:
            os.killpg(pgid, signal.SIGCONT)
        stop_head(pgid)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    small, big = args.sizes
    modes = [m for m in MODES if m in args.modes]
    steady = {}
    for mode in modes:
        a, b = results[(small, mode)], results[(big, mode)]
        steady[mode] = (b["tokens"] - a["tokens"]) / (b["wall_s"] - a["wall_s"])
    ratios: dict[str, float] = {}
    for num, den in (("ray1", "single"), ("ray2", "ray1")):
        if num in modes and den in modes:
            for n in args.sizes:
                ratios[f"{num}/{den} wall, n={n}"] = round(results[(n, num)]["wall_s"] / results[(n, den)]["wall_s"], 3)
                ratios[f"{num}/{den} median wall, n={n}"] = round(
                    statistics.median(walls[(n, num)]) / statistics.median(walls[(n, den)]), 3)
            ratios[f"{num}/{den} steady throughput"] = round(steady[num] / steady[den], 3)
    report = {
        "ray_head_start_s": round(head_s, 1), "batch_tokens": args.batch_tokens, "cpus": args.cpus,
        "worker_niceness": args.worker_niceness,
        "walls_s": {f"{mode} n={n}": w for (n, mode), w in walls.items()},
        "runs": [{"n": n, **r} for (n, _), r in sorted(results.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1])))],
        "steady_tokens_per_s": {m: round(v, 1) for m, v in steady.items()},
        "fixed_cost_s": {m: round(results[(big, m)]["wall_s"] - results[(big, m)]["tokens"] / steady[m], 1)
                         for m in modes},
        "ratios": ratios,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n### Run {time.strftime('%Y-%m-%d %H:%M')} (`{' '.join(sys.argv[1:])}`)\n\n```json\n"
                    f"{json.dumps(report, indent=2)}\n```\n")


if __name__ == "__main__":
    main()
