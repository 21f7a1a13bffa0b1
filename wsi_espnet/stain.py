"""H&E stain estimation in optical-density (OD) space: how far a slide's stain is from a model's training data.

A stain estimate follows Macenko et al. (2009, "A method for normalizing histology slides for
quantitative analysis", ISBI): pixels whose OD is above ``beta`` in every channel are projected onto
the plane of their two main OD directions; the robust extreme angles there (the ``alpha`` and
``100 - alpha`` percentiles) give the haematoxylin and eosin OD vectors, and each pixel's least-squares
concentrations of the two stains give their robust maxima (99th percentile). The product of a stain's
vector and its maximum concentration is that stain's darkest colour in OD space.

:func:`stain_distance` compares two estimates by those darkest colours: the larger, over the two stains,
of ``|c v - c_ref v_ref| / |c_ref v_ref|``. It grows with a change of hue (vector direction) and of
intensity (concentration) alike, is 0 for identical stain, and is what ``segment`` reports against the
model's training data (:class:`StainReference`, stored in the model config by ``train``).
:func:`normalise_stains` maps an image's stain onto a reference (Macenko normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_espnet.errors import ConfigError

__all__ = [
    "MIN_STAIN_PIXELS",
    "OD_THRESHOLD",
    "STAIN_WARN_DISTANCE",
    "StainEstimate",
    "StainReference",
    "apply_stain_transform",
    "estimate_stains",
    "normalise_stains",
    "optical_density",
    "stain_distance",
    "stain_transform",
]

#: A pixel is stained when its OD is above this in every channel (Macenko's beta).
OD_THRESHOLD = 0.15
#: Fewer tissue pixels than this above the OD threshold give no estimate (the angles would be noise).
MIN_STAIN_PIXELS = 2000
#: ``segment`` warns above this distance; chosen on the breast-tumour folds (see the model card).
STAIN_WARN_DISTANCE = 0.35


_OD_TABLE: NDArray[np.float32] = -np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)


def optical_density(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """``-log10((rgb + 1) / 256)`` per channel, float32, same shape (0 for white glass)."""
    od: NDArray[np.float32] = _OD_TABLE[rgb]
    return od


@dataclass(frozen=True)
class StainEstimate:
    """One image's (or slide's) H&E stain.

    stains : unit OD vectors (R, G, B) of haematoxylin then eosin.
    concentrations : each stain's robust maximum (99th percentile) concentration.
    pixels : stained pixels the estimate used.
    """

    stains: tuple[tuple[float, float, float], tuple[float, float, float]]
    concentrations: tuple[float, float]
    pixels: int

    @property
    def matrix(self) -> NDArray[np.float64]:
        """(2, 3): one stain's unit OD vector per row."""
        return np.asarray(self.stains, dtype=np.float64)

    def darkest(self) -> NDArray[np.float64]:
        """(2, 3): each stain's OD colour at its maximum concentration."""
        darkest: NDArray[np.float64] = self.matrix * np.asarray(self.concentrations)[:, None]
        return darkest

    def to_dict(self) -> dict[str, Any]:
        return {
            "haematoxylin_od": [round(v, 5) for v in self.stains[0]],
            "eosin_od": [round(v, 5) for v in self.stains[1]],
            "max_concentrations": [round(v, 5) for v in self.concentrations],
            "pixels": self.pixels,
        }


@dataclass(frozen=True)
class StainReference:
    """A model's training-data stain, stored in its config.

    stains, concentrations : as in :class:`StainEstimate`, over the training split.
    normalise : map each slide's stain onto this one before inference (the model was trained on
        normalised images), rather than only measure the distance.
    """

    stains: tuple[tuple[float, float, float], tuple[float, float, float]]
    concentrations: tuple[float, float]
    normalise: bool = False

    def __post_init__(self) -> None:
        stains = tuple(tuple(float(v) for v in s) for s in self.stains)
        concentrations = tuple(float(v) for v in self.concentrations)
        if len(stains) != 2 or any(len(s) != 3 for s in stains) or len(concentrations) != 2:
            raise ConfigError(
                "stain_reference needs two stain OD vectors of three values (haematoxylin, eosin) and two "
                f"max concentrations; got stains={self.stains!r}, concentrations={self.concentrations!r}."
            )
        if not all(c > 0 for c in concentrations) or not all(np.isfinite(np.asarray(stains)).ravel()):
            raise ConfigError(f"stain_reference concentrations {concentrations} must be positive finite numbers.")
        object.__setattr__(self, "stains", stains)
        object.__setattr__(self, "concentrations", concentrations)

    @classmethod
    def of(cls, estimate: StainEstimate, *, normalise: bool = False) -> StainReference:
        return cls(estimate.stains, estimate.concentrations, normalise)

    def estimate(self) -> StainEstimate:
        return StainEstimate(self.stains, self.concentrations, 0)


