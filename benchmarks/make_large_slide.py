"""Generate a large pyramidal JPEG OME-TIFF slide from real tissue, for end-to-end benchmarks.

The slide is ``--size`` x ``--size`` pixels at 0.5 um/px (20x). About ``--tissue-fraction`` of its
area is tissue: a few smooth-edged islands (rotated, wobbly ellipses) filled with 512-pixel crops of
tissue-rich regions of the real H&E slide ``CMU-1-Small-Region.svs``, each in one of 8
orientations; the rest is glass of the colour measured on that slide. Levels are written tile by
tile from an iterator (``tifffile``), each rendered from the source downsampled to that level, so
the whole image never exists in memory: a 40000 x 40000 slide needs a few hundred MB of RAM.

Levels halve until the shorter side is at most 1024 pixels, stored as OME-TIFF SubIFDs (JPEG in RGB like
CMU-1-Small-Region.svs, 512 x 512 tiles), with the OME PhysicalSize and the TIFF resolution tags (centimetre
unit) both set, so ``wsi_espnet.slides.open_slide`` reports 0.5 um/px and ``choose_level(reader,
0.5)`` picks level 0 without resampling. The script checks that after writing.

    python benchmarks/make_large_slide.py --size 40000             # -> the benchmark cache folder
    python benchmarks/make_large_slide.py --size 10000 --out big.ome.tif

The default output folder is ``$XDG_CACHE_HOME/wsi-espnet/benchmarks`` (``~/.cache/...``); an
existing file with the same parameters is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import Image

from wsi_espnet.slides import choose_level, describe_slide, open_slide
from wsi_espnet.tissue_detection import detect_tissue

MPP = 0.5
TILE = 512
BLOCK = 512  # side of one tissue crop at level 0
CANDIDATE_STEP = 64  # crop origins on the source are multiples of this (so they stay exact on coarse levels)
MIN_LEVEL_SIDE = 1024


def data_dir() -> Path:
    return Path(os.environ.get("WSI_ESPNET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wsi-espnet" / "benchmarks"


def default_path(size: int, tissue_fraction: float = 0.5, seed: int = 0) -> Path:
    return cache_dir() / f"cmu-tissue-{size}px-t{round(tissue_fraction * 100)}-s{seed}.ome.tif"


@dataclass(frozen=True)
class Island:
    """One rotated ellipse with a wobbly edge, in level-0 pixels."""

    cy: float
    cx: float
    ry: float
    rx: float
    angle: float
    wobble: float
    lobes: int
    phase: float


class TissueLayout:
    """Where the tissue is (islands) and what it looks like (oriented source crops), at any level."""

    def __init__(self, height: int, width: int, source: NDArray[np.uint8], fraction: float, seed: int) -> None:
        self.height, self.width = height, width
        rng = np.random.default_rng(seed)
        self.glass = self._glass_colour(source)
        self.candidates = self._tissue_crops(source)
        self.levels = self._level_count(height, width)
        # Downsampled copies of the source, one per level (box filter), for rendering coarse levels directly.
        self.sources = [source]
        image = Image.fromarray(source)
        for level in range(1, self.levels):
            size = (source.shape[1] // 2**level, source.shape[0] // 2**level)
            self.sources.append(np.asarray(image.resize(size, Image.Resampling.BOX)))
        self.seed = seed
        self.islands = self._islands(rng, fraction)
        # Bound on the distance function's gradient (per level-0 pixel), for the coarse inside/outside test.
        self.slope = max(
            (1 + i.wobble * i.lobes / (1 - i.wobble)) / ((1 - i.wobble) * min(i.ry, i.rx)) for i in self.islands
        )

    @staticmethod
    def _level_count(height: int, width: int) -> int:
        levels = 1
        while min(height, width) / 2 ** (levels - 1) > MIN_LEVEL_SIDE and BLOCK >> levels >= 4:
            levels += 1
        return levels

    @staticmethod
    def _glass_colour(source: NDArray[np.uint8]) -> NDArray[np.uint8]:
        saturation = np.asarray(Image.fromarray(source).convert("HSV"))[..., 1]
        glass = source[saturation < 10]
        return np.median(glass, axis=0).astype(np.uint8) if glass.size else np.array([242, 242, 242], np.uint8)

    @staticmethod
    def _tissue_crops(source: NDArray[np.uint8]) -> list[tuple[int, int]]:
        """Origins of BLOCK-sized source crops that are >= 90% tissue (by saturation), spread out."""
        saturation = np.asarray(Image.fromarray(source).convert("HSV"))[..., 1] > 40
        height, width = saturation.shape
        s = np.pad(saturation.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table
        found = []
        for y in range(0, height - BLOCK + 1, CANDIDATE_STEP):
            for x in range(0, width - BLOCK + 1, CANDIDATE_STEP):
                total = s[y + BLOCK, x + BLOCK] - s[y, x + BLOCK] - s[y + BLOCK, x] + s[y, x]
                if total >= 0.9 * BLOCK * BLOCK:
                    found.append((y, x))
        if not found:
            raise SystemExit("the source slide has no tissue-rich 512x512 region; pass another --source")
        return found

    def _islands(self, rng: np.random.Generator, fraction: float) -> list[Island]:
        count = max(2, min(8, round(self.height * self.width / 6000**2)))
        base = []
        for _ in range(count):
            base.append(
                Island(
                    cy=rng.uniform(0.15, 0.85) * self.height, cx=rng.uniform(0.15, 0.85) * self.width,
                    ry=rng.uniform(0.6, 1.4), rx=rng.uniform(0.6, 1.4), angle=rng.uniform(0, math.pi),
                    wobble=rng.uniform(0.05, 0.15), lobes=int(rng.integers(3, 7)), phase=rng.uniform(0, 2 * math.pi),
                )
            )  # fmt: skip
        # Scale the radii so the islands cover `fraction` of the slide (bisection on a coarse grid).
        rows = (np.arange(256) + 0.5) * self.height / 256
        cols = (np.arange(256) + 0.5) * self.width / 256
        lo, hi = 0.0, float(max(self.height, self.width))
        for _ in range(40):
            mid = (lo + hi) / 2
            covered = self._inside(self._scaled(base, mid), rows, cols).mean()
            lo, hi = (mid, hi) if covered < fraction else (lo, mid)
        return self._scaled(base, (lo + hi) / 2)

    @staticmethod
    def _scaled(base: list[Island], radius: float) -> list[Island]:
        scale = radius / math.sqrt(len(base))
        return [Island(i.cy, i.cx, i.ry * scale, i.rx * scale, i.angle, i.wobble, i.lobes, i.phase) for i in base]

    @staticmethod
    def _distance(islands: list[Island], rows: NDArray[np.float64], cols: NDArray[np.float64]) -> NDArray[np.float64]:
        """min over islands of (normalised elliptic radius / wobbly edge radius); < 1 inside."""
        dy, dx = rows[:, None], cols[None, :]
        best = np.full((rows.size, cols.size), np.inf)
        for i in islands:
            cos, sin = math.cos(i.angle), math.sin(i.angle)
            u = ((dx - i.cx) * cos + (dy - i.cy) * sin) / i.rx
            v = (-(dx - i.cx) * sin + (dy - i.cy) * cos) / i.ry
            edge = 1 + i.wobble * np.sin(i.lobes * np.arctan2(v, u) + i.phase)
            np.minimum(best, np.hypot(u, v) / edge, out=best)
        return best

    def _inside(self, islands: list[Island], rows: NDArray[np.float64], cols: NDArray[np.float64]) -> NDArray[np.bool_]:
        return self._distance(islands, rows, cols) < 1

    def level_shape(self, level: int) -> tuple[int, int]:
        return -(-self.height // 2**level), -(-self.width // 2**level)

    def _block(self, level: int, by: int, bx: int) -> NDArray[np.uint8]:
        """The tissue crop shown in level-0 block (by, bx), at ``level``."""
        key = int(np.random.default_rng([self.seed, by, bx]).integers(0, 1 << 30))
        y, x = self.candidates[key % len(self.candidates)]
        orientation = (key // len(self.candidates)) % 8
        b = BLOCK >> level
        crop: NDArray[np.uint8] = self.sources[level][y >> level : (y >> level) + b, x >> level : (x >> level) + b]
        crop = np.rot90(crop, orientation % 4)
        return crop[:, ::-1] if orientation >= 4 else crop

    def tile(self, level: int, ty: int, tx: int) -> NDArray[np.uint8]:
        """Tile (ty, tx) of ``level`` as (TILE, TILE, 3) uint8; outside the level is glass too."""
        scale = 2**level
        out = np.empty((TILE, TILE, 3), dtype=np.uint8)
        out[:] = self.glass
        top, left = ty * TILE, tx * TILE
        # A coarse look first: most tiles are all glass or all tissue. The distance function changes by at
        # most `self.slope` per level-0 pixel, so probes this far from the edge decide the whole tile.
        probe = np.linspace(0, TILE - 1, 9)
        margin = self.slope * (TILE / 8) * scale
        coarse = self._distance(self.islands, (top + probe + 0.5) * scale, (left + probe + 0.5) * scale)
        if coarse.min() > 1 + margin:
            return out
        inside: NDArray[np.bool_] | None = None
        if coarse.max() >= 1 - margin:
            rows = (top + np.arange(TILE) + 0.5) * scale
            cols = (left + np.arange(TILE) + 0.5) * scale
            inside = self._inside(self.islands, rows, cols)
            if not inside.any():
                return out
        texture = np.empty_like(out)
        b = BLOCK >> level
        for by in range(top // b, (top + TILE - 1) // b + 1):
            for bx in range(left // b, (left + TILE - 1) // b + 1):
                r0, c0 = by * b - top, bx * b - left
                block = self._block(level, by, bx)
                rs, cs = slice(max(r0, 0), min(r0 + b, TILE)), slice(max(c0, 0), min(c0 + b, TILE))
                texture[rs, cs] = block[rs.start - r0 : rs.stop - r0, cs.start - c0 : cs.stop - c0]
        if inside is None:
            out[:] = texture
        else:
            out[inside] = texture[inside]
        height, width = self.level_shape(level)
        out[max(0, height - top) :, :] = self.glass
        out[:, max(0, width - left) :] = self.glass
        return out

    def tiles(self, level: int, progress: list[int]) -> Iterator[NDArray[np.uint8]]:
        height, width = self.level_shape(level)
        for ty in range(-(-height // TILE)):
            for tx in range(-(-width // TILE)):
                progress[0] += 1
                yield self.tile(level, ty, tx)


def write_slide(
    path: Path, size: int, *, source: Path, tissue_fraction: float = 0.5, seed: int = 0, quality: int = 90
) -> Path:
    """Write the slide to ``path`` (atomically: a partial file is never left under that name)."""
    with open_slide(source) as reader:
        pixels = reader.read_level(0)
    layout = TissueLayout(size, size, pixels, tissue_fraction, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    total = sum(-(-h // TILE) * -(-w // TILE) for h, w in map(layout.level_shape, range(layout.levels)))
    progress = [0]
    start = time.perf_counter()
    common = {
        "dtype": np.uint8, "tile": (TILE, TILE), "photometric": "rgb",
        "compression": "jpeg", "compressionargs": {"level": quality}, "resolutionunit": "CENTIMETER",
    }  # fmt: skip
    try:
        with tifffile.TiffWriter(partial, bigtiff=True, ome=True) as tif:
            for level in range(layout.levels):
                mpp = MPP * 2**level
                extra = (
                    {
                        "subifds": layout.levels - 1, "software": "wsi-espnet benchmarks/make_large_slide.py",
                        "metadata": {
                            "axes": "YXS", "Name": f"CMU tissue {size}px", "PhysicalSizeX": MPP,
                            "PhysicalSizeXUnit": "µm", "PhysicalSizeY": MPP, "PhysicalSizeYUnit": "µm",
                        },
                    }
                    if level == 0
                    else {"subfiletype": 1, "metadata": None}
                )  # fmt: skip
                tif.write(
                    layout.tiles(level, progress), shape=(*layout.level_shape(level), 3),
                    resolution=(1e4 / mpp, 1e4 / mpp), **common, **extra,  # type: ignore[arg-type]
                )  # fmt: skip
                print(
                    f"  level {level}: {layout.level_shape(level)[1]} x {layout.level_shape(level)[0]} done "
                    f"({progress[0]}/{total} tiles, {time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                )
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def ensure_slide(size: int, *, tissue_fraction: float = 0.5, seed: int = 0, force: bool = False) -> Path:
    """The cached generated slide of this size, written first if missing."""
    path = default_path(size, tissue_fraction, seed)
    if force or not path.is_file():
        print(f"# generating {path} ...", file=sys.stderr)
        write_slide(
            path, size, source=data_dir() / "slides" / "CMU-1-Small-Region.svs", tissue_fraction=tissue_fraction,
            seed=seed,
        )  # fmt: skip
    return path


def check_slide(path: Path) -> str:
    """Open the slide the way the pipeline does; fail unless it is 0.5 um/px with level 0 chosen for 0.5."""
    with open_slide(path) as reader:
        choice = choose_level(reader, MPP)
        if reader.mpp is None or abs(reader.mpp - MPP) > 1e-6:
            raise SystemExit(f"{path}: open_slide reports mpp {reader.mpp}, expected {MPP}")
        if choice.level != 0 or choice.resample:
            raise SystemExit(f"{path}: choose_level(reader, {MPP}) gave {choice}, expected level 0 without resampling")
        tissue = detect_tissue(reader, mpp=reader.mpp)
        corner = reader.read_region(0, 0, 0, 64, 64)
        return (
            f"{describe_slide(reader)}\nchoose_level(reader, {MPP}): level {choice.level}, resample {choice.resample}, "
            f"target shape {choice.target_shape}\ndetected tissue fraction: {tissue.fraction:.3f} "
            f"(method {tissue.method}, mask {tissue.mask.shape}); corner pixel {corner[0, 0].tolist()}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10000, help="side in pixels at 0.5 um/px (default 10000)")
    parser.add_argument("--out", type=Path, default=None, help="output .ome.tif (default: the benchmark cache)")
    parser.add_argument("--tissue-fraction", type=float, default=0.5, help="share of the area that is tissue")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--source", type=Path, default=None, help="real slide to take tissue from (default CMU)")
    parser.add_argument("--force", action="store_true", help="rewrite an existing file")
    args = parser.parse_args()
    if args.size < TILE:
        parser.error(f"--size must be at least {TILE}")
    if not 0 < args.tissue_fraction < 1:
        parser.error("--tissue-fraction must be between 0 and 1")
    source = args.source or data_dir() / "slides" / "CMU-1-Small-Region.svs"
    if not source.is_file():
        print(f"source slide {source} not found; set WSI_ESPNET_TEST_DATA or pass --source", file=sys.stderr)
        return 2
    out = args.out or default_path(args.size, args.tissue_fraction, args.seed)
    if out.is_file() and not args.force:
        print(f"# {out} exists; keeping it (--force rewrites)")
    else:
        start = time.perf_counter()
        write_slide(
            out, args.size, source=source, tissue_fraction=args.tissue_fraction, seed=args.seed, quality=args.quality
        )
        print(f"# wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    print(check_slide(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
