"""Cross-source (leave-one-source-out) evaluation of the default breast model's recipe.

The three labelled breast sources in ``$WSI_ESPNET_TEST_DATA/biopsy`` (BCSS regions, BCSS 224-px tiles,
CAMELYON lymph-node tiles) each serve once as the test set of a model trained on the other two; the
fold manifests are ``data_manifests/breast-tumour-folds/held-out-*.yaml``. Each fold is trained with
``wsi-espnet train`` (a child process each, run side by side, one thread each) from the authors'
Cityscapes ESPNet-C, as the shipped model was, and its test split evaluated with one confusion matrix
over every labelled pixel. Prints per fold the per-class IoU and mean IoU, then their mean over folds:
the yardstick the model card reports, rather than a split of one source.

The fold holding out the BCSS 224 tiles has the shipped model's data, splits, recipe and seed, so
``--shipped`` evaluates the packaged model for it instead of training it again.

    python benchmarks/breast_folds.py [--recipe breast-tumour] [--shipped] [--out runs/folds]
        [--encoder-epochs N --decoder-epochs N] [--json folds.json]

A fold whose run folder already holds a finished ``model.safetensors`` is evaluated, not retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from wsi_espnet.datasets.manifest import load_manifest
from wsi_espnet.evaluation.evaluate import evaluate_split
from wsi_espnet.models import load_model
from wsi_espnet.models.registry import default_model_path

ROOT = Path(__file__).resolve().parents[1]
FOLDS = ROOT / "data_manifests" / "breast-tumour-folds"
SHIPPED_FOLD = "held-out-bcss-224"


def data_dir() -> Path:
    return Path(os.environ.get("WSI_ESPNET_TEST_DATA", ROOT.parent / "shared" / "data"))


def train_folds(folds: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """Train every fold that has no model yet, side by side; return each one's wall seconds."""
    init = data_dir() / "espnet-original" / "weights" / "encoder_espnet_p_2_q_8.pth"
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    logs = []
    for manifest in folds:
        out = args.out / manifest.stem
        if (out / "model.safetensors").is_file():
            continue
        command = [sys.executable, "-m", "wsi_espnet", "train", str(manifest), "--recipe", args.recipe,
                   "--init", str(init), "--out", str(out), "--quiet", "--overwrite"]  # fmt: skip
        for flag in ("encoder_epochs", "decoder_epochs"):
            if getattr(args, flag) is not None:
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WSI_ESPNET_TEST_DATA": str(data_dir())}
        log = (args.out / f"{manifest.stem}.train.log").open("wb")
        logs.append(log)
        running[manifest.stem] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), time.time())
        print(f"training {manifest.stem} -> {out}", flush=True)
    seconds = {}
    for name, (process, began) in running.items():
        if process.wait() != 0:
            sys.exit(f"training {name} failed; see {args.out / f'{name}.train.log'}")
        seconds[name] = time.time() - began
    for log in logs:
        log.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="breast-tumour", help="training recipe (default breast-tumour)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "folds", help="run folders (default runs/folds)")
    parser.add_argument("--shipped", action="store_true", help=f"use the packaged model for {SHIPPED_FOLD}")
    parser.add_argument("--encoder-epochs", type=int, default=None)
    parser.add_argument("--decoder-epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="threads per training process (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    os.environ.setdefault("WSI_ESPNET_TEST_DATA", str(data_dir()))

    folds = sorted(FOLDS.glob("held-out-*.yaml"))
    args.out.mkdir(parents=True, exist_ok=True)
    to_train = [f for f in folds if not (args.shipped and f.stem == SHIPPED_FOLD)]
    seconds = train_folds(to_train, args)

    rows = []
    for manifest_path in folds:
        manifest = load_manifest(manifest_path)
        shipped = args.shipped and manifest_path.stem == SHIPPED_FOLD
        weights = default_model_path() if shipped else args.out / manifest_path.stem / "model.safetensors"
        model, config = load_model(weights)
        metrics = evaluate_split(model, config, manifest, "test").to_dict(manifest.class_names)
        test_sources = [s.name for s in manifest.sources if "test" in s.splits]
        rows.append({
            "fold": manifest_path.stem, "test_source": ",".join(test_sources), "model": str(weights),
            "shipped": shipped, "train_seconds": seconds.get(manifest_path.stem),
            "iou": {c["name"]: c["iou"] for c in metrics["classes"]}, "mean_iou": metrics["mean_iou"],
            "pixel_accuracy": metrics["pixel_accuracy"], "pixels": metrics["pixels"],
        })  # fmt: skip

    names = list(rows[0]["iou"])
    print(f"\n| held-out source | {' | '.join(f'{n} IoU %' for n in names)} | mean IoU % | pixel acc % | pixels |")
    print(f"|---|{'---|' * len(names)}---|---|---|")
    for row in rows:
        ious = " | ".join(f"{100 * (row['iou'][n] or 0):.2f}" for n in names)
        note = " (shipped model)" if row["shipped"] else ""
        print(f"| {row['test_source']}{note} | {ious} | {100 * (row['mean_iou'] or 0):.2f} | "
              f"{100 * (row['pixel_accuracy'] or 0):.2f} | {row['pixels']:,} |")  # fmt: skip
    per_class = {n: sum(r["iou"][n] or 0 for r in rows) / len(rows) for n in names}
    mean = sum(r["mean_iou"] or 0 for r in rows) / len(rows)
    class_means = " | ".join(f"{100 * v:.2f}" for v in per_class.values())
    print(f"| **mean over folds** | {class_means} | **{100 * mean:.2f}** | | |")
    if args.json:
        args.json.write_text(json.dumps({"folds": rows, "mean_iou": mean, "per_class_iou": per_class}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
