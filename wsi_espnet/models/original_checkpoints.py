"""Load the original ESPNet authors' released checkpoints into our classes.

The released files (github.com/sacmehta/ESPNet, ``pretrained/{encoder,decoder}``) are PyTorch 0.3-era
pickled state dicts. They are read with ``weights_only=True`` (no arbitrary objects are unpickled),
their keys are renamed by :data:`KEY_MAP`, and they are loaded with ``strict=True``.

Facts about them that a faithful reimplementation must honour:

* ``decoder_*`` files are ESPNet (encoder + light decoder), ``encoder_*`` files are ESPNet-C.
  alpha2 and alpha3 are read from the number of ``level2.i`` / ``level3.i`` blocks.
* The Cityscapes decoders merge the 16 level-1 conv channels with the C class maps
  (``conv.conv.weight`` has 16 + C inputs); the CamVid decoder merges the reinforced 19 channels.
* Input: BGR channel order, per-channel ``(x - mean) / std`` on the 0-255 scale, then ``/ 255``.
  Cityscapes statistics are the authors' published values; the CamVid statistics are what their
  ``loadData.py`` computes (mean over training images of per-image channel mean and std) on the
  367 SegNet CamVid training images.
* 20 Cityscapes outputs: the 19 train ids, then class 19 = ignore. 12 CamVid outputs: the 11 SegNet
  classes, then class 11 = void.
* No ``num_batches_tracked`` entries; those buffers keep their defaults.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError

from wsi_espnet.errors import CheckpointError
from wsi_espnet.models.config import Level1Skip, ModelConfig, Preprocessing, Variant
from wsi_espnet.models.espnet import EspNet, EspNetEncoder, build_espnet

__all__ = ["KEY_MAP", "OriginalDataset", "load_original_checkpoint", "remap_original_state_dict"]

OriginalDataset = Literal["cityscapes", "camvid"]

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle", "ignore",
)  # fmt: skip
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    (0, 0, 0),
)  # fmt: skip
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car",
    "pedestrian", "bicyclist", "void",
)  # fmt: skip
CAMVID_COLORS = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0),
)  # fmt: skip

_DATASETS: dict[OriginalDataset, tuple[tuple[str, ...], tuple[tuple[int, int, int], ...], Preprocessing]] = {
    "cityscapes": (
        CITYSCAPES_CLASSES,
        CITYSCAPES_COLORS,
        Preprocessing(
            channel_order="BGR",
            mean=(72.3923111, 82.90893555, 73.15840149),
            std=(45.3192215, 46.15289307, 44.91483307),
            scale_divisor=255.0,
        ),
    ),
    "camvid": (
        CAMVID_CLASSES,
        CAMVID_COLORS,
        Preprocessing(
            channel_order="BGR",
            mean=(110.33102617601608, 108.40886341063788, 105.03319369739667),
            std=(72.12571010537629, 72.69074512242621, 69.9043478900795),
            scale_divisor=255.0,
        ),
    ),
}

#: Ordered (original key pattern, our key template) pairs. ``{esp}`` marks an ESP block's inner keys.
_ESP_INNER: list[tuple[str, str]] = [
    (r"c1\.conv\.weight", "reduce.weight"),
    (r"d1\.conv\.weight", "branches.0.weight"),
    (r"d2\.conv\.weight", "branches.1.weight"),
    (r"d4\.conv\.weight", "branches.2.weight"),
    (r"d8\.conv\.weight", "branches.3.weight"),
    (r"d16\.conv\.weight", "branches.4.weight"),
    (r"bn\.bn\.(?P<p>\w+)", "norm.{p}"),  # residual ESP block: bn is a BN+PReLU pair
    (r"bn\.act\.weight", "act.weight"),
    (r"bn\.(?P<p>\w+)", "norm.{p}"),  # strided ESP block: plain bn and act
    (r"act\.weight", "act.weight"),
]
_OUTER: list[tuple[str, str]] = [
    (r"level1\.conv\.weight", "level1.conv.weight"),
    (r"level1\.bn\.(?P<p>\w+)", "level1.norm.{p}"),
    (r"level1\.act\.weight", "level1.act.weight"),
    (r"b1\.bn\.(?P<p>\w+)", "level1_norm.norm.{p}"),
    (r"b1\.act\.weight", "level1_norm.act.weight"),
    (r"level2_0\.(?P<esp>.+)", "level2_down.{esp}"),
    (r"level2\.(?P<i>\d+)\.(?P<esp>.+)", "level2.{i}.{esp}"),
    (r"b2\.bn\.(?P<p>\w+)", "level2_norm.norm.{p}"),
    (r"b2\.act\.weight", "level2_norm.act.weight"),
    (r"level3_0\.(?P<esp>.+)", "level3_down.{esp}"),
    (r"level3\.(?P<i>\d+)\.(?P<esp>.+)", "level3.{i}.{esp}"),
    (r"b3\.bn\.(?P<p>\w+)", "level3_norm.norm.{p}"),
    (r"b3\.act\.weight", "level3_norm.act.weight"),
    (r"classifier\.conv\.weight", "classifier.weight"),
]
_DECODER: list[tuple[str, str]] = [
    (r"encoder\.(?P<enc>.+)", "encoder.{enc}"),
    (r"level3_C\.conv\.weight", "level2_project.weight"),  # projects level-2 features, despite its name
    (r"br\.(?P<p>\w+)", "encoder_logits_norm.{p}"),
    (r"up_l3\.0\.weight", "up_level3.weight"),
    (r"combine_l2_l3\.0\.bn\.(?P<p>\w+)", "merge_level2.0.norm.{p}"),
    (r"combine_l2_l3\.0\.act\.weight", "merge_level2.0.act.weight"),
    (r"combine_l2_l3\.1\.(?P<esp>.+)", "merge_level2.1.{esp}"),
    (r"up_l2\.0\.weight", "up_level2.0.weight"),
    (r"up_l2\.1\.bn\.(?P<p>\w+)", "up_level2.1.norm.{p}"),
    (r"up_l2\.1\.act\.weight", "up_level2.1.act.weight"),
    (r"conv\.conv\.weight", "merge_level1.conv.weight"),
    (r"conv\.bn\.(?P<p>\w+)", "merge_level1.norm.{p}"),
    (r"conv\.act\.weight", "merge_level1.act.weight"),
    (r"classifier\.weight", "up_level1.weight"),
]
#: The documented key map: original module path -> ours, for encoder (ESPNet-C) and decoder files.
KEY_MAP: dict[str, list[tuple[str, str]]] = {"esp_block": _ESP_INNER, "encoder": _OUTER, "decoder": _DECODER}


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match is None:
            continue
        groups = match.groupdict()
        if "esp" in groups:
            inner = _rename(groups["esp"], _ESP_INNER)
            if inner is None:
                return None
            groups["esp"] = inner
        if "enc" in groups:
            inner = _rename(groups["enc"], _OUTER)
            if inner is None:
                return None
            groups["enc"] = inner
        return template.format(**groups)
    return None


def remap_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original ESPNet / ESPNet-C state dict's keys to ours (see :data:`KEY_MAP`).

    A ``module.`` prefix (from ``nn.DataParallel``) is dropped. Raises :class:`CheckpointError`
    naming the first key that is not part of an original ESPNet checkpoint.
    """
    is_decoder = any(k.removeprefix("module.").startswith("encoder.") for k in state_dict)
    rules = _DECODER if is_decoder else _OUTER
    remapped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = _rename(key.removeprefix("module."), rules)
        if new_key is None:
            raise CheckpointError(
                f"key {key!r} is not part of an original ESPNet checkpoint; expected keys like "
                "'level1.conv.weight' (ESPNet-C) or 'encoder.level1.conv.weight' (ESPNet). "
                "If this is a wsi-espnet .safetensors file, load it with wsi_espnet.models.load_model."
            )
        remapped[new_key] = tensor
    return remapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file; check the path.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError, SafetensorError
    ) as exc:  # fmt: skip
        reason = (str(exc).splitlines() or ["no details"])[0]
        raise CheckpointError(
            f"cannot read {str(path)!r} as a PyTorch checkpoint ({type(exc).__name__}: {reason}). "
            "The file may be truncated or corrupted, or it is not a weights file; download it again."
        ) from exc
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(
            f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict of tensors; "
            "expected one of the original ESPNet checkpoints (a dict of parameter tensors)."
        )
    return loaded


