"""What a cohort batch job costs over its slides: scheduling, tasks, memory, and a 1,000-slide plan.

1. Scheduler overhead. The slides (``--slides``; default the four real test slides) run as one
   cohort through ``run_pipeline`` on a LocalCluster of worker processes (``open_client``, as
   ``wsi-espnet batch`` starts it; ``--workers``), then one by one through ``segment_slide``, each
   on a fresh cluster of the same kind: same settings, fresh output folders. Every cluster is
   started and warmed (the model loaded on each worker and run once on a real window, in a task
   pinned to that worker) before its timer starts; start-up and warm-up are printed apart. Prints
   the cohort wall time, the sum of the single-slide times, their ratio (goal <= 1.10, and < 1 on
   small slides, where workers overlap one slide's reads and writes with another's inference), and
   the ratio with start-ups included. The order of the two alternates between repeats.
2. Per-task overhead. The engine puts ``batch_size`` distinct windows into one Dask task
   (``tile_groups``); on the cohort's warm cluster, the slide with the most tissue tiles is
   segmented at each ``--group-sizes`` value: ``run_tiles`` time (provenance ``timings_s.inference``)
   per tile and per task, and worker thread time per task spent neither reading nor in the model.
   Then no-op tasks on the same client: one round trip at a time, a pipelined stream, and a stream
   carrying the arguments our tasks carry (reader, level choice, tiles, tile tissue masks,
   settings); tasks per slide x that cost / slide time gives the scheduling share.
3. Peak memory of each worker process (pids from ``client.run``) and of this process, the driver
   (client, scheduler, nannies and slide-driver threads, as in ``wsi-espnet batch``): the kernel's
   high-water mark since the phase began (``VmHWM`` after ``clear_refs``), else psutil samples every
   50 ms; with the CPU seconds each used in the phase.
4. A simulated cohort (``--sim-slides``, default 1000) of 40k x 40k slides at 0.5 um/px. Simulated:
   the slides (metadata copied from a real SVS, elliptical tissue sections drawn at 32 um/px; no
   pixels exist or are read). Measured: the real ``plan_slide`` and ``tile_groups`` on them at the
   model's MPP (``--sim-tile-size``): task count, pickled bytes of a sample of real task argument
   tuples (extrapolated), and the RSS growth of a scheduler in its own process while it holds no-op
   tasks keyed and loaded like ours (then cancelled), extrapolated to every task at once and to what
   ``run_tiles`` holds (at most 2 x threads tasks per slide in flight, ``concurrent_slides`` slides).

Ratios are between measurements of this run. Slides come from ``$WSI_ESPNET_TEST_DATA/slides``
(default ``../shared/data``).

    python benchmarks/batch_overhead.py [--slides A.svs B.ndpi ...] [--workers 2] [--repeat 3] [--json out.json]
    python benchmarks/batch_overhead.py --quick     # smoke test: two slides, small tiles, one repeat
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
import halo_agreement as ha  # a sibling benchmark: where the shared data is

from wsi_espnet.batch import ClusterSpec, Cohort, CohortSlide, Pipeline, run_pipeline
from wsi_espnet.batch.clusters import open_client
from wsi_espnet.batch.pipeline import DEFAULT_CONCURRENT_SLIDES
from wsi_espnet.models import file_sha256, load_model
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.receptive_field import cached_halo_for
from wsi_espnet.models.registry import resolve_model_path
from wsi_espnet.segment_slide import SegmentOptions, segment_slide
from wsi_espnet.segmentation import InferenceSettings, SlidePlan, plan_slide, tile_groups
from wsi_espnet.segmentation.tile_inference import cached_model, label_tiles
from wsi_espnet.slides import LevelChoice, SlideReader, open_slide
from wsi_espnet.slides._backends import BackendMetadata  # only to build simulated slides
from wsi_espnet.tiling import Tile
from wsi_espnet.tissue_detection import TissueMask

DEFAULT_SLIDES = (
    "CMU-1-Small-Region.svs",
    "CMU-1-Small-Region-dicom",
    "test3-DAPI-2-387.ndpi",
    "tcga-cr-7395-01a-01-ts1.svs",
)
QUICK_SLIDES = ("CMU-1-Small-Region.svs", "test3-DAPI-2-387.ndpi")
# --quick: coarse grid, small tiles and halo, so each slide is a handful of small tasks.
QUICK_SETTINGS = {"target_mpp": 2.0, "tile_size": 256, "halo": 64, "group_sizes": [1, 4], "sim_hold": 40}
SIM_SIDE, SIM_MPP = 40_000, 0.5  # the simulated slides: level 0 pixels and micrometres per pixel
SIM_DOWNSAMPLES = (1.0, 4.0, 16.0, 32.0)  # an Aperio-like pyramid
SIM_TISSUE_MPP = 32.0
MIB = 2**20


# --- memory --------------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return None


def _reset_peak(pid: int) -> bool:
    """Reset the kernel's peak RSS (``VmHWM``) of ``pid`` to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PhaseMemory:
    """Peak RSS (MiB) and CPU seconds of named processes over a ``with`` block.

    The peak is ``VmHWM`` since the block began where it can be reset, else the largest of psutil
    samples taken every ``interval`` seconds (which can miss short spikes).
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.result: dict[str, dict[str, Any]] = {}
        self._sampled = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        processes = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        while not self._stop.is_set():
            for name, process in processes.items():
                with contextlib.suppress(psutil.Error):
                    self._sampled[name] = max(self._sampled[name], process.memory_info().rss)
            self._stop.wait(self.interval)

    def _cpu(self) -> dict[str, float]:
        seconds = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                seconds[name] = times.user + times.system
        return seconds

    def __enter__(self) -> PhaseMemory:
        self._reset = {name: _reset_peak(pid) for name, pid in self.pids.items()}
        self._cpu_before = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        cpu = self._cpu()
        for name, pid in self.pids.items():
            hwm = _status_kib(pid, "VmHWM") if self._reset[name] else None
            sampled = self._sampled[name] / MIB
            self.result[name] = {
                "peak_mib": max(sampled, hwm / 1024) if hwm is not None else sampled,
                "method": "VmHWM" if hwm is not None else "sampled",
                "cpu_s": cpu.get(name, float("nan")) - self._cpu_before.get(name, float("nan")),
            }


def process_pids(client: Client) -> dict[str, int]:
    """``driver`` (this process) and ``worker-i`` for each worker process of ``client``'s cluster."""
    pids: dict[str, int] = {"driver": os.getpid()}
    for i, (_, pid) in enumerate(sorted(client.run(os.getpid).items())):
        pids[f"worker-{i}"] = int(pid)
    return pids


