"""Effective receptive radius and the tile halo, on an untrained ESPNet-C and the authors' trained ESPNet."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from wsi_espnet.models import create_model, load_original_checkpoint
from wsi_espnet.models import receptive_field as rf
from wsi_espnet.models.espnet import TOTAL_STRIDE
from wsi_espnet.models.receptive_field import effective_receptive_radius, halo_for

MASSES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
PROBE = 128  # small enough for a CPU, large enough that only the top masses reach the cap


def _untrained() -> nn.Module:
    torch.manual_seed(0)
    return create_model("espnet-c", num_classes=3)


def _original(weights: Path) -> nn.Module:
    model, _ = load_original_checkpoint(weights / "decoder_espnet_p_2_q_3.pth")
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One thread: barely slower for these small probes, and immune to OpenMP threads spinning against
    other processes (with two threads the file sometimes took minutes on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["untrained-espnet-c", "original-espnet-p2-q3"])
def model(request: pytest.FixtureRequest, original_weights: Path) -> nn.Module:
    """A fresh model per test, since several tests change its mode or gradients."""
    return _untrained() if request.param == "untrained-espnet-c" else _original(original_weights)


def _small_probe(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``halo_for`` measure on a ``PROBE`` square; returns the radii it measured."""
    measured: list[int] = []
    full_size: Callable[..., int] = rf.effective_receptive_radius

    @functools.wraps(full_size)
    def small(model: nn.Module, *, mass: float) -> int:
        measured.append(full_size(model, mass=mass, probe_size=PROBE))
        return measured[-1]

    monkeypatch.setattr(rf, "effective_receptive_radius", small)
    return measured


def test_radius_grows_with_mass(model: nn.Module) -> None:
    radii = [effective_receptive_radius(model, mass=mass, probe_size=PROBE) for mass in MASSES]
    assert radii == sorted(radii)
    assert 0 < radii[0] < radii[-1] <= PROBE // 2
    assert radii[MASSES.index(0.5)] < radii[MASSES.index(0.95)]


def test_radius_is_capped_at_half_the_probe(model: nn.Module) -> None:
    assert effective_receptive_radius(model, mass=0.999, probe_size=32) == 16


def test_radius_is_deterministic(model: nn.Module) -> None:
    first = effective_receptive_radius(model, mass=0.9, probe_size=PROBE)
    assert effective_receptive_radius(model, mass=0.9, probe_size=PROBE) == first


def test_trained_model_looks_further_than_its_median(original_weights: Path) -> None:
    """The trained decoder's context: half its evidence lies within tens of pixels, 95% much further."""
    model = _original(original_weights)
    median = effective_receptive_radius(model, mass=0.5, probe_size=256)
    wide = effective_receptive_radius(model, mass=0.95, probe_size=256)
    assert 16 <= median < wide <= 128
    assert wide >= 1.5 * median


@pytest.mark.parametrize("mass", [0.25, 0.5, 0.9, 0.95, 0.99])
def test_halo_rounds_the_radius_up_to_the_stride(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch, mass: float
) -> None:
    measured = _small_probe(monkeypatch)
    halo = halo_for(model, mass=mass)
    (radius,) = measured
    assert radius == effective_receptive_radius(model, mass=mass, probe_size=PROBE)
    assert halo % TOTAL_STRIDE == 0
    assert radius <= halo < radius + TOTAL_STRIDE


def test_default_halo(monkeypatch: pytest.MonkeyPatch) -> None:
    """One measurement at the default probe size and mass (the costly one, so only the small model)."""
    measured: list[int] = []
    full_size = rf.effective_receptive_radius

    def spy(model: nn.Module, *, mass: float) -> int:
        assert mass == rf.DEFAULT_HALO_MASS
        measured.append(full_size(model, mass=mass))
        return measured[-1]

    monkeypatch.setattr(rf, "effective_receptive_radius", spy)
    halo = halo_for(_untrained())
    (radius,) = measured
    assert halo % TOTAL_STRIDE == 0
    assert radius <= halo < radius + TOTAL_STRIDE
    assert 0 < radius < rf._PROBE_SIZE // 2


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_and_weights_are_restored(model: nn.Module, training: bool) -> None:
    model.train(training)
    modes = {name: module.training for name, module in model.named_modules()}
    state = {name: value.clone() for name, value in model.state_dict().items()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}

    effective_receptive_radius(model, mass=0.9, probe_size=64)

    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    # In train mode a forward pass would move the BatchNorm running statistics; the probe must not.
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_accumulated_gradients_are_kept(original_weights: Path) -> None:
    model = _original(original_weights)
    model.train()
    model(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert before

    effective_receptive_radius(model, mass=0.9, probe_size=64)

    after = {name: p.grad for name, p in model.named_parameters()}
    assert after.keys() == before.keys()
    for name, grad in after.items():
        assert grad is not None, name
        assert torch.equal(grad, before[name]), name


def test_frozen_model(model: nn.Module) -> None:
    """Frozen weights (fine-tuning a head, or inference only) still give a gradient at the input."""
    unfrozen = effective_receptive_radius(model, mass=0.9, probe_size=PROBE)
    model.requires_grad_(False)
    assert effective_receptive_radius(model, mass=0.9, probe_size=PROBE) == unfrozen
    assert not any(p.requires_grad for p in model.parameters())


def test_measures_in_the_models_dtype() -> None:
    model = _untrained().double()
    radius = effective_receptive_radius(model, mass=0.9, probe_size=64)
    assert 0 < radius <= 32
    assert next(model.parameters()).dtype == torch.float64


@pytest.mark.parametrize("mass", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_invalid_mass(mass: float) -> None:
    model = _untrained()
    with pytest.raises(ValueError, match=f"mass={mass} must be between 0 and 1"):
        effective_receptive_radius(model, mass=mass, probe_size=64)
    with pytest.raises(ValueError, match=f"mass={mass} must be between 0 and 1"):
        halo_for(model, mass=mass)
