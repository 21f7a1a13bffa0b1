"""How far to trust a slide's mask: the share of tissue the model was unsure of, and the slide's stain
distance from the model's training data.

Both figures go into the provenance and the summary, with a warning when either passes its threshold
(chosen on the default breast model's leave-one-source-out folds; see its model card):

- **low confidence**: the fraction of tissue pixels whose top-class probability is below
  :data:`LOW_CONFIDENCE_BELOW`, from the per-tile histograms the label store keeps (so a resumed run
  counts every tile). Warned above :data:`LOW_CONFIDENCE_WARN_FRACTION`.
- **stain distance**: :func:`~wsi_espnet.stain.stain_distance` between the slide's Macenko estimate
  (:attr:`SlidePlan.stain`) and the model's ``stain_reference``. Warned above
  :data:`~wsi_espnet.stain.STAIN_WARN_DISTANCE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_espnet.models.config import ModelConfig
from wsi_espnet.segmentation.planning import SlidePlan
from wsi_espnet.stain import STAIN_WARN_DISTANCE, stain_distance, stain_transform

__all__ = [
    "LOW_CONFIDENCE_BELOW", "LOW_CONFIDENCE_WARN_FRACTION", "Reliability", "reliability", "slide_stain_transform",
]  # fmt: skip

#: A pixel is low-confidence when its top-class probability is below this.
LOW_CONFIDENCE_BELOW = 0.75
#: ``segment`` warns when more than this fraction of a slide's tissue is low-confidence.
LOW_CONFIDENCE_WARN_FRACTION = 0.4


@dataclass(frozen=True)
class Reliability:
    """A slide's confidence and stain figures (see the module docstring) and the warnings they raise."""

    tissue_pixels: int
    low_confidence_fraction: float | None
    mean_confidence: float | None
    stain_distance: float | None
    record: dict[str, Any]
    warnings: tuple[str, ...] = field(default=())


def slide_stain_transform(plan: SlidePlan, config: ModelConfig) -> tuple[tuple[float, float, float], ...] | None:
    """The slide's stain normalisation for a model trained on normalised images, else None."""
    reference = config.stain_reference
    if reference is None or not reference.normalise or plan.stain is None:
        return None
    return tuple((float(r[0]), float(r[1]), float(r[2])) for r in stain_transform(plan.stain, reference))


def reliability(plan: SlidePlan, config: ModelConfig, histogram: NDArray[np.integer[Any]]) -> Reliability:
    """The figures for one slide from its plan, the model's config and the store's confidence histogram."""
    counts = np.asarray(histogram, dtype=np.int64)
    tissue = int(counts.sum())
    low = int(counts[: round(LOW_CONFIDENCE_BELOW * 100)].sum())  # percents 0..74: p < 0.75
    low_fraction = low / tissue if tissue else None
    centres = np.minimum(np.arange(len(counts)) + 0.5, 100.0)  # bin k holds [k, k + 1) percent; 100 is p = 1
    mean = float((counts * centres).sum() / tissue / 100) if tissue else None
    warnings = []
    if low_fraction is not None and low_fraction > LOW_CONFIDENCE_WARN_FRACTION:
        warnings.append(
            f"the model is unsure (top-class probability below {LOW_CONFIDENCE_BELOW:.2f}) on {low_fraction:.0%} of "
            f"the tissue (warned above {LOW_CONFIDENCE_WARN_FRACTION:.0%}); review the mask before using its areas"
        )
    reference, stain = config.stain_reference, plan.stain
    distance = stain_distance(stain, reference) if stain is not None and reference is not None else None
    if distance is not None and distance > STAIN_WARN_DISTANCE:
        warnings.append(
            f"the slide's stain is far from the model's training data (OD-space distance {distance:.2f}, warned "
            f"above {STAIN_WARN_DISTANCE:.2f}); expect lower accuracy, or train a model on this lab's slides"
        )
    record = {
        "confidence": {
            "low_below": LOW_CONFIDENCE_BELOW, "low_confidence_fraction": low_fraction, "mean_top_probability": mean,
            "tissue_pixels": tissue, "warn_above": LOW_CONFIDENCE_WARN_FRACTION,
            "histogram_percent": counts.tolist(),
        },
        "stain": {
            "slide": None if stain is None else stain.to_dict(),
            "reference": None if reference is None else {
                "haematoxylin_od": list(reference.stains[0]), "eosin_od": list(reference.stains[1]),
                "max_concentrations": list(reference.concentrations),
            },
            "distance": distance, "warn_above": STAIN_WARN_DISTANCE,
            "normalised": slide_stain_transform(plan, config) is not None,
        },
        "warnings": warnings,
    }  # fmt: skip
    return Reliability(tissue, low_fraction, mean, distance, record, tuple(warnings))
