"""``wsi-espnet train``: a manifest and a recipe in, a trained model with metrics and a model card out.

Run folder layout::

    OUT/run.json              manifest (path + SHA-256), resolved recipe, model name: a resume must match it
    OUT/statistics.json       exact class pixel counts, mean/std, the class weights used
    OUT/<stage>/state/        MONAI CheckpointSaver: network, optimiser, LR schedule, trainer (every epoch)
    OUT/<stage>/history.csv   per-epoch loss, val mIoU, pixel accuracy, learning rate, seconds
    OUT/<stage>/best.*        best model by val mIoU (.safetensors with its ModelConfig) and its metrics
    OUT/<stage>/done.json     written when the stage has finished
    OUT/model.safetensors     the final model (best of the last stage)
    OUT/metrics.json, OUT/confusion_<split>.png, OUT/model_card.md
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.utils import set_determinism
from torch import nn

from wsi_espnet import __version__
from wsi_espnet.atomic_files import replacing
from wsi_espnet.datasets.manifest import DatasetManifest, load_manifest
from wsi_espnet.datasets.samples import Sample, list_samples, load_sample
from wsi_espnet.datasets.stains import estimate_source_stains, pooled_stain
from wsi_espnet.devices import resolve
from wsi_espnet.errors import CheckpointError, ConfigError, InputError, WsiEspnetError
from wsi_espnet.evaluation.evaluate import evaluate_split, write_evaluation
from wsi_espnet.models.checkpoint_io import file_sha256, load_model
from wsi_espnet.models.config import ModelConfig, Preprocessing
from wsi_espnet.models.espnet import build_espnet
from wsi_espnet.models.registry import get_model_config, resolve_model_path
from wsi_espnet.stain import StainEstimate, StainReference
from wsi_espnet.training.engine import PrepareBatch, SegmentationLoss, build_stage_engines, latest_state_file
from wsi_espnet.training.model_card import write_model_card
from wsi_espnet.training.recipe import Stage, TrainingRecipe
from wsi_espnet.training.statistics import DatasetStatistics, compute_statistics, paper_class_weights
from wsi_espnet.training.transforms import eval_transforms, train_transforms

__all__ = ["TrainOptions", "TrainResult", "train", "transfer_weights"]


@dataclass(frozen=True)
class TrainOptions:
    manifest: Path
    out: Path
    recipe: TrainingRecipe
    name: str | None = None
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    tensorboard: bool = False


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    metrics: dict[str, Any]
    seconds: float
    stages_run: tuple[str, ...]


def transfer_weights(source: dict[str, torch.Tensor], target: nn.Module) -> tuple[list[str], list[str]]:
    """Copy every tensor of ``source`` whose name (with or without the ``encoder.`` prefix) and shape
    fit ``target``; return (copied, left at their fresh initialisation) parameter names."""
    state = target.state_dict()
    copied, fresh = [], []
    for key, tensor in state.items():
        for candidate in (key, key.removeprefix("encoder."), f"encoder.{key}"):
            if candidate in source and source[candidate].shape == tensor.shape:
                state[key] = source[candidate].to(tensor.dtype)
                copied.append(key)
                break
        else:
            fresh.append(key)
    target.load_state_dict(state)
    return copied, fresh


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """MONAI wraps errors raised inside transforms in RuntimeError; give the user's own error back."""
    try:
        yield
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, WsiEspnetError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def _class_dependent_keys(config: ModelConfig) -> set[str]:
    """State-dict keys whose shapes depend on the class count (found by building one more class)."""
    ours = build_espnet(config).state_dict()
    other = build_espnet(
        config.replace(num_classes=config.num_classes + 1, class_names=(), class_colors=())
    ).state_dict()
    return {k for k, v in ours.items() if other[k].shape != v.shape}


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {torch.get_num_threads()} threads"


