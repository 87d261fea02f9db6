"""What every `deepnav` command shares (deepnav.command_line, deepnav.progress): the console's
progress (a bar per stage on a terminal, plain lines a parent process reads otherwise), --quiet,
and help that documents every option and gives an example."""

from __future__ import annotations

import io

from deepnav.progress import Console, read_progress_line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_one_bar_per_stage_redrawn_in_place_with_its_eta():
    screen, clock = Terminal(), Clock()
    console = Console(screen, clock)
    console.stage("training")
    for step in range(1, 5):
        clock.now = 10.0 * step  # 10 s per quarter
        console.progress(step / 8, f"epoch {step}")
    console.stage("writing")
    console.close()
    lines = screen.getvalue().split("\n")
    # two stages, two lines (each ended when the next began), each bar redrawn with \r
    assert len(lines) == 3 and lines[2] == ""
    training, writing = (line.split("\r")[-1] for line in lines[:2])
    assert training.startswith("training  50%") and "epoch 4" in training
    assert "00:40<00:40" in training  # half done in 40 s: 40 s to go
    assert writing.startswith("writing   0%") and "<?" in writing
    assert lines[0].count("\r") == 5  # the stage's start and four reports, all on one line


def test_a_message_goes_above_the_bar_which_is_redrawn():
    screen = Terminal()
    console = Console(screen, Clock())
    console.stage("measuring")
    console.warn("image 2 is not a head")
    *_, after = screen.getvalue().split("\n")
    assert "warning: image 2 is not a head" in screen.getvalue() and after.startswith("measuring")


def test_elsewhere_each_report_is_a_line_a_parent_process_reads():
    log = io.StringIO()
    console = Console(log, Clock())
    console.stage("segmenting")
    console.progress(0.25, "registering the venous phase")
    lines = log.getvalue().splitlines()
    assert [read_progress_line(line) for line in lines] == [(0.0, "segmenting"),
                                                            (0.25, "segmenting: registering the venous phase")]


def test_quiet_keeps_warnings_only(capsys):
    log = io.StringIO()
    console = Console(log, Clock())
    console.quiet = True
    console.stage("training")
    console.progress(0.5, "epoch 1")
    console.say("wrote model.pt")
    console.warn("one phase only")
    assert log.getvalue() == "warning: one phase only\n" and capsys.readouterr().out == ""
