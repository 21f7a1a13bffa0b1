"""The ESPNet model family: configs, builders, checkpoints and complexity figures."""

from wsi_espnet.models.checkpoint_io import file_sha256, load_model, save_model
from wsi_espnet.models.complexity import count_multiply_adds, count_parameters
from wsi_espnet.models.config import EspBlockOptions, ModelConfig, Preprocessing
from wsi_espnet.models.espnet import EspNet, EspNetEncoder, build_espnet
from wsi_espnet.models.original_checkpoints import load_original_checkpoint
from wsi_espnet.models.registry import create_model, get_model_config, list_models

__all__ = [
    "EspBlockOptions",
    "EspNet",
    "EspNetEncoder",
    "ModelConfig",
    "Preprocessing",
    "build_espnet",
    "count_multiply_adds",
    "count_parameters",
    "create_model",
    "file_sha256",
    "get_model_config",
    "list_models",
    "load_model",
    "load_original_checkpoint",
    "save_model",
]