def _prepare_folder(options: TrainOptions, run_record: dict[str, Any]) -> Path | None:
    """Create or check the run folder; with ``overwrite`` the old run is moved aside (returned), not deleted."""
    out = options.out
    record_path = out / "run.json"
    if out.exists() and not out.is_dir():
        raise InputError(f"[[out]] {str(out)!r} is a file; give a folder for the run.")
    if out.is_dir() and any(out.iterdir()):
        if options.overwrite:
            if not record_path.is_file():
                raise InputError(
                    f"[[out]] {str(out)!r} is not empty and holds no training run; refusing to delete it. "
                    "Give an empty or new folder."
                )
            aside = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
            out.rename(aside)
            out.mkdir()
            with replacing(record_path) as tmp:
                tmp.write_text(json.dumps(run_record, indent=2))
            return aside
        if options.resume:
            if not record_path.is_file():
                raise InputError(f"[[resume=True]]: {str(out)!r} holds no training run (no run.json).")
            saved = json.loads(record_path.read_text())
            changed = [k for k in ("manifest_sha256", "name") if saved.get(k) != run_record.get(k)]
            old, new = saved.get("recipe", {}), run_record["recipe"]
            changed += [
                f"recipe {k} ({old.get(k)!r} -> {new.get(k)!r})"
                for k in new
                if k != "num_workers" and old.get(k) != new.get(k)
            ]
            if changed:
                raise InputError(
                    f"[[resume=True]]: the run in {str(out)!r} was started with a different {', '.join(changed)}; "
                    "resume with the same manifest and settings, or start a new run in another folder."
                )
            return None
        raise InputError(
            f"{str(out)!r} already holds a run; pass [[resume=True]] to continue it or [[overwrite=True]] to start "
            "again."
        )
    if options.resume:
        raise InputError(f"[[resume=True]]: there is no run in {str(out)!r} to continue.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the run folder {str(out)!r}: {exc.strerror}; choose another [[out]].") from exc
    with replacing(record_path) as tmp:
        tmp.write_text(json.dumps(run_record, indent=2))
    return None


def _fits_on_device(manifest: DatasetManifest, samples: list[Sample], device: torch.device, *, forced: bool) -> bool:
    """Whether the decoded training set (uint8) takes under half of the device's free memory."""
    if forced or device.type != "cuda":
        return forced or device.type == "cuda"
    image, _ = load_sample(manifest, samples[0])
    estimate = image.shape[0] * image.shape[1] * 4 * len(samples)  # 3 image bytes + 1 label byte per pixel
    free, _ = torch.cuda.mem_get_info(device)
    return bool(estimate < free / 2)


def _stain_reference(
    manifest: DatasetManifest, recipe: TrainingRecipe, train_samples: list[Any], val_samples: list[Any]
) -> tuple[StainReference | None, dict[str, StainEstimate | None] | None, dict[str, StainEstimate | None] | None]:
    """The training split's stain (histology), and each source's stain where the recipe normalises to it."""
    normalise = recipe.stain_normalisation == "macenko"
    if manifest.kind != "histology":
        if normalise:
            raise ConfigError(
                f"stain_normalisation=macenko needs a histology manifest; {str(manifest.path)!r} is "
                f"kind {manifest.kind!r}. Use stain_normalisation: none."
            )
        return None, None, None
    with _user_errors():
        pooled = pooled_stain(manifest, train_samples)
        if pooled is None:
            if normalise:
                raise InputError(
                    f"the train split of {str(manifest.path)!r} has too few stained pixels to estimate its stain; "
                    "stain_normalisation=macenko needs H&E images (use stain_normalisation: none)."
                )
            return None, None, None
        reference = StainReference.of(pooled, normalise=normalise)
        if not normalise:
            return reference, None, None
        return (
            reference,
            estimate_source_stains(manifest, train_samples),
            estimate_source_stains(manifest, val_samples),
        )


