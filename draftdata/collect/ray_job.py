"""`draftdata collect --ray`: collection on a Ray cluster (user guide: docs/RAY.md).

The driver (this process; under `ray job submit`, the job's entrypoint) does what single-process
collect does up to the model, then hands the model work to a pool of Ray actors:

1. check the flags, the model and the output exactly like `draftdata collect` (same schema,
   same refusal of an incompatible dataset), take the output's lock and request the actors, so
   they load the model while the driver loads the tokenizer;
2. read, validate and tokenize the input once, on the driver, skipping conversations the
   dataset already holds (rejects are counted and written as in single-process collect), and
   cut the stream of samples into the length-sorting windows `collect_records` uses (32 x
   --batch-tokens tokens). Each window is one work unit, named `w<index>-<hash of its ids>`;
3. run the units on `ray_pool.ActorPool`: one `CollectWorker` actor per G GPUs
   (--gpus-per-worker), or CPU actors. Each actor loads the model once (on its compute thread,
   which runs every forward: see `ray_pool.ComputeThread`), opens the dataset itself and runs
   `collect_records` on a unit, committing its own parts (tagged with the unit
   id) straight to the dataset URL. Only token ids travel from the driver to the actors; no
   hidden state passes through the driver.

Same content as a single-process run: a unit is exactly one window of the single-process run,
so every batch (and therefore every tensor, bit for bit) is the same; only the grouping of
samples into parts differs.

Exactly once, also under SIGKILL:
- a part becomes visible only through its commit record, written last in one atomic step, so a
  killed actor leaves no half-written part (its leftovers are removed by `verify --gc`);
- before a unit is retried the driver re-reads the commit records (only new ones) and tells the
  retry which of the unit's conversations an earlier attempt already committed; these are batched
  as before but not written again. A failed attempt can no longer write: Ray reports an actor's
  death once its process is gone (an actor that is only unreachable is killed and its death
  awaited before the retry), and a unit that raised has already waited for its commits;
- a driver restart (same command, same output) skips every committed conversation, like
  single-process resume. A lock (a named Ray actor per output URL) keeps two drivers from writing
  one dataset at once, and a new driver waits for a killed driver's actors to be reaped before it
  reads what is committed;
- at the end the driver checks that no conversation id was committed twice and says so loudly
  (it could only happen if two jobs wrote the same output from different Ray clusters).

Exit status: 0 when every valid conversation is in the dataset (rejected records are not
failures); 1 when some work units failed `--max-retries` + 1 times (the rest is written; their
conversations are listed in the rejects file with reason `unit_failed`, and rerunning the same
command retries them); 2 for a usage or setup error.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from draftdata.collect.job import (
    STOPPED_EARLY,
    CollectSettings,
    CommitLedger,
    output_lock,
    report_duplicates,
    warn_mixed_compute,
)
from draftdata.collect.runner import CollectOptions, CollectStats, KeptFlags
from draftdata.config import DatasetSchema
from draftdata.errors import DraftdataError, SchemaMismatchError, reclaim_sigterm

NAMESPACE = "draftdata"
MAX_RETRIES = 2  # attempts per unit = MAX_RETRIES + 1
IN_FLIGHT = 2  # units queued per actor: the next unit computes while the last one's parts commit
LOCK_WAIT_S = 60.0  # how long a new driver waits for a killed driver's actors to go away


# ------------------------------------------------------------------------------------------- actor


class _ComputeBackend:
    """The actor's backend, every forward call run on its `ComputeThread` (one at a time)."""

    def __init__(self, backend: Any, compute: Any):
        self._backend, self._compute = backend, compute
        self.info = backend.info
        self.producer = backend.producer

    def forward(self, batch: list[list[int]], aux_layer_ids: list[int]) -> Any:
        return self._compute.run(self._backend.forward, batch, aux_layer_ids)

    def forward_checked(self, batch: list[list[int]], aux_layer_ids: list[int]) -> Any:
        return self._compute.run(self._backend.forward_checked, batch, aux_layer_ids)

    def close(self) -> None:
        self._compute.run(self._backend.close)


