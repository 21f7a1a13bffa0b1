"""Running a plan's tiles as Dask tasks on a caller's client: bounded in flight, resumable, cancellable.

Each task segments a fixed group of tiles and writes them into the label store, flagging each tile
once its labels are stored; tiles already flagged are never submitted again. A failure, a lost
worker or a cancel request stops submitting, lets the tasks in flight finish (their tiles count),
and then raises, so the store is left consistent and a rerun resumes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from distributed import Client, Future, KilledWorker, LocalCluster, as_completed

from wsi_espnet.errors import InputError
from wsi_espnet.segmentation.label_store import LabelStore
from wsi_espnet.segmentation.planning import SlidePlan, tile_groups
from wsi_espnet.segmentation.progress import ProgressCallback, ProgressEvent, check_cancelled
from wsi_espnet.segmentation.tile_inference import InferenceSettings, TileGroupResult, segment_tile_group
from wsi_espnet.tiling import Tile

__all__ = ["RunStats", "local_client", "run_tiles"]

#: How long a run waits, by default, for a worker of an external cluster when none is there.
WORKER_WAIT_S = 120


@dataclass(frozen=True)
class RunStats:
    """What :func:`run_tiles` did: tiles resumed from the store, windows run, seconds, devices used."""

    tiles_total: int
    tiles_resumed: int
    windows_run: int
    model_seconds: float
    read_seconds: float
    devices: tuple[str, ...]
    precisions: tuple[str, ...]
    runtimes: tuple[str, ...] = ()
    runtime_agreement: float | None = None
    runtime_checks: tuple[dict[str, Any], ...] = ()


@contextlib.contextmanager
def local_client(threads: int | None = None) -> Iterator[Client]:
    """An in-process Dask cluster with one worker of ``threads`` threads (default: CPU cores, at least 2).

    In-process, the model is loaded once and shared; one thread runs it while the others read and write.
    """
    threads = threads or max(2, os.cpu_count() or 1)
    with LocalCluster(
        n_workers=1, threads_per_worker=threads, processes=False, dashboard_address=":0",
        silence_logs=logging.CRITICAL,  # worker errors reach the caller as exceptions; the CLI logs the rest
    ) as cluster, Client(cluster) as client:  # fmt: skip
        yield client


def run_tiles(
    plan: SlidePlan,
    settings: InferenceSettings,
    store: LabelStore,
    *,
    client: Client,
    batch_size: int = 1,
    weights: bytes | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    resources: Mapping[str, float] | None = None,
    worker_wait_s: float | None = None,
) -> RunStats:
    """Segment the plan's tissue tiles that ``store`` has not flagged done, on ``client``'s cluster.

    ``weights`` are the model's bytes when ``settings`` names no file; they are shipped to each worker
    once. ``on_progress`` receives a ``"tiles"`` event per finished task; setting ``cancel`` stops the
    run after the tasks in flight and raises :class:`~wsi_espnet.errors.Cancelled`. ``resources``
    are Dask worker resources every task needs (``{"GPU": 1}``: tasks run only on workers started
    with ``--resources GPU=1``, one at a time per GPU). When no such worker is there, the run waits
    ``worker_wait_s`` (default :data:`WORKER_WAIT_S`) for one: a job-queue cluster's replacement
    jobs may sit in the queue for minutes.

    Raises
    ------
    InputError : a worker died or a GPU ran out of memory (the message says what to lower), or no
        worker joined the cluster within ``worker_wait_s``.
    Cancelled : ``cancel`` was set.
    """
    done = store.done_tiles()
    tiles_resumed = sum(1 for t in plan.tissue_tiles if done[t.row, t.col])
    groups = [g for g in tile_groups(plan.tissue_tiles, batch_size) if not all(done[t.row, t.col] for t in g)]
    total, finished = len(plan.tissue_tiles), tiles_resumed
    detail = f"{plan.tissue.fraction:.0%} tissue"

    def report() -> None:
        if on_progress is not None:
            on_progress(ProgressEvent(plan.slide_name, "tiles", finished, total, detail))

    report()
    results: list[TileGroupResult] = []
    if groups:
        check_cancelled(cancel, plan.slide_name)
        _wait_for_workers(client, resources, WORKER_WAIT_S if worker_wait_s is None else worker_wait_s)
        shipped = client.scatter(weights, broadcast=True, hash=False) if weights is not None else None

        def submit(group: list[Tile]) -> Future[TileGroupResult]:
            return client.submit(
                segment_tile_group, plan.reader, plan.choice, group, plan.tissue_windows(group), settings,
                str(store.path), shipped, pure=False, resources=dict(resources) if resources else None,
            )  # fmt: skip

        pending = iter(groups)
        in_flight = max(2, 2 * sum(client.nthreads().values()))
        futures = as_completed([submit(g) for g in _take(pending, in_flight)])
        try:
            for future in futures:
                try:
                    result: TileGroupResult = future.result()
                except KilledWorker as exc:
                    raise InputError(
                        "a Dask worker died while segmenting (most often it ran out of memory); lower [[tile_size]] "
                        "or [[batch_size]], or give workers more memory, then rerun the same command to resume."
                    ) from exc
                except torch.OutOfMemoryError as exc:
                    raise InputError(
                        "the GPU ran out of memory; lower [[batch_size]] or [[tile_size]], then rerun the command to "
                        "resume."
                    ) from exc
                results.append(result)
                finished += len(result.tiles)
                report()
                check_cancelled(cancel, plan.slide_name)
                for group in _take(pending, 1):
                    futures.add(submit(group))
        except BaseException:
            # A failed task, a cancel, Ctrl-C (raised while waiting) or a failing callback: the tasks in flight
            # finish first, so none of them writes into the store after this run has let go of it.
            _drain(futures)
            raise
    return RunStats(
        tiles_total=total,
        tiles_resumed=tiles_resumed,
        windows_run=sum(r.windows for r in results),
        model_seconds=sum(r.model_seconds for r in results),
        read_seconds=sum(r.read_seconds for r in results),
        devices=tuple(sorted({r.device for r in results})),
        precisions=tuple(sorted({r.precision for r in results})),
        **_runtime_stats(results),
    )


def _runtime_stats(results: list[TileGroupResult]) -> dict[str, Any]:
    """Runtimes the tasks ran on, the lowest calibration agreement among them, and each distinct check."""
    choices = [r.runtime for r in results if r.runtime is not None]
    agreements = [c.agreement for c in choices if c.agreement is not None]
    checks = {json.dumps(c.check, sort_keys=True): c.as_record() for c in choices if c.check}
    return {
        "runtimes": tuple(sorted({c.name for c in choices})),
        "runtime_agreement": min(agreements) if agreements else None,
        "runtime_checks": tuple(checks.values()),
    }


def _wait_for_workers(client: Client, resources: Mapping[str, float] | None, wait_s: float) -> None:
    """Wait up to ``wait_s`` for a worker (one offering ``resources``, when given), or explain why none came."""
    deadline = time.monotonic() + wait_s
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        if any(_offers(w.get("resources") or {}, resources) for w in workers):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if resources and workers:
        offered = sorted({f"{k}={v:g}" for w in workers for k, v in (w.get("resources") or {}).items()})
        wanted = ", ".join(f"{k}={v:g}" for k, v in resources.items())
        raise InputError(
            f"no Dask worker offers the resources the tasks need ({wanted}); the workers offer "
            f"{', '.join(offered) or 'none'}. Start workers with `dask worker --resources {wanted.replace(', ', ',')}` "
            "(one per GPU), or run without them, then rerun the same command to resume."
        )
    raise InputError(
        f"no Dask worker joined the scheduler within {wait_s:g} s; start workers (or check the "
        "cluster), then rerun the same command to resume."
    )


def _offers(offered: Mapping[str, float], needed: Mapping[str, float] | None) -> bool:
    return all(offered.get(k, 0) >= v for k, v in (needed or {}).items())


def _drain(futures: Any) -> None:
    """Let the tasks already submitted finish (their errors are dropped) before the run stops.

    Running tasks cannot be stopped mid-write; closing the cluster under them would leave zarr writes
    in flight and print their tracebacks. The tiles they finish are flagged, so a rerun has less to do.
    """
    for future in futures:  # a second Ctrl-C (KeyboardInterrupt) stops the wait
        with contextlib.suppress(Exception):
            future.result()


def _take(iterator: Iterator[list[Tile]], count: int) -> list[list[Tile]]:
    taken = []
    for _ in range(count):
        item = next(iterator, None)
        if item is None:
            break
        taken.append(item)
    return taken
