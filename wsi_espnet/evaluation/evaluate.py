"""Evaluate a model on a manifest split: whole images, one global confusion matrix, reports.

Images are evaluated at the model's micrometres per pixel (histology models) or the manifest's;
the ignore index is excluded. A model may have more outputs than the manifest has classes (the
original CamVid checkpoint's twelfth, "void" output): such predictions count as misses.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_espnet.datasets.manifest import DatasetManifest
from wsi_espnet.datasets.samples import list_samples, load_sample
from wsi_espnet.datasets.stains import estimate_source_stains
from wsi_espnet.errors import InputError
from wsi_espnet.evaluation.confusion import ConfusionMatrix
from wsi_espnet.evaluation.report import render_confusion_png, write_metrics_json
from wsi_espnet.inference.predict import predict_logits, preprocess
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.stain import normalise_stains

__all__ = ["evaluate_split", "write_evaluation"]


def evaluate_split(
    model: nn.Module, config: ModelConfig, manifest: DatasetManifest, split: str, *, progress: bool = False
) -> ConfusionMatrix:
    """Accumulate the confusion matrix of ``model`` over every image of ``split``.

    A model trained on stain-normalised images (``config.stain_reference.normalise``) sees each source's
    images normalised to its reference, each source's stain estimated over its images in ``split``.
    """
    if config.num_classes < manifest.num_classes:
        raise InputError(
            f"model {config.name!r} has {config.num_classes} classes but manifest {manifest.name!r} has "
            f"{manifest.num_classes}; evaluate with a model trained for this class set."
        )
    target_mpp = config.target_mpp or manifest.target_mpp
    samples = list_samples(manifest, split, target_mpp=target_mpp)
    confusion = ConfusionMatrix(
        manifest.num_classes, num_predicted=config.num_classes, ignore_index=manifest.ignore_index
    )
    iterator: Any = samples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(samples, desc=f"evaluate {split}", unit="image", leave=False)
    reference = config.stain_reference
    stains = (
        estimate_source_stains(manifest, samples, target_mpp=target_mpp)
        if reference is not None and reference.normalise
        else {}
    )
    for sample in iterator:
        image, labels = load_sample(manifest, sample, target_mpp=target_mpp)
        source_stain = stains.get(sample.source.name)
        if reference is not None and source_stain is not None:
            # Each source's stain onto the model's, as the model was trained (a source stands for a slide).
            image = normalise_stains(image, source_stain, reference)
        logits = predict_logits(model, preprocess(image, config.preprocessing))
        confusion.update(logits.argmax(1)[0], torch.from_numpy(labels.copy()).to(logits.device))
    return confusion


def write_evaluation(
    confusion: ConfusionMatrix,
    config: ModelConfig,
    manifest: DatasetManifest,
    split: str,
    out_dir: Path,
    *,
    prefix: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<prefix>evaluation_<split>.json`` and ``<prefix>confusion_<split>.png``; return the metrics."""
    names = list(manifest.class_names) + list(config.class_names[manifest.num_classes :])
    metrics = confusion.to_dict(manifest.class_names)
    write_metrics_json(
        out_dir / f"{prefix}evaluation_{split}.json",
        metrics,
        {
            **(extra or {}),
            "model_name": config.name,
            "manifest": str(manifest.path),
            "split": split,
            "mpp": config.target_mpp or manifest.target_mpp,
        },
    )
    render_confusion_png(confusion.matrix, names, out_dir / f"{prefix}confusion_{split}.png")
    return metrics
