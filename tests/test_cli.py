"""The `smolforge` command line: help for every command, errors without tracebacks."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from smolforge.cli import build_parser, main

COMMANDS = ["quickstart", "tokenizer", "data", "pretrain", "generate", "export", "inspect", "template"]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_documented_options(command):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    pending = [(command, subparsers.choices[command])]
    while pending:  # the command and its nested subcommands (`data synth`, `template render`, ...)
        name, sub = pending.pop()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
            if isinstance(action, argparse._SubParsersAction):
                pending += [(f"{name} {n}", p) for n, p in action.choices.items()]


def test_pretrain_help_lists_recipe_fields(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "--train.lr" in out and "--model.n_kv_heads" in out and "Peak learning rate" in out


def test_user_errors_print_one_message_and_exit_2(tmp_path, capsys):
    code = main(["pretrain", str(tmp_path / "none.yaml")])
    assert code == 2
    err = capsys.readouterr().err
    assert "none.yaml not found" in err and "Traceback" not in err


def test_unknown_override_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--train.lrr", "1"])
    assert exit_info.value.code == 2
    assert "--train.lrr" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "smolforge.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("smolforge ")
