"""Heavy work in a child process (deepnav.child_process), with real processes: progress lines drive
the task's fraction and message, Cancel ends the whole process tree within 2 s, a crash and a
`kill -9` are reported while the parent goes on, bad input comes back as the CLI's message."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import pytest

from deepnav.child_process import ChildFailed, ChildTask, child_environment, deepnav_command
from deepnav.errors import InputError
from deepnav.progress import Cancelled

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX process groups and signals")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_progress_lines_drive_the_task_and_the_output_comes_back():
    task = ChildTask(python("""
        import time
        from deepnav.progress import print_progress
        for i in range(5):
            print_progress(i / 4, f"step {i}")
            time.sleep(0.02)
        print("wrote result.json")
    """), env=child_environment())
    seen = set()
    while not task.done:
        seen.add(task.message)
        time.sleep(0.005)
    assert task.result(timeout=5) == ["wrote result.json"]
    assert (task.fraction, task.message) == (1.0, "step 4")
    assert seen - {""}, "progress was visible while the child ran"


def test_cancel_ends_the_process_tree_within_two_seconds():
    task = ChildTask(python("""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(grandchild.pid, flush=True)
        time.sleep(60)
    """))
    wait_for(lambda: len(task.lines) == 1)
    grandchild = int(task.lines[0])
    assert alive(grandchild)
    t0 = time.monotonic()
    task.cancel()
    wait_for(lambda: task.done and not alive(grandchild), timeout_s=2.0)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(Cancelled):
        task.result(timeout=1)


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period():
    task = ChildTask(python("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """), grace_s=0.5)
    wait_for(lambda: list(task.lines) == ["ready"])
    t0 = time.monotonic()
    task.cancel()
    wait_for(lambda: task.done, timeout_s=2.0)
    assert 0.4 < time.monotonic() - t0 < 2.0


def test_a_killed_child_is_reported_and_the_parent_goes_on():
    task = ChildTask(python("""
        import time
        print("working", flush=True)
        time.sleep(60)
    """))
    wait_for(lambda: list(task.lines) == ["working"])
    os.kill(task.pid, signal.SIGKILL)  # kill -9, as the OOM killer or a user would
    with pytest.raises(ChildFailed, match=r"killed \(SIGKILL\).*working"):
        task.result(timeout=5)


def test_a_crash_is_reported_with_its_last_lines():
    task = ChildTask(python("1 / 0"))
    with pytest.raises(ChildFailed, match="exit status 1.*ZeroDivisionError"):
        task.result(timeout=10)


def test_bad_input_comes_back_as_the_commands_message(tmp_path):
    """The real `deepnav` command line, as Slicer would start it."""
    missing = tmp_path / "no-such-phase.nrrd"
    argv = deepnav_command("liver", "segment", "--phase", f"arterial={missing}", "--out", str(tmp_path / "out"),
                           python=sys.executable)
    task = ChildTask(argv, env=child_environment("LiverLesionSegLib"))
    with pytest.raises(InputError, match="arterial phase"):
        task.result(timeout=120)


def test_fusion_training_from_slicer_files_in_a_child_and_its_cancel(tmp_path):
    """What MRUSFusion's 'Train' does: the patient's volumes as files, `deepnav fusion train`
    fine-tuning the shipped model in its own process; then the same run cancelled mid-way."""
    import json

    from deepnav.cli import main
    from MRUSFusionLib.model_io import SHIPPED_MODEL, load_model

    patient = tmp_path / "patient"
    assert main(["fusion", "phantom", "--seed", "6", "--frames", "2", "--out", str(patient)]) == 0
    args = ["fusion", "train", "--mr", str(patient / "mr.nrrd"), "--mr-vessels", str(patient / "mr_vessels.nrrd"),
            "--us", str(patient / "us_00.nrrd"), str(patient / "us_01.nrrd"),
            "--us-vessels", str(patient / "us_00_vessels.nrrd"), str(patient / "us_01_vessels.nrrd"),
            "--val-frames", "1", "--rigid-epochs", "1", "--bspline-epochs", "0", "--steps-per-epoch", "1",
            "--device", "cpu", "--init", str(SHIPPED_MODEL)]
    env = child_environment("MRUSFusionLib")
    task = ChildTask(deepnav_command(*args, "--out", str(tmp_path / "model"), python=sys.executable), env=env)
    task.result(timeout=600)
    assert task.fraction > 0 and task.message
    best = json.loads((tmp_path / "model" / "history.json").read_text())["best"]
    assert best["epoch"] == 0 and 0 <= best["vessel_dice"] <= 1
    assert load_model(tmp_path / "model" / "model.pt", "cpu").metadata["training"]["kind"] == "files"

    task = ChildTask(deepnav_command(*args, "--steps-per-epoch", "100000", "--out", str(tmp_path / "cancelled"),
                                     python=sys.executable), env=env)
    wait_for(lambda: "step" in task.message or task.done, timeout_s=300)
    assert not task.done, list(task.lines)
    t0 = time.monotonic()
    task.cancel()
    wait_for(lambda: task.done, timeout_s=2.0)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(Cancelled):
        task.result(timeout=1)
    assert not (tmp_path / "cancelled" / "model.pt").exists()


def test_a_deepnav_child_ends_when_its_parent_dies(tmp_path):
    """Slicer crashing (here: a parent that exits at once, without cleanup) must not leave a
    fusion service or a training running: the child sees its stdin close and ends."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    parent = ChildTask(python(f"""
        import os, sys
        from deepnav.child_process import ChildTask, child_environment, deepnav_command
        task = ChildTask(deepnav_command("fusion", "serve", "--echo", "--port", "{port}", python=sys.executable),
                         env=child_environment("MRUSFusionLib"))
        print(task.pid, flush=True)
        import socket, time
        for _ in range(600):  # until the service listens
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        print("listening", flush=True)
        os._exit(0)  # no cleanup, as a crash
    """), env=child_environment())
    parent.result(timeout=120)
    service = int(parent.lines[0])
    assert parent.lines[1] == "listening"
    wait_for(lambda: not alive(service), timeout_s=5.0)
