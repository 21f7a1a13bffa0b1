"""The one Dask client a batch job runs on, from the pipeline's ``cluster`` section.

``local``: a LocalCluster of worker processes on this machine (one per GPU with ``gpus``).
``scheduler``: an existing dask.distributed cluster, by address or scheduler file.
``slurm`` / ``pbs``: a dask-jobqueue cluster whose workers are batch jobs; the scheduler runs here
(the login node) and ``jobs`` jobs are kept running, a job that ends early being resubmitted.
``kubernetes``: a DaskCluster of the Dask operator (:mod:`~wsi_espnet.batch.kubernetes`).
Scale-out is always an existing engine's: this module only translates the pipeline's settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dask.utils import parse_bytes
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster
from distributed.system import MEMORY_LIMIT

from wsi_espnet.batch.kubernetes import DEFAULT_STARTUP_TIMEOUT_S, open_kubernetes_client
from wsi_espnet.batch.pipeline import ClusterSpec
from wsi_espnet.errors import InputError

__all__ = [
    "DEFAULT_START_TIMEOUT_S", "GPU_RESOURCE", "job_script", "open_client", "task_resources", "worker_wait_s",
]  # fmt: skip

#: The Dask resource a GPU worker offers and each tile task on it takes (one task per GPU at a time).
GPU_RESOURCE = "GPU"
#: How long a job-queue cluster may take to start its first worker (queues can be slow).
DEFAULT_START_TIMEOUT_S = 600

_QUIET = logging.CRITICAL  # worker errors reach the slide's result; the log file keeps the rest


def task_resources(spec: ClusterSpec) -> dict[str, float] | None:
    """The Dask resources each tile task asks for on ``spec``'s cluster (None: any worker)."""
    settings = spec.settings
    if spec.kind == "scheduler":
        return dict(settings["task_resources"]) if settings.get("task_resources") else None
    if spec.kind in ("local", "slurm", "pbs") and settings.get("gpus", 0) > 0:
        return {GPU_RESOURCE: 1}
    if spec.kind == "kubernetes" and settings.get("gpus_per_worker", 0) > 0:
        return {GPU_RESOURCE: 1}
    return None


def worker_wait_s(spec: ClusterSpec) -> float | None:
    """How long a slide waits for a worker when ``spec``'s cluster has none: a job queue's or Kubernetes'
    start-up timeout (jobs that ended at their walltime are replaced through the queue, which can take
    minutes); None (the engine's default) for a local cluster or an existing scheduler."""
    if spec.kind in ("slurm", "pbs"):
        return float(spec.settings.get("start_timeout", DEFAULT_START_TIMEOUT_S))
    if spec.kind == "kubernetes":
        return float(spec.settings.get("startup_timeout", DEFAULT_STARTUP_TIMEOUT_S))
    return None


@contextlib.contextmanager
def open_client(
    spec: ClusterSpec, *, name: str = "wsi-espnet", job_log_directory: Path | None = None
) -> Iterator[Client]:
    """A client for ``spec``, closed (with any cluster started here) on exit.

    ``name`` (the pipeline's) names a Kubernetes cluster; ``job_log_directory`` is where job-queue
    workers write their logs unless the spec says otherwise.
    Raises :class:`InputError` when the cluster cannot be started or reached, saying what to check.
    """
    if spec.kind == "local":
        with _local_cluster(spec.settings) as cluster, Client(cluster) as client:
            yield client
    elif spec.kind == "scheduler":
        with _connect(spec.settings) as client:
            yield client
    elif spec.kind in ("slurm", "pbs"):
        with (
            _job_queue_cluster(spec.kind, spec.settings, job_log_directory) as (cluster, logs),
            Client(cluster) as client,
        ):
            _wait_for_first_worker(client, spec.kind, worker_wait_s(spec) or DEFAULT_START_TIMEOUT_S, logs)
            yield client
    elif spec.kind == "kubernetes":
        with open_kubernetes_client(spec.settings, name=name) as client:
            yield client
    else:
        raise InputError(f"cluster kind {spec.kind!r} is not known; use local, scheduler, slurm, pbs or kubernetes.")


