"""A pool of Ray actors that works through a stream of work units and survives actor deaths.

Generic and reusable (`collect --ray` and `synthesize --ray` use it). The caller supplies:

- a worker class (a plain Python class; the pool makes it a Ray actor) with two methods:
  `ready() -> dict` (called once after construction; returns what to log about the worker,
  e.g. pid, node, seconds spent loading the model) and `run_unit(unit_id, *args) -> Any`;
- an iterable of `WorkUnit`s: a stable id, the arguments for `run_unit`, the ids of the items
  inside (conversation ids, for failure reports), an item count and a size (tokens) for
  progress. Units are pulled lazily on a background thread (`prefetch` ahead), so a long input
  is never held in memory and producing units overlaps with the work.

How work is scheduled and what happens on faults:

- Placement: one actor per `num_gpus` GPUs (`num_gpus=G`, e.g. G=8 for a tensor-parallel
  model) or, with `num_gpus=0`, CPU actors with `num_cpus` CPUs each.
- Dynamic assignment: an actor that is ready and has fewer than `in_flight` units gets the
  next unit (retries first). Units go only to actors whose `ready()` returned, so a worker that
  fails while loading never consumes a unit's retries.
- An actor that dies (SIGKILL, OOM killer, node loss: `RayActorError`) is replaced by a new
  actor, and each of its unfinished units is retried. A unit whose `run_unit` raises is retried
  too, on another actor when there is one. Before a retry `before_retry(unit)` may rewrite the
  unit (collect tells the retry which items an earlier attempt already committed) or return
  None when nothing is left to do.
- An actor that has been idle for more than `IDLE_PING_S` seconds is pinged before it gets a
  unit: one that died while idle is replaced without charging the unit an attempt (Ray's error
  for a call to a dead actor does not say whether the call had started).
- A unit that failed `max_retries + 1` times is given up: it is reported in
  `PoolReport.failed` with its id, item ids and every attempt's error, and the rest goes on.
- `PoolError` stops the whole run when continuing cannot help: `max_start_failures` actor
  starts failed in a row (a model that does not load, a missing package on the workers), or
  `max_consecutive_failures` unit attempts failed in a row with no success in between (a
  storage outage, a systematic bug). All actors are killed when `run` returns or raises.

Progress (`PoolProgress`): items done/total with ETA, units done/total, tokens/s, live workers
and failures, as a tqdm bar on a terminal or one plain line every `interval` seconds otherwise
(e.g. in `ray job logs`). Worker errors are printed with their unit id, attempt and worker.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from draftdata.errors import DraftdataError
from draftdata.progress import JobProgress


class PoolError(DraftdataError):
    """The pool cannot make progress (workers do not start, or every unit fails). `report` holds
    what was done before it stopped (units finished and given up), for the caller's summary."""

    report: PoolReport | None = None


@dataclass
class WorkUnit:
    """One piece of work: `run_unit(id, *args)` on some actor."""

    id: str
    args: tuple
    item_ids: list[str]
    items: int = 0  # items for the progress bar (defaults to len(item_ids))
    size: int = 0  # work size for throughput, e.g. tokens
    attempts: int = 0  # attempts started so far (set by the pool)
    errors: list[str] = field(default_factory=list)  # one line per failed attempt (set by the pool)
    avoid: set[int] = field(default_factory=set)  # workers that failed it while staying alive
    isolate: bool = False  # its worker died under it: run it alone from now on (set by the pool)
    shared: bool = False  # its current attempt shares its worker with another unit (set by the pool)
    free_attempts: int = 0  # attempts not counted: its worker died while it ran beside another unit

    def __post_init__(self) -> None:
        if not self.items:
            self.items = len(self.item_ids)


def attempts_text(failed: list[Any]) -> str:
    """'2 attempts each', or '2-3 attempts' (an attempt beside another unit whose worker died is
    not counted against --max-retries, so units can have made more)."""
    counts = sorted({f.attempts for f in failed})
    return f"{counts[0]} attempts each" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} attempts"


@dataclass
class UnitFailure:
    """A unit given up after its retries: which unit, which items, and why (each attempt)."""

    unit_id: str
    item_ids: list[str]
    attempts: int
    errors: list[str]
    unit: WorkUnit | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"unit {self.unit_id} failed {self.attempts} times, last error: {self.errors[-1] if self.errors else '?'}"


