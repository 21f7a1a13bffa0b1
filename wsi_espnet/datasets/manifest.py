"""Dataset manifests: declarative YAML descriptions of labelled segmentation datasets.

A manifest names the classes (and their colours), the ignore index, where each split's images and
masks are, how raw mask values become class indices (thresholds for lossy JPEG masks, remapping,
RGB colour codes) and, for histology, the micrometres per pixel of the images and the one to train
at. It is validated against ``manifest.schema.json`` (JSON Schema 2020-12) before anything is read,
so a typo is reported with its place in the file. Paths are relative to the manifest's folder and
may use ``${VAR}`` or ``${VAR:-default}`` from the environment.

Example (CamVid, see ``data_manifests/camvid.yaml``)::

    manifest_version: 1
    name: camvid
    kind: street
    classes: [{name: sky, color: [128, 128, 128]}, ...]
    ignore_index: 11
    sources:
      - layout: paired_folders
        root: ${WSI_ESPNET_TEST_DATA:-../../shared/data}/street/camvid
        splits:
          train: {images: train, masks: trainannot}
          val: {images: val, masks: valannot}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml

from wsi_espnet.errors import InputError
from wsi_espnet.models.config import Preprocessing, default_palette
from wsi_espnet.yaml_documents import expand_env, resolve_path

__all__ = [
    "ClassSpec",
    "DatasetManifest",
    "FolderSplit",
    "MaskEncoding",
    "SlideEntry",
    "SlideSplit",
    "SourceSpec",
    "expand_env",
    "load_manifest",
    "manifest_schema",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@cache
def manifest_schema() -> dict[str, Any]:
    """The JSON Schema every manifest is validated against."""
    schema: dict[str, Any] = json.loads((Path(__file__).with_name("manifest.schema.json")).read_text())
    return schema


@dataclass(frozen=True)
class ClassSpec:
    name: str
    color: tuple[int, int, int]
    description: str = ""


@dataclass(frozen=True)
class MaskEncoding:
    """How a source's raw mask values become class indices, applied in this order.

    colors : RGB-coded masks: colour -> class (a 3-channel mask without ``colors`` uses its first channel).
    threshold : lossy binary masks: raw >= threshold -> 1, else 0.
    remap : raw value -> class index (or the ignore index).
    unmapped : values absent from ``remap``/``colors``: "keep" them, turn them into the "ignore" index,
        or raise an "error".
    """

    colors: tuple[tuple[tuple[int, int, int], int], ...] = ()
    threshold: int | None = None
    remap: Mapping[int, int] = field(default_factory=dict)
    unmapped: Literal["keep", "ignore", "error"] = "keep"


@dataclass(frozen=True)
class FolderSplit:
    images: Path
    masks: Path
    files: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class SlideEntry:
    slide: Path
    annotations: Path
    mpp: float | None = None


@dataclass(frozen=True)
class SlideSplit:
    slides: tuple[SlideEntry, ...]


@dataclass(frozen=True)
class SourceSpec:
    """One folder of pairs (or one set of annotated slides) inside a manifest."""

    name: str
    layout: Literal["paired_folders", "annotated_slides"]
    root: Path
    splits: Mapping[str, FolderSplit | SlideSplit]
    mask: MaskEncoding = MaskEncoding()
    mpp: float | None = None
    image_suffix: str | None = None
    mask_suffix: str | None = None
    recursive: bool = False
    class_map: Mapping[str, str | int] = field(default_factory=dict)
    unannotated: str | None = None
    tile_size: int = 512


@dataclass(frozen=True)
class DatasetManifest:
    """A validated manifest; see the module docstring."""

    path: Path
    name: str
    kind: Literal["street", "histology"]
    classes: tuple[ClassSpec, ...]
    sources: tuple[SourceSpec, ...]
    ignore_index: int | None = None
    target_mpp: float | None = None
    normalisation: Preprocessing | None = None
    description: str = ""
    licence: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def class_colors(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(c.color for c in self.classes)

    @property
    def split_names(self) -> tuple[str, ...]:
        names: dict[str, None] = {}
        for source in self.sources:
            names.update(dict.fromkeys(source.splits))
        return tuple(names)

    def check_split(self, split: str) -> None:
        """Raise :class:`InputError` unless some source has ``split``."""
        if split not in self.split_names:
            raise InputError(
                f"manifest {str(self.path)!r} has no split {split!r}; its splits are: {', '.join(self.split_names)}."
            )


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"manifest {str(path)!r} does not exist; give the path of a dataset manifest (.yaml).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"manifest {str(path)!r} is not valid YAML: {exc}") from exc
    try:  # JSON's data model: integer keys (remap: {255: 1}) become strings, as the schema expects
        return json.loads(json.dumps(data))
    except (TypeError, ValueError) as exc:
        raise InputError(f"manifest {str(path)!r} holds a value YAML reads as a non-JSON type: {exc}.") from exc


def _schema_error_message(path: Path, error: jsonschema.ValidationError) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".") or "top level"
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        message = (
            "a split needs either 'images' and 'masks' (paired_folders) or 'slides' (annotated_slides), "
            f"got keys {sorted(error.instance)}"
        )
    else:
        message = error.message
    return f"manifest {str(path)!r} is not valid at {where}: {message}. See wsi_espnet/datasets/manifest.schema.json."


def _parse_mask(raw: Mapping[str, Any], num_classes: int, ignore_index: int | None, where: str) -> MaskEncoding:
    remap = {int(k): int(v) for k, v in raw.get("remap", {}).items()}
    colors = tuple((tuple(entry["color"]), int(entry["class"])) for entry in raw.get("colors", []))
    unmapped = raw.get("unmapped", "keep")
    if unmapped == "ignore" and ignore_index is None:
        raise InputError(f"{where}: mask.unmapped is 'ignore' but the manifest has no ignore_index; set one.")
    for target in [*remap.values(), *(c for _, c in colors)]:
        if target >= num_classes and target != ignore_index:
            raise InputError(
                f"{where}: mask maps a value to class {target}, but there are {num_classes} classes "
                f"(0..{num_classes - 1}) and the ignore index is {ignore_index}."
            )
    return MaskEncoding(colors=colors, threshold=raw.get("threshold"), remap=remap, unmapped=unmapped)


def _parse_split(raw: Mapping[str, Any], root: Path, where: str) -> FolderSplit | SlideSplit:
    if "slides" in raw:
        entries = tuple(
            SlideEntry(
                slide=resolve_path(root, entry["slide"], where=where),
                annotations=resolve_path(root, entry["annotations"], where=where),
                mpp=entry.get("mpp"),
            )
            for entry in raw["slides"]
        )
        return SlideSplit(entries)
    files = raw.get("files")
    return FolderSplit(
        images=root / raw["images"],
        masks=root / raw["masks"],
        files=None if files is None else tuple(map(str, files)),
        exclude=tuple(map(str, raw.get("exclude", ()))),
    )


def load_manifest(path: str | os.PathLike[str]) -> DatasetManifest:
    """Read, validate and resolve a dataset manifest (no image is opened yet)."""
    path = Path(path).expanduser().resolve()
    raw = _read_yaml(path)
    try:
        jsonschema.validate(raw, manifest_schema(), cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as exc:
        best = jsonschema.exceptions.best_match([exc])
        raise InputError(_schema_error_message(path, best)) from None

    palette = default_palette(len(raw["classes"]))
    classes = tuple(
        ClassSpec(entry["name"], tuple(entry.get("color", palette[i])), entry.get("description", ""))
        for i, entry in enumerate(raw["classes"])
    )
    names = [c.name.lower() for c in classes]
    if len(set(names)) != len(names):
        raise InputError(f"manifest {str(path)!r} names a class twice: {[c.name for c in classes]}.")
    ignore_index = raw.get("ignore_index")
    if ignore_index is not None and ignore_index < len(classes):
        raise InputError(
            f"manifest {str(path)!r}: ignore_index {ignore_index} is also class {classes[ignore_index].name!r}; "
            f"use a value >= {len(classes)} (e.g. 255)."
        )

    sources = []
    for i, src in enumerate(raw["sources"]):
        where = f"manifest {str(path)!r} sources[{i}]"
        root = resolve_path(path.parent, src["root"], where=where)
        if not root.is_dir():
            raise InputError(f"{where}: root folder {str(root)!r} does not exist; fix 'root' or the variables it uses.")
        layout = src["layout"]
        splits = {name: _parse_split(spec, root, where) for name, spec in src["splits"].items()}
        expected = SlideSplit if layout == "annotated_slides" else FolderSplit
        for name, split in splits.items():
            if not isinstance(split, expected):
                raise InputError(
                    f"{where}: split {name!r} does not fit layout {layout!r} "
                    f"({'slides' if layout == 'annotated_slides' else 'images and masks'} expected)."
                )
        if layout == "annotated_slides" and ignore_index is None:
            raise InputError(
                f"{where}: annotated slides need an ignore_index (e.g. 255) for pixels outside the annotations "
                "and past the slide's edge."
            )
        unannotated = src.get("unannotated")
        if unannotated is not None and unannotated.lower() not in names:
            raise InputError(f"{where}: unannotated class {unannotated!r} is not one of {[c.name for c in classes]}.")
        sources.append(
            SourceSpec(
                name=src.get("name", root.name),
                layout=layout,
                root=root,
                splits=splits,
                mask=_parse_mask(src.get("mask", {}), len(classes), ignore_index, where),
                mpp=src.get("mpp"),
                image_suffix=src.get("image_suffix"),
                mask_suffix=src.get("mask_suffix"),
                recursive=src.get("recursive", False),
                class_map=src.get("class_map", {}),
                unannotated=unannotated,
                tile_size=src.get("tile_size", 512),
            )
        )

    norm = raw.get("normalisation")
    normalisation = (
        None
        if norm is None
        else Preprocessing(
            channel_order=norm.get("channel_order", "RGB"), mean=tuple(norm["mean"]), std=tuple(norm["std"])
        )
    )
    target_mpp = raw.get("target_mpp")
    if target_mpp is not None:
        for source in sources:
            if source.layout == "paired_folders" and source.mpp is None:
                raise InputError(
                    f"manifest {str(path)!r}: target_mpp is {target_mpp} but source {source.name!r} has no 'mpp'; "
                    "give the micrometres per pixel of its images."
                )
    return DatasetManifest(
        path=path,
        name=raw["name"],
        kind=raw["kind"],
        classes=classes,
        sources=tuple(sources),
        ignore_index=ignore_index,
        target_mpp=target_mpp,
        normalisation=normalisation,
        description=raw.get("description", ""),
        licence=raw.get("licence", ""),
    )
