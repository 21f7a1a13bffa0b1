"""How well the confidence and stain figures ``segment`` reports flag the folds where the breast model fails.

For each leave-one-source-out fold model (trained by ``benchmarks/breast_folds.py``), on its held-out
test source and, as the in-distribution baseline, on its own val split:

- the share of labelled pixels whose top-class probability is below each candidate threshold, and the
  error rate of those pixels against the rest (is "unsure" where the model is wrong?);
- the stain distance (``wsi_espnet.stain.stain_distance``) of each source's Macenko estimate from the
  fold's training stain (the mean of its training sources' estimates, as ``train`` stores it);
- the fold's tumour IoU and mean IoU on the held-out source.

The thresholds ``segment`` uses (``LOW_CONFIDENCE_BELOW``, ``LOW_CONFIDENCE_WARN_FRACTION`` in
``wsi_espnet.segmentation.reliability``, ``STAIN_WARN_DISTANCE`` in ``wsi_espnet.stain``) were chosen
from this table; see the model card.

    python benchmarks/breast_uncertainty.py [--runs runs/folds] [--json uncertainty.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_espnet.datasets.manifest import load_manifest
from wsi_espnet.datasets.samples import list_samples, load_sample
from wsi_espnet.datasets.stains import estimate_source_stains, pooled_stain
from wsi_espnet.evaluation.confusion import ConfusionMatrix
from wsi_espnet.inference.predict import predict_logits, preprocess
from wsi_espnet.models import load_model
from wsi_espnet.stain import normalise_stains, stain_distance

ROOT = Path(__file__).resolve().parents[1]
FOLDS = ROOT / "data_manifests" / "breast-tumour-folds"
THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.9)


def split_figures(model: torch.nn.Module, config: Any, manifest: Any, split: str) -> dict[str, Any]:
    """Top-class probability against correctness over every labelled pixel of ``split``."""
    samples = list_samples(manifest, split, target_mpp=config.target_mpp)
    reference = config.stain_reference
    stains = estimate_source_stains(manifest, samples) if reference is not None and reference.normalise else {}
    confusion = ConfusionMatrix(manifest.num_classes, ignore_index=manifest.ignore_index)
    tops, correct = [], []
    for sample in samples:
        image, labels = load_sample(manifest, sample, target_mpp=config.target_mpp)
        if reference is not None and stains.get(sample.source.name) is not None:
            image = normalise_stains(image, stains[sample.source.name], reference)
        with torch.inference_mode():
            probs = predict_logits(model, preprocess(image, config.preprocessing)).softmax(1)[0]
        top, predicted = probs.max(0)
        target = torch.from_numpy(labels.astype(np.int64))
        valid = target < manifest.num_classes
        confusion.update(predicted, target)
        tops.append(top[valid].numpy())
        correct.append((predicted[valid] == target[valid]).numpy())
    top_all, right = np.concatenate(tops), np.concatenate(correct)
    rows = {}
    for threshold in THRESHOLDS:
        low = top_all < threshold
        rows[str(threshold)] = {
            "low_fraction": float(low.mean()),
            "error_low": float(1 - right[low].mean()) if low.any() else None,
            "error_rest": float(1 - right[~low].mean()) if (~low).any() else None,
        }
    metrics = confusion.to_dict(manifest.class_names)
    return {
        "pixels": len(top_all), "error": float(1 - right.mean()), "by_threshold": rows,
        "iou": {c["name"]: c["iou"] for c in metrics["classes"]}, "mean_iou": metrics["mean_iou"],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "folds", help="breast_folds.py's --out")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("WSI_ESPNET_TEST_DATA", str(ROOT.parent / "shared" / "data"))
    torch.set_num_threads(os.cpu_count() or 1)

    results = []
    for manifest_path in sorted(FOLDS.glob("held-out-*.yaml")):
        manifest = load_manifest(manifest_path)
        model, config = load_model(args.runs / manifest_path.stem / "model.safetensors")
        train = list_samples(manifest, "train")
        reference = pooled_stain(manifest, train)
        everything = [s for split in manifest.split_names for s in list_samples(manifest, split)]
        distances = {
            name: (None if estimate is None or reference is None else stain_distance(estimate, reference))
            for name, estimate in estimate_source_stains(manifest, everything).items()
        }
        test_sources = [s.name for s in manifest.sources if "test" in s.splits]
        train_sources = [s.name for s in manifest.sources if "train" in s.splits]
        results.append({
            "fold": manifest_path.stem, "test_source": ",".join(test_sources), "train_sources": train_sources,
            "stain_distance": distances, "test": split_figures(model, config, manifest, "test"),
            "val": split_figures(model, config, manifest, "val"),
        })  # fmt: skip

    print("\n| fold (held-out source) | split | tumour IoU % | mean IoU % | error % | "
          + " | ".join(f"p<{t} share % (error % vs rest %)" for t in THRESHOLDS) + " |")  # fmt: skip
    print("|---|---|---|---|---|" + "---|" * len(THRESHOLDS))
    for row in results:
        for split in ("val", "test"):
            figures = row[split]
            cells = []
            for t in THRESHOLDS:
                cell = figures["by_threshold"][str(t)]
                low, rest = cell["error_low"], cell["error_rest"]
                cells.append(f"{100 * cell['low_fraction']:.1f} ({'-' if low is None else f'{100 * low:.0f}'} vs "
                             f"{'-' if rest is None else f'{100 * rest:.0f}'})")  # fmt: skip
            tumour = figures["iou"].get("tumour")
            tumour_cell = "-" if tumour is None else f"{100 * tumour:.1f}"
            print(f"| {row['test_source']} | {split} | {tumour_cell} | {100 * (figures['mean_iou'] or 0):.1f} | "
                  f"{100 * figures['error']:.1f} | {' | '.join(cells)} |")  # fmt: skip
    print("\n| fold (held-out source) | stain distance of each source from the fold's training stain |")
    print("|---|---|")
    for row in results:
        cells = ", ".join(
            f"{name}{' (held out)' if name == row['test_source'] else ''} {d:.3f}"
            for name, d in row["stain_distance"].items()
            if d is not None
        )
        print(f"| {row['test_source']} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
