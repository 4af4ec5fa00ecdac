"""`--help` of every command of both programs (oefpredictor, rnst), and the quiet command line:
no library log lines unless --verbose, the result line printed last."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    """The subcommands a parser offers (read from the parser, so a new command is covered too)."""
    return [name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices]


def _programs():
    from OEFPredictorLib import cli as oef_cli
    from RNSTFieldTransferLib import cli as rnst_cli

    return {"oefpredictor": oef_cli, "rnst": rnst_cli}


@pytest.mark.parametrize("program", ["oefpredictor", "rnst"])
def test_help_of_every_command_works(program, capsys):
    module = _programs()[program]
    commands = _commands(module.build_parser())
    assert commands, "no subcommands found"
    for argv in [["--help"]] + [[c, "--help"] for c in commands]:
        with pytest.raises(SystemExit) as exit_info:
            module.main(argv)
        out, err = capsys.readouterr()
        assert exit_info.value.code == 0, f"{program} {' '.join(argv)}: {err}"
        assert "usage:" in out and not err, f"{program} {' '.join(argv)}"
        if argv != ["--help"]:
            assert f"{program} {argv[0]}" in out


def test_help_with_a_percent_sign_in_dynamic_text_works():
    from OEFPredictorLib.cli import help_literal

    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--a", help=help_literal("a 90 % interval"))
    assert "a 90 % interval" in parser.format_help()


def _run(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'OEFPredictor'}{os.pathsep}{REPO / 'RNSTFieldTransfer'}",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "OEFPredictorLib.cli", *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace", timeout=600)


def _library_lines(text: str) -> list[str]:
    """Lines of TensorFlow's C++ log (I0000/W0000/E0000 ...), absl's preamble, oneDNN notes."""
    keys = ("absl::InitializeLog", "cpu_feature_guard", "oneDNN", "TensorFlow binary is optimized",
            "rebuild TensorFlow", "I0000 ", "W0000 ", "E0000 ")
    return [l for l in text.splitlines() if any(k in l for k in keys)]


def test_predict_is_quiet_by_default_and_prints_its_result_last(tiny_dataset, tmp_path):
    patient = tiny_dataset / "P01"
    base = ["predict", "--echoes", patient / "P01_MEGRE.nii.gz", "--qsm", patient / "P01_Chimap.nii.gz",
            "--mask", patient / "P01_desc-brain_mask.nii.gz", "--method", "lstm", "--device", "cpu"]
    # A user's environment that asks TensorFlow for every log line: the command line stays quiet.
    quiet = _run(base + ["--out", tmp_path / "a"], {"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert quiet.returncode == 0, quiet.stdout
    assert _library_lines(quiet.stdout) == []
    lines = [l for l in quiet.stdout.replace("\r", "\n").splitlines() if l.strip()]
    assert lines[-1].startswith("OEF maps of "), lines[-3:]
    loud = _run(base + ["--out", tmp_path / "b", "--verbose"], {"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert loud.returncode == 0, loud.stdout
    assert _library_lines(loud.stdout), "--verbose should let TensorFlow's log lines through"
