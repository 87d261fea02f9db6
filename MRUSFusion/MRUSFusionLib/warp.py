"""The spatial transformer and rigid transforms on the fusion grid, in voxel units.

Conventions of every tensor here (the fusion grid is 1 mm isotropic, so voxels are mm):
- images are (N, C, D, H, W) = (N, C, k, j, i);
- positions are (N, 3, D, H, W) voxel coordinates, channels (i, j, k);
- displacement fields are `disp_ijk`: (N, 3, D, H, W) with channels (di, dj, dk) in voxels,
  in the resampling convention: the warped image at voxel x is moving(x + u(x));
- a rigid transform is a (N, 3, 4) matrix [A | b] acting on voxel positions (i, j, k):
  x_moving = A x + b.
`fields.py` converts these to physical LPS mm for SimpleITK and Slicer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_grid_ijk(size: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
    """(1, 3, D, H, W) voxel positions, channels (i, j, k)."""
    return add_identity(torch.zeros((1, 3) + tuple(size), device=device))


def add_identity(disp_ijk: torch.Tensor) -> torch.Tensor:
    """Positions x + u(x) from a displacement field. The identity is broadcast from three small
    ranges rather than stored: a stored 128^3 grid would add 25 MB to every TorchScript file
    (TorchScript serialises even non-persistent buffers)."""
    d, h, w = disp_ijk.shape[2:]
    i = torch.arange(w, dtype=disp_ijk.dtype, device=disp_ijk.device).view(1, 1, w)
    j = torch.arange(h, dtype=disp_ijk.dtype, device=disp_ijk.device).view(1, h, 1)
    k = torch.arange(d, dtype=disp_ijk.dtype, device=disp_ijk.device).view(d, 1, 1)
    return torch.stack([disp_ijk[:, 0] + i, disp_ijk[:, 1] + j, disp_ijk[:, 2] + k], 1)


def warp(image: torch.Tensor, disp_ijk: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """image(x + u(x)) by trilinear interpolation, zero outside (grid_sample, align_corners)."""
    d, h, w = image.shape[2:]
    pos = add_identity(disp_ijk)  # (N, 3, D, H, W) voxel positions (i, j, k)
    scale = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1), 2.0 / (d - 1)], device=image.device).view(1, 3, 1, 1, 1)
    grid = (pos * scale - 1.0).permute(0, 2, 3, 4, 1)  # (N, D, H, W, 3) as (x, y, z) = (i, j, k)
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=True)


def map_points(disp_ijk: torch.Tensor, points_ijk: torch.Tensor) -> torch.Tensor:
    """Where points (P, 3) of voxel positions (i, j, k) go under x -> x + u(x), the field of the
    first batch item interpolated trilinearly: (P, 3)."""
    d, h, w = disp_ijk.shape[2:]
    scale = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1), 2.0 / (d - 1)], device=disp_ijk.device)
    grid = (points_ijk.to(disp_ijk) * scale - 1.0).view(1, 1, 1, -1, 3)
    u = F.grid_sample(disp_ijk[:1], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return points_ijk.to(disp_ijk) + u.view(3, -1).T


def euler_matrix(angles: torch.Tensor) -> torch.Tensor:
    """(N, 3) rotations about i, j, k (radians) -> (N, 3, 3) R = Rk @ Rj @ Ri."""
    cx, cy, cz = torch.cos(angles).unbind(1)
    sx, sy, sz = torch.sin(angles).unbind(1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def grid_centre(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(3,) voxel position (i, j, k) of the centre of a cubic grid of `size` voxels: what rigid
    rotations turn about, for the network and for the training augmentation alike."""
    return torch.full((3,), (size - 1) / 2.0, device=device)


def rigid_matrix(params: torch.Tensor, centre_ijk: torch.Tensor) -> torch.Tensor:
    """(N, 6) = (ti, tj, tk in voxels, ai, aj, ak in radians), rotation about the grid centre:
    x_moving = R (x - c) + c + t. Returns (N, 3, 4)."""
    rot = euler_matrix(params[:, 3:])
    shift = params[:, :3] + centre_ijk[None] - (rot @ centre_ijk[None, :, None])[..., 0]
    return torch.cat([rot, shift[..., None]], dim=2)


def apply_affine_to_positions(matrix: torch.Tensor, pos_ijk: torch.Tensor) -> torch.Tensor:
    """(N, 3, 4) applied to positions (N, 3, D, H, W) -> (N, 3, D, H, W)."""
    n = pos_ijk.shape[0]
    flat = pos_ijk.reshape(n, 3, -1)
    out = matrix[:, :, :3] @ flat + matrix[:, :, 3:]
    return out.reshape(pos_ijk.shape)


def compose_matrices(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """(N, 3, 4) matrices: x -> outer(inner(x))."""
    return torch.cat([outer[:, :, :3] @ inner[:, :, :3], outer[:, :, :3] @ inner[:, :, 3:] + outer[:, :, 3:]], dim=2)


def compose_affine(matrix: torch.Tensor, disp_ijk: torch.Tensor) -> torch.Tensor:
    """The displacement of x -> A(x + u(x)) + b, i.e. A(x + u) + b - x, in voxels (i, j, k)."""
    pos = add_identity(disp_ijk)
    return apply_affine_to_positions(matrix, pos) - (pos - disp_ijk)


def affine_displacement(matrix: torch.Tensor, size: list[int]) -> torch.Tensor:
    """The displacement A x + b - x of an affine map on a grid of `size` (D, H, W)."""
    zero = torch.zeros([matrix.shape[0], 3] + size, dtype=matrix.dtype, device=matrix.device)
    pos = add_identity(zero)
    return apply_affine_to_positions(matrix, pos) - pos


def jacobian_determinant(disp_ijk: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) by central differences on the interior, (N, D-2, H-2, W-2)."""
    u = disp_ijk
    di = (u[:, :, 1:-1, 1:-1, 2:] - u[:, :, 1:-1, 1:-1, :-2]) / 2
    dj = (u[:, :, 1:-1, 2:, 1:-1] - u[:, :, 1:-1, :-2, 1:-1]) / 2
    dk = (u[:, :, 2:, 1:-1, 1:-1] - u[:, :, :-2, 1:-1, 1:-1]) / 2
    # J[a, b] = delta_ab + d u_a / d x_b, columns b = i, j, k
    j00, j10, j20 = 1 + di[:, 0], di[:, 1], di[:, 2]
    j01, j11, j21 = dj[:, 0], 1 + dj[:, 1], dj[:, 2]
    j02, j12, j22 = dk[:, 0], dk[:, 1], 1 + dk[:, 2]
    return j00 * (j11 * j22 - j12 * j21) - j01 * (j10 * j22 - j12 * j20) + j02 * (j10 * j21 - j11 * j20)
