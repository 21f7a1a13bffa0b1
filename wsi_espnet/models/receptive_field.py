"""How far a model looks: its theoretical and effective receptive fields, and the tile halo they imply.

ESPNet's theoretical receptive field is huge (the level-3 dilation of 16 at stride 8 alone spans
256 input pixels per block), but most of an output pixel's evidence comes from much closer. The
*effective* receptive field (Luo et al., NeurIPS 2016) measures that: the input-gradient magnitude of
one output pixel, whose mass concentrates near the pixel. A tile halo that covers a given share of
that mass makes tiled inference agree with whole-image inference on nearly every pixel; the share is
the knob that trades agreement for compute.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsi_espnet.atomic_files import replacing
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.espnet import TOTAL_STRIDE

__all__ = ["HALO_SOURCE", "cached_halo_for", "effective_receptive_radius", "halo_for"]

#: Share of the input-gradient mass the default halo covers (see benchmarks/halo_agreement.py).
DEFAULT_HALO_MASS = 0.95
_PROBE_SIZE = 1024
#: How provenance describes a halo measured by :func:`halo_for`.
HALO_SOURCE = f"effective receptive field ({DEFAULT_HALO_MASS:.0%} of gradient mass)"


def effective_receptive_radius(
    model: nn.Module, *, mass: float = DEFAULT_HALO_MASS, probe_size: int = _PROBE_SIZE
) -> int:
    """Chebyshev radius, in input pixels, holding ``mass`` of the centre output pixel's input gradient.

    Measured on a ``probe_size`` square of the mean image (zeros after normalisation), with the model
    in eval mode on its own device and dtype; the model's training flag is restored. Capped at
    ``probe_size // 2``.
    """
    if not 0 < mass < 1:
        raise ValueError(f"mass={mass} must be between 0 and 1.")
    parameter = next(model.parameters())
    config = getattr(model, "config", None)
    channels = config.in_channels if isinstance(config, ModelConfig) else 3
    probe = torch.zeros(1, channels, probe_size, probe_size, device=parameter.device, dtype=parameter.dtype)
    probe.requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(probe)
            centre = logits.shape[-1] // 2
            # autograd.grad leaves the parameters' .grad (a caller's accumulated gradients) untouched.
            (gradient,) = torch.autograd.grad(logits[0, :, centre, centre].sum(), probe)
    finally:
        model.train(was_training)
    weight = gradient.detach().abs().sum((0, 1)).float().cpu().numpy()
    rows, cols = np.indices(weight.shape)
    middle = probe_size // 2
    radius = np.maximum(np.abs(rows - middle), np.abs(cols - middle)).ravel()
    order = np.argsort(radius, kind="stable")
    cumulative = np.cumsum(weight.ravel()[order])
    if cumulative[-1] == 0:
        return 0
    index = min(int(np.searchsorted(cumulative, mass * cumulative[-1])), len(order) - 1)
    return int(radius[order][index])


def halo_for(model: nn.Module, *, mass: float = DEFAULT_HALO_MASS) -> int:
    """The default tile halo: the effective receptive radius, rounded up to the network's stride."""
    radius = effective_receptive_radius(model, mass=mass)
    return -(-radius // TOTAL_STRIDE) * TOTAL_STRIDE


def cached_halo_for(model: nn.Module, weights_sha256: str) -> int:
    """:func:`halo_for` ``model``, measured once per weights hash and kept in ``$XDG_CACHE_HOME/wsi-espnet``.

    Measuring takes a backward pass over a large probe; a cache that cannot be read or written is
    simply not used.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wsi-espnet" / "halo.json"
    key = f"{weights_sha256}:{DEFAULT_HALO_MASS}"
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache.read_text())
        if isinstance(cached.get(key), int):
            return int(cached[key])
    halo = halo_for(model)
    with contextlib.suppress(OSError, ValueError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        existing = json.loads(cache.read_text()) if cache.is_file() else {}
        with replacing(cache) as partial:
            partial.write_text(json.dumps({**existing, key: halo}))
    return halo
