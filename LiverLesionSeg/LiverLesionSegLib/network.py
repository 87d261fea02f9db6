"""The method's light 3D U-Net: dilated convolutions, and skip connections through a
spatial-channel aggregation module (SCAM).

- Encoder: 5 stages with 4 max-pool downsamplings; decoder: 4 transposed-convolution upsamplings,
  each followed by a stage, and a 1x1x1 head (the fifth decoder stage). Every stage is two 3x3x3
  convolutions with dilation 1 then 2 (the second widens the field of view at no extra weights),
  instance norm and leaky ReLU.
- SCAM on each skip: an attention gate (the skip x and the upsampled deeper feature g through
  1x1x1 convolutions, added, ReLU, a 1x1x1 convolution to one channel, sigmoid, times x), then
  squeeze-and-excitation (global average pool, a fully connected layer, sigmoid, channel scaling);
  its output is concatenated with the upsampled decoder feature.
Input: one channel per phase (plain, arterial, venous, delayed; a missing phase is zeros).
Output: logits for background, liver, lesion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PHASE_CHANNELS = ("plain", "arterial", "venous", "delayed")
CLASSES = ("background", "liver", "lesion")


class Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1, dilation=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=2, dilation=2, bias=False), nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class SCAM(nn.Module):
    """Spatial-channel aggregation of a skip feature x under the guidance of a deeper feature g."""

    def __init__(self, channels: int, gating_channels: int):
        super().__init__()
        inner = max(channels // 2, 4)
        self.theta = nn.Conv3d(channels, inner, 1)
        self.phi = nn.Conv3d(gating_channels, inner, 1)
        self.psi = nn.Conv3d(inner, 1, 1)
        self.excite = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = F.interpolate(g, size=x.shape[2:], mode="trilinear", align_corners=False)
        attention = torch.sigmoid(self.psi(F.relu(self.theta(x) + self.phi(g))))
        x = x * attention
        scale = torch.sigmoid(self.excite(x.mean(dim=(2, 3, 4))))
        return x * scale[:, :, None, None, None]


class LesionUNet(nn.Module):
    def __init__(self, in_channels: int = len(PHASE_CHANNELS), classes: int = len(CLASSES), width: int = 8):
        super().__init__()
        c = [width * 2**n for n in range(5)]
        self.encoder = nn.ModuleList([Stage(in_channels, c[0])] + [Stage(c[n - 1], c[n]) for n in range(1, 5)])
        self.up = nn.ModuleList([nn.ConvTranspose3d(c[n], c[n - 1], 2, stride=2) for n in range(4, 0, -1)])
        self.scam = nn.ModuleList([SCAM(c[n - 1], c[n]) for n in range(4, 0, -1)])
        self.decoder = nn.ModuleList([Stage(2 * c[n - 1], c[n - 1]) for n in range(4, 0, -1)])
        self.head = nn.Conv3d(c[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for n, stage in enumerate(self.encoder):
            x = stage(x if n == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, scam, stage in zip(self.up, self.scam, self.decoder, strict=True):
            skip = skips.pop()
            x = stage(torch.cat([scam(skip, x), up(x)], dim=1))
        return self.head(x)
