"""End-to-end ``segment_slide`` speed and memory, against model-only time and MONAI's sliding window.

1. For ``CMU-1-Small-Region.svs`` and a generated slide (``--size``, default 10000 px square of real
   tissue, see ``make_large_slide.py``; ``--large 40000`` adds a second, larger one), runs
   ``segment_slide`` end to end (formats ome-zarr + ome-tiff + provenance, default tile size and
   halo) in a fresh subprocess each, and prints: wall time of the call, megapixels per second of
   the target grid, tissue fraction, tiles, the model forward time summed in the provenance, an
   independent model-only time (in a second fresh subprocess, on a worker thread as in the
   pipeline: the cached model on as many windows of the same shapes as the plan's tissue tiles,
   same batching, through ``infer_windows``; windows are read untimed), the ratio wall /
   model-only (goal <= 1.2), and the subprocess's peak RSS (``VmHWM``; see ``peak_rss_kib`` for
   why not ``ru_maxrss``). Window pixels per tile pixel shows the halo's extra compute.
2. MONAI peer comparison on CMU at native resolution (fits in memory): our tiled inference (the
   pipeline's plan, reads, ``infer_windows`` and crops, on every tile), MONAI
   ``sliding_window_inference`` (same model, roi = our window, overlap = our halo, constant and
   gaussian blending) on the normalised image tensor, and MONAI ``PatchInferer`` with
   ``WSISlidingWindowSplitter`` (OpenSlide) + ``ZarrAvgMerger``; each one's time against ours, and
   its label agreement with whole-image inference (``predict``) over all and over tissue pixels.

All ratios are between measurements of this run. Slides come from ``$WSI_ESPNET_TEST_DATA``
(default ``../shared/data``); generated slides are cached in ``~/.cache/wsi-espnet/benchmarks``.

    python benchmarks/segment_speed.py [--size 10000] [--large 40000] [--skip-monai] [--json out.json]
    python benchmarks/segment_speed.py --large 40000 --model-only-max 40   # 40k: sample the model-only pass
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import halo_agreement as ha  # a sibling benchmark: model conversion, tiled inference, agreement
import make_large_slide

from wsi_espnet.geometry import Region
from wsi_espnet.inference.predict import preprocess
from wsi_espnet.models import file_sha256, load_model
from wsi_espnet.models.config import Preprocessing
from wsi_espnet.models.receptive_field import cached_halo_for
from wsi_espnet.segment_slide import SegmentOptions, segment_slide
from wsi_espnet.segmentation.tile_inference import InferenceSettings, cached_model, infer_windows
from wsi_espnet.slides import choose_level, open_slide, read_target_region
from wsi_espnet.tiling import Tile, plan_tiles
from wsi_espnet.tissue_detection import detect_tissue

FORMATS = frozenset({"ome-zarr", "ome-tiff", "provenance"})


# --- the segmentation subprocess -----------------------------------------------------------------


def peak_rss_kib() -> int:
    """This process's own peak RSS (``VmHWM``), in KiB.

    Not ``ru_maxrss``: Linux carries a parent's peak over fork and exec into the child's ``ru_maxrss``
    (and so into ``RUSAGE_CHILDREN`` and ``wait4``), so a child forked from this script, which holds
    the model and windows, would report at least the script's own peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource  # not Linux: the best there is

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def child(mode: str, slide: str, model: str, work: str, device: str, limit: str) -> int:
    """Run inside a fresh interpreter; writes its result as JSON to ``work/<mode>.json``.

    ``segment``: one ``segment_slide`` call (outputs under ``work``), its wall time, peak RSS and provenance.
    ``model-only``: :func:`model_only_seconds` on the tissue windows of the provenance in ``work/segment.json``.
    """
    folder = Path(work)
    if mode == "model-only":
        provenance = json.loads((folder / "segment.json").read_text())["provenance"]
        settings = ha.pipeline_settings(Path(model), device)
        record = model_only_seconds(Path(slide), provenance, settings, int(limit) if limit != "all" else None)
    else:
        rss_before = peak_rss_kib()
        start = time.perf_counter()
        outcome = segment_slide(
            slide, model, SegmentOptions(out_dir=folder, formats=FORMATS, device=device),
            log=lambda message: print(message, file=sys.stderr),
        )  # fmt: skip
        wall = time.perf_counter() - start
        record = {"wall_s": wall, "rss_before_kib": rss_before, "peak_rss_kib": peak_rss_kib()}
        record["provenance"] = outcome.provenance
    (folder / f"{mode}.json").write_text(json.dumps(record, default=str))
    return 0


