"""MIND is modality independent, the label term rewards overlap, the regulariser smoothness."""

import numpy as np
import torch

from conftest import smooth_image
from MRUSFusionLib import losses


def _image(seed=0, n=32):
    """Smooth structures plus a little noise, as in any real image."""
    noise = torch.from_numpy(np.random.default_rng(seed).normal(0, 0.01, (n, n, n)).astype(np.float32))
    return (torch.from_numpy(smooth_image((n, n, n), seed)) + noise)[None, None]


def test_mind_ignores_a_monotone_change_of_intensities():
    a = _image()
    assert float(losses.mind_loss(a, 3.0 * a + 0.5)) < 1e-4
    assert float(losses.mind_loss(a, torch.sqrt(a + 0.1))) < 0.05


def test_mind_grows_with_misalignment():
    a = _image()
    shifted = [torch.roll(a, s, dims=4) for s in (1, 2, 4)]
    values = [float(losses.mind_loss(a, b)) for b in shifted]
    assert values == sorted(values) and values[0] > 1e-3


def test_mind_loss_respects_the_mask():
    a = _image()
    b = a.clone()
    b[..., :16] = 0.0  # as the warped US outside its field of view
    mask = torch.zeros_like(a)
    mask[..., 20:] = 1
    assert float(losses.mind_loss(a, b, mask)) < 1e-4 < float(losses.mind_loss(a, b))


def test_label_term_is_zero_when_aligned_and_larger_when_shifted():
    label = (_image(1) > 0.6).float()
    assert float(losses.label_loss(label, label)) < 1e-5
    near = float(losses.label_loss(label, torch.roll(label, 1, dims=3)))
    far = float(losses.label_loss(label, torch.roll(label, 5, dims=3)))
    assert 0 < near < far


def test_blurred_labels_still_see_a_misaligned_thin_vessel():
    vessel = torch.zeros(1, 1, 24, 24, 24)
    vessel[..., 12, 12, :] = 1  # a thin line
    moved = torch.roll(vessel, 3, dims=3)
    assert float(losses.label_loss(vessel, moved)) > 0.99  # no overlap: flat, no gradient
    blurred = float(losses.label_loss(losses.blur_label(vessel), losses.blur_label(moved)))
    assert blurred < 0.9


def test_smoothness_is_zero_for_a_translation_and_positive_for_a_wavy_field():
    constant = torch.ones(1, 3, 8, 8, 8) * 2.5
    assert float(losses.smoothness(constant)) == 0.0
    wavy = torch.sin(torch.arange(8.0)).view(1, 1, 1, 1, 8).expand(1, 3, 8, 8, 8)
    assert float(losses.smoothness(wavy)) > 0.1


def test_the_hybrid_loss_has_gradients():
    a, b = _image(0), _image(1).requires_grad_(True)
    loss = 100 * losses.mind_loss(a, b) + 0.01 * losses.label_loss(a, b)
    loss.backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
