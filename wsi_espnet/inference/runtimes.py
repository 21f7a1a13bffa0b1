"""Where a model's forward pass runs: PyTorch, OpenVINO or ONNX Runtime, chosen by measurement.

``segment`` and ``predict`` take ``--runtime auto|torch|openvino|openvino-bf16|onnx``:

- ``torch``: the model itself, channels_last on CPU, autocast at the placement's precision (the only
  path on a GPU);
- ``openvino``: the model exported once to ONNX (in memory) and compiled by OpenVINO's CPU plugin,
  which fuses batch norm, PReLU, the hierarchical sums and the concatenations into the convolutions;
  in fp32 (OpenVINO's own default on CPUs with native bf16 is bf16: it is asked for f32 explicitly);
- ``openvino-bf16``: the same in bfloat16, offered only on CPUs with native bf16 (AVX512-BF16 or AMX),
  where it runs 1.5-1.7x OpenVINO fp32; asked for by name only, never by ``auto``: its labels differ from
  fp32 on 0.2-0.5% of the pixels (CMU-1-Small-Region, a Cityscapes frame), above the 0.1% ``auto``
  allows, even where one check window happens to agree better, and they would depend on the CPU a
  slide ran on;
- ``onnx``: the same graph in ONNX Runtime's CPU provider with all graph optimisations;
- ``auto`` (the default): on a CPU, the first batch a model meets is the calibration check. Its
  first image, centre-cropped (or, if smaller, repeated) to :data:`CHECK_SIDE` pixels square, runs
  through each fp32 path;
  the fastest whose labels agree with PyTorch fp32 on at least :data:`MIN_AGREEMENT` of the pixels
  wins, and the choice (with every path's time and agreement) is recorded. On a GPU, ``torch``.

The check runs on real input (the slide's own first tissue window, cropped or repeated to one square
size) and costs about 3 s on a 2-core CPU (exporting and compiling, two runs of each path). Its result
is kept in :func:`choices_file`, keyed by the weights, the CPU and the runtimes' versions (not the
thread count): the check runs once per machine and model, and every later run there (and every worker of a
batch on that node, whichever window it meets first) runs the same path, so reruns give identical
masks. Delete the file to check again. Every installed fp32 runtime joins the check: which of them
wins depends on the model and the CPU (``benchmarks/model_speed.py``).

int8 post-training quantisation was measured and left out: OpenVINO NNCF int8 ran 2.2-2.5x eager fp32 at
1024x512 on an AVX2 CPU without VNNI (2.7-4.4x with VNNI) but agreed on only 91-98% of the pixels (ONNX
Runtime QDQ int8: 80-89%).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import datetime
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import platform
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from wsi_espnet.atomic_files import replacing
from wsi_espnet.devices import Placement
from wsi_espnet.errors import InputError
from wsi_espnet.inference.predict import class_labels

__all__ = [
    "AUTO_CANDIDATES",
    "CHECK_SIDE",
    "MIN_AGREEMENT",
    "RUNTIMES",
    "ModelRuntime",
    "RuntimeChoice",
    "available_runtimes",
    "check_runtime",
    "choices_file",
    "import_openvino",
    "model_runtime",
    "native_bf16",
]

RUNTIMES = ("auto", "torch", "openvino", "openvino-bf16", "onnx")
"""The runtime spellings ``segment`` and ``predict`` accept."""
#: The paths ``auto`` checks: the fp32 ones, whose labels do not depend on the CPU a slide runs on.
AUTO_CANDIDATES = ("torch", "openvino", "onnx")

#: Least share of calibration pixels whose label must equal PyTorch fp32's for ``auto`` to pick a path.
MIN_AGREEMENT = 0.999
#: Side of the square calibration input (a multiple of 8): the first image, centre-cropped or repeated to
#: it. One size for every window, so the choice does not depend on which window of a slide a process
#: meets first: a batch's workers and a single-slide run on one machine run the same path.
CHECK_SIDE = 1024
#: Input shapes OpenVINO keeps compiled at once. Each compiled shape holds its own activation memory
#: (a 1968-px window: ~400 MB), and a slide's windows come grouped by shape (at most four shapes, see
#: ``tile_groups``), so one is enough: a 20k slide's four shapes kept together peaked 380 MB higher.
OPENVINO_SHAPES = 1
_MODULES = {"openvino": "openvino", "openvino-bf16": "openvino", "onnx": "onnxruntime"}
#: OpenVINO's inference precision for each of its runtimes.
_OPENVINO_PRECISIONS = {"openvino": "f32", "openvino-bf16": "bf16"}

log = logging.getLogger(__name__)
Forward = Callable[[Tensor], Tensor]


def check_runtime(text: str) -> str:
    """Return ``text`` if it is one of :data:`RUNTIMES`; raise :class:`InputError` listing them."""
    if text not in RUNTIMES:
        raise InputError(f"runtime {text!r} is not one of {', '.join(RUNTIMES)}.")
    return text


def available_runtimes() -> tuple[str, ...]:
    """The runtimes this Python can run here: ``torch`` always, the others when their package is installed
    (``openvino-bf16`` only where the CPU computes bf16 natively; emulated it is slower than fp32)."""
    found = [name for name, module in _MODULES.items() if importlib.util.find_spec(module) is not None]
    if "openvino-bf16" in found and not native_bf16():
        found.remove("openvino-bf16")
    return ("torch", *found)


def import_openvino() -> ModuleType:
    """``openvino``, imported without its usage telemetry.

    Importing OpenVINO sends a usage event to Google Analytics unless the user has opted out (its
    converter does the same per model), from a subprocess forked off the (multi-threaded) caller that
    may wait up to 3 s without internet, in every worker process. Slides are read on hospital
    networks, so the telemetry package is kept out of this process (``openvino.tools.ovc`` then
    falls back to its own no-op stub); OpenVINO's inference does not use it. A process that imported
    the telemetry package before keeps it.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]  # None: ImportError
    return importlib.import_module("openvino")


