""" "Segment the visible region" in the napari widget against ``segment_region`` alone, same region and settings.

On a generated pyramidal slide (``make_large_slide.py``, default 40,000 px at 0.5 um/px), the camera
is set to show about ``--view`` x ``--view`` pixels at the model's MPP (2048 at 1 um/px: 4096 level-0
pixels). Measured in one process, each ``--repeat`` times, alternating:

- ``segment_region(reader, model, config, region, tile_size=...)`` on the region the widget computes;
- the widget: from ``run()`` until the result Labels layer is in the viewer and drawn, first on a
  slide it has not planned (the plans cleared: tissue detection and planning, as ``segment_region``
  does on every call), then again on the same view (the widget reuses its slide plan).

The ratio of the medians is printed (goal: under 1.2). The model and the halo are warmed first.
Responsiveness during the widget's runs: a 20 ms Qt timer on the GUI thread records the gaps between
its ticks (an idle event loop gives about 20 ms; a gap is how long a click would wait for an answer).

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/napari_segment_view.py
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_large_slide import ensure_slide


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40000, help="slide side in pixels at 0.5 um/px")
    parser.add_argument("--view", type=int, default=2048, help="visible side in pixels at the model's MPP")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication
    from wsi_espnet_napari.regions import visible_region
    from wsi_espnet_napari.results import REGION_PLANS, REGION_TILE_SIZE, load_run_model
    from wsi_espnet_napari.segment_widget import SegmentWidget

    from wsi_espnet.models.registry import DEFAULT_MODEL
    from wsi_espnet.segmentation import segment_region
    from wsi_espnet.slides import open_slide

    slide = ensure_slide(args.size)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 1024)
    image, *_ = viewer.open(slide, plugin="wsi-espnet")  # and the mask beside it, if napari_view.py made one
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    model, config = load_run_model(DEFAULT_MODEL)
    mpp = float(image.scale[-1])
    target = config.target_mpp or mpp
    height, width = image.data[0].shape[:2]
    viewer.camera.center = (height * mpp / 2, width * mpp / 2)
    canvas = min(viewer.canvas.size)
    viewer.camera.zoom = canvas / (args.view * target)  # screen px per um
    viewer.screenshot(canvas_only=True, flash=False)
    region = visible_region(viewer, image)
    reader = open_slide(slide)
    print(f"slide {slide.name}; visible region {region} (level 0), model {config.name} at {target:g} um/px")

    app = QApplication.instance()
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    gaps: list[float] = []

    def widget_run() -> float:
        start = time.perf_counter()
        ticks.clear()
        timer.start()
        widget.run()
        while widget.worker is not None:
            app.processEvents()
            time.sleep(0.005)
        timer.stop()
        viewer.screenshot(canvas_only=True, flash=False)
        gaps.extend(b - a for a, b in itertools.pairwise(ticks))
        return time.perf_counter() - start

    segment_region(reader, model, config, region, tile_size=REGION_TILE_SIZE)  # warm: model, halo, caches
    widget_run()  # warm: the first Labels layer, its shaders
    gaps.clear()
    alone, cold, warm = [], [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = segment_region(reader, model, config, region, tile_size=REGION_TILE_SIZE)
        alone.append(time.perf_counter() - start)
        REGION_PLANS.clear()
        cold.append(widget_run())  # plans the slide, as segment_region does on every call
        warm.append(widget_run())  # the view run again: the slide plan is reused
    shape = result.labels.shape
    print(f"labels {shape[0]} x {shape[1]} at {result.output_mpp:g} um/px, tile {REGION_TILE_SIZE}")
    base = statistics.median(alone)
    print(f"segment_region alone (plans each call), median of {args.repeat}: {base:.2f} s  {_list(alone)}")
    for name, times in (("first run on the slide", cold), ("run again (plan reused)", warm)):
        median = statistics.median(times)
        print(f"widget {name}, run -> layer drawn: {median:.2f} s  {_list(times)}  ratio {median / base:.3f}")
    print("goal: widget / alone < 1.2")
    if gaps:
        gaps.sort()
        p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]
        print(
            f"GUI event loop during the runs (20 ms timer, {len(gaps)} gaps): median "
            f"{statistics.median(gaps) * 1000:.0f} ms, 99th percentile {p99 * 1000:.0f} ms, "
            f"longest {gaps[-1] * 1000:.0f} ms"
        )
    viewer.close()
    return 0


def _list(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}" for t in times) + "]"


if __name__ == "__main__":
    raise SystemExit(main())