def estimate_stains(
    rgb: NDArray[np.uint8],
    mask: NDArray[np.bool_] | None = None,
    *,
    beta: float = OD_THRESHOLD,
    alpha: float = 1.0,
    max_pixels: int = 1_000_000,
    seed: int = 0,
) -> StainEstimate | None:
    """Macenko stain estimate of ``rgb`` (``(..., 3)`` uint8) where ``mask`` (same leading shape) is set.

    Uses at most ``max_pixels`` stained pixels (a fixed-seed sample); None when fewer than
    :data:`MIN_STAIN_PIXELS` pixels are stained (blank or nearly white input).
    """
    pixels = rgb.reshape(-1, 3)
    if mask is not None:
        pixels = pixels[mask.reshape(-1)]
    od = optical_density(pixels)
    od = od[(od > beta).all(axis=1)]
    if len(od) < MIN_STAIN_PIXELS:
        return None
    if len(od) > max_pixels:
        od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
    od64 = od.astype(np.float64)
    _, vectors = np.linalg.eigh(np.cov(od64, rowvar=False))
    plane = vectors[:, [2, 1]]  # the two largest eigenvalues' directions
    plane[:, 0] *= np.sign(plane[:, 0].sum()) or 1.0  # the main direction points into positive OD
    plane[:, 1] *= np.sign(plane[:, 1].sum()) or 1.0
    projected = od64 @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [alpha, 100 - alpha])
    ends = [plane @ np.array([np.cos(a), np.sin(a)]) for a in (low, high)]
    ends = [v / np.linalg.norm(v) for v in ends]
    # Haematoxylin absorbs red more than eosin does: it is the vector with the larger R component.
    haematoxylin, eosin = sorted(ends, key=lambda v: -v[0])
    matrix = np.stack([haematoxylin, eosin])
    concentrations, *_ = np.linalg.lstsq(matrix.T, od64.T, rcond=None)
    maxima = np.percentile(concentrations, 99, axis=1)
    if not np.all(maxima > 0):
        return None
    return StainEstimate(
        (tuple(float(v) for v in haematoxylin), tuple(float(v) for v in eosin)),  # type: ignore[arg-type]
        (float(maxima[0]), float(maxima[1])),
        len(od),
    )


def stain_distance(estimate: StainEstimate, reference: StainEstimate | StainReference) -> float:
    """The larger, over H and E, of the relative OD distance between the two stains' darkest colours."""
    ref = reference.estimate() if isinstance(reference, StainReference) else reference
    ours, theirs = estimate.darkest(), ref.darkest()
    return float(np.max(np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)))


def stain_transform(source: StainEstimate, reference: StainEstimate | StainReference) -> NDArray[np.float32]:
    """The (3, 3) OD-space map of Macenko normalisation from ``source``'s stain to ``reference``'s.

    Row vector ``od`` maps to ``od @ T``: the pixel's concentrations under ``source`` (pseudo-inverse of
    its stain vectors), rescaled to the reference's maxima, recoloured with the reference's vectors. What
    the two stains do not explain (the OD off their plane) is kept as it is, so an image normalised to its
    own stain is unchanged.
    """
    ref = reference.estimate() if isinstance(reference, StainReference) else reference
    scale = np.asarray(ref.concentrations) / np.asarray(source.concentrations)
    to_concentrations = np.linalg.pinv(source.matrix.T).T  # (3, 2): od @ it = concentrations
    residual = np.eye(3) - to_concentrations @ source.matrix  # od @ it = the part off the stain plane
    transform: NDArray[np.float32] = ((to_concentrations * scale) @ ref.matrix + residual).astype(np.float32)
    return transform


def apply_stain_transform(rgb: NDArray[np.uint8], transform: NDArray[np.floating[Any]]) -> NDArray[np.uint8]:
    """``rgb`` (``(..., 3)`` uint8) mapped through a :func:`stain_transform` in OD space; white stays white.

    Output channel j is ``256 * 10**-(sum_c od_c * T[c, j]) - 1``, and the power of a sum is a product of
    powers, so each channel is three 256-entry table look-ups multiplied: about 0.1 s for a 1968 x 1968
    segment window, where the float matrix product took over a second.
    """
    tables = np.power(np.float32(10.0), -_OD_TABLE[:, None, None] * np.asarray(transform, dtype=np.float32)[None])
    # tables[v, c, j]: the factor input value v of channel c contributes to output channel j.
    planes = [rgb[..., c] for c in range(3)]
    out = np.empty(rgb.shape, dtype=np.uint8)
    for j in range(3):
        channel = tables[:, 0, j][planes[0]]
        channel *= tables[:, 1, j][planes[1]]
        channel *= tables[:, 2, j][planes[2]]
        channel *= 256.0
        channel -= 1.0
        np.clip(channel, 0, 255, out=channel)
        out[..., j] = np.rint(channel, out=channel)
    return out


def normalise_stains(
    rgb: NDArray[np.uint8], source: StainEstimate, reference: StainEstimate | StainReference
) -> NDArray[np.uint8]:
    """``rgb`` (``(..., 3)`` uint8) with its stain (``source``) replaced by ``reference``'s (Macenko)."""
    return apply_stain_transform(rgb, stain_transform(source, reference))
