"""The evaluation's numbers mean what they say: an identity network leaves every landmark where the
coarse alignment put it, and the summary has the keys scripts rely on."""

from pathlib import Path

import numpy as np
import pytest
import torch

from deepnav.progress import silent
from MRUSFusionLib.evaluation import case_seeds, evaluate
from MRUSFusionLib.model_io import LoadedModel
from MRUSFusionLib.networks import Cascade


def test_identity_network_scores_its_initial_error():
    identity = LoadedModel(Cascade().eval(), {}, torch.device("cpu"), Path("identity"))
    report = evaluate(identity, cases=1, seed=0, frames=1, baseline=False, latency_repeats=1, progress=silent)
    s = report["summary"]
    for key in ("tre_initial_mm", "tre_rigid_mm", "tre_final_mm"):
        assert {"median", "p90"} <= set(s[key])
    assert s["tre_final_mm"]["median"] == pytest.approx(s["tre_initial_mm"]["median"], abs=1e-3)
    assert s["dice_vessels_final"] == pytest.approx(s["dice_vessels_initial"], abs=1e-6)
    assert s["folding_percent"] == 0.0 and s["latency_s"]["median"] > 0
    assert np.isfinite(s["tre_initial_mm"]["median"]) and report["cases"][0]["landmarks"] >= 3
    correction = report["cases"][0]["correction"]  # the correction stage ran, scored and kept its word
    assert correction["mind_ssc_after"] <= correction["mind_ssc_before"] and np.isfinite(s["tre_corrected_mm"]["median"])


def test_evaluation_patients_never_overlap_training_patients():
    from MRUSFusionLib.dataset import TRAINING_SEED_BASE

    assert max(case_seeds(100, TRAINING_SEED_BASE // 100 - 1)) < TRAINING_SEED_BASE
    with pytest.raises(ValueError):
        case_seeds(5, TRAINING_SEED_BASE // 100)


def test_training_validation_tre_equals_the_evaluation_tre(shipped_model):
    """Validation during training scores landmarks on the 1 mm grid with the network's own field;
    the evaluation maps them through the exported LPS transforms. Same model, same patient:
    the same errors."""
    from MRUSFusionLib.dataset import patient_samples
    from MRUSFusionLib.evaluation import landmark_errors
    from MRUSFusionLib.phantom import make_patient
    from MRUSFusionLib.preprocess import prepare_pair
    from MRUSFusionLib.registration import register_pair
    from MRUSFusionLib.training import validate

    seed = 5
    samples = patient_samples(seed, frames=2)
    scores = validate(shipped_model.eager(), samples, torch.device("cpu"))
    patient = make_patient(seed, frames=2)
    errors = {"initial": [], "rigid": [], "final": []}
    for frame in patient.frames:
        pair = prepare_pair(patient.mr, frame.image, liver=patient.liver)
        err = landmark_errors(register_pair(shipped_model, pair), patient, frame)
        for key in errors:
            errors[key].extend(err[key])
    assert sum(len(s.landmarks_ijk) for s in samples) == len(errors["final"]) >= 6
    assert scores["tre_initial_mm"] == pytest.approx(np.median(errors["initial"]), abs=0.05)
    assert scores["tre_rigid_mm"] == pytest.approx(np.median(errors["rigid"]), abs=0.05)
    assert scores["tre_mm"] == pytest.approx(np.median(errors["final"]), abs=0.05)
    assert abs(scores["tre_mm"] - scores["tre_rigid_mm"]) > 0.05  # the two stages are told apart
