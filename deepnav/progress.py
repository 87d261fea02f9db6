"""Progress reporting and cooperative cancellation for long work (training, evaluation).

A command tells the person running it what it does through `console` (named stages, progress,
messages, warnings); a Slicer widget passes its own callback and sets the `Cancel` token from the
GUI thread. Work checks `token.raise_if_cancelled()` between steps.

On a terminal each stage is one bar updated in place with its elapsed time and ETA; anywhere else
(a log file, a pipe, a parent process) each report is one plain line, `progress_line`, which
`read_progress_line` reads back: the protocol between a `deepnav` child process and the Slicer
module watching it (`deepnav.child_process`).
"""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from collections.abc import Callable

ProgressCallback = Callable[[float, str], None]

PROGRESS_LINE = re.compile(r"^\[\s*([0-9.]+)%\]\s?(.*)$")


def progress_line(fraction: float, message: str) -> str:
    """The plain progress line: "[ 42.0%] message"."""
    return f"[{100 * fraction:5.1f}%] {message}"


def read_progress_line(line: str) -> tuple[float, str] | None:
    """(fraction, message) of a `progress_line`, None for any other line."""
    match = PROGRESS_LINE.match(line)
    return (min(float(match.group(1)) / 100.0, 1.0), match.group(2)) if match else None


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


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes:02d}:{seconds:02d}"


class Console:
    """What a command tells the person running it. Progress and warnings go to stderr, so that
    stdout carries results (and nothing but the JSON with `--json -`); `say` writes to stdout.
    Work is named in stages (`stage("loading the model")`, said before the slow part starts, so
    that no second passes in silence); on a terminal a stage's progress is one bar redrawn in
    place with elapsed time and ETA, elsewhere one `progress_line` per report. `quiet`: warnings
    and errors only."""

    BAR_CELLS = 24
    REDRAW_S = 0.1  # a terminal bar is redrawn at most this often (reports can come per step)

    def __init__(self, stream=None, clock: Callable[[], float] = time.monotonic):
        self.stream = stream  # None: whatever sys.stderr is when writing (tests and redirections swap it)
        self.quiet = False
        self._clock = clock
        self._stage = ""
        self._start = clock()
        self._last = 0.0  # fraction last reported
        self._drawn_at = -1.0
        self._bar = ""  # the bar on screen now ("": none)

    @property
    def _err(self):
        return self.stream or sys.stderr

    def _terminal(self) -> bool:
        return bool(getattr(self._err, "isatty", lambda: False)())

    def stage(self, name: str) -> None:
        """Start a named stage: its own bar (the previous one stays on screen, finished)."""
        self._finish_bar()
        self._stage, self._start, self._last = name, self._clock(), 0.0
        self.progress(0.0, "", redraw=True)

    def progress(self, fraction: float, message: str, redraw: bool = False) -> None:
        if self.quiet:
            return
        fraction, now = min(max(float(fraction), 0.0), 1.0), self._clock()
        if fraction < self._last:  # work that starts over within the stage (a new pass): a new clock
            self._start = now
        self._last = fraction
        text = f"{self._stage}: {message}" if self._stage and message else self._stage or message
        if not self._terminal():
            print(progress_line(fraction, text), file=self._err, flush=True)
            return
        if not redraw and fraction < 1.0 and now - self._drawn_at < self.REDRAW_S:
            return
        self._drawn_at = now
        elapsed = now - self._start
        eta = _clock(elapsed * (1.0 - fraction) / fraction) if fraction > 0 else "?"
        filled = round(self.BAR_CELLS * fraction)
        bar = (f"{self._stage or 'working'} {100 * fraction:3.0f}% |{'#' * filled}{'-' * (self.BAR_CELLS - filled)}| "
               f"{_clock(elapsed)}<{eta}" + (f" {message}" if message else ""))
        self._bar = bar[: shutil.get_terminal_size().columns - 1]
        self._err.write("\r" + self._bar + "\033[K")
        self._err.flush()

    def say(self, text: str) -> None:
        """A message for the user on stdout (a result, where files went); none when quiet."""
        if not self.quiet:
            self._above_bar(lambda: print(text, flush=True))

    def warn(self, text: str) -> None:
        """A warning on stderr, quiet or not."""
        self._above_bar(lambda: print(f"warning: {text}", file=self._err, flush=True))

    def _above_bar(self, write: Callable[[], None]) -> None:
        # a line printed while a bar is drawn goes above it: clear the bar, write, redraw
        if not self._bar:
            write()
            return
        self._err.write("\r\033[K")
        self._err.flush()
        write()
        self._err.write(self._bar)
        self._err.flush()

    def close(self) -> None:
        """End the bar on screen (the command is done)."""
        self._finish_bar()
        self._stage = ""

    def _finish_bar(self) -> None:
        if self._bar:
            self._err.write("\n")
            self._err.flush()
            self._bar = ""


console = Console()  # the running command's


def print_progress(fraction: float, message: str) -> None:
    """Default callback: the console's current stage (a bar on a terminal, else a plain line)."""
    console.progress(fraction, message)


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
