"""LiverLesionSeg from study to lesion table: normalisation, the MSD-layout dataset, lesion
statistics in physical units, DICOM input, and the whole pipeline's geometry (registration,
working grid, back to the reference grid) checked against the simulator's exact labels."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from LiverLesionSegLib.abdomen import synthetic_abdomen
from LiverLesionSegLib.dataset import IGNORE, read_case, read_manifest, write_simulated
from LiverLesionSegLib.evaluation import dice, score_case
from LiverLesionSegLib.model_io import load_model, save_model
from LiverLesionSegLib.network import LesionUNet
from LiverLesionSegLib.pipeline import read_phase, segment_study
from LiverLesionSegLib.preprocess import Normalisation
from LiverLesionSegLib.simulator import simulate_case
from LiverLesionSegLib.statistics import label_lesions, largest_component, lesion_statistics
from torch import nn

from conftest import oblique_volume
from deepnav.errors import InputError
from deepnav.imaging import Volume, grid_like


def test_normalisation_clips_and_z_scores_per_phase():
    rng = np.random.default_rng(0)
    venous = [rng.normal(110, 20, 5000)]
    norm = Normalisation.fit({"venous": venous, "arterial": [rng.normal(70, 10, 5000)]})
    out = norm.apply({"venous": np.array([[[110.0, 10_000.0]]])})
    assert out.shape == (4, 1, 1, 2) and np.all(out[[0, 1, 3]] == 0)  # missing phases are zeros
    assert abs(out[2, 0, 0, 0]) < 0.1 and out[2, 0, 0, 1] < 4  # the outlier is clipped first
    assert Normalisation.from_json(norm.to_json()) == norm
    with pytest.raises(InputError, match="not trained with a plain phase"):
        norm.apply({"plain": np.zeros((1, 1, 1))})


def sphere(grid: Volume, centre_ijk, radius_mm) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.array.shape), indexing="ij")
    offsets = (np.stack([i, j, k], -1) - np.asarray(centre_ijk)) * grid.spacing
    return np.linalg.norm(offsets, axis=-1) <= radius_mm


def test_lesion_statistics_in_physical_units():
    grid = grid_like((80, 70, 30), (0.7, 0.7, 2.5), (10.0, -20.0, 5.0), np.eye(3))
    big, small = sphere(grid, (30, 30, 15), 12.0), sphere(grid, (65, 55, 15), 5.0)
    speck = np.zeros(grid.array.shape, bool)
    speck[2, 2, 2] = True  # 1.2 mm3: dropped
    ids = label_lesions(big | small | speck, grid)
    assert ids.max() == 2 and np.all(ids[big] == 1) and np.all(ids[small] == 2)
    phases = {"venous": np.full(grid.array.shape, 42.0, np.float32), "arterial": np.where(big, 90.0, 10.0)}
    rows = lesion_statistics(ids, grid, phases)
    volume = 4 / 3 * np.pi * 12.0**3 / 1000
    assert rows[0]["volume_ml"] == pytest.approx(volume, rel=0.05)
    assert rows[0]["longest_axial_diameter_mm"] == pytest.approx(24.0, abs=1.5)
    assert rows[1]["longest_axial_diameter_mm"] == pytest.approx(10.0, abs=1.5)
    assert rows[0]["mean_hu"] == {"venous": 42.0, "arterial": 90.0}
    centre = grid.index_to_lps(np.array([[30.0, 30.0, 15.0]]))[0]
    np.testing.assert_allclose(rows[0]["centre_lps_mm"], centre, atol=0.1)
    np.testing.assert_allclose(rows[0]["centre_ras_mm"], centre * [-1, -1, 1], atol=0.1)


def test_the_liver_is_the_largest_component_and_lesions_outside_it_go():
    grid = grid_like((60, 60, 20), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), np.eye(3))
    liver, blob = sphere(grid, (20, 30, 10), 25.0), sphere(grid, (52, 30, 10), 8.0)  # blob: e.g. on the spleen
    lesion_in_liver, lesion_in_blob = sphere(grid, (20, 30, 10), 6.0), sphere(grid, (52, 30, 10), 4.0)
    kept = largest_component(liver | blob)
    assert np.array_equal(kept, liver)
    ids = label_lesions((lesion_in_liver | lesion_in_blob) & kept, grid)
    assert ids.max() == 1 and np.all(ids[lesion_in_liver] == 1)
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_simulated_cases_round_trip_through_the_msd_layout(tmp_path):
    case = simulate_case(synthetic_abdomen(0), 3, phases=("arterial", "venous"), spacing=(1.5, 1.5, 1.5))
    case.unknown.array[:4] = 1  # as beyond a cut label stack: truth unknown there
    write_simulated([case], tmp_path)
    channels, names, ignore = read_manifest(tmp_path)
    assert channels == {0: "arterial", 1: "venous"} and names == ["sim_0000"] and ignore == IGNORE
    loaded = read_case(tmp_path, "sim_0000", channels, ignore)
    assert set(np.unique(loaded.label)) <= {0, 1, 2, IGNORE}
    # the working grid has the case's spacing here: the lesion voxels are all there
    assert (loaded.label == 2).sum() == pytest.approx((case.lesions.array > 0).sum(), rel=0.02)
    unknown = (case.unknown.array > 0) & (case.liver.array == 0)
    assert (loaded.label == IGNORE).sum() == pytest.approx(unknown.sum(), rel=0.05)
    assert loaded.phases_hu["arterial"].shape == loaded.label.shape


def test_unknown_voxels_are_left_out_of_the_scores():
    case = simulate_case(synthetic_abdomen(0), 3, phases=("arterial",), spacing=(4.0, 4.0, 4.0))
    truth_liver, truth_lesions = case.liver.array > 0, case.lesions.array
    assert score_case(case, truth_lesions, truth_liver)["liver_dice"] == 1.0
    wrong = truth_liver.copy()
    wrong[:5] = True  # liver called on the lowest slices, where the truth is background...
    lesions = truth_lesions.copy()
    lesions[:5, :3, :3] = truth_lesions.max() + 1  # ... and a lesion
    assert score_case(case, lesions, wrong)["liver_dice"] < 0.99
    case.unknown.array[:5] = 1  # ... or unknown
    scores = score_case(case, lesions, wrong)
    assert scores["liver_dice"] == 1.0 and scores["lesions_predicted"] == scores["lesions_true"]


class VenousThreshold(nn.Module):
    """A stand-in *network* with a known answer, so the test measures the pipeline's geometry:
    lesion where both (normalised) phases are in the fluid range (cysts), liver where the venous
    phase is parenchyma."""

    def __init__(self, fluid_low: float, fluid_high: float, liver_above: float):
        super().__init__()
        self.fluid_low, self.fluid_high, self.liver_above = fluid_low, fluid_high, liver_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fluid = (x[:, 1:3] > self.fluid_low) & (x[:, 1:3] < self.fluid_high)
        lesion = (fluid[:, 0:1] & fluid[:, 1:2]).float()
        # an opening removes the thin partial-volume shells between fat and enhanced organs
        lesion = nn.functional.max_pool3d(-nn.functional.max_pool3d(-lesion, 3, 1, 1), 3, 1, 1)
        liver = (x[:, 2:3] > self.liver_above).float()
        return torch.cat([1 - torch.maximum(lesion, liver), liver, 2 * lesion], dim=1) * 10


@pytest.fixture(scope="module")
def cyst_case():
    return simulate_case(synthetic_abdomen(4), 14, phases=("arterial", "venous"), spacing=(1.0, 1.0, 2.0),
                         kinds=("cyst",), lesions=(2, 3), motion=(3.0, 6.0))


def threshold_model(tmp_path):
    """The stand-in network saved as a DeepNav model file, with a plain normalisation."""
    from LiverLesionSegLib.model_io import MODEL_FORMAT, MODEL_VERSION

    from deepnav import model_files

    both = ("arterial", "venous")
    norm = Normalisation({p: -200.0 for p in both}, {p: 400.0 for p in both}, {p: 100.0 for p in both},
                         {p: 50.0 for p in both})
    path = tmp_path / "threshold.pt"
    model_files.save_torchscript(VenousThreshold((-20.0 - 100) / 50, (35.0 - 100) / 50, (85.0 - 100) / 50), path, {
        "format": MODEL_FORMAT, "version": MODEL_VERSION, "normalisation": norm.to_json()})
    return load_model(path, "cpu")


def test_pipeline_puts_lesions_on_the_reference_grid(cyst_case, tmp_path):
    model = threshold_model(tmp_path)
    result = segment_study(model, cyst_case.phases, liver=cyst_case.liver)  # a 30 mm and an 11 mm cyst
    assert result.reference == "arterial" and result.lesions.same_grid(cyst_case.phases["arterial"])
    truth = cyst_case.lesions.array > 0
    assert dice(truth, result.lesions.array > 0) > 0.8  # registration + 1.5 mm grid + back: geometry holds
    assert len(result.statistics) == len(cyst_case.lesion_list)
    assert result.registration["venous"]["mutual_information_after"] > result.registration["venous"]["mutual_information_before"]
    paths = result.write(tmp_path / "out")
    assert sitk.ReadImage(str(paths["lesions"])).GetSize() == cyst_case.phases["arterial"].to_sitk().GetSize()
    assert "lesion" in result.message()


def test_no_lesion_is_an_answer_and_a_single_phase_warns(cyst_case, tmp_path):
    model = threshold_model(tmp_path)
    result = segment_study(model, {"venous": _without_lesions(cyst_case)})
    # (the stand-in's "liver", everything bright in the venous phase, is judged implausible: see its reasons)
    assert result.statistics == [] and result.message().endswith("no lesion found")
    assert any("single phase" in w for w in result.warnings)


def _without_lesions(case) -> Volume:
    """The venous phase of `case` with every voxel in the fluid range lifted to parenchyma."""
    venous = case.phases["venous"]
    array = venous.array.copy()
    array[(array > -50) & (array < 60)] = 110
    return venous.with_array(array)


def test_bad_studies_are_refused_clearly(cyst_case, tmp_path):
    model = threshold_model(tmp_path)
    arterial = cyst_case.phases["arterial"]
    with pytest.raises(InputError, match="phases must be named"):
        segment_study(model, {"hepatobiliary": arterial})
    mr_like = arterial.with_array(np.abs(arterial.array.astype(np.float32)) + 100)
    with pytest.raises(InputError, match="Hounsfield"):
        segment_study(model, {"arterial": arterial, "venous": mr_like})
    far = arterial.with_array(arterial.array)
    far.origin = far.origin + 2000.0
    with pytest.raises(InputError, match="does not overlap"):
        segment_study(model, {"arterial": arterial, "venous": far})


def test_dicom_folder_with_two_series_asks_which(tmp_path):
    volume = oblique_volume(np.full((3, 6, 5), 40, np.int16))
    for uid, value in (("1.2.826.0.1.3680043.2.1125.1", 40), ("1.2.826.0.1.3680043.2.1125.2", 90)):
        image = volume.with_array(np.full((3, 6, 5), value, np.int16)).to_sitk()
        for k in range(3):
            slice_ = image[:, :, k]
            for tag, v in (("0020|000e", uid), ("0020|0013", str(k + 1)), ("0008|0060", "CT"),
                           ("0020|0032", "\\".join(str(c) for c in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0037", "\\".join(str(c) for c in list(volume.direction[:, 0]) + list(volume.direction[:, 1])))):
                slice_.SetMetaData(tag, v)
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            writer.SetFileName(str(tmp_path / f"{uid[-1]}_{k}.dcm"))
            writer.Execute(slice_)
    with pytest.raises(InputError, match="2 DICOM series"):
        read_phase(tmp_path, "venous phase")
    chosen = read_phase(tmp_path, "venous phase", "1.2.826.0.1.3680043.2.1125.2")
    assert chosen.array.shape == (3, 6, 5) and np.all(chosen.array == 90)


def test_a_trained_network_file_round_trips(tmp_path):
    model = LesionUNet(width=4)
    norm = Normalisation({"venous": -100.0}, {"venous": 300.0}, {"venous": 100.0}, {"venous": 40.0})
    path = save_model(model, norm, tmp_path / "m.pt", {"training": {"note": "test"}})
    loaded = load_model(path, "cpu")
    x = torch.randn(1, 4, 32, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded.normalisation == norm and loaded.record["training"]["note"] == "test"
    with pytest.raises(InputError, match="not a liver lesion segmentation model"):
        from MRUSFusionLib.model_io import SHIPPED_MODEL

        load_model(SHIPPED_MODEL, "cpu")


def test_segmentation_as_a_child_process_comes_back_as_the_same_result(cyst_case, tmp_path):
    """What the Slicer module does: the phases as files, `deepnav liver segment` in its own
    process (progress lines seen), the result read back from its --out folder."""
    import sys

    from LiverLesionSegLib.pipeline import StudyResult

    from deepnav.child_process import ChildTask, child_environment, deepnav_command
    from deepnav.imaging import write_volume

    model = threshold_model(tmp_path)
    args = ["liver", "segment", "--model", str(model.path), "--device", "cpu", "--out", str(tmp_path / "out"),
            "--liver", str(write_volume(cyst_case.liver, tmp_path / "liver.nrrd"))]
    for name, volume in cyst_case.phases.items():
        args += ["--phase", f"{name}={write_volume(volume, tmp_path / f'{name}.nrrd')}"]
    task = ChildTask(deepnav_command(*args, python=sys.executable), env=child_environment("LiverLesionSegLib"))
    task.result(timeout=600)
    assert task.fraction == 1.0 and "lesion" in task.message
    result = StudyResult.read(tmp_path / "out")
    direct = segment_study(model, cyst_case.phases, liver=cyst_case.liver)
    assert result.reference == direct.reference == "arterial"
    assert result.lesions.same_grid(cyst_case.phases["arterial"])
    np.testing.assert_array_equal(result.lesions.array, direct.lesions.array)
    assert [r["volume_ml"] for r in result.statistics] == pytest.approx([r["volume_ml"] for r in direct.statistics])
    assert result.message() == direct.message()
    assert result.plausibility == direct.plausibility and result.plausibility.reliable  # a true liver: plausible
