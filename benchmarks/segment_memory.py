"""Peak RSS of ``wsi-espnet segment`` on generated 10k, 20k and 40k slides: under 2 GB, and flat.

Each slide (``benchmarks/make_large_slide.py``, 0.5 um/px, half tissue) is segmented with the default
model and settings in a child process; the peak RSS is the kernel's figure for that child
(``wait4``), so nothing in this process counts. The once-per-machine work (measuring the model's
halo, the runtime check of ``--runtime auto``) is done first by a run on the smallest slide with an
empty private cache, reported apart; the series then runs with those caches warm. Prints the series,
the largest over the smallest (goal <= 1.10) and the largest (goal < 2048 MiB).

    python benchmarks/segment_memory.py [--sizes 10000,20000,40000] [-- extra segment flags]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_large_slide import ensure_slide
from segment_runs import run_segment

GOAL_MIB = 2048
GOAL_RATIO = 1.10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,20000,40000", help="slide sides, comma-separated")
    parser.add_argument("extra", nargs="*", help="extra flags for segment (after --)")
    args = parser.parse_args()
    peaks = {}
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="wsi-espnet-memory-") as tmp:
        env = {"XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        first = run_segment(ensure_slide(min(sizes)), Path(tmp) / "first", *args.extra, env=env)
        shutil.rmtree(Path(tmp) / "first")
        print(f"first run on this machine ({min(sizes)} px, halo measured, runtime checked): {first.seconds:.1f} s, "
              f"peak RSS {first.peak_rss_mib:.0f} MiB", flush=True)  # fmt: skip
        for size in sizes:
            slide = ensure_slide(size)
            out = Path(tmp) / str(size)
            run = run_segment(slide, out, *args.extra, env=env)
            shutil.rmtree(out)
            peaks[size] = run.peak_rss_mib
            runtime = ",".join(run.provenance["execution"].get("runtime", ["?"]))
            print(f"{size:>6} px: {run.seconds:7.1f} s  peak RSS {run.peak_rss_mib:6.0f} MiB  runtime {runtime}",
                  flush=True)  # fmt: skip
    largest, smallest = max(peaks.values()), min(peaks.values())
    print(f"largest / smallest: {largest / smallest:.3f} (goal <= {GOAL_RATIO}); "
          f"largest {largest:.0f} MiB (goal < {GOAL_MIB})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