def _local_cluster(settings: Mapping[str, Any]) -> SpecCluster:
    """Worker processes (restarted by their nanny when they die), each with one thread by default."""
    threads = settings.get("threads_per_worker", 1)
    memory = settings.get("memory_limit", "auto")
    gpus = settings.get("gpus", 0)
    if not gpus:
        workers = settings.get("workers") or max(1, (os.cpu_count() or 2) // 2)
        return LocalCluster(
            n_workers=workers, threads_per_worker=threads, processes=True, memory_limit=memory,
            dashboard_address=":0", silence_logs=_QUIET,
        )  # fmt: skip
    if settings.get("workers"):
        raise InputError(
            f"cluster.local sets both workers: {settings['workers']} and gpus: {gpus}; with gpus there is one worker "
            "per GPU, so remove workers."
        )
    visible = _cuda_device_count()
    if gpus > visible:
        raise InputError(
            f"the pipeline asks for gpus: {gpus} in cluster.local, but this machine has {visible} CUDA device(s) "
            "visible to PyTorch; lower gpus (0 runs on the CPU), or run on a GPU node."
        )
    # One worker process per GPU, each seeing only its own (so "cuda" means that GPU and one model is
    # loaded per GPU), each offering one GPU resource so at most one tile task runs on it at a time.
    # The GPUs are this process's own: inside a job that holds GPUs 2 and 3, worker 0 gets 2.
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in inherited.split(",")] if inherited else [str(i) for i in range(visible)]
    if memory == "auto":  # LocalCluster's share (all memory / workers), not a Nanny's (per thread of all cores)
        memory = MEMORY_LIMIT // gpus
    workers = {
        f"gpu-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": threads, "memory_limit": memory, "resources": {GPU_RESOURCE: 1},
                "env": {"CUDA_VISIBLE_DEVICES": devices[i]}, "silence_logs": _QUIET,
            },
        }
        for i in range(gpus)
    }  # fmt: skip
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=_QUIET, name="wsi-espnet-gpus")


def _cuda_device_count() -> int:
    import torch  # only a GPU pipeline pays for it here

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def _connect(settings: Mapping[str, Any]) -> Iterator[Client]:
    target, timeout = settings.get("address"), f"{settings.get('timeout', 20)}s"
    try:
        client = Client(target, timeout=timeout) if target else Client(scheduler_file=settings["file"], timeout=timeout)
    except (OSError, ValueError) as exc:
        what = target or f"the scheduler file {settings.get('file')}"
        raise InputError(
            f"cannot reach the Dask scheduler at {what!r} ({exc}); check that it is running, or use a local cluster."
        ) from exc
    with client:
        yield client


def job_script(spec: ClusterSpec, *, job_log_directory: Path | None = None) -> str:
    """The batch script each worker job of a ``slurm`` / ``pbs`` spec is submitted with (nothing is submitted)."""
    if spec.kind not in ("slurm", "pbs"):
        raise InputError(f"only slurm and pbs clusters have worker job scripts; this cluster is {spec.kind}.")
    cls = _job_queue_class(spec.kind)
    logs = spec.settings.get("log_directory") or job_log_directory
    # dask-jobqueue creates the log folder when it builds a job; printing a script must not, so it is
    # built with a scratch folder whose path is then replaced by the real one.
    with tempfile.TemporaryDirectory(prefix="wsi-espnet-job-logs-") as scratch:
        settings = {**spec.settings, "log_directory": scratch} if logs else spec.settings
        with cls(**_job_queue_kwargs(spec.kind, settings, None)) as cluster:
            script = str(cluster.job_script())
    return script.replace(scratch, str(logs)) if logs else script


def _job_queue_class(kind: str) -> Any:
    try:
        from dask_jobqueue.pbs import PBSCluster
        from dask_jobqueue.slurm import SLURMCluster
    except ImportError as exc:
        raise InputError(
            f"a {kind} cluster needs dask-jobqueue, which is not installed; pip install 'wsi-espnet[cluster]'."
        ) from exc
    return SLURMCluster if kind == "slurm" else PBSCluster


@contextlib.contextmanager
def _job_queue_cluster(
    kind: str, settings: Mapping[str, Any], job_log_directory: Path | None
) -> Iterator[tuple[Any, str | None]]:
    """A dask-jobqueue SLURMCluster / PBSCluster kept at ``jobs`` jobs, and its log folder."""
    cls = _job_queue_class(kind)
    kwargs = _job_queue_kwargs(kind, settings, job_log_directory)
    submit = "sbatch" if kind == "slurm" else "qsub"
    if shutil.which(submit) is None:
        raise InputError(
            f"a {kind} cluster submits worker jobs with {submit}, which is not on PATH here; run `wsi-espnet batch` "
            f"on a {kind.upper()} login node (or load the module that provides {submit})."
        )
    try:
        cluster = cls(**kwargs)
    except (ValueError, OSError) as exc:  # e.g. an interface this machine does not have
        raise InputError(f"cannot start the {kind} cluster: {exc}; check cluster.{kind} in the pipeline.") from exc
    with cluster:
        if kind == "slurm":
            _check_slurm_job(cluster.job_script())
        jobs = settings.get("jobs", 1)
        # adapt, not scale: a job that ends early (walltime, preemption, a node lost) is resubmitted.
        cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
        yield cluster, kwargs.get("log_directory")