def worker_peak(memory: dict[str, dict[str, Any]]) -> float:
    return max((m["peak_mib"] for n, m in memory.items() if n.startswith("worker")), default=float("nan"))


# --- clusters ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class ClusterTimes:
    start_s: float
    warm_s: float


def _warm_task(
    reader: SlideReader, choice: LevelChoice, tiles: list[Tile], tissue: list[Any], settings: InferenceSettings
) -> float:
    """Load the model into this worker's cache and run it once, as a real task would."""
    start = time.perf_counter()
    model, config = cached_model(settings)
    label_tiles(reader, choice, tiles, tissue, model, config, settings)
    return time.perf_counter() - start


@contextlib.contextmanager
def warm_cluster(workers: int, plan: SlidePlan, settings: InferenceSettings) -> Iterator[tuple[Client, ClusterTimes]]:
    """A LocalCluster of worker processes as ``wsi-espnet batch`` starts it, each worker warmed on ``plan``."""
    start = time.perf_counter()
    with open_client(ClusterSpec("local", {"workers": workers, "threads_per_worker": 1})) as client:
        client.wait_for_workers(workers)
        start_s = time.perf_counter() - start
        start = time.perf_counter()
        tile = (plan.tissue_tiles or plan.tiles.tiles)[0]
        futures = [
            client.submit(
                _warm_task, plan.reader, plan.choice, [tile], plan.tissue_masks([tile]), settings,
                workers=[address], allow_other_workers=False, pure=False,
            )
            for address in client.nthreads()
        ]  # fmt: skip
        client.gather(futures)
        yield client, ClusterTimes(start_s, time.perf_counter() - start)


# --- section 1: the cohort against single slides ----------------------------------------------------


def time_batch(pipeline: Pipeline, client: Client) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="batch-overhead-") as out, PhaseMemory(process_pids(client)) as memory:
        start = time.perf_counter()
        report = run_pipeline(pipeline.replace(out_dir=Path(out)), client=client)
        wall = time.perf_counter() - start
    failed = [(o.slide.path.name, o.status, o.reason) for o in report.outcomes if o.status != "ok"]
    if failed:
        raise SystemExit(f"the batch did not segment every slide: {failed}")
    seconds = {o.slide.path.name: o.seconds for o in report.outcomes}
    return {"wall_s": wall, "slide_s": seconds, "memory": memory.result}


