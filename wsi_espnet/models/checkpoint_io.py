"""Our checkpoint format: one ``.safetensors`` file whose header carries the model config as JSON.

safetensors holds only tensors, so loading never unpickles arbitrary objects, and the config
travels inside the same file as the weights. :func:`load_model` also accepts the original authors'
``.pth`` files and converts them on the fly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from wsi_espnet.atomic_files import replacing
from wsi_espnet.errors import CheckpointError, ConfigError, InputError, check_output_folder
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.espnet import EspNet, EspNetEncoder, build_espnet
from wsi_espnet.models.original_checkpoints import load_original_checkpoint

__all__ = [
    "CONFIG_METADATA_KEY",
    "file_sha256",
    "load_model",
    "load_model_bytes",
    "model_bytes",
    "model_sha256",
    "read_model_config",
    "save_model",
]

CONFIG_METADATA_KEY = "wsi_espnet_config"


def save_model(model: nn.Module, config: ModelConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s weights and ``config`` to ``path`` (a ``.safetensors`` file), atomically.

    The weights must fit ``config`` exactly (checked before anything is written), so every saved
    file loads. ``nn.DataParallel`` and ``torch.compile`` wrappers' key prefixes are removed. The file
    appears only once complete, so an interrupted save never leaves a loadable half file.
    """
    path = Path(path)
    check_output_folder(path)
    if path.suffix != ".safetensors":
        raise InputError(f"output {str(path)!r} must end in .safetensors, e.g. {path.stem}.safetensors.")
    tensors = {_unwrapped(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        expected = build_espnet(config).state_dict()
    mismatched = sorted(
        k
        for k in expected.keys() | tensors.keys()
        if k not in tensors or k not in expected or tensors[k].shape != expected[k].shape
    )
    if mismatched:
        raise CheckpointError(
            f"the model's weights do not fit the {config.variant} that config {config.name!r} describes "
            f"(first mismatched key: {mismatched[0]!r}); save the config the model was built from."
        )
    try:
        with replacing(path) as partial:
            save_file(tensors, str(partial), metadata={CONFIG_METADATA_KEY: config.to_json(), "format": "wsi-espnet"})
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CheckpointError(
            f"cannot write {str(path)!r}: {reason}; choose a folder you can write to with free space."
        ) from exc
    return path


def _unwrapped(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (the weights hash recorded in provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little endian), then ``{``."""
    with open(path, "rb") as stream:
        head = stream.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def read_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The :class:`ModelConfig` in a wsi-espnet ``.safetensors`` header, without reading the weights."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(path)!r} as a .safetensors checkpoint ({exc}).") from exc
    if CONFIG_METADATA_KEY not in metadata:
        raise CheckpointError(f"{str(path)!r} is a safetensors file without a wsi-espnet model config.")
    try:
        return ModelConfig.from_json(metadata[CONFIG_METADATA_KEY])
    except ConfigError as exc:
        raise CheckpointError(f"{str(path)!r} carries an invalid model config: {exc}") from exc


def load_model(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[EspNet | EspNetEncoder, ModelConfig]:
    """Load a wsi-espnet ``.safetensors`` checkpoint, or an original ESPNet ``.pth`` file.

    Parameters
    ----------
    path : the checkpoint file.
    num_classes : if given, must equal the checkpoint's class count.
    device : where to put the model.

    Returns
    -------
    The model in eval mode and its :class:`ModelConfig`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file; check the path.")
    if not _looks_like_safetensors(path):
        model, config = load_original_checkpoint(path, num_classes=num_classes)
        return model.to(device), config
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
            state = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {str(path)!r} as a .safetensors checkpoint ({exc}); the file is truncated, "
            "corrupted or of another kind. Original ESPNet .pth files are accepted too."
        ) from exc
    model, config = _model_from(state, metadata, repr(str(path)), num_classes=num_classes)
    return model.to(device).eval(), config


def model_bytes(model: nn.Module, config: ModelConfig) -> bytes:
    """``model`` and ``config`` as the bytes of our ``.safetensors`` format (for shipping to workers)."""
    tensors = {_unwrapped(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return safetensors.torch.save(tensors, metadata={CONFIG_METADATA_KEY: config.to_json(), "format": "wsi-espnet"})


def model_sha256(model: nn.Module, config: ModelConfig) -> str:
    """Hex SHA-256 of :func:`model_bytes`: the weights hash of a model held in memory."""
    return hashlib.sha256(model_bytes(model, config)).hexdigest()


def load_model_bytes(data: bytes, *, device: torch.device | str = "cpu") -> tuple[EspNet | EspNetEncoder, ModelConfig]:
    """The model in ``data`` (from :func:`model_bytes`), in eval mode on ``device``, and its config."""
    try:
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
        state = safetensors.torch.load(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"the model bytes are not a .safetensors checkpoint ({exc}).") from exc
    model, config = _model_from(state, metadata, "the model bytes")
    return model.to(device).eval(), config


def _model_from(
    state: dict[str, torch.Tensor], metadata: dict[str, str], source: str, *, num_classes: int | None = None
) -> tuple[EspNet | EspNetEncoder, ModelConfig]:
    if CONFIG_METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{source} is a safetensors file without a wsi-espnet model config; it was not written by "
            "wsi-espnet. Convert original ESPNet weights with 'wsi-espnet convert-weights'."
        )
    try:
        config = ModelConfig.from_json(metadata[CONFIG_METADATA_KEY])
    except ConfigError as exc:
        raise CheckpointError(f"{source} carries an invalid model config: {exc}") from exc
    if num_classes is not None and num_classes != config.num_classes:
        raise CheckpointError(
            f"{source} predicts {config.num_classes} classes ({', '.join(config.class_names)}) but "
            f"num_classes={num_classes} was asked for; fine-tune the model to the new class set instead."
        )
    model = build_espnet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{source}: weights do not fit the {config.variant} its config describes: "
            f"{str(exc).splitlines()[-1].strip()}"
        ) from exc
    return model, config
