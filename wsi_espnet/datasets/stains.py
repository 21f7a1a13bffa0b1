"""The H&E stain of a histology dataset: each source's (:func:`estimate_source_stains`) and the pooled
training stain a model stores as its reference (:func:`pooled_stain`); see :mod:`wsi_espnet.stain`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from wsi_espnet.datasets.manifest import DatasetManifest
from wsi_espnet.datasets.samples import Sample, load_sample
from wsi_espnet.stain import OD_THRESHOLD, StainEstimate, estimate_stains, optical_density

__all__ = ["estimate_source_stains", "pooled_stain"]


#: Stained pixels kept per image (a fixed-seed sample).
_STAIN_PIXELS_PER_IMAGE = 200_000


def _stained_pixels(image: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    pixels = image.reshape(-1, 3)
    pixels = pixels[(optical_density(pixels) > OD_THRESHOLD).all(axis=1)]
    if len(pixels) > _STAIN_PIXELS_PER_IMAGE:
        pixels = pixels[rng.choice(len(pixels), _STAIN_PIXELS_PER_IMAGE, replace=False)]
    return pixels


def _source_pixels(
    manifest: DatasetManifest, samples: Sequence[Sample], target_mpp: float | None = None
) -> dict[str, NDArray[np.uint8]]:
    rng = np.random.default_rng(0)
    by_source: dict[str, list[NDArray[np.uint8]]] = {}
    for sample in samples:
        image, _ = load_sample(manifest, sample, target_mpp=target_mpp)
        by_source.setdefault(sample.source.name, []).append(_stained_pixels(image, rng))
    return {name: np.concatenate(parts) for name, parts in by_source.items()}


def estimate_source_stains(
    manifest: DatasetManifest, samples: Sequence[Sample], *, target_mpp: float | None = None
) -> dict[str, StainEstimate | None]:
    """Each source's stain, estimated over all its images among ``samples`` at ``target_mpp`` (default the
    manifest's).

    A source is one lab's (or scanner's) images; its images are pooled because single small tiles hold too
    few stained pixels for a stable estimate (224-px BCSS tiles at 1 um/px hold about 3000).
    """
    return {name: estimate_stains(pixels) for name, pixels in _source_pixels(manifest, samples, target_mpp).items()}


def pooled_stain(manifest: DatasetManifest, samples: Sequence[Sample]) -> StainEstimate | None:
    """The average stain of the sources among ``samples``: each source's estimate, then the mean of their
    H and E vectors (renormalised) and of their maximum concentrations, every source weighted alike.

    Averaging estimates rather than estimating once over all pixels matters: Macenko's robust extreme
    angles over a mixture of two labs' stains pick out the most extreme of each, a stain neither lab has.
    """
    estimates = [e for e in estimate_source_stains(manifest, samples).values() if e is not None]
    if not estimates:
        return None
    vectors = np.mean([e.matrix for e in estimates], axis=0)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    concentrations = np.mean([e.concentrations for e in estimates], axis=0)
    return StainEstimate(
        (tuple(float(v) for v in vectors[0]), tuple(float(v) for v in vectors[1])),  # type: ignore[arg-type]
        (float(concentrations[0]), float(concentrations[1])),
        sum(e.pixels for e in estimates),
    )
