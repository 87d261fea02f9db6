"""The separable cubic B-spline upsampling is the B-spline interpolation it claims to be."""

import torch
import torch.nn.functional as F

from MRUSFusionLib.bspline import bspline_matrix, cubic_bspline, upsample_control_points


def test_kernel_is_a_partition_of_unity_and_exact_at_knots():
    t = torch.linspace(-0.5, 0.5, 11, dtype=torch.float64)
    total = sum(cubic_bspline(t + k) for k in range(-3, 4))
    torch.testing.assert_close(total, torch.ones_like(t))
    assert abs(float(cubic_bspline(torch.tensor(0.0))) - 2 / 3) < 1e-7
    assert float(cubic_bspline(torch.tensor(2.0))) == 0.0


def test_seventeen_points_nine_apart_cover_the_128_grid():
    w = bspline_matrix(128, 17, 9)
    assert w.shape == (128, 17)
    # every voxel is (up to ~4e-5 at the two border voxels) a convex combination of control points
    torch.testing.assert_close(w.sum(1), torch.ones(128), atol=1e-4, rtol=0)
    # the first and last control points lie outside the image but still act on it
    assert w[:, 0].max() > 0.1 and w[:, -1].max() > 0.1


def test_linear_control_values_give_an_exactly_linear_field():
    w = bspline_matrix(128, 17, 9).double()
    p = 63.5 + 9 * (torch.arange(17, dtype=torch.float64) - 8)
    field = w @ (0.25 * p - 3.0)
    x = torch.arange(128, dtype=torch.float64)
    torch.testing.assert_close(field[2:-2], (0.25 * x - 3.0)[2:-2], atol=1e-3, rtol=0)


def test_separable_upsampling_equals_the_full_tensor_product():
    torch.manual_seed(0)
    coeffs = torch.randn(2, 3, 5, 6, 7)
    wz, wy, wx = bspline_matrix(20, 5, 5), bspline_matrix(22, 6, 4), bspline_matrix(24, 7, 4)
    expected = torch.einsum("za,yb,xd,nqabd->nqzyx", wz, wy, wx, coeffs)
    torch.testing.assert_close(upsample_control_points(coeffs, wz, wy, wx), expected, atol=1e-5, rtol=1e-5)


def test_matches_transposed_convolution_formulation():
    """AirLab-style: control points as a strided transposed convolution with the B-spline kernel."""
    torch.manual_seed(1)
    spacing, points, size = 4, 6, 21
    coeffs = torch.randn(1, 1, points, points, points, dtype=torch.float64)
    taps = torch.arange(-2 * spacing + 1, 2 * spacing, dtype=torch.float64)
    k1 = cubic_bspline(taps / spacing)
    kernel = (k1[:, None, None] * k1[None, :, None] * k1[None, None, :])[None, None]
    dense = F.conv_transpose3d(coeffs, kernel, stride=spacing)  # control m sits at m*spacing + 2*spacing-1
    first = (size - 1) / 2 - spacing * (points - 1) / 2  # where our control point 0 lies
    offset = int(round(2 * spacing - 1 - first))
    expected = dense[..., offset:offset + size, offset:offset + size, offset:offset + size]
    w = bspline_matrix(size, points, spacing).double()
    ours = upsample_control_points(coeffs, w, w, w)
    assert abs(first - round(first)) < 1e-9
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)  # float32 weights
