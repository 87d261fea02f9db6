"""Training the lesion network: the loss leaves out voxels whose truth is unknown, small lesions
are sampled as often as large ones, the learning rate follows the polynomial schedule, and an
interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted one
(determinism and resumability together)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from LiverLesionSegLib.abdomen import synthetic_abdomen
from LiverLesionSegLib.dataset import IGNORE, TrainingCase, case_label
from LiverLesionSegLib.simulator import simulate_case
from LiverLesionSegLib.training import MaskedDiceFocalLoss, TrainConfig, _drop_phases, _lesion_voxels, _patch, train
from monai.losses import DiceFocalLoss

from deepnav.progress import Cancelled, CancelToken


def test_loss_is_the_methods_focal_plus_dice_and_ignores_unknown_voxels():
    config = TrainConfig()
    loss = MaskedDiceFocalLoss(config)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 12, 12, 12, generator=generator, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 12, 12, 12), generator=generator).float()
    monai_loss = DiceFocalLoss(include_background=False, to_onehot_y=True, softmax=True, gamma=config.gamma,
                               weight=[1.0, config.lesion_class_weight], batch=True)
    with torch.no_grad():
        assert float(loss(logits, target)) == pytest.approx(float(monai_loss(logits, target)), rel=1e-5)
    ignored = target.clone()
    ignored[:, :, :6] = IGNORE
    value = loss(logits, ignored)
    value.backward()
    value = value.detach()
    assert torch.all(logits.grad[:, :, :6] == 0) and torch.any(logits.grad[:, :, 6:] != 0)
    changed = logits.detach().clone()
    changed[:, :, :6] = 10 * torch.randn(2, 3, 6, 12, 12, generator=generator)
    assert float(loss(changed, ignored)) == pytest.approx(float(value), rel=1e-6)
    # and the rest still counts: the same as the loss on the known half alone
    with torch.no_grad():
        assert float(value) == pytest.approx(float(loss(logits[:, :, 6:], target[:, :, 6:])), rel=1e-5)


def test_lesion_patches_see_small_lesions_as_often_as_large_ones():
    label = np.zeros((40, 80, 80), np.uint8)
    label[5:35, 5:35, 5:35] = 2  # 27000 voxels
    label[20:22, 60:62, 60:62] = 2  # 8 voxels
    image = np.zeros((1, *label.shape), np.float32)
    lesions = _lesion_voxels(label)
    assert sorted(len(v) for v in lesions) == [8, 27000]
    rng = np.random.default_rng(0)
    with_small = 0
    for _ in range(200):
        _, patch = _patch(image, label, lesions, np.array([], int), 16, rng, "lesion")
        assert patch.shape == (16, 16, 16) and (patch == 2).any()  # every lesion patch holds a lesion
        with_small += bool((patch == 2).sum() < 100)
    assert 70 < with_small < 130  # about half; drawing voxels instead would give the small one 8 / 27008


def test_liver_patches_hold_liver_where_random_ones_rarely_do():
    label = np.zeros((60, 120, 120), np.uint8)
    label[40:50, 90:110, 90:110] = 1  # 1.7% of the field, as a liver in a whole abdomen is a few percent
    image = np.zeros((1, *label.shape), np.float32)
    liver = np.flatnonzero(label == 1)
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert (_patch(image, label, [], liver, 16, rng, "liver")[1] == 1).any()
    anywhere = sum(bool((_patch(image, label, [], liver, 16, rng, "any")[1] == 1).any()) for _ in range(200))
    assert anywhere < 100


def test_single_phase_patches_keep_one_present_phase_each_in_turn():
    """Phase dropout alone rarely leaves one phase (a single series, what users often have);
    `single_phase` gives that share of patches one of the present phases alone."""
    image = np.ones((4, 2, 2, 2), np.float32)
    present = [0, 2, 3]  # the arterial channel missing from this case
    rng = np.random.default_rng(0)
    kept = [tuple(np.flatnonzero(_drop_phases(image, present, rng, 0.3).any(axis=(1, 2, 3)))) for _ in range(400)]
    assert sum(len(k) == 1 for k in kept) < 0.3 * len(kept)  # dropout 0.3 of three phases: 22% single
    kept = [tuple(np.flatnonzero(_drop_phases(image, present, rng, 0.3, 1.0).any(axis=(1, 2, 3)))) for _ in range(300)]
    assert all(len(k) == 1 for k in kept) and {k[0] for k in kept} == set(present)


def _cases() -> list[TrainingCase]:
    cases = []
    for seed in (1, 2, 3):
        case = simulate_case(synthetic_abdomen(seed), seed, phases=("arterial", "venous"), spacing=(4.0, 4.0, 4.0),
                             motion=(0.0, 0.0), lesions=(2, 2))
        cases.append(TrainingCase(f"c{seed}", {p: v.array.astype(np.float32) for p, v in case.phases.items()},
                                  case_label(case)))
    return cases


def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path):
    cases = _cases()
    config = TrainConfig(epochs=3, steps_per_epoch=2, patch=32, width=4, lr=1e-3)
    straight, _, info = train(cases[:2], cases[2:], tmp_path / "straight", config, progress=lambda *_: None)
    lrs = [record["lr"] for record in info["history"]]
    np.testing.assert_allclose(lrs, [1e-3 * (1 - e / 3) ** 0.9 for e in range(3)])

    token = CancelToken()  # cancelled once the first epoch has reported: the second one stops at its start

    def cancel_after_first_epoch(fraction, _message):
        if fraction >= 1 / 3:
            token.cancel()

    try:
        train(cases[:2], cases[2:], tmp_path / "resumed", config, progress=cancel_after_first_epoch, cancel=token)
    except Cancelled:
        pass
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())["history"]
    assert len(history) == 1  # one epoch done and checkpointed before the cancel took effect
    resumed, _, info = train(cases[:2], cases[2:], tmp_path / "resumed", config, resume=True, progress=lambda *_: None)
    assert [r["epoch"] for r in info["history"]] == [0, 1, 2]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