@functools.cache
def native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 on this CPU (AVX512-BF16 or AMX)."""
    try:
        return "BF16" in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no OpenVINO, or a CPU plugin that cannot start: no bf16 path
        return False


@dataclass(frozen=True)
class RuntimeChoice:
    """Which path a process runs and why.

    name : "torch", "openvino", "openvino-bf16" or "onnx".
    requested : what was asked for ("auto" or a name).
    agreement : share of the calibration pixels whose label equals PyTorch fp32's (1.0 for torch;
        None when no check ran: a path named explicitly).
    check : per candidate, its check seconds and agreement (empty when no check ran).
    measured : when the check ran (ISO 8601, UTC); an earlier time means the choice came from the cache.
    """

    name: str
    requested: str
    agreement: float | None = None
    check: dict[str, dict[str, float]] = field(default_factory=dict)
    measured: str | None = None

    def as_record(self) -> dict[str, Any]:
        """The choice as a JSON-ready dict (for the provenance)."""
        return {
            "runtime": self.name, "requested": self.requested, "agreement": self.agreement, "check": self.check,
            "measured": self.measured,
        }  # fmt: skip


class ModelRuntime:
    """A model's forward pass on the chosen runtime: ``logits(batch)`` for normalised batches.

    ``batch`` is ``(B, C, H, W)`` float32 with H and W multiples of 8 (``padded_forward`` pads);
    the result is the model's logits on the CPU (or the model's device for ``torch``), float32.
    Built by :func:`model_runtime`, which caches one per model object; calls are serialised.
    """

    def __init__(self, model: nn.Module, placement: Placement, requested: str, *, channels_last: bool = True):
        check_runtime(requested)
        if requested in _MODULES and placement.torch_device.type != "cpu":
            raise InputError(
                f"runtime {requested!r} runs on the CPU, but device {placement.device!r} was asked for; "
                "use [[runtime=torch]] (or auto) on a GPU, or [[device=cpu]]."
            )
        own = "bf16" if requested == "openvino-bf16" else "fp32"
        if requested in _MODULES and placement.precision not in ("fp32", own):
            raise InputError(
                f"runtime {requested!r} runs {own} only, but precision {placement.precision!r} was asked for; "
                "use [[precision=fp32]] (or auto), or [[runtime=torch]] for autocast."
            )
        if requested in _MODULES and importlib.util.find_spec(_MODULES[requested]) is None:
            raise InputError(
                f"runtime {requested!r} needs the {_MODULES[requested]} package: pip install {_MODULES[requested]}, "
                f"or use one of {', '.join(available_runtimes())}."
            )
        if requested == "openvino-bf16" and not native_bf16():
            raise InputError(
                f"runtime 'openvino-bf16' needs a CPU that computes bfloat16 natively (AVX512-BF16 or AMX), and "
                f"{_cpu_name()!r} does not; use one of {', '.join(available_runtimes())} (or auto)."
            )
        self.model = model
        self.placement = placement
        self.requested = requested
        self.channels_last = channels_last
        self._lock = threading.Lock()
        self._forward: Forward | None = None
        self._onnx: bytes | None = None
        self._weights = functools.cache(lambda: _weights_hash(model))  # the check's key and the ONNX file's
        self.choice: RuntimeChoice | None = None
        if requested != "auto" or placement.torch_device.type != "cpu":
            name = "torch" if requested == "auto" else requested
            self._forward = self._build(name)
            agreement = 1.0 if name == "torch" else None
            self.choice = RuntimeChoice(name, requested, agreement)

    def logits(self, batch: Tensor) -> Tensor:
        """Logits of a normalised ``(B, C, H, W)`` batch; the first call under ``auto`` runs the check."""
        with self._lock:
            if self._forward is None:
                key = _check_key(self._weights(), batch)
                with _choices_locked():  # one process checks; the others on this machine wait and read its choice
                    cached = _read_choice(key)
                    if cached is not None:
                        self._forward, self.choice = self._build(cached.name), cached
                    else:
                        self._forward, self.choice, logits = self._calibrate(batch)
                        _write_choice(key, self.choice)
                        if logits is not None:
                            return logits
            return self._forward(batch)

    # -- the paths -------------------------------------------------------------------------------
    def _build(self, name: str) -> Forward:
        with torch.inference_mode(False):  # exporting traces the model, which inference mode forbids
            return self._build_path(name)

    def _build_path(self, name: str) -> Forward:
        if name == "torch":
            return self._torch_forward()
        if name in _OPENVINO_PRECISIONS:
            return self._openvino_forward(_OPENVINO_PRECISIONS[name])
        return self._onnx_forward()

    def _torch_forward(self) -> Forward:
        model = self.model.eval()
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        device = self.placement.torch_device
        dtype = self.placement.autocast_dtype

        def forward(batch: Tensor) -> Tensor:
            batch = batch.to(device).contiguous(memory_format=memory_format)
            with torch.inference_mode(), torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None):
                logits: Tensor = model(batch).float()
                return logits

        return forward

    def _onnx_bytes(self) -> bytes:
        """The model as ONNX with dynamic batch, height and width: exported once (about 1.5 s) and kept
        beside the choices (``onnx/<weights hash>-torch-<version>.onnx``), so later processes only read it."""
        if self._onnx is None:
            cached = choices_file().parent / "onnx" / f"{self._weights()}-torch-{torch.__version__}.onnx"
            with contextlib.suppress(OSError):
                self._onnx = cached.read_bytes()
                return self._onnx
            cpu_model = _cpu_copy(self.model)
            channels = int(getattr(getattr(self.model, "config", None), "in_channels", 3))
            buffer = io.BytesIO()
            dims = {0: "batch", 2: "height", 3: "width"}
            with _quiet_export():
                # The TorchScript exporter: 1.4 s, where the dynamo one (export_onnx) takes 16 s on 2 cores.
                torch.onnx.export(
                    cpu_model, (torch.zeros(1, channels, 64, 64),), buffer,  # type: ignore[arg-type]
                    dynamo=False, opset_version=17, input_names=["image"], output_names=["logits"],
                    dynamic_axes={"image": dims, "logits": dims},
                )  # fmt: skip
            self._onnx = buffer.getvalue()
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                with replacing(cached) as partial:
                    partial.write_bytes(self._onnx)
            except OSError as exc:  # a read-only cache: export again next time
                log.debug("could not keep the ONNX export in %s: %s", cached, exc)
        return self._onnx

    def _openvino_forward(self, precision: str) -> Forward:
        """OpenVINO at ``precision`` ("f32" or "bf16"), compiled once per input shape: a static shape lets
        its memory planner reuse buffers (a 1968-px window peaked at 904 MiB against 1167 MiB compiled for
        dynamic shapes, at the same speed)."""
        core = import_openvino().Core()
        # The runtime's own ONNX reader, not ov.convert_model: the converter sends usage telemetry to Google
        # Analytics unless the user has opted out (a subprocess waiting up to 3 s offline), and slides are
        # often read on hospital networks. Same graph, 24 ms instead of 200 ms + telemetry.
        graph = core.read_model(self._onnx_bytes(), b"")
        settings = {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": precision,
        }  # fmt: skip
        requests: collections.OrderedDict[tuple[int, ...], Any] = collections.OrderedDict()

        def forward(batch: Tensor) -> Tensor:
            array = batch.detach().cpu().float().contiguous().numpy()
            shape = tuple(array.shape)
            if shape not in requests:
                static = graph.clone()
                static.reshape(list(shape))
                requests[shape] = core.compile_model(static, "CPU", settings).create_infer_request()
                while len(requests) > OPENVINO_SHAPES:
                    requests.popitem(last=False)
            requests.move_to_end(shape)
            return torch.from_numpy(requests[shape].infer({0: array})[0].copy())

        return forward

    def _onnx_forward(self) -> Forward:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(self._onnx_bytes(), options, providers=["CPUExecutionProvider"])

        def forward(batch: Tensor) -> Tensor:
            array = batch.detach().cpu().float().contiguous().numpy()
            return torch.from_numpy(session.run(None, {"image": array})[0])

        return forward

    # -- auto ------------------------------------------------------------------------------------
    def _calibrate(self, batch: Tensor) -> tuple[Forward, RuntimeChoice, Tensor | None]:
        """Run the first image of ``batch`` through each candidate; the fastest that agrees wins.

        Timed at the real input size, since the paths scale differently (PyTorch slows per pixel on
        windows whose activations outgrow the caches; OpenVINO tiles them). Each path runs a warm-up (the
        first run at a shape builds its kernels) and a timed run; PyTorch's labels are the reference.
        Returns the winner, the choice and, for a one-image batch, the winner's logits of it.
        """
        sample = _check_input(batch[:1])
        candidates = [name for name in available_runtimes() if name in AUTO_CANDIDATES]
        check: dict[str, dict[str, float]] = {}
        reference: Tensor | None = None
        best: tuple[str, Forward, Tensor] | None = None  # only the fastest agreeing path so far stays alive
        for name in candidates:
            try:
                began = time.perf_counter()
                forward = self._build(name)
                prepare = time.perf_counter() - began
                forward(sample)  # the first run at a shape builds kernels (PyTorch's too: 700 against 184 ms)
                began = time.perf_counter()
                logits = forward(sample)
                seconds = time.perf_counter() - began
            except Exception as exc:  # a broken optional runtime must not stop a run that torch can do
                log.warning("runtime %s left out of the check: %s", name, exc)
                continue
            labels = class_labels(logits)
            reference = labels if reference is None else reference
            agreement = float((labels == reference).float().mean())
            check[name] = {"seconds": seconds, "agreement": agreement, "prepare_seconds": prepare}
            if agreement >= MIN_AGREEMENT and (best is None or seconds < check[best[0]]["seconds"]):
                best = (name, forward, logits)
            del forward, logits, labels  # a loser's compiled model and buffers go before the next one is built
            _release_freed_memory()  # or the next candidate's buffers stack on this one's freed heap
        if best is None:
            raise RuntimeError(f"no runtime could run the check ({', '.join(candidates)}); see the warnings above")
        name, forward, logits = best
        log.info(
            "runtime auto: %s (%s)", name,
            ", ".join(f"{n} {c['seconds'] * 1e3:.0f} ms, agreement {c['agreement']:.5f}" for n, c in check.items()),
        )  # fmt: skip
        reusable = logits if batch.shape[0] == 1 and sample.shape == batch.shape else None
        measured = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        choice = RuntimeChoice(name, "auto", check[name]["agreement"], check, measured)
        return forward, choice, reusable


_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str, str, bool], ModelRuntime]] = (
    weakref.WeakKeyDictionary()
)
_RUNTIMES_LOCK = threading.Lock()


def model_runtime(model: nn.Module, placement: Placement, runtime: str, *, channels_last: bool = True) -> ModelRuntime:
    """The :class:`ModelRuntime` of ``model`` for this placement and runtime, built once per model object.

    The model's weights must not change while it is cached (they are compiled into the other runtimes).
    """
    key = (runtime, placement.device, placement.precision, channels_last)
    with _RUNTIMES_LOCK:
        per_model = _RUNTIMES.setdefault(model, {})
        if key not in per_model:
            per_model[key] = ModelRuntime(model, placement, runtime, channels_last=channels_last)
        return per_model[key]


def choices_file() -> Path:
    """Where ``auto`` keeps its checks: ``$XDG_CACHE_HOME/wsi-espnet/runtime-choices.json`` (``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "wsi-espnet" / "runtime-choices.json"


def _check_key(weights: str, batch: Tensor) -> str:
    """What a check's result depends on: the weights, the check input's shape (channels; always
    :data:`CHECK_SIDE` square), this CPU and the runtimes' versions.

    The same model on the same machine therefore always runs the same path, whatever window a process
    meets first and however many threads it has (a batch's single-threaded workers and a two-thread
    ``segment`` give identical masks; timings alone would pick differently), and the check is paid
    once, not per process.
    """
    facts = {
        "weights": weights, "shape": [1, batch.shape[1], CHECK_SIDE, CHECK_SIDE],  # what _check_input gives
        "cpu": _cpu_name(), "cores": os.cpu_count(),
        "versions": {m: _version(m) for m in ("torch", *_MODULES.values())}, "min_agreement": MIN_AGREEMENT,
        "runtimes": available_runtimes(),  # also retires checks made when "openvino" could mean bf16
    }  # fmt: skip
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _weights_hash(model: nn.Module) -> str:
    """SHA-256 of the model's class, parameter names and values (about 1 ms for ESPNet)."""
    weights = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return weights.hexdigest()


@contextlib.contextmanager
def _choices_locked() -> Iterator[None]:
    """Hold an exclusive lock beside :func:`choices_file` (POSIX ``flock``), so that the processes of a batch
    starting together on a fresh machine run one check between them, not one each (each could pick
    another path). Without a writable cache folder or ``fcntl``, no lock: each process checks for itself."""
    try:
        import fcntl

        path = choices_file().with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_choice(key: str) -> RuntimeChoice | None:
    try:
        entry = json.loads(choices_file().read_text()).get(key)
        choice = RuntimeChoice(
            entry["runtime"], "auto", entry["agreement"], entry["check"], entry["measured"]
        ) if entry else None  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no cache yet, or an unreadable one: check again
    return choice if choice is not None and choice.name in available_runtimes() else None


def _write_choice(key: str, choice: RuntimeChoice) -> None:
    path = choices_file()
    try:
        try:
            entries = json.loads(path.read_text())
            entries = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            entries = {}
        entries[key] = choice.as_record()
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as partial:
            partial.write_text(json.dumps(entries, indent=1, sort_keys=True))
    except OSError as exc:  # a read-only home: the check runs again next time, nothing else changes
        log.debug("could not cache the runtime check in %s: %s", path, exc)


def _release_freed_memory() -> None:
    """Hand freed heap back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    The check runs two runtimes on one window: without this, the peak of the first run on a machine was
    the sum of both (1494 MiB on the 10k slide, against 1341 MiB for later runs).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return f"{platform.machine()} {platform.processor()}"


def _version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_input(batch: Tensor, side: int = CHECK_SIDE) -> Tensor:
    """``batch`` as ``side x side``: centre-cropped where larger, repeated (tiled) where smaller."""
    height, width = batch.shape[-2:]
    batch = batch.repeat(1, 1, -(-side // height), -(-side // width)) if height < side or width < side else batch
    height, width = batch.shape[-2:]
    top, left = (height - side) // 2 // 8 * 8, (width - side) // 2 // 8 * 8
    return batch[..., top : top + side, left : left + side].contiguous()


def _timed(forward: Forward, batch: Tensor) -> float:
    began = time.perf_counter()
    forward(batch)
    return time.perf_counter() - began


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    copied: nn.Module = copy.deepcopy(model).cpu().float()
    return copied.to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload,no-any-return]


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The TorchScript exporter's deprecation and tracer warnings are ours to handle, not the user's."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_logger.setLevel(level)