def time_single(pipeline: Pipeline, slide: CohortSlide, model: str, client: Client) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="batch-overhead-") as out, PhaseMemory(process_pids(client)) as memory:
        options = dataclasses.replace(pipeline.slide_options(slide), out_dir=Path(out))
        start = time.perf_counter()
        segment_slide(slide.path, model, options, client=client)
        wall = time.perf_counter() - start
    return {"wall_s": wall, "memory": memory.result}


# --- section 2: tile-group size and task round trips --------------------------------------------------


def group_size_run(
    pipeline: Pipeline, slide: CohortSlide, plan: SlidePlan, model: str, client: Client, batch_size: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="batch-overhead-") as out, PhaseMemory(process_pids(client)) as memory:
        options = dataclasses.replace(pipeline.slide_options(slide), out_dir=Path(out), batch_size=batch_size)
        provenance = segment_slide(slide.path, model, options, client=client).provenance
    tasks, tiles = len(tile_groups(plan.tissue_tiles, batch_size)), len(plan.tissue_tiles)
    inference = provenance["timings_s"]["inference"]
    model_s, read_s = provenance["execution"]["model_forward_s"], provenance["execution"]["read_s"]
    threads = sum(client.nthreads().values())
    return {
        "batch_size": batch_size, "tasks": tasks, "tiles": tiles, "windows": provenance["tiling"]["windows_run"],
        "inference_s": inference, "model_s": model_s, "read_s": read_s,
        "per_tile_s": inference / tiles, "per_task_s": inference / tasks,
        "other_per_task_s": (inference * threads - model_s - read_s) / tasks,
        "worker_peak_mib": worker_peak(memory.result),
    }  # fmt: skip


def _noop(*args: Any) -> int:
    return len(args)


def task_arguments(plan: SlidePlan, settings: InferenceSettings, batch_size: int) -> list[tuple[Any, ...]]:
    """The argument tuples ``run_tiles`` submits for ``plan`` (store path and weights as a real run has them)."""
    return [
        (plan.reader, plan.choice, group, plan.tissue_windows(group), settings, "/out/slide.mask.zarr", None)
        for group in tile_groups(plan.tissue_tiles or plan.tiles.tiles, batch_size)
    ]


def round_trips(client: Client, payloads: list[tuple[Any, ...]], count: int) -> dict[str, float]:
    """Seconds per no-op task: one at a time, pipelined, and pipelined with our tasks' arguments."""
    client.submit(_noop, pure=False).result()
    sequential = []
    for i in range(count):
        start = time.perf_counter()
        client.submit(_noop, i, pure=False).result()
        sequential.append(time.perf_counter() - start)
    start = time.perf_counter()
    client.gather([client.submit(_noop, i, pure=False) for i in range(count)])
    pipelined = (time.perf_counter() - start) / count
    start = time.perf_counter()
    client.gather([client.submit(_noop, *payloads[i % len(payloads)], pure=False) for i in range(count)])
    loaded = (time.perf_counter() - start) / count
    return {
        "sequential_s": statistics.median(sequential),
        "pipelined_s": pipelined,
        "pipelined_with_args_s": loaded,
        "args_bytes": statistics.mean(len(pickle.dumps(p, protocol=5)) for p in payloads),
    }


# --- section 4: a simulated cohort ---------------------------------------------------------------


def simulated_reader(index: int, template: SlideReader) -> SlideReader:
    """A 40k x 40k, 0.5 um/px slide that does not exist, with a real slide's metadata otherwise."""
    shapes = tuple((round(SIM_SIDE / d), round(SIM_SIDE / d)) for d in SIM_DOWNSAMPLES)
    metadata = BackendMetadata(
        level_shapes=shapes, level_downsamples=SIM_DOWNSAMPLES, mpp_xy=(SIM_MPP, SIM_MPP),
        objective_power=20.0, vendor=template.vendor, associated_images=template.associated_images,
        properties=dict(template.properties),
    )  # fmt: skip
    return SlideReader(Path(f"/simulated/slide-{index:04d}.svs"), template.backend, metadata)


