"""Every command and option of ``xmr`` says what it does and, where it has one, its default
(the help walk); and a few commands answer ``--help`` as a user runs them."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from xmr.cli import build_parser

pytestmark = pytest.mark.timeout(120)


def _stated_default(value) -> bool:
    return not (value is None or value is False or value is argparse.SUPPRESS or (isinstance(value, list) and not value))


def walk(parser: argparse.ArgumentParser, path: list[str]):
    """(path, problem) for every command without help and option without help or default."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, sub in action.choices.items():
                if not helps.get(name):
                    yield " ".join(path + [name]), "a command without help"
                yield from walk(sub, path + [name])
        elif isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        else:
            name = " ".join(path) + " " + ("/".join(action.option_strings) or action.dest)
            text = formatter._get_help_string(action) if action.help else ""
            if not text:
                yield name, "no help text"
            elif action.option_strings and _stated_default(action.default) and "default" not in text.lower():
                yield name, f"help does not say its default {action.default!r}"


def test_every_command_and_option_has_help_and_its_default():
    problems = list(walk(build_parser(), ["xmr"]))
    assert problems == []


def test_the_walk_finds_what_is_missing():
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--quiet")
    p.add_argument("--k", type=int, default=0, help="K")
    sub = p.add_subparsers()
    sub.add_parser("nohelp")
    assert {problem for _, problem in walk(p, ["t"])} == {"no help text", "help does not say its default 0",
                                                          "a command without help"}


@pytest.mark.parametrize("argv", [["--help"], ["data", "synth", "vcmr", "--help"], ["eval", "--help"],
                                  ["compare", "--help"]])
def test_help_runs_as_a_user_runs_it(argv):
    out = subprocess.run([sys.executable, "-m", "xmr.cli", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: xmr" in out.stdout
    if argv[:3] == ["data", "synth", "vcmr"]:
        assert "(default: 64)" in out.stdout and "--cross-stream-distractors" in out.stdout


def test_the_parser_is_built_without_torch_or_ray():
    """``xmr --help`` (and every ``--help``) answers without importing torch or Ray: the
    command line names its input errors from ``xmr.config`` (0.4 s here, 2.6 s with torch)."""
    code = ("import sys; from xmr.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