class CollectWorker:
    """One Ray actor: loads the base model once and writes its own parts into the dataset.

    Runs on any node: it resolves `--model` on its own node (a local directory must be visible
    there at the same path, e.g. a shared file system; a hub id must be in that node's HF cache;
    `smollm2`/.gguf are converted once per node) and refuses to start if that model or its
    tokenizer differ from the driver's (the dataset schema records both).
    """

    def __init__(self, settings: CollectSettings, schema: DatasetSchema, options: CollectOptions,
                 gpus: float = 0):
        t0 = time.perf_counter()
        import ray

        from draftdata.collect.backends import get_backend
        from draftdata.collect.backends.base import BaseModelInfo
        from draftdata.collect.job import backend_options, make_schema
        from draftdata.collect.ray_pool import ComputeThread, actor_cpu_threads
        from draftdata.errors import DatasetNotFoundError, StorageAccessError
        from draftdata.models import resolve_model
        from draftdata.store import create_dataset, open_dataset

        self.threads = actor_cpu_threads() if settings.device == "cpu" else None
        self.compute = ComputeThread(self.threads)  # model load and forwards: one OS thread, one OpenMP team
        self.node = ray.util.get_node_ip_address()
        model_path = resolve_model(settings.model)
        local = dataclasses.replace(settings, model_path=str(model_path))
        mine = make_schema(local, BaseModelInfo.from_model_dir(model_path, hash_like=schema.base_model_hash))
        mine.storage_format, mine.codec = schema.storage_format, schema.codec
        diffs = schema.differences(mine)
        if diffs:
            raise SchemaMismatchError(f"worker on {self.node} ({socket.gethostname()}): --model {settings.model} "
                                      f"resolves to {model_path}, which differs from the driver's model: "
                                      + "; ".join(diffs) + ". Make the same model available on every node "
                                      "(a shared directory, or the same hub snapshot in each node's cache).")
        try:  # the driver created it: a worker that cannot see it would write a dataset of its own
            open_dataset(settings.output, storage_options=settings.storage_options)
        except DatasetNotFoundError:
            raise DraftdataError(f"worker on {self.node} ({socket.gethostname()}) cannot see the dataset the driver "
                                 f"created at {settings.output}; with several nodes the output must be shared "
                                 "storage (s3://, gs://, or a file system mounted on every node)") from None
        except StorageAccessError as e:  # the driver's shell had credentials the workers' processes lack
            raise StorageAccessError(f"worker on {self.node}: {e}. Workers read credentials from their own "
                                     "environment, not the driver's shell: pass -S key=... -S secret=..., or "
                                     "set them for the cluster (ray job submit --runtime-env-json "
                                     "'{\"env_vars\": {\"AWS_ACCESS_KEY_ID\": ...}}', docs/RAY.md)") from None
        self.writer = create_dataset(settings.output, schema, format=schema.storage_format, codec=schema.codec,
                                     storage_options=settings.storage_options)
        opts = backend_options(local)
        if settings.backend == "trtllm" and gpus >= 1 and not settings.tensor_parallel_size:
            opts["tensor_parallel_size"] = int(gpus)  # one TRT-LLM engine over all of this actor's GPUs
        self.backend = _ComputeBackend(self.compute.run(get_backend, settings.backend, model_path, **opts),
                                       self.compute)
        self.options = options
        self.device = settings.device
        self.setup_seconds = time.perf_counter() - t0

    def ready(self) -> dict[str, Any]:
        import ray
        import torch

        from draftdata.collect.ray_pool import process_memory

        mem = process_memory()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        threads = self.compute.run(torch.get_num_threads)  # the count where the model runs
        return {
            "pid": os.getpid(), "node": self.node, "host": socket.gethostname(), "device": self.device,
            "gpus": gpus, "threads": threads, "niceness": self.compute.niceness,
            "setup_s": round(self.setup_seconds, 2), "rss": mem["rss"],
            "summary": f"{self.device}{' GPUs ' + ','.join(gpus) if gpus else ''}, {threads} "
                       f"threads at nice {self.compute.niceness}, model loaded in {self.setup_seconds:.1f} s, RSS {mem['rss'] / 2**20:,.0f} MiB",
        }

    def run_unit(self, unit_id: str, samples: list, skip_ids: frozenset[str]) -> dict[str, Any]:
        """Collect one unit; returns its stats and this process's peak memory."""
        from draftdata.collect.ray_pool import process_memory, raise_priority
        from draftdata.collect.runner import collect_records

        if self.threads:  # a CPU actor: this pool thread and the part writers it starts (raise_priority)
            raise_priority()
        for s in samples:  # Ray hands numpy arrays over read-only (zero copy); torch wants writable ones
            if not s.input_ids.flags.writeable:
                s.input_ids, s.loss_mask = s.input_ids.copy(), s.loss_mask.copy()
        rejected: list = []  # samples with inf/NaN states: the driver writes them to the rejects file
        stats = collect_records(samples, self.backend, self.writer, self.options, work_unit=unit_id,
                                stats=CollectStats(), skip_ids=skip_ids, on_reject=rejected.append)
        return {"stats": stats, "peak_rss": process_memory()["peak_rss"], "pid": os.getpid(), "rejects": rejected}