def simulated_tissue(rng: np.random.Generator) -> TissueMask:
    """One to four elliptical tissue sections, 5-25% of the slide's side in radius, at 32 um/px."""
    side = round(SIM_SIDE * SIM_MPP / SIM_TISSUE_MPP)
    mask = np.zeros((side, side), dtype=bool)
    for _ in range(rng.integers(1, 5)):
        centre_r, centre_c = rng.uniform(0.2, 0.8, 2) * side
        radius_a, radius_b = rng.uniform(0.05, 0.25, 2) * side
        angle, reach = rng.uniform(0, np.pi), max(radius_a, radius_b)
        r0, r1 = max(int(centre_r - reach), 0), min(int(centre_r + reach) + 1, side)
        c0, c1 = max(int(centre_c - reach), 0), min(int(centre_c + reach) + 1, side)
        rows, cols = np.mgrid[r0:r1, c0:c1]
        u = (cols - centre_c) * np.cos(angle) + (rows - centre_r) * np.sin(angle)
        v = (rows - centre_r) * np.cos(angle) - (cols - centre_c) * np.sin(angle)
        mask[r0:r1, c0:c1] |= (u / radius_a) ** 2 + (v / radius_b) ** 2 <= 1
    return TissueMask(mask, SIM_TISSUE_MPP / SIM_MPP, SIM_TISSUE_MPP, 0.5, "saturation")


def simulate_cohort(
    slides: int, config: ModelConfig, settings: InferenceSettings, *, halo: int, tile_size: int, batch_size: int,
    template: SlideReader, keep: int,
) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:  # fmt: skip
    """Plan ``slides`` simulated slides; returns the figures and ``keep`` task argument tuples (sampled evenly)."""
    rng = np.random.default_rng(0)
    tasks, tissue_tiles, tiles, fractions = [], 0, 0, []
    sampled: list[tuple[Any, ...]] = []
    mask_seconds: list[float] = []
    every = max(1, slides // max(keep, 1))
    start = time.perf_counter()
    for index in range(slides):
        plan = plan_slide(
            simulated_reader(index, template), config, halo=halo, tile_size=tile_size, tissue=simulated_tissue(rng)
        )
        groups = tile_groups(plan.tissue_tiles, batch_size)
        tasks.append(len(groups))
        tissue_tiles, tiles = tissue_tiles + len(plan.tissue_tiles), tiles + len(plan.tiles)
        fractions.append(plan.tissue.fraction)
        if index % every == 0 and groups and len(sampled) < keep:
            for group in groups[: max(1, keep // slides)]:
                t0 = time.perf_counter()
                masks = plan.tissue_windows(group)
                mask_seconds.append(time.perf_counter() - t0)
                sampled.append((plan.reader, plan.choice, group, masks, settings, f"/out/{index}.mask.zarr", None))
        last = plan
    plan_s = time.perf_counter() - start - sum(mask_seconds)
    arg_bytes = [len(pickle.dumps(a, protocol=5)) for a in sampled]
    plan_bytes = len(pickle.dumps(last, protocol=5))
    figures: dict[str, Any] = {
        "slides": slides, "target_mpp": last.choice.target_mpp, "target_shape": last.choice.target_shape,
        "tile_size": tile_size, "halo": last.tiles.halo, "batch_size": batch_size,
        "tiles_per_slide": tiles / slides, "tissue_fraction_mean": float(np.mean(fractions)),
        "tasks": int(sum(tasks)), "tasks_per_slide_mean": float(np.mean(tasks)), "tasks_per_slide_max": max(tasks),
        "tissue_tiles": tissue_tiles, "plan_s_per_slide": plan_s / slides,
        "task_args_bytes_mean": float(np.mean(arg_bytes)), "task_args_sampled": len(arg_bytes),
        "tile_masks_s_per_task": float(np.mean(mask_seconds)), "plan_pickle_bytes": plan_bytes,
    }  # fmt: skip
    figures["all_task_args_bytes"] = figures["task_args_bytes_mean"] * figures["tasks"]
    return figures, sampled


def _sleep_task(*args: Any, seconds: float = 0.5) -> int:  # long enough that few finish while being counted
    time.sleep(seconds)
    return len(args)


def _held(keys: list[str], dask_scheduler: Any) -> int:
    return sum(key in dask_scheduler.tasks for key in keys)


@contextlib.contextmanager
def separate_scheduler(folder: Path) -> Iterator[tuple[Client, int]]:
    """A scheduler and one single-threaded worker, each in its own process; yields a client and the scheduler's pid."""
    file = folder / "scheduler.json"
    # This file's functions reach the scheduler by reference when it is imported rather than run.
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")) if p)
    quiet: dict[str, Any] = {
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "env": {**os.environ, "PYTHONPATH": path},
    }
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--scheduler-file", str(file)], **quiet,
    )  # fmt: skip
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not file.is_file() and time.monotonic() < deadline and scheduler.poll() is None:
            time.sleep(0.1)
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(file), "--nthreads", "1",
             "--nworkers", "1", "--memory-limit", "0", "--no-dashboard"], **quiet,
        )  # fmt: skip
        with Client(scheduler_file=str(file), timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
            yield client, scheduler.pid
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=20)


