"""The on-disk OME-Zarr store a segmentation run writes into, and its resume bookkeeping.

Layout (OME-NGFF 0.5 on zarr v3)::

    <slide>.zarr/                      root: attrs {"ome": {"version": "0.5"}, "wsi_espnet": {status, run_key, ...}}
      labels/tissue_classes/0, 1, ...  the mask pyramid (uint8, dims y, x); level 0 written tile by tile
      labels/tissue/0, ...             the tissue mask (0/1) at the tissue detector's resolution
      wsi_espnet_progress              one uint8 per tile: 1 once the tile's labels are written
      wsi_espnet_confidence            per tile, tissue pixels per top-class probability percent (0-100)

A tile's progress flag is set only after its labels are stored, so after a crash every flagged tile
is complete and every unflagged one is recomputed. ``status`` becomes ``"complete"`` only after the
pyramid and every derived output exist; until then the store says ``"running"``, so a partial run is
never mistaken for a finished one. ``run_key`` fingerprints the inputs and settings: a store is only
resumed by the run that started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray

from wsi_espnet.errors import InputError

__all__ = ["CLASSES_LABEL", "CONFIDENCE_BINS", "TISSUE_LABEL", "LabelStore", "run_lock"]

CLASSES_LABEL = "tissue_classes"
TISSUE_LABEL = "tissue"
PROGRESS = "wsi_espnet_progress"
CONFIDENCE = "wsi_espnet_confidence"
#: Confidence histograms count pixels per whole percent of top-class probability, 0 to 100.
CONFIDENCE_BINS = 101
_ATTRS = "wsi_espnet"


class LabelStore:
    """A segmentation run's zarr store at ``path``; see the module docstring for its layout."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- creation and state ---------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        shape: tuple[int, int],
        chunk: int,
        tile_grid: tuple[int, int],
        run_key: str,
        attrs: dict[str, Any],
    ) -> LabelStore:
        """Start a fresh store (an existing folder at ``path`` is replaced) with empty labels.

        The new store is built beside ``path`` and renamed into place, and an old one is renamed away
        before it is deleted, so a kill at any moment leaves either no store or a whole one at ``path``,
        never an old store missing some of its chunks.
        """
        path = Path(path)
        building = path.with_name(f".{path.name}.new-{uuid.uuid4().hex}")
        root = zarr.open_group(building, mode="w", zarr_format=3)
        root.attrs.update({"ome": {"version": "0.5"}, _ATTRS: {**attrs, "status": "running", "run_key": run_key}})
        labels = root.create_group("labels")
        labels.attrs.update({"ome": {"version": "0.5", "labels": []}})
        labels.create_group(CLASSES_LABEL).create_array(
            "0", shape=shape, chunks=(chunk, chunk), dtype="uint8", fill_value=0, dimension_names=("y", "x")
        )
        root.create_array(PROGRESS, shape=tile_grid, chunks=(1, 1), dtype="uint8", fill_value=0, compressors=None)
        root.create_array(
            CONFIDENCE, shape=(*tile_grid, CONFIDENCE_BINS), chunks=(1, 1, CONFIDENCE_BINS), dtype="uint32",
            fill_value=0,
        )  # fmt: skip
        if path.exists():
            retired = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            path.rename(retired)
            building.rename(path)
            shutil.rmtree(retired)
        else:
            building.rename(path)
        return cls(path)

    def _root(self, mode: str = "r") -> zarr.Group:
        try:
            return zarr.open_group(self.path, mode=mode, zarr_format=3)  # type: ignore[arg-type]
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
            raise InputError(f"{str(self.path)!r} is not a wsi-espnet output store ({exc}).") from exc

    def state(self) -> dict[str, Any] | None:
        """The store's ``wsi_espnet`` attributes (status, run_key, ...), or None if there is no store."""
        if not (self.path / "zarr.json").is_file():
            return None
        attrs = self._root().attrs.get(_ATTRS)
        return dict(attrs) if isinstance(attrs, dict) else None

    def update_state(self, **values: Any) -> None:
        root = self._root("r+")
        current = root.attrs.get(_ATTRS, {})
        root.attrs[_ATTRS] = {**(current if isinstance(current, dict) else {}), **values}

    def mark_running(self) -> None:
        """Say the store is being written (again), e.g. before re-deriving outputs on resume."""
        self.update_state(status="running")

    def mark_complete(self, **values: Any) -> None:
        """The last write of a run: everything the store and its derived files hold is final."""
        self.update_state(**values, status="complete")

    # -- arrays -----------------------------------------------------------------------------------
    def group(self, *names: str, mode: str = "r") -> zarr.Group:
        node = self._root(mode)
        for name in names:
            node = node[name]  # type: ignore[assignment]
        return node

    def _array(self, *parts: str, mode: str = "r") -> zarr.Array[Any]:
        try:
            return zarr.open_array(self.path.joinpath(*parts), mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.ArrayNotFoundError, ValueError) as exc:
            raise InputError(f"{str(self.path)!r} is not a wsi-espnet output store ({exc}).") from exc

    def labels(self, level: int = 0, *, mode: str = "r") -> zarr.Array[Any]:
        """Level ``level`` of the class mask pyramid."""
        return self._array("labels", CLASSES_LABEL, str(level), mode=mode)

    def write_tile(
        self, row: int, col: int, top: int, left: int, labels: NDArray[np.uint8],
        confidence: NDArray[np.integer[Any]] | None = None,
    ) -> None:  # fmt: skip
        """Store one tile's labels and its confidence histogram (tissue pixels per top-class probability
        percent, :data:`CONFIDENCE_BINS` counts), then flag the tile done (in that order, for crash safety)."""
        self.labels(mode="r+")[top : top + labels.shape[0], left : left + labels.shape[1]] = labels
        if confidence is not None:
            self._array(CONFIDENCE, mode="r+")[row, col] = confidence.astype(np.uint32)
        self._array(PROGRESS, mode="r+")[row, col] = 1

    def confidence_histogram(self) -> NDArray[np.int64]:
        """Tissue pixels per top-class probability percent (0-100) over every stored tile, (101,) int64."""
        histogram: NDArray[np.int64] = np.asarray(self._array(CONFIDENCE)[...], dtype=np.int64).sum(axis=(0, 1))
        return histogram

    def done_tiles(self) -> NDArray[np.bool_]:
        """(tile rows, tile cols) bool: True for tiles whose labels are stored."""
        done: NDArray[np.bool_] = np.asarray(self._array(PROGRESS)[...]) == 1
        return done

    def write_tissue_mask(self, mask: NDArray[np.bool_]) -> zarr.Array[Any]:
        """Store the tissue mask (0/1 uint8) as the label image ``labels/tissue`` level 0."""
        group = self.group("labels", mode="r+").require_group(TISSUE_LABEL)
        array = group.create_array(
            "0", shape=mask.shape, chunks=(min(2048, mask.shape[0]), min(2048, mask.shape[1])), dtype="uint8",
            fill_value=0, dimension_names=("y", "x"), overwrite=True,
        )  # fmt: skip
        array[...] = mask.astype(np.uint8)
        return array


@contextlib.contextmanager
def run_lock(store_path: Path) -> Iterator[None]:
    """Hold ``<store>.lock`` for one run, so two runs never write one store at the same time.

    The lock file names its holder (host and pid). A lock left by a dead process on this host is
    taken over; one held by a live process, or by another host, is an :class:`InputError`.
    """
    lock = store_path.with_name(store_path.name + ".lock")
    me = f"{socket.gethostname()}:{os.getpid()}"
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = lock.read_text(errors="replace").strip() if lock.exists() else ""
        host, _, pid = holder.partition(":")
        if not (host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))):
            raise InputError(
                f"another wsi-espnet run ({holder or 'unknown'}) is writing {store_path.name}; wait for it to finish, "
                f"or, if it is no longer running, delete {lock} and rerun."
            ) from None
        lock.unlink(missing_ok=True)  # left by a killed run on this host: take it over
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(me)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
