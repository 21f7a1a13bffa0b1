"""Named model variants and their builders.

Each entry is a :class:`ModelConfig` template; :func:`create_model` builds it with optional
overrides (class count, depth, ...). The paper's defaults (K=5, alpha2=2, alpha3=8) and 20 classes
(Cityscapes' 19 plus ignore, the setting of the published parameter counts) are the templates'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_espnet.errors import ConfigError
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.espnet import EspNet, EspNetEncoder, build_espnet

__all__ = [
    "DEFAULT_MODEL",
    "PackagedModel",
    "RegisteredModel",
    "create_model",
    "default_model_path",
    "get_model_config",
    "list_models",
    "list_packaged_models",
    "resolve_model_path",
]

DEFAULT_NUM_CLASSES = 20
#: Trained checkpoints shipped inside the package, each with a model card beside it.
PACKAGED_DIR = Path(__file__).with_name("pretrained")
#: The packaged model ``segment``, ``predict`` and ``evaluate`` use when ``--model`` is not given.
DEFAULT_MODEL = "espnet-breast-tumour"


@dataclass(frozen=True)
class RegisteredModel:
    """A named architecture: its config template and a one-line description."""

    name: str
    config: ModelConfig

    @property
    def description(self) -> str:
        return self.config.description


def _entry(name: str, description: str, **fields: Any) -> RegisteredModel:
    config = ModelConfig(name=name, num_classes=DEFAULT_NUM_CLASSES, description=description, **fields)
    return RegisteredModel(name, config)


_COMPARISON_BLOCKS = {
    "mobilenet": "MobileNet depth-wise separable",
    "shufflenet": "ShuffleNet",
    "resnext": "ResNeXt",
    "inception": "homogeneous Inception",
    "asp": "atrous spatial pyramid",
    "resnet": "ResNet basic",
}

_REGISTRY: dict[str, RegisteredModel] = {
    entry.name: entry
    for entry in [
        _entry("espnet", "ESPNet: ESPNet-C + light decoder, full-resolution output", variant="espnet"),
        _entry("espnet-c", "ESPNet-C: ESPNet-B + input reinforcement, 1/8 output", variant="espnet-c"),
        _entry("espnet-b", "ESPNet-B: ESPNet-A + feature-reuse concatenations, 1/8 output", variant="espnet-b"),
        _entry("espnet-a", "ESPNet-A: plain stack of ESP blocks, 1/8 output", variant="espnet-a"),
        *(
            _entry(f"espnet-c-{block}", f"ESPNet-C with {label} blocks (paper Fig. 5)", variant="espnet-c", block=block)
            for block, label in _COMPARISON_BLOCKS.items()
        ),
    ]
}


def list_models() -> list[RegisteredModel]:
    """All registered models, in registry order."""
    return list(_REGISTRY.values())


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The config of registered model ``name`` with ``overrides`` (any :class:`ModelConfig` field)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered models are: {', '.join(_REGISTRY)}.")
    config = _REGISTRY[name].config
    if "num_classes" in overrides:
        # The template's 20 names and colours do not fit another class count; defaults fill them.
        overrides = {"class_names": (), "class_colors": (), **overrides}
    try:
        return config.replace(**overrides)
    except TypeError as exc:
        raise ConfigError(f"invalid override for model {name!r}: {exc}.") from exc


def create_model(name: str, **overrides: Any) -> EspNet | EspNetEncoder:
    """Build registered model ``name`` (untrained), e.g. ``create_model("espnet", num_classes=8)``."""
    return build_espnet(get_model_config(name, **overrides))


@dataclass(frozen=True)
class PackagedModel:
    """A trained model shipped in the package: checkpoint, config and model card."""

    name: str
    path: Path
    config: ModelConfig

    @property
    def card(self) -> Path:
        return self.path.with_suffix(".md")


def list_packaged_models() -> list[PackagedModel]:
    """The trained models in ``wsi_espnet/models/pretrained``, default first."""
    from wsi_espnet.models.checkpoint_io import read_model_config

    paths = sorted(PACKAGED_DIR.glob("*.safetensors"), key=lambda p: (p.stem != DEFAULT_MODEL, p.stem))
    return [PackagedModel(p.stem, p, read_model_config(p)) for p in paths]


def default_model_path() -> Path:
    """The packaged default breast model's checkpoint (:data:`DEFAULT_MODEL`)."""
    path = PACKAGED_DIR / f"{DEFAULT_MODEL}.safetensors"
    if not path.is_file():
        raise ConfigError(
            f"the packaged default model {DEFAULT_MODEL!r} is missing from {PACKAGED_DIR} (a broken installation?); "
            "reinstall wsi-espnet or pass [[model=MODEL.safetensors]]."
        )
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    """``None`` -> the default model; a packaged model's name -> its file; anything else is a path."""
    if model is None:
        return default_model_path()
    text = str(model)
    if not Path(text).exists() and (PACKAGED_DIR / f"{text}.safetensors").is_file():
        return PACKAGED_DIR / f"{text}.safetensors"
    return Path(text)