def _statistics(
    manifest: DatasetManifest, samples: list[Any], out: Path, log: Callable[[str], None]
) -> DatasetStatistics:
    path = out / "statistics.json"
    if path.is_file():
        data = json.loads(path.read_text())
        pixels = np.array([data["class_pixels"][n] for n in manifest.class_names], dtype=np.int64)
        return DatasetStatistics(pixels, tuple(data["mean_255"]), tuple(data["std_255"]))
    started = time.perf_counter()
    stats = compute_statistics(manifest, samples)
    log(
        "class pixel shares (train, exact): "
        + ", ".join(f"{n} {p:.3%}" for n, p in zip(manifest.class_names, stats.frequencies, strict=True))
        + f"  ({time.perf_counter() - started:.1f} s)"
    )
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(stats.to_dict(manifest.class_names), indent=2))
    return stats


def _truncate_history(folder: Path, epoch: int) -> None:
    history = folder / "history.csv"
    if not history.is_file():
        return
    with history.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = [r for r in rows if int(r["epoch"]) <= epoch]
    with replacing(history) as tmp, tmp.open("w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)


def _switch(value: str, device: torch.device) -> bool:
    return value == "on" or (value == "auto" and device.type == "cuda")


def train(options: TrainOptions, *, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) every stage of ``options.recipe`` on ``options.manifest``."""
    started = time.perf_counter()
    recipe = options.recipe
    manifest = load_manifest(options.manifest)
    device = resolve(options.device).torch_device
    name = options.name or f"espnet-{manifest.name}"
    run_record = {
        "name": name,
        "manifest": str(manifest.path),
        "manifest_sha256": file_sha256(manifest.path),
        "recipe": recipe.to_dict(),
        "wsi_espnet": __version__,
        "torch": torch.__version__,
    }
    # Everything that can be checked is checked before the run folder is touched.
    train_samples = list_samples(manifest, "train")
    val_samples = list_samples(manifest, "val")
    if "test" in manifest.split_names:
        list_samples(manifest, "test")
    init_model: tuple[nn.Module, ModelConfig] | None = None
    if recipe.init is not None:
        init_model = load_model(resolve_model_path(recipe.init))
    if options.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("[[tensorboard=True]] needs the tensorboard package: pip install 'wsi-espnet[tensorboard]'.")
    ignore = manifest.ignore_index if manifest.ignore_index is not None else 255

    cache_on_device = _switch(recipe.cache_on_device, device) and _fits_on_device(
        manifest, train_samples, device, forced=recipe.cache_on_device == "on"
    )
    channels_last = _switch(recipe.channels_last, device)
    amp = _switch(recipe.amp, device)
    stain_reference, train_stains, val_stains = _stain_reference(manifest, recipe, train_samples, val_samples)
    set_determinism(seed=recipe.seed)
    with _user_errors():
        train_ds = CacheDataset(
            [{"sample": s} for s in train_samples],
            transform=train_transforms(
                manifest,
                crop_size=recipe.crop_size,
                scale_range=recipe.scale_range,
                ignore_index=ignore,
                device=device if cache_on_device else None,
                augmentation=recipe.augmentation(),
                stains=train_stains,
                reference=stain_reference if train_stains else None,
            ),
            cache_rate=recipe.cache_rate,
            progress=False,
        )
        val_ds = CacheDataset(
            [{"sample": s} for s in val_samples],
            transform=eval_transforms(manifest, stains=val_stains, reference=stain_reference if val_stains else None),
            cache_rate=recipe.cache_rate,
            progress=False,
        )
        labelled = sum(int((val_ds[i]["label"] < manifest.num_classes).sum()) for i in range(len(val_ds)))
    if labelled == 0:
        raise InputError(f"the val split of {str(manifest.path)!r} has no labelled pixels; nothing could be validated.")
    aside = _prepare_folder(options, run_record)
    log(
        f"{manifest.name}: {len(train_samples)} train and {len(val_samples)} val samples; device {device}, "
        f"amp {'on' if amp else 'off'}, channels_last {'on' if channels_last else 'off'}, "
        f"dataset cached on {device if cache_on_device else 'cpu'}"
    )
    if aside is not None:
        log(f"the previous run was moved to {aside}; it is deleted when this run finishes")

    stats = _statistics(manifest, train_samples, options.out, log)
    weights = paper_class_weights(stats.frequencies) if recipe.class_weighting == "paper" else None
    if init_model is not None:
        preprocessing = init_model[1].preprocessing  # the weights learned this normalisation
    elif manifest.normalisation is not None:
        preprocessing = manifest.normalisation
    else:
        preprocessing = Preprocessing(mean=stats.mean, std=stats.std)  # type: ignore[arg-type]
    generator = torch.Generator()
    num_samples = recipe.samples_per_epoch or len(train_ds)
    sampler = torch.utils.data.RandomSampler(
        train_ds, replacement=recipe.samples_per_epoch is not None, num_samples=num_samples, generator=generator
    )
    train_loader = DataLoader(
        train_ds,
        batch_size=recipe.batch_size,
        sampler=sampler,
        num_workers=0 if cache_on_device else recipe.num_workers,
        drop_last=num_samples >= recipe.batch_size,
    )
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=0)

    def epoch_started(engine: Any) -> None:
        epoch_seed = recipe.seed * 100_003 + engine.state.epoch
        generator.manual_seed(epoch_seed)
        train_ds.transform.set_random_state(seed=epoch_seed % (2**32))

    stages_run: list[Stage] = []
    previous_best: Path | None = None
    final_path = options.out / "model.safetensors"
    hardware = _hardware(device)
    stage_summaries: dict[str, Any] = {}
    for index, stage in enumerate(recipe.stages):
        folder = options.out / stage
        folder.mkdir(exist_ok=True)
        variant = "espnet-c" if stage == "encoder" else "espnet"
        # Fine-tuning keeps the architecture of the weights it starts from (depth, decoder skip,
        # block switches); only the class set, variant and usage fields change.
        architecture = (
            init_model[1].replace(variant=variant, ignore_index=None)
            if init_model is not None
            else get_model_config(variant, num_classes=manifest.num_classes, alpha2=recipe.alpha2, alpha3=recipe.alpha3)
        )
        config = architecture.replace(
            name=name,
            num_classes=manifest.num_classes,
            class_names=manifest.class_names,
            class_colors=manifest.class_colors,
            preprocessing=preprocessing,
            target_mpp=manifest.target_mpp,
            stain_reference=stain_reference,
            description=f"ESPNet trained on {manifest.name} ({', '.join(manifest.class_names)})",
        )
        if (folder / "done.json").is_file():
            log(f"stage {stage}: already finished, skipped")
            stage_summaries[stage] = json.loads((folder / "done.json").read_text())
            previous_best = folder / "best.safetensors"
            continue
        torch.manual_seed(recipe.seed + index)
        network = build_espnet(config)
        source = None
        fresh: list[str] = []
        if index == 0 and init_model is not None:
            source = init_model[0].state_dict()
            origin = str(recipe.init)
            if tuple(n.lower() for n in init_model[1].class_names) != tuple(n.lower() for n in manifest.class_names):
                # Same count, other meaning (or order): the classifier layers must not be reused.
                source = {k: v for k, v in source.items() if k not in _class_dependent_keys(config)}
        elif previous_best is not None:
            source = load_model(previous_best)[0].state_dict()
            origin = str(previous_best)
        if source is not None:
            copied, fresh = transfer_weights(source, network)
            log(f"stage {stage}: {len(copied)} tensors from {origin}, {len(fresh)} initialised anew")
        network = network.to(device)
        if channels_last:
            network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        fresh_set = set(fresh)
        groups = [
            {"params": [p for n, p in network.named_parameters() if n not in fresh_set], "lr": recipe.lr},
            {"params": [p for n, p in network.named_parameters() if n in fresh_set],
             "lr": recipe.lr * recipe.new_layer_lr_scale},
        ]  # fmt: skip
        optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=recipe.lr, weight_decay=recipe.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.lr_step, gamma=recipe.lr_gamma)
        weight_tensor = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        loss = SegmentationLoss(weight_tensor, ignore).to(device)
        resume_from = latest_state_file(folder / "state") if options.resume else None
        saved_epoch = 0
        if resume_from is not None:
            try:
                saved = torch.load(resume_from, map_location="cpu", weights_only=True)["trainer"]
            except (RuntimeError, OSError, KeyError, EOFError) as exc:
                raise CheckpointError(
                    f"the training state {str(resume_from)!r} cannot be read ({exc}); delete it to resume from the "
                    "epoch before, or start again with [[overwrite=True]]."
                ) from exc
            saved_epoch = int(saved.get("epoch", saved.get("iteration", 0) // max(saved.get("epoch_length", 1), 1)))
            log(f"stage {stage}: resuming after epoch {saved_epoch} from {resume_from.name}")
        if options.resume:
            # Rows and best models of epochs after the saved state belong to an attempt that is redone.
            _truncate_history(folder, saved_epoch)
            if resume_from is None:
                for stale in ("best.safetensors", "best.json"):
                    (folder / stale).unlink(missing_ok=True)
        engines = build_stage_engines(
            network=network,
            config=config,
            folder=folder,
            train_loader=train_loader,
            val_loader=val_loader,
            loss=loss,
            optimizer=optimizer,
            scheduler=scheduler,
            prepare_batch=PrepareBatch(preprocessing, channels_last=channels_last),
            device=device,
            epochs=recipe.epochs(stage),
            amp=amp,
            val_interval=recipe.val_interval,
            early_stop_patience=recipe.early_stop_patience,
            class_names=manifest.class_names,
            ignore_index=manifest.ignore_index,
            resume_from=resume_from,
            epoch_started=epoch_started,
            progress=options.progress,
            tensorboard=options.tensorboard,
            log=log,
        )
        stage_started = time.perf_counter()
        log(f"stage {stage}: {config.variant}, {recipe.epochs(stage)} epochs of {num_samples} samples")
        with _user_errors():
            engines.trainer.run()
        if not engines.recorder.best_path.is_file():
            raise InputError(f"stage {stage} ended without a validation; set val_interval <= the epoch count.")
        summary = {
            "stage": stage,
            "variant": config.variant,
            "epochs": engines.trainer.state.epoch,
            "iterations": engines.trainer.state.iteration,
            "seconds": round(time.perf_counter() - stage_started, 1),
            "best": json.loads(engines.recorder.best_record_path.read_text()),
        }
        with replacing(folder / "done.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        stage_summaries[stage] = summary
        stages_run.append(stage)
        previous_best = engines.recorder.best_path

    if previous_best is None:
        raise InputError("the recipe has no stage to run.")
    model, config = load_model(previous_best)
    model = model.to(device)
    evaluations: dict[str, Any] = {}
    for split in ("val", "test"):
        if split in manifest.split_names:
            confusion = evaluate_split(model, config, manifest, split)
            evaluations[split] = write_evaluation(
                confusion, config, manifest, split, options.out, prefix="", extra={"model": str(final_path)}
            )
    seconds = time.perf_counter() - started
    metrics = {
        "name": name,
        "hardware": hardware,
        "seconds": round(seconds, 1),
        "stages": stage_summaries,
        "evaluations": evaluations,
        "statistics": stats.to_dict(manifest.class_names),
        "class_weights": None if weights is None else [round(float(w), 6) for w in weights],
    }
    with replacing(options.out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    write_model_card(
        options.out / "model_card.md",
        config=config,
        manifest=manifest,
        recipe=recipe,
        metrics=metrics,
        samples={"train": len(train_samples), "val": len(val_samples)},
    )
    with replacing(final_path) as tmp:  # last: a model.safetensors means the run finished
        shutil.copyfile(previous_best, tmp)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    log(f"wrote {final_path} and {options.out / 'model_card.md'} ({seconds:.0f} s)")
    return TrainResult(final_path, metrics, seconds, tuple(stages_run))
