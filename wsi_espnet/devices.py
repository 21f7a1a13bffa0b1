"""Where a model runs and at which precision: the one place that turns ``--device``/``--precision`` into both.

``segment``, ``predict``, ``train`` and ``evaluate`` all take ``--device auto|cpu|cuda|cuda:N`` (and
``segment`` a ``--precision``). Resolving them here, once per task, means every command accepts the same
spellings, says the same thing when a GPU is missing, and picks the same defaults: ``auto`` is CUDA when
this process sees a GPU, else the CPU; precision ``auto`` is fp16 autocast on CUDA and plain fp32 on CPU.

"auto" is resolved where the work runs (a Dask worker may have a GPU its client lacks), so pass the
user's text along unchanged and call :func:`resolve` in the process that runs the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from wsi_espnet.errors import InputError

__all__ = ["DEVICE_FORMS", "PRECISIONS", "Placement", "check_device_spec", "check_precision", "resolve"]

DEVICE_FORMS = "auto, cpu, cuda, cuda:N"
"""The device spellings every command accepts, as error messages list them."""

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
"""The precisions every command accepts; fp16 and bf16 run under autocast, fp32 runs plain."""

_DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    """A resolved device and precision.

    Attributes
    ----------
    device : "cpu", "cuda" or "cuda:N"; never "auto".
    precision : "fp32", "fp16" or "bf16"; never "auto".
    """

    device: str
    precision: str

    @property
    def torch_device(self) -> torch.device:
        """``device`` as a :class:`torch.device`."""
        return torch.device(self.device)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype for ``precision``, or None for fp32 (run without autocast)."""
        return _AUTOCAST_DTYPES.get(self.precision)


def check_device_spec(text: str) -> str:
    """Return ``text`` if it is auto, cpu, cuda or cuda:N; raise :class:`InputError` saying what is valid.

    This checks the spelling only; whether the GPU exists is :func:`resolve`'s business, since the
    process that checks may not be the one that runs the model.
    """
    if not isinstance(text, str) or not _DEVICE_SPEC.fullmatch(text):
        raise InputError(f"device {text!r} is not one of {DEVICE_FORMS} (e.g. cuda:1).")
    return text


def check_precision(text: str) -> str:
    """Return ``text`` if it is one of :data:`PRECISIONS`; raise :class:`InputError` listing them."""
    if text not in PRECISIONS:
        raise InputError(f"precision {text!r} is not one of {', '.join(PRECISIONS)}.")
    return text


def resolve(device: str = "auto", precision: str = "auto") -> Placement:
    """Resolve a device and precision for this process.

    Parameters
    ----------
    device : "auto" (CUDA when this process sees a GPU, else CPU), "cpu", "cuda" or "cuda:N".
    precision : "auto" (fp16 on CUDA, fp32 on CPU), "fp32", "fp16" or "bf16".

    Raises
    ------
    InputError
        A misspelt device or precision, or a CUDA device this process does not see.
    """
    check_device_spec(device)
    check_precision(precision)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= visible:
            raise InputError(
                f"device {device!r} was asked for but this process (or Dask worker) sees "
                f"{visible} CUDA GPU(s); use [[device=cpu]] or auto."
            )
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    return Placement(device, precision)