class _OutputLock:
    """A named, resource-free actor: holding its name means "this driver writes this output"."""

    def ping(self) -> int:
        return os.getpid()


# ------------------------------------------------------------------------------------------- driver


@dataclasses.dataclass
class RayPlan:
    """How many actors, with what resources, and why (printed at the start)."""

    num_workers: int
    num_cpus: float
    num_gpus: float
    device: str
    nodes: int
    note: str = ""

    def describe(self) -> str:
        each = f"{self.num_gpus:g} GPU{'s' if self.num_gpus != 1 else ''}" if self.num_gpus else \
            f"{self.num_cpus:g} CPU{'s' if self.num_cpus != 1 else ''}"
        return (f"{self.num_workers} worker{'s' if self.num_workers != 1 else ''} x {each} ({self.device}) on a "
                f"cluster of {self.nodes} node{'s' if self.nodes != 1 else ''}" + (f"; {self.note}" if self.note else ""))


def check_ray_flags(args: Any) -> None:
    """The Ray flags of `collect` / `synthesize`, checked before any work (a cluster that cannot be
    reached would otherwise be tried first): refused without --ray, where they would be ignored."""
    given = [flag for flag, name in (("--ray-address", "ray_address"), ("--num-workers", "num_workers"),
                                     ("--gpus-per-worker", "gpus_per_worker"), ("--max-retries", "max_retries"),
                                     ("--work-unit-size", "work_unit_size"))
             if getattr(args, name, None) is not None]
    if given and not args.ray:
        raise DraftdataError(f"{', '.join(given)} only apply with --ray: add --ray, or drop them")
    check_worker_flags(getattr(args, "num_workers", None), getattr(args, "gpus_per_worker", None))
    for flag, name, least in (("--max-retries", "max_retries", 0), ("--work-unit-size", "work_unit_size", 1)):
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise DraftdataError(f"{flag} {value}: must be at least {least}")


def check_worker_flags(num_workers: int | None, gpus_per_worker: float | None) -> None:
    """--num-workers and --gpus-per-worker: a positive count; a finite, non-negative GPU share,
    whole above 1."""
    if num_workers is not None and num_workers < 1:
        raise DraftdataError(f"--num-workers {num_workers}: must be at least 1")
    if gpus_per_worker is not None and not (math.isfinite(gpus_per_worker) and gpus_per_worker >= 0):
        raise DraftdataError(f"--gpus-per-worker {gpus_per_worker}: must be a number >= 0")
    if gpus_per_worker is not None and gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker):
        raise DraftdataError(f"--gpus-per-worker {gpus_per_worker}: use a whole number of GPUs, or a fraction "
                             "below 1 to share a GPU between actors")


