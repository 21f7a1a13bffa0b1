"""Running a pipeline: every slide of the cohort on one Dask client, several at once, failures kept per slide.

A small pool of driver threads calls :func:`~wsi_espnet.segment_slide.segment_slide` for one slide
each, all on the same client, so the cluster's workers stay busy across slide boundaries. A slide
that fails with a :class:`~wsi_espnet.errors.WsiEspnetError` (corrupt file, missing MPP, unreadable
tile) is recorded with its reason and the others go on; so is an unexpected error, whose traceback
goes to the slide's ``.segment.log``. A worker lost mid-task is restarted by its nanny and the task
rerun by the scheduler; if a slide still ends on a lost worker, it is resumed once from its finished
tiles. Finished slides are skipped (``segment_slide`` finds them complete), so rerunning a pipeline
recomputes nothing and resumes what was interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path

from distributed import Client, KilledWorker

from wsi_espnet import __version__
from wsi_espnet.batch.clusters import open_client, task_resources, worker_wait_s
from wsi_espnet.batch.cohort import CohortSlide
from wsi_espnet.batch.pipeline import Pipeline
from wsi_espnet.batch.report import BatchReport, SlideOutcome, SlideStatus
from wsi_espnet.errors import Cancelled, InputError, WsiEspnetError
from wsi_espnet.models import load_model
from wsi_espnet.models.registry import resolve_model_path
from wsi_espnet.outputs.paths import OutputPaths
from wsi_espnet.segment_slide import segment_slide
from wsi_espnet.segmentation import ProgressCallback

__all__ = ["SlideCallback", "StartCallback", "run_pipeline"]

#: Called with each slide's outcome as it finishes (from the caller's thread, in finishing order).
SlideCallback = Callable[[SlideOutcome], None]
#: Called once the cluster is up, with the scheduler's address and the dashboard link (None without one).
StartCallback = Callable[[str, str | None], None]

#: Where job-queue workers (SLURM, PBS) write their logs, inside the output folder, unless the pipeline says.
JOB_LOG_FOLDER = ".batch-jobs"

_logger = logging.getLogger(__name__)


def run_pipeline(
    pipeline: Pipeline,
    *,
    client: Client | None = None,
    on_start: StartCallback | None = None,
    on_slide: SlideCallback | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> BatchReport:
    """Segment every slide of ``pipeline`` and write its report next to the outputs; returns the report.

    ``client`` is a Dask client to run on (left open); without one the pipeline's cluster is started
    (or connected to) and closed at the end. ``on_progress`` receives every slide's
    :class:`~wsi_espnet.segmentation.ProgressEvent` s (from driver threads). Setting ``cancel`` stops
    every slide after its tiles in flight; those slides are reported ``cancelled`` (and resume on a rerun).

    Raises :class:`~wsi_espnet.errors.WsiEspnetError` only for what stops the whole job: a checkpoint
    that cannot be loaded, an output folder that cannot be written, a cluster that cannot be reached.
    """
    cancel = cancel or threading.Event()
    started, t0 = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter()
    model = str(resolve_model_path(pipeline.model))
    load_model(model)  # a bad checkpoint stops the job here, not once per slide
    try:
        pipeline.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {str(pipeline.out_dir)!r}: {exc.strerror or exc}.") from exc

    with _client(client, pipeline) as run_client:
        scheduler = str(run_client.scheduler_info().get("address", "client"))
        dashboard = _dashboard(run_client)
        if on_start is not None:
            on_start(scheduler, dashboard)
        outcomes: dict[int, SlideOutcome] = {}
        unwritten: OSError | None = None
        with ThreadPoolExecutor(pipeline.concurrent_slides, thread_name_prefix="slide-driver") as pool:
            futures: dict[Future[SlideOutcome], int] = {
                pool.submit(_run_slide, pipeline, slide, model, run_client, on_progress, cancel): i
                for i, slide in enumerate(pipeline.cohort.slides)
            }
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        outcomes[futures[future]] = future.result()
                        if on_slide is not None:
                            on_slide(outcomes[futures[future]])
            except BaseException:
                # Ctrl-C or a failing callback: every driver stops after its tiles in flight (the stores stay
                # resumable), and the report still says what was done.
                cancel.set()
                for future in pending:  # a second Ctrl-C stops the wait
                    outcomes[futures[future]] = future.result()
                raise
            finally:
                report = BatchReport(
                    pipeline=pipeline.name, outcomes=tuple(outcomes[i] for i in sorted(outcomes)), started=started,
                    seconds=time.perf_counter() - t0, scheduler=scheduler, dashboard=dashboard,
                    metadata_columns=pipeline.cohort.metadata_columns,
                )  # fmt: skip
                try:
                    report.write(pipeline.out_dir)
                except OSError as exc:  # a full disk: say so, without hiding an error already on its way
                    unwritten = exc
                    _logger.error("cannot write the batch report in %s: %s.", pipeline.out_dir, exc.strerror or exc)
    if unwritten is not None:
        counts = ", ".join(f"{n} {status}" for status, n in report.counts.items())
        raise InputError(
            f"cannot write the batch report in {str(pipeline.out_dir)!r}: {unwritten.strerror or unwritten}. The "
            f"slides themselves ended as printed ({counts}) and each finished slide's outputs are complete; free "
            "space (or fix permissions) and rerun to write the report, which recomputes no finished slide."
        ) from unwritten
    return report


@contextlib.contextmanager
def _client(client: Client | None, pipeline: Pipeline) -> Iterator[Client]:
    if client is not None:
        yield client
        return
    with open_client(pipeline.cluster, name=pipeline.name, job_log_directory=pipeline.out_dir / JOB_LOG_FOLDER) as own:
        yield own


def _dashboard(client: Client) -> str | None:
    try:
        link = client.dashboard_link
    except (KeyError, AttributeError):
        return None
    return str(link) if link else None


def _run_slide(
    pipeline: Pipeline,
    slide: CohortSlide,
    model: str,
    client: Client,
    on_progress: ProgressCallback | None,
    cancel: threading.Event,
) -> SlideOutcome:
    """One slide, never raising: its outcome says what happened."""
    t0 = time.perf_counter()
    options = pipeline.slide_options(slide)
    attempts = 0
    try:
        while True:
            attempts += 1
            try:
                result = segment_slide(
                    slide.path, model, options, client=client, on_progress=on_progress, cancel=cancel,
                    resources=task_resources(pipeline.cluster), worker_wait_s=worker_wait_s(pipeline.cluster),
                )  # fmt: skip
                break
            except InputError as exc:
                # The scheduler already reran the lost worker's tasks; a slide that still lost one resumes once.
                if attempts > 1 or not isinstance(exc.__cause__, KilledWorker) or cancel.is_set():
                    raise
                _logger.warning("%s: a worker was lost (%s); resuming from the finished tiles.", slide.stem, exc)
    except Cancelled as exc:
        return SlideOutcome(slide, "cancelled", str(exc), time.perf_counter() - t0, attempts=attempts)
    except WsiEspnetError as exc:
        log = _write_failure_log(slide, options.out_dir, exc)
        return SlideOutcome(slide, "failed", str(exc), time.perf_counter() - t0, attempts=attempts, log=log)
    except Exception as exc:  # a bug on one slide must not lose the others' results
        log = _write_failure_log(slide, options.out_dir, exc)
        reason = f"internal error ({type(exc).__name__}: {exc}); please report it with {log}"
        return SlideOutcome(slide, "failed", reason, time.perf_counter() - t0, attempts=attempts, log=log)
    status: SlideStatus = "skipped" if result.skipped else "ok"
    reason = "already complete for these inputs and settings; nothing recomputed" if result.skipped else ""
    return SlideOutcome(
        slide, status, reason, time.perf_counter() - t0, dict(result.outputs), result.provenance, attempts
    )


def _write_failure_log(slide: CohortSlide, folder: Path | None, exc: BaseException) -> Path | None:
    """``<folder>/<slide>.segment.log`` with the full traceback (Dask's worker errors included)."""
    if folder is None:
        return None
    path = OutputPaths.for_slide(slide.path, folder).log
    try:
        folder.mkdir(parents=True, exist_ok=True)
        trace = "".join(traceback.format_exception(exc))
        path.write_text(f"wsi-espnet {__version__} batch, slide {slide.path}\n{trace}")
    except OSError:
        return None
    return path
