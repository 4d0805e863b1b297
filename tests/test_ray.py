"""`collect --ray` and the actor pool on a real local Ray cluster (`ray start --head` in the test).

Faults are real: worker and driver processes are killed with SIGKILL, and a poisoned record
kills its worker every time it is run. The cluster gets its own ports and temp dir, runs with
RAY_AUTH_MODE=disabled, and is torn down by killing the process group it was started in (never
`ray stop`, which would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from draftdata.cli import main
from draftdata.store import open_dataset

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def setup_module(module):
    import ray.cloudpickle

    # Ray workers cannot import this test module: ship its toy workers and hooks by value.
    ray.cloudpickle.register_pickle_by_value(module)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    address: str  # GCS address for ray.init / --ray-address
    dashboard: str  # job submission URL
    temp_dir: str
    pgid: int


@pytest.fixture(scope="module")
def ray_head():
    """A one-node cluster with 2 CPUs and a small object store, on free ports."""
    temp = tempfile.mkdtemp(prefix="ddray", dir="/tmp")  # short: Ray puts unix sockets under it
    gcs, dash, client, agent, agent_grpc, env_agent, metrics = _free_ports(7)
    cmd = ["ray", "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
           "--metrics-export-port", str(metrics), "--num-cpus", "2", "--object-store-memory", str(100 * 2**20),
           "--temp-dir", temp, "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    head = Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", temp, proc.pid)
    try:
        assert proc.returncode == 0, out[-3000:]
        yield head
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _kill_group(head.pgid)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    """Stop the head's daemons (they share the process group `ray start` ran in)."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture()
def ray_driver(ray_head):
    """Connects this process to the cluster (again, with a runtime env if given); disconnects after."""
    import ray

    def connect(runtime_env=None):
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address=ray_head.address, runtime_env=runtime_env, logging_level="ERROR")

    connect()
    yield connect
    ray.shutdown()


# ---------------------------------------------------------------- data and helpers

WORDS = "the quick brown fox jumps over the lazy dog what is 12 plus 30 answer 42 hello world sea".split()


