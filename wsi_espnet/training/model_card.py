"""A model card (Mitchell et al. 2019, in brief) written next to every trained model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsi_espnet.atomic_files import replacing
from wsi_espnet.datasets.manifest import DatasetManifest
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.training.recipe import TrainingRecipe

__all__ = ["metrics_table", "write_model_card"]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table: per-class IoU and accuracy, then mIoU and pixel accuracy."""
    lines = ["| class | IoU % | accuracy % | pixels |", "|---|---|---|---|"]
    for entry in metrics["classes"]:
        lines.append(f"| {entry['name']} | {_pct(entry['iou'])} | {_pct(entry['accuracy'])} | {entry['pixels']:,} |")
    lines.append(f"| **mean IoU** | **{_pct(metrics['mean_iou'])}** | | |")
    lines.append(f"| pixel accuracy | {_pct(metrics['pixel_accuracy'])} | | {metrics['pixels']:,} |")
    return "\n".join(lines)


def write_model_card(
    path: Path,
    *,
    config: ModelConfig,
    manifest: DatasetManifest,
    recipe: TrainingRecipe,
    metrics: Mapping[str, Any],
    samples: Mapping[str, int],
    limits: str = "",
) -> Path:
    """Write ``path`` (Markdown): data, classes, MPP, recipe, epochs, hardware, metrics, limits, licence."""
    stages = metrics.get("stages", {})
    stage_lines = [
        f"- {s}: {info['variant']}, {info['epochs']} epochs ({info['iterations']} iterations), "
        f"{info['seconds']:.0f} s; best val mIoU {_pct(info['best']['mean_iou'])} at epoch {info['best']['epoch']}"
        for s, info in stages.items()
    ]
    evaluations = metrics.get("evaluations", {})
    eval_sections = [f"### {split}\n\n{metrics_table(m)}" for split, m in evaluations.items()]
    classes = "\n".join(
        f"| {i} | {n} | {c} |" for i, (n, c) in enumerate(zip(config.class_names, config.class_colors, strict=True))
    )
    text = f"""# Model card: {config.name}

{config.description}

## Model
ESPNet (Mehta et al., ECCV 2018), variant `{config.variant}`, alpha2={config.alpha2}, alpha3={config.alpha3},
{config.num_classes} classes. Input: RGB uint8, normalised as `(x[{config.preprocessing.channel_order}] - mean) / std
/ {config.preprocessing.scale_divisor:g}` with mean {list(config.preprocessing.mean)} and std
{[round(s, 3) for s in config.preprocessing.std]} (0-255 scale); all of it is stored in the checkpoint.
Micrometres per pixel: {config.target_mpp if config.target_mpp is not None else "not applicable (street scenes)"}.

| id | class | colour |
|---|---|---|
{classes}

## Training data
Manifest `{manifest.name}` ({manifest.description}); {samples.get("train", 0)} training and
{samples.get("val", 0)} validation samples. Licence / terms: {manifest.licence or "see the manifest"}.

## Recipe
{", ".join(f"{k}={v}" for k, v in recipe.to_dict().items())}

{chr(10).join(stage_lines)}

Hardware: {metrics.get("hardware", "unknown")}; total wall time {metrics.get("seconds", 0):.0f} s.

## Metrics (one global confusion matrix per split, ignore index excluded)
{chr(10).join(eval_sections)}

## Known limits
{limits or "Evaluated only on the splits above; expect lower accuracy on other scanners, stains and sites."}

## Licence
The weights are released under the project's MIT licence; the training data's terms (above) may
restrict their use.
"""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