def _job_queue_kwargs(kind: str, settings: Mapping[str, Any], job_log_directory: Path | None) -> dict[str, Any]:
    processes = settings.get("processes", 1)
    gpus = settings.get("gpus", 0)
    if gpus and processes != 1:
        raise InputError(
            f"cluster.{kind}: gpus: 1 runs one worker process on the job's GPU, but processes: {processes} asks for "
            "more; remove processes (or set it to 1) and ask for more jobs instead."
        )
    walltime = settings.get("walltime")
    if kind == "pbs" and walltime and "-" in walltime:
        raise InputError(
            f"cluster.pbs.walltime {walltime!r} uses SLURM's days-hours form, which PBS refuses; write hours, "
            "e.g. 36:00:00."
        )
    directives = list(settings.get("job_extra_directives", []))
    kwargs: dict[str, Any] = {
        "cores": settings["cores"],
        "processes": processes,
        "memory": settings["memory"],
        "walltime": settings.get("walltime"),
        "queue": settings.get("queue"),
        "account": settings.get("account"),
        "interface": settings.get("interface"),
        "local_directory": settings.get("local_directory"),
        "python": settings.get("python"),
        "job_script_prologue": list(settings.get("job_script_prologue", [])),
        "log_directory": settings.get("log_directory") or (str(job_log_directory) if job_log_directory else None),
        "worker_extra_args": [],
        "job_name": "wsi-espnet",
        "scheduler_options": {"dashboard_address": ":0"},
        "silence_logs": "critical",
    }
    if gpus:
        # SLURM sets CUDA_VISIBLE_DEVICES to the job's GPU; the worker offers it as one GPU resource.
        kwargs["worker_extra_args"] = ["--resources", f"{GPU_RESOURCE}=1"]
        if kind == "slurm":
            directives.append("--gres=gpu:1")
        else:  # PBS Pro's chunk syntax; Torque sites put their own line in job_extra_directives
            memory = _pbs_size(parse_bytes(str(settings["memory"])))
            kwargs["resource_spec"] = f"select=1:ncpus={settings['cores']}:ngpus=1:mem={memory}"
    kwargs["job_extra_directives"] = directives
    return {k: v for k, v in kwargs.items() if v is not None}


def _pbs_size(size: int) -> str:
    """A whole-number PBS size, rounded up (PBS reads ``gb`` as 2**30 bytes and refuses fractions)."""
    for unit, factor in (("gb", 2**30), ("mb", 2**20), ("kb", 2**10)):
        if size >= factor:
            return f"{-(-size // factor)}{unit}"
    return f"{size}b"


def _check_slurm_job(script: str) -> None:
    """``sbatch --test-only`` on the worker job: a wrong partition, account or size fails here, at once."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="wsi-espnet-job-", delete=False) as handle:
        handle.write(script)
    try:
        done = subprocess.run(
            ["sbatch", "--test-only", handle.name], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise InputError("sbatch --test-only did not answer within 60 s; check that slurmctld is up (sinfo).") from exc
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
        if "Unable to contact slurm controller" in said:
            raise InputError(
                f"sbatch cannot reach the SLURM controller ({said}); check `sinfo` works here, and SLURM_CONF if "
                "your site sets it."
            )
        raise InputError(
            f"SLURM refuses the worker job the pipeline describes: {said}. Check cluster.slurm (queue, account, "
            "cores, memory, walltime, job_extra_directives) against `sinfo` and your site's limits."
        )


def _wait_for_first_worker(client: Client, kind: str, timeout: float, logs: str | None) -> None:
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError as exc:
        where = f"; the jobs' logs are in {logs}" if logs else ""
        raise InputError(
            f"no {kind} worker job started within {timeout:g} s (waiting in the queue, or failing at start{where}); "
            f"check `{'squeue --me' if kind == 'slurm' else 'qstat -u $USER'}`, or raise cluster.{kind}.start_timeout."
        ) from exc
