"""What every `deepnav` command shares (deepnav.command_line, deepnav.progress): the console's
progress (a bar per stage on a terminal, plain lines a parent process reads otherwise), --quiet,
and help that documents every option and gives an example."""

from __future__ import annotations

import argparse
import io
import json
import re

from deepnav.cli import build_parser
from deepnav.command_line import commands
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


def _documentation_problems(parser) -> list[str]:
    """What a reader of `--help` would miss, command by command: an option with no help, a default
    not said (a value, or in words what happens without the option), choices not listed, a
    command without an example of itself."""
    problems = []
    for path, command in commands(parser):
        name = " ".join(("deepnav", *path))
        if f"\n  {name}" not in "\n" + (command.epilog or "").split("examples:")[-1]:
            problems.append(f"{name}: no example in its epilog")
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction) or action.help == argparse.SUPPRESS:
                continue  # argparse's own, and deprecated spellings kept hidden
            option = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                problems.append(f"{option}: no help")
                continue
            text = formatter._expand_help(action)
            if action.choices is not None and not all(str(c) in text or str(c) in (action.metavar or str(c))
                                                      for c in action.choices):
                problems.append(f"{option}: choices not listed")
            either_or = any(action in group._group_actions for group in command._mutually_exclusive_groups
                            if group.required)  # usage says one of them is needed
            optional_value = action.option_strings and action.nargs != 0 and not action.required and not either_or
            if optional_value and action.default is None and not re.search(r"default|required", text, re.I):
                problems.append(f"{option}: does not say what happens without it")
            elif optional_value and action.default is not None:
                first = action.default[0] if isinstance(action.default, list | tuple) else action.default
                if str(first) not in text:
                    problems.append(f"{option}: default {action.default!r} not said")
    return problems


def test_every_option_says_its_default_and_choices_and_every_command_has_an_example():
    assert _documentation_problems(build_parser()) == []


def test_the_check_finds_an_undocumented_option_and_a_command_without_example():
    parser = build_parser()
    _, command = next(commands(parser))
    command.add_argument("--new-threshold", type=float)
    command.epilog = None
    found = _documentation_problems(parser)
    assert any("--new-threshold: no help" in p for p in found) and any("no example" in p for p in found)


def test_one_name_for_the_phase_registration_and_the_old_spelling_still_works():
    parser = build_parser()
    common = ["--reference", "a.nii.gz", "--moving", "b.nii.gz", "--out", "t.tfm"]
    assert parser.parse_args(["liver", "register", "--registration", "sitk", *common]).registration == "sitk"
    assert parser.parse_args(["liver", "register", "--method", "sitk", *common]).registration == "sitk"
    assert parser.parse_args(["liver", "register", *common]).registration == "pso-powell"
    segment = parser.parse_args(["liver", "segment", "--phase", "venous=v.nii.gz", "--out", "o", "--registration", "sitk"])
    assert segment.registration == "sitk"


def test_json_to_standard_output_is_the_json_alone_and_quiet_prints_nothing(tmp_path, capsys):
    from conftest import ROOT
    from deepnav.cli import main

    image = str(ROOT / "FetalBiometry" / "Resources" / "Samples" / "279_HC.png")
    assert main(["fetal", "measure", image, "--pixel-size", "0.1", "--json", "-", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)["images"]  # the whole of stdout is the JSON
    assert rows[0]["hc_mm"] > 0 and "HC" in err and "measured 1 of 1" in err  # the summary went to stderr
    assert main(["fetal", "measure", image, "--pixel-size", "0.1", "--json", str(tmp_path / "m.json"),
                 "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "") and json.loads((tmp_path / "m.json").read_text())["images"][0]["hc_mm"] > 0
