"""`deepnav liver evaluate`'s code on a simulated two-phase study never used in training (an
evaluation seed, synthetic abdomen, whole field of view): the report has the issue's keys; and the
shipped model finds and delineates the lesions, segments the liver without calling other organs
liver, and says what it was trained on."""

from __future__ import annotations

import json

import torch
from LiverLesionSegLib.abdomen import synthetic_abdomen
from LiverLesionSegLib.evaluation import evaluate, write_report
from LiverLesionSegLib.model_io import SHIPPED_LOCALISER, SHIPPED_MODEL, load_model, save_model
from LiverLesionSegLib.network import LesionUNet
from LiverLesionSegLib.preprocess import Normalisation

from deepnav.progress import silent

LESION_KEYS = {"lesion_dice_per_case", "lesion_dice_global", "lesion_recall", "lesion_precision"}


def test_evaluation_report_has_the_issues_keys(tmp_path):
    phases = ("plain", "arterial", "venous", "delayed")
    norm = Normalisation({p: -100.0 for p in phases}, {p: 300.0 for p in phases}, {p: 80.0 for p in phases},
                         {p: 50.0 for p in phases})
    background = LesionUNet(width=2)  # answers "background" everywhere: no lesion found is a valid answer
    torch.nn.init.zeros_(background.head.weight)
    background.head.bias.data = torch.tensor([1.0, 0.0, 0.0])
    model = load_model(save_model(background, norm, tmp_path / "background.pt"), "cpu")
    report = evaluate(model, synthetic_abdomen, cases=1, seed=998, progress=silent)
    summary, case = report["summary"], report["cases"][0]
    assert LESION_KEYS | {"liver_dice", "registration_error_mm", "runtime_s", "single_phase"} <= set(summary)
    assert LESION_KEYS <= set(summary["single_phase"])
    assert summary["lesion_dice_per_case"] == case["lesion_dice"] == 0.0  # one case: its own median
    assert case["lesions_predicted"] == 0 and summary["lesion_precision"] == 1.0 and case["lesions_true"] > 0
    assert case["registration_error_mm"] < 1.5  # the venous phase's known motion found (below the working voxel)
    write_report(report, tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["summary"] == summary


def test_shipped_model_says_it_was_trained_on_simulated_lesions():
    record = load_model(SHIPPED_MODEL, "cpu").record
    assert "simulated" in record["training"]["data_description"]
    assert set(record["normalisation"]["mean"]) == {"plain", "arterial", "venous", "delayed"}


def test_shipped_model_finds_and_delineates_the_lesions():
    report = evaluate(load_model(SHIPPED_MODEL, "cpu"), synthetic_abdomen, cases=1, seed=998, progress=silent)
    case = report["cases"][0]
    assert case["lesions_found"] == case["lesions_true"] > 0
    assert case["lesion_dice"] > 0.8  # the issue's target
    assert case["liver_dice"] > 0.9  # the whole field of view: no liver called elsewhere in the body


def test_shipped_model_on_a_whole_abdomen_works_within_the_livers_slab():
    """A series taller than the lesion network's 90 mm training slabs: the shipped localiser
    finds the liver's slab first, so nothing below the liver is called liver, and the lesions
    are found as on a short series."""
    from LiverLesionSegLib.evaluation import score_case
    from LiverLesionSegLib.pipeline import LOCALISE_ABOVE_MM, segment_study
    from LiverLesionSegLib.simulator import simulate_case

    seed = 998
    case = simulate_case(synthetic_abdomen(seed, below_mm=120.0), seed, phases=("arterial", "venous"), field="ct")
    reference = case.phases["arterial"]
    assert reference.array.shape[0] * reference.spacing[2] > LOCALISE_ABOVE_MM + 70
    model = load_model(None, "cpu")  # the shipped model comes with the shipped localiser
    assert model.localiser is not None and model.localiser.path == SHIPPED_LOCALISER
    result = segment_study(model, case.phases)
    assert "localiser" in result.timings_s
    scores = score_case(case, result.lesions.array, result.liver.array)
    first, stop, of = result.slab
    assert stop - first < 0.75 * of  # the abdomen below the liver was cut away...
    assert scores["liver_dice"] > 0.9  # ...but not the liver
    assert scores["lesion_dice"] > 0.8 and scores["lesions_correct"] == scores["lesions_predicted"] > 0
    assert result.plausibility.reliable, result.plausibility.reasons  # a good result is not flagged


def test_a_users_model_runs_with_the_localiser_given_on_the_command_line_and_refuses_a_wrong_one(tmp_path):
    import argparse

    import pytest
    from FetalBiometryLib.segment import SHIPPED_MODEL as FETAL_MODEL
    from LiverLesionSegLib import cli

    from deepnav.errors import InputError

    parser = argparse.ArgumentParser()
    cli.add_commands(parser)

    def load(*extra):
        return cli._load(parser.parse_args(["segment", "--phase", "venous=v.nii.gz", "--model", str(SHIPPED_MODEL),
                                            "--device", "cpu", "--out", str(tmp_path), *extra]))

    assert load().localiser is None  # a user's own model alone: no localiser unless asked for
    assert load("--localiser", str(SHIPPED_LOCALISER)).localiser.path == SHIPPED_LOCALISER
    with pytest.raises(InputError, match="liver lesion segmentation"):
        load("--localiser", str(FETAL_MODEL))