def run_child(
    mode: str, slide: Path, model: Path, work: Path, device: str, limit: int | None, env: dict[str, str]
) -> dict[str, Any]:
    """:func:`child` in a fresh subprocess; adds its process wall time and ``wait4``'s ``ru_maxrss``."""
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        str(slide),
        str(model),
        str(work),
        device,
        str(limit or "all"),
    ]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, **env})
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process_wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{mode} failed on {slide} (exit {process.returncode}); see its output above")
    record: dict[str, Any] = json.loads((work / f"{mode}.json").read_text())
    record[f"{mode}_process_wall_s"] = process_wall
    record[f"{mode}_load_before"] = load
    record[f"{mode}_wait4_maxrss_kib"] = usage.ru_maxrss  # includes this script's peak at fork, see peak_rss_kib
    return record


# --- model-only time on the plan's tissue windows ---------------------------------------------------


def tissue_tiles(slide: Path, provenance: dict[str, Any]) -> tuple[list[Tile], Any, Any]:
    """The plan's tissue tiles, recomputed as ``segment_slide`` computes them (checked against its count)."""
    reader = open_slide(slide)
    choice = choose_level(reader, provenance["resolution"]["target_mpp"])
    tiling = provenance["tiling"]
    plan = plan_tiles(choice.target_shape, tile_size=tiling["tile_size"], halo=tiling["halo"])
    tissue = detect_tissue(reader, mpp=choice.slide_mpp)
    tiles = [t for t in plan if tissue.region_fraction(choice.to_level0(t.region)) > 0]
    if len(tiles) != tiling["tiles_with_tissue"]:
        print(f"# warning: {len(tiles)} tissue tiles recomputed, provenance says {tiling['tiles_with_tissue']}")
    return tiles, reader, choice


