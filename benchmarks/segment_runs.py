"""Shared by the end-to-end benchmarks: run ``wsi-espnet segment`` as a user does and measure it.

:func:`run_segment` runs the command in a child process (optionally with another checkout of the
package first on ``PYTHONPATH``, for the previous release) and returns its wall time, its peak RSS
from the kernel's accounting of that child (``wait4``), and its provenance record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SegmentRun:
    seconds: float
    peak_rss_mib: float
    provenance: dict[str, Any]

    @property
    def output_megapixels(self) -> float:
        height, width = self.provenance["resolution"]["mask_shape"]
        return height * width / 1e6


def run_segment(
    slide: Path, out: Path, *extra: str, package_root: Path | None = None, env: dict[str, str] | None = None
) -> SegmentRun:
    """``python -m wsi_espnet segment SLIDE --out OUT --overwrite --quiet EXTRA...`` in a child process."""
    child_env = {**os.environ, **(env or {})}
    if package_root is not None:
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), child_env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "wsi_espnet", "segment", str(slide), "--out", str(out), "--overwrite", "--quiet"]
    began = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        # Run from the checkout itself: ``python -m`` puts the working directory first on sys.path.
        cwd = package_root or Path.cwd()
        process = subprocess.Popen([*command, *extra], env=child_env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)  # reaped here, with the child's own peak RSS
        seconds = time.perf_counter() - began
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            sys.exit(f"segment failed ({process.returncode}): {errors.read().decode()[-2000:]}")
    provenance = json.loads(next(out.glob("*.provenance.json")).read_text())
    return SegmentRun(seconds, usage.ru_maxrss / 1024, provenance)


_WINDOW_RATIO = """
import sys
from wsi_espnet.models import load_model
from wsi_espnet.models.registry import default_model_path
from wsi_espnet.segmentation.planning import plan_slide
from wsi_espnet.slides import open_slide
_, config = load_model(default_model_path())
with open_slide(sys.argv[1]) as reader:
    plan = plan_slide(reader, config, halo=int(sys.argv[3]), tile_size=int(sys.argv[2]))
window = sum(t.window_height * t.window_width for t in plan.tissue_tiles)
print(window / sum(t.height * t.width for t in plan.tissue_tiles))
"""


def window_pixels_per_output_pixel(slide: Path, tile_size: int, halo: int, package_root: Path | None = None) -> float:
    """Window pixels the default model runs per output pixel kept, over the tiles touching tissue, as the
    checkout at ``package_root`` (default: this one) plans the slide."""
    command = [sys.executable, "-c", _WINDOW_RATIO, str(slide), str(tile_size), str(halo)]
    result = subprocess.run(command, cwd=package_root or Path.cwd(), capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])
