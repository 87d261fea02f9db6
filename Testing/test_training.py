"""Training learns, checkpoints resume to the same result, and cancel stops it."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from deepnav.errors import InputError
from deepnav.progress import Cancelled, CancelToken, silent
from MRUSFusionLib import losses
from MRUSFusionLib.preprocess import prepare_pair
from MRUSFusionLib.training import Sample, TrainConfig, checkpoint_config, make_batch, rigid_step, train


@pytest.fixture(scope="module")
def samples(patient):
    return [Sample.from_pair(prepare_pair(patient.mr, f.image, liver=patient.liver,
                                          mr_vessels=patient.vessels, us_vessels=f.vessels))
            for f in patient.frames]


def _tiny(**kw):
    base = dict(rigid_epochs=1, bspline_epochs=1, steps_per_epoch=2, augment_shift=0.0,
                augment_rotation_deg=0.0, seed=3)
    return TrainConfig(**{**base, **kw})


def test_samples_keep_the_pair_to_within_half_an_8_bit_step(patient):
    f = patient.frames[0]
    pair = prepare_pair(patient.mr, f.image, liver=patient.liver, mr_vessels=patient.vessels, us_vessels=f.vessels)
    sample = Sample.from_pair(pair)
    arrays = (pair.fixed, pair.moving, pair.fov, pair.fixed_label, pair.moving_label)
    for stored, tensor, array in zip((sample.fixed, sample.moving, sample.fov, sample.fixed_label, sample.moving_label),
                                     sample.tensors("cpu"), arrays, strict=True):
        assert stored.element_size() == 1
        assert float((tensor[0, 0] - torch.from_numpy(array)).abs().max()) <= 0.5 / 255 + 1e-6
    blurred = sample.blurred_labels(2.0)[1]
    exact = losses.blur_label(torch.from_numpy(pair.moving_label)[None, None], 2.0)
    assert float((blurred.float() / 255 - exact).abs().max()) <= 1.0 / 255


def test_rigid_stage_reduces_the_vessel_label_loss(samples, tmp_path):
    config = _tiny(rigid_epochs=1, bspline_epochs=0, steps_per_epoch=12, lr_rigid=1e-3)
    from MRUSFusionLib.networks import Cascade

    batch = make_batch(samples[1], config, "cpu")
    with torch.no_grad():
        before = float(rigid_step(Cascade(), batch, config)[0])
    model, _ = train(samples[1:], samples[1:], tmp_path, config, progress=silent)
    with torch.no_grad():
        after = float(rigid_step(model, batch, config)[0])
    assert after < before - 0.02


@pytest.mark.parametrize("weight_average", [0.0, 0.5])
def test_resumed_training_equals_uninterrupted_training(samples, tmp_path, weight_average):
    config = _tiny(weight_average=weight_average)
    straight, info = train(samples[:1], samples[1:], tmp_path / "a", config, progress=silent)
    # stop after the rigid epoch, then resume for the B-spline epoch
    train(samples[:1], samples[1:], tmp_path / "b", _tiny(bspline_epochs=0, weight_average=weight_average),
          progress=silent)
    extended = checkpoint_config(tmp_path / "b")
    extended.bspline_epochs = 1  # the user asks for more epochs on resume
    assert extended == config
    resumed, info_b = train(samples[:1], samples[1:], tmp_path / "b", extended, resume=True, progress=silent)
    assert [h["epoch"] for h in info_b["history"]] == [0, 1]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert len(history["history"]) == 2
    assert {"val_vessel_dice", "val_label_ncc", "val_mind"} <= set(history["history"][-1])
    assert np.isfinite(info["best"]["vessel_dice"])


def test_weight_average_moves_towards_the_trained_weights_and_is_what_training_keeps(samples, tmp_path):
    from MRUSFusionLib.networks import Cascade
    from MRUSFusionLib.training import WeightAverage

    model = Cascade()
    average = WeightAverage(model, 0.75)
    before = [p.detach().clone() for p in average.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)
    for a, b, p in zip(average.model.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(a, 0.75 * b + 0.25 * p)
    # a rigid-only run keeps the average (best.pt), not the raw weights it trained (checkpoint.pt)
    config = _tiny(bspline_epochs=0, steps_per_epoch=3, lr_rigid=1e-3, weight_average=0.5)
    kept, _ = train(samples[:1], samples[1:], tmp_path, config, progress=silent)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    raw, average_bias = checkpoint["model"]["rigid.fc.bias"], checkpoint["average"]["rigid.fc.bias"]
    torch.testing.assert_close(kept.state_dict()["rigid.fc.bias"], average_bias)
    assert float((raw - average_bias).abs().max()) > 1e-6


def test_weight_average_is_the_exponential_moving_average_exactly():
    """torch's AveragedModel (get_ema_multi_avg_fn) gives the very weights of the moving average
    written out with the public lerp, from the first update on (its first update_parameters would
    otherwise copy the model instead of averaging)."""
    from MRUSFusionLib.networks import Cascade
    from MRUSFusionLib.training import WeightAverage

    torch.manual_seed(0)
    model = Cascade()
    average = WeightAverage(model, 0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(model)
        expected = [torch.lerp(e, p.detach(), 0.1) for e, p in zip(expected, model.parameters(), strict=True)]
    for got, want in zip(average.model.parameters(), expected, strict=True):
        assert torch.equal(got, want)


def test_a_run_resumed_with_weight_averaging_newly_asked_for_starts_it_at_the_resumed_weights(samples, tmp_path):
    train(samples[:1], samples[1:], tmp_path, _tiny(bspline_epochs=0), progress=silent)
    resumed = checkpoint_config(tmp_path)
    resumed.weight_average, resumed.bspline_epochs = 0.5, 1
    model, info = train(samples[:1], samples[1:], tmp_path, resumed, resume=True, progress=silent)
    assert [h["epoch"] for h in info["history"]] == [0, 1]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["average"] is not None


def test_cancel_stops_training_between_steps(samples, tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        train(samples[:1], samples[1:], tmp_path, _tiny(), cancel=token, progress=silent)


def test_loss_weights_default_to_the_measured_better_reading():
    w = losses.LossWeights()  # reading B, the one the shipped model used (MODEL_CARD.md)
    assert (w.label, w.mind, w.smooth) == (100.0, 0.01, 1.0)


def test_training_from_volumes_in_the_background_saves_a_loadable_model(patient, tmp_path):
    """The Slicer module's path: volumes in memory, a split of the recorded frames, training on
    a thread watched through progress, a model file the loader takes."""
    from deepnav.progress import BackgroundTask
    from MRUSFusionLib.dataset import volume_samples
    from MRUSFusionLib.model_io import load_model
    from MRUSFusionLib.training import split_frames, train_and_save

    frames = [(f.image, f.vessels) for f in patient.frames] * 2  # four recorded frames
    samples = volume_samples(patient.mr, patient.vessels, frames, patient.liver)
    train_samples, val_samples, val_idx = split_frames(samples, 1)
    assert len(train_samples) == 3 and val_idx == [2]
    task = BackgroundTask(lambda progress, cancel: train_and_save(
        train_samples, val_samples, tmp_path, _tiny(steps_per_epoch=3), source={"kind": "slicer"},
        progress=progress, cancel=cancel))
    path, info = task.result(timeout=300)
    assert task.fraction == 1.0 and "val vessel Dice" in task.message
    loaded = load_model(path, "cpu")
    assert loaded.metadata["training"]["kind"] == "slicer" and len(info["history"]) == 2
    with pytest.raises(InputError, match="need more than"):
        split_frames(samples[:1], 1)


def test_losses_resample_the_us_once_through_augmentation_then_prediction(samples):
    """The network sees the augmented US; the label term resamples the original US label
    through augmentation o prediction. That must equal warping the augmented label by the
    prediction (what the order of composition means), up to interpolation."""
    from MRUSFusionLib.warp import affine_displacement, compose_matrices, rigid_matrix, warp

    config = _tiny(augment_shift=3.0, augment_rotation_deg=4.0)
    batch = make_batch(samples[0], config, "cpu", np.random.default_rng(5))
    assert not torch.allclose(batch.augmentation[0, :, :3], torch.eye(3))
    label = batch.us[:, 2:]
    prediction = rigid_matrix(torch.tensor([[6.0, -4.0, 5.0, 0.2, -0.15, 0.25]]), torch.full((3,), 63.5))
    once = warp(label, affine_displacement(compose_matrices(batch.augmentation, prediction), batch.size))
    twice = warp(warp(label, affine_displacement(batch.augmentation, batch.size)),
                 affine_displacement(prediction, batch.size))
    inner = (slice(None), slice(None)) + (slice(16, -16),) * 3  # away from the zero-padded border
    error = (once - twice)[inner].abs()
    reverse = warp(label, affine_displacement(compose_matrices(prediction, batch.augmentation), batch.size))
    assert float(error.max()) < 0.1 * float(label.max())  # measured 0.07: two interpolations vs one
    # and the other order would be wrong by far more than the interpolation
    assert float((reverse - twice)[inner].abs().mean()) > 5 * float(error.mean())  # measured 10x


def test_landmark_term_is_the_mean_distance_through_the_field(samples):
    """Landmarks whose true US position is x + t: the grid-to-US field 'shift by t' scores 0 mm;
    the identity scores |t| on every landmark."""
    import dataclasses

    from MRUSFusionLib.training import landmark_error
    from MRUSFusionLib.warp import affine_displacement

    x = torch.tensor([[40.0, 50.0, 60.0], [80.0, 70.0, 55.0], [64.0, 90.0, 30.0]])
    t = torch.tensor([2.0, -1.0, 3.0])
    batch = make_batch(dataclasses.replace(samples[0], landmarks_ijk=torch.stack([x, x + t], 1)), _tiny(), "cpu")
    shift = torch.cat([torch.eye(3), t[:, None]], 1)[None]
    identity = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)[None]
    assert float(landmark_error(batch, affine_displacement(shift, batch.size))) < 1e-4
    assert float(landmark_error(batch, affine_displacement(identity, batch.size))) == pytest.approx(
        float(torch.linalg.norm(t)), rel=1e-6)


def test_landmark_weights_add_the_known_truth_term_to_each_stage_through_the_augmentation(samples):
    """Both stages score the landmarks through augmentation o prediction, as the label term
    resamples the US: an untrained network (the identity) leaves exactly the augmentation's
    displacement of the landmarks against their truth."""
    import dataclasses

    from MRUSFusionLib.networks import Cascade
    from MRUSFusionLib.training import bspline_step

    config = _tiny(augment_shift=4.0, augment_rotation_deg=5.0)
    batch = make_batch(samples[0], config, "cpu", np.random.default_rng(2))
    assert batch.landmarks is None  # (this sample carries none: the term is skipped)
    with_term = dataclasses.replace(config, landmark_weight_rigid=0.5, landmark_weight_bspline=2.0)
    assert rigid_step(Cascade(), batch, with_term)[1].keys() == {"label"}
    x = torch.tensor([[40.0, 50.0, 60.0], [80.0, 70.0, 55.0]])
    sample = dataclasses.replace(samples[0], landmarks_ijk=torch.stack([x, x + 3.0], 1))
    batch = make_batch(sample, config, "cpu", np.random.default_rng(2))
    a = batch.augmentation[0]
    expected = float(torch.linalg.norm(x @ a[:, :3].T + a[:, 3] - (x + 3.0), dim=1).mean())
    model = Cascade()
    with torch.no_grad():
        plain, terms = rigid_step(model, batch, config)
        weighted, weighted_terms = rigid_step(model, batch, with_term)
        _, b_terms = bspline_step(model, batch, with_term, np.random.default_rng(0))
    assert "landmarks" not in terms
    assert weighted_terms["landmarks"] == pytest.approx(expected, rel=1e-4)
    assert float(weighted) == pytest.approx(float(plain) + 0.5 * expected, rel=1e-4)
    assert b_terms["landmarks"] == pytest.approx(expected, rel=1e-4)
    assert abs(expected - 3 * 3 ** 0.5) > 0.5  # the augmentation matters here


def test_learning_rate_decays_over_each_stage_from_its_own_rate():
    from MRUSFusionLib.training import stage_lr

    config = _tiny(rigid_epochs=2, bspline_epochs=3, steps_per_epoch=4, lr_rigid=2e-4, lr_bspline=1e-3)
    rigid = [stage_lr(config, "rigid", e, s) for e in range(2) for s in range(4)]
    bspline = [stage_lr(config, "bspline", e, s) for e in range(2, 5) for s in range(4)]
    for rates, base in ((rigid, 2e-4), (bspline, 1e-3)):
        assert rates[0] == pytest.approx(base)
        assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
        assert 0.05 * base < rates[-1] < 0.1 * base
    config.lr_decay = False
    assert stage_lr(config, "bspline", 4, 3) == 1e-3


def test_synthetic_validation_includes_the_end_expiration_frame():
    from MRUSFusionLib.dataset import validation_frames

    assert validation_frames(8) == [0, 4, 7]
    assert validation_frames(3) == [0, 1, 2]
    assert validation_frames(1) == [0]


def test_synthetic_patients_are_generated_in_worker_processes_with_progress_and_known_landmarks():
    from MRUSFusionLib.dataset import TRAINING_SEED_BASE, patient_samples, synthetic_samples

    reports = []
    seeds = [TRAINING_SEED_BASE + 990, TRAINING_SEED_BASE + 991]
    descriptors = len(os.listdir("/proc/self/fd"))
    pools = synthetic_samples(seeds, frames=1, progress=lambda f, m: reports.append(f))
    # the samples came back by value, not as shared memory behind one file descriptor per tensor
    assert len(os.listdir("/proc/self/fd")) < descriptors + 4
    assert reports == [0.5, 1.0]
    assert [len(p) for p in pools] == [1, 1]
    again = patient_samples(seeds[1], frames=1)[0]  # the same patient in this process: bit for bit
    assert torch.equal(pools[1][0].moving, again.moving) and torch.equal(pools[1][0].landmarks_ijk, again.landmarks_ijk)
    assert len(again.landmarks_ijk) > 0


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting to be reaped counts: it runs no more)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def test_generation_workers_exit_when_their_parent_is_killed():
    """`fusion train` killed while it generates patients must not leave its workers behind
    (they used to wait forever on the task queue, torch loaded)."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import multiprocessing, threading, time\n"
        "from MRUSFusionLib.dataset import TRAINING_SEED_BASE, synthetic_samples\n"
        "seeds = [TRAINING_SEED_BASE + 980 + i for i in range(8)]\n"
        "threading.Thread(target=synthetic_samples, args=(seeds, 1), daemon=True).start()\n"
        "while len(multiprocessing.active_children()) < 2: time.sleep(0.1)\n"
        "time.sleep(3)\n"
        "print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "MRUSFusion"), str(ROOT)])}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and not any(_gone(pid) for pid in workers)  # at work before the kill
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(pid) for pid in workers)
