"""From a manifest split to (image, labels) arrays at the dataset's micrometres per pixel.

:func:`list_samples` finds a split's pairs (or samples tiles from annotated slides) without decoding
images; :func:`load_sample` decodes one pair, turns its raw mask into class indices as the manifest
says and resamples both to the target MPP (images antialiased, labels nearest).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from wsi_espnet.datasets.manifest import (
    IMAGE_EXTENSIONS,
    DatasetManifest,
    FolderSplit,
    MaskEncoding,
    SlideSplit,
    SourceSpec,
)
from wsi_espnet.errors import InputError
from wsi_espnet.inference.predict import resize_image

__all__ = ["Sample", "decode_mask", "list_samples", "load_sample", "read_rgb"]

Image.MAX_IMAGE_PIXELS = None  # dataset regions of interest may be large; they are the user's own files


@dataclass(frozen=True)
class Sample:
    """One labelled image of a split: file paths, or arrays already sampled from an annotated slide."""

    name: str
    source: SourceSpec
    image_path: Path | None = None
    mask_path: Path | None = None
    image: NDArray[np.uint8] | None = None
    labels: NDArray[np.uint8] | None = None


def _pair_name(path: Path, suffix: str | None) -> str | None:
    if suffix is not None:
        return path.name[: -len(suffix)] if path.name.endswith(suffix) else None
    return path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else None


def _find_mask(source: SourceSpec, split: FolderSplit, relative_parent: Path, name: str) -> Path | None:
    folder = split.masks / relative_parent
    if source.mask_suffix is not None:
        candidate = folder / f"{name}{source.mask_suffix}"
        return candidate if candidate.is_file() else None
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / f"{name}{ext}", folder / f"{name}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _folder_samples(source: SourceSpec, split_name: str, split: FolderSplit) -> list[Sample]:
    for folder, what in ((split.images, "images"), (split.masks, "masks")):
        if not folder.is_dir():
            raise InputError(
                f"source {source.name!r}, split {split_name!r}: {what} folder {str(folder)!r} does not exist."
            )
    pattern = "**/*" if source.recursive else "*"
    images = sorted(p for p in split.images.glob(pattern) if p.is_file() and not p.name.startswith("."))
    by_name: dict[str, Sample] = {}
    missing: list[str] = []
    seen_names: list[str] = []
    for image_path in images:
        name = _pair_name(image_path, source.image_suffix)
        if name is None:
            continue
        relative_parent = image_path.parent.relative_to(split.images)
        key = str(relative_parent / name) if source.recursive else name
        seen_names += [name, key]
        if split.files is not None and name not in split.files and key not in split.files:
            continue
        if name in split.exclude or key in split.exclude:
            continue
        mask_path = _find_mask(source, split, relative_parent, name)
        if mask_path is None:
            missing.append(str(image_path))
            continue
        by_name[key] = Sample(name=key, source=source, image_path=image_path, mask_path=mask_path)
    if missing:
        raise InputError(
            f"source {source.name!r}, split {split_name!r}: {len(missing)} image(s) have no mask in "
            f"{str(split.masks)!r}, e.g. {missing[0]!r}; masks must have the image's name"
            f"{' + ' + repr(source.mask_suffix) if source.mask_suffix else ''}."
        )
    if split.exclude:
        seen = set(seen_names)
        unknown = sorted(set(split.exclude) - seen)
        if unknown:
            raise InputError(
                f"source {source.name!r}, split {split_name!r} excludes files that are not there: {unknown[:5]}; "
                "check the names (a typo would put held-out data into this split)."
            )
    if split.files is not None:
        absent = sorted(set(split.files) - set(by_name) - {Path(k).name for k in by_name})
        if absent:
            raise InputError(
                f"source {source.name!r}, split {split_name!r} lists files that are not there: {absent[:5]}."
            )
    return list(by_name.values())


def _slide_samples(
    manifest: DatasetManifest, source: SourceSpec, split: SlideSplit, target_mpp: float | None
) -> list[Sample]:
    from wsi_espnet.datasets.annotated_slides import sample_annotated_tiles

    if target_mpp is None:
        raise InputError(
            f"manifest {str(manifest.path)!r}: annotated slides need a target_mpp to sample tiles at; add one."
        )
    names = [c.lower() for c in manifest.class_names]
    unannotated = None if source.unannotated is None else names.index(source.unannotated.lower())
    ignore = manifest.ignore_index if manifest.ignore_index is not None else 255
    samples = []
    for entry in split.slides:
        tiles = sample_annotated_tiles(
            entry.slide,
            entry.annotations,
            manifest.class_names,
            target_mpp=target_mpp,
            tile_size=source.tile_size,
            ignore_index=ignore,
            unannotated=unannotated,
            mpp=entry.mpp,
            class_map=dict(source.class_map) or None,
        )
        for tile in tiles:
            x, y = tile.origin_xy
            samples.append(
                Sample(
                    name=f"{entry.slide.stem}@{round(x)},{round(y)}",
                    source=source,
                    image=tile.image,
                    labels=np.asarray(tile.labels, dtype=np.uint8),
                )
            )
    return samples


def list_samples(manifest: DatasetManifest, split: str, *, target_mpp: float | None = None) -> list[Sample]:
    """Every sample of ``split`` over all sources (sources without that split contribute nothing)."""
    manifest.check_split(split)
    target_mpp = manifest.target_mpp if target_mpp is None else target_mpp
    samples: list[Sample] = []
    for source in manifest.sources:
        spec = source.splits.get(split)
        if isinstance(spec, FolderSplit):
            samples.extend(_folder_samples(source, split, spec))
        elif isinstance(spec, SlideSplit):
            samples.extend(_slide_samples(manifest, source, spec, target_mpp))
    if not samples:
        raise InputError(f"split {split!r} of manifest {str(manifest.path)!r} has no samples; check its folders.")
    return samples


def read_rgb(path: Path) -> NDArray[np.uint8]:
    """An image file as ``(H, W, 3)`` uint8 RGB."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"cannot read image {str(path)!r}: {exc}; is it a complete PNG/JPEG/TIFF?") from exc


