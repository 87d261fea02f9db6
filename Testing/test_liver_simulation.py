"""The multi-phase lesion simulator and the phase registration (LiverLesionSeg)."""

from __future__ import annotations

import numpy as np
import pytest
from LiverLesionSegLib.abdomen import LABELS, UNKNOWN, UNKNOWN_DEPTH_MM, load_abdomen, synthetic_abdomen
from LiverLesionSegLib.dataset import IGNORE, case_label
from LiverLesionSegLib.phase_registration import register_phase, register_phase_sitk, transform_error_mm
from LiverLesionSegLib.preprocess import resample
from LiverLesionSegLib.simulator import simulate_case

from conftest import ROOT
from deepnav.errors import InputError
from deepnav.imaging import Volume, grid_like, write_volume

DATA = ROOT.parent / "shared" / "data" / "abdomen"


@pytest.fixture(scope="module")
def case():
    return simulate_case(synthetic_abdomen(1), 5, phases=("arterial", "venous", "plain", "delayed"), spacing=(3, 3, 3))


def liver_points(case):
    k, j, i = np.nonzero(case.liver.array)
    return case.liver.index_to_lps(np.stack([i, j, k], axis=1).astype(float))


def test_same_seed_same_case(case):
    again = simulate_case(synthetic_abdomen(1), 5, phases=("arterial", "venous", "plain", "delayed"), spacing=(3, 3, 3))
    for phase in case.phases:
        np.testing.assert_array_equal(again.phases[phase].array, case.phases[phase].array)
    np.testing.assert_array_equal(again.lesions.array, case.lesions.array)


def test_labels_are_exact_and_inside_the_liver(case):
    ids = case.lesions.array
    assert sorted(np.unique(ids[ids > 0])) == [lesion.label for lesion in case.lesion_list]
    assert np.all(case.liver.array[ids > 0] == 1)
    assert case.reference == "arterial" and np.allclose(case.truth["arterial"], np.eye(4))
    for phase, volume in case.phases.items():
        assert volume.same_grid(case.lesions) and volume.array.dtype == np.int16, phase


def test_lesions_enhance_by_kind_across_phases():
    """Each kind's signature against the surrounding liver, in the reference frame (no motion)."""
    abdomen = synthetic_abdomen(2)
    contrast = {}
    for seed in range(12):
        for phase in ("arterial", "venous", "delayed", "plain"):
            c = simulate_case(abdomen, seed, phases=(phase,), spacing=(3, 3, 3), lesions=(2, 3))
            image, ids = c.phases[phase].array.astype(float), c.lesions.array
            liver = np.median(image[(c.liver.array > 0) & (ids == 0)])
            for lesion in c.lesion_list:
                inside = ids == lesion.label
                if inside.sum() >= 20:
                    contrast.setdefault((lesion.kind, phase), []).append(np.median(image[inside]) - liver)
    median = {key: float(np.median(v)) for key, v in contrast.items()}
    assert median[("hypervascular", "arterial")] > 30 and median[("hypervascular", "venous")] < -10
    assert all(median[("cyst", p)] < -30 for p in ("arterial", "venous", "delayed"))
    assert median[("metastasis", "venous")] < -30
    assert median[("haemangioma", "delayed")] > median[("haemangioma", "arterial")]  # centripetal filling


def test_studies_cover_the_whole_ct_the_labelled_slab_the_liver_or_a_given_scanner_grid():
    abdomen = synthetic_abdomen(0)
    abdomen.labels.array[:5] = 0  # organ labels on slices 5.. only, as the real CT's cover 30 of 112
    ct_corners = abdomen.ct.corners_lps()
    fields = {field: simulate_case(abdomen, 1, spacing=(6, 6, 6), field=field).phases["arterial"]
              for field in ("ct", "slab", "liver")}
    for field in ("ct", "slab"):  # the CT's whole in-plane field of view
        grid = fields[field]
        far_corner = grid.index_to_lps(np.array(grid.size_ijk)[None] - 1.0)[0]
        np.testing.assert_allclose(grid.origin[:2], ct_corners.min(axis=0)[:2])
        assert np.all(far_corner[:2] >= ct_corners.max(axis=0)[:2] - 1e-6)
    # in z the whole CT, or the labelled slices only
    np.testing.assert_allclose(fields["ct"].origin[2], ct_corners.min(axis=0)[2])
    np.testing.assert_allclose(fields["slab"].origin[2], abdomen.ct.index_to_lps(np.array([[0.0, 0.0, 5.0]]))[0, 2])
    assert np.prod(fields["liver"].size_ijk) < 0.5 * np.prod(fields["slab"].size_ijk)
    scanner = grid_like((40, 30, 20), (8.0, 8.0, 10.0), (-160.0, -120.0, 0.0), np.eye(3))
    given = simulate_case(abdomen, 1, grid=scanner)
    assert given.phases["arterial"].same_grid(scanner) and given.lesions.same_grid(scanner)
    with pytest.raises(ValueError, match="unknown field"):
        simulate_case(abdomen, 1, field="abdomen")


CUT = 30  # slices 30.. of the synthetic abdomen keep their labels (z >= 90 mm); its liver goes down to z ~ 35 mm


@pytest.fixture(scope="module")
def cut_abdomen(tmp_path_factory):
    """As the real CT's labels: a stack cut through the liver, written with the CT's own origin as
    the real label file is (load_abdomen finds where it goes). Returns (loaded, uncut)."""
    folder = tmp_path_factory.mktemp("cut")
    abdomen = synthetic_abdomen(2)
    ct = abdomen.ct
    write_volume(ct, folder / "ct.nii.gz")
    write_volume(Volume(abdomen.labels.array[CUT:], ct.spacing, ct.origin, ct.direction), folder / "labels.nii.gz")
    return load_abdomen(folder / "ct.nii.gz", folder / "labels.nii.gz"), abdomen


