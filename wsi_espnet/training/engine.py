"""The MONAI engines of one training stage and their handlers.

``SupervisedTrainer`` runs the batches; ``SupervisedEvaluator`` validates on whole images with one
global confusion matrix (:class:`GlobalIoU`, ignore index excluded: the metric the original code
got wrong by averaging per batch). MONAI handlers do the rest: ``ValidationHandler``,
``LrScheduleHandler`` (step decay), ``CheckpointLoader`` (resume; the state itself is saved every
epoch by ignite's atomic ``Checkpoint``), ``EarlyStopHandler`` and optionally ``TensorBoardStatsHandler``.
:class:`EpochRecorder` writes ``history.csv``, prints one line per epoch and saves the best model
by val mIoU as a ``.safetensors`` file with its :class:`ModelConfig`.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.metrics import Metric
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    CheckpointLoader,
    EarlyStopHandler,
    LrScheduleHandler,
    ValidationHandler,
)
from monai.inferers import Inferer
from torch import Tensor, nn

from wsi_espnet.atomic_files import replacing
from wsi_espnet.evaluation.confusion import ConfusionMatrix
from wsi_espnet.inference.predict import normalise, padded_forward
from wsi_espnet.models.checkpoint_io import save_model
from wsi_espnet.models.config import ModelConfig, Preprocessing

__all__ = [
    "EpochRecorder",
    "GlobalIoU",
    "PaddedInferer",
    "PrepareBatch",
    "SegmentationLoss",
    "StageEngines",
    "build_stage_engines",
    "latest_state_file",
]

STATE_PREFIX = "state"


class PrepareBatch:
    """Batch dict -> (normalised images, (B, H, W) int64 labels) on the device.

    Normalisation is the model's :class:`Preprocessing` (:func:`normalise`, as ``predict`` does it),
    applied here on the device so that cached GPU data never goes back to the CPU; ``channels_last``
    switches the memory format.
    """

    def __init__(self, preprocessing: Preprocessing, *, channels_last: bool = False) -> None:
        self.preprocessing = preprocessing
        self.channels_last = channels_last

    def __call__(
        self, batch: dict[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **_: Any
    ) -> tuple[Tensor, Tensor]:
        # Plain tensors: a MONAI MetaTensor would route every operation of the network through its
        # __torch_function__ for metadata nobody reads here (benchmarks/train_speed.py: no measurable
        # cost on CPU at CamVid batch sizes, but nothing to gain either, and logits stay plain tensors).
        images = _plain(batch["image"]).to(device=device, non_blocking=non_blocking, dtype=torch.float32)
        labels = _plain(batch["label"]).to(device=device, non_blocking=non_blocking)
        images = normalise(images, self.preprocessing)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels[:, 0].round().long() if labels.is_floating_point() else labels[:, 0].long()


def _plain(value: Any) -> Tensor:
    tensor = torch.as_tensor(value)
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


class SegmentationLoss(nn.Module):
    """Weighted cross-entropy with an ignore index; labels are resized (nearest) to coarser logits.

    That is how ESPNet-C trains against labels at 1/8 resolution in the paper's first stage.
    """

    def __init__(self, weight: Tensor | None, ignore_index: int) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.shape[-2:] != labels.shape[-2:]:
            # nearest-exact samples each 8x8 block's centre, where upsampled logits put the cell's value;
            # plain "nearest" (the authors' cv2 call) would shift encoder-only models by 3.5 px.
            labels = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest-exact")[:, 0].long()
        weight = self.weight if isinstance(self.weight, Tensor) else None
        return F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=self.ignore_index)


class PaddedInferer(Inferer):
    """Whole-image inference for any size, exactly as ``predict`` does it (:func:`padded_forward`)."""

    def __call__(self, inputs: Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
        return padded_forward(lambda batch: network(batch, *args, **kwargs), inputs)


class GlobalIoU(Metric):
    """Mean IoU from one confusion matrix accumulated over the whole validation set."""

    def __init__(self, num_classes: int, ignore_index: int | None, device: torch.device | str = "cpu") -> None:
        self.confusion = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        super().__init__(output_transform=lambda output: (output["pred"], output["label"]), device=device)

    def reset(self) -> None:
        self.confusion.reset()

    def update(self, output: Sequence[Tensor]) -> None:
        logits, labels = output
        self.confusion.update(logits.argmax(1), labels)

    def compute(self) -> float:
        return float(self.confusion.mean_iou())


def _map_location(device: torch.device) -> dict[str, str] | None:
    """Load a GPU run's training state onto this device (None: where it was saved)."""
    return None if device.type == "cuda" else {f"cuda:{i}": str(device) for i in range(16)}


