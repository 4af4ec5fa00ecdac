"""The `oefpredictor` command: simulate, train, evaluate, predict, stats, demo...

Each subcommand lives in its own module of this package with `register(subparsers)`; the module
list below is the only place that names them. Errors the user can fix (InputError) print as one
line and exit with code 2; nothing partial is left behind (the commands write atomically).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import CancelledError, InputError

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = ["simulate", "montage", "train", "evaluate", "predict", "stats", "demo"]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (what is wrong and where to look) and exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineErrorParser(
        prog="oefpredictor",
        description="Oxygen extraction fraction (OEF) maps from mGRE magnitude + QSM with the "
                    "QQ-model LSTM.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        sys.stderr.write(f"oefpredictor {args.command}: error: {exc}\n")
        return 2
    except CancelledError as exc:
        sys.stderr.write(f"oefpredictor {args.command}: cancelled: {exc}\n")
        return 130
    except KeyboardInterrupt:
        sys.stderr.write(f"oefpredictor {args.command}: interrupted; no partial output was kept.\n")
        return 130


def parse_echo_times_ms(text: str, field_strength: float = 3.0):
    """'4.5,9.5,...' (milliseconds) -> Protocol, with errors that say what to fix."""
    from ..physics import Protocol

    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise InputError(f"--te '{text}' is not a comma-separated list of numbers in milliseconds.") from None
    if len(values) < 2:
        raise InputError("--te needs at least two echo times in milliseconds, e.g. 4.5,9.5,14.5.")
    if any(v <= 0 for v in values):
        raise InputError(f"--te values must be positive milliseconds, got {text}.")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise InputError(f"--te values must be strictly increasing, got {text}.")
    if max(values) < 1.0:
        raise InputError(f"--te {text} looks like seconds; give echo times in milliseconds "
                         f"(e.g. {','.join(f'{v * 1000:g}' for v in values)}).")
    if max(values) > 1000.0:
        raise InputError(f"--te {text}: echo times over 1 s are not plausible; give milliseconds.")
    try:
        return Protocol.from_milliseconds(values, field_strength)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def progress_bar(total: int, description: str, unit: str = "it"):
    """A tqdm bar on stderr (quiet when stderr is not a terminal and CI is set)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None if os.environ.get("CI") else False)


if __name__ == "__main__":
    sys.exit(main())