def _read_mask(path: Path, *, colours: bool) -> NDArray[np.integer]:
    try:
        with Image.open(path) as image:
            if colours:  # colour-coded masks: compare colours whatever the file's mode (palette, RGBA, ...)
                return np.asarray(image.convert("RGB"))
            return np.asarray(image)  # palette ('P') masks give their indices: class ids, as intended
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"cannot read mask {str(path)!r}: {exc}; is it a complete PNG/JPEG/TIFF?") from exc


def decode_mask(
    raw: NDArray[np.integer], encoding: MaskEncoding, num_classes: int, ignore_index: int | None, *, where: str
) -> NDArray[np.uint8]:
    """Raw mask values -> class indices (uint8), following :class:`MaskEncoding`'s order."""
    ignore = ignore_index if ignore_index is not None else 255  # only reachable with an ignore index (see below)
    if encoding.colors and (raw.ndim != 3 or raw.shape[2] < 3):
        raise InputError(
            f"{where}: mask.colors is set but the mask has no RGB channels; give RGB masks or drop 'colors'."
        )
    if raw.ndim == 3 and encoding.colors:
        rgb = raw[..., :3].astype(np.int32)
        codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        out = np.full(codes.shape, 256, dtype=np.int32)
        for color, cls in encoding.colors:
            out[codes == ((color[0] << 16) | (color[1] << 8) | color[2])] = cls
        unmatched = out == 256
        if unmatched.any():
            if encoding.unmapped != "ignore":
                first = tuple(int(v) for v in rgb[unmatched][0])
                raise InputError(
                    f"{where}: {int(unmatched.sum())} pixels have colours not in mask.colors, e.g. {first}; "
                    "add them to 'colors' or set mask.unmapped: ignore."
                )
            out[unmatched] = ignore
        return out.astype(np.uint8)
    if raw.ndim == 3:
        raw = raw[..., 0]
    values = raw.astype(np.int64)
    if values.size and values.min() < 0:
        raise InputError(f"{where}: mask holds negative values (e.g. {int(values.min())}); class ids must be >= 0.")
    if encoding.threshold is not None:
        values = (values >= encoding.threshold).astype(np.int64)
    top = int(values.max(initial=0))
    lut = np.arange(top + 1, dtype=np.int64)
    if encoding.remap:
        mapped = np.zeros(top + 1, dtype=bool)
        for raw_value, cls in encoding.remap.items():
            if raw_value <= top:
                lut[raw_value] = cls
                mapped[raw_value] = True
        if encoding.unmapped != "keep":
            present = np.zeros(top + 1, dtype=bool)
            present[np.unique(values)] = True
            stray = np.flatnonzero(present & ~mapped)
            if stray.size and encoding.unmapped == "error":
                raise InputError(f"{where}: mask values {stray[:10].tolist()} are not in mask.remap; add them.")
            lut[stray] = ignore
    labels = lut[values]
    bad = labels >= num_classes
    if ignore_index is not None:
        bad &= labels != ignore_index
        if encoding.unmapped == "ignore":  # values outside the classes become the ignore index
            labels[bad] = ignore_index
            bad[:] = False
    if bad.any():
        found = np.unique(labels[bad])[:10].tolist()
        raise InputError(
            f"{where}: mask values {found} are not class indices 0..{num_classes - 1}"
            f"{f' or the ignore index {ignore_index}' if ignore_index is not None else ''}; "
            "add a mask.remap (e.g. {255: 1}), a mask.threshold for lossy masks, or mask.unmapped: ignore "
            "(with an ignore_index)."
        )
    return labels.astype(np.uint8)


def _resample(
    image: NDArray[np.uint8], labels: NDArray[np.uint8], scale: float
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    height, width = labels.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = np.asarray(resize_image(Image.fromarray(image), scale))
    labels = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
    return image, labels


def load_sample(
    manifest: DatasetManifest, sample: Sample, *, target_mpp: float | None = None
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """``(H, W, 3)`` uint8 RGB image and ``(H, W)`` uint8 class indices of one sample.

    Resampled to ``target_mpp`` (default the manifest's) when the source states its MPP and it
    differs by more than 1%.
    """
    if sample.image is not None and sample.labels is not None:
        return sample.image, sample.labels
    if sample.image_path is None or sample.mask_path is None:
        raise InputError(f"sample {sample.name!r} has neither arrays nor image and mask paths.")
    image = read_rgb(sample.image_path)
    raw = _read_mask(sample.mask_path, colours=bool(sample.source.mask.colors))
    where = f"mask {str(sample.mask_path)!r}"
    if raw.shape[:2] != image.shape[:2]:
        raise InputError(
            f"{where} is {raw.shape[1]}x{raw.shape[0]} but its image is {image.shape[1]}x{image.shape[0]}; "
            "image and mask must have the same size."
        )
    labels = decode_mask(raw, sample.source.mask, manifest.num_classes, manifest.ignore_index, where=where)
    target_mpp = manifest.target_mpp if target_mpp is None else target_mpp
    source_mpp = sample.source.mpp
    if target_mpp is not None and source_mpp is not None and abs(source_mpp / target_mpp - 1) > 0.01:
        image, labels = _resample(image, labels, source_mpp / target_mpp)
    return image, labels
