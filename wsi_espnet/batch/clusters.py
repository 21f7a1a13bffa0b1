"""The one Dask client a batch job runs on: a LocalCluster with worker processes, an existing scheduler, or a
DaskCluster on Kubernetes (:mod:`~wsi_espnet.batch.kubernetes`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

from wsi_espnet.batch.kubernetes import open_kubernetes_client
from wsi_espnet.batch.pipeline import ClusterSpec
from wsi_espnet.errors import InputError

__all__ = ["open_client"]


@contextlib.contextmanager
def open_client(spec: ClusterSpec, *, name: str = "wsi-espnet") -> Iterator[Client]:
    """A client for ``spec``, closed (with any cluster started here) on exit; ``name`` (the pipeline's) names
    a Kubernetes cluster.

    ``local`` starts worker processes (default: one per 2 cores, at least 1, each with one thread),
    so a worker that dies (out of memory, killed) is restarted by its nanny and its tasks retried.
    """
    settings = spec.settings
    if spec.kind == "local":
        workers = settings.get("workers") or max(1, (os.cpu_count() or 2) // 2)
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=settings.get("threads_per_worker", 1), processes=True,
                memory_limit=settings.get("memory_limit", "auto"), dashboard_address=":0",
                silence_logs=logging.CRITICAL,  # worker errors reach the slide's result; the log file keeps the rest
            ) as cluster,
            Client(cluster) as client,
        ):  # fmt: skip
            yield client
        return
    if spec.kind == "scheduler":
        target = settings.get("address")
        try:
            connected = (
                Client(target, timeout="20s") if target else Client(scheduler_file=settings["file"], timeout="20s")
            )
        except (OSError, ValueError) as exc:
            what = target or f"the scheduler file {settings.get('file')}"
            raise InputError(
                f"cannot reach the Dask scheduler at {what!r} ({exc}); check that it is running, or use a local "
                "cluster."
            ) from exc
        with connected:
            yield connected
        return
    if spec.kind == "kubernetes":
        with open_kubernetes_client(settings, name=name) as client:
            yield client
        return
    raise InputError(
        f"cluster kind {spec.kind!r} is accepted in pipelines but not started by this version yet; start the "
        f"cluster yourself (e.g. dask_jobqueue.{spec.kind.upper()}Cluster(...).scale(jobs=N)), then give its "
        "scheduler as cluster: {scheduler: {address: ...}} or --scheduler."
    )