def test_liver_beyond_a_cut_label_stack_is_marked_unknown_not_background(cut_abdomen):
    """Every liver voxel the cut took away must be UNKNOWN (not background, which would teach the
    network that liver is background); the other side of the body and the slices far below stay known."""
    loaded, uncut = cut_abdomen
    full, labels = uncut.labels.array, loaded.labels.array
    assert loaded.z_offset == CUT
    cut_liver = full[:CUT] == LABELS["liver"]
    assert cut_liver.any() and np.all(labels[:CUT][cut_liver] == UNKNOWN)
    depth = int(UNKNOWN_DEPTH_MM / uncut.ct.spacing[2])
    assert not (labels[: CUT - depth] == UNKNOWN).any()
    assert not (labels[:CUT][full[:CUT] == LABELS["spleen"]] == UNKNOWN).any()
    np.testing.assert_array_equal(labels[CUT:], full[CUT:])
    # carried into a simulated study and its training label
    case = simulate_case(loaded, 3, spacing=(6, 6, 6), field="ct")
    assert case.unknown is not None and case.unknown.array.any()
    assert not (case.liver.array[case.unknown.array > 0]).any()
    assert np.all(case_label(case)[case.unknown.array > 0] == IGNORE)


def test_unlabelled_liver_beyond_the_cut_is_enhanced_like_liver(cut_abdomen):
    """Left plain, the cut-away liver would look like a large hypodense lesion in the venous phase.
    Same seed on the uncut labels: the same anatomy and phase intensities up to noise and lesions."""
    loaded, uncut = cut_abdomen
    cut = simulate_case(loaded, 4, phases=("venous",), spacing=(3, 3, 3), field="ct", lesions=(1, 1))
    whole = simulate_case(uncut, 4, phases=("venous",), spacing=(3, 3, 3), field="ct", lesions=(1, 1))
    away = (cut.unknown.array > 0) & (whole.liver.array > 0) & (cut.lesions.array == 0) & (whole.lesions.array == 0)
    assert away.sum() > 1000
    labelled = (cut.liver.array > 0) & (cut.lesions.array == 0)
    hu_away, hu_whole = cut.phases["venous"].array[away].mean(), whole.phases["venous"].array[away].mean()
    assert abs(hu_away - hu_whole) < 10  # not the 55 HU of the venous enhancement
    assert abs(hu_away - cut.phases["venous"].array[labelled].mean()) < 15


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="unknown phases"):
        simulate_case(synthetic_abdomen(0), 0, phases=("arterial", "hepatobiliary"))


@pytest.mark.skipif(not (DATA / "example_ct.nii.gz").exists(), reason="../shared/data/abdomen not present")
def test_real_abdomen_labels_are_put_on_the_liver():
    abdomen = load_abdomen(DATA / "example_ct.nii.gz", DATA / "example_seg.nii.gz")
    liver_hu = abdomen.ct.array[abdomen.mask("liver")]
    assert abdomen.z_offset == 82
    assert 30 < np.median(liver_hu) < 70 and np.percentile(liver_hu, 1) > -100  # parenchyma, no air


def test_swarm_then_powell_recovers_the_known_misalignment(case):
    points = liver_points(case)
    results = {}
    for phase in ("venous", "delayed"):
        truth = case.truth[phase]
        results[phase] = result = register_phase(case.phases["arterial"], case.phases[phase], particles=12, iterations=10)
        assert transform_error_mm(np.eye(4), truth, points) > 2.0
        assert transform_error_mm(result.matrix_lps, truth, points) < 0.5, phase
        assert result.mi_after > result.mi_before
    # resampled through the result, the venous phase lines up with the reference
    reference, venous = case.phases["arterial"], case.phases["venous"]
    body = reference.array > -500
    before = resample(venous, reference, np.eye(4))[body]
    after = resample(venous, reference, results["venous"].matrix_lps)[body]
    corr = [np.corrcoef(x, reference.array[body])[0, 1] for x in (before, after)]
    assert corr[1] > corr[0] + 0.1


def test_classical_baseline_also_registers(case):
    """Looser than ours: ITK's multithreaded random sampling makes its result vary from run to run."""
    result = register_phase_sitk(case.phases["arterial"], case.phases["venous"])
    initial = transform_error_mm(np.eye(4), case.truth["venous"], liver_points(case))
    error = transform_error_mm(result.matrix_lps, case.truth["venous"], liver_points(case))
    assert error < 2.0 and error < initial / 2


def test_registration_is_time_bounded_and_refuses_non_ct(case):
    # A limit already reached stops the search after the swarm's first generation (the work that
    # precedes any check) with the best transform so far: counted in evaluations, not in seconds,
    # so that a busy machine cannot fail it. Its seconds: benchmarks/liver_phase_registration.py.
    particles = 20
    result = register_phase(case.phases["arterial"], case.phases["venous"], particles=particles, time_limit_s=0.0)
    assert result.evaluations <= particles + 2  # + the fine level's start and its "before" figure
    rotation = result.matrix_lps[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)  # a rigid transform all the same
    blank = case.phases["venous"].with_array(np.zeros_like(case.phases["venous"].array))
    with pytest.raises(InputError, match="Hounsfield"):
        register_phase(case.phases["arterial"], blank)
