"""Label-safe multiscale pyramids of a mask stored in zarr.

A label mask cannot be averaged (the mean of "stroma" and "necrosis" is no class), so each coarser
level takes the most frequent value of every ``2 x 2`` block. Ties go to the smallest non-zero value,
so tissue wins over "no tissue" and the result never depends on chunking or thread order. Levels are
built chunk by chunk with Dask: memory stays bounded by a few chunks whatever the slide size.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import zarr
from numpy.typing import NDArray

from wsi_espnet.errors import InputError

__all__ = ["build_label_pyramid", "downsample_labels"]


def downsample_labels(block: NDArray[np.integer[Any]], factor: int = 2) -> NDArray[np.integer[Any]]:
    """Mode-downsample a label image by an integer ``factor``.

    Parameters
    ----------
    block : (H, W) integer array
        Labels; never modified.
    factor : int
        Side of the square neighbourhood that becomes one output pixel.

    Returns
    -------
    (ceil(H / factor), ceil(W / factor)) array of ``block.dtype``
        The most frequent value of each ``factor x factor`` neighbourhood (the last row and column of
        neighbourhoods are partial when H or W is not a multiple of ``factor``). Ties go to the
        smallest non-zero value; 0 wins only with a strict majority over every other value.
    """
    if not isinstance(block, np.ndarray) or block.ndim != 2 or not np.issubdtype(block.dtype, np.integer):
        got = f"{block.dtype} array of shape {block.shape}" if isinstance(block, np.ndarray) else type(block).__name__
        raise InputError(f"expected a 2-D integer label array, got a {got}.")
    if isinstance(factor, bool) or not isinstance(factor, int | np.integer) or factor < 1:
        raise InputError(f"factor={factor!r} must be a positive integer.")
    if factor == 1:
        return block.copy()
    rows, cols = block.shape
    out_rows, out_cols = -(-rows // factor), -(-cols // factor)
    padded = np.pad(block, ((0, out_rows * factor - rows), (0, out_cols * factor - cols)), mode="edge")
    # One (out_rows, out_cols) plane per position inside the neighbourhood: the candidates for the mode.
    neighbourhoods = padded.reshape(out_rows, factor, out_cols, factor).transpose(1, 3, 0, 2)
    candidates = neighbourhoods.reshape(factor * factor, out_rows, out_cols)
    # Positions beyond the image edge (the padding) neither vote nor win.
    row_inside = np.arange(out_rows * factor).reshape(out_rows, factor) < rows
    col_inside = np.arange(out_cols * factor).reshape(out_cols, factor) < cols
    inside = np.stack([row_inside[:, i, None] & col_inside[None, :, j] for i in range(factor) for j in range(factor)])

    # Votes for each candidate: how many positions of its neighbourhood hold the same value.
    votes = inside.astype(np.int16)
    for j in range(len(candidates)):
        for k in range(j + 1, len(candidates)):
            same = candidates[j] == candidates[k]
            votes[j] += same & inside[k]
            votes[k] += same & inside[j]
    votes *= inside

    winner: NDArray[np.integer[Any]] = candidates[0].copy()
    best_votes = votes[0].copy()
    for value, count in zip(candidates[1:], votes[1:], strict=True):
        prefer = (value != 0) & ((winner == 0) | (value < winner))  # the tie rule
        better = (count > best_votes) | ((count == best_votes) & prefer)
        winner = np.where(better, value, winner)
        best_votes = np.where(better, count, best_votes)
    return winner


def build_label_pyramid(
    group: zarr.Group, *, base: str = "0", min_size: int = 256, chunk: int | None = None
) -> list[str]:
    """Write halved levels ``"1"``, ``"2"``, ... next to ``group[base]`` until they fit ``min_size``.

    Each level is :func:`downsample_labels` of the previous one with ``factor=2``; its shape is
    ``ceil(previous / 2)``. Levels stop once the longest side is ``<= min_size``. Existing arrays of
    the same names are overwritten, so a rerun produces identical output.

    Parameters
    ----------
    group : zarr.Group
        Holds the base level, a 2-D integer array named ``base`` (an integer string, e.g. ``"0"``).
    base : str
        Name of the full-resolution level; new levels are named ``int(base) + 1``, ``+ 2``, ...
    min_size : int
        Stop when the longest side of the last level is at most this many pixels.
    chunk : int, optional
        Square chunk side of the new levels; by default the base's chunks (and shards, if any).

    Returns
    -------
    list of str
        All level paths, base first, from largest to smallest.

    Notes
    -----
    Compressors, filters, serializer, fill value and dimension names are copied from the base.
    Every Dask task reads a ``2 x 2`` block of write units (shards if the level is sharded, chunks
    otherwise) of the finer level and writes one unit, so no two tasks touch the same stored object.
    """
    source = group.get(base)
    if not isinstance(source, zarr.Array):
        raise InputError(f"base={base!r} is not an array in group {group.path or '/'!r}; found {sorted(group)}.")
    if not base.isdigit():
        raise InputError(f"base={base!r} must be an integer level name such as '0' so levels can be numbered.")
    if source.ndim != 2 or not np.issubdtype(source.dtype, np.integer):
        raise InputError(
            f"level {base!r} must be a 2-D integer (y, x) label array, got {source.dtype} of shape {source.shape}."
        )
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise InputError(f"min_size={min_size!r} must be a positive integer number of pixels.")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise InputError(f"chunk={chunk!r} must be a positive integer number of pixels, or None for the base's.")

    chunks = source.chunks if chunk is None else (chunk, chunk)
    shards = source.shards if chunk is None else None
    codec_options: dict[str, Any] = {"compressors": source.compressors, "filters": source.filters}
    if source.metadata.zarr_format == 3:
        codec_options["serializer"] = source.serializer
        codec_options["dimension_names"] = source.metadata.dimension_names

    paths = [base]
    finer: zarr.Array[Any] = source
    while max(finer.shape) > min_size:
        name = str(int(paths[-1]) + 1)
        coarser = group.create_array(
            name,
            shape=tuple(-(-side // 2) for side in finer.shape),
            dtype=source.dtype,
            chunks=chunks,
            shards=shards,
            fill_value=source.fill_value,
            overwrite=True,
            **codec_options,
        )
        write_unit = coarser.shards or coarser.chunks
        lazy = da.from_zarr(finer, chunks=tuple(2 * side for side in write_unit))  # type: ignore[no-untyped-call]
        halved = lazy.map_blocks(
            downsample_labels,
            dtype=source.dtype,
            chunks=tuple(tuple(-(-side // 2) for side in sides) for sides in lazy.chunks),
            meta=np.empty((0, 0), dtype=source.dtype),
        )
        da.store(halved, coarser, lock=False)  # type: ignore[arg-type]
        paths.append(name)
        finer = coarser
    return paths
