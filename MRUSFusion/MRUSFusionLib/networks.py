"""The spec's rigid network cascaded with its B-spline network.

Every "convolution + downsampling by 2" of the spec is one stride-2 convolution: the same layer
count, widths and feature sizes (128 -> 64 -> 32, 34 -> 17), at about a quarter of the CPU cost
of convolving at full resolution and pooling afterwards. Kernels 3, padding 1, LeakyReLU unless
the spec says otherwise. Outputs start at the identity (zero-initialised heads), which makes
training stable from the first step.
"""

from __future__ import annotations

import torch
from torch import nn

from deepnav.torch_runtime import forward_in
from MRUSFusionLib.bspline import CONTROL_POINTS, CONTROL_SPACING, bspline_matrix, upsample_control_points
from MRUSFusionLib.warp import affine_displacement, compose_affine, grid_centre, rigid_matrix, warp

GRID = 128
TRANSLATION_SCALE = 10.0  # voxels per unit of the rigid head's output
ROTATION_SCALE = 0.1  # radians per unit
CONTROL_SCALE = 4.0  # voxels per unit of the B-spline head's output


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class _Network(nn.Module):
    """A network of the cascade whose layers (`layers`) run in `precision` ('fp32' or 'bf16'
    autocast, set by `set_precision`) and return fp32: the scaling of their outputs to voxels and
    radians, the rigid matrix, the B-spline upsampling, the composition and the warps all stay
    fp32. Eager only: a scripted or exported cascade is fp32 (TorchScript cannot switch autocast
    by an attribute)."""

    def __init__(self):
        super().__init__()
        self.precision = "fp32"

    def layers(self, pair: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_layers(self, pair: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.precision != "fp32":
            return self._run_in_precision(pair)
        return self.layers(pair)

    @torch.jit.unused
    def _run_in_precision(self, pair: torch.Tensor) -> torch.Tensor:
        return forward_in(self.precision, self.layers, pair)


class RigidNet(_Network):
    """Five 3x3x3 convolutions (2, 16, 32, 64, 128 filters), four downsamplings between them
    (128^3 -> 8^3), one fully connected layer to 3 translations and 3 rotations."""

    def __init__(self, grid: int = GRID):
        super().__init__()
        self.features = nn.Sequential(
            _conv(2, 2), _conv(2, 16, 2), _conv(16, 32, 2), _conv(32, 64, 2), _conv(64, 128, 2)
        )
        self.fc = nn.Linear(128 * (grid // 16) ** 3, 6)
        self.translation_scale = TRANSLATION_SCALE
        self.rotation_scale = ROTATION_SCALE
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def layers(self, pair: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(pair).flatten(1))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """(N, 2, 128, 128, 128) -> (N, 6): ti, tj, tk (voxels), ai, aj, ak (radians)."""
        raw = self.run_layers(pair)
        return torch.cat([raw[:, :3] * self.translation_scale, raw[:, 3:] * self.rotation_scale], dim=1)


class BSplineNet(_Network):
    """128^3 -> (conv, down) x2 -> 32 x 32^3 -> transposed conv (padding 0) -> 32 x 34^3 ->
    (conv, down) -> 17^3 -> 1x1x1 conv -> 17^3 x 3 control-point displacements (voxels)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(_conv(2, 16, 2), _conv(16, 32, 2))
        self.expand = nn.Sequential(nn.ConvTranspose3d(32, 32, 3, padding=0), nn.LeakyReLU(0.2))
        self.reduce = _conv(32, 32, 2)
        self.head = nn.Conv3d(32, 3, 1)
        self.control_scale = CONTROL_SCALE
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def layers(self, pair: torch.Tensor) -> torch.Tensor:
        return self.head(self.reduce(self.expand(self.encoder(pair))))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """(N, 2, 128, 128, 128) -> (N, 3, 17, 17, 17), channels (di, dj, dk)."""
        return self.run_layers(pair) * self.control_scale


class Cascade(nn.Module):
    """phi(x) = R(x + u(x)): the B-spline field u is estimated on the rigidly warped US and the
    original US is resampled once through the composition (no double interpolation)."""

    def __init__(self, grid: int = GRID):
        super().__init__()
        self.rigid = RigidNet(grid)
        self.bspline = BSplineNet()
        w = bspline_matrix(grid, CONTROL_POINTS, CONTROL_SPACING)
        # derived, not learned: non-persistent (small, so TorchScript storing them costs ~26 kB)
        self.register_buffer("wz", w, persistent=False)
        self.register_buffer("wy", w.clone(), persistent=False)
        self.register_buffer("wx", w.clone(), persistent=False)
        self.register_buffer("centre", grid_centre(grid), persistent=False)

    def set_precision(self, precision: str) -> Cascade:
        """Run both networks' layers in `precision` ('fp32', 'bf16'); the geometry stays fp32."""
        self.rigid.precision = self.bspline.precision = precision
        return self

    def rigid_stage(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """(N, 3, 4) voxel-space rigid matrix, x_moving = A x + b."""
        return rigid_matrix(self.rigid(torch.cat([fixed, moving], 1)), self.centre)

    def dense_field(self, fixed: torch.Tensor, rigid_warped: torch.Tensor) -> torch.Tensor:
        coeffs = self.bspline(torch.cat([fixed, rigid_warped], 1))
        return upsample_control_points(coeffs, self.wz, self.wy, self.wx)

    def compose(self, matrix: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """disp of phi(x) = R(x + u(x)), i.e. phi(x) - x, in voxels (i, j, k)."""
        return compose_affine(matrix, u)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor):
        """fixed MR and moving US, (N, 1, 128, 128, 128) in [0, 1] ->
        (warped US, composed disp_ijk (N, 3, 128^3), rigid matrix (N, 3, 4), B-spline disp_ijk)."""
        matrix = self.rigid_stage(fixed, moving)
        rigid_warped = warp(moving, affine_displacement(matrix, list(moving.shape[2:])))
        u = self.dense_field(fixed, rigid_warped)
        disp = self.compose(matrix, u)
        return warp(moving, disp), disp, matrix, u
