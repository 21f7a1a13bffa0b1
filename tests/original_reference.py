"""An independent, functional evaluation of an original ESPNet state dict, for cross-checking.

It reads the authors' own key names (``level2_0.d4``, ``combine_l2_l3.1.bn.bn``, ...) and follows the
dataflow of the paper and of the authors' ESPNet release directly with ``torch.nn.functional``, so a
wrong entry in our key map (say, two same-shaped branches swapped) makes our model disagree with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

State = dict[str, Tensor]
EPS = 1e-3
RATES = (1, 2, 4, 8, 16)


def _bn(x: Tensor, sd: State, p: str) -> Tensor:
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=EPS)  # fmt: skip


def _bn_prelu(x: Tensor, sd: State, bn: str, act: str) -> Tensor:
    return F.prelu(_bn(x, sd, bn), sd[f"{act}.weight"])


def _esp(x: Tensor, sd: State, p: str, *, strided: bool, residual: bool) -> Tensor:
    w = sd[f"{p}.c1.conv.weight"]
    reduced = F.conv2d(x, w, stride=2 if strided else 1, padding=w.shape[-1] // 2)
    d = [F.conv2d(reduced, sd[f"{p}.d{r}.conv.weight"], padding=r, dilation=r) for r in RATES]
    fused = [d[0], d[1], d[1] + d[2], d[1] + d[2] + d[3], d[1] + d[2] + d[3] + d[4]]
    y = torch.cat(fused, 1)
    if residual:
        y = y + x
    if strided:
        return _bn_prelu(y, sd, f"{p}.bn", f"{p}.act")
    return _bn_prelu(y, sd, f"{p}.bn.bn", f"{p}.bn.act")


def _pool(x: Tensor, times: int) -> Tensor:
    for _ in range(times):
        x = F.avg_pool2d(x, 3, stride=2, padding=1)
    return x


def _level(x: Tensor, sd: State, name: str) -> tuple[Tensor, Tensor]:
    """The strided ESP block ``{name}_0`` and the residual blocks ``{name}.i`` after it."""
    down = y = _esp(x, sd, f"{name}_0", strided=True, residual=False)
    i = 0
    while f"{name}.{i}.c1.conv.weight" in sd:
        y = _esp(y, sd, f"{name}.{i}", strided=False, residual=True)
        i += 1
    return down, y


def encoder_features(x: Tensor, sd: State, p: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out0 = _bn_prelu(F.conv2d(x, sd[f"{p}level1.conv.weight"], stride=2, padding=1), sd, f"{p}level1.bn",
                     f"{p}level1.act")  # fmt: skip
    out0_cat = _bn_prelu(torch.cat([out0, _pool(x, 1)], 1), sd, f"{p}b1.bn", f"{p}b1.act")
    down2, last2 = _level(out0_cat, sd, f"{p}level2")
    out1_cat = _bn_prelu(torch.cat([last2, down2, _pool(x, 2)], 1), sd, f"{p}b2.bn", f"{p}b2.act")
    down3, last3 = _level(out1_cat, sd, f"{p}level3")
    out2_cat = _bn_prelu(torch.cat([down3, last3], 1), sd, f"{p}b3.bn", f"{p}b3.act")
    return out0, out0_cat, out1_cat, out2_cat


def original_forward(x: Tensor, sd: State) -> Tensor:
    """Logits of the original ESPNet-C (encoder file) or ESPNet (decoder file) for input ``x``."""
    if "encoder.level1.conv.weight" not in sd:
        return F.conv2d(encoder_features(x, sd)[3], sd["classifier.conv.weight"])
    out0, out0_cat, out1_cat, out2_cat = encoder_features(x, sd, "encoder.")
    classes = sd["classifier.weight"].shape[0]
    logits3 = F.conv2d(out2_cat, sd["encoder.classifier.conv.weight"])
    up3 = F.conv_transpose2d(_bn(logits3, sd, "br"), sd["up_l3.0.weight"], stride=2)
    proj2 = F.conv2d(out1_cat, sd["level3_C.conv.weight"])
    comb = _bn_prelu(torch.cat([proj2, up3], 1), sd, "combine_l2_l3.0.bn", "combine_l2_l3.0.act")
    comb = _esp(comb, sd, "combine_l2_l3.1", strided=False, residual=False)
    up2 = _bn_prelu(F.conv_transpose2d(comb, sd["up_l2.0.weight"], stride=2), sd, "up_l2.1.bn", "up_l2.1.act")
    skip = out0 if sd["conv.conv.weight"].shape[1] == 16 + classes else out0_cat
    merged = _bn_prelu(F.conv2d(torch.cat([up2, skip], 1), sd["conv.conv.weight"], padding=1), sd, "conv.bn",
                       "conv.act")  # fmt: skip
    return F.conv_transpose2d(merged, sd["classifier.weight"], stride=2)