@dataclass
class PoolReport:
    units_done: int = 0
    units_skipped: int = 0  # retries that `before_retry` found already complete
    failed: list[UnitFailure] = field(default_factory=list)
    workers_started: int = 0
    workers_lost: int = 0  # actors that died while running units
    worker_info: list[dict[str, Any]] = field(default_factory=list)  # what each `ready()` returned
    seconds: float = 0.0


class PoolProgress(JobProgress):
    """Aggregated progress: items (with ETA), units, tokens/s, workers, failures.

    Thread-safe: the unit producer thread calls `update` for items that need no work
    (already committed, rejected), the pool thread for finished units.
    """

    def __init__(self, *, total_items: int | None = None, desc: str = "ray", unit: str = "item",
                 size_unit: str = "tok", interval: float | None = None, file: Any = None):
        super().__init__(total=total_items, desc=desc, unit=unit, size_unit=size_unit, interval=interval,
                         file=file)
        self.units_done = 0
        self.units_failed = 0
        self.units_total: int | None = None
        self.units_seen = 0
        self.workers = 0

    def unit_finished(self, unit: WorkUnit, ok: bool) -> None:
        with self._lock:
            if ok:
                self.units_done += 1
            else:
                self.units_failed += 1
            self._count(unit.items, unit.size if ok else 0)

    def set_units(self, seen: int, total: int | None) -> None:
        with self._lock:
            self.units_seen, self.units_total = seen, total

    def set_workers(self, n: int) -> None:
        with self._lock:
            self.workers = n

    def eta_known(self) -> bool:
        # Items skipped or rejected by the driver take no time: no ETA before a unit has finished.
        return self.units_done > 0

    def extra(self) -> str:
        total = self.units_total if self.units_total is not None else f"{self.units_seen}+"
        s = f"units {self.units_done}/{total}, {self.workers} worker{'s' if self.workers != 1 else ''}"
        if self.units_failed:
            s += f", {self.units_failed} FAILED"
        return s


