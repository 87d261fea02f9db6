"""The fusion service as a child process of the host (Slicer): `deepnav fusion serve` started with
the host's own Python on a free loopback port and driven through `RemoteRegistration`, so fusing
on this computer and on a remote service are one code path, and torch never runs inside the host.

Transport: our own OpenIGTLink client (`RemoteRegistration`), not a second SlicerOpenIGTLink
connector. It keeps the latest-frame-only handover and the per-frame assembly of warped US, rigid
transform, field and report (with the frame's timestamp) that the live view relies on, needs no
extension, and is tested end to end without Slicer; a connector would push the US node and bring
the results back as nodes, but frame matching, errors and the geometry check would then live in
Slicer's event handlers, where nothing here can test them.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from deepnav.child_process import ChildFailed, ChildTask, child_environment, deepnav_command
from deepnav.errors import InputError
from MRUSFusionLib.live import RemoteRegistration


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (another program could still take it before the child does:
    then the child says it cannot listen, and starting again picks another)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class LocalServiceRegistration(RemoteRegistration):
    """`RemoteRegistration` to a `deepnav fusion serve --mr MR` that this object starts as a child
    process and ends on `close()` (with `fast`, `--fast`: no corrected results). A child that fails
    to start raises here (its message); one that crashes or is killed later is reported in
    `stats()["last_error"]` while the host goes on."""

    def __init__(self, mr: Path, liver: Path | None = None, *, model: Path | None = None, device: str = "auto",
                 fast: bool = False, python: str | None = None, ready_timeout_s: float = 300.0,
                 wait: Callable[[float], None] = time.sleep):
        host, port = "127.0.0.1", free_port()
        args = ["fusion", "serve", "--mr", str(mr), "--host", host, "--port", str(port), "--device", device]
        if liver is not None:
            args += ["--liver", str(liver)]
        if model is not None:
            args += ["--model", str(model)]
        if fast:  # the network's results only; by default each frame's corrected result follows
            args.append("--fast")
        self.process = ChildTask(deepnav_command(*args, python=python), env=child_environment("MRUSFusionLib"))
        deadline = time.monotonic() + ready_timeout_s
        while not _listening(host, port):  # the child loads the model and prepares the MR first
            if self.process.done:
                self.process.result()  # raises the child's failure (bad input, crash)
                raise ChildFailed("the fusion service process ended before it listened")
            if time.monotonic() > deadline:
                self.process.cancel()
                raise ChildFailed(f"the fusion service process did not listen within {ready_timeout_s:.0f} s")
            wait(0.2)  # the host's GUI passes a wait that keeps it responsive
        try:
            super().__init__(host, port)
        except InputError:
            self.process.cancel()
            raise

    def stats(self) -> dict:
        stats = super().stats()
        if self.process.done and not self._stopped.is_set():
            try:
                self.process.result(timeout=0)
                why = "it exited"
            except Exception as exc:
                why = str(exc)
            stats["last_error"] = f"the fusion service process stopped: {why}"
        return stats

    def close(self) -> None:
        super().close()
        self.process.cancel()