def _count_blocks(keys: list[str], level: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(rf"(?:encoder\.)?{level}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def load_original_checkpoint(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    dataset: OriginalDataset | None = None,
    name: str | None = None,
) -> tuple[EspNet | EspNetEncoder, ModelConfig]:
    """Build the model that an original ESPNet checkpoint holds and load it strictly.

    Parameters
    ----------
    path : an original ``.pth`` file (``decoder_*`` = ESPNet, ``encoder_*`` = ESPNet-C).
    num_classes : if given, must equal the file's class count (guards against the wrong file).
    dataset : "cityscapes" or "camvid": class names, colours and input statistics. Inferred from
        the class count (20 -> Cityscapes, 12 -> CamVid) when not given.
    name : model name recorded in the config; defaults to the file's stem.

    Returns
    -------
    The model in eval mode on the CPU, and its :class:`ModelConfig` (with the original BGR,
    mean/std then /255 preprocessing).
    """
    path = Path(path)
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    remapped = remap_original_state_dict(state)
    prefix = "encoder." if "encoder.classifier.weight" in remapped else ""
    classifier = remapped.get(prefix + "classifier.weight")
    if classifier is None or prefix + "level1.conv.weight" not in remapped:
        raise CheckpointError(
            f"{str(path)!r} has no ESPNet classifier or level-1 weights; it is not an ESPNet checkpoint."
        )
    file_classes = int(classifier.shape[0])
    if num_classes is not None and num_classes != file_classes:
        raise CheckpointError(
            f"{str(path)!r} predicts {file_classes} classes but num_classes={num_classes} was asked for; "
            f"pass num_classes={file_classes}, or fine-tune the model to the new class set."
        )
    if dataset is None:
        by_count: dict[int, OriginalDataset] = {len(names): key for key, (names, _, _) in _DATASETS.items()}
        if file_classes not in by_count:
            raise CheckpointError(
                f"{str(path)!r} has {file_classes} classes, which matches no released dataset "
                f"({', '.join(f'{k}: {len(v[0])}' for k, v in _DATASETS.items())}); pass dataset= explicitly."
            )
        dataset = by_count[file_classes]
    class_names, class_colors, preprocessing = _DATASETS[dataset]
    if len(class_names) != file_classes:
        raise CheckpointError(
            f"dataset={dataset!r} has {len(class_names)} classes but {str(path)!r} predicts {file_classes}."
        )
    in_channels = int(remapped[prefix + "level1.conv.weight"].shape[1])
    variant: Variant = "espnet" if prefix else "espnet-c"
    level1_skip: Level1Skip = "conv"
    if variant == "espnet":
        merge = remapped.get("merge_level1.conv.weight")
        if merge is None:
            raise CheckpointError(
                f"{str(path)!r} is an ESPNet decoder file without its level-1 merge ('conv.conv.weight')."
            )
        level1_skip = "reinforced" if int(merge.shape[1]) - file_classes == 16 + in_channels else "conv"
    alpha2, alpha3 = _count_blocks(list(state), "level2"), _count_blocks(list(state), "level3")
    if alpha2 < 1 or alpha3 < 1:
        raise CheckpointError(
            f"{str(path)!r} has {alpha2} level-2 and {alpha3} level-3 ESP blocks; every released ESPNet has at "
            "least one of each, so the file is incomplete."
        )
    config = ModelConfig(
        name=name or path.stem,
        num_classes=file_classes,
        variant=variant,
        in_channels=in_channels,
        alpha2=alpha2,
        alpha3=alpha3,
        decoder_level1_skip=level1_skip,
        class_names=class_names,
        class_colors=class_colors,
        ignore_index=file_classes - 1,
        preprocessing=preprocessing,
        description=f"original authors' {variant} ({dataset}), converted from {path.name}",
    )
    model = build_espnet(config)
    # The 0.3-era files predate num_batches_tracked; keep our default for those buffers.
    expected = model.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in remapped:
            remapped[key] = value
    try:
        model.load_state_dict(remapped, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{str(path)!r} does not fit the {variant} it describes: {str(exc).splitlines()[-1].strip()}"
        ) from exc
    return model.eval(), config
