"""The head segmentation network: a small DeepLab (v3+-style) trained from scratch.

The spec's DeepLab v2 ideas are kept: atrous (dilated) convolutions keep a 1/8-resolution
feature map with a large receptive field, and atrous spatial pyramid pooling (ASPP) looks at
several scales at once. Widths are cut to run on a CPU (no ImageNet weights can be fetched,
so nothing is gained from a wide backbone), and a light decoder joins a 1/4-resolution
feature map as in DeepLab v3+, which sharpens the skull boundary the measurement depends on.
Input: (N, 1, H, W) in [0, 1], H and W multiples of 8. Output: (N, 1, H, W) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1, kernel: int = 3) -> nn.Sequential:
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Parallel atrous convolutions at several rates plus image-level pooling, fused by 1x1."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (2, 4, 6)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(cin, cout, kernel=1)] + [conv_bn(cin, cout, dilation=r) for r in rates])
        self.pool = conv_bn(cin, cout, kernel=1)
        self.project = conv_bn(cout * (len(rates) + 2), cout, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        outs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, dim=1))


class HeadNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.width = w = width
        self.stem = nn.Sequential(conv_bn(1, w, stride=2), conv_bn(w, w))  # 1/2
        self.layer2 = nn.Sequential(conv_bn(w, 2 * w, stride=2), conv_bn(2 * w, 2 * w))  # 1/4
        self.layer3 = nn.Sequential(conv_bn(2 * w, 4 * w, stride=2), conv_bn(4 * w, 4 * w))  # 1/8
        self.atrous = nn.Sequential(conv_bn(4 * w, 6 * w, dilation=2), conv_bn(6 * w, 6 * w, dilation=4))
        self.aspp = ASPP(6 * w, 6 * w)
        self.low = conv_bn(2 * w, w, kernel=1)
        self.decode = nn.Sequential(conv_bn(7 * w, 3 * w), conv_bn(3 * w, 3 * w), nn.Conv2d(3 * w, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        low = self.layer2(self.stem(x))
        deep = self.aspp(self.atrous(self.layer3(low)))
        deep = F.interpolate(deep, size=low.shape[2:], mode="bilinear", align_corners=False)
        logits = self.decode(torch.cat([deep, self.low(low)], dim=1))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class HeadEnsemble(nn.Module):
    """Several head networks as one: the mean of their probabilities, returned as a logit (the
    segmenter takes the sigmoid of whatever the model file gives), so an ensemble is saved, loaded
    and run as one model file of the same format. Costs each member's time."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.width = int(getattr(members[0], "width", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(dim=0)
        return torch.logit(p, eps=1e-6)