def latest_state_file(folder: Path) -> Path | None:
    """The training state of the latest epoch in ``folder`` (``state_checkpoint_<epoch>.pt``)."""

    def epoch(path: Path) -> int:
        tail = path.stem.rsplit("_", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    files = sorted(folder.glob(f"{STATE_PREFIX}_*.pt"), key=epoch) if folder.is_dir() else []
    return files[-1] if files else None


def _fmt(metrics: dict[str, Any] | None, key: str, digits: int) -> str:
    value = None if metrics is None else metrics.get(key)
    return "" if value is None else f"{value:.{digits}f}"


@dataclass
class EpochRecorder:
    """Per-epoch history, a one-line report, and the best model by val mIoU (kept across resumes)."""

    folder: Path
    network: nn.Module
    config: ModelConfig
    metric: GlobalIoU
    class_names: Sequence[str]
    log: Callable[[str], None]
    _losses: list[float] = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter)

    @property
    def best_path(self) -> Path:
        return self.folder / "best.safetensors"

    @property
    def best_record_path(self) -> Path:
        return self.folder / "best.json"

    def best_miou(self) -> float:
        if not self.best_record_path.is_file():
            return -math.inf
        return float(json.loads(self.best_record_path.read_text())["mean_iou"])

    def attach(self, trainer: Engine, evaluator: Engine) -> None:
        """Attach after the validation handler, so an epoch's line includes its validation."""
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        evaluator.add_event_handler(Events.COMPLETED, self._validated, trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        self._losses = []
        self._started = time.perf_counter()
        self._validation: dict[str, Any] | None = None
        self._lr = float(engine.optimizer.param_groups[0]["lr"])  # type: ignore[attr-defined]

    def _iteration_completed(self, engine: Engine) -> None:
        self._losses.append(engine.state.output["loss"].item())  # type: ignore[index]

    def _validated(self, evaluator: Engine, trainer: Engine) -> None:
        metrics = self.metric.confusion.to_dict(self.class_names)
        self._validation = metrics
        if metrics["mean_iou"] is not None and metrics["mean_iou"] > self.best_miou():
            save_model(self.network, self.config, self.best_path)
            record = {"epoch": trainer.state.epoch, "iteration": trainer.state.iteration, **metrics}
            with replacing(self.best_record_path) as tmp:
                tmp.write_text(json.dumps(record, indent=2))

    def _epoch_completed(self, engine: Engine) -> None:
        lr = self._lr
        finite = [v for v in self._losses if math.isfinite(v)]  # a batch with only ignored pixels has no loss
        loss = sum(finite) / len(finite) if finite else math.nan
        val = getattr(self, "_validation", None)
        row = {
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "loss": f"{loss:.6f}",
            "lr_used": f"{lr:.6g}",
            "val_mean_iou": _fmt(val, "mean_iou", 6),
            "val_pixel_accuracy": _fmt(val, "pixel_accuracy", 6),
            "seconds": f"{time.perf_counter() - self._started:.2f}",
        }
        history = self.folder / "history.csv"
        new = not history.exists()
        with history.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        best = self.best_miou()
        val_text = (
            "" if val is None else f"  val mIoU {_fmt(val, 'mean_iou', 4)}  pixel acc {_fmt(val, 'pixel_accuracy', 4)}"
        )
        self.log(
            f"epoch {engine.state.epoch}/{engine.state.max_epochs}  loss {loss:.4f}{val_text}"
            f"  best {best:.4f}  lr {lr:.2e}  {row['seconds']} s"
        )


@dataclass
class StageEngines:
    trainer: SupervisedTrainer
    evaluator: SupervisedEvaluator
    recorder: EpochRecorder


def build_stage_engines(
    *,
    network: nn.Module,
    config: ModelConfig,
    folder: Path,
    train_loader: Any,
    val_loader: Any,
    loss: SegmentationLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    prepare_batch: PrepareBatch,
    device: torch.device,
    epochs: int,
    amp: bool,
    val_interval: int,
    early_stop_patience: int | None,
    class_names: Sequence[str],
    ignore_index: int | None,
    resume_from: Path | None,
    epoch_started: Callable[[Engine], None],
    progress: bool,
    tensorboard: bool,
    log: Callable[[str], None],
) -> StageEngines:
    """Wire one stage's trainer, evaluator and handlers; nothing runs until ``trainer.run()``."""
    metric = GlobalIoU(len(class_names), ignore_index)
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=network,
        prepare_batch=prepare_batch,
        inferer=PaddedInferer(),
        key_val_metric={"val_mean_iou": metric},
        amp=amp,
        decollate=False,
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss,
        prepare_batch=prepare_batch,
        amp=amp,
        decollate=False,
    )
    trainer.add_event_handler(Events.EPOCH_STARTED, epoch_started)
    if progress:  # first, so the bar is closed before the epoch's validation and report line
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda output: {"loss": output["loss"].item()})
    LrScheduleHandler(
        lr_scheduler=scheduler,  # type: ignore[arg-type]  # MONAI names the pre-2.0 base class
        print_lr=False,
        epoch_level=True,
    ).attach(trainer)
    ValidationHandler(validator=evaluator, interval=val_interval, epoch_level=True).attach(trainer)
    recorder = EpochRecorder(folder, network, config, metric, class_names, log)
    recorder.attach(trainer, evaluator)
    save_dict: dict[str, Any] = {
        "network": network, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": trainer,
    }  # fmt: skip
    if getattr(trainer, "scaler", None) is not None:  # AMP's loss scale, so a resumed GPU run steps identically
        save_dict["scaler"] = trainer.scaler
    if early_stop_patience is not None:
        early_stop = EarlyStopHandler(
            patience=early_stop_patience,
            score_function=lambda engine: engine.state.metrics["val_mean_iou"],
            trainer=trainer,
            epoch_level=True,
        )
        early_stop.attach(evaluator)
        save_dict["early_stop"] = early_stop._handler  # its counter and best score survive a resume
    # The state is written atomically (ignite's DiskSaver writes aside, then renames; MONAI's
    # CheckpointSaver does not), so a kill or a full disk never leaves a truncated state to resume from.
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        Checkpoint(
            save_dict,
            DiskSaver(folder / "state", atomic=True, require_empty=False),
            filename_prefix=STATE_PREFIX,
            n_saved=1,
            global_step_transform=lambda engine, _: engine.state.epoch,
        ),
    )
    if resume_from is not None:
        CheckpointLoader(load_path=str(resume_from), load_dict=save_dict, map_location=_map_location(device)).attach(
            trainer
        )
    if tensorboard:  # train() has checked that the package is installed
        from monai.handlers import TensorBoardStatsHandler

        TensorBoardStatsHandler(
            log_dir=str(folder / "tensorboard"), output_transform=lambda output: output["loss"].item()
        ).attach(trainer)
        TensorBoardStatsHandler(
            log_dir=str(folder / "tensorboard"),
            iteration_log=False,  # the evaluator's output is a dict of whole-image tensors, not a loss
            global_epoch_transform=lambda epoch: trainer.state.epoch,
        ).attach(evaluator)
    return StageEngines(trainer, evaluator, recorder)
