"""How fast and how lean the napari plugin shows a gigapixel slide and its mask.

Measured, each in a fresh Python process so that one cannot warm the next:

1. **Baseline**: napari's own cost: a shown viewer drawing its first (empty) frame.
2. **Open**: the same, plus ``viewer.open(slide, plugin="wsi-espnet")`` of a generated pyramidal
   slide (``make_large_slide.py``, default 40,000 x 40,000 px at 0.5 um/px) with its mask beside
   it (segmented once by ``segment_slide`` at ``--mask-mpp``, cached): wall time from the open call
   to the first drawn frame, and peak RSS above the baseline's (goal: under 2 s and 500 MB).
3. **Pan/zoom**: from that view, zoom to full resolution (one screen pixel per slide pixel) at
   ``--views`` places and draw each: the time per new view (only the visible tiles are read).

Figures print as a table and, with ``--json``, as a file. Frames are drawn with
``viewer.screenshot(canvas_only=True, flash=False)`` on a shown window, which renders synchronously.
Run it on a screen or a virtual one::

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/napari_view.py            # 40k slide
    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/napari_view.py --size 10000 --views 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_large_slide import ensure_slide

CANVAS = (1024, 1024)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _viewer() -> Any:
    import napari

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(*CANVAS)  # the same canvas in every process
    return viewer


def _draw(viewer: Any) -> None:
    viewer.screenshot(canvas_only=True, flash=False)


def child_baseline() -> dict[str, float]:
    start = time.perf_counter()
    viewer = _viewer()
    _draw(viewer)
    figures = {"first_frame_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
    viewer.close()
    return figures


def child_open(slide: str, views: int) -> dict[str, Any]:
    viewer = _viewer()
    _draw(viewer)
    before = peak_rss_mb()
    start = time.perf_counter()
    layers = viewer.open(slide, plugin="wsi-espnet")
    _draw(viewer)
    figures: dict[str, Any] = {
        "open_to_first_frame_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_before_open_mb": before,
        "layers": [f"{layer.name} ({type(layer).__name__}, {len(layer.data) if layer.multiscale else 1} levels)"
                   for layer in layers],
    }  # fmt: skip
    image = layers[0]
    height, width = image.data[0].shape[:2]
    mpp = float(image.scale[-1])
    view_times = []
    for i in range(views):
        # Spread the views over the slide's middle, away from each other, so none reuses another's tiles.
        y = (0.3 + 0.4 * (i + 0.5) / views) * height * mpp
        x = (0.7 - 0.4 * (i + 0.5) / views) * width * mpp
        start = time.perf_counter()
        viewer.camera.center = (y, x)
        viewer.camera.zoom = 1 / mpp  # one screen pixel per level-0 pixel
        _draw(viewer)
        view_times.append(time.perf_counter() - start)
    figures["full_resolution_view_s"] = view_times
    figures["peak_rss_after_views_mb"] = peak_rss_mb()
    viewer.close()
    return figures


def _child(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False, timeout=1800
    )
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def ensure_mask(slide: Path, mask_mpp: float) -> Path:
    """The slide's mask beside it, segmented once with the packaged model at ``mask_mpp``."""
    from wsi_espnet.outputs.paths import OutputPaths
    from wsi_espnet.segment_slide import SegmentOptions, segment_slide

    start = time.perf_counter()
    result = segment_slide(slide, None, SegmentOptions(out_dir=slide.parent, target_mpp=mask_mpp,
                                                       formats=frozenset({"ome-zarr"})))  # fmt: skip
    took = "already there" if result.skipped else f"segmented in {time.perf_counter() - start:.0f} s"
    print(f"mask: {OutputPaths.for_slide(slide, slide.parent).zarr} at {mask_mpp:g} um/px ({took})")
    return result.outputs["ome-zarr"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40000, help="slide side in pixels at 0.5 um/px (default 40000)")
    parser.add_argument("--mask-mpp", type=float, default=8.0, help="MPP the mask is segmented at (default 8)")
    parser.add_argument("--views", type=int, default=5, help="full-resolution views drawn (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        figures = child_baseline() if kind == "baseline" else child_open(rest[0], int(rest[1]))
        print(json.dumps(figures))
        return 0
    if not os.environ.get("DISPLAY"):
        raise SystemExit("no display: run under xvfb-run -a -s '-screen 0 1280x1024x24' (see the docstring)")

    slide = ensure_slide(args.size)
    ensure_mask(slide, args.mask_mpp)
    baseline = _child("baseline")
    opened = _child("open", str(slide), str(args.views))
    above = opened["peak_rss_mb"] - baseline["peak_rss_mb"]
    views = opened["full_resolution_view_s"]
    print(f"slide: {slide.name} ({args.size} x {args.size} px); layers: {', '.join(opened['layers'])}")
    print(f"{'measure':<44} {'value':>10}  goal")
    print(f"{'napari alone: first frame':<44} {baseline['first_frame_s']:>9.2f}s")
    print(f"{'napari alone: peak RSS':<44} {baseline['peak_rss_mb']:>8.0f}MB")
    print(f"{'open slide + mask -> first frame':<44} {opened['open_to_first_frame_s']:>9.2f}s  < 2 s")
    print(f"{'peak RSS above napari alone':<44} {above:>8.0f}MB  < 500 MB")
    print(f"{'full-resolution view, median of ' + str(len(views)):<44} {sorted(views)[len(views) // 2]:>9.2f}s")
    print(f"{'full-resolution view, slowest':<44} {max(views):>9.2f}s")
    after = opened["peak_rss_after_views_mb"] - baseline["peak_rss_mb"]
    print(f"{'peak RSS above napari alone, after views':<44} {after:>8.0f}MB")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "baseline": baseline, "open": opened}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
