"""Training under torchrun (deepnav.distributed) equals training in one process: 2 gloo processes
on loopback with batch b against one process with batch 2b, for each of the three trainers; a
2-process checkpoint resumed in one process; a rank that dies ends the job with a message.

The runs are separate processes (distributed_jobs.py, alone or under torchrun), each with one
torch thread. Tolerance: the final weights of the two runs differ by less than 1e-2 in relative L2
norm, the recorded losses by less than 1e-3 relative. What differs is only the order of
floating-point sums (a convolution over a batch of 2 or of 1, the gradient all-reduce, batch-norm
statistics across ranks), which Adam amplifies where a gradient is near zero (its step is about
lr * sign(gradient) there): measured 2.6e-3 (liver), against 4.3e-2 between one process with
batch 2 and one with batch 1, which the liver test checks it can tell apart.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
JOBS = HERE / "distributed_jobs.py"
WEIGHTS_RELATIVE, LOSS_RTOL = 1e-2, 1e-3


def _run(args: list, processes: int, timeout: float = 300) -> subprocess.CompletedProcess:
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                           f"--nproc-per-node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPNAV_DIST_TIMEOUT_S": "120"}
    return subprocess.run([sys.executable, *launcher, *[str(a) for a in args]], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HERE.parent)


def _job(kind: str, data: Path, out: Path, batch: int, epochs: int, processes: int, resume: bool = False) -> dict:
    result = _run([JOBS, kind, data, out, batch, epochs, *(["--resume"] if resume else [])], processes)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)


def _losses(kind: str, checkpoint: dict) -> list[float]:
    """The recorded training and validation losses (not thresholded scores such as Dice, which a
    barely trained network puts on a knife's edge)."""
    keys = {"fusion": ("train_loss", "val_label_ncc", "val_mind"), "liver": ("train_loss", "val_loss"),
            "fetal": ("loss",)}[kind]
    return [row[k] for row in checkpoint["history"] for k in keys if row.get(k) is not None]


def _difference(a: dict, b: dict, key: str = "model") -> float:
    """Relative L2 difference of two runs' final weights, over every floating-point tensor."""
    num = den = 0.0
    for name, x in a[key].items():
        if x.is_floating_point():
            num += float(((x.double() - b[key][name].double()) ** 2).sum())
            den += float((x.double() ** 2).sum())
    return math.sqrt(num / den)


def _assert_same(kind: str, a: dict, b: dict, key: str = "model") -> float:
    """The two runs ended with the same weights and recorded the same losses; returns the relative
    weight difference."""
    assert a[key].keys() == b[key].keys()
    for name, x in a[key].items():
        if not x.is_floating_point():
            assert torch.equal(x, b[key][name]), name
    difference = _difference(a, b, key)
    print(f"{kind} ({key}): relative weight difference {difference:.2e}")
    assert difference < WEIGHTS_RELATIVE, f"{kind}: weights differ by {difference:.2e} (relative L2)"
    la, lb = _losses(kind, a), _losses(kind, b)
    assert len(la) == len(lb) > 0
    np.testing.assert_allclose(la, lb, rtol=LOSS_RTOL, err_msg=f"{kind} losses")
    return difference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fusion_data(tmp_path_factory, patient):
    from MRUSFusionLib.preprocess import prepare_pair
    from MRUSFusionLib.training import Sample

    samples = [Sample.from_pair(prepare_pair(patient.mr, f.image, liver=patient.liver, mr_vessels=patient.vessels,
                                             us_vessels=f.vessels)) for f in patient.frames]
    path = tmp_path_factory.mktemp("fusion") / "samples.pkl"
    path.write_bytes(pickle.dumps((samples, samples)))  # two training frames; both validate (one per rank)
    return path


@pytest.fixture(scope="module")
def liver_data(tmp_path_factory):
    from LiverLesionSegLib.abdomen import synthetic_abdomen
    from LiverLesionSegLib.dataset import TrainingCase, case_label
    from LiverLesionSegLib.simulator import simulate_case

    cases = []
    for seed in (1, 2, 3, 4):
        case = simulate_case(synthetic_abdomen(seed), seed, phases=("arterial", "venous"), spacing=(4.0, 4.0, 4.0),
                             motion=(0.0, 0.0), lesions=(2, 2))
        cases.append(TrainingCase(f"c{seed}", {p: v.array.astype(np.float32) for p, v in case.phases.items()},
                                  case_label(case)))
    path = tmp_path_factory.mktemp("liver") / "cases.pkl"
    path.write_bytes(pickle.dumps((cases[:2], cases[2:])))
    return path


@pytest.fixture(scope="module")
def fetal_data(tmp_path_factory):
    from test_fetal_biometry import write_hc18_like

    folder = tmp_path_factory.mktemp("fetal")
    write_hc18_like(folder, 8, np.random.default_rng(6))
    return folder


def test_fusion_two_processes_with_one_pair_train_as_one_with_two(fusion_data, tmp_path):
    one = _job("fusion", fusion_data, tmp_path / "one", batch=2, epochs=2, processes=1)
    two = _job("fusion", fusion_data, tmp_path / "two", batch=1, epochs=2, processes=2)
    _assert_same("fusion", one, two)
    assert [r["stage"] for r in two["history"]] == ["rigid", "bspline"]
    assert two["average"] is not None
    _assert_same("fusion", one, two, key="average")  # the moving average of the weights too


def test_liver_two_processes_with_batch_one_train_as_one_with_batch_two(liver_data, tmp_path):
    one = _job("liver", liver_data, tmp_path / "one", batch=2, epochs=2, processes=1)
    two = _job("liver", liver_data, tmp_path / "two", batch=1, epochs=2, processes=2)
    difference = _assert_same("liver", one, two)
    # the test can tell: one process with batch 1 (half the data per step) ends elsewhere
    small = _job("liver", liver_data, tmp_path / "small", batch=1, epochs=2, processes=1)
    print(f"liver: 2 processes vs 1, relative weight difference {difference:.2e}; batch 1 vs 2: {_difference(one, small):.2e}")
    assert _difference(one, small) > 5 * difference
    # rank 0 alone wrote: one history, one best.pt, a checkpoint naming the config
    assert json.loads((tmp_path / "two" / "history.json").read_text())["config"]["batch"] == 1


def test_fetal_two_processes_with_batch_two_train_as_one_with_batch_four(fetal_data, tmp_path):
    one = _job("fetal", fetal_data, tmp_path / "one", batch=4, epochs=2, processes=1)
    two = _job("fetal", fetal_data, tmp_path / "two", batch=2, epochs=2, processes=2)
    _assert_same("fetal", one, two)  # batch norm over the global batch (GlobalBatchNorm2d)
    assert all(math.isfinite(row["loss"]) for row in two["history"])


def test_a_two_process_checkpoint_resumes_in_one_process(liver_data, tmp_path):
    straight = _job("liver", liver_data, tmp_path / "straight", batch=2, epochs=2, processes=1)
    _job("liver", liver_data, tmp_path / "resumed", batch=1, epochs=1, processes=2)
    resumed = _job("liver", liver_data, tmp_path / "resumed", batch=2, epochs=2, processes=1, resume=True)
    assert [r["epoch"] for r in resumed["history"]] == [0, 1]
    _assert_same("liver", straight, resumed)


@pytest.mark.parametrize("failure", ["die", "stall"])
def test_a_failed_or_silent_rank_ends_the_job_with_a_message_not_a_hang(failure, tmp_path):
    """Two processes joined as torchrun would join them (no agent to kill the survivor): rank 1
    exits, or stops answering, while rank 0 waits in an all-reduce; rank 0 ends with PeerLost's
    message and status 1, at once for a dead peer, after the timeout (3 s here) for a silent one."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "DEEPNAV_DIST_TIMEOUT_S": "3", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    ranks = [subprocess.Popen([sys.executable, JOBS, failure, tmp_path, tmp_path, "1", "1"], stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:
        _, err = ranks[0].communicate(timeout=60)
        seconds = time.perf_counter() - t0
    finally:
        ranks[1].kill()
        ranks[1].wait()
    assert ranks[0].returncode == 1, err[-2000:]
    message = [line for line in err.splitlines() if line.startswith("deepnav: error:")]
    assert message and "rank 0 of 2 stopped: another process of the job failed or stopped answering" in message[0]
    assert seconds < 45  # start-up of two processes, then the failure noticed (not torch's 30 min default)


def test_the_command_line_runs_under_torchrun_and_rank_0_alone_writes(fetal_data, tmp_path):
    out = tmp_path / "model"
    result = _run(["-m", "deepnav", "fetal", "train", "--data", fetal_data, "--out", out, "--epochs", "1",
                   "--batch", "2", "--width", "4", "--device", "cpu"], processes=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("best validation") == 1  # rank 0 reports
    assert {p.name for p in out.iterdir()} == {"best.pt", "checkpoint.pt", "history.json", "model.pt"}
    # commands that do not share out their work refuse to run several times over
    refused = _run(["-m", "deepnav", "fetal", "evaluate", "--data", fetal_data, "--split", "all",
                    "--json", tmp_path / "e.json"], processes=2)
    assert refused.returncode != 0 and "runs as one process" in refused.stderr



@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_nodes_train_as_one_process_with_the_global_batch(rendezvous, fetal_data, tmp_path):
    """The README's two-node command, both nodes on this machine: two separate torchrun launchers
    (--nnodes 2, one process each), joined by c10d rendezvous (--rdzv-endpoint, no node rank) or
    by static rendezvous (--node-rank, --master-addr/port), train `deepnav fetal train` with
    --batch 2 as one process with --batch 4 (the tolerance of the one-node tests; measured: the
    same weights as two processes on one node, bit for bit). About 8 s a launch on 2 cores."""
    def train(out: Path, batch: int) -> list:
        return ["-m", "deepnav", "fetal", "train", "--data", fetal_data, "--out", out, "--epochs", "2",
                "--batch", str(batch), "--width", "4", "--device", "cpu"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPNAV_THREADS": "1", "DEEPNAV_DIST_TIMEOUT_S": "120"}
    port = _free_port()
    if rendezvous == "c10d":
        nodes = [["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-node-test"]] * 2
    else:
        nodes = [["--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port)] for r in (0, 1)]
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                                   *node, *map(str, train(tmp_path / "two", 2))], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, cwd=HERE.parent) for node in nodes]
    try:
        outputs = [launcher.communicate(timeout=180) for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
            launcher.wait()
    assert [launcher.returncode for launcher in launchers] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum(out.count("best validation") for out, _ in outputs) == 1  # one rank 0 over both nodes
    one = subprocess.run([sys.executable, *map(str, train(tmp_path / "one", 4))], capture_output=True, text=True,
                         env=env, cwd=HERE.parent, timeout=180)
    assert one.returncode == 0, one.stderr[-4000:]
    load = lambda name: torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=False)  # noqa: E731
    _assert_same("fetal", load("one"), load("two"))


def test_fetal_measure_shared_out_over_two_processes_writes_what_one_process_writes(tmp_path):
    """Five images (two of them twice, from another folder: uneven shares, repeated names) measured
    by 2 processes under torchrun and by 1: the same JSON (each image's runtime_s apart, a clock
    reading; the overlay paths relative to each run's folder) and byte-identical overlay pictures."""
    samples = HERE.parent / "FetalBiometry" / "Resources" / "Samples"
    other = tmp_path / "other"
    other.mkdir()
    images = sorted(samples.glob("*_HC.png"))
    for image in images[:2]:
        (other / image.name).write_bytes(image.read_bytes())
    inputs = [*images, *sorted(other.glob("*.png"))]
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        result = _run(["-m", "deepnav", "fetal", "measure", *inputs, "--pixel-size", "0.15", "--json",
                       out / "hc.json", "--overlay", out / "overlays", "--device", "cpu"], processes)
        assert result.returncode == 0, result.stderr[-4000:]
        rows = json.loads((out / "hc.json").read_text())["images"]
        for row in rows:
            assert row.pop("runtime_s") > 0
            row["overlay"] = str(Path(row["overlay"]).relative_to(out))  # the two runs' folders differ
        pictures = {p.name: p.read_bytes() for p in sorted((out / "overlays").iterdir())}
        outputs[processes] = rows, pictures
    (rows1, pictures1), (rows2, pictures2) = outputs[1], outputs[2]
    assert [r["path"] for r in rows2] == [str(p) for p in inputs]
    assert rows2 == rows1
    assert len(pictures1) == len(inputs) and pictures2 == pictures1


def test_liver_studies_shared_out_over_two_processes_write_what_one_process_writes(tmp_path):
    """Three studies (two folders of the same name: uneven shares, repeated names) segmented by 2
    processes under torchrun and by 1 (a stand-in network, test_liver_pipeline's): the same files,
    byte for byte, lesions.json apart from its stage timings (clock readings)."""
    from LiverLesionSegLib.abdomen import synthetic_abdomen
    from LiverLesionSegLib.simulator import simulate_case
    from test_liver_pipeline import threshold_model

    from deepnav.imaging import write_volume

    threshold_model(tmp_path)  # writes tmp_path / threshold.pt
    folders = [tmp_path / "studies" / "a", tmp_path / "studies" / "b", tmp_path / "more" / "a"]
    for seed, folder in enumerate(folders, 21):
        case = simulate_case(synthetic_abdomen(4), seed, phases=("arterial", "venous"), spacing=(2.0, 2.0, 4.0),
                             kinds=("cyst",), lesions=(1, 2), motion=(2.0, 3.0))
        folder.mkdir(parents=True)
        write_volume(case.phases["venous"], folder / "venous.nii.gz")  # one phase: no registration, seconds
    files, status = {}, {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        result = _run(["-m", "deepnav", "liver", "segment", "--studies", tmp_path / "studies", tmp_path / "more" / "a",
                       "--model", tmp_path / "threshold.pt", "--device", "cpu", "--out", out], processes)
        assert result.returncode in (0, 3) if processes == 1 else result.returncode == (status[1] != 0), \
            result.stderr[-4000:]  # (torchrun ends with 1 when a process did not end with 0)
        status[processes] = result.returncode
        files[processes] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    one, two = files[1], files[2]
    assert one.keys() == two.keys()
    assert {k.split("/")[0] for k in one} == {"a", "b", "a_2", "studies.json"}
    for name in one:
        if name.endswith("lesions.json"):
            a, b = json.loads(one[name]), json.loads(two[name])
            assert a.pop("timings_s").keys() == b.pop("timings_s").keys()
            assert a == b, name
        else:
            assert one[name] == two[name], name
    rows = json.loads(one["studies.json"])["studies"]
    assert [r["out"] for r in rows] == ["a", "b", "a_2"] and all("message" in r for r in rows)
    assert status[1] == (0 if all(r["reliable"] for r in rows) else 3)