def scheduler_hold(payloads: list[tuple[Any, ...]], hold: int, keys_only: int) -> dict[str, Any]:
    """Scheduler RSS growth per held task: ``hold`` no-op tasks with our arguments, ``keys_only`` with none."""

    def rss(pid: int) -> int:
        time.sleep(0.5)  # let the scheduler finish handling what it received
        return int(psutil.Process(pid).memory_info().rss)

    def held(client: Client, pid: int, arguments: list[tuple[Any, ...]]) -> tuple[int, int]:
        before = rss(pid)
        keys = [f"segment_tile_group-{uuid.uuid4().hex}" for _ in arguments]
        futures = [client.submit(_sleep_task, *a, key=k, pure=False) for a, k in zip(arguments, keys, strict=True)]
        deadline = time.monotonic() + 120
        while client.run_on_scheduler(_held, keys) < len(keys) and time.monotonic() < deadline:
            time.sleep(0.1)
        during = rss(pid)
        client.cancel(futures)
        del futures
        return before, during

    with (
        tempfile.TemporaryDirectory(prefix="batch-overhead-scheduler-") as folder,
        separate_scheduler(Path(folder)) as (client, pid),
    ):
        # Unpickling our arguments imports wsi_espnet (and torch) into the scheduler: before the baseline.
        client.gather([client.submit(_sleep_task, *payloads[0], seconds=0.0, pure=False) for _ in range(2)])
        start_mib = rss(pid) / MIB
        before_keys, during_keys = held(client, pid, [(i,) for i in range(keys_only)])
        before_loaded, during_loaded = held(client, pid, [payloads[i % len(payloads)] for i in range(hold)])
        after_mib = rss(pid) / MIB
    return {
        "scheduler_start_mib": start_mib, "scheduler_after_cancel_mib": after_mib,
        "keys_only_tasks": keys_only, "keys_only_bytes_per_task": (during_keys - before_keys) / max(keys_only, 1),
        "loaded_tasks": hold, "loaded_bytes_per_task": (during_loaded - before_loaded) / max(hold, 1),
        "loaded_peak_mib": during_loaded / MIB,
    }  # fmt: skip


# --- main ----------------------------------------------------------------------------------------