def conversations(n: int, seed: int = 0, prefix: str = "c", words: int = 30) -> list[dict]:
    g = random.Random(seed)
    out = []
    for i in range(n):
        turns = [("user", " ".join(g.choices(WORDS, k=g.randint(1, max(1, words // 2))))),
                 ("assistant", " ".join(g.choices(WORDS, k=g.randint(1, words))))]
        out.append({"conversation_id": f"{prefix}{i:04d}",
                    "conversations": [{"role": r, "content": c} for r, c in turns]})
    return out


def write_input(path: Path, records: list) -> str:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return str(path)


def collect_args(model, inp, out, *extra) -> list[str]:
    return ["collect", "--model", str(model), "--input", str(inp), "--output", str(out), "--dtype", "fp32",
            "--max-seq-len", "256", *extra]


def ray_args(head: Head, workers: int = 2) -> list[str]:
    return ["--ray", "--ray-address", head.address, "--num-workers", str(workers)]


def stored(url, **kw) -> dict[str, dict]:
    ds = open_dataset(str(url), **kw)
    out: dict[str, dict] = {}
    for p in range(len(ds.parts)):
        for s in ds.iter_part(p):
            assert s["conversation_id"] not in out, f"{s['conversation_id']} stored twice"
            out[s["conversation_id"]] = s
    return out


def stored_ids(url, **kw) -> list[str]:
    return [cid for p in open_dataset(str(url), **kw).parts for cid in p.conversation_ids]


def commits(out: Path) -> int:
    d = out / "commits"
    return len([p for p in d.iterdir() if p.suffix == ".json"]) if d.exists() else 0


def summary_json(out: Path) -> dict:
    (path,) = sorted(out.glob("_reports/*/summary.json"))[-1:]
    return json.loads(path.read_text())


def worker_pids(method: bytes = b"") -> list[int]:
    """Processes of CollectWorker actors: Ray titles them `ray::[<actor name>:]CollectWorker`,
    with `.run_unit` appended while they run a unit."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                title = (d / "cmdline").read_bytes()
                if title.startswith(b"ray::") and b"CollectWorker" + method in title.split(b"\0")[0]:
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def wait_for(condition, what: str, timeout: float = 120.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended before {what}: {proc.stdout.read()[-3000:] if proc.stdout else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------- the pool on its own


class ToyWorker:
    """A pool worker without a model: squares numbers, fails on request."""

    def ready(self):
        return {"pid": os.getpid(), "summary": "toy"}

    def run_unit(self, unit_id, numbers, fail_on):
        if set(numbers) & set(fail_on):
            raise ValueError(f"bad number in {unit_id}")
        return [n * n for n in numbers]


class DyingWorker(ToyWorker):
    """Its process dies (os._exit: as a segfault or the OOM killer would end it) on a poisoned unit."""

    def run_unit(self, unit_id, numbers, poisoned):
        time.sleep(0.3 if poisoned else 1.5)  # the poisoned unit dies while the other one still runs
        if poisoned:
            os._exit(1)
        return [n * n for n in numbers]


class BrokenWorker(ToyWorker):
    def __init__(self):
        raise RuntimeError("cannot load the model")


def test_pool_retries_elsewhere_and_reports_failed_units_with_their_items(ray_driver, capsys):
    from draftdata.collect.ray_pool import ActorPool, PoolError, PoolProgress, WorkUnit

    units = [WorkUnit(f"u{i}", args=(list(range(4 * i, 4 * i + 4)), [13]), item_ids=[str(n) for n in range(4 * i, 4 * i + 4)],
                      size=4) for i in range(6)]
    results = {}
    seen_retry = []

    def before_retry(unit):
        seen_retry.append(unit.id)
        return unit

    pool = ActorPool(ToyWorker, num_workers=2, num_cpus=0.5, max_retries=2, in_flight=2, max_concurrency=2)
    progress = PoolProgress(total_items=24, desc="toy", unit="n", interval=0)
    report = pool.run(units, on_done=lambda u, r: results.__setitem__(u.id, r), before_retry=before_retry,
                      progress=progress)
    progress.close()
    err = capsys.readouterr().err
    assert sorted(results) == ["u0", "u1", "u2", "u4", "u5"]
    assert results["u1"] == [16, 25, 36, 49]
    (failure,) = report.failed
    assert failure.unit_id == "u3" and failure.item_ids == ["12", "13", "14", "15"] and failure.attempts == 3
    assert all("ValueError: bad number in u3" in e for e in failure.errors)
    # the retry went to the other worker (the one that raised stays alive but is avoided)
    workers = [e.split(" on worker ")[1].split(" ")[0] for e in failure.errors]
    assert workers[0] != workers[1]
    assert seen_retry == ["u3", "u3", "u3"]  # also after the last attempt (it may have committed everything)
    assert "unit u3: attempt 1/3 failed" in err and "giving up after 3 attempts" in err
    assert "units 5/6" in err and "1 FAILED" in err
    assert not pool.live_workers()

    # A unit whose last attempt failed after all of its items were committed is done, not failed
    # (collect: a worker killed after its last commit; it was reported FAILED, exit status 1).
    last = ActorPool(ToyWorker, num_workers=1, num_cpus=0.5, max_retries=0)
    report = last.run(units[3:4], on_done=lambda u, r: None, before_retry=lambda unit: None)
    assert not report.failed and report.units_done == 1 and report.units_skipped == 1

    # When the pool stops (every attempt failing), the units it gave up before are still reported.
    stopping = ActorPool(ToyWorker, num_workers=1, num_cpus=0.5, max_retries=0, max_consecutive_failures=3)
    bad = [WorkUnit(f"b{i}", args=([13], [13]), item_ids=["13"], size=1) for i in range(5)]
    with pytest.raises(PoolError, match="3 work unit attempts failed in a row") as stopped:
        stopping.run(bad, on_done=lambda u, r: None)
    assert [f.unit_id for f in stopped.value.report.failed] == ["b0", "b1"]

    broken = ActorPool(BrokenWorker, num_workers=1, num_cpus=0.5, max_start_failures=2)
    with pytest.raises(PoolError, match="failed to start.*cannot load the model"):
        broken.run(units[:1], on_done=lambda u, r: None)


def test_a_unit_that_kills_its_worker_does_not_use_up_the_attempts_of_the_unit_beside_it(ray_driver, capsys):
    """Two units share a worker (in_flight=2); one kills the process. Which one did is unknown, so
    that attempt is counted for neither: with --max-retries 0 the innocent unit was given up with
    the poisoned one (23 conversations reported unit_failed for nothing). Both are retried alone,
    and only the poisoned one fails."""
    from draftdata.collect.ray_pool import ActorPool, WorkUnit

    units = [WorkUnit("innocent", args=([1, 2], False), item_ids=["1", "2"]),
             WorkUnit("poisoned", args=([3], True), item_ids=["3"])]
    results = {}
    pool = ActorPool(DyingWorker, num_workers=1, num_cpus=0.5, max_retries=0, in_flight=2, max_concurrency=2)
    report = pool.run(units, on_done=lambda u, r: results.__setitem__(u.id, r))
    err = capsys.readouterr().err
    assert results == {"innocent": [1, 4]}
    (failure,) = report.failed
    assert failure.unit_id == "poisoned" and failure.attempts == 2
    assert "(its worker also ran another unit: not counted); retrying alone" in err
    assert not pool.live_workers()


def test_a_second_driver_on_one_output_says_it_waits_then_names_the_lock(ray_driver, tmp_path, capsys):
    """A second collect --ray on an output another live job writes waited 60 s without a word."""
    import ray

    from draftdata.collect.ray_job import acquire_output_lock
    from draftdata.errors import DraftdataError

    url = str(tmp_path / "ds")
    lock, _ = acquire_output_lock(url)
    try:
        with pytest.raises(DraftdataError, match="another draftdata collect job is writing to"):
            acquire_output_lock(url, timeout=1.0)
        assert "another collect job holds" in capsys.readouterr().err
    finally:
        ray.kill(lock)


def test_pool_replaces_a_worker_that_died_idle_without_charging_the_next_unit(ray_driver, capsys):
    """A worker SIGKILLed while it waited for work (here: the input is slow) is found dead by a
    ping before it gets the next unit; that unit was charged an attempt it never ran and, with
    no retries left, was reported FAILED."""
    from draftdata.collect.ray_pool import IDLE_PING_S, ActorPool, WorkUnit

    pids: list[int] = []
    first_done = threading.Event()

    def units():
        yield WorkUnit("u0", args=([2], []), item_ids=["2"])
        assert first_done.wait(60)
        (pid,) = pids
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes(),
                 "the idle worker to die", timeout=30)
        time.sleep(IDLE_PING_S + 0.5)
        yield WorkUnit("u1", args=([3], []), item_ids=["3"])

    class PidWorker(ToyWorker):
        def run_unit(self, unit_id, numbers, fail_on):
            return os.getpid(), super().run_unit(unit_id, numbers, fail_on)

    def on_done(unit, result):
        pids.append(result[0])
        results[unit.id] = result[1]
        first_done.set()

    results: dict[str, list[int]] = {}
    pool = ActorPool(PidWorker, num_workers=1, num_cpus=0.5, max_retries=0)
    report = pool.run(units(), on_done=on_done)
    err = capsys.readouterr().err
    assert not report.failed, report.failed
    assert results == {"u0": [4], "u1": [9]} and pids[0] != pids[1]
    assert report.workers_lost == 1 and report.workers_started == 2
    assert "worker 0" in err and "died while idle" in err


def test_pool_progress_gives_no_eta_before_a_unit_has_finished():
    """Conversations the driver skips or rejects take no time: an ETA from them alone (no worker
    started yet) was a made-up figure."""
    import io

    from draftdata.collect.ray_pool import PoolProgress, WorkUnit

    out = io.StringIO()
    progress = PoolProgress(total_items=10, desc="collect", unit="conv", interval=0, file=out)
    progress.start()
    progress.update(2)
    assert "2/10 convs" in out.getvalue() and "ETA" not in out.getvalue()
    progress.unit_finished(WorkUnit("u0", args=(), item_ids=["a", "b"], size=100), ok=True)
    assert "4/10 convs" in out.getvalue() and "ETA" in out.getvalue().splitlines()[-1]
    progress.close()


@pytest.mark.parametrize("command, flags, message", [
    ("collect", ["--num-workers", "2"], "--num-workers only apply with --ray"),
    ("collect", ["--ray-address", "127.0.0.1:9", "--max-retries", "1"], "--ray-address, --max-retries only apply"),
    ("collect", ["--ray", "--ray-address", "127.0.0.1:9", "--gpus-per-worker", "inf"], "must be a number >= 0"),
    ("collect", ["--ray", "--ray-address", "127.0.0.1:9", "--gpus-per-worker", "nan"], "must be a number >= 0"),
    ("collect", ["--ray", "--ray-address", "127.0.0.1:9", "--max-retries", "-1"], "--max-retries -1: must be at least 0"),
    ("synthesize", ["--work-unit-size", "4"], "--work-unit-size only apply with --ray"),
    ("synthesize", ["--ray", "--ray-address", "127.0.0.1:9", "--work-unit-size", "0"], "must be at least 1"),
])
def test_ray_flags_are_checked_before_any_work(tiny_model, tmp_path, capsys, command, flags, message):
    """Ray flags without --ray were ignored, `inf` GPUs gave a traceback, `nan` and a work unit of 0
    passed silently; now each is one line and exit status 2, before an (unreachable) cluster is tried."""
    inp = write_input(tmp_path / "in.jsonl", conversations(2))
    out = tmp_path / ("out" if command == "collect" else "out.jsonl")
    start = time.monotonic()
    assert main([command, "--model", str(tiny_model), "--input", inp, "--output", str(out), *flags]) == 2
    assert message in capsys.readouterr().err and time.monotonic() - start < 30
    assert not out.exists()


# ---------------------------------------------------------------- same content as single-process collect


def test_plan_workers_follows_the_device_flag_on_a_cluster_with_gpus(monkeypatch):
    """--device auto (the default) takes one GPU per actor where the cluster has GPUs; an explicit
    --device cpu means CPU actors there (it used to be turned into cuda), and cpu with GPU actors
    is refused. The local cluster declares 2 GPUs (a resource count: no GPU is touched)."""
    import ray

    from draftdata.collect.ray_job import plan_workers
    from draftdata.collect.synthesize import SynthSettings, plan_synth_workers
    from draftdata.errors import DraftdataError

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=2, object_store_memory=80 * 2**20, include_dashboard=False,
             logging_level="ERROR")
    try:
        for device in ("auto", "cuda", "cuda:1"):
            plan = plan_workers(None, None, device)
            assert (plan.num_workers, plan.num_gpus, plan.device) == (2, 1, "cuda"), device
        plan = plan_workers(None, None, "cpu")
        assert (plan.num_workers, plan.num_gpus, plan.device) == (1, 0, "cpu")
        with pytest.raises(DraftdataError, match="--device cpu with --gpus-per-worker 1"):
            plan_workers(None, 1, "cpu")
        assert plan_workers(None, 0, "auto").device == "cpu"
        # synthesize --endpoint: the actors are HTTP clients, CPU actors unless GPUs are asked for
        endpoint = SynthSettings(model=None, input="-", output="-", endpoint="http://127.0.0.1:1/v1", device="auto")
        plan = plan_synth_workers(None, None, endpoint)
        assert (plan.num_gpus, plan.device) == (0, "cpu")
        assert plan_synth_workers(None, 1, endpoint).num_gpus == 1
        assert plan_synth_workers(None, None, SynthSettings(model="m", model_path="m", input="-", output="-", device="auto")).num_gpus == 1
    finally:
        ray.shutdown()


def test_await_actor_death_confirms_a_killed_actor(ray_driver):
    """What the pool waits for before retrying a unit whose actor became unreachable: Ray's own
    report that the actor is dead (a live one is not reported dead)."""
    import ray

    from draftdata.collect.ray_pool import await_actor_death

    @ray.remote(num_cpus=0)
    class Idle:
        def ping(self) -> int:
            return 1

    alive, doomed = Idle.remote(), Idle.remote()
    assert ray.get([alive.ping.remote(), doomed.ping.remote()]) == [1, 1]
    ray.kill(doomed, no_restart=True)
    t0 = time.monotonic()
    assert await_actor_death(doomed, timeout=30) and time.monotonic() - t0 < 30
    assert not await_actor_death(alive, timeout=1.5)
    ray.kill(alive)


def test_ray_collect_equals_single_process_and_writes_to_s3(tiny_model, ray_head, ray_driver, s3_bucket, tmp_path,
                                                           capsys):
    bucket, opts = s3_bucket
    good = conversations(240, seed=1, words=6)  # short: several sequences per batch
    inp = write_input(tmp_path / "in.jsonl", good[:50] + ["{not json\n"] + good[50:])
    endpoint = opts["client_kwargs"]["endpoint_url"]
    s3 = ["-S", "key=testing", "-S", "secret=testing", "-S", f"client_kwargs.endpoint_url={endpoint}",
          "-S", "client_kwargs.region_name=us-east-1"]
    # --batch-tokens 48: batches of 2-4 sequences, windows (= work units) of 1,536 tokens
    common = ["--batch-tokens", "48", "--part-size", "0.5"]
    local = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fast as 2 on a busy 2-core machine (the actors use 1 each); same numbers
    try:
        assert main(collect_args(tiny_model, inp, local, *common)) == 0
    finally:
        torch.set_num_threads(threads)
    url = f"{bucket}/ray-ds"
    assert main(collect_args(tiny_model, inp, url, *common, *s3, *ray_args(ray_head))) == 0
    out = capsys.readouterr()
    assert "written    240 conversations" in out.out and "malformed_json 1" in out.out
    assert "2 workers x 1 CPU" in out.err and re.search(r"units (\d+)/\1,", out.err)
    if os.geteuid() == 0:  # CPU actors compute at the raylet's niceness, not Ray's worker niceness (15)
        ours = str(os.getpriority(os.PRIO_PROCESS, 0))
        assert re.findall(r"ready: cpu, 1 threads at nice (-?\d+)", out.err) == [ours, ours], out.err

    a, b = stored(local), stored(url, storage_options=opts)
    assert sorted(a) == sorted(b) == sorted(c["conversation_id"] for c in good)
    for cid in a:
        for name in ("input_ids", "loss_mask", "aux_hidden_states", "hidden_states"):
            assert torch.equal(a[cid][name], b[cid][name]), f"{cid} {name} differs"
    parts = open_dataset(url, storage_options=opts).parts
    units = {p.work_unit for p in parts}
    assert len(units) >= 3 and all(u.startswith("w0000") for u in units)
    assert main(["verify", url, *s3]) == 0


def test_ray_collect_rejects_states_with_inf_or_nan_through_the_driver(tiny_model, ray_head, ray_driver, tmp_path,
                                                                        capsys):
    """A worker finds the overflow; the driver counts it and writes it to the rejects file."""
    from conftest import overflowing_model
    from transformers import AutoTokenizer

    model = overflowing_model(tiny_model, tmp_path / "model", " sea")   # "sea" after a space: one token
    (token,) = AutoTokenizer.from_pretrained(model).encode(" sea", add_special_tokens=False)
    tokenizer = AutoTokenizer.from_pretrained(model)
    good = conversations(30, seed=3, words=6)
    hot = [c["conversation_id"] for c in good
           if any(token in tokenizer.encode(m["content"], add_special_tokens=False) for m in c["conversations"])]
    assert 0 < len(hot) < len(good)
    inp = write_input(tmp_path / "in.jsonl", good)
    out = tmp_path / "ds"
    argv = collect_args(model, inp, out, "--rejects", str(tmp_path / "rejects.jsonl"), *ray_args(ray_head, 1))
    argv[argv.index("fp32")] = "fp16"
    assert main(argv) == 0
    assert f"non_finite {len(hot)}" in capsys.readouterr().out
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["conversation_id"] for r in rejects) == sorted(hot)
    assert {r["reason"] for r in rejects} == {"non_finite"}
    assert sorted(stored(out)) == sorted(c["conversation_id"] for c in good if c["conversation_id"] not in hot)


def test_strict_ray_collect_stops_at_a_bad_record_before_it_touches_ray(tiny_model, tmp_path, capsys):
    """--strict validates the whole input before connecting (and before requesting actors): the
    unreachable cluster address is never tried."""
    inp = write_input(tmp_path / "in.jsonl", conversations(3) + ["{not json\n"])
    rc = main(collect_args(tiny_model, inp, tmp_path / "ds", "--strict", "--ray", "--ray-address", "127.0.0.1:9"))
    err = capsys.readouterr().err
    assert rc == 2 and "--strict stops at the first bad record" in err and "connect" not in err, err


def test_ray_collect_of_an_empty_input_touches_neither_ray_nor_the_output(tiny_model, tmp_path, capsys):
    """As in a single-process run: a warning, exit 0, no dataset; the unreachable address is never tried."""
    inp = write_input(tmp_path / "in.jsonl", ["\n"])
    for extra in ([], ["--strict"]):
        rc = main(collect_args(tiny_model, inp, tmp_path / "ds", *extra, "--ray", "--ray-address", "127.0.0.1:9"))
        err = capsys.readouterr().err
        assert rc == 0 and "no records were read" in err and "connect" not in err, err
        assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------- faults


def test_worker_sigkilled_mid_unit_is_replaced_and_the_unit_retried(tiny_model, ray_head, ray_driver, tmp_path,
                                                                    capsys):
    good = conversations(120, seed=2)
    inp = write_input(tmp_path / "in.jsonl", good)
    out = tmp_path / "ds"
    # parts of ~3 samples, so a worker commits many parts inside each unit (of ~40 conversations)
    argv = collect_args(tiny_model, inp, out, "--batch-tokens", "64", "--part-size", "0.05", *ray_args(ray_head))
    rc: list[int] = []
    driver = threading.Thread(target=lambda: rc.append(main(argv)))
    driver.start()
    try:
        wait_for(lambda: commits(out) >= 3 and worker_pids(b".run_unit"), "a worker mid-unit")
        victim = worker_pids(b".run_unit")[0]
        os.kill(victim, signal.SIGKILL)
    finally:
        driver.join(timeout=240)
    assert rc == [0]
    err = capsys.readouterr().err
    assert f"(pid {victim} on" in err and "died; starting a replacement" in err
    ids = stored_ids(out)
    assert len(ids) == len(set(ids)), "a conversation was stored twice"
    assert sorted(ids) == sorted(c["conversation_id"] for c in good)
    ray_info = summary_json(out)["settings"]["ray"]
    # the replacement may still be loading when the survivor finishes the last unit
    assert ray_info["workers_lost"] == 1 and ray_info["workers_started"] in (2, 3) and not ray_info["units_failed"]
    assert main(["verify", str(out)]) == 0


def _poison_hook():
    """Runs in every worker process of the poison test: a batch holding a `poison*` conversation
    crashes the process (as a segfaulting kernel would)."""
    import os
    import signal

    from draftdata.collect import runner

    forward = runner._forward

    def crashing_forward(backend, batch, aux_layer_ids):
        if any(s.conversation_id.startswith("poison") for s in batch):
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(backend, batch, aux_layer_ids)

    runner._forward = crashing_forward


def test_poisoned_record_fails_its_unit_after_bounded_retries_and_the_rest_completes(
        tiny_model, ray_head, ray_driver, tmp_path, capsys):
    ray_driver(runtime_env={"worker_process_setup_hook": _poison_hook})
    good = conversations(60, seed=4)
    poison = conversations(1, seed=5, prefix="poison")[0]
    inp = write_input(tmp_path / "in.jsonl", good[:30] + [poison] + good[30:])
    out = tmp_path / "ds"
    argv = collect_args(tiny_model, inp, out, "--batch-tokens", "64", "--part-size", "0.01", "--max-retries", "1",
                        *ray_args(ray_head))
    assert main(argv) == 1
    captured = capsys.readouterr()
    (failed,) = summary_json(out)["settings"]["ray"]["units_failed"]
    # 2 attempts, one more when the first ran beside another unit (a death there is not counted)
    assert failed["attempts"] in (2, 3) and all("worker process died" in e for e in failed["errors"])
    assert f"FAILED     1 work unit(s) after {failed['attempts']} attempts each" in captured.out
    assert re.search(rf"unit {failed['unit']}: attempt {failed['attempts']} on worker \d+ \(pid \d+ on [\d.]+\): "
                     "worker process died", captured.out)
    rejects = [json.loads(line) for line in (out / "_reports").glob("*/rejects.jsonl").__next__().open()]
    not_written = {r["conversation_id"] for r in rejects if r["reason"] == "unit_failed"}
    assert all(failed["unit"] in r["detail"] for r in rejects)
    ids = stored_ids(out)
    assert len(ids) == len(set(ids))
    # every valid conversation is either stored or reported, never both
    assert "poison0000" in not_written and not not_written & set(ids)
    assert set(ids) | not_written == {c["conversation_id"] for c in good} | {"poison0000"}
    assert main(["verify", str(out)]) == 0


def test_driver_sigkilled_then_rerun_resumes_with_exactly_one_copy(tiny_model, ray_head, tmp_path):
    good = conversations(100, seed=6)
    inp = write_input(tmp_path / "in.jsonl", good[:50] + ["[1, 2]\n"] + good[50:])
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "draftdata.cli",
           *collect_args(tiny_model, inp, out, "--batch-tokens", "64", "--part-size", "0.05", *ray_args(ray_head))]
    # SIGTERM: the summary of a stopped run has the pool's figures (they were all null)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: commits(out) >= 2, "two commits", proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 143
    (summary,) = out.glob("_reports/collect-*/summary.json")
    pool = json.loads(summary.read_text())["settings"]["ray"]
    assert pool["units_done"] is not None and pool["workers_started"] >= 1 and pool["worker_info"], pool
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: commits(out) >= 4, "four commits", proc=proc)
    finally:
        proc.kill()
        proc.wait()
    first = stored_ids(out)
    assert 4 <= len(first) < len(good)
    from draftdata.models import model_hash  # as an earlier build recorded it: driver and actors compare so

    meta = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps({**meta, "base_model_hash": model_hash(tiny_model, like="sha256:")}))
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    held = re.search(r"already holds ([\d,]+) conversations", done.stderr)
    assert held and int(held.group(1).replace(",", "")) >= len(set(first))  # + parts of dying workers
    ids = stored_ids(out)
    assert len(ids) == len(set(ids)), "a conversation was stored twice"
    assert sorted(ids) == sorted(c["conversation_id"] for c in good)
    assert main(["verify", str(out)]) == 0


# ---------------------------------------------------------------- ray job submit


def test_ray_job_submit_from_a_clone_succeeds_and_the_dataset_verifies(tiny_model, ray_head, tmp_path):
    clone = tmp_path / "clone"  # what a user's checkout holds: the files git tracks or would track
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    (clone / "runs").mkdir()
    (clone / "runs" / "big.bin").write_bytes(os.urandom(30 * 2**20))  # ignored by .gitignore: never uploaded
    inp = write_input(tmp_path / "in.jsonl", conversations(40, seed=7))
    out = tmp_path / "ds"
    collect = " ".join(["draftdata", *collect_args(tiny_model, inp, out, "--batch-tokens", "64"),
                        "--ray", "--ray-address", "auto", "--num-workers", "2"])
    done = subprocess.run(["ray", "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(clone),
                           "--", "sh", "-c", f"test ! -e runs/big.bin && {collect}"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log and "written    40 conversations" in log
    assert sorted(stored_ids(out)) == [f"c{i:04d}" for i in range(40)]
    assert main(["verify", str(out)]) == 0


_THREADS_PROBE = """
import json, os, sys, threading, torch
from draftdata.collect.ray_pool import ComputeThread, use_torch_threads
mode = sys.argv[1]
a = torch.randn(384, 384)
a @ a  # on one thread (OMP_NUM_THREADS=1): whatever torch starts once, before counting
before = len(os.listdir("/proc/self/task"))
compute = ComputeThread(2) if mode == "compute" else None
if compute:
    compute.run(lambda: a @ a)  # the model load
else:
    use_torch_threads(2)  # as an actor's __init__ did
    a @ a
done, hold = threading.Barrier(3), threading.Event()
def method():  # a threaded actor's method, on a pool thread (kept alive, as Ray's pool threads are)
    if compute:
        compute.run(lambda: [a @ a for _ in range(3)])
    elif mode != "idle":
        if mode == "per-method":
            use_torch_threads(2)
        for _ in range(3):
            a @ a
    done.wait()
    hold.wait()
pool = [threading.Thread(target=method) for _ in range(2)]
for t in pool:
    t.start()
done.wait()
extra = len(os.listdir("/proc/self/task")) - before - len(pool)
print(json.dumps({"extra": extra, "main_nice": os.getpriority(os.PRIO_PROCESS, 0),
                  "compute_nice": compute.niceness if compute else None}))
hold.set()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_actor_compute_runs_on_one_thread_with_one_openmp_team_at_the_nodes_priority():
    """A threaded actor's methods run on pool threads. Ray's OMP_NUM_THREADS=1 leaves a fresh thread's
    matmuls on one core; setting the count in each method gives each thread its own OpenMP team (on a
    2-CPU actor: three teams, and libgomp then sleeps between parallel regions, ~1.2x slower
    forwards). `ComputeThread` runs model load and every forward on one thread: one team of 2. A CPU
    actor's threads also get the niceness of the parent (the raylet) back where that is allowed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def probe(mode: str) -> dict:
        cmd = ["nice", "-n", "7", sys.executable, "-c", _THREADS_PROBE, mode]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])

    base = probe("idle")["extra"]  # the __init__ thread's team; the pool threads compute nothing
    assert probe("bare")["extra"] == base, "premise: BLAS in a fresh thread keeps OMP_NUM_THREADS=1 (one core)"
    assert probe("per-method")["extra"] == base + 2, "premise: one more OpenMP team per thread that computes"
    result = probe("compute")
    assert result["extra"] == base + 1  # just the compute thread itself: its team is the only one
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert probe("bare")["main_nice"] == ours + 7  # premise: the probe starts at nice +7, like a Ray worker at 15
    if os.geteuid() == 0:  # lowering niceness needs CAP_SYS_NICE: every thread, not only the compute thread
        assert result["compute_nice"] == result["main_nice"] == ours
