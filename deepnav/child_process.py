"""Heavy work in its own process: a `deepnav ...` command run as a child (of Slicer, or of any
Python) and watched from a GUI thread without blocking it, with the face of
`progress.BackgroundTask`: `fraction`, `message`, `done`, `cancel()`, `result()`.

The child reports progress as `progress.print_progress` writes it when its stderr is no terminal
(`progress.progress_line`: "[ 42.0%] message", one line each); a reader thread turns those lines
(`progress.read_progress_line`) into `fraction` and `message` and keeps the other lines (the
command's output, a traceback). `cancel()` ends the child's whole process tree: the child
runs in its own session (POSIX) or process group (Windows), which gets SIGTERM and, if still
there after `grace_s`, SIGKILL. A child that fails, crashes or is killed leaves the parent running:
`result()` raises, saying what happened, with the child's last lines.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from deepnav.errors import InputError
from deepnav.progress import Cancelled, read_progress_line

ERROR_PREFIX = "deepnav: error: "


class ChildFailed(RuntimeError):
    """The child process ended without its result (crash, kill, unexpected exit status)."""


def python_executable() -> str:
    """Slicer's own Python (`PythonSlicer`, on the PATH Slicer's launcher sets) inside Slicer,
    else the interpreter running this."""
    return shutil.which("PythonSlicer") or sys.executable


def deepnav_command(*args: str, python: str | None = None) -> list[str]:
    """The command line of `deepnav ARGS` run by `python` as a child that ends itself when its
    parent is gone (`deepnav.child_main`)."""
    return [python or python_executable(), "-m", "deepnav.child_main", *args]


def child_environment(*modules: str) -> dict[str, str]:
    """This process's environment with PYTHONPATH holding the folders from which `deepnav` and the
    named top-level packages (e.g. "LiverLesionSegLib") were imported here, so that the child
    imports the same code from a source checkout and from Slicer's install tree alike."""
    import importlib.util

    folders = [str(Path(__file__).resolve().parent.parent)]
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"cannot find {name} to hand it to a child process")
        folders.append(str(Path(spec.origin).resolve().parent.parent))
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(folders + ([old] if old else [])))
    return env


class ChildTask:
    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, grace_s: float = 1.0,
                 name: str = "deepnav-child", keep_lines: int = 200):
        self.fraction, self.message = 0.0, ""
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)  # non-progress output
        self.grace_s = grace_s
        self._cancelled = False
        if os.name == "nt":
            group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            group = {"start_new_session": True}
        # stdin: a pipe this process never writes to; it closes when this process ends, however it
        # ends, which tells a `deepnav_command` child that nobody is left to stop it
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                                      bufsize=1, env=env, **group)
        self.pid = self._proc.pid
        self._reader = threading.Thread(target=self._read, name=name, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            line = line.rstrip("\r\n")
            report = read_progress_line(line)
            if report:
                self.fraction, self.message = report
            elif line:
                self.lines.append(line)

    @property
    def done(self) -> bool:
        return self._proc.poll() is not None

    def cancel(self) -> None:
        """End the child and everything it started: SIGTERM now, SIGKILL after `grace_s`."""
        self._cancelled = True
        if self.done:
            return
        self._signal_group(kill=False)
        timer = threading.Timer(self.grace_s, self._signal_group, kwargs={"kill": True})
        timer.daemon = True
        timer.start()

    def _signal_group(self, kill: bool) -> None:
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.pid)], capture_output=True, check=False)
            return
        try:
            os.killpg(self.pid, signal.SIGKILL if kill else signal.SIGTERM)  # the child leads its own session
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        return self._proc.wait(timeout)

    def result(self, timeout: float | None = None, accept: tuple[int, ...] = (0,)) -> list[str]:
        """The child's output lines (progress lines left out); raises Cancelled after cancel(),
        InputError for bad input (exit status 2), ChildFailed for anything else but an exit status
        in `accept` (e.g. a command's "written, but see its verdict" status besides success)."""
        try:
            status = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError("the child process is still running") from None
        self._reader.join(2.0)  # a grandchild still holding the pipe must not block the GUI
        lines = list(self.lines)
        if self._cancelled or status == 130:
            raise Cancelled("cancelled by the user")
        if status in accept:
            return lines
        if status == 2 and lines and lines[-1].startswith(ERROR_PREFIX):
            raise InputError(lines[-1][len(ERROR_PREFIX):])
        if status < 0:
            try:
                what = signal.Signals(-status).name
            except ValueError:
                what = f"signal {-status}"
            raise ChildFailed(f"the worker process was killed ({what}); its last output: {_tail(lines)}")
        raise ChildFailed(f"the worker process failed (exit status {status}): {_tail(lines)}")


def _tail(lines: list[str], n: int = 3) -> str:
    return " | ".join(lines[-n:]) if lines else "(none)"