def cohort_slides(names: Sequence[str], missing_mpp: float) -> tuple[CohortSlide, ...]:
    folder = ha.data_dir() / "slides"
    slides = []
    for name in names:
        path = Path(name) if Path(name).exists() else folder / name
        if not path.exists():
            raise SystemExit(f"slide {name!r} not found (looked in {folder}; set WSI_ESPNET_TEST_DATA)")
        with open_slide(path) as reader:
            mpp = None if reader.mpp is not None else missing_mpp
        slides.append(CohortSlide(path.absolute(), mpp))
    return tuple(slides)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", nargs="+", default=None, help="names under the data's slides/ folder, or paths")
    parser.add_argument("--model", default=None, help="packaged model name or checkpoint (default: the packaged one)")
    parser.add_argument("--target-mpp", type=float, default=None, help="default: the model's own")
    parser.add_argument("--tile-size", type=int, default=None, help="default: SegmentOptions' 1536")
    parser.add_argument("--halo", type=int, default=None, help="default: from the model's receptive field")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one thread each (default 2)")
    parser.add_argument("--concurrent-slides", type=int, default=DEFAULT_CONCURRENT_SLIDES)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of each timed run; medians are printed")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=None, help="batch sizes (default 1 2 4 8)")
    parser.add_argument("--round-trips", type=int, default=200, help="no-op tasks per round-trip measurement")
    parser.add_argument("--missing-mpp", type=float, default=0.5, help="um/px for slides without MPP (cohort-example)")
    parser.add_argument("--sim-slides", type=int, default=1000, help="slides of the simulated cohort")
    parser.add_argument("--sim-tile-size", type=int, default=SegmentOptions().tile_size)
    parser.add_argument("--sim-hold", type=int, default=None, help="loaded no-op tasks the scheduler holds (200)")
    parser.add_argument("--quick", action="store_true", help="smoke test: two slides, small tiles, 1 repeat")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK_SETTINGS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.repeat, args.round_trips, args.slides = 1, 40, args.slides or list(QUICK_SLIDES)
    args.group_sizes = args.group_sizes or [1, 2, 4, 8]
    args.sim_hold = args.sim_hold or 200
    defaults = SegmentOptions()

    model_file = resolve_model_path(args.model).absolute()
    model = str(model_file)
    module, config = load_model(model_file)
    halo_start = time.perf_counter()
    halo = args.halo if args.halo is not None else cached_halo_for(module, file_sha256(model_file))
    halo_note = "given" if args.halo is not None else f"found in {time.perf_counter() - halo_start:.1f} s, untimed"
    options = SegmentOptions(
        target_mpp=args.target_mpp, tile_size=args.tile_size or defaults.tile_size, halo=args.halo, device=args.device
    )
    cohort = Cohort("batch-overhead", "benchmark", cohort_slides(args.slides or DEFAULT_SLIDES, args.missing_mpp))
    pipeline = Pipeline(
        name="batch-overhead", cohort=cohort, out_dir=Path(tempfile.gettempdir()), options=options, model=model,
        cluster=ClusterSpec("local", {"workers": args.workers, "threads_per_worker": 1}),
        concurrent_slides=args.concurrent_slides,
    )  # fmt: skip
    settings = InferenceSettings(str(model_file.resolve()), file_sha256(model_file), args.device, options.precision)
    target_mpp = args.target_mpp or config.target_mpp
    plans = {
        s.path.name: plan_slide(
            open_slide(s.path, mpp=s.mpp), config, halo=halo, target_mpp=target_mpp, tile_size=options.tile_size
        )
        for s in cohort.slides
    }
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"device {args.device}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    print(f"# model {config.name} ({model_file.name}); target {target_mpp} um/px, tile {options.tile_size}, halo "
          f"{halo} ({halo_note}); {args.workers} worker processes x 1 thread, "
          f"{pipeline.concurrent_slides} slides at once; repeat {args.repeat}")  # fmt: skip
    for s in cohort.slides:
        p = plans[s.path.name]
        print(f"#   {s.path.name}: target grid {p.choice.target_shape[0]}x{p.choice.target_shape[1]}, tissue "
              f"{p.tissue.fraction:.0%}, {len(p.tissue_tiles)}/{len(p.tiles)} tiles"
              + (f", mpp {s.mpp} given" if s.mpp else ""))  # fmt: skip
    warm_plan = plans[cohort.slides[0].path.name]
    sweep_slide = max(cohort.slides, key=lambda s: len(plans[s.path.name].tissue_tiles))
    sweep_plan = plans[sweep_slide.path.name]

    # 1-3: the cohort, single slides, group sizes, round trips and memory.
    batches: list[dict[str, Any]] = []
    singles: list[list[dict[str, Any]]] = []
    sweeps: dict[int, list[dict[str, Any]]] = {b: [] for b in args.group_sizes}
    trips: dict[str, float] = {}
    for repeat in range(args.repeat):
        for phase in ("batch", "singles") if repeat % 2 == 0 else ("singles", "batch"):
            if phase == "batch":
                print(f"# repeat {repeat + 1}: cohort through run_pipeline ...", file=sys.stderr)
                with warm_cluster(args.workers, warm_plan, settings) as (client, times):
                    record = time_batch(pipeline, client)
                    record.update(start_s=times.start_s, warm_s=times.warm_s)
                    batches.append(record)
                    if repeat == 0:
                        print("# tile-group sizes and round trips ...", file=sys.stderr)
                        for _ in range(args.repeat):
                            for size in args.group_sizes:
                                sweeps[size].append(
                                    group_size_run(pipeline, sweep_slide, sweep_plan, model, client, size)
                                )
                        trips = round_trips(client, task_arguments(sweep_plan, settings, 1), args.round_trips)
            else:
                print(f"# repeat {repeat + 1}: one segment_slide per slide ...", file=sys.stderr)
                runs = []
                for slide in cohort.slides:
                    with warm_cluster(args.workers, plans[slide.path.name], settings) as (client, times):
                        record = time_single(pipeline, slide, model, client)
                        record.update(slide=slide.path.name, start_s=times.start_s, warm_s=times.warm_s)
                        runs.append(record)
                singles.append(runs)

    # 4: the simulated cohort.
    print(f"# planning a simulated cohort of {args.sim_slides} slides ...", file=sys.stderr)
    simulated, sampled = simulate_cohort(
        args.sim_slides, config, settings, halo=halo, tile_size=args.sim_tile_size, batch_size=options.batch_size,
        template=open_slide(cohort.slides[0].path), keep=min(args.sim_hold, 50),
    )  # fmt: skip
    print("# a separate scheduler holding no-op tasks ...", file=sys.stderr)
    hold = scheduler_hold(sampled, args.sim_hold, keys_only=10 * args.sim_hold)

    # --- report -----------------------------------------------------------------------------------
    batch_wall = median([b["wall_s"] for b in batches])
    single_sum = median([sum(r["wall_s"] for r in runs) for runs in singles])
    batch_start = median([b["start_s"] + b["warm_s"] for b in batches])
    single_start = median([sum(r["start_s"] + r["warm_s"] for r in runs) for runs in singles])
    print("\n## 1. cohort (run_pipeline) against single slides (segment_slide), warm clusters, medians")
    print(f"{'slide':<30} {'single s':>9} {'in batch s':>10} {'start s':>8} {'warm s':>7}")
    for i, slide in enumerate(cohort.slides):
        name = slide.path.name
        print(f"{name:<30} {median([runs[i]['wall_s'] for runs in singles]):>9.2f} "
              f"{median([b['slide_s'][name] for b in batches]):>10.2f} "
              f"{median([runs[i]['start_s'] for runs in singles]):>8.2f} "
              f"{median([runs[i]['warm_s'] for runs in singles]):>7.2f}")  # fmt: skip
    print(f"cohort wall {batch_wall:.2f} s, sum of singles {single_sum:.2f} s: batch/sum {batch_wall / single_sum:.3f} "
          f"(goal <= 1.10; < 1 when slides are small)")  # fmt: skip
    print(f"cluster start-up + warm-up: batch {median([b['start_s'] for b in batches]):.2f} + "
          f"{median([b['warm_s'] for b in batches]):.2f} s once; singles {single_start:.2f} s in all; including "
          f"them: batch/sum {(batch_wall + batch_start) / (single_sum + single_start):.3f}")  # fmt: skip

    print(f"\n## 2. tile-group size on {sweep_slide.path.name} ({len(sweep_plan.tissue_tiles)} tissue tiles), "
          f"warm cluster; run_tiles time, medians")  # fmt: skip
    print(f"{'batch_size':>10} {'tasks':>6} {'windows':>7} {'run_tiles s':>11} {'s/tile':>7} {'s/task':>7} "
          f"{'other s/task':>12} {'vs 1st':>7} {'worker MiB':>10}")  # fmt: skip
    base = median([r["per_tile_s"] for r in sweeps[args.group_sizes[0]]])
    sweep_rows = []
    for size in args.group_sizes:
        rows = sweeps[size]
        row = {k: median([r[k] for r in rows]) for k in rows[0]}
        sweep_rows.append(row)
        print(f"{size:>10} {row['tasks']:>6.0f} {row['windows']:>7.0f} {row['inference_s']:>11.2f} "
              f"{row['per_tile_s']:>7.3f} {row['per_task_s']:>7.3f} {row['other_per_task_s']:>12.3f} "
              f"{row['per_tile_s'] / base:>6.2f}x {row['worker_peak_mib']:>10.0f}")  # fmt: skip
    print("# other s/task: worker thread time per task outside reading and the model (writes, scheduling, idle)")
    first = sweep_rows[0]
    share = first["tasks"] * trips["pipelined_with_args_s"] / first["inference_s"]
    print(f"no-op task: {trips['sequential_s'] * 1e3:.1f} ms one at a time, {trips['pipelined_s'] * 1e3:.1f} ms "
          f"pipelined, {trips['pipelined_with_args_s'] * 1e3:.1f} ms pipelined with our arguments "
          f"({trips['args_bytes'] / 1024:.0f} KiB pickled); x {first['tasks']:.0f} tasks = {share:.1%} of the slide's "
          f"run_tiles time at batch_size {args.group_sizes[0]}")  # fmt: skip

    print("\n## 3. peak RSS MiB (and CPU s) per process, per phase; max over repeats")
    names = sorted({n for b in batches for n in b["memory"]})
    print(f"{'phase':<28} " + " ".join(f"{n:>16}" for n in names))

    def memory_row(label: str, records: list[dict[str, dict[str, Any]]]) -> None:
        cells = []
        for n in names:
            peaks = [r[n]["peak_mib"] for r in records if n in r]
            cpu = [r[n]["cpu_s"] for r in records if n in r]
            cells.append(f"{max(peaks):>8.0f} ({max(cpu):>5.1f})" if peaks else f"{'-':>16}")
        print(f"{label:<28} " + " ".join(cells))

    memory_row("cohort (run_pipeline)", [b["memory"] for b in batches])
    memory_row("single slides (each)", [r["memory"] for runs in singles for r in runs])
    methods = {m["method"] for b in batches for m in b["memory"].values()}
    print(f"# peak by {'/'.join(sorted(methods))}; driver = this process: client, scheduler, nannies, slide drivers")

    sim, sched = simulated, hold
    in_flight = max(2, 2 * args.workers) * pipeline.concurrent_slides
    print(f"\n## 4. simulated cohort: {sim['slides']} slides of {SIM_SIDE}x{SIM_SIDE} px at {SIM_MPP} um/px "
          f"(synthetic; no pixels read), planned with plan_slide at {sim['target_mpp']} um/px, "
          f"tile {sim['tile_size']}, halo {sim['halo']}, batch_size {sim['batch_size']}")  # fmt: skip
    print(f"target grid {sim['target_shape'][0]}x{sim['target_shape'][1]}, {sim['tiles_per_slide']:.0f} "
          f"tiles/slide, tissue {sim['tissue_fraction_mean']:.0%} on average; tasks {sim['tasks']} "
          f"({sim['tasks_per_slide_mean']:.1f} per slide, at most {sim['tasks_per_slide_max']}); planning "
          f"{sim['plan_s_per_slide'] * 1e3:.1f} ms/slide (without tissue detection)")  # fmt: skip
    print(f"task arguments: {sim['task_args_bytes_mean'] / MIB:.2f} MiB pickled per task (mean of "
          f"{sim['task_args_sampled']}; mostly the tile's tissue mask, computed in the driver in "
          f"{sim['tile_masks_s_per_task'] * 1e3:.0f} ms); all {sim['tasks']} tasks: "
          f"{sim['all_task_args_bytes'] / 2**30:.1f} GiB; one slide's plan {sim['plan_pickle_bytes'] / MIB:.1f} MiB "
          f"pickled")  # fmt: skip
    all_at_once = sim["tasks"] * sched["loaded_bytes_per_task"]
    print(f"separate scheduler (measured): {sched['keys_only_bytes_per_task'] / 1024:.1f} KiB per held key-only "
          f"task ({sched['keys_only_tasks']}), {sched['loaded_bytes_per_task'] / MIB:.2f} MiB per held task with "
          f"our arguments ({sched['loaded_tasks']}); RSS {sched['scheduler_start_mib']:.0f} MiB at start, "
          f"{sched['loaded_peak_mib']:.0f} MiB holding them, {sched['scheduler_after_cancel_mib']:.0f} MiB after "
          f"cancelling")  # fmt: skip
    print(f"extrapolated: every task at once {all_at_once / 2**30:.1f} GiB on the scheduler; run_tiles holds at most "
          f"{in_flight} ({pipeline.concurrent_slides} slides x {max(2, 2 * args.workers)}) = "
          f"{in_flight * sched['loaded_bytes_per_task'] / MIB:.0f} MiB, whatever the cohort size; "
          f"driver-side tissue masks for the cohort: {sim['tasks'] * sim['tile_masks_s_per_task'] / 60:.1f} CPU "
          f"minutes")  # fmt: skip

    print("\n## summary")
    summary = [
        ("cohort wall s (run_pipeline)", f"{batch_wall:.2f}"),
        ("sum of single-slide s", f"{single_sum:.2f}"),
        ("batch / sum (goal <= 1.10)", f"{batch_wall / single_sum:.3f}"),
        ("cluster start-up s (batch, once)", f"{median([b['start_s'] for b in batches]):.2f}"),
        ("worker warm-up s (batch, once)", f"{median([b['warm_s'] for b in batches]):.2f}"),
        (f"s/tile at batch_size {args.group_sizes[0]} / {args.group_sizes[-1]}",
         f"{sweep_rows[0]['per_tile_s']:.3f} / {sweep_rows[-1]['per_tile_s']:.3f}"),
        ("no-op task round trip ms (pipelined, our args)", f"{trips['pipelined_with_args_s'] * 1e3:.1f}"),
        ("peak worker RSS MiB (cohort)", f"{max(worker_peak(b['memory']) for b in batches):.0f}"),
        ("peak driver RSS MiB (cohort)", f"{max(b['memory']['driver']['peak_mib'] for b in batches):.0f}"),
        (f"simulated {sim['slides']}-slide cohort: tasks", f"{sim['tasks']}"),
        ("  scheduler if all at once / as run_tiles holds", f"{all_at_once / 2**30:.1f} GiB / "
         f"{in_flight * sched['loaded_bytes_per_task'] / MIB:.0f} MiB"),
    ]  # fmt: skip
    for label, value in summary:
        print(f"{label:<48} {value:>20}")
    if args.json:
        figures = {
            "settings": {**{k: str(v) for k, v in vars(args).items()}, "halo": halo, "target_mpp": target_mpp},
            "batch": batches, "singles": singles, "group_sizes": sweep_rows, "round_trips": trips,
            "simulated": simulated, "scheduler_hold": hold,
        }  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    logging.getLogger("distributed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="hamamatsu-format metadata parsing")  # tiffslide, once per NDPI
    sys.exit(main())