def plan_workers(num_workers: int | None, gpus_per_worker: float | None, device: str) -> RayPlan:
    """Actor count and resources from the flags and the cluster (ray must be initialized).

    GPUs: --gpus-per-worker G (default 1 when the cluster has GPUs and `device` is not cpu), one
    actor per G GPUs (default: all GPUs), each with 1 CPU, device cuda. No GPUs, G=0 or
    `device` cpu: CPU actors (default 1),
    each given an equal share of the CPUs of the largest node, and torch uses that many threads.
    """
    import ray

    check_worker_flags(num_workers, gpus_per_worker)
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total_gpus = float(total.get("GPU", 0))
    # An explicit --device cpu means CPU actors even on a GPU cluster; auto and cuda take GPUs.
    g = gpus_per_worker if gpus_per_worker is not None else (1.0 if total_gpus >= 1 and device != "cpu" else 0.0)
    if g > 0:
        if total_gpus < g:
            note = (f"the cluster has {total_gpus:g} GPUs now; actors wait for the autoscaler to add "
                    f"nodes with GPUs")
        else:
            note = ""
        n = num_workers or max(1, int(total_gpus // g))
        if device == "cpu":
            raise DraftdataError(f"--device cpu with --gpus-per-worker {g:g}: GPU actors run on their GPUs; "
                                 "drop --device cpu, or give --gpus-per-worker 0 for CPU actors")
        device = "cuda"  # auto / cuda / cuda:N: Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPUs
        return RayPlan(n, 1, g, device, len(nodes), note)
    if device not in ("cpu", "auto"):
        raise DraftdataError(f"--device {device} with --ray needs GPU actors; the cluster has {total_gpus:g} GPUs "
                             f"(--gpus-per-worker {g:g}). Use --device cpu, or --gpus-per-worker 1 on a GPU cluster")
    n = num_workers or 1
    biggest = max((float(node.get("Resources", {}).get("CPU", 0)) for node in nodes), default=1.0)
    cpus = max(1.0, min(biggest, float(int(total.get("CPU", 1) // n))))
    fit = int(total.get("CPU", 0) // cpus)
    note = f"only {fit} fit the cluster's {total.get('CPU', 0):g} CPUs now, the rest wait" if fit < n else ""
    return RayPlan(n, cpus, 0, "cpu", len(nodes), note)


def connect(address: str | None) -> bool:
    """`ray.init` unless this process is already connected; returns True when it connected."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
        reclaim_sigterm()
    except ray.exceptions.AuthenticationError as e:
        raise DraftdataError(
            f"Ray at {address or 'the default address'} refused the connection: {str(e).splitlines()[0]}. The "
            "cluster uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
            "RAY_AUTH_TOKEN_PATH) to its token, see docs/RAY.md") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise DraftdataError(f"cannot connect to Ray at {address or 'the default address'}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (start a cluster with "
                             "`ray start --head`, or pass --ray-address)") from None
    return True


def acquire_output_lock(url: str, timeout: float = LOCK_WAIT_S) -> tuple[Any, str]:
    """Take the per-output lock actor and wait for a previous driver's workers to be gone.

    Returns (lock handle, worker name prefix). Raises when another live driver holds the lock.
    """
    import ray

    from draftdata.collect.ray_pool import wait_named_actors_gone
    from draftdata.store.fs import canonical_location

    key = hashlib.sha256(canonical_location(url).encode()).hexdigest()[:16]  # every spelling of one output
    lock_name, worker_prefix = f"draftdata-collect-{key}-lock", f"draftdata-collect-{key}-w"
    lock_cls = ray.remote(num_cpus=0)(_OutputLock)
    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            lock = lock_cls.options(name=lock_name, namespace=NAMESPACE, max_restarts=0).remote()
            break
        except ValueError:  # the name is taken: another driver, alive or just killed
            if not said:  # (a silent minute looked like a hang)
                said = True
                print(f"draftdata collect: another collect job holds {url} (Ray actor {NAMESPACE}/{lock_name}); "
                      f"waiting up to {timeout:.0f} s in case that job was just stopped", file=sys.stderr, flush=True)
            if time.monotonic() >= deadline:
                raise DraftdataError(
                    f"another draftdata collect job is writing to {url} (Ray actor {NAMESPACE}/{lock_name} is "
                    f"alive); wait for it to finish or stop it (`ray job stop ...`), then rerun") from None
            time.sleep(0.5)
    left = wait_named_actors_gone(worker_prefix, max(5.0, deadline - time.monotonic()))
    if left:
        ray.kill(lock)
        raise DraftdataError(f"workers of an earlier collect job on {url} are still alive ({', '.join(left)}); "
                             "they may still commit parts. Wait for them to exit, then rerun")
    return lock, worker_prefix


def _worker_settings(settings: CollectSettings, plan: RayPlan, output_url: str) -> CollectSettings:
    """Settings as the actors see them: absolute paths (their working directory is not ours), the
    planned device."""
    model = settings.model
    if os.path.exists(os.path.expanduser(model)):
        model = os.path.abspath(os.path.expanduser(model))
    return dataclasses.replace(settings, model=model, output=output_url, device=plan.device, rejects=None)


def _units(settings: CollectSettings, chat: Any, options: CollectOptions, skip_ids: frozenset[str],
           stats: CollectStats, rejects: Any, flags: KeptFlags, progress: Any) -> Iterator[Any]:
    """The work units: windows of tokenized samples, exactly as `collect_records` would form them."""
    from draftdata.collect.job import read_input
    from draftdata.collect.ray_pool import WorkUnit
    from draftdata.collect.runner import _windows, prepare_samples

    samples = prepare_samples(read_input(settings), chat, skip_ids=skip_ids, stats=stats, on_reject=rejects,
                              flags=flags, progress=lambda n, t: progress.update(n))
    for i, window in enumerate(_windows(samples, options.window_tokens)):
        ids = [s.conversation_id for s in window]
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
        yield WorkUnit(id=f"w{i:05d}-{digest}", args=(window, frozenset()), item_ids=ids,
                       size=sum(s.length for s in window))


def run_ray_collect(args: argparse.Namespace) -> int:
    """`draftdata collect ... --ray`: returns the exit status (see the module docstring)."""
    from draftdata.collect.conversations import warn_no_records
    from draftdata.collect.job import (
        chat_tokenizer,
        check_output,
        make_schema,
        open_output,
        settings_from_args,
    )

    settings = settings_from_args(args)
    from draftdata.collect.backends.base import BaseModelInfo
    from draftdata.collect.conversations import count_records, input_files
    from draftdata.collect.ray_pool import ActorPool

    t_start = time.perf_counter()
    info = BaseModelInfo.from_model_dir(settings.model_path)
    schema = check_output(settings, make_schema(settings, info))
    input_files(settings.input, settings.storage_options)  # fail on a missing input before anything else
    chat, total = None, None
    if settings.strict:  # fail on the first bad record before any Ray or model work
        from draftdata.collect.job import validate_input

        chat = chat_tokenizer(settings)
        total = validate_input(settings, chat)
    if total == 0 or (total is None and count_records(settings.input, settings.storage_options,
                                                      1 if settings.limit is None else min(1, settings.limit)) == 0):
        # like run_local: no Ray, no model, --output left as it is
        warn_no_records("collect", settings.input, settings.limit, "collect")
        return 0
    max_retries = getattr(args, "max_retries", None)
    max_retries = MAX_RETRIES if max_retries is None else max_retries
    if max_retries < 0:
        raise DraftdataError(f"--max-retries {max_retries}: must be >= 0")

    import ray

    connected = connect(args.ray_address)
    lock = pool = local_lock = None
    try:
        plan = plan_workers(args.num_workers, args.gpus_per_worker, settings.device)
        tp = settings.tensor_parallel_size
        if tp and plan.num_gpus >= 1 and tp != int(plan.num_gpus):
            raise DraftdataError(f"--tensor-parallel-size {tp} != --gpus-per-worker {plan.num_gpus:g}: each Ray "
                                 "actor runs one engine over its own GPUs; set them equal (or drop --tp)")
        writer = open_output(settings, schema)
        local_lock = output_lock(writer.url, settings.storage_options)  # also excludes a single-process collect
        local_lock.take()
        lock, worker_prefix = acquire_output_lock(writer.url)
        options = CollectOptions(aux_layer_ids=list(settings.aux_layer_ids), batch_tokens=settings.batch_tokens,
                                 part_bytes=settings.part_bytes)
        pool = ActorPool(CollectWorker, args=(_worker_settings(settings, plan, writer.url), writer.schema, options,
                                              plan.num_gpus),
                         num_workers=plan.num_workers, num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                         max_retries=max_retries, in_flight=IN_FLIGHT, max_concurrency=IN_FLIGHT,
                         name_prefix=f"{worker_prefix}{ray.get_runtime_context().get_job_id()}",
                         namespace=NAMESPACE)
        pool.start()  # the actors load the model while this process loads the tokenizer and counts the input
        if chat is None:
            chat = chat_tokenizer(settings)
        if total is None:
            total = count_records(settings.input, settings.storage_options, settings.limit)
        return _drive(settings, writer, chat, plan, pool, options, total, t_start)
    finally:
        if pool is not None:
            pool.close()
        if lock is not None:
            ray.kill(lock)
        if local_lock is not None:
            local_lock.release()
        if connected:
            ray.shutdown()


def _drive(settings: CollectSettings, writer: Any, chat: Any, plan: RayPlan, pool: Any, options: CollectOptions,
           total: int, t_start: float) -> int:
    from draftdata.collect.conversations import Reject
    from draftdata.collect.ray_pool import PoolError, PoolProgress, UnitFailure, WorkUnit, attempts_text
    from draftdata.collect.runner import RejectLog, all_rejected, write_reports

    ledger = CommitLedger(writer)
    parts_before = set(ledger.parts)
    if ledger.where:
        print(f"draftdata collect: {writer.url} already holds {len(ledger.where):,} conversations; they are "
              "skipped", file=sys.stderr)
    print(f"draftdata collect --ray: {plan.describe()}; work units of {options.window_tokens:,} tokens",
          file=sys.stderr)
    stats = CollectStats()  # reading/tokenizing (producer thread)
    rejects = RejectLog(stats)
    progress = PoolProgress(total_items=total, desc="collect", unit="conv")
    forward_seconds = 0.0
    reported_written = 0  # conversations the workers say they committed (successful attempts)
    peak_rss: dict[int, int] = {}

    def on_done(unit: WorkUnit, result: dict[str, Any]) -> None:
        nonlocal forward_seconds, reported_written
        forward_seconds += result["stats"].forward_seconds
        reported_written += result["stats"].written
        peak_rss[result["pid"]] = max(peak_rss.get(result["pid"], 0), result["peak_rss"])
        for reject in result["rejects"]:
            rejects(reject)

    def before_retry(unit: WorkUnit) -> WorkUnit | None:
        ledger.refresh()
        done = frozenset(cid for cid in unit.item_ids if cid in ledger.where)
        if len(done) == len(unit.item_ids):
            return None
        if done:
            progress.write(f"unit {unit.id}: {len(done)} of its {len(unit.item_ids)} conversations were committed "
                           "by the failed attempt and are kept")
        unit.args = (unit.args[0], done)
        return unit

    flags = KeptFlags()
    units = _units(settings, chat, options, frozenset(ledger.where), stats, rejects, flags, progress)
    interrupted = True
    try:
        pool.run(units, on_done=on_done, before_retry=before_retry, progress=progress)
        interrupted = False
    except PoolError:  # its message says what to do (a rerun does not always help: no "stopped early")
        interrupted = False
        raise
    finally:
        progress.close()
        report = pool.report  # what finished, and the units given up, also before an error or a stop
        ledger.refresh()
        failed: list[UnitFailure] = report.failed if report else []
        not_written = 0
        for failure in failed:
            for s in failure.unit.args[0]:
                if s.conversation_id not in ledger.where:
                    not_written += 1
                    rejects(Reject(s.source, "unit_failed", f"work unit {failure.unit_id} failed "
                                   f"{failure.attempts} times; last error: {failure.errors[-1]}", s.conversation_id))
        new_parts = [ledger.parts[p] for p in ledger.parts if p not in parts_before]
        row_bytes = 2 * (writer.schema.num_aux_slots + 1) * writer.schema.hidden_size + 5
        stats.written = sum(p.num_samples for p in new_parts)
        stats.tokens = sum(p.num_tokens for p in new_parts)
        stats.parts = len(new_parts)
        stats.stored_bytes = sum(p.stored_bytes for p in new_parts)
        stats.raw_bytes = stats.tokens * row_bytes
        stats.forward_seconds = forward_seconds
        stats.seconds = time.perf_counter() - t_start
        flags.count(stats, ledger.committed_since(parts_before))
        ray_info = {"workers": plan.num_workers, "cpus_per_worker": plan.num_cpus, "gpus_per_worker": plan.num_gpus,
                    "device": plan.device, "nodes": plan.nodes, "window_tokens": options.window_tokens,
                    "max_retries": pool.max_retries,
                    "units_done": report.units_done if report else None,
                    "units_failed": [{"unit": f.unit_id, "attempts": f.attempts, "errors": f.errors} for f in failed],
                    "workers_started": report.workers_started if report else None,
                    "workers_lost": report.workers_lost if report else None,
                    "worker_peak_rss": sorted(peak_rss.values()),
                    "worker_info": [{k: v for k, v in w.items() if k != "summary"}
                                    for w in (report.worker_info if report else [])],
                    "duplicates": sorted(ledger.duplicates)[:100]}
        where = write_reports(writer.url, settings.storage_options, stats, rejects,
                              {**settings.report_dict(), "ray": ray_info}, settings.rejects)
        print(stats.format(writer.url, settings.input, where))
        if report is not None:
            mem = f", peak RSS per worker {max(peak_rss.values()) / 2**20:,.0f} MiB" if peak_rss else ""
            print(f"  ray        {plan.describe()}; {report.units_done} units done, {report.workers_started} "
                  f"workers started, {report.workers_lost} lost{mem}")
        if failed:
            print(f"  FAILED     {len(failed)} work unit(s) after {attempts_text(failed)}; {not_written:,} "
                  f"conversations not written (reason unit_failed in the rejects file). Rerun the same command "
                  f"to retry them.")
            for f in failed:
                ids = [cid for cid in f.item_ids if cid not in ledger.where]
                shown = ", ".join(ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")
                print(f"    unit {f.unit_id}: {f.errors[-1]}\n      conversations: {shown}")
        invisible = reported_written > stats.written
        if invisible:
            print(f"  MISSING    the workers committed {reported_written:,} conversations but the driver sees only "
                  f"{stats.written:,} new ones in {writer.url}: is --output a local path that is not shared by "
                  "every node? Use s3://, gs:// or a shared file system", file=sys.stderr)
        new_duplicates = report_duplicates(ledger, writer.url, parts_before)
        warn_mixed_compute(writer.url, ledger.parts.values(), after_ray_run=True)
        if interrupted:
            print(STOPPED_EARLY, file=sys.stderr)
    rejected = all_rejected("collect", stats, rejects, where)
    return 1 if failed or new_duplicates or invisible or rejected else 0