class _Prefetch:
    """Pulls units from an iterator on a daemon thread into a bounded queue."""

    _END = object()

    def __init__(self, units: Iterable[WorkUnit], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.produced = 0
        self.exhausted = False
        self._thread = threading.Thread(target=self._run, args=(iter(units),), name="draftdata-units",
                                         daemon=True)
        self._thread.start()

    def _run(self, it: Iterator[WorkUnit]) -> None:
        try:
            for unit in it:
                while not self._stop.is_set():
                    try:
                        self._queue.put(unit, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._put_final(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the pool thread
            self._put_final(e)

    def _put_final(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def get(self, timeout: float) -> WorkUnit | None:
        """The next unit, or None when none is ready yet or the source is exhausted."""
        if self.exhausted:
            return None
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if item is self._END:
            self.exhausted = True
            return None
        if isinstance(item, BaseException):
            self.exhausted = True
            raise item
        self.produced += 1
        return item

    def close(self) -> None:
        self._stop.set()


@dataclass
class _Worker:
    index: int
    handle: Any
    name: str | None
    ready: bool = False
    alive: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    load: int = 0
    isolated: bool = False  # running an isolated unit: takes no other unit meanwhile
    heard: float = 0.0  # time.monotonic() of its last reply (ready, a unit's result, a ping)

    def label(self) -> str:
        where = ""
        if self.info:
            where = f" (pid {self.info.get('pid', '?')} on {self.info.get('node', '?')})"
        return f"worker {self.index}{where}"


def _error_text(err: BaseException) -> str:
    """One line for a failed attempt: the worker's exception, not Ray's wrapping."""
    import ray.exceptions as rex

    if isinstance(err, rex.RayTaskError):
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            return f"{type(cause).__name__}: {cause}".strip()
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        return lines[-1] if lines else type(err).__name__
    if isinstance(err, rex.RayActorError):
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("\t")]
        if getattr(err, "actor_init_failed", False):  # the last line is the constructor's exception
            return f"worker failed while starting: {lines[-1] if lines else type(err).__name__}"
        detail = [ln for ln in lines if ln != rex.ActorDiedError.BASE_ERROR_MSG]
        if not detail:
            return "worker process died"
        exit_type = re.search(r"Worker exit type: (\w+)", detail[-1])
        first = detail[-1].split(". ")[0].rstrip(".")  # Ray appends a page of troubleshooting advice
        return f"worker process died ({exit_type.group(1)}): {first}" if exit_type else f"worker process died: {first}"
    return f"{type(err).__name__}: {err}"


IDLE_PING_S = 1.0  # an idle actor not heard from for this long is pinged before it gets a unit


class ActorPool:
    """Runs `WorkUnit`s on a pool of Ray actors of `worker_cls` (see the module docstring).

    `ray` must be initialized (`ray.init`) by the caller. `name_prefix` gives actors the names
    `<prefix>-<i>` in `namespace` so other drivers can see them (`named_actors_alive`).
    `max_concurrency` > 1 makes the actor threaded so that `in_flight` > 1 units can overlap
    (e.g. one unit's last commit with the next unit's compute); the worker must then be
    thread-safe where it matters.
    """

    def __init__(self, worker_cls: type, *, args: tuple = (), kwargs: dict[str, Any] | None = None,
                 num_workers: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                 resources: dict[str, float] | None = None, max_retries: int = 2, in_flight: int = 1,
                 max_concurrency: int | None = None, name_prefix: str | None = None,
                 namespace: str | None = None, max_start_failures: int = 3,
                 max_consecutive_failures: int | None = None, runtime_env: dict[str, Any] | None = None):
        import ray

        missing = [m for m in ("ready", "run_unit") if not callable(getattr(worker_cls, m, None))]
        if missing:
            raise TypeError(f"{worker_cls.__name__} cannot be a pool worker: it lacks {', '.join(missing)}()")
        if num_workers < 1:
            raise DraftdataError(f"the pool needs at least one worker, got {num_workers}")
        if max_retries < 0:
            raise DraftdataError(f"max_retries must be >= 0, got {max_retries}")
        self.num_workers = num_workers
        self.max_retries = max_retries
        self.report: PoolReport | None = None  # the current or last run's, also when it was interrupted
        self.in_flight = max(1, in_flight)
        self.max_start_failures = max_start_failures
        self.max_consecutive_failures = max_consecutive_failures or max(6, 3 * num_workers)
        self._args, self._kwargs = args, dict(kwargs or {})
        self._name_prefix, self._namespace = name_prefix, namespace
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0,
                                   "max_task_retries": 0}
        if resources:
            options["resources"] = resources
        if max_concurrency and max_concurrency > 1:
            options["max_concurrency"] = max_concurrency
        if runtime_env:
            options["runtime_env"] = runtime_env
        self._actor_cls, self._options = ray.remote(worker_cls), options
        self._workers: dict[int, _Worker] = {}
        self._starting: dict[Any, _Worker] = {}  # ready() call -> worker not yet ready
        self._next_index = 0

    # ------------------------------------------------------------------ actors

    def _start_worker(self) -> tuple[_Worker, Any]:
        index = self._next_index
        self._next_index += 1
        name = f"{self._name_prefix}-{index}" if self._name_prefix else None
        options = dict(self._options)
        if name:
            options["name"] = name
            if self._namespace:
                options["namespace"] = self._namespace
        handle = self._actor_cls.options(**options).remote(*self._args, **self._kwargs)
        worker = _Worker(index, handle, name)
        self._workers[index] = worker
        return worker, handle.ready.remote()

    def _kill(self, worker: _Worker) -> None:
        import ray

        worker.alive = False
        try:
            ray.kill(worker.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def start(self) -> None:
        """Request workers until `num_workers` are alive (starting or ready), without waiting for them.

        Called early, they start (load a model) while the caller still prepares its input, and `run`
        takes them over (call `close` if `run` is not reached); `run` also calls it to replace a
        worker it killed."""
        while len(self.live_workers()) < self.num_workers:
            worker, ref = self._start_worker()
            self._starting[ref] = worker

    def close(self) -> None:
        """Kill every live worker (`run` does this itself when it returns)."""
        for worker in list(self._workers.values()):
            if worker.alive:
                self._kill(worker)
        self._starting.clear()

    def live_workers(self) -> list[_Worker]:
        return [w for w in self._workers.values() if w.alive]

    # ------------------------------------------------------------------ main loop

    def run(self, units: Iterable[WorkUnit], *, on_done: Callable[[WorkUnit, Any], None],
            before_retry: Callable[[WorkUnit], WorkUnit | None] | None = None,
            progress: PoolProgress | None = None, prefetch: int | None = None,
            total_units: int | None = None) -> PoolReport:
        """Run every unit; `on_done(unit, result)` is called in this thread for each success.

        Returns the report (failed units included); raises PoolError when no progress is
        possible. Actors are killed before returning.
        """
        import ray

        report = self.report = PoolReport()
        t0 = time.perf_counter()
        source = _Prefetch(units, prefetch or 2 * self.num_workers * self.in_flight)
        retries: collections.deque[WorkUnit] = collections.deque()
        running: dict[Any, tuple[WorkUnit, _Worker]] = {}
        starting = self._starting
        pinging: dict[Any, _Worker] = {}  # liveness checks of idle workers before they get a unit
        start_failures = 0
        consecutive_failures = 0
        last_wait_note = time.perf_counter()

        def note(msg: str) -> None:
            (progress.write if progress else lambda m: print(m, file=sys.stderr, flush=True))(msg)

        def update_units() -> None:
            if progress:
                seen = source.produced
                progress.set_units(seen, seen if source.exhausted else total_units)
                progress.set_workers(sum(1 for w in self.live_workers() if w.ready))

        def give_up(unit: WorkUnit) -> None:
            report.failed.append(UnitFailure(unit.id, list(unit.item_ids), unit.attempts, list(unit.errors), unit))
            if progress:
                progress.unit_finished(unit, ok=False)
            note(f"unit {unit.id}: giving up after {unit.attempts} attempts (it holds {len(unit.item_ids)} items); "
                 "the rest of the run continues")

        def failed_attempt(unit: WorkUnit, worker: _Worker, err: BaseException, died: bool) -> None:
            nonlocal consecutive_failures
            consecutive_failures += 1
            text = _error_text(err)
            unit.errors.append(f"attempt {unit.attempts} on {worker.label()}: {text}")
            if died:
                unit.isolate = True  # it may be what kills workers: never again next to another unit
                if unit.shared:  # which of the units on that worker killed it is unknown: not this attempt's
                    unit.free_attempts += 1  # fault for sure, so it is not counted (its next one runs alone)
            else:
                unit.avoid.add(worker.index)
            left = self.max_retries + 1 + unit.free_attempts - unit.attempts
            note(f"unit {unit.id}: attempt {unit.attempts}/{self.max_retries + 1 + unit.free_attempts} failed on "
                 f"{worker.label()}: {text}" + (" (its worker also ran another unit: not counted)"
                                                if died and unit.shared else "")
                 + (f"; retrying{' alone' if died else ' elsewhere' if len(self.live_workers()) > 1 else ''}"
                    if left > 0 else ""))
            if consecutive_failures >= self.max_consecutive_failures:
                raise PoolError(f"{consecutive_failures} work unit attempts failed in a row without a single "
                                f"success; stopping (last: unit {unit.id}: {text})")
            if before_retry is not None:  # also on the last attempt: it may have died after its last commit
                again = before_retry(unit)
                if again is None:
                    report.units_skipped += 1
                    report.units_done += 1
                    if progress:
                        progress.unit_finished(unit, ok=True)
                    return
                unit = again
            if left <= 0:
                give_up(unit)
                return
            retries.append(unit)

        def next_unit(worker: _Worker, wait: float) -> WorkUnit | None:
            if worker.isolated:
                return None
            others = [w.index for w in self.live_workers() if w.index != worker.index]
            for i, unit in enumerate(retries):
                if unit.isolate and worker.load > 0:
                    continue
                # prefer a worker that has not failed this unit; when all have, any will do
                if worker.index not in unit.avoid or all(o in unit.avoid for o in others):
                    del retries[i]
                    return unit
            return source.get(wait)

        try:
            self.start()
            if progress:
                progress.start()
            while True:
                # Hand out work: idle slots first, then up to `in_flight` per worker.
                for depth in range(1, self.in_flight + 1):
                    if depth > 1 and any(u.isolate for u in retries):
                        break  # let a worker drain, so the isolated retry gets it alone
                    for worker in sorted(self.live_workers(), key=lambda w: w.load):
                        if not worker.ready or worker.load >= depth:
                            continue
                        if worker.load == 0 and time.monotonic() - worker.heard > IDLE_PING_S:
                            if not any(w is worker for w in pinging.values()):
                                pinging[worker.handle.__ray_ready__.remote()] = worker
                            continue
                        unit = next_unit(worker, 0.05 if not running else 0.0)
                        if unit is None:
                            continue
                        unit.attempts += 1
                        beside = [u for u, w in running.values() if w is worker]
                        unit.shared = bool(beside)
                        for other in beside:
                            other.shared = True
                        ref = worker.handle.run_unit.remote(unit.id, *unit.args)
                        running[ref] = (unit, worker)
                        worker.load += 1
                        worker.isolated = unit.isolate
                update_units()
                if not running and not retries and source.exhausted:
                    break  # workers still waiting for resources are not needed any more
                if not running and not starting and retries and not self.live_workers():
                    raise PoolError("no worker is alive to run the remaining units")
                waiting = list(running) + list(starting) + list(pinging)
                if not waiting:  # units are being produced; poll the source again
                    time.sleep(0.01)
                    continue
                done, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
                if not done:
                    if starting and not running and time.perf_counter() - last_wait_note > 120:
                        last_wait_note = time.perf_counter()
                        note(f"waiting for {len(starting)} worker(s) to start (model loading, or the cluster "
                             "lacks the requested resources; see `ray status`)")
                    continue
                ref = done[0]
                if ref in pinging:
                    worker = pinging.pop(ref)
                    try:
                        ray.get(ref)
                        worker.heard = time.monotonic()
                    except ray.exceptions.RayActorError as e:
                        if worker.alive:  # it held no unit: nothing to retry, no attempt charged
                            report.workers_lost += 1
                            self._kill(worker)
                            note(f"{worker.label()} died while idle ({_error_text(e)}); starting a replacement")
                            self.start()
                    continue
                if ref in starting:
                    worker = starting.pop(ref)
                    try:
                        worker.info = dict(ray.get(ref) or {})
                    except Exception as e:  # noqa: BLE001 - any start failure is handled alike
                        start_failures += 1
                        self._kill(worker)
                        note(f"{worker.label()} failed to start ({start_failures}/{self.max_start_failures}): "
                             f"{_error_text(e)}")
                        if start_failures >= self.max_start_failures:
                            raise PoolError(f"{start_failures} workers in a row failed to start; last error: "
                                            f"{_error_text(e)}") from None
                        self.start()
                        continue
                    start_failures = 0
                    worker.ready = True
                    worker.heard = time.monotonic()
                    report.workers_started += 1
                    report.worker_info.append({"worker": worker.index, **worker.info})
                    note(f"{worker.label()} ready" + (f": {worker.info['summary']}" if worker.info.get("summary")
                                                      else ""))
                    continue
                unit, worker = running.pop(ref)
                worker.load -= 1
                worker.heard = time.monotonic()
                if unit.isolate:
                    worker.isolated = False
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    if worker.alive:
                        report.workers_lost += 1
                        self._kill(worker)
                        # Unavailable is not dead: the actor may still be committing this unit's parts.
                        # Retry (and read the commit records for it) only once Ray reports it gone.
                        if isinstance(e, ray.exceptions.ActorUnavailableError) and \
                                not await_actor_death(worker.handle):
                            raise PoolError(f"{worker.label()} became unreachable and could not be confirmed "
                                            "stopped; stopping rather than risk writing its conversations twice "
                                            "(rerun the same command: it resumes from what was committed)") from None
                        note(f"{worker.label()} died; starting a replacement")
                        self.start()
                    failed_attempt(unit, worker, e, died=True)
                    continue
                except ray.exceptions.RayError as e:
                    failed_attempt(unit, worker, e, died=False)
                    continue
                consecutive_failures = 0
                on_done(unit, result)
                report.units_done += 1
                if progress:
                    progress.unit_finished(unit, ok=True)
        except PoolError as e:
            e.report = report
            raise
        finally:
            source.close()
            self.close()
            report.seconds = time.perf_counter() - t0
            if progress:
                progress.set_units(source.produced, source.produced if source.exhausted else total_units)
        return report


def await_actor_death(handle: Any, timeout: float = 60.0) -> bool:
    """After `ray.kill(handle)`: wait until Ray reports the actor dead (True), or `timeout`
    seconds pass (False). `ray.kill` only asks; an actor that was merely unreachable may run on
    for a while, and nothing it was doing may be retried before it has stopped."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        except ray.exceptions.ActorDiedError:
            return True
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    return False


def named_actors_alive(prefix: str) -> list[str]:
    """Names (namespace/name) of live named actors whose name starts with `prefix`, any namespace."""
    import ray

    return sorted(f"{a['namespace']}/{a['name']}" for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix))


def wait_named_actors_gone(prefix: str, timeout: float = 60.0) -> list[str]:
    """Wait until no live named actor starts with `prefix`; returns those still alive at the timeout.

    Used for exclusion: a driver that was just killed leaves its actors alive for a moment
    (Ray reaps them once it notices the owner died); a second driver must not start while they
    may still commit parts.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = named_actors_alive(prefix)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.5)


def actor_cpu_threads() -> int | None:
    """The CPUs Ray assigned to this actor (None for none or less than one).

    Ray starts workers with OMP_NUM_THREADS set from the task's CPUs (1 for most), so an actor that
    computes on CPU sets the torch thread count itself, in the thread it computes in
    (`use_torch_threads`, `ComputeThread`).
    """
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return int(cpus) if cpus >= 1 else None


def raise_priority() -> int:
    """Give every thread of this process the niceness of its parent (the raylet), so threads started
    later inherit it too; returns the calling thread's niceness after the attempt.

    Ray starts workers at nice 15 (`RAY_worker_niceness`) so that they yield to its daemons. For an
    actor that computes on CPU that costs throughput: every wakeup of a nice-0 thread on the node
    preempts one of its OpenMP threads and the parallel region waits for it (measured on 2 CPUs:
    the same forwards took 53 s at nice 15, 44 s at nice 0, 43 s in a single process). All threads,
    not just the one that computes: the part writer threads would otherwise stay at nice 15 next to
    nice-0 compute threads, with a tiny share of the CPU. Niceness is per thread on Linux; lowering
    it needs CAP_SYS_NICE (root) or RLIMIT_NICE, and without them nothing changes.
    """
    own = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        target = os.getpriority(os.PRIO_PROCESS, os.getppid())
    except OSError:  # the parent is gone
        return own
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the calling thread only
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except OSError:  # no permission, or the thread just ended
            pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def use_torch_threads(n: int | None) -> None:
    """`torch.set_num_threads(n)` for the calling thread (nothing when n is None).

    The setting is per OS thread for BLAS/OpenMP: a thread other than the one that called it keeps
    the count of the worker's environment (OMP_NUM_THREADS) even though torch.get_num_threads()
    reported n elsewhere. Measured: a 2-CPU collect actor ran its GEMMs on one core, 0.69x a single
    process, until its compute thread set the count itself.
    """
    if n:
        import torch

        torch.set_num_threads(n)


def prepare_compute_thread(threads: int | None) -> int:
    """Ready the calling thread to run an actor's torch work; returns its niceness.

    `threads`: the actor's CPUs (`actor_cpu_threads`; None for a GPU actor). A CPU actor gets the
    raylet's niceness (`raise_priority`) and that many torch threads (`use_torch_threads`).
    """
    if threads:
        raise_priority()
    use_torch_threads(threads)
    return os.getpriority(os.PRIO_PROCESS, 0)


class ComputeThread:
    """One dedicated OS thread for all of an actor's torch work: model load and forward passes.

    A threaded actor (max_concurrency > 1) runs methods on several pool threads. OpenMP builds a
    thread team per OS thread that starts parallel work, so compute spread over those threads
    (and the thread that ran __init__) leaves several teams on the same cores; libgomp then stops
    spinning between parallel regions and puts its threads to sleep, and every operator waits
    for them to wake. Measured on 2 CPUs: a SmolLM2 forward took 1.2-1.35x as long on a pool
    thread as on the actor's main thread, and as long as on the main thread once model load and
    forwards both ran here. `run` also serializes the calls: one model, one computation at a time.
    """

    def __init__(self, threads: int | None, name: str = "compute"):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=prepare_compute_thread,
                                        initargs=(threads,))
        self.niceness = self.run(os.getpriority, os.PRIO_PROCESS, 0)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on the compute thread; blocks until done and returns or raises as fn did."""
        return self._pool.submit(fn, *args, **kwargs).result()


def process_memory() -> dict[str, int]:
    """Resident and peak resident memory of this process in bytes (Linux /proc; zeros elsewhere)."""
    out = {"rss": 0, "peak_rss": 0}
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    out["peak_rss"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def format_traceback(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))
