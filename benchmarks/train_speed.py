"""Training-step speed: what a MONAI MetaTensor batch costs, channels_last, and the two stages.

Times ``optimizer.step()`` iterations (forward, weighted cross-entropy, backward) on CamVid-sized
batches of real CamVid frames and prints each setting's median step time and its ratio to the
baseline measured in the same run (plain tensors, fp32, contiguous). The MetaTensor row is what
``SupervisedTrainer`` would run if :class:`~wsi_espnet.training.engine.PrepareBatch` did not
strip the metadata: every operation of the network then goes through ``__torch_function__``.
Measured on the 2-core CI CPU (torch 2.13, batch 8 x 360 x 480): ESPNet 759 ms/step, channels_last
0.98x, MetaTensor 1.00x; ESPNet-C 495 ms/step, channels_last 0.94x, MetaTensor 0.94x.

    python3 benchmarks/train_speed.py [--batch 8] [--steps 6] [--height 360 --width 480]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from PIL import Image

from wsi_espnet.models import create_model


def _batch(batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = Path(os.environ.get("WSI_ESPNET_TEST_DATA", "../shared/data")) / "street" / "camvid"
    frames = sorted((data / "train").glob("*.png"))[:batch]
    images = [np.asarray(Image.open(f).convert("RGB").resize((width, height))) for f in frames]
    labels = [
        np.asarray(Image.open(data / "trainannot" / f.name).resize((width, height), Image.NEAREST)) for f in frames
    ]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    x = (x - x.mean()) / x.std()
    return x, torch.from_numpy(np.stack(labels)).long()


def _time(variant: str, x: torch.Tensor, y: torch.Tensor, *, steps: int, channels_last: bool) -> float:
    torch.manual_seed(0)
    model = create_model(variant, num_classes=11)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=5e-4)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        started = time.perf_counter()
        logits = model(x)
        target = y
        if logits.shape[-2:] != y.shape[-2:]:
            target = F.interpolate(y[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        loss = F.cross_entropy(logits, target, ignore_index=11)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--width", type=int, default=480)
    args = parser.parse_args()
    x, y = _batch(args.batch, args.height, args.width)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}x{args.height}x{args.width}"
    )
    print(f"{'model':<9} {'setting':<22} {'ms/step':>8} {'vs baseline':>11} {'images/s':>9}")
    for variant in ("espnet", "espnet-c"):
        base = _time(variant, x, y, steps=args.steps, channels_last=False)
        rows = [
            ("plain fp32 (baseline)", base),
            ("channels_last", _time(variant, x, y, steps=args.steps, channels_last=True)),
            ("MONAI MetaTensor", _time(variant, MetaTensor(x), y, steps=args.steps, channels_last=False)),
        ]
        for name, seconds in rows:
            print(
                f"{variant:<9} {name:<22} {1000 * seconds:>8.1f} {base / seconds:>10.2f}x {args.batch / seconds:>9.1f}"
            )


if __name__ == "__main__":
    main()
