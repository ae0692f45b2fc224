"""Evaluation on a Ray cluster (``python -m runtime.eval ... --ray [ADDRESS] --replicas N``).

Each replica is a Ray actor holding one long-lived ``Reasoner`` (loaded once), with the CPUs / GPUs given
per replica. The driver hands the next sample to whichever replica is free (answers differ in length, so
there is no static split), receives each record as it finishes, and alone writes samples.jsonl and the
reports, exactly as a local run does. Replicas decode videos themselves, by path under --video-root (the
same path rules): the engine folder and the media must be readable on every node.

A replica that dies mid-sample (process killed, out of memory) is replaced and its sample tried again on a
free replica, up to ``max_retries`` times, after which the sample is recorded as failed with the reason;
every sample is recorded exactly once. Ctrl-C stops the replicas; the records written so far stay, and a
rerun with the same settings finishes only what is missing. Ray is imported only here.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from models.errors import UserError

LAST_RUN: dict = {}  # timing facts of the last distributed run (read by runtime.eval.scaling)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'ray>=2.9' (or the project's [ray] extra)") from None
    return ray


class Replica:
    """The actor's class (wrapped with ``ray.remote`` by ``RayPool``): one Reasoner, loaded once."""

    def __init__(self, engine: str, backend: str, device: str | None, threads: int) -> None:
        from runtime.reasoner import Reasoner

        self.reasoner = Reasoner.load(engine, backend=backend, device=device, threads=threads)

    def ready(self) -> tuple[str, str]:
        return self.reasoner.backend.name, self.reasoner.decode

    def evaluate(self, sample, root, method: str, args, controller, sampling, budget: dict) -> tuple[dict, float]:
        from runtime.eval.step import evaluate_one

        t0 = time.perf_counter()
        rec = evaluate_one(self.reasoner, sample, root, method, args, controller, sampling, budget)
        return rec, time.perf_counter() - t0


class RayPool:
    """Replicas fed one sample at a time. Scheduled here rather than with ``ray.util.ActorPool``: ActorPool neither
    replaces an actor whose process died nor retries the sample it held (it raises ``RayActorError`` for it and
    keeps handing work to the dead actor), and actor ``max_restarts``/``max_task_retries`` would retry the sample
    inside Ray with no record of which replica died or of a sample that keeps killing replicas; both are reported
    here ("replica N died", a failed record after ``max_retries``)."""

    def __init__(self, address: str, replicas: int, cpus: float, gpus: float, engine: str, backend: str,
                 device: str | None = None, max_retries: int = 2) -> None:
        self.ray = ray = import_ray()
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=None if address == "local" else address, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"--ray {address}: could not start or reach a Ray cluster ({e})") from None
        self.n, self.max_retries = replicas, max_retries
        # ``Replica`` looked up when the pool starts (a test puts a faulty subclass here to kill a replica)
        self.actor = ray.remote(Replica).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
        self.spec = (engine, backend, device, max(1, int(cpus)))
        self.replicas = [self._spawn(i) for i in range(replicas)]
        self.round_trips: list[tuple[float, float]] = []  # (driver seconds, replica seconds) per sample
        try:
            self.info = ray.get([r.ready.remote() for r in self.replicas])[0]  # (backend, decode)
        except ray.exceptions.RayError as e:
            self.close()
            raise UserError(f"an evaluation replica could not load {engine}: {_first_line(e)}") from None

    def _spawn(self, i: int):
        return self.actor.remote(*self.spec)

    def run(self, todo: Iterable[tuple], submit_args: Callable[[tuple], tuple],
            on_record: Callable[[tuple, dict], None], failed_record: Callable[[tuple, str], dict], progress) -> None:
        """Evaluate ``todo`` items; ``on_record`` gets each record (any order) exactly once."""
        ray = self.ray
        queue = deque((item, 0) for item in todo)
        idle = deque(range(self.n))
        inflight: dict = {}
        while queue or inflight:
            while idle and queue:
                i = idle.popleft()
                item, attempts = queue.popleft()
                ref = self.replicas[i].evaluate.remote(*submit_args(item))
                inflight[ref] = (i, item, attempts, time.perf_counter())
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            i, item, attempts, t0 = inflight.pop(ref)
            try:
                rec, seconds = ray.get(ref)
                self.round_trips.append((time.perf_counter() - t0, seconds))
            except ray.exceptions.RayActorError as e:  # the replica's process died: replace it
                self.replicas[i] = self._spawn(i)
                idle.append(i)
                if attempts < self.max_retries:
                    print(f"replica {i} died ({_first_line(e)}); retrying its sample", file=sys.stderr)
                    queue.appendleft((item, attempts + 1))
                    continue
                rec = failed_record(item, f"replica died {attempts + 1} times on this sample: {_first_line(e)}")
            except ray.exceptions.RayTaskError as e:  # an unexpected error inside the replica: recorded
                idle.append(i)
                rec = failed_record(item, f"replica error: {_first_line(e)}")
            else:
                idle.append(i)
            on_record(item, rec)
            progress.update(1)

    def close(self) -> None:
        for r in getattr(self, "replicas", []):
            try:
                self.ray.kill(r)
            except Exception:  # noqa: BLE001 (already gone)
                pass
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # Ray's messages end with the cause
        if "Error" in ln or "error" in ln:
            return ln.strip()[:300]
    return (lines[-1] if lines else type(e).__name__)[:300]


def open_pool(args) -> RayPool:
    """Start (or join) the cluster and ``args.replicas`` replicas, each with the engine loaded."""
    return RayPool(args.ray, args.replicas, args.cpus_per_replica, args.gpus_per_replica,
                   str(Path(args.engine).expanduser().resolve()), args.backend, args.device, args.max_retries)


def run_distributed(pool: RayPool, args, todo: list[tuple], controller, sampling, budget: dict, on_record,
                    failed_record, progress) -> dict:
    """Run ``todo`` [(sample, root, sha, method)] on the pool's replicas; returns timing facts."""
    t0 = time.perf_counter()
    pool.run(todo, lambda item: (item[0], item[1], item[3], args, controller, sampling, budget), on_record,
             failed_record, progress)
    trips = pool.round_trips
    wall = time.perf_counter() - t0
    facts = {"replicas": pool.n, "samples": len(trips), "wall_s": wall,
             "samples_per_s": len(trips) / wall if wall > 0 else 0.0,
             "sample_s": sum(s for _, s in trips) / len(trips) if trips else 0.0,
             "overhead_s": sum(d - s for d, s in trips) / len(trips) if trips else 0.0,
             "overhead_fraction": (sum(d - s for d, s in trips) / sum(s for _, s in trips)) if trips else 0.0}
    LAST_RUN.clear()
    LAST_RUN.update(facts)
    return facts