def model_only_seconds(
    slide: Path, provenance: dict[str, Any], settings: InferenceSettings, limit: int | None
) -> dict[str, Any]:
    """``infer_windows`` time on the plan's tissue windows, batched as the pipeline batches them.

    Windows are read from the slide (untimed) one batch at a time. With ``limit``, only the first
    ``limit`` batches are timed and the total is extrapolated.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="model-only") as pool:
        # A worker thread, as in the pipeline (a Dask worker thread runs the model): on CPU, torch's speed
        # differs between the main thread and other threads.
        return pool.submit(_model_only, slide, provenance, settings, limit).result()


def _model_only(
    slide: Path, provenance: dict[str, Any], settings: InferenceSettings, limit: int | None
) -> dict[str, Any]:
    tiles, reader, choice = tissue_tiles(slide, provenance)
    model, config = cached_model(settings)
    ha.warm_up(model, config, settings)
    batch = provenance["tiling"]["batch_size"]
    groups = [tiles[i : i + batch] for i in range(0, len(tiles), batch)]
    timed = groups if limit is None else groups[:limit]
    seconds = user = system = 0.0
    for group in timed:
        windows = [read_target_region(reader, choice, t.window) for t in group]
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        infer_windows(model, config, windows, settings)
        ha.sync(settings.device)
        seconds += time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        user, system = user + after.ru_utime - before.ru_utime, system + after.ru_stime - before.ru_stime
    extrapolated = len(timed) < len(groups)
    if extrapolated and timed:
        seconds *= len(groups) / len(timed)
        user, system = user * len(groups) / len(timed), system * len(groups) / len(timed)
    return {
        "model_only_s": seconds, "model_only_windows": len(tiles), "model_only_extrapolated": extrapolated,
        "model_only_user_s": user, "model_only_sys_s": system,
        "window_px": sum(t.window_height * t.window_width for t in tiles),
        "tile_px": sum(t.height * t.width for t in tiles),
    }  # fmt: skip


# --- MONAI comparison --------------------------------------------------------------------------------


def normalise_nchw(x: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB 0-255 -> the model's input, as :func:`preprocess` does for one HWC image."""
    x = x.float()
    if preprocessing.channel_order == "BGR":
        x = x.flip(1)
    mean = torch.tensor(preprocessing.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std / preprocessing.scale_divisor


def monai_comparison(slide: Path, model_path: Path, settings: InferenceSettings, tile_size: int, halo: int) -> None:
    from monai.inferers.inferer import PatchInferer
    from monai.inferers.merger import ZarrAvgMerger
    from monai.inferers.splitter import WSISlidingWindowSplitter
    from monai.inferers.utils import sliding_window_inference

    reader = open_slide(slide)
    choice = choose_level(reader, 0.5)
    region = ha.Region(0, 0, *choice.target_shape)
    model, config = cached_model(settings)
    ha.warm_up(model, config, settings)
    device = settings.device
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=device.startswith("cuda"))

    def network(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast:  # MONAI updates its buffers in place: no inference tensors
            logits: torch.Tensor = model(x.to(device).contiguous(memory_format=torch.channels_last))
            return logits.float()

    _, reference, whole_s = ha.whole_image_labels(reader, choice, region, model, device)
    tissue = ha.tissue_on_region(reader, choice, region)
    ours = ha.tiled_labels(reader, choice, region, model, config, settings, tile_size=tile_size, halo=halo)
    first = plan_tiles(choice.target_shape, tile_size=tile_size, halo=halo).tiles[0]
    roi = (first.window_height, first.window_width)
    overlap_px = tuple(max(0, r - tile_size) for r in roi)
    # MONAI's interval is int(roi * (1 - overlap)); half a pixel less overlap makes it exactly the tile size.
    overlap = tuple(max(0.0, (r - tile_size - 0.5) / r) for r in roi)
    rows: list[tuple[str, float, Any]] = [("whole-image predict (reference)", whole_s, reference)]
    rows.append((f"ours: plan_tiles+infer_windows ({ours.windows} windows)", ours.seconds, ours.labels))
    for mode in ("constant", "gaussian"):
        start = time.perf_counter()
        pixels = read_target_region(reader, choice, Region(0, 0, *choice.target_shape))
        inputs = preprocess(pixels, config.preprocessing).to(device)
        logits = sliding_window_inference(inputs, roi, 1, network, overlap=overlap, mode=mode)
        labels = torch.as_tensor(logits).argmax(1)[0].to(torch.uint8).cpu().numpy()
        ha.sync(device)
        rows.append((f"MONAI sliding_window_inference {mode}", time.perf_counter() - start, labels))
        del logits
    note = ""
    if choice.level == 0 and not choice.resample:
        try:
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                splitter = WSISlidingWindowSplitter(patch_size=roi, overlap=overlap_px, reader="OpenSlide", level=0)  # type: ignore[arg-type]
                inferer = PatchInferer(
                    splitter=splitter, merger_cls=ZarrAvgMerger, batch_size=1,
                    preprocessing=lambda x: normalise_nchw(x, config.preprocessing),
                    store=str(Path(tmp) / "merged.zarr"),
                )  # fmt: skip
                merged = inferer(str(slide), network)  # type: ignore[arg-type]  # a path, as the splitter wants
                labels = np.asarray(merged[0]).argmax(0).astype(np.uint8)
                rows.append(
                    ("MONAI PatchInferer+WSISlidingWindowSplitter+ZarrAvgMerger", time.perf_counter() - start, labels)
                )
        except Exception as exc:  # MONAI's WSI path depends on optional readers; report, don't die
            note = f"# MONAI PatchInferer failed: {exc!r}"
    else:
        note = "# MONAI PatchInferer skipped: the slide needs resampling to 0.5 um/px, which the splitter cannot do"

    print(f"# MONAI comparison on {slide.name}, {region.height}x{region.width} at {choice.target_mpp} um/px "
          f"(tissue {tissue.mean():.1%}); roi {roi[0]}x{roi[1]}, overlap {overlap_px} px = our halo {halo}, "
          f"tile {tile_size}; times include reading the slide")  # fmt: skip
    print(f"{'method':<58} {'s':>7} {'ours/this':>9} {'agree all':>10} {'agree tissue':>12}")
    for name, seconds, labels in rows:
        print(f"{name:<58} {seconds:>7.2f} {ours.seconds / seconds:>8.2f}x {ha.agreement(labels, reference):>10.6f} "
              f"{ha.agreement(labels, reference, tissue):>12.6f}")  # fmt: skip
    if note:
        print(note)
    print("# MONAI pads past the image edge (sliding window: zeros of the normalised image; PatchInferer: black "
          "RGB); ours shifts edge windows inward onto real pixels")  # fmt: skip


# --- main ------------------------------------------------------------------------------------------


def warm_halo_cache(model_path: Path) -> tuple[int, float]:
    """Compute (or find) the default halo the way ``segment_slide`` does, so no timed run pays for it."""
    start = time.perf_counter()
    halo = cached_halo_for(load_model(model_path)[0], file_sha256(model_path))
    return halo, time.perf_counter() - start


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:8])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10000, help="side of the generated slide (default 10000)")
    parser.add_argument("--large", type=int, default=None, help="also run a generated slide of this side, e.g. 40000")
    parser.add_argument("--skip-cmu", action="store_true", help="leave out CMU-1-Small-Region.svs (and MONAI)")
    parser.add_argument("--skip-monai", action="store_true", help="leave out the MONAI comparison")
    parser.add_argument(
        "--model-only-max", type=int, default=None,
        help="time at most this many model calls per slide and extrapolate (default: all; useful for --large)",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--omp-passive", action="store_true",
        help="run both subprocesses with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning; "
        "on a busy CPU spinning can slow the model 1.5-2x, see the model-only cpu user time)",
    )  # fmt: skip
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="environment for this run and its subprocesses, e.g. GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "
        "(transparent huge pages for torch's large buffers: far fewer page faults); repeatable",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if any("=" not in item for item in args.env):
        parser.error("--env takes KEY=VALUE")

    cmu = ha.data_dir() / "slides" / "CMU-1-Small-Region.svs"
    if not cmu.is_file():
        print(f"{cmu} not found; set WSI_ESPNET_TEST_DATA", file=sys.stderr)
        return 2
    slides: list[tuple[str, Path]] = [] if args.skip_cmu else [("CMU-1-Small-Region", cmu)]
    for size in [args.size] + ([args.large] if args.large else []):
        slides.append((f"generated {size}", make_large_slide.ensure_slide(size)))

    env = dict(item.split("=", 1) for item in args.env)
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if any(os.environ.get(k) != v for k, v in env.items()):  # OpenMP and glibc read these at start-up
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    precision = "fp16" if args.device.startswith("cuda") else "fp32"
    omp = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.device} {precision}, OMP_WAIT_POLICY {omp}, GLIBC_TUNABLES "
          f"{os.environ.get('GLIBC_TUNABLES', '-')}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="segment-speed-") as tmp:
        model_path = ha.convert_model(Path(tmp))
        settings = ha.pipeline_settings(model_path, args.device)
        halo, halo_s = warm_halo_cache(model_path)
        print(f"# model: original ESPNet p2 q8 Cityscapes checkpoint, target 0.5 um/px; default halo {halo} "
              f"(found or computed in {halo_s:.1f} s, before any timed run)")  # fmt: skip
        for name, slide in slides:
            out_dir = Path(tmp) / f"out-{len(results)}"
            out_dir.mkdir()
            print(f"# segmenting {name} ({slide}) ...", file=sys.stderr)
            record = run_child("segment", slide, model_path, out_dir, args.device, None, env)
            print(f"# model-only pass on {name} ...", file=sys.stderr)
            record.update(run_child("model-only", slide, model_path, out_dir, args.device, args.model_only_max, env))
            record.update(name=name, slide=str(slide))
            results.append(record)
            shutil.rmtree(out_dir, ignore_errors=True)

        print(f"{'slide':<20} {'target grid':>13} {'tissue':>6} {'tiles':>7} {'win/tile':>8} {'wall s':>8} "
              f"{'MP/s':>6} {'fwd s':>8} {'model s':>8} {'wall/model':>10} {'fwd/model':>9} "
              f"{'RSS MiB':>8}")  # fmt: skip
        for r in results:
            p = r["provenance"]
            h, w = p["resolution"]["mask_shape"]
            tiling = p["tiling"]
            tiles = f"{tiling['tiles_with_tissue']}/{tiling['tiles_total']}"
            r["megapixels_per_s"] = h * w / 1e6 / r["wall_s"]
            r["wall_over_model_only"] = r["wall_s"] / r["model_only_s"] if r["model_only_s"] else float("nan")
            forward = p["execution"]["model_forward_s"]
            star = "*" if r["model_only_extrapolated"] else " "
            print(f"{r['name']:<20} {f'{h}x{w}':>13} {p['tissue']['fraction']:>6.1%} "
                  f"{tiles:>7} {r['window_px'] / max(r['tile_px'], 1):>8.2f} {r['wall_s']:>8.1f} "
                  f"{r['megapixels_per_s']:>6.2f} {forward:>8.1f} {r['model_only_s']:>7.1f}{star} "
                  f"{r['wall_over_model_only']:>10.2f} {forward / r['model_only_s']:>9.2f} "
                  f"{r['peak_rss_kib'] / 1024:>8.0f}")  # fmt: skip
        print("# wall: the segment_slide call; fwd: model forward summed in its provenance; model: this script's "
              "model-only pass (* extrapolated); win/tile: window px per tissue-tile px (the halo's extra "
              "compute); RSS: the subprocess's peak")  # fmt: skip
        for r in results:
            t = r["provenance"]["timings_s"]
            other = r["wall_s"] - sum(t.get(k, 0.0) for k in ("tissue_detection", "inference", "pyramid", "outputs"))
            print(f"#   {r['name']}: timings_s " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) +
                  f" (outside those: {other:.1f}); read_s {r['provenance']['execution']['read_s']:.1f}; process "
                  f"{r['segment_process_wall_s']:.1f} s; model-only cpu user {r['model_only_user_s']:.1f} s + sys "
                  f"{r['model_only_sys_s']:.1f} s; RSS after imports {r['rss_before_kib'] / 1024:.0f} MiB, "
                  f"wait4 maxrss {r['segment_wait4_maxrss_kib'] / 1024:.0f} MiB; load average before segment / "
                  f"model-only {r['segment_load_before']:.1f} / {r['model-only_load_before']:.1f}")  # fmt: skip
        if len(results) >= 2:
            a, b = results[-2], results[-1]
            print(f"# peak RSS {a['name']} vs {b['name']}: {a['peak_rss_kib'] / 1024:.0f} MiB vs "
                  f"{b['peak_rss_kib'] / 1024:.0f} MiB ({b['peak_rss_kib'] / a['peak_rss_kib']:.2f}x for "
                  f"{_pixels(b) / _pixels(a):.1f}x the pixels)")  # fmt: skip

        if not args.skip_monai and not args.skip_cmu:
            cmu_halo = results[0]["provenance"]["tiling"]["halo"]
            tile_size = results[0]["provenance"]["tiling"]["tile_size"]
            monai_comparison(cmu, model_path, settings, tile_size, cmu_halo)
            print(f"# segment_slide end to end on CMU (table above): {results[0]['wall_s']:.2f} s")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def _pixels(record: dict[str, Any]) -> int:
    h, w = record["provenance"]["resolution"]["mask_shape"]
    return int(h) * int(w)


if __name__ == "__main__":
    sys.exit(main())
