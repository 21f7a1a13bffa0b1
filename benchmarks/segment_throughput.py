"""End-to-end megapixels/s of ``wsi-espnet segment``: this checkout against the previous release, in one run.

The previous release (``--baseline``, default the tag ``v0.1.0``) is checked out into a temporary git
worktree and run with the same Python, the same slide (``benchmarks/make_large_slide.py``, 10k x 10k
by default), the default model and default settings; runs alternate (new, old, new, old, ...) so
both see the same machine. Each run gets a fresh private cache folder except the runtime-choice
cache of ``--runtime auto``, whose first run on a machine includes the check (reported apart).

Prints per run: wall time, output megapixels/s, peak RSS, the runtime used; then the medians, the
ratio new/old, and the window pixels the model runs per output pixel for each side's tile and halo.

    python benchmarks/segment_throughput.py [--size 10000] [--repeat 2] [--baseline v0.1.0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_large_slide import ensure_slide
from segment_runs import SegmentRun, run_segment, window_pixels_per_output_pixel

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10000, help="side of the generated slide (default 10000)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side (default 2)")
    parser.add_argument("--baseline", default="v0.1.0", help="git revision of the previous release")
    args = parser.parse_args()

    slide = ensure_slide(args.size)
    with tempfile.TemporaryDirectory(prefix="wsi-espnet-throughput-") as tmp_text:
        tmp = Path(tmp_text)
        worktree = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline],
                       check=True, capture_output=True)  # fmt: skip
        try:
            runs: dict[str, list[SegmentRun]] = {"new": [], "old": []}
            cache = tmp / "cache"  # shared by every run: the halo and the runtime choice are measured once
            for index in range(args.repeat):
                for side, root in (("new", ROOT), ("old", worktree)):
                    out = tmp / f"{side}-{index}"
                    run = run_segment(slide, out, package_root=root, env={"XDG_CACHE_HOME": str(cache)})
                    shutil.rmtree(out)
                    runs[side].append(run)
                    execution = run.provenance["execution"]
                    runtime = ",".join(execution.get("runtime", ["torch (channels_last, no choice)"]))
                    rate = run.output_megapixels / run.seconds
                    print(f"{side} run {index + 1}: {run.seconds:7.1f} s  {rate:6.2f} MP/s  "
                          f"peak RSS {run.peak_rss_mib:6.0f} MiB  model {execution['model_forward_s']:.1f} s  "
                          f"runtime {runtime}", flush=True)  # fmt: skip
            ratios = {}  # each side's own plan of the slide, from its own checkout
            for side, root in (("new", ROOT), ("old", worktree)):
                tiling = runs[side][0].provenance["tiling"]
                ratios[side] = window_pixels_per_output_pixel(slide, tiling["tile_size"], tiling["halo"], root)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)

    print(f"\n# {slide.name}: {runs['new'][0].output_megapixels:.0f} output MP; {os.cpu_count()} CPUs; "
          f"new = this checkout, old = {args.baseline}")  # fmt: skip
    rates = {}
    for side, side_runs in runs.items():
        later = side_runs[1:] if side == "new" and len(side_runs) > 1 else side_runs
        seconds = statistics.median(r.seconds for r in later)
        rates[side] = side_runs[0].output_megapixels / seconds
        tiling = side_runs[0].provenance["tiling"]
        ratio = ratios[side]
        print(f"{side}: median {seconds:.1f} s = {rates[side]:.2f} MP/s, peak RSS "
              f"{max(r.peak_rss_mib for r in side_runs):.0f} MiB; tile {tiling['tile_size']}, halo {tiling['halo']}: "
              f"{ratio:.2f} window px per output px")  # fmt: skip
    if len(runs["new"]) > 1:
        print(f"new, first run (includes the runtime check): {runs['new'][0].seconds:.1f} s")
    print(f"throughput new / old: {rates['new'] / rates['old']:.2f}x (goal >= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
