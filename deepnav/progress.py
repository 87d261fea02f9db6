"""Progress reporting and cooperative cancellation for long work (training, evaluation).

The command line prints progress lines; a Slicer widget passes its own callback and sets the
`Cancel` token from the GUI thread. Work checks `token.raise_if_cancelled()` between steps.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

ProgressCallback = Callable[[float, str], None]


class Cancelled(Exception):
    """Raised inside long work when the user asked to stop."""


class CancelToken:
    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def print_progress(fraction: float, message: str) -> None:
    """Default callback: one line per report on stderr, with the percentage."""
    print(f"[{100 * fraction:5.1f}%] {message}", file=sys.stderr, flush=True)


def silent(fraction: float, message: str) -> None:
    del fraction, message


class BackgroundTask:
    """Long work (training, a batch) on a thread, watched from a GUI thread without blocking it:
    `fn(progress, cancel)` runs at once; the GUI reads `fraction` and `message` on a timer, calls
    `cancel()`, and when `done` takes `result()` (which re-raises what the work raised)."""

    def __init__(self, fn: Callable[[ProgressCallback, CancelToken], object], name: str = "deepnav-task"):
        self.fraction, self.message = 0.0, ""
        self.token = CancelToken()
        self._fn = fn
        self._result: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _report(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message

    def _run(self) -> None:
        try:
            self._result = self._fn(self._report, self.token)
        except BaseException as exc:  # handed to the GUI thread by result()
            self._error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        self.token.cancel()

    def result(self, timeout: float | None = None):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the task is still running")
        if self._error is not None:
            raise self._error
        return self._result


class Stopwatch:
    """Named stage timings in seconds: `with sw("rigid"): ...`, then `sw.times`."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._name = ""
        self._t0 = 0.0

    def __call__(self, name: str) -> Stopwatch:
        self._name = name
        return self

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.times[self._name] = self.times.get(self._name, 0.0) + time.perf_counter() - self._t0
        return False
